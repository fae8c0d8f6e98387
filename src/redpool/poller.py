"""What the loop sleeps in: ``multiprocessing.connection.wait()`` without its set-up.

``wait()`` builds a selector and registers every pipe and sentinel on each call; at one
call per job (jobs of ~10 ms on every core) that set-up was a quarter of the
supervisor's CPU, taken from the jobs.  One ``select.poll`` object kept across calls
is changed only when the set of descriptors changes.
"""

from __future__ import annotations

import math
import select

READ = select.POLLIN | select.POLLPRI


class Poller:
    def __init__(self) -> None:
        self._poll = select.poll()
        self._fds: dict[int, object] = {}

    def wait(self, objs: list, timeout: float | None) -> list:
        """The objects of ``objs`` (ints, or anything with fileno()) that are readable,
        hung up or in error, waiting up to ``timeout`` seconds (None: for ever)."""
        fds = {o if isinstance(o, int) else o.fileno(): o for o in objs}
        if fds.keys() != self._fds.keys():
            for fd in self._fds.keys() - fds.keys():
                self._poll.unregister(fd)
            for fd in fds.keys() - self._fds.keys():
                self._poll.register(fd, READ)
        self._fds = fds
        ms = None if timeout is None else math.ceil(max(0.0, timeout) * 1000)
        return [fds[fd] for fd, _ in self._poll.poll(ms) if fd in fds]


def readable(fd: int) -> bool:
    """Is there something to read on ``fd`` right now (or has its writer gone)?"""
    p = select.poll()
    p.register(fd, READ)
    return bool(p.poll(0))
