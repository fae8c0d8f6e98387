"""The soak test's task: sleep a few milliseconds, write the run to a ledger, return
the input.

Every run is recorded in a Redis list (RPUSH of ``<job id>:<pid>:<run>`` onto the key
named by REDPOOL_LEDGER, on the server at REDPOOL_LEDGER_URL) *before* the task
sleeps, so a run whose process is killed mid-job still counts as a run.  ``<run>`` is
a random token per run: if the RPUSH is retried after a lost reply (Redis is killed
once during a soak), the same token is pushed again, so counting distinct entries
never mistakes a retried write for a second run.

The ledger write is retried for up to LEDGER_PATIENCE seconds, so the planned Redis
restart delays a job instead of failing it.
"""

from __future__ import annotations

import os
import time
import uuid

import redis

from redpool import current_job, on_child_start, task

LEDGER_PATIENCE = 120.0  # seconds a run waits for Redis to come back

_ledger: redis.Redis | None = None
_ledger_key: str | None = None


@on_child_start
def open_ledger() -> None:
    global _ledger, _ledger_key
    url = os.environ.get("REDPOOL_LEDGER_URL")
    _ledger_key = os.environ.get("REDPOOL_LEDGER")
    if url and _ledger_key:
        _ledger = redis.Redis.from_url(url, socket_timeout=5.0, socket_connect_timeout=2.0)


def _record(entry: str) -> None:
    deadline = time.monotonic() + LEDGER_PATIENCE
    delay = 0.05
    while True:
        try:
            _ledger.rpush(_ledger_key, entry)
            return
        except redis.RedisError:
            if time.monotonic() > deadline:
                raise
            time.sleep(delay)
            delay = min(1.0, delay * 2)


@task(name="soak.run")
def run(ms, n):
    """Sleep ``ms`` milliseconds; return the input unchanged, as ``[ms, n]``."""
    job = current_job()
    if _ledger is not None and job is not None:
        _record(f"{job.id}:{os.getpid()}:{uuid.uuid4().hex[:12]}")
    time.sleep(ms / 1000.0)
    return [ms, n]
