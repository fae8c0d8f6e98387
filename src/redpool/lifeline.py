"""How a pool child ends: when its supervisor asks, or when its supervisor is gone.

Never because someone else sent it SIGTERM: the supervisor decides what happens to a
running job (see docs/design.md, "The supervised pool").
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time

# signal.getsignal wraps this one in an Enum lookup that raises and catches for any
# callable handler: 3 us instead of 50 ns, paid after every batch (adopt)
from _signal import getsignal

PR_SET_PDEATHSIG = 1
# How often the lifeline thread looks: at the parent (elsewhere than Linux), and at a
# stop the supervisor asked for (a tenth of a second after its SIGTERM at most, far
# inside the 2 s before its SIGKILL).  Ten wake-ups a second of a thread that does
# nothing else: no measurable cost.
WATCH_SECONDS = 0.1


class StopWhenAsked:
    """SIGTERM, acted on only when the supervisor asked for it (a job past its timeout,
    the grace over on shutdown): it sets a shared word before it signals us.  Anyone
    else's SIGTERM (a platform that signals every process, `kill` by hand) is ignored:
    the supervisor, which got it too, decides what happens to our job.

    A SIGTERM handler of the task code's own (installed by a task module, a hook, a
    job, or before us: sitecustomize, coverage) is kept and called instead of dying,
    once, for the supervisor's stop only: it is there to clean up when the job is
    stopped, and the platform's SIGTERM does not stop the job.  The next asked SIGTERM
    ends us, so a handler that passes the signal on (to the handler it found, which is
    ours, or by restoring it and sending the signal again) ends the process as it
    would have without us.  One installed by a job gets every SIGTERM until that job's
    batch is over (for a long job, until it ends).  Programs a task runs start with
    SIGTERM at its default, as with any handled signal (not ignored: that would be
    inherited).

    A Python handler runs only between bytecodes of the main thread: a job inside C
    code (a hash, a BLAS call, a C extension's loop) would not see the signal until it
    returns.  So a thread also looks at the shared word (``enforce``, from the lifeline
    thread) and, when no handler of the task's is to run, ends us as SIGTERM's default
    action would, whatever the main thread is doing."""

    def __init__(self, asked) -> None:
        self.asked = asked
        before = getsignal(signal.SIGTERM)
        self.theirs = before if callable(before) else signal.SIG_DFL
        self.called = False          # theirs ran for the supervisor's stop
        self.handler = self.handle   # one bound method, so that adopt() can tell it is ours
        signal.signal(signal.SIGTERM, self.handler)

    def adopt(self) -> None:
        """Take SIGTERM back from a handler the task code installed, and keep theirs."""
        h = getsignal(signal.SIGTERM)
        if h is not self.handler:
            self.theirs = signal.SIG_DFL if h is None else h
            signal.signal(signal.SIGTERM, self.handler)

    def handle(self, signum, frame) -> None:
        # A signal handler: decide and act, nothing else (no logging, no locks).  (No
        # shared word: no supervisor marks its signals, so every SIGTERM counts.)
        if self.asked is not None and not self.asked.value:
            return
        theirs = self.theirs
        if callable(theirs) and not self.called:
            self.called = True
            theirs(signum, frame)
        elif theirs != signal.SIG_IGN:
            # die of it, as with no handler at all: the exit status says SIGTERM
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)

    def enforce(self) -> None:
        """From a thread: the supervisor asked and no handler of the task's is to run
        first (SIG_DFL): end now, as SIGTERM's default action, even while the main
        thread is in C code.  (signal.signal works in the main thread only: the C
        library's signal() resets the disposition here.)"""
        theirs = self.theirs  # (SIG_DFL as _signal gives it: the int 0, equal, not identical)
        if self.asked is None or not self.asked.value or callable(theirs) \
                or theirs != signal.SIG_DFL:
            return
        try:
            ctypes.CDLL(None).signal(ctypes.c_int(signal.SIGTERM), ctypes.c_void_p(0))
        except (OSError, AttributeError):
            return  # no C library to ask: the supervisor's SIGKILL ends us after its grace
        os.kill(os.getpid(), signal.SIGTERM)


def die_with_parent(parent_pid: int, stop: StopWhenAsked | None = None) -> None:
    """Exit when the supervisor dies, even by SIGKILL: no orphans running on.

    Linux: the kernel sends us SIGKILL when our parent exits (PR_SET_PDEATHSIG).
    Elsewhere, and as a backstop, a thread watches our parent pid; the same thread
    carries out a stop the supervisor asked for that the main thread cannot see
    (``stop.enforce``: a job in C code), within WATCH_SECONDS."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(0)

    def watch() -> None:
        while True:
            time.sleep(WATCH_SECONDS)
            if os.getppid() != parent_pid:
                os._exit(0)
            if stop is not None:
                stop.enforce()

    threading.Thread(target=watch, name="redpool-parent-watch", daemon=True).start()
