"""Figures, the machine they were measured on, the printed table, the targets, the JSON."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import redpool

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class Figure:
    """One measured quantity: a sample per repetition, reported as median (min-max)."""

    key: str        # "W1.drain.redpool": workload.quantity.system
    label: str
    unit: str
    samples: list[float] = field(default_factory=list)
    digits: int = 0

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    def fmt(self, v: float) -> str:
        return f"{v:,.{self.digits}f}"

    def spread(self) -> str:
        if len(self.samples) < 2:
            return ""
        return f"{self.fmt(min(self.samples))}–{self.fmt(max(self.samples))}"

    def as_json(self) -> dict:
        return {"label": self.label, "unit": self.unit, "median": self.median,
                "min": min(self.samples), "max": max(self.samples), "samples": self.samples}


@dataclass
class Target:
    label: str
    value: float
    op: str          # ">=" or "<="
    goal: float
    unit: str = ""

    @property
    def met(self) -> bool:
        return self.value >= self.goal if self.op == ">=" else self.value <= self.goal

    def as_json(self) -> dict:
        return {"label": self.label, "value": self.value, "target": f"{self.op} {self.goal}",
                "pass": self.met}


def targets(figs: dict[str, Figure]) -> list[Target]:
    """The speed-work targets, from the medians of this run (those whose figures exist)."""
    def m(key: str) -> float | None:
        return figs[key].median if key in figs else None

    out = []
    spec = [("W1 drain, redpool / baseline (a)", ("W1.drain.redpool", "W1.drain.naive"),
             ">=", 8, "×"),
            ("W2 efficiency, redpool / baseline (c)",
             ("W2.efficiency.redpool", "W2.efficiency.poolmap"), ">=", 0.95, ""),
            ("W3 p50, redpool", ("W3.p50.redpool",), "<=", 0.6, " ms"),
            ("W3 p99, redpool", ("W3.p99.redpool",), "<=", 2.0, " ms"),
            ("W1 Redis commands per job, redpool", ("W1.commands.redpool",), "<=", 3.0, "")]
    for label, keys, op, goal, unit in spec:
        values = [m(k) for k in keys]
        if None in values:
            continue
        value = values[0] / values[1] if len(values) == 2 else values[0]
        out.append(Target(label, value, op, goal, unit))
    return out


def machine(r) -> dict:
    info = r.info("server")
    server = info.get("server_name") or "redis"
    version = info.get(f"{server}_version") or info.get("redis_version")
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"nproc": len(os.sched_getaffinity(0)), "cpu_model": model,
            "ping_us": ping_us(r),
            "python": f"{platform.python_implementation()} {platform.python_version()}",
            "server": f"{server} {version}", "kernel": platform.release(),
            "loadavg_at_start": os.getloadavg(), "redpool": redpool.__version__,
            "git": _git_describe()}


def ping_us(r, n: int = 2000) -> float:
    """Median round trip of a PING to the private server, in microseconds: how fast this
    machine is at what every workload here is made of (a syscall, a wake-up, a reply).
    On a shared VM it swings several-fold between hours; W3's absolute latencies (and
    the naive baseline) move with it, the ratios much less."""
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        r.ping()
        times.append(time.perf_counter() - t0)
    return round(statistics.median(times) * 1e6, 1)


def _git_describe() -> str | None:
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, text=True,
                              capture_output=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=root, text=True, capture_output=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (head + ("-dirty" if dirty else "")) or None


# -- printing -------------------------------------------------------------------------------------

def table(sections: list[tuple[str, list[Figure]]], tgts: list[Target], extras: dict,
          mach: dict, reps: int) -> str:
    figs = [f for _, fs in sections for f in fs]
    wl = max([len(f.label) for f in figs] + [10]) + 2
    wu = max([len(f.unit) for f in figs] + [4])
    wm = max([len(f.fmt(f.median)) for f in figs] + [6])
    ws = max([len(f.spread()) for f in figs] + [7])
    lines = [f"redpool benchmarks: {mach['nproc']} cores ({mach['cpu_model']}), "
             f"{mach['python']}, {mach['server']}, redpool {mach['git'] or mach['redpool']}",
             f"median of {reps} repetition{'s' if reps != 1 else ''} (min–max); Redis PING "
             f"round trip p50 at the start: {mach.get('ping_us', 0):.0f} us", "",
             f"{'':{wl}}  {'unit':<{wu}}  {'median':>{wm}}  {'min–max':>{ws}}"]
    for title, fs in sections:
        lines.append(title)
        for f in fs:
            lines.append(f"  {f.label:<{wl - 2}}  {f.unit:<{wu}}  {f.fmt(f.median):>{wm}}  "
                         f"{f.spread():>{ws}}")
        lines.append("")
    breakdown = extras.get("W1", {}).get("commands_per_job")
    if breakdown:
        lines.append("W1 Redis commands per job, by command (all repetitions):")
        for name, per in breakdown.items():
            parts = ", ".join(f"{cmd} {v:.3f}" for cmd, v in per.items() if v >= 0.0005)
            lines.append(f"  {name:<8} {sum(per.values()):.3f} = {parts}")
        lines.append("")
    if tgts:
        lines.append("Targets (medians of this run; reported, not enforced):")
        cells = [(t.label, f"{t.value:.3f}{t.unit}", f"target {t.op} {t.goal:g}{t.unit}",
                  "PASS" if t.met else "MISS") for t in tgts]
        w = [max(len(c[i]) for c in cells) for i in range(3)]
        for label, value, goal, verdict in cells:
            lines.append(f"  {label:<{w[0]}}  {value:>{w[1]}}  {goal:<{w[2]}}  {verdict}")
    return "\n".join(lines)


def write_json(doc: dict) -> Path:
    """bench/results/<UTC timestamp>.json and latest.json (each written atomically)."""
    RESULTS.mkdir(exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    text = json.dumps(doc, indent=2, ensure_ascii=False) + "\n"
    path = RESULTS / f"{stamp}.json"
    for target in (path, RESULTS / "latest.json"):
        tmp = target.with_name(target.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, target)
    return path
