"""Baseline (a): the classic naive seed approach, run as its own process.

A loop pops JSON jobs with BRPOP and hands them to multiprocessing.Pool.apply_async; a
callback (in the pool's result thread) pushes the result back: ``SET <ns>:result:<id>
EX ttl`` when the job has an id, ``LPUSH reply_to`` when it has one (one pipelined
round trip).  No processing list, no acknowledgement: a crash loses jobs.

    python -m bench.naive --redis-url URL --queue KEY --result-prefix NS:result: --concurrency N
"""

from __future__ import annotations

import argparse
import functools
import json
import multiprocessing
import signal
import sys
import time

import redis

from bench.tasks import NAMES, noop


def envelope(job: dict, queue: str, result) -> str:
    """A result envelope of the same shape and size as redpool's (docs/protocol.md)."""
    return json.dumps({"v": 1, "id": job.get("id"), "task": job["task"], "queue": queue,
                       "status": "succeeded", "attempts": 1, "worker": "bench",
                       "enqueued_at": None, "started_at": None, "finished_at": time.time(),
                       "result": result}, separators=(",", ":"))


def reply(r: redis.Redis, prefix: str, queue: str, job: dict, result) -> None:
    env = envelope(job, queue, result)
    pipe = r.pipeline(transaction=False)
    if job.get("id"):
        pipe.set(prefix + job["id"], env, ex=job.get("result_ttl", 86400))
    if job.get("reply_to"):
        pipe.lpush(job["reply_to"], env)
    pipe.execute()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--redis-url", required=True)
    p.add_argument("--queue", required=True, help="the full key of the list to BRPOP")
    p.add_argument("--result-prefix", required=True)
    p.add_argument("--concurrency", type=int, required=True)
    args = p.parse_args(argv)

    def stop(signum, frame):
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    r = redis.Redis.from_url(args.redis_url)
    with multiprocessing.Pool(args.concurrency) as pool:
        pool.map(noop, range(args.concurrency * 4))  # every worker is up
        print("ready", flush=True)
        while True:
            item = r.brpop([args.queue], timeout=1)
            if item is None:
                continue
            job = json.loads(item[1])
            pool.apply_async(NAMES[job["task"]], job.get("args", []),
                             callback=functools.partial(reply, r, args.result_prefix,
                                                        args.queue, job))


if __name__ == "__main__":
    sys.exit(main())
