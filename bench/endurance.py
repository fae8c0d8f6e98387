"""Supervisor memory over a long run, and idle CPU: `python -m bench.endurance [--jobs N]`.

Starts a private server and a worker (concurrency 2, --log-level warning), measures the
supervisor's CPU over 10 s of idleness, then feeds it N jobs (default 1,000,000) in
chunks, keeping at most ~20,000 queued, and prints the supervisor's resident memory
(VmRSS) as the run goes: it must stay flat (no leak).  Not part of `make test`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import redis

from redpool.protocol import Keys
from redpool.server import EmbeddedServer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rss_mib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) // 1024
    return 0


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=1_000_000)
    ap.add_argument("--chunk", type=int, default=50_000)
    args = ap.parse_args()
    with EmbeddedServer() as srv:
        r = redis.Redis.from_url(srv.url)
        keys = Keys("endurance")
        worker = subprocess.Popen(
            [sys.executable, "-m", "redpool", "worker", "bench.tasks", "--redis-url", srv.url,
             "--namespace", keys.ns, "--concurrency", "2", "--log-level", "warning"],
            cwd=ROOT, start_new_session=True)
        try:
            deadline = time.monotonic() + 60
            while not r.scard(keys.supervisors):
                if worker.poll() is not None or time.monotonic() > deadline:
                    print("the worker did not start", file=sys.stderr)
                    return 1
                time.sleep(0.05)
            time.sleep(1)
            c0 = cpu_seconds(worker.pid)
            time.sleep(10)
            idle = cpu_seconds(worker.pid) - c0
            print(f"idle: supervisor CPU {idle:.3f} s over 10 s ({idle / 10:.1%} of a core); "
                  f"RSS {rss_mib(worker.pid)} MiB", flush=True)
            t0, done, samples = time.time(), 0, []
            while done < args.jobs:
                n = min(args.chunk, args.jobs - done)
                pipe = r.pipeline(transaction=False)
                for i in range(done, done + n):
                    pipe.lpush(keys.queue("default"), json.dumps(
                        {"task": "bench.tasks.double", "id": f"j{i}", "args": [i], "result_ttl": 60}))
                pipe.execute()
                done += n
                while r.llen(keys.queue("default")) > 20_000:
                    time.sleep(0.05)
                samples.append((done, rss_mib(worker.pid)))
                print(f"  {done:>9,} jobs enqueued: supervisor RSS {samples[-1][1]} MiB", flush=True)
            while not r.exists(keys.result(f"j{args.jobs - 1}")):
                time.sleep(0.05)
            took = time.time() - t0
            first, last = samples[0][1], rss_mib(worker.pid)
            print(f"{args.jobs:,} jobs in {took:.1f} s ({args.jobs / took:,.0f} jobs/s, enqueue "
                  f"included); supervisor RSS {first} MiB after the first chunk, {last} MiB at "
                  f"the end ({last - first:+d} MiB)")
            return 0
        finally:
            worker.terminate()
            try:
                worker.wait(30)
            except subprocess.TimeoutExpired:
                worker.kill()


if __name__ == "__main__":
    raise SystemExit(main())
