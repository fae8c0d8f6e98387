"""Tasks for the hostile suite (tests/hostile/): well-behaved ones that hostile job
documents are aimed at, and misbehaving ones (issue 12: no job, task or producer can
crash, wedge or misuse a worker).

A task that leaves a process behind (the fork tasks) writes its pid to
``<HOSTILE_DIR>/<job id>.pid`` so that the test can release and reap it; it never
outlives HOSTILE_LINGER seconds (120 by default) whatever the test does.
"""

import ctypes
import os
import signal
import sys
import time

from redpool import current_job, task

# -- aimed at by hostile documents -----------------------------------------------------------


@task(name="h.ok")
def ok():
    return "ok"


@task(name="h.echo")
def echo(*args, **kwargs):
    """Returns what it was given: hostile arguments become a hostile result."""
    return {"args": list(args), "kwargs": kwargs}


@task(name="h.boom")
def boom(*args, **kwargs):
    """Raises (retried per the job's max_retries, so a hostile job is re-encoded)."""
    raise ValueError("boom")


@task(name="h.one")
def one(a):
    """Exactly one positional argument: anything else is refused before it runs."""
    return a


@task(name="h.nap")
def nap(seconds: float):
    time.sleep(seconds)
    return os.getpid()


@task(name="h.hold")
def hold(path: str):
    """Says it started (``path``.started), then runs until the file ``path`` exists
    (the test releases it), or for at most HOSTILE_LINGER seconds."""
    open(path + ".started", "w").close()
    deadline = time.monotonic() + float(os.environ.get("HOSTILE_LINGER", "120"))
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.01)
    return "released"


# -- misbehaving tasks -----------------------------------------------------------------------


class Unprintable(Exception):
    def __str__(self):
        raise RuntimeError("this exception cannot be printed")

    def __repr__(self):
        raise RuntimeError("nor represented")


@task(name="h.raise_unprintable")
def raise_unprintable():
    raise Unprintable()


@task(name="h.raise_surrogate")
def raise_surrogate():
    raise ValueError("bad \ud800 message")


@task(name="h.return_object")
def return_object():
    return {"when": object(), "set": {1, 2}}


@task(name="h.return_surrogate")
def return_surrogate():
    return {"text": "lone \udc80 surrogate", "\ud800key": 1}


@task(name="h.return_nan")
def return_nan():
    return [float("nan"), float("inf")]


@task(name="h.return_huge")
def return_huge(mb: int):
    return "x" * (mb * 1024 * 1024)


@task(name="h.sys_exit")
def sys_exit():
    sys.exit(3)


@task(name="h.os_exit")
def os_exit():
    os._exit(7)


@task(name="h.sigkill_self")
def sigkill_self():
    os.kill(os.getpid(), signal.SIGKILL)


@task(name="h.segfault")
def segfault():
    ctypes.string_at(0)


def _pidfile(what: str) -> str:
    return os.path.join(os.environ["HOSTILE_DIR"], f"{current_job().id}.{what}")


def _linger_until_released(flag: str) -> None:
    """In a forked process: live on (holding every fd the pool process had) until the
    test creates ``flag`` or HOSTILE_LINGER seconds pass; then vanish."""
    deadline = time.monotonic() + float(os.environ.get("HOSTILE_LINGER", "120"))
    while not os.path.exists(flag) and time.monotonic() < deadline:
        time.sleep(0.05)
    os._exit(0)


@task(name="h.fork_and_die")
def fork_and_die():
    """The pool process dies, and a grandchild it forked lives on with its fds (the
    pipe to the supervisor, multiprocessing's sentinel)."""
    pid = os.fork()
    if pid == 0:
        _linger_until_released(_pidfile("release"))
    with open(_pidfile("pid"), "w") as f:
        f.write(str(pid))
    os._exit(9)


@task(name="h.fork_and_return")
def fork_and_return():
    """Forks, and both processes return from the task (the copy carries on as if it
    were the pool process)."""
    pid = os.fork()
    if pid:
        with open(_pidfile("pid"), "w") as f:
            f.write(str(pid))
    return "forked"


@task(name="h.closerange")
def closerange():
    """Closes every fd the runtime did not open for it: the pipe to the supervisor too."""
    os.closerange(3, 4096)
    return "closed"


@task(name="h.spin")
def spin():
    while True:
        pass


@task(name="h.ignore_sigterm_and_spin")
def ignore_sigterm_and_spin():
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    while True:
        pass


@task(name="h.change_signals")
def change_signals():
    """Leaves its signal handlers changed behind it, and returns."""
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1,
                signal.SIGCHLD, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    return "changed"


@task(name="h.recurse")
def recurse(n=0):
    return recurse(n + 1)


@task(name="h.memory_error")
def memory_error():
    raise MemoryError()


@task(name="h.stderr_flood")
def stderr_flood(mb: int = 10):
    line = "x" * 1023 + "\n"
    for _ in range(mb * 1024):
        sys.stderr.write(line)
    sys.stderr.flush()
    return mb


@task(name="h.close_stdout")
def close_stdout():
    sys.stdout.close()
    os.close(1)
    return "closed"


@task(name="h.print")
def print_both(text="hello"):
    """Prints on stdout and stderr (run after h.close_stdout in the same process)."""
    print(text)
    print(text, file=sys.stderr)
    return text


@task(name="h.secrets")
def secrets():
    """What a task can see of the worker's own secrets: its environment, and the
    supervisor's command line."""
    with open(f"/proc/{os.getppid()}/cmdline", "rb") as f:
        cmdline = f.read().decode("utf-8", "replace")
    return {"env": {k: v for k, v in os.environ.items() if k.startswith("REDPOOL")},
            "parent_cmdline": cmdline, "argv": sys.argv}


@task(name="h.leave_alarm")
def leave_alarm(seconds: int = 1):
    """Leaves a SIGALRM timer behind: it goes off during whatever runs next here."""
    signal.alarm(seconds)
    return "armed"


@task(name="h.signal_parent")
def signal_parent(signame: str = "SIGTERM"):
    """Signals its supervisor (the pool process's parent)."""
    os.kill(os.getppid(), getattr(signal, signame))
    return signame


@task(name="h.raise_surrogate_class")
def raise_surrogate_class():
    raise type("Bad\ud800Name", (Exception,), {})("a class named with a lone surrogate")


@task(name="h.low_recursion_limit")
def low_recursion_limit():
    """Leaves the interpreter's recursion limit far too low for what runs next here."""
    sys.setrecursionlimit(60)
    return "lowered"
