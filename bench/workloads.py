"""The workloads W1 (throughput), W2 (CPU-bound) and W3 (latency), against every system.

Drains are timed the same way for every consumer: the jobs are first pushed onto a
staging list nobody watches (that is the timed enqueue), the consumer is idle and warm
(blocked in Redis, children booted, warm-up jobs done), and then one RENAME hands it the
whole list at once.  The clock runs from just before the RENAME until every result key
exists.  Process start-up and child boot are therefore outside the measurement, and the
consumer drains a full queue, as in production under a backlog.

Repetitions alternate between the systems (redpool, then the baselines, then the next
repetition), so drift on a shared machine hits them all alike.
"""

from __future__ import annotations

import json
import multiprocessing
import signal
import statistics
import time
from collections import Counter
from typing import Callable

import redis
from redpool import Client
from redpool.protocol import Keys

from bench import procs, tasks
from bench.report import Figure
from bench.systems import Consumer, Floor

LPUSH_BATCH = 500      # jobs per LPUSH when enqueueing (the Client's batch size too)
POLL = 0.005           # seconds between checks for the results, once the last one is in
DOUBLE, SPIN = "bench.tasks.double", "bench.tasks.spin"

Progress = Callable[[str], None]


def commandstats(r: redis.Redis) -> Counter:
    """Calls per command since start, commands run inside Lua scripts included."""
    return Counter({k.removeprefix("cmdstat_"): v["calls"]
                    for k, v in r.info("commandstats").items()})


def done_list(keys: Keys, prefix: str) -> str:
    """The reply list of a drain's last job (a reply list every worker answers on)."""
    return keys.reply(f"done:{prefix}")


def stage(r: redis.Redis, staging: str, task: str, prefix: str, args: list, done: str) -> float:
    """Encode and push the jobs onto ``staging`` (pipelined), return the seconds it took.
    The last job also replies on ``done``, so the drain's end is awaited, not polled for."""
    t0 = time.perf_counter()
    pipe = r.pipeline(transaction=False)
    last = len(args) - 1

    def job(i: int, a) -> str:
        j = {"task": task, "id": f"{prefix}-{i}", "args": [a]}
        if i == last:
            j["reply_to"] = done
        return json.dumps(j, separators=(",", ":"))

    for start in range(0, len(args), LPUSH_BATCH):
        pipe.lpush(staging, *[job(i, a) for i, a in enumerate(args[start:start + LPUSH_BATCH],
                                                              start)])
    pipe.execute()
    return time.perf_counter() - t0


def wait_results(r: redis.Redis, keys: list[str], done: str, own: Counter,
                 check: Callable[[], None], timeout: float) -> None:
    """Return once every key exists.  The last job is taken last: block on its reply
    (no polling while the consumer works: a poll would take CPU from the jobs it times),
    then count them all (one variadic EXISTS).  ``own`` counts the commands spent here."""
    deadline = time.monotonic() + timeout
    while True:
        own["brpop"] += 1
        if r.brpop([done], timeout=1) is not None:
            break
        check()
        if time.monotonic() > deadline:
            raise RuntimeError(f"the last job's reply is missing after {timeout:.0f} s")
    while True:
        own["exists"] += 1
        if r.exists(*keys) == len(keys):
            return
        check()
        if time.monotonic() > deadline:
            raise RuntimeError(f"results missing after {timeout:.0f} s")
        time.sleep(POLL)


def timed_drain(r: redis.Redis, system, staging: str, keys: Keys, prefix: str, n: int,
                expect: Callable[[int], object]) -> dict:
    """Feed a staged batch to ``system``; time it until every result exists; check them."""
    result_keys = [keys.result(f"{prefix}-{i}") for i in range(n)]
    check = system.proc.check_alive if isinstance(system, Consumer) else (lambda: None)
    own = Counter(info=1, rename=1)  # the INFO just below, the RENAME in feed()
    before, cpu0, pool0 = commandstats(r), system.cpu_seconds(), system.pool_cpu_seconds()
    watch = procs.CpuWatch()
    t0 = time.perf_counter()
    system.feed(staging)
    wait_results(r, result_keys, done_list(keys, prefix), own, check, timeout=60 + n * 0.01)
    seconds = time.perf_counter() - t0
    cpu1, pool1 = system.cpu_seconds(), system.pool_cpu_seconds()
    after, foreign = commandstats(r), watch.foreign_cores()
    verify(r, result_keys, expect)
    return {"seconds": seconds, "rate": n / seconds, "foreign": foreign,
            "cpu": None if cpu0 is None else cpu1 - cpu0,
            "busy": None if pool0 is None else (pool1 - pool0) / seconds / system.concurrency,
            "commands": after - before - own}


