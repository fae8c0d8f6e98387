"""Every Redis key redpool uses, and only here: part of the wire format (docs/protocol.md).

Producers in other languages build these names themselves; keep them in step with
the document.
"""

from __future__ import annotations

import re

DEFAULT_NAMESPACE = "redpool"


class Keys:
    """Every Redis key redpool uses.  Keys are never assembled anywhere else.

    Two layouts.  On one Redis server (or a Sentinel-managed primary) the names are
    plain.  On Redis Cluster (``cluster=True``) every key of one queue carries the
    queue's name as a hash tag, ``<ns>:queue:{<q>}``, so that all of them live in one
    slot and each script touches a single slot; what a queue keeps per queue there
    (crash counts, dead letters, its lease fence, the completion outbox) is global on
    one server.  The namespace-wide keys (supervisor leases, their set, the reaper's
    lock) share the namespace's slot: ``{<ns>}:supervisors``.  Result keys and reply
    lists are untagged in both: each lives wherever it hashes."""

    __slots__ = ("ns", "cluster")

    def __init__(self, namespace: str = DEFAULT_NAMESPACE, *, cluster: bool = False) -> None:
        if not namespace or any(c.isspace() for c in namespace):
            raise ValueError(f"invalid namespace {namespace!r}: must be non-empty, no spaces")
        if cluster and ("{" in namespace or "}" in namespace):
            raise ValueError(f"invalid namespace {namespace!r} on Redis Cluster: no '{{' or '}}' "
                             "(redpool puts its own hash tags into the key names)")
        self.ns = namespace
        self.cluster = cluster

    def check_queue(self, name: str) -> None:
        """On Redis Cluster a queue name becomes a hash tag: braces would break it."""
        if self.cluster and ("{" in name or "}" in name):
            raise ValueError(f"invalid queue name {name!r} on Redis Cluster: no '{{' or '}}' "
                             "(the name is the hash tag of the queue's keys)")

    def _tag(self, queue: str) -> str:
        return f"{{{queue}}}" if self.cluster else queue

    def _untag(self, part: str) -> str:
        if self.cluster and len(part) >= 2 and part[0] == "{" and part[-1] == "}":
            return part[1:-1]
        return part

    @property
    def _global(self) -> str:
        """Prefix of the namespace-wide keys: ``{<ns>}`` on Redis Cluster (one slot)."""
        return f"{{{self.ns}}}" if self.cluster else self.ns

    def queue(self, name: str) -> str:
        return f"{self.ns}:queue:{self._tag(name)}"

    def result(self, job_id: str) -> str:
        return f"{self.ns}:result:{job_id}"

    @property
    def dead(self) -> str:
        """The dead-letter list (one server).  On Redis Cluster each queue has its own:
        ``dead_of(queue)``, and ``dead_lists()`` finds them."""
        if self.cluster:
            raise ValueError("on Redis Cluster each queue has its own dead-letter list")
        return f"{self.ns}:dead"

    def dead_of(self, queue: str) -> str:
        """Where a job of ``queue`` is dead-lettered."""
        return f"{self.ns}:dead:{self._tag(queue)}" if self.cluster else f"{self.ns}:dead"

    @property
    def dead_pattern(self) -> str:
        """SCAN pattern of the per-queue dead-letter lists (Redis Cluster)."""
        return f"{glob_escape(self.ns)}:dead:*"

    def dead_named(self, key: str) -> str | None:
        """The queue of a per-queue dead-letter list (Redis Cluster); None otherwise."""
        prefix = f"{self.ns}:dead:"
        if self.cluster and key.startswith(prefix) and len(key) > len(prefix):
            return self._untag(key[len(prefix):])
        return None

    def processing(self, supervisor: str, queue: str) -> str:
        # supervisor names contain no ':' (NAME_RE), so the queue is everything after it.
        return f"{self.ns}:processing:{supervisor}:{self._tag(queue)}"

    def processing_pattern(self, supervisor: str) -> str:
        return self._pattern("processing", supervisor)

    def queue_of_processing(self, supervisor: str, key: str) -> str:
        return self._queue_of("processing", supervisor, key)

    def _pattern(self, kind: str, supervisor: str) -> str:
        """SCAN pattern of a supervisor's per-queue keys of one kind.  The namespace is
        escaped too: it may legally contain glob characters."""
        return f"{glob_escape(self.ns)}:{kind}:{glob_escape(supervisor)}:*"

    def _queue_of(self, kind: str, supervisor: str, key: str) -> str:
        prefix = f"{self.ns}:{kind}:{supervisor}:"
        if not key.startswith(prefix):
            raise ValueError(f"{key!r} is not a {kind} key of {supervisor!r}")
        return self._untag(key[len(prefix):])

    def supervisor(self, name: str) -> str:
        """The supervisor's lease: a hash {epoch, info} with a TTL, renewed while alive."""
        return f"{self._global}:supervisor:{name}"

    def scheduled(self, queue: str) -> str:
        """Jobs due later (delayed, or retries waiting out their backoff): a sorted set
        of raw jobs scored by the unix time they are due."""
        return f"{self.ns}:scheduled:{self._tag(queue)}"

    @property
    def crashes(self) -> str:
        """A hash: SHA-1 of a raw job -> deliveries of it that ended in a crash, and
        ``crash_started(sha1)`` -> the unix time its last crashed run started (one
        server; on Redis Cluster one per queue, ``crashes_of``)."""
        if self.cluster:
            raise ValueError("on Redis Cluster each queue has its own crash counts")
        return f"{self.ns}:crashes"

    def crashes_of(self, queue: str) -> str:
        """The crash counts that judge the jobs of ``queue``."""
        return f"{self.ns}:crashes:{self._tag(queue)}" if self.cluster else f"{self.ns}:crashes"

    def fence(self, supervisor: str, queue: str) -> str:
        """Redis Cluster only: a supervisor's lease epoch for one queue, in the queue's
        slot (a hash {epoch} with the lease's TTL), which reserve.lua checks there."""
        return f"{self.ns}:lease:{supervisor}:{self._tag(queue)}"

    def outbox(self, supervisor: str, queue: str) -> str:
        """Redis Cluster only: results of a supervisor's jobs of one queue, accepted
        (the job left its processing list) but not yet written to their own slots."""
        return f"{self.ns}:outbox:{supervisor}:{self._tag(queue)}"

    def probe(self, key: str) -> str | None:
        """Redis Cluster only (--durable-results): a key in ``key``'s slot that a worker
        writes (a string, 60 s TTL) before a WAIT, to confirm that an answer it pushed
        earlier to ``key`` reached a replica without pushing it twice.  None when the
        slot's hash tag cannot be carried over (a key with a stray '}')."""
        start = key.find("{")
        end = key.find("}", start + 1) if start >= 0 else -1
        tag = key[start + 1:end] if start >= 0 and end > start + 1 else key
        return None if "}" in tag else f"{self.ns}:probe:{{{tag}}}"

    def outbox_pattern(self, supervisor: str) -> str:
        return self._pattern("outbox", supervisor)

    def queue_of_outbox(self, supervisor: str, key: str) -> str:
        return self._queue_of("outbox", supervisor, key)

    @property
    def dataset(self) -> str:
        """A marker of the dataset the namespace lives in: a random token without a TTL,
        set by the first supervisor that finds none.  Gone, or another token in its
        place, since a supervisor last looked: the server lost its data meanwhile
        (restarted without persistence, flushed).  On Redis Cluster it sits in the
        namespace's slot (the leases' node) as ``<ns>:dataset:{<ns>}``: under ``<ns>:``,
        the prefix the worker's ACL rule grants."""
        return self.dataset_of(self.ns) if self.cluster else f"{self.ns}:dataset"

    def dataset_of(self, queue: str) -> str:
        """The marker in ``queue``'s slot on Redis Cluster, where each node can lose its
        data alone; the namespace's one on one server."""
        return f"{self.ns}:dataset:{self._tag(queue)}" if self.cluster else self.dataset

    @property
    def reaper(self) -> str:
        """A short lock: at most one supervisor reaps dead ones at a time."""
        return f"{self._global}:reaper"

    @property
    def supervisors(self) -> str:
        """A set of the names of registered supervisors."""
        return f"{self._global}:supervisors"

    def reply(self, client_id: str) -> str:
        """The default reply list of one Python client."""
        return f"{self.ns}:reply:{client_id}"

    @property
    def queues_pattern(self) -> str:
        """SCAN pattern of queue lists and scheduled sets, in one pass (queue_named filters)."""
        return f"{glob_escape(self.ns)}:[qs]*"

    def kind_of(self, key: str) -> tuple[str, str | None]:
        """(kind, queue) of any key of the namespace, for messages about it: kind is
        queue, scheduled, processing, outbox, dead, crashes, fence, dataset, lease,
        supervisors or reaper ("" for a key that is none of them); queue is the queue it
        belongs to, when it belongs to one."""
        if key in (self.supervisors, self.reaper):
            return ("supervisors" if key == self.supervisors else "reaper"), None
        if key.startswith(self.supervisor("")):
            return "lease", None
        q = self.queue_named(key)
        if q is not None:
            return ("queue" if key == self.queue(q) else "scheduled"), q
        for kind, stem in (("processing", "processing"), ("outbox", "outbox"),
                           ("fence", "lease")):
            prefix = f"{self.ns}:{stem}:"
            if key.startswith(prefix) and ":" in key[len(prefix):]:
                sup, _, _ = key[len(prefix):].partition(":")
                return kind, self._queue_of(stem, sup, key)
        for kind in ("dead", "crashes", "dataset"):
            if key == f"{self.ns}:{kind}":
                return kind, None
            if key.startswith(f"{self.ns}:{kind}:"):
                tail = self._untag(key[len(self.ns) + len(kind) + 2:])
                return kind, (None if kind == "dataset" else tail)
        return "", None

    def queue_named(self, key: str) -> str | None:
        """The queue of a queue list or scheduled set; None for any other key."""
        for prefix in (f"{self.ns}:queue:", f"{self.ns}:scheduled:"):
            if key.startswith(prefix) and len(key) > len(prefix):
                name = key[len(prefix):]
                if self.cluster:
                    return self._untag(name) if name[0] == "{" and name[-1] == "}" else None
                return name
        return None


def crash_started(sha1_hex: str) -> str:
    """The field of a crashes hash holding when the job's last crashed run started (unix
    seconds, as text): exact when its process died under us (crashed.lua), the time of
    the step when its supervisor died and which of its jobs had started is unknown
    (reap.lua, requeue_all.lua)."""
    return f"{sha1_hex}:started"


def glob_escape(s: str) -> str:
    """``s`` matched literally in a Redis glob (SCAN MATCH, ACL key patterns)."""
    return re.sub(r"([*?\[\]\\])", r"\\\1", s)
