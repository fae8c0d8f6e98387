"""`redpool demo`: the classic multiprocessing apply_async example, across a real
worker daemon on a private Redis server."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from queue import SimpleQueue

from .registry import task


@task(name="demo.nap")
def nap(i: int, seconds: float) -> dict:
    time.sleep(seconds)
    return {"job": i, "slept": seconds, "pid": os.getpid()}


@task(name="demo.square")
def square(x: int) -> int:
    return x * x


def run_demo(url: str, jobs: int = 12) -> int:
    from .client import Client
    from .remote_pool import Pool
    from .config import usable_cores
    from .protocol import Keys

    ns = f"demo{os.getpid()}"
    cores = usable_cores()
    # The URL goes through the environment: on the worker's command line, a password in
    # it would show in ps until the worker hid it (and be warned about, again)
    env = {k: v for k, v in os.environ.items() if k != "REDPOOL_REDIS_URL_FILE"}
    env["REDPOOL_REDIS_URL"] = url
    worker = subprocess.Popen(
        [sys.executable, "-m", "redpool", "worker", "redpool.demo",
         "--namespace", ns, "--name", f"demo-{os.getpid()}", "--log-level", "warning"],
        env=env, start_new_session=True)
    client = Client(url, namespace=ns)
    try:
        print(f"Started `redpool worker redpool.demo` (pid {worker.pid}) with {cores} processes.")
        deadline = time.monotonic() + 60
        while not client.redis.scard(Keys(ns).supervisors):
            if worker.poll() is not None or time.monotonic() > deadline:
                print("the worker did not start; see its log above", file=sys.stderr)
                return 1
            time.sleep(0.05)

        with Pool(queue="default", client=client) as pool:
            naps = [round(random.uniform(0.2, 1.0), 2) for _ in range(jobs)]
            print(f"\napply_async: {jobs} jobs that each sleep 0.2-1.0 s")
            t0 = time.monotonic()
            arrived: SimpleQueue = SimpleQueue()  # callbacks run in the client's listener thread
            for i, s in enumerate(naps):
                pool.apply_async("demo.nap", (i, s), callback=arrived.put, error_callback=arrived.put)
            for _ in naps:
                v = arrived.get(timeout=60)
                if isinstance(v, BaseException):
                    raise v
                print(f"  job {v['job']:2d} slept {v['slept']:.2f} s in process {v['pid']}"
                      f"  (+{time.monotonic() - t0:.2f} s)")
            wall = time.monotonic() - t0
            serial = sum(naps)
            print(f"\nwall time {wall:.2f} s for {serial:.2f} s of sleeping: "
                  f"{serial / wall:.1f}x faster than one process ({cores} processes)")

            print("\nmap: squares of 0..9 ->", pool.map(square, range(10)))
        return 0
    finally:
        client.close()
        if worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(30)
            except subprocess.TimeoutExpired:
                worker.kill()

