"""Tasks that do to their own process what daemonising or shell-happy code does: close
every inherited descriptor, fork and leave the copy behind, start background commands,
detach a daemon (tests/test_unruly.py).

Each process a task leaves behind writes its pid to ``pidfile`` first, so that the test
can see whether it is still alive, and kill it in teardown whatever happened."""

import os
import time

from redpool import task


def _write_pid(pidfile: str, pid: int) -> None:
    tmp = f"{pidfile}.{pid}.tmp"
    with open(tmp, "w") as f:
        f.write(str(pid))
    os.replace(tmp, pidfile)   # whole, or not there at all


def _leave_behind(pidfile: str) -> int:
    """Fork a copy that keeps every descriptor we have (a fork keeps them all,
    close-on-exec or not) and sleeps for ten minutes; return its pid."""
    pid = os.fork()
    if pid == 0:
        try:
            _write_pid(pidfile, os.getpid())
            time.sleep(600)
        finally:
            os._exit(0)
    return pid


def _wait_for_file(path: str) -> None:
    deadline = time.monotonic() + 60
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.01)


@task(name="u.closerange")
def closerange(pidfile: str, seconds: float = 600.0):
    """Close every inherited descriptor, as daemonising code does, then work on."""
    _write_pid(pidfile, os.getpid())
    os.closerange(3, 65536)
    time.sleep(seconds)
    return "worked on"


@task(name="u.fork_then_die")
def fork_then_die(pidfile: str):
    _leave_behind(pidfile)
    _wait_for_file(pidfile)
    os._exit(5)


@task(name="u.fork_then_hang")
def fork_then_hang(pidfile: str):
    _leave_behind(pidfile)
    time.sleep(600)


@task(name="u.background_then_raise")
def background_then_raise(pidfile: str):
    """os.system with `&`: the shell starts the command in our process group, with
    every descriptor we have that is not close-on-exec, and returns at once."""
    os.system(f"sleep 600 & echo $! > {pidfile}.tmp && mv {pidfile}.tmp {pidfile}")
    _wait_for_file(pidfile)
    raise RuntimeError("failed after starting a background command")


@task(name="u.daemon")
def daemon(pidfile: str):
    """The classic double fork: a daemon in a session of its own, which keeps the
    descriptors it inherited (a careless one; a careful one closes them)."""
    pid = os.fork()
    if pid == 0:
        try:
            os.setsid()
            if os.fork() == 0:
                _write_pid(pidfile, os.getpid())
                time.sleep(600)
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    _wait_for_file(pidfile)
    return "started a daemon"


@task(name="u.fork_and_return")
def fork_and_return(pidfile: str):
    """Forks and forgets os._exit() in the copy: both processes return from the task."""
    pid = os.fork()
    if pid == 0:
        _write_pid(pidfile, os.getpid())
    return os.getpid()


@task(name="u.big")
def big(n: int, pad: str = ""):
    """A result of ``n`` bytes (``pad``: to make the job itself big)."""
    return "x" * n


@task(name="u.inherited")
def inherited():
    """Which of our descriptors (beyond 0-2) a program we run inherits: os.system and
    subprocess with close_fds=False pass on every one that is not close-on-exec."""
    import subprocess

    def table(pid) -> dict:
        out = {}
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                out[int(fd)] = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                pass  # the listing's own
        return out

    ours = table("self")
    listing = subprocess.run(
        ["sh", "-c", 'for fd in /proc/$$/fd/*; do echo "${fd##*/} $(readlink "$fd")"; done'],
        close_fds=False, capture_output=True, text=True, check=True).stdout
    theirs = dict(line.split(" ", 1) for line in listing.splitlines() if " " in line)
    return sorted(f"{fd} {target}" for fd, target in theirs.items()
                  if int(fd) > 2 and ours.get(int(fd)) == target)
