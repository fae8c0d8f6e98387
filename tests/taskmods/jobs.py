"""Tasks the daemon tests run.  Every run is written to a ledger (a Redis list named
by REDPOOL_LEDGER, at REDPOOL_LEDGER_URL) so tests can count runs, not guess them."""

import os
import signal
import time

import redis

from redpool import current_job, on_child_start, task

_ledger = None


@on_child_start
def open_ledger():
    global _ledger
    url = os.environ.get("REDPOOL_LEDGER_URL")
    if url:
        _ledger = redis.Redis.from_url(url)


def record(what: str) -> None:
    job = current_job()
    if _ledger is not None and job is not None:
        _ledger.rpush(os.environ["REDPOOL_LEDGER"], f"{job.id}:{what}:{os.getpid()}")


@task(name="t.add")
def add(a, b):
    record("add")
    return a + b


@task(name="t.sleep")
def sleep(seconds, tag=None):
    record("start")
    time.sleep(seconds)
    record("end")
    return tag


@task(name="t.pid")
def pid():
    return os.getpid()


@task(name="t.die")
def die(how="kill"):
    record("die")
    if how == "exit":
        os._exit(7)
    os.kill(os.getpid(), signal.SIGKILL)


@task(name="t.unserialisable")
def unserialisable():
    return {1, 2, 3}


@task(name="t.boom")
def boom(msg="boom"):
    raise ValueError(msg)


@task(name="t.flaky", max_retries=3, retry_backoff=0.2, retry_backoff_max=0.5)
def flaky(failures: int):
    """Fails its first ``failures`` attempts, then succeeds."""
    job = current_job()
    record(f"attempt{job.attempt}")
    if job.attempt <= failures:
        raise RuntimeError(f"attempt {job.attempt} fails on purpose")
    return job.attempt


_hoard = []


@task(name="t.alloc")
def alloc(mb: int):
    """Keeps ``mb`` MiB alive in this process (to trip --max-memory-per-child)."""
    _hoard.append(bytearray(mb * 1024 * 1024))
    return os.getpid()


@task(name="t.die_if")
def die_if(n: int, victim: int):
    """Kills its own process when n == victim (first run only), else returns n."""
    job = current_job()
    record(f"run{n}")
    if n == victim and job.crashes == 0:
        os.kill(os.getpid(), signal.SIGKILL)
    return n


@task(name="t.nap")
def nap(seconds: float):
    time.sleep(seconds)
    return os.getpid()


class QuotaExceeded(Exception):
    """A task module's own exception class (error.type: its module and qualified name)."""


@task(name="t.quota")
def quota(limit: int):
    raise QuotaExceeded(f"over the quota of {limit}")


@task(name="t.hold")
def hold(path: str, tag=None):
    """A long job of no fixed length: says it started (``path``.started), then runs
    until the file ``path`` exists (the test releases it)."""
    record("start")
    open(path + ".started", "w").close()
    while not os.path.exists(path):
        time.sleep(0.01)
    record("end")
    return tag


@task(name="t.logged")
def logged(n, seconds=0):
    """Writes its run, with the time (``run@<epoch seconds>``), to the ledger, takes
    ``seconds``, returns n.  The failover tests (tests/topology.py) tell from the ledger
    which jobs ran twice, and when."""
    record(f"run@{time.time():.6f}")
    time.sleep(seconds)
    return n
