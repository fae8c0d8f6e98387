"""`make bench`: redpool against same-run baselines, on a private server.

    python -m bench.run [--reps N] [--quick] [--only W1,W3] [--concurrency N]

Starts a private server, a redpool worker (`python -m redpool worker bench.tasks ...`,
exactly as a user would) and baseline (a) (`python -m bench.naive`), runs the workloads,
prints a table and writes bench/results/<UTC time>.json and bench/results/latest.json.
It reports; it does not gate: the exit status is 0 whether targets are met or missed,
1 only if something crashed (130 on Ctrl-C).  Every process it started is stopped on
the way out, whatever happens.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import time
import traceback
from datetime import datetime, timezone

import redis
from redpool.protocol import Keys
from redpool.server import EmbeddedServer

from bench import report, workloads
from bench.report import Figure
from bench.systems import Naive, Redpool

SIZES = {False: {"W1": 20_000, "W2": 1_000, "W3": 1_000},
         True: {"W1": 2_000, "W2": 100, "W3": 100}}   # --quick
WORKLOADS = ("W1", "W2", "W3")
MIB = 1024 * 1024


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=3, help="repetitions per figure (default 3)")
    p.add_argument("--quick", action="store_true",
                   help="smaller workloads for a smoke run: " + ", ".join(
                       f"{k} {v:,}" for k, v in SIZES[True].items()))
    p.add_argument("--only", default=",".join(WORKLOADS), type=_workloads,
                   help="comma-separated workloads to run (default W1,W2,W3)")
    p.add_argument("--concurrency", type=int, default=len(os.sched_getaffinity(0)),
                   help="pool processes of redpool and of the baselines (default: usable cores)")
    args = p.parse_args(argv)
    if args.reps < 1 or args.concurrency < 1:
        p.error("--reps and --concurrency must be at least 1")
    return args


def _workloads(text: str) -> list[str]:
    names = [w.strip().upper() for w in text.split(",") if w.strip()]
    bad = [w for w in names if w not in WORKLOADS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown workload(s) {bad}; choose from {WORKLOADS}")
    return [w for w in WORKLOADS if w in names]


class Progress:
    def __init__(self) -> None:
        self.t0 = time.monotonic()

    def __call__(self, text: str) -> None:
        print(f"[{time.monotonic() - self.t0:6.1f}s] {text}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def on_sigterm(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        return run(args)
    except KeyboardInterrupt:
        print("bench: interrupted; everything it started has been stopped", file=sys.stderr)
        return 130
    except Exception:
        traceback.print_exc()
        print("bench: crashed (see above); everything it started has been stopped",
              file=sys.stderr)
        return 1


def run(args: argparse.Namespace) -> int:
    progress, sizes, conc = Progress(), SIZES[args.quick], args.concurrency
    started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    with contextlib.ExitStack() as stack:
        srv = stack.enter_context(EmbeddedServer())
        r = redis.Redis.from_url(srv.url)
        stack.callback(r.close)
        keys, mach = Keys("bench"), report.machine(r)
        progress(f"private server {mach['server']} at {srv.url}; {mach['nproc']} cores, "
                 f"concurrency {conc}, {args.reps} reps, workloads {','.join(args.only)}")
        consumers = []
        stack.callback(_stop_all, consumers)
        for cls in (Redpool, Naive):
            consumers.append(cls.start(r, srv.url, keys, conc))
        for c in consumers:
            c.warm_up()
            progress(f"{c.name} (pid {c.pid}) is up, warm and idle")

        sections, extras = [], {}
        if "W1" in args.only:
            n = sizes["W1"]
            figs, extras["W1"] = workloads.w1(r, srv.url, keys, consumers, n, args.reps, progress)
            sections.append((f"W1 throughput: {n:,} jobs of bench.tasks.double (x -> 2x), "
                             f"concurrency {conc}", figs))
        if "W2" in args.only:
            n = sizes["W2"]
            figs, extras["W2"] = workloads.w2(r, keys, consumers, n, args.reps, conc, progress)
            ms = extras["W2"]["job_seconds"] * 1000
            sections.append((f"W2 CPU-bound: {n:,} jobs of {ms:.2f} ms pure Python, concurrency "
                             f"{conc}; efficiency = jobs/s / ({conc} / job time)", figs))
        if "W3" in args.only:
            n = sizes["W3"]
            figs, extras["W3"] = workloads.w3(r, keys, consumers, n, args.reps, progress)
            sections.append((f"W3 latency: {n:,} round trips (LPUSH a job, BRPOP its reply), "
                             "one producer, idle worker", figs))
        sections.append(("Peak resident memory (VmHWM over the whole run)", _memory(consumers)))

    all_figs = {f.key: f for _, figs in sections for f in figs}
    tgts = report.targets(all_figs)
    print(report.table(sections, tgts, extras, mach, args.reps), flush=True)
    path = report.write_json({
        "started_at": started_at,
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": mach,
        "config": {"reps": args.reps, "quick": args.quick, "only": args.only,
                   "concurrency": conc, "sizes": {w: sizes[w] for w in args.only}},
        "figures": {k: f.as_json() for k, f in all_figs.items()},
        "extras": extras,
        "targets": [t.as_json() for t in tgts],
    })
    print(f"\nwritten: {path.relative_to(report.RESULTS.parent.parent)} and latest.json")
    return 0


def _memory(consumers: list) -> list[Figure]:
    """Stop the consumers in order (sampling their peak memory just before); crash = error."""
    figs = []
    for c in consumers:
        peaks = c.stop()
        who = ("supervisor", "child") if c.name == "redpool" else ("parent", "child")
        figs.append(Figure(f"mem.{c.name}.parent", f"{c.name} {who[0]}", "MiB",
                           [peaks["parent_peak_rss"] / MIB], digits=1))
        figs.append(Figure(f"mem.{c.name}.child", f"{c.name} {who[1]} (largest)", "MiB",
                           [peaks["child_peak_rss"] / MIB], digits=1))
    return figs


def _stop_all(consumers: list) -> None:
    for c in consumers:
        try:
            c.proc.stop()
        except Exception as e:  # keep stopping the others
            print(f"bench: stopping {c.name} (pid {c.pid}): {e!r}", file=sys.stderr)
        c.proc.cleanup()


if __name__ == "__main__":
    sys.exit(main())