def verify(r: redis.Redis, result_keys: list[str], expect: Callable[[int], object]) -> None:
    """Every envelope says succeeded, with the right result; then the keys go."""
    for start in range(0, len(result_keys), 1000):
        chunk = result_keys[start:start + 1000]
        for i, raw in enumerate(r.mget(chunk), start):
            env = json.loads(raw)
            if env.get("status") != "succeeded" or env.get("result") != expect(i):
                raise RuntimeError(f"wrong result for job {i}: {raw[:300]!r}")
        r.delete(*chunk)


def drain_round(r: redis.Redis, keys: Keys, tag: str, rep: int, reps: int, systems: list,
                task: str, args: list, expect, progress: Progress) -> tuple[list[float], dict]:
    """One repetition: the same jobs, staged and timed once per system, in turn.
    Returns the enqueue rates and each system's drain."""
    staging = f"{keys.ns}:staging"
    enqueue, drains = [], {}
    for s in systems:
        prefix = f"{tag}-{rep}-{s.name}"
        enqueue.append(len(args) / stage(r, staging, task, prefix, args, done_list(keys, prefix)))
        if isinstance(s, Consumer):
            s.wait_idle()
        d = drains[s.name] = timed_drain(r, s, staging, keys, prefix, len(args), expect)
        progress(f"{tag} rep {rep + 1}/{reps}: {s.name} {d['rate']:,.0f} jobs/s "
                 f"(others used {d['foreign']:.2f} cores meanwhile)")
    return enqueue, drains


def client_enqueue(url: str, keys: Keys, n: int) -> float:
    """Jobs/s of redpool's own producer path, Client.enqueue_many, onto a queue no one reads."""
    with Client(url, namespace=keys.ns) as client:
        t0 = time.perf_counter()
        client.enqueue_many(DOUBLE, [(i,) for i in range(n)], queue="scratch",
                            reply_to=keys.reply("scratch"))
        seconds = time.perf_counter() - t0
        client.redis.delete(keys.queue("scratch"))
    return n / seconds


# -- the workloads ---------------------------------------------------------------------------------

def w1(r, url, keys, consumers, n, reps, progress) -> tuple[list[Figure], dict]:
    systems = [*consumers, Floor(r, keys)]
    enqueue, drains = [], {s.name: [] for s in systems}
    for rep in range(reps):
        rates, ds = drain_round(r, keys, "W1", rep, reps, systems, DOUBLE, list(range(n)),
                                lambda i: 2 * i, progress)
        enqueue += rates
        for name, d in ds.items():
            drains[name].append(d)
    figs = [Figure("W1.enqueue.lpush", f"enqueue, pipelined LPUSH ({LPUSH_BATCH} jobs each)",
                   "jobs/s", enqueue),
            Figure("W1.enqueue.client", "enqueue, redpool Client.enqueue_many", "jobs/s",
                   [client_enqueue(url, keys, n) for _ in range(reps)])]
    figs += [Figure(f"W1.drain.{s.name}", f"drain, {s.label}", "jobs/s",
                    [d["rate"] for d in drains[s.name]]) for s in systems]
    figs += [Figure(f"W1.commands.{s.name}", f"Redis commands per job, {s.name}", "cmds",
                    [sum(d["commands"].values()) / n for d in drains[s.name]], digits=2)
             for s in systems]
    figs += [Figure(f"W1.cpu.{s.name}", f"{'supervisor' if s.name == 'redpool' else 'parent'} "
                    f"CPU per 1,000 jobs, {s.name}", "s",
                    [d["cpu"] / n * 1000 for d in drains[s.name]], digits=3)
             for s in consumers]
    figs += [busy_figure("W1", s.name, [d["busy"] for d in drains[s.name]]) for s in consumers]
    figs.append(foreign_figure("W1", [d["foreign"] for ds in drains.values() for d in ds]))
    breakdown = {s.name: per_job(drains[s.name], n) for s in systems}
    return figs, {"commands_per_job": breakdown}


def busy_figure(workload: str, name: str, samples: list[float]) -> Figure:
    """CPU time of the pool processes / (wall time x processes), over the timed runs."""
    return Figure(f"{workload}.busy.{name}", f"pool processes busy, {name}", "", samples,
                  digits=3)


def foreign_figure(workload: str, samples: list[float]) -> Figure:
    return Figure(f"{workload}.foreign", "CPU used meanwhile by other processes (all timed runs)",
                  "cores", samples, digits=2)


def per_job(drains: list[dict], n: int) -> dict[str, float]:
    total = sum((d["commands"] for d in drains), Counter())
    return {cmd: calls / n / len(drains) for cmd, calls in total.most_common()}


