"""A pool process's death, learnt from the process itself, and its end, with what it started.

Nothing a task does to its own descriptors or children may hide its process's death
from the supervisor or block it:

* **Death comes from a pidfd** (``os.pidfd_open``, Linux 5.3 or newer): a descriptor
  of the process itself, held by the supervisor only, readable once the process has
  exited.  multiprocessing's sentinel is the read end of a pipe whose write end the
  child holds: any process it forks keeps that end (a fork keeps every descriptor) and
  hides the death until it exits itself, and a task that closes its inherited
  descriptors (as daemonising code does) fires it while the process lives on, after
  which ``Process.join(timeout)`` blocks in ``waitpid`` until the process ends,
  whatever the timeout.  Where there is no pidfd (other systems, older kernels, a
  sandbox that refuses the call) the sentinel is still watched, and every process's
  exit status is also looked at every CHECK_SECONDS without reaping it (``waitid``
  with ``WNOWAIT``), which no descriptor can hide.
* **A pool process leads its own process group** (``child.main``), and everything a
  task starts there (``os.fork``, ``os.system("cmd &")``, ``subprocess``) is in it.
  Timeouts and stops signal the whole group; when the process has died, whatever is
  left of its group is killed before the process is reaped: until then neither its pid
  nor its group's id can be anyone else's.  A process a task put in a session or group
  of its own (a daemon's double fork) left on purpose, and is not followed.
"""

from __future__ import annotations

import os
import signal
import time
from multiprocessing.connection import wait

from .poller import readable

# Where there is no pidfd: how often every pool process's exit status is looked at.
CHECK_SECONDS = 0.5
# A pool process whose end of its pipe closed is usually exiting (a process's
# descriptors close a moment before it becomes a zombie); one still alive this long
# after is cut off (a task closed its descriptors) and is killed.  (Killed at once, a
# dying one would be blamed on us: an out-of-memory kill told as ours.)
CUT_OFF_SECONDS = 1.0

# (a module attribute: tests set it to None to run the fallback)
pidfd_open = getattr(os, "pidfd_open", None)


def open_pidfd(pid: int) -> int | None:
    """A pidfd of ``pid`` (close-on-exec: no pool process inherits it), or None."""
    if pidfd_open is None:
        return None
    try:
        return pidfd_open(pid)
    except OSError:   # ENOSYS (kernel older than 5.3), EPERM (a seccomp sandbox)
        return None


def exited(pid: int, pidfd: int | None) -> bool:
    """Has ``pid`` exited?  Never reaps it (nor waits)."""
    if pidfd is not None:
        return readable(pidfd)
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True   # reaped already (multiprocessing reaps its dead in Process.start)


def kill_group(pid: int, sig: int) -> None:
    """Signal a pool process and everything in its group; one still booting, that has
    not made its group yet, by pid.  Only for a process not reaped yet."""
    if pid <= 0:
        return   # (0 or -1 would be our own group, or every process we may signal)
    try:
        os.killpg(pid, sig)
        return
    except (ProcessLookupError, PermissionError):
        pass
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def wait_exited(procs: list[tuple[int, int | None]], deadline: float) -> None:
    """Wait until every (pid, pidfd) has exited, or until ``deadline`` (monotonic).  For
    the stopping paths only: the loop never waits on a process."""
    while True:
        left = [(pid, fd) for pid, fd in procs if not exited(pid, fd)]
        timeout = deadline - time.monotonic()
        if not left or timeout <= 0:
            return
        fds = [fd for _, fd in left if fd is not None]
        if len(fds) == len(left):
            wait(fds, timeout)
        else:
            time.sleep(min(0.01, timeout))


def describe_exit(exitcode: int | None, stopped: bool = False, cut_off: bool = False) -> str:
    """Say honestly how a child ended (gunicorn's reap_workers does the same); a SIGKILL
    of one we ``stopped`` (a timeout) is ours, not the out-of-memory killer's, and so is
    one of a child ``cut_off`` (it closed its pipe to us while it ran)."""
    if cut_off and exitcode == -signal.SIGKILL:
        return ("closed its pipe to the supervisor and ran on (a task that closes the "
                "descriptors it inherited, as daemonising code does, cuts its process "
                "off), so the supervisor killed it (SIGKILL)")
    if exitcode is None:
        return "vanished (exit status unknown)"
    if exitcode < 0:
        sig = -exitcode
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = f"signal {sig}"
        text = f"was killed by {name} (signal {sig})"
        if sig == signal.SIGKILL and stopped:
            text += " after it had not stopped at SIGTERM"
        elif sig == signal.SIGKILL:
            text += "; if nobody sent it, the kernel's out-of-memory killer probably did"
        elif sig == signal.SIGSEGV:
            text += " (a segmentation fault, usually in a C extension)"
        return text
    return f"exited with code {exitcode}"
