"""Signal inbox: each signal and who sent it recorded; the loop acts.

Python runs a signal handler between bytecodes of the main thread, at any point:
logging, forking or raising there deadlocks or corrupts state (gunicorn moved all
work out of its handlers for this reason).  So nothing is done where a signal lands:
it is recorded, and the loop is woken through a pipe it already waits on next to its
children's pipes: no polling, no missed wake-ups.

**Who sent it.**  A task may signal its supervisor (``os.kill(os.getppid(), SIGTERM)``,
or a program it runs): that must not stop, reload, resize or kill the worker.  A Python
handler is not told the sender, so the signals are blocked in every thread and taken
by one thread in ``sigwaitinfo``, which tells the sending process (``si_pid``); that
thread looks up at once its process group and its parents (the sender still exists
then, or is a zombie if it is one of our pool processes, until the loop reaps it).
The loop then ignores a signal from one of its pool processes or anything they started
(Lifecycle.take_signals) and acts on everyone else's (systemd, a shell, ``kill``, a
supervisor of processes).  A sender
that has exited and been reaped before it is looked up (a short-lived ``kill`` a task
ran) is nobody's: taken as the operator's.

Guarded: the signals the worker acts on (HANDLED), and every other whose default action
ends or stops the process (a task's ``SIGUSR1`` would end the worker at once), unless
something ignores or handles it already; not the ones a fault raises (SIGSEGV...).
One of those from anyone else than our pool gets its default action, as before.
SIGKILL and SIGSTOP cannot be caught, blocked or told apart: nobody can guard them.

Where ``sigwaitinfo`` is missing (macOS) the signals are handled as before: recorded
by a handler, sender unknown, all acted on.
"""

from __future__ import annotations

import os
import signal
import threading
from collections import deque
from typing import NamedTuple

from .wakeup import Wakeup

HANDLED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU)
# Default action: end or stop the process.  (Not SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGTRAP,
# SIGSYS, SIGABRT: faults, and abort(), raise those in the thread at fault.)
_OTHERS = ("SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGTSTP", "SIGALRM", "SIGVTALRM", "SIGPROF",
           "SIGIO", "SIGPWR", "SIGXCPU", "SIGSTKFLT")
WAITS = hasattr(signal, "sigwaitinfo") and hasattr(signal, "pthread_sigmask")
LINEAGE_MAX = 16   # parents looked at, at most (a task's program's program's...)


def _others() -> list[int]:
    others = [getattr(signal, n) for n in _OTHERS if hasattr(signal, n)]
    if hasattr(signal, "SIGRTMIN"):
        others += range(signal.SIGRTMIN, signal.SIGRTMAX + 1)
    return others


def guarded() -> tuple[int, ...]:
    """The signals the inbox takes: HANDLED, and those of _OTHERS and the real-time
    ones still at their default action (ending the process) here."""
    return HANDLED + tuple(s for s in _others() if signal.getsignal(s) == signal.SIG_DFL)


def signame(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:   # (the enum names SIGRTMIN and SIGRTMAX only)
        return f"SIGRTMIN+{signum - signal.SIGRTMIN}"


class Received(NamedTuple):
    signum: int
    pid: int | None = None              # who sent it (None: unknown; 0: the kernel)
    lineage: tuple[int, ...] = ()       # its pid, its parent's, ... (up to ours or 1)
    pgid: int | None = None             # its process group, if it was still there


def lineage(pid: int, stop: int) -> tuple[int, ...]:
    """``pid`` and its parents (from /proc), up to ``stop`` (ours, excluded) or init."""
    out: list[int] = []
    while pid > 1 and pid != stop and len(out) < LINEAGE_MAX:
        out.append(pid)
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                stat = f.read()
            pid = int(stat[stat.rindex(b")") + 2:].split()[1])   # (comm may hold spaces)
        except (OSError, ValueError, IndexError):
            break
    return tuple(out)


def sender(pid: int) -> Received:
    """What is known of a sending process, looked up now (the signal number aside)."""
    try:
        pgid = os.getpgid(pid) if pid > 0 else None
    except OSError:
        pgid = None
    return Received(0, pid, lineage(pid, os.getpid()) if pid > 0 else (), pgid)


class SignalInbox:
    def __init__(self, signals: tuple[int, ...] | None = None) -> None:
        self.signals = guarded() if signals is None else signals
        self._received: deque[Received] = deque()
        self._pipe = Wakeup()
        self._closing = False
        self._previous_fd = signal.set_wakeup_fd(self._pipe.wfd, warn_on_full_buffer=False)
        # The handler is the fallback: a thread that does not block them (one started
        # before us) could still be handed one.  Sender unknown: acted on.
        self._previous = {s: signal.signal(s, self._record) for s in self.signals}
        self._thread: threading.Thread | None = None
        if WAITS:
            # blocked here, and so in every thread started from now on (they inherit
            # it), and in pool processes, which unblock them (unblock())
            self._mask = signal.pthread_sigmask(signal.SIG_BLOCK, self.signals)
            _blocked[:] = self.signals
            self._thread = threading.Thread(target=self._wait, name="redpool-signals",
                                            daemon=True)
            self._thread.start()

    def _record(self, signum: int, frame) -> None:
        self._received.append(Received(signum))

    def _wait(self) -> None:
        me = os.getpid()
        while True:
            info = signal.sigwaitinfo(self.signals)
            if self._closing and info.si_pid == me:
                return   # close() woke us
            try:
                got = sender(info.si_pid)._replace(signum=info.si_signo)
            except Exception:   # (never lose a signal, nor this thread)
                got = Received(info.si_signo, info.si_pid)
            self._received.append(got)
            self._pipe.wake()

    def fileno(self) -> int:
        return self._pipe.rfd

    def drain(self, pipe: bool = True) -> list[Received]:
        """The signals received since the last call.  ``pipe``: the wake-up pipe is
        readable (the loop saw it); empty it.  (Reading it on every iteration anyway
        would cost a failing read() each time.)"""
        if pipe:
            self._pipe.drain()
        out = []
        while self._received:
            out.append(self._received.popleft())
        return out

    def default_action(self, signum: int) -> None:
        """Do what ``signum`` does by default: end the process (as it did before the
        worker guarded it), or stop it until SIGCONT, then guard it again."""
        signal.signal(signum, signal.SIG_DFL)
        if WAITS:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, [signum])
        signal.raise_signal(signum)   # (this thread's: the waiting one does not take it)
        if WAITS:
            signal.pthread_sigmask(signal.SIG_BLOCK, [signum])
        signal.signal(signum, self._record)

    def close(self) -> None:
        if self._thread is not None:
            self._closing = True
            if self._thread.is_alive():
                signal.pthread_kill(self._thread.ident, self.signals[0])
                self._thread.join(5.0)
            _blocked.clear()
            signal.pthread_sigmask(signal.SIG_SETMASK, self._mask)
        for s, h in self._previous.items():
            signal.signal(s, h)
        signal.set_wakeup_fd(self._previous_fd)
        self._pipe.close()


_blocked: list[int] = []   # what an open inbox blocks


def reblock() -> None:
    """After a pool process is spawned: multiprocessing unblocks SIGINT and SIGTERM
    whenever it starts its resource tracker (the first spawn, and again should it
    die), which would hand them to the handler, sender unknown."""
    if _blocked:
        signal.pthread_sigmask(signal.SIG_BLOCK, _blocked)


def unblock() -> None:
    """In a pool process: the signals its supervisor's inbox blocks (inherited through
    fork and exec) are its own again, and those of the programs its tasks run."""
    if WAITS:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED + tuple(_others()))
