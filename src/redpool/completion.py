"""A finished job to acknowledge: what to write, and what to remove.

The value the loop hands to the Redis side (queue.RedisQueue.complete, one script call
for many), made by the loop (outcomes.py) and by oversized.py for a job it refuses.
Its own module so that both import it from below, and queue.py (which imports
oversized.py) is not imported back.
"""

from __future__ import annotations

from dataclasses import dataclass

from .protocol import MAX_RESULT_TTL, unpaired_surrogate

__all__ = ["Completion"]


@dataclass(slots=True)
class Completion:
    """A finished job to acknowledge: what to write, and what to remove."""

    queue: str
    raw: bytes
    result_id: str | None       # None: no result key (no id of the producer's, or ttl 0)
    ttl: int
    reply_to: str | None
    envelope: bytes | None      # None: nobody to answer (no id, no reply_to).  This,
    #                             dead and retry may be memoryviews of a child's answer
    #                             when large (child.decode_done): sent as they are
    dead: bytes | None = None   # a dead-letter entry, when the job could not run
    retry: bytes | None = None  # the next attempt, scheduled instead of a result
    retry_delay: float = 0.0    # seconds until it is due

    def __post_init__(self) -> None:
        """Refuse a completion no script call could carry (a key UTF-8 cannot write, a
        number Redis refuses): sent, it would fail its whole batch on every try.  The
        loop contains this error to the one job (outcomes.ChildEvents.job_done)."""
        for key in (self.reply_to, self.result_id):
            if key is not None and (key.__class__ is not str or not key or not key.isascii()
                                    and unpaired_surrogate(key) is not None):
                raise ValueError(f"its reply_to {self.reply_to!r} or result id "
                                 f"{self.result_id!r} cannot name a Redis key")
        if self.ttl.__class__ is not int or not 0 <= self.ttl <= MAX_RESULT_TTL \
                or not 0.0 <= self.retry_delay < 1e12:
            raise ValueError(f"its ttl {self.ttl!r} or retry delay {self.retry_delay!r} is "
                             "not a number Redis takes")
