"""Example tasks: `redpool worker examples.tasks` (the Procfile runs this).

A task is a plain function decorated with @task; it is registered as
"examples.tasks.<name>" and takes and returns JSON values.
"""

import os
import time

from redpool import current_job, on_child_start, task


@on_child_start
def connect() -> None:
    # Runs once in every pool process, after it starts: open database connections
    # here (connections inherited across fork are a classic source of SSL errors).
    pass


@task
def add(a, b):
    return a + b


@task
def square(x):
    return x * x


@task
def sleep(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


@task(name="examples.whoami")
def whoami():
    job = current_job()
    return {"pid": os.getpid(), "job": job.id if job else None, "worker": job.worker if job else None}


@task
def fail(message: str = "failed on purpose"):
    raise ValueError(message)
