"""What a job leaves behind in its pool process, put back before the next job runs.

A pool process runs many jobs, so per-process state a task changes and does not
restore outlives its job.  Some of it would fail or kill a later job, which would then
be blamed for it (a death counts against the job that was running, and after
--max-crashes it is dead-lettered as WorkerCrashed).  ``Leftovers.reset`` runs after
every job and puts back, as they were once the task modules and hooks had run:

- a pending real-time timer (``signal.alarm``, ``setitimer(ITIMER_REAL)``) is
  cancelled: SIGALRM's default action kills the process, and a handler of the task's
  would raise into a later job;
- the disposition of SIGALRM, SIGINT, SIGPIPE and SIGCHLD (SIGPIPE at its default kills
  the process on a later job's write to a closed socket; SIGCHLD ignored makes a later
  job's subprocess fail).  SIGTERM is lifeline.StopWhenAsked's, taken back after each
  batch;
- the recursion limit (left low, a later job's encoding fails with RecursionError);
- the working directory (a later job's relative paths);
- ``sys.stdout`` and ``sys.stderr``: replaced, they are put back; closed, they are
  opened again on the same descriptor (a later job's ``print`` would raise, and the
  child's log lines would be lost).

About 1.9 us a job in all: two syscalls (setitimer, getcwd) and a few compares.  Not
put back (docs/design.md says why): environment variables, the umask, imported modules,
threads a task started, ``sys.path``, logging's configuration, the virtual and
profiling timers (SIGVTALRM, SIGPROF: a syscall each, for what only profilers set).
"""

from __future__ import annotations

import io
import os
import signal
import sys

# (see lifeline.py: signal.getsignal is 60 times slower for a callable handler)
from _signal import getsignal

SIGNALS = tuple(getattr(signal, n) for n in ("SIGALRM", "SIGINT", "SIGPIPE", "SIGCHLD")
                if hasattr(signal, n))


class Leftovers:
    """Built once the process is ready for jobs: what it is then is what each job gets."""

    def __init__(self) -> None:
        # (None: a handler not set from Python, which we could not set back)
        self.signals = [(s, h) for s, h in ((s, getsignal(s)) for s in SIGNALS) if h is not None]
        self.timer = hasattr(signal, "setitimer")
        self.limit = sys.getrecursionlimit()
        self.cwd = os.getcwd()
        self.stdout, self.stderr = sys.stdout, sys.stderr

    def reset(self) -> None:
        """Never raises: a working directory gone, say, is left as it is."""
        if self.timer:   # before the dispositions: no alarm between the two
            signal.setitimer(signal.ITIMER_REAL, 0)
        for s, h in self.signals:
            if getsignal(s) is not h:
                signal.signal(s, h)
        if sys.getrecursionlimit() != self.limit:
            sys.setrecursionlimit(self.limit)
        try:
            if os.getcwd() != self.cwd:
                os.chdir(self.cwd)
        except OSError:
            try:
                os.chdir(self.cwd)   # (the task's directory was removed)
            except OSError:
                pass
        if self.stdout is not None and (sys.stdout is not self.stdout or self.stdout.closed):
            sys.stdout = self.stdout = reopened(self.stdout, 1)
        if self.stderr is not None and (sys.stderr is not self.stderr or self.stderr.closed):
            sys.stderr = self.stderr = reopened(self.stderr, 2)


def reopened(stream, fd: int):
    """``stream``, or if a task closed it, a new one like it on descriptor ``fd`` (which
    the interpreter's own sys.stdout and sys.stderr never close); our log lines
    (logs.Sink) go to the new one too."""
    try:
        if not stream.closed:
            return stream
        new = io.TextIOWrapper(io.FileIO(fd, "w", closefd=False), encoding=stream.encoding,
                               errors=stream.errors, line_buffering=True)
    except (OSError, ValueError, AttributeError, LookupError, TypeError):
        return stream
    from . import logs
    logs.point_at(stream, new)
    return new
