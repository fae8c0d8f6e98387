"""Task modules with SIGTERM handlers that pass the signal on, as libraries do
(tests/test_child.py): one chains to the handler it found, one restores it and sends
the signal again (coverage.py's way).  Each writes one byte per call to the file named
by REDPOOL_SIGTERM_LOG, so a test can count the calls."""

import hashlib
import os
import signal

from redpool import task

_found = signal.getsignal(signal.SIGTERM)


def _note() -> None:
    with open(os.environ["REDPOOL_SIGTERM_LOG"], "a") as f:
        f.write("x")


def chain(signum, frame):
    _note()
    if callable(_found):
        _found(signum, frame)


def resend(signum, frame):
    _note()
    signal.signal(signal.SIGTERM, _found)
    os.kill(os.getpid(), signal.SIGTERM)


@task(name="sig.install")
def install(how: str):
    """Install one of the two handlers (in this process, for the jobs that follow)."""
    signal.signal(signal.SIGTERM, chain if how == "chain" else resend)
    return how


@task(name="sig.c_bound")
def c_bound(path: str):
    """A job inside C code for hours: no bytecode runs until the hash returns, so only
    a stop that does not wait for one can end it."""
    open(path + ".started", "w").close()
    hashlib.pbkdf2_hmac("sha256", b"x", b"salt", 2 ** 31 - 1)   # (the most it takes)
    return "done"
