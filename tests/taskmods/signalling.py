"""Tasks that signal their supervisor (the pool process's parent), themselves or
through a program they run (tests/test_signal_senders.py)."""

import os
import signal
import subprocess
import sys

from redpool import task

# A program that signals a pid, then lives on a moment: the supervisor looks its sender
# up when the signal arrives (one already reaped by then is taken as the operator's).
SEND = "import os, sys, time; os.kill(int(sys.argv[1]), int(sys.argv[2])); time.sleep(2)"


def number(name: str) -> int:
    if name.startswith("SIGRTMIN+"):
        return signal.SIGRTMIN + int(name.split("+")[1])
    return getattr(signal, name)


@task(name="sig.parent")
def parent(name: str) -> str:
    os.kill(os.getppid(), number(name))
    return name


@task(name="sig.program")
def program(name: str, new_session: bool = False) -> str:
    """A program the task runs signals the supervisor (in the pool process's group, or
    in a session of its own)."""
    subprocess.run([sys.executable, "-c", SEND, str(os.getppid()), str(number(name))],
                   check=True, start_new_session=new_session)
    return name
