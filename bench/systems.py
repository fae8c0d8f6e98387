"""The consumers under test: the redpool worker, and the baselines that take jobs from Redis.

Each one drains a queue of JSON jobs and writes a result envelope under
``<ns>:result:<id>`` (and onto ``reply_to`` when a job has one), so one workload
driver (workloads.py) feeds and times them all the same way:

* ``Redpool``: ``python -m redpool worker bench.tasks`` as a subprocess, as a user runs it.
* ``Naive``: baseline (a), ``python -m bench.naive`` as a subprocess.
* ``Floor``: baseline (b), in this process: a single client doing only the per-job Redis
  work (reserve, result, acknowledgement), pipelined in batches of 100.
"""

from __future__ import annotations

import json

import redis
from redpool.protocol import Keys

from bench import procs
from bench.naive import envelope

QUEUE = "bench"             # the redpool worker's queue


class Consumer:
    """A consumer running as a subprocess, blocked in Redis while idle."""

    name = ""
    label = ""
    blocked_cmd = ""  # what its idle connection waits in (CLIENT LIST cmd=)
    pid: int

    def __init__(self, r: redis.Redis, keys: Keys, queue_key: str, proc: procs.Managed,
                 concurrency: int) -> None:
        self.r = r
        self.keys = keys
        self.queue_key = queue_key
        self.proc = proc
        self.pid = proc.pid
        self.concurrency = concurrency
        self.memory: procs.MemorySampler | None = None

    def warm_up(self, timeout: float = 120.0) -> None:
        """Run a few jobs end to end (so every process is booted and has run a task),
        then wait until the consumer is idle again, blocked in Redis."""
        reply = self.keys.reply(f"warm:{self.name}")
        jobs = [json.dumps({"task": "bench.tasks.double", "args": [i], "reply_to": reply,
                            "result_ttl": 0}) for i in range(4 * self.concurrency)]
        self.r.lpush(self.queue_key, *jobs)
        for _ in jobs:
            procs.wait_until(lambda: self.r.brpop([reply], timeout=0.5), timeout,
                             f"{self.name} to answer its warm-up jobs", check=self.proc.check_alive)
        self.r.delete(reply)
        self.memory = procs.MemorySampler(self.pid)
        self.wait_idle()

    def wait_idle(self, timeout: float = 30.0) -> None:
        def blocked() -> bool:
            return any(c.get("cmd") == self.blocked_cmd and "b" in c.get("flags", "")
                       for c in self.r.client_list())
        procs.wait_until(blocked, timeout, f"{self.name} to be idle", check=self.proc.check_alive)

    def feed(self, staging: str) -> None:
        """Hand over a whole prepared batch at once: RENAME is O(1), atomic, and wakes
        the consumer's blocking pop."""
        self.r.rename(staging, self.queue_key)

    def cpu_seconds(self) -> float:
        return procs.cpu_seconds(self.pid)

    def pool_cpu_seconds(self) -> float:
        """CPU seconds of its pool processes (the ones alive now)."""
        return sum(procs.cpu_seconds(c) for c in procs.children(self.pid))

    def stop(self) -> dict:
        """Read the peak memory while it still runs, then stop it; a non-zero exit is a crash."""
        peaks = {}
        if self.memory is not None and self.proc.alive():
            self.memory.stop()
            peaks = {"parent_peak_rss": self.memory.parent_peak,
                     "child_peak_rss": self.memory.child_peak}
        code = self.proc.stop()
        if code != 0:
            raise RuntimeError(f"{self.name} exited with code {code}:\n{self.proc.log_tail()}")
        return peaks


class Redpool(Consumer):
    name = "redpool"
    label = "redpool"
    blocked_cmd = "blmove"

    @classmethod
    def start(cls, r: redis.Redis, url: str, keys: Keys, concurrency: int) -> "Redpool":
        cmd = procs.python_module(
            "redpool", "worker", "bench.tasks", "--redis-url", url, "--namespace", keys.ns,
            "--queue", QUEUE, "--concurrency", str(concurrency), "--name", "bench",
            "--log-level", "warning", "--log-format", "json")
        return cls(r, keys, keys.queue(QUEUE), procs.Managed("redpool", cmd), concurrency)


class Naive(Consumer):
    name = "naive"
    label = "baseline (a) naive BRPOP + Pool.apply_async"
    blocked_cmd = "brpop"

    @classmethod
    def start(cls, r: redis.Redis, url: str, keys: Keys, concurrency: int) -> "Naive":
        queue_key = f"{keys.ns}:naive"
        cmd = procs.python_module(
            "bench.naive", "--redis-url", url, "--queue", queue_key,
            "--result-prefix", keys.result(""), "--concurrency", str(concurrency))
        return cls(r, keys, queue_key, procs.Managed("naive", cmd), concurrency)


class Floor:
    """Baseline (b): Redis's own floor for the per-job work, in this process."""

    name = "floor"
    label = "baseline (b) Redis floor, 1 client"
    BATCH = 100

    def __init__(self, r: redis.Redis, keys: Keys) -> None:
        self.r = r
        self.keys = keys
        self.queue_key = f"{keys.ns}:floor"
        self.processing = f"{keys.ns}:floor-processing"

    def feed(self, staging: str) -> None:
        """Take the batch and drain it: LMOVE, SET result EX, LREM, 100 jobs per round trip."""
        self.r.rename(staging, self.queue_key)
        while True:
            pipe = self.r.pipeline(transaction=False)
            for _ in range(self.BATCH):
                pipe.lmove(self.queue_key, self.processing, "RIGHT", "LEFT")
            raws = [raw for raw in pipe.execute() if raw is not None]
            if not raws:
                return
            pipe = self.r.pipeline(transaction=False)
            for raw in raws:
                job = json.loads(raw)
                env = envelope(job, self.queue_key, 2 * job["args"][0])
                pipe.set(self.keys.result(job["id"]), env, ex=86400)
                if job.get("reply_to"):  # the last job's: it tells the timer the drain is over
                    pipe.lpush(job["reply_to"], env)
                pipe.lrem(self.processing, -1, raw)
            pipe.execute()

    def cpu_seconds(self) -> None:
        return None

    def pool_cpu_seconds(self) -> None:
        return None
