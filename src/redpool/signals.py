"""Signal inbox: handlers only record; the loop acts.

Python runs a signal handler between bytecodes of the main thread, at any point:
logging, forking or raising there deadlocks or corrupts state (gunicorn moved all
work out of its handlers for this reason).  So a handler appends the signal number
to a list, and ``signal.set_wakeup_fd`` writes a byte to a pipe that the main loop
already waits on next to its children's pipes: no polling, no missed wake-ups.
"""

from __future__ import annotations

import signal
from collections import deque

from .wakeup import Wakeup

HANDLED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU)


class SignalInbox:
    def __init__(self, signals: tuple[int, ...] = HANDLED) -> None:
        self._received: deque[int] = deque()
        self._pipe = Wakeup()
        self._previous_fd = signal.set_wakeup_fd(self._pipe.wfd, warn_on_full_buffer=False)
        self._previous = {s: signal.signal(s, self._record) for s in signals}

    def _record(self, signum: int, frame) -> None:
        self._received.append(signum)

    def fileno(self) -> int:
        return self._pipe.rfd

    def drain(self, pipe: bool = True) -> list[int]:
        """The signals received since the last call.  ``pipe``: the wake-up pipe is
        readable (the loop saw it); empty it.  (Reading it on every iteration anyway
        would cost a failing read() each time.)"""
        if pipe:
            self._pipe.drain()
        out = []
        while self._received:
            out.append(self._received.popleft())
        return out

    def close(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        signal.set_wakeup_fd(self._previous_fd)
        self._pipe.close()
