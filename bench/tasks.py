"""Benchmark tasks, for the redpool worker (`redpool worker bench.tasks`) and the baselines.

The functions stay plain module attributes (registering them does not rebind the names),
so the multiprocessing baselines can pickle them by reference; redpool finds them by
their registered names, ``bench.tasks.double`` and ``bench.tasks.spin``.
"""

from __future__ import annotations

import statistics
import time

from redpool import task


def double(x):
    """W1 and W3: a trivially small job."""
    return 2 * x


def spin(n):
    """W2: pure-Python CPU work, ``n`` loop iterations (see calibrate)."""
    acc = 0
    for i in range(n):
        acc ^= i
    return n


def noop(x=None):
    """Warms up a multiprocessing pool."""
    return x


task(double)
task(spin)

NAMES = {"bench.tasks.double": double, "bench.tasks.spin": spin}


def time_spin(n: int, calls: int) -> list[float]:
    """Wall times of ``calls`` calls of ``spin(n)`` in this process, seconds."""
    samples = []
    for _ in range(calls):
        t0 = time.perf_counter()
        spin(n)
        samples.append(time.perf_counter() - t0)
    return samples


def calibrate(target: float = 0.010, warmup: float = 1.0) -> int:
    """The iteration count that makes one spin() call take ``target`` seconds here.
    The CPU is kept busy for ``warmup`` seconds first: on this kind of (virtual) machine
    the first second or so runs measurably slower."""
    end = time.perf_counter() + warmup
    while time.perf_counter() < end:
        spin(100_000)
    n = 10_000
    for _ in range(10):
        t = statistics.median(time_spin(n, 5))
        if abs(t - target) / target < 0.02:
            break
        n = max(1000, round(n * target / t))
    return n
