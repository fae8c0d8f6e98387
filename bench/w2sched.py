"""Where W2's time goes: redpool and Pool.map over the same CPU-bound jobs, alternating,
with the scheduler's own accounting of every process involved.

    python -m bench.w2sched [--jobs 1000] [--reps 3]

For each repetition it prints, for redpool and for ``multiprocessing.Pool(2).map``: jobs/s,
the pool processes' CPU per job and involuntary context switches per job (from
``/proc/<pid>/task/*/schedstat`` and ``status``: nanosecond run times, not the 100 Hz
ticks of ``/proc/<pid>/stat``), and for redpool also the supervisor's and the Redis
server's CPU per job.  This is what docs/benchmarks.md's "W2: what stands in the way of 0.95" rests on.
Not part of ``make bench``: it explains a figure, it does not measure a target.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import time

import redis
from redpool.protocol import Keys
from redpool.server import EmbeddedServer

from bench import procs, tasks, workloads
from bench.systems import Redpool


def run_seconds(pid: int) -> float:
    """CPU seconds the scheduler ran ``pid`` (all its threads), to the nanosecond."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except OSError:
            pass  # a thread that just ended
    return total / 1e9


def preemptions(pid: int) -> int:
    """Involuntary context switches of ``pid`` (all its threads)."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                total += int(f.read().split("nonvoluntary_ctxt_switches:")[1].split()[0])
        except (OSError, IndexError):
            pass
    return total


def sample(pids: list[int]) -> tuple[float, int]:
    return sum(run_seconds(p) for p in pids), sum(preemptions(p) for p in pids)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=1000)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args(argv)
    n = args.jobs
    with EmbeddedServer() as srv:
        r = redis.Redis.from_url(srv.url)
        keys = Keys("bench")
        worker = Redpool.start(r, srv.url, keys, 2)
        try:
            worker.warm_up()
            iterations = tasks.calibrate(0.010)
            with multiprocessing.get_context("spawn").Pool(2) as pool:
                pool.map(tasks.noop, range(8))
                pool_kids = [p.pid for p in multiprocessing.active_children()]
                kids = procs.children(worker.pid)
                for rep in range(args.reps):
                    alone = min(pool.apply(tasks.time_spin, (iterations, 11)))
                    (k0, p0), s0, r0 = sample(kids), run_seconds(worker.pid), run_seconds(srv.proc.pid)
                    t0 = time.perf_counter()
                    workloads.drain_round(r, keys, "W2", rep, args.reps, [worker], workloads.SPIN,
                                          [iterations] * n, lambda i: iterations, lambda m: None)
                    wall = time.perf_counter() - t0
                    (k1, p1), s1, r1 = sample(kids), run_seconds(worker.pid), run_seconds(srv.proc.pid)
                    print(f"rep {rep + 1}: one job alone {alone * 1e3:.2f} ms")
                    print(f"  redpool   {n / wall:6.1f} jobs/s; children {(k1 - k0) / n * 1e3:.2f} ms "
                          f"CPU/job, {(p1 - p0) / n:.2f} preemptions/job; supervisor "
                          f"{(s1 - s0) / n * 1e6:.0f} us/job; Redis {(r1 - r0) / n * 1e6:.0f} us/job")
                    (k0, p0) = sample(pool_kids)
                    t0 = time.perf_counter()
                    pool.map(tasks.spin, [iterations] * n)
                    wall = time.perf_counter() - t0
                    (k1, p1) = sample(pool_kids)
                    print(f"  Pool.map  {n / wall:6.1f} jobs/s; children {(k1 - k0) / n * 1e3:.2f} ms "
                          f"CPU/job, {(p1 - p0) / n:.2f} preemptions/job", flush=True)
        finally:
            worker.proc.stop()
            r.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
