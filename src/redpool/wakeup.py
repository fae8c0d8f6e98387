"""A self-pipe: one end the loop waits on, the other anything may write to (a signal
handler through set_wakeup_fd, a waiter thread) to wake it.  Non-blocking both ways:
a full pipe already means a wake-up is pending."""

from __future__ import annotations

import os


class Wakeup:
    def __init__(self) -> None:
        self.rfd, self.wfd = os.pipe()
        os.set_blocking(self.rfd, False)
        os.set_blocking(self.wfd, False)

    def fileno(self) -> int:
        return self.rfd

    def wake(self) -> None:
        try:
            os.write(self.wfd, b"!")
        except OSError:  # full (a wake-up is pending anyway), or closed at shutdown
            pass

    def drain(self) -> None:
        try:
            while os.read(self.rfd, 512):
                pass
        except BlockingIOError:
            pass

    def close(self) -> None:
        for fd in (self.rfd, self.wfd):
            try:
                os.close(fd)
            except OSError:
                pass
