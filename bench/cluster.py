"""What Redis Cluster costs: the W1 drain (tiny jobs) on one server and on a private
three-primary cluster, in the same run.

    python -m bench.cluster [--jobs N] [--reps N] [--concurrency N]

For each setup a real worker (`python -m redpool worker bench.tasks`) drains N jobs
staged beforehand: one queue on one server (the baseline, as `make bench` W1), three
queues on one server, one queue on the cluster, and three queues on the cluster whose
hash tags fall on three different primaries; then those three queues on a cluster whose
primaries have a replica each, with --durable-results off and on (on: one WAIT per node
per round, an answer leaves its outbox once a replica has it).  Jobs are staged in a list of their own and
renamed onto the queue in one step (on the cluster the staging list carries the queue's
hash tag, so RENAME stays in one slot); the clock runs from that rename until every
result key exists.  The last job of each queue replies on a list the bench blocks on, so
nothing is polled while the worker works.  Each figure is the median of --reps runs and
is reported as a ratio to the one-server, one-queue baseline of the same run.

On a two-core machine the cluster cannot show what it is for (more shards on more
machines): its three servers share the cores with the worker.  What it shows is the
cost of the cluster path per job, which is what a user trades for scaling out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import redis
from redis.cluster import RedisCluster
from redpool.keys import Keys
from redpool.server import EmbeddedCluster, EmbeddedServer

from bench import report
from bench.procs import Managed, python_module, wait_until

LPUSH_BATCH = 1000
SPREAD = ("a", "b", "c")  # three primaries of EmbeddedCluster(3), as tests/conftest.py


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.cluster", description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", type=int, default=20_000, help="jobs per drain (default 20,000)")
    p.add_argument("--reps", type=int, default=3, help="drains per setup (default 3)")
    p.add_argument("--concurrency", type=int, default=len(os.sched_getaffinity(0)),
                   help="pool processes (default: usable cores)")
    return p.parse_args(argv)


def stage(r, keys: Keys, queues: tuple[str, ...], n: int, rep: int, done: str) -> list[str]:
    """Push ``n`` jobs, round robin over ``queues``, onto staging lists; returns the
    staging keys (one per queue, in the queue's slot)."""
    staging = [f"{keys.queue(q)}:staging" if not keys.cluster else
               f"{keys.ns}:staging:{{{q}}}" for q in queues]
    per = {q: [] for q in queues}
    for i in range(n):
        q = queues[i % len(queues)]
        per[q].append({"task": "bench.tasks.double", "id": f"r{rep}-{i}", "args": [i]})
    for q, jobs in per.items():
        jobs[-1]["reply_to"] = done
    pipe = r.pipeline(transaction=False)
    for key, q in zip(staging, queues):
        raws = [json.dumps(j, separators=(",", ":")) for j in per[q]]
        for start in range(0, len(raws), LPUSH_BATCH):
            pipe.lpush(key, *raws[start:start + LPUSH_BATCH])
    pipe.execute()
    return staging


def drain(r, keys: Keys, queues: tuple[str, ...], n: int, rep: int, worker: Managed) -> float:
    """One timed drain; returns jobs per second."""
    done = keys.reply(f"done:{rep}")
    staging = stage(r, keys, queues, n, rep, done)
    t0 = time.perf_counter()
    for key, q in zip(staging, queues):
        r.rename(key, keys.queue(q))
    for _ in queues:
        while not r.brpop([done], 1):
            worker.check_alive()
    ids = [keys.result(f"r{rep}-{i}") for i in range(n)]
    wait_until(lambda: all(r.exists(*ids[s:s + 500]) == len(ids[s:s + 500])
                           for s in range(0, n, 500)), 60, "every result", interval=0.005,
               check=worker.check_alive)
    elapsed = time.perf_counter() - t0
    for s in range(0, n, 500):  # results of one run must not count in the next
        r.delete(*ids[s:s + 500])
    return n / elapsed


def run_setup(name: str, url: str, r, keys: Keys, queues: tuple[str, ...],
              args: argparse.Namespace, extra: tuple[str, ...] = ()) -> dict:
    worker = Managed(f"redpool-{name}", python_module(
        "redpool", "worker", "bench.tasks", "--redis-url", url, "--namespace", keys.ns,
        "--name", f"bench-{keys.ns}", "--concurrency", str(args.concurrency),
        "--log-format", "json", *extra, *[a for q in queues for a in ("--queue", q)]))
    try:
        wait_until(lambda: '"event": "started"' in worker.log_tail(100_000), 60,
                   f"{name} worker start", check=worker.check_alive)
        drain(r, keys, queues, max(1000, args.jobs // 10), -1, worker)  # warm-up
        rates = [drain(r, keys, queues, args.jobs, rep, worker) for rep in range(args.reps)]
    finally:
        worker.stop()
        worker.cleanup()
    return {"setup": name, "queues": list(queues), "jobs": args.jobs,
            "jobs_per_s": rates, "median": statistics.median(rates)}


def wait_calls(cluster: EmbeddedCluster) -> int:
    """WAIT commands the cluster's primaries have served so far."""
    total = 0
    for node in cluster.nodes:
        with redis.Redis(port=node.port) as n:
            total += n.info("commandstats").get("cmdstat_wait", {}).get("calls", 0)
    return total


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results = []
    with EmbeddedServer() as srv, EmbeddedCluster(3) as cl, \
            EmbeddedCluster(3, replicas=1) as rl:
        plain = redis.Redis.from_url(srv.url)
        rc, rr = RedisCluster.from_url(cl.url), RedisCluster.from_url(rl.url)
        curl = cl.url.replace("redis://", "redis+cluster://")
        rurl = rl.url.replace("redis://", "redis+cluster://")
        setups = [("one server, 1 queue", srv.url, plain, Keys("b1"), ("a",), ()),
                  ("one server, 3 queues", srv.url, plain, Keys("b3"), SPREAD, ()),
                  ("cluster, 1 queue", curl, rc, Keys("c1", cluster=True), ("a",), ()),
                  ("cluster, 3 queues on 3 primaries", curl, rc, Keys("c3", cluster=True),
                   SPREAD, ()),
                  ("cluster+replicas, 3q, durable off", rurl, rr, Keys("r0", cluster=True),
                   SPREAD, ("--durable-results", "off")),
                  ("cluster+replicas, 3q, durable on", rurl, rr, Keys("r1", cluster=True),
                   SPREAD, ("--durable-results", "on"))]
        for name, url, r, keys, queues, extra in setups:
            print(f"{name}: ", end="", flush=True)
            waits = wait_calls(rl)
            res = run_setup(name, url, r, keys, queues, args, extra)
            res["wait_calls"] = wait_calls(rl) - waits  # (durable results: one per node, round)
            print(", ".join(f"{x:,.0f}" for x in res["jobs_per_s"]) + " jobs/s"
                  + (f" ({res['wait_calls']:,} WAITs)" if res["wait_calls"] else ""), flush=True)
            results.append(res)
        machine = report.machine(plain)
    base = results[0]["median"]
    print(f"\n{'setup':<36} {'jobs/s (median)':>16} {'÷ one server, 1 queue':>22}")
    for res in results:
        res["ratio"] = round(res["median"] / base, 3)
        print(f"{res['setup']:<36} {res['median']:>16,.0f} {res['ratio']:>22.3f}")
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = Path(__file__).resolve().parent / "results" / f"cluster-{stamp}.json"
    out.write_text(json.dumps({"when": stamp, "machine": machine, "concurrency": args.concurrency,
                               "results": results}, indent=2) + "\n")
    print(f"\nwritten: {out.relative_to(Path.cwd()) if out.is_relative_to(Path.cwd()) else out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
