"""What the loop sleeps in: ``multiprocessing.connection.wait()`` without its set-up.

``wait()`` builds a selector and registers every pipe and sentinel on each call; at one
call per job (jobs of ~10 ms on every core) that set-up was a quarter of the
supervisor's CPU, taken from the jobs.  One ``select.poll`` object kept across calls
is changed only when the set of descriptors changes, or what is waited for on one
(writable too: a child's pipe with a batch that did not fit, see channel.py).
"""

from __future__ import annotations

import math
import select

READ = select.POLLIN | select.POLLPRI
WRITE = select.POLLOUT


class Poller:
    def __init__(self) -> None:
        self._poll = select.poll()
        self._fds: dict[int, object] = {}
        self._masks: dict[int, int] = {}

    def wait(self, objs: list, timeout: float | None, writing: list = ()) -> list:
        """The objects of ``objs`` (ints, or anything with fileno()) that are readable,
        hung up or in error, or, for those also in ``writing``, writable, waiting up to
        ``timeout`` seconds (None: for ever)."""
        fds = {o if isinstance(o, int) else o.fileno(): o for o in objs}
        masks = dict.fromkeys(fds, READ)
        for o in writing:
            fd = o if isinstance(o, int) else o.fileno()
            if fd in masks:
                masks[fd] = READ | WRITE
        if masks != self._masks:
            for fd in self._masks.keys() - masks.keys():
                self._poll.unregister(fd)
            for fd, mask in masks.items():
                if self._masks.get(fd) != mask:
                    self._poll.register(fd, mask)   # (registering again modifies)
            self._masks = masks
        self._fds = fds
        ms = None if timeout is None else math.ceil(max(0.0, timeout) * 1000)
        return [fds[fd] for fd, _ in self._poll.poll(ms) if fd in fds]


def readable(fd: int) -> bool:
    """Is there something to read on ``fd`` right now (or has its writer gone)?"""
    p = select.poll()
    p.register(fd, READ)
    return bool(p.poll(0))