def w2(r, keys, consumers, jobs, reps, concurrency, progress) -> tuple[list[Figure], dict]:
    iterations = tasks.calibrate(0.010)
    rates: dict[str, list[float]] = {s.name: [] for s in consumers}
    rates["poolmap"], foreign = [], []
    busy: dict[str, list[float]] = {name: [] for name in rates}
    # spawn, not fork: this process has threads (the memory samplers) and Redis sockets.
    # The pool ignores Ctrl-C (it is in our process group); we stop it on the way out.
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(concurrency, signal.signal, (signal.SIGINT, signal.SIG_IGN)) as pool:
        pool.map(tasks.noop, range(concurrency * 4))
        # The job time is measured in a pool process (a fresh interpreter, like the ones
        # that do the work), alone, before the first and after every repetition, so a
        # drift of a shared machine's speed moves the ideal rate along with it.
        times = pool.apply(tasks.time_spin, (iterations, 31))
        progress(f"W2 calibrated: spin({iterations:,}) takes "
                 f"{statistics.median(times) * 1000:.2f} ms in a pool process")
        for rep in range(reps):
            _, drains = drain_round(r, keys, "W2", rep, reps, consumers, SPIN,
                                    [iterations] * jobs, lambda i: iterations, progress)
            for name, d in drains.items():
                rates[name].append(d["rate"])
                busy[name].append(d["busy"])
                foreign.append(d["foreign"])
            watch, cpu0 = procs.CpuWatch(), _pool_cpu_seconds()
            t0 = time.perf_counter()
            pool.map(tasks.spin, [iterations] * jobs)
            seconds = time.perf_counter() - t0
            rates["poolmap"].append(jobs / seconds)
            busy["poolmap"].append((_pool_cpu_seconds() - cpu0) / seconds / concurrency)
            foreign.append(watch.foreign_cores())
            progress(f"W2 rep {rep + 1}/{reps}: poolmap {rates['poolmap'][-1]:,.0f} jobs/s")
            times += pool.apply(tasks.time_spin, (iterations, 31))
    job_time = statistics.median(times)
    ideal = concurrency / job_time
    labels = {s.name: s.label for s in consumers}
    labels["poolmap"] = "baseline (c) multiprocessing.Pool.map, no Redis"
    figs = []
    for name, rs in rates.items():
        figs.append(Figure(f"W2.rate.{name}", f"jobs/s, {labels[name]}", "jobs/s", rs))
        figs.append(Figure(f"W2.efficiency.{name}", f"efficiency, {name}", "",
                           [x / ideal for x in rs], digits=3))
        figs.append(busy_figure("W2", name, busy[name]))
    figs.append(foreign_figure("W2", foreign))
    return figs, {"spin_iterations": iterations, "job_seconds": job_time, "ideal_rate": ideal}


def _pool_cpu_seconds() -> float:
    """CPU seconds of this process's multiprocessing children (baseline (c)'s pool)."""
    return sum(procs.cpu_seconds(p.pid) for p in multiprocessing.active_children())


def latencies(r: redis.Redis, c: Consumer, prefix: str, n: int, warmup: int) -> list[float]:
    """One producer: LPUSH a job, BRPOP its reply, ``n`` times; milliseconds."""
    reply = c.keys.reply(f"w3:{prefix}")
    out = []
    for i in range(warmup + n):
        job = json.dumps({"task": DOUBLE, "id": f"{prefix}-{i}", "args": [i], "reply_to": reply},
                         separators=(",", ":"))
        t0 = time.perf_counter()
        r.lpush(c.queue_key, job)
        got = r.brpop([reply], timeout=30)
        dt = time.perf_counter() - t0
        if got is None:
            c.proc.check_alive()
            raise RuntimeError(f"{c.name}: no reply to a W3 job within 30 s")
        if i >= warmup:
            out.append(dt * 1000)
    r.delete(reply)
    return out


def w3(r, keys, consumers, n, reps, progress) -> tuple[list[Figure], dict]:
    pct = {s.name: {50: [], 95: [], 99: []} for s in consumers}
    foreign = []
    for rep in range(reps):
        for c in consumers:
            c.wait_idle()
            watch = procs.CpuWatch()
            ms = latencies(r, c, f"W3-{rep}-{c.name}", n, warmup=max(10, n // 50))
            foreign.append(watch.foreign_cores())
            q = statistics.quantiles(ms, n=100, method="inclusive")
            for p in (50, 95, 99):
                pct[c.name][p].append(q[p - 1])
            progress(f"W3 rep {rep + 1}/{reps}: {c.name} p50 {q[49]:.3f} ms, p99 {q[98]:.3f} ms")
    figs = [Figure(f"W3.p{p}.{c.name}", f"p{p}, {c.label}", "ms", pct[c.name][p], digits=3)
            for c in consumers for p in (50, 95, 99)]
    figs.append(foreign_figure("W3", foreign))
    return figs, {}
