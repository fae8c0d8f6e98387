"""A job a supervisor holds, from reservation to acknowledgement."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field


@dataclass
class Work:
    """A reserved job, or one a child is to fail (``fail``) rather than run."""
    queue: str
    raw: bytes
    crashes: int = 0
    fail: dict | None = None     # {error_type, message, retry, dead, started_at, ran}:
    #                              settle it (child.fail_entry), do not run it
    deadline: float = math.inf   # monotonic time its timeout expires
    kill_at: float = math.inf    # SIGKILL time, once it has been sent SIGTERM
    timed_out: float = 0.0       # the timeout it overran (0: it did not)
    started: float = field(default_factory=time.monotonic)
    # job_started was emitted for this run (debug only).  Not a field: set on the
    # instance when it happens, so that holding a job costs nothing more without debug.
    announced = False

    def again(self, crashes: int | None = None, fail: dict | None = None) -> "Work":
        """The same job, held anew (not running: no deadline, no timeout state)."""
        return Work(self.queue, self.raw, self.crashes if crashes is None else crashes,
                    self.fail if fail is None else fail)
