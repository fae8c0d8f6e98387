"""Every Redis key redpool uses, and only here: part of the wire format (docs/protocol.md).

Producers in other languages build these names themselves; keep them in step with
the document.
"""

from __future__ import annotations

import re

DEFAULT_NAMESPACE = "redpool"


class Keys:
    """Every Redis key redpool uses.  Keys are never assembled anywhere else."""

    __slots__ = ("ns",)

    def __init__(self, namespace: str = DEFAULT_NAMESPACE) -> None:
        if not namespace or any(c.isspace() for c in namespace):
            raise ValueError(f"invalid namespace {namespace!r}: must be non-empty, no spaces")
        self.ns = namespace

    def queue(self, name: str) -> str:
        return f"{self.ns}:queue:{name}"

    def result(self, job_id: str) -> str:
        return f"{self.ns}:result:{job_id}"

    @property
    def dead(self) -> str:
        return f"{self.ns}:dead"

    def processing(self, supervisor: str, queue: str) -> str:
        # supervisor names contain no ':' (NAME_RE), so the queue is everything after it.
        return f"{self.ns}:processing:{supervisor}:{queue}"

    def processing_pattern(self, supervisor: str) -> str:
        # The namespace is escaped too: it may legally contain glob characters.
        return f"{glob_escape(self.ns)}:processing:{glob_escape(supervisor)}:*"

    def queue_of_processing(self, supervisor: str, key: str) -> str:
        prefix = f"{self.ns}:processing:{supervisor}:"
        if not key.startswith(prefix):
            raise ValueError(f"{key!r} is not a processing list of {supervisor!r}")
        return key[len(prefix):]

    def supervisor(self, name: str) -> str:
        """The supervisor's lease: a hash {epoch, info} with a TTL, renewed while alive."""
        return f"{self.ns}:supervisor:{name}"

    def scheduled(self, queue: str) -> str:
        """Jobs due later (delayed, or retries waiting out their backoff): a sorted set
        of raw jobs scored by the unix time they are due."""
        return f"{self.ns}:scheduled:{queue}"

    @property
    def crashes(self) -> str:
        """A hash: SHA-1 of a raw job -> deliveries of it that ended in a crash."""
        return f"{self.ns}:crashes"

    @property
    def reaper(self) -> str:
        """A short lock: at most one supervisor reaps dead ones at a time."""
        return f"{self.ns}:reaper"

    @property
    def supervisors(self) -> str:
        """A set of the names of registered supervisors."""
        return f"{self.ns}:supervisors"

    def reply(self, client_id: str) -> str:
        """The default reply list of one Python client."""
        return f"{self.ns}:reply:{client_id}"

    @property
    def queues_pattern(self) -> str:
        """SCAN pattern of queue lists and scheduled sets, in one pass (queue_named filters)."""
        return f"{glob_escape(self.ns)}:[qs]*"

    def queue_named(self, key: str) -> str | None:
        """The queue of a queue list or scheduled set; None for any other key."""
        for prefix in (self.queue(""), self.scheduled("")):
            if key.startswith(prefix) and len(key) > len(prefix):
                return key[len(prefix):]
        return None


def glob_escape(s: str) -> str:
    """``s`` matched literally in a Redis glob (SCAN MATCH, ACL key patterns)."""
    return re.sub(r"([*?\[\]\\])", r"\\\1", s)
