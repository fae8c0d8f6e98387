"""Soak test: many jobs, several supervisors, random SIGKILLs, one Redis restart.

Run from the repository root (not collected by pytest; importing this module does
nothing but define things):

    .venv/bin/python -m tests.soak.soak [--jobs 10000] [--supervisors 3] [--kills 50]
        [--seed N] [--concurrency 2] [--lease 3] [--job-ms 5-30] [--timeout-s 600]
        [--keep-logs DIR] [--cluster]

What it does:

1. starts a private server with AOF on (appendfsync always) in a temporary directory;
2. enqueues N jobs of ``soak.run`` (tests/soak/tasks.py), pipelined; each job has a
   unique id and sleeps a few ms; every run is written to a ledger list;
3. starts S supervisors (``python -m redpool worker tests.soak.tasks``), each in its
   own session, stderr to a log file per process;
4. while jobs remain, SIGKILLs at random intervals either a pool child of a random
   supervisor or a whole supervisor (its process group: a host crash), which is then
   restarted either at once under the same name (recovery at start) or after a pause
   under a new name (the dead one's jobs must be reaped by a live supervisor); once,
   about half-way, kill -9s the server and starts it again on the same port and dir;
5. measures, for every whole-supervisor kill, how long until every job it held has
   left its processing list (put back on a queue, or finished);
6. waits for every result, stops the supervisors with SIGTERM, checks for lost jobs,
   duplicates, dead letters and failed results, summarises the supervisor logs and
   prints a summary table.  Exit 1 on any lost job or on the timeout, else 0;
7. always kills what it started and removes its temporary directories.

With ``--cluster`` the jobs go round-robin to queues "a", "b" and "c" of a private
Redis Cluster of three primaries (AOF, appendfsync always; the three queues live on
three different primaries), every supervisor takes all three (``redis+cluster://``),
the ledger is on a separate plain server, and the restart in step 4 kills -9 the
primary of queue "b" and starts it again on the same port and dir.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path

import redis

from redpool.keys import Keys, glob_escape

from .servers import Cluster, Single, keep_logs

ROOT = Path(__file__).resolve().parents[2]
TASK_MODULE = "tests.soak.tasks"
TASK = "soak.run"
TICK = 0.05                    # seconds between iterations of the monitor loop
STOP_GRACE = 40.0              # seconds supervisors get to exit after SIGTERM
CHUNK = 1000                   # keys per EXISTS / MGET / LPUSH
# Events a supervisor is expected to log in a soak with kills and a Redis restart;
# anything else at warning or above is shown in full in the summary.
EXPECTED_EVENTS = {"started", "stopped", "draining", "child_died", "child_stopped", "job_crashed",
                   "recovered", "reaped", "redis_down", "redis_up", "reconciled",
                   "child_retired"}


# -- small helpers -----------------------------------------------------------------------------

def _range(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition("-")
    a, b = int(lo), int(hi or lo)
    if a < 0 or b < a:
        raise argparse.ArgumentTypeError(f"expected LOW-HIGH milliseconds, got {text!r}")
    return a, b


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m tests.soak.soak",
                                 description="redpool soak test: kills, restarts, no job lost")
    ap.add_argument("--jobs", type=int, default=10_000)
    ap.add_argument("--supervisors", type=int, default=3)
    ap.add_argument("--kills", type=int, default=50, help="at least this many SIGKILLs")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--concurrency", type=int, default=2, help="pool processes per supervisor")
    ap.add_argument("--lease", type=float, default=3.0, help="supervisor lease, seconds")
    ap.add_argument("--job-ms", type=_range, default=(5, 30), help="job sleep range, ms")
    ap.add_argument("--timeout-s", type=float, default=600.0,
                    help="overall limit for every job to have a result")
    ap.add_argument("--supervisor-share", type=float, default=0.35,
                    help="share of kills that take a whole supervisor (default 0.35)")
    ap.add_argument("--keep-logs", metavar="DIR", default=None,
                    help="copy the supervisor and server logs here before cleaning up")
    ap.add_argument("--namespace", default=None)
    ap.add_argument("--cluster", action="store_true",
                    help="a private three-primary Redis Cluster, queues a, b and c")
    args = ap.parse_args(argv)
    if args.jobs < 1 or args.supervisors < 1 or args.kills < 0 or args.concurrency < 1:
        ap.error("--jobs, --supervisors and --concurrency must be positive, --kills >= 0")
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(2**31)
    args.namespace = args.namespace or f"soak{uuid.uuid4().hex[:8]}"
    return args


def _die_with_parent() -> None:
    """In a supervisor before exec: the kernel SIGKILLs it if the soak dies (Linux)."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass


def sha1(raw: bytes) -> str:
    return hashlib.sha1(raw).hexdigest()


def job_id_of(raw: bytes) -> str | None:
    try:
        v = json.loads(raw)
        return v.get("id") if isinstance(v, dict) else None
    except ValueError:
        return None


def chunks(seq: list, n: int = CHUNK):
    for i in range(0, len(seq), n):
        yield seq[i:i + n]


@dataclass
class Sup:
    """One supervisor process we started."""

    slot: int
    name: str
    proc: subprocess.Popen
    log_path: Path
    started: float
    ours_to_end: bool = False   # we killed or stopped it: its exit is expected


@dataclass
class Recovery:
    """The jobs a killed supervisor held, and when they had all left its lists."""

    name: str
    mode: str                   # "same-name" or "new-name"
    killed_at: float
    jobs: list[bytes]
    keys: list[str]
    crashes0: dict[str, int]
    done_at: float | None = None
    overlap: bool = False       # Redis was restarted before they were all recovered

    @property
    def seconds(self) -> float | None:
        return None if self.done_at is None else self.done_at - self.killed_at


@dataclass
class Stats:
    child_kills: int = 0
    sup_kills: int = 0
    same_name: int = 0
    new_name: int = 0
    redis_restarts: int = 0
    redis_down_s: float = 0.0
    aof_notes: list[str] = field(default_factory=list)
    unexpected_exits: list[str] = field(default_factory=list)
    killed_pids: set[int] = field(default_factory=set)   # pool children we SIGKILLed
    stop_codes: dict[str, int | None] = field(default_factory=dict)


# -- the soak ----------------------------------------------------------------------------------

class Soak:
    def __init__(self, args: argparse.Namespace) -> None:
        self.a = args
        self.rng = random.Random(args.seed)
        self.ns = args.namespace
        self.tmp: Path | None = None
        self.b: Single | Cluster | None = None   # the private Redis
        self.keys = Keys(self.ns, cluster=args.cluster)
        self.queues = Cluster.queues if args.cluster else Single.queues
        self.r: redis.Redis | None = None
        self.ledger: redis.Redis | None = None
        self.sups: dict[int, Sup] = {}           # slot -> current process
        self.all_sups: list[Sup] = []            # every process ever started
        self.gen: Counter = Counter()            # slot -> restarts
        self.pending: dict[int, tuple[float, str]] = {}  # slot -> (start at, name)
        self.recoveries: list[Recovery] = []
        self.stats = Stats()
        self.jobs: dict[str, tuple[int, int]] = {}  # id -> (ms, n)
        self.ids: list[str] = []
        self.result_keys: list[str] = []
        self.queue_of: dict[str, str] = {}       # id -> its queue
        self.complete: set[int] = set()          # chunks of result_keys all in
        self.t0 = time.monotonic()
        self.t_run = self.t_end = 0.0
        self.done = 0
        self.samples: deque = deque(maxlen=400)
        self.redis_restart_at: float | None = None

    # -- output ----------------------------------------------------------------------------

    def say(self, msg: str) -> None:
        print(f"[{time.monotonic() - self.t0:7.1f}s] {msg}", flush=True)

    # -- keys ------------------------------------------------------------------------------

    @property
    def ledger_key(self) -> str:
        return f"{self.ns}:ledger"

    def pattern(self, kind: str) -> str:
        """SCAN pattern of every key of one kind (processing, scheduled, outbox, ...)."""
        return f"{glob_escape(self.ns)}:{kind}:*"

    def crashes_key(self, raw: bytes) -> str:
        return self.keys.crashes_of(self.queue_of.get(job_id_of(raw) or "", self.queues[0]))

    @property
    def dead_keys(self) -> list[str]:
        return sorted({self.keys.dead_of(q) for q in self.queues})

    # -- setup -----------------------------------------------------------------------------

    def enqueue(self) -> None:
        lo, hi = self.a.job_ms
        raws: dict[str, list[str]] = {q: [] for q in self.queues}
        for n in range(self.a.jobs):
            jid = f"soak-{n:06d}"
            ms = self.rng.randint(lo, hi)
            self.jobs[jid] = (ms, n)
            self.ids.append(jid)
            self.queue_of[jid] = q = self.queues[n % len(self.queues)]
            raws[q].append(json.dumps({"task": TASK, "id": jid, "args": [ms, n],
                                       "enqueued_at": time.time()}, separators=(",", ":")))
        self.result_keys = [self.keys.result(j) for j in self.ids]
        pipe = self.r.pipeline(transaction=False)
        for q in self.queues:
            for part in chunks(raws[q]):
                pipe.lpush(self.keys.queue(q), *part)
        pipe.execute()

    def start_sup(self, slot: int, name: str) -> Sup:
        cmd = [sys.executable, "-m", "redpool", "worker", TASK_MODULE,
               "--redis-url", self.b.url, "--namespace", self.ns, "--name", name,
               "--lease", f"{self.a.lease:g}", "--concurrency", str(self.a.concurrency),
               "--log-format", "json", "--log-level", "warning", "--max-crashes", "1000"]
        if self.a.cluster:
            cmd += [arg for q in self.queues for arg in ("--queue", q)]
        env = {k: v for k, v in os.environ.items() if not k.startswith("REDPOOL_")}
        env.update(PYTHONUNBUFFERED="1", REDPOOL_LEDGER_URL=self.b.ledger_url,
                   REDPOOL_LEDGER=self.ledger_key)
        log_path = self.tmp / "logs" / f"{name}.{len(self.all_sups):03d}.log"
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                                    stdout=log, stderr=log, start_new_session=True,
                                    preexec_fn=_die_with_parent)
        sup = Sup(slot, name, proc, log_path, time.monotonic())
        self.sups[slot] = sup
        self.all_sups.append(sup)
        return sup

    # -- measuring ---------------------------------------------------------------------------

    def count_done(self, full: bool = False) -> int:
        """Jobs with a result.  A chunk found complete is not asked again unless ``full``
        (results outlive the soak); on a cluster redis-py splits EXISTS per slot."""
        done = 0
        for i, part in enumerate(chunks(self.result_keys)):
            n = len(part) if i in self.complete and not full else self.r.exists(*part)
            if n == len(part):
                self.complete.add(i)
            done += n
        return done

    def rate(self) -> float:
        """Jobs per second over the last ~10 s."""
        if len(self.samples) < 2:
            return 0.0
        t1, d1 = self.samples[-1]
        for t0, d0 in self.samples:
            if t1 - t0 <= 10.0:
                return (d1 - d0) / (t1 - t0) if t1 > t0 else 0.0
        return 0.0

    def poll_recoveries(self, now: float) -> None:
        for rec in self.recoveries:
            if rec.done_at is not None:
                continue
            if not rec.jobs:
                rec.done_at = rec.killed_at
                continue
            pipe = self.r.pipeline(transaction=False)
            for key in rec.keys:
                pipe.lrange(key, 0, -1)
            for j in rec.jobs:
                pipe.hget(self.crashes_key(j), sha1(j))
            for j in rec.jobs:
                pipe.exists(self.keys.result(job_id_of(j) or "?"))
            out = pipe.execute()
            still = set()
            for lst in out[:len(rec.keys)]:
                still.update(lst)
            n = len(rec.keys) + len(rec.jobs)
            crashes, results = out[len(rec.keys):n], out[n:]
            left = 0
            for raw, c, res in zip(rec.jobs, crashes, results):
                if raw not in still or int(c or 0) > rec.crashes0.get(sha1(raw), 0) or res:
                    left += 1
            if left == len(rec.jobs):
                rec.done_at = now
                self.say(f"recovered {len(rec.jobs)} job(s) of {rec.name} ({rec.mode}) in "
                         f"{rec.seconds:.2f} s"
                         f"{' (the Redis restart came in between)' if rec.overlap else ''}")

    # -- chaos -------------------------------------------------------------------------------

    def live(self) -> list[Sup]:
        return [s for s in self.sups.values() if s.proc.poll() is None and not s.ours_to_end]

    def children_of(self, pid: int) -> list[int]:
        out = subprocess.run(["ps", "-ww", "-o", "pid=,args=", "--ppid", str(pid)],
                             capture_output=True, text=True).stdout
        # every direct child but multiprocessing's resource tracker (children set titles)
        return [int(line.split()[0]) for line in out.splitlines()
                if line.strip() and "resource_tracker" not in line]

    def kill_child(self) -> bool:
        live = self.live()
        self.rng.shuffle(live)
        for sup in live:
            kids = self.children_of(sup.proc.pid)
            if kids:
                pid = self.rng.choice(kids)
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    continue
                self.stats.child_kills += 1
                self.stats.killed_pids.add(pid)
                self.say(f"kill -9 child {pid} of {sup.name}")
                return True
        return False

    def kill_supervisor(self, now: float) -> bool:
        live = self.live()
        if not live:
            return False
        sup = self.rng.choice(live)
        sup.ours_to_end = True
        try:
            os.killpg(sup.proc.pid, signal.SIGKILL)   # the whole host: supervisor + children
        except ProcessLookupError:
            pass
        sup.proc.wait()
        killed_at = time.monotonic()
        time.sleep(0.05)  # commands it sent just before dying are executed first
        jobs, keys, crashes0 = self.snapshot(sup.name)
        mode = "same-name" if self.rng.random() < 0.5 else "new-name"
        rec = Recovery(sup.name, mode, killed_at, jobs, keys, crashes0)
        self.recoveries.append(rec)
        self.stats.sup_kills += 1
        del self.sups[sup.slot]
        if mode == "same-name":
            self.stats.same_name += 1
            self.start_sup(sup.slot, sup.name)
            self.say(f"kill -9 supervisor {sup.name} (pid {sup.proc.pid}, held {len(jobs)} "
                     f"job(s)); restarted at once under the same name")
        else:
            self.stats.new_name += 1
            self.gen[sup.slot] += 1
            name = f"soak-{sup.slot}-r{self.gen[sup.slot]}"
            pause = self.rng.uniform(1.0, max(1.0, self.a.lease))
            self.pending[sup.slot] = (time.monotonic() + pause, name)
            self.say(f"kill -9 supervisor {sup.name} (pid {sup.proc.pid}, held {len(jobs)} "
                     f"job(s)); {name} starts in {pause:.1f} s, a reaper must recover them")
        return True

    def snapshot(self, name: str) -> tuple[list[bytes], list[str], dict[str, int]]:
        """The jobs in ``name``'s processing lists now, and their crash counts."""
        deadline = time.monotonic() + 30.0
        while True:
            try:
                keys = [k.decode() for k in self.r.scan_iter(
                    match=self.keys.processing_pattern(name), count=1000)]
                keys = sorted(set(keys) | {self.keys.processing(name, q) for q in self.queues})
                pipe = self.r.pipeline(transaction=False)
                for key in keys:
                    pipe.lrange(key, 0, -1)
                jobs = [j for lst in pipe.execute() for j in lst]
                pipe = self.r.pipeline(transaction=False)
                for j in jobs:
                    pipe.hget(self.crashes_key(j), sha1(j))
                counts = pipe.execute() if jobs else []
                return jobs, keys, {sha1(j): int(c or 0) for j, c in zip(jobs, counts)}
            except redis.RedisError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def restart_redis(self) -> None:
        before_done, before_ledger = self.count_done(True), self.ledger.llen(self.ledger_key)
        for rec in self.recoveries:
            if rec.done_at is None:
                rec.overlap = True  # reapers hold off for a while after an outage
        t = time.monotonic()
        what = self.b.kill()
        self.say(f"kill -9 {what} at {before_done} results")
        time.sleep(self.rng.uniform(0.5, 1.5))
        back = self.b.restart(self.r)
        self.stats.redis_down_s = time.monotonic() - t
        self.stats.redis_restarts += 1
        self.redis_restart_at = time.monotonic()
        after_done, after_ledger = self.count_done(True), self.ledger.llen(self.ledger_key)
        self.say(f"{back} after "
                 f"{self.stats.redis_down_s:.2f} s: {after_done} results, ledger "
                 f"{after_ledger} (before: {before_done}, {before_ledger})")
        if after_done < before_done:
            self.stats.aof_notes.append(f"results went from {before_done} to {after_done} "
                                        "across the restart")
        if after_ledger < before_ledger:
            self.stats.aof_notes.append(f"ledger went from {before_ledger} to {after_ledger} "
                                        "across the restart")

    def next_interval(self) -> float:
        """0.2-1.0 s, shortened when the jobs would otherwise run out before --kills."""
        lo, hi = 0.2, 1.0
        needed = self.a.kills - self.stats.child_kills - self.stats.sup_kills
        rate = self.rate()
        if needed > 0 and rate > 0:
            left = (self.a.jobs - self.done) / rate
            hi = max(lo, min(hi, left / (needed + 1)))
        return self.rng.uniform(lo, hi)

    # -- the run ---------------------------------------------------------------------------

    def run(self) -> int:
        a = self.a
        self.tmp = Path(tempfile.mkdtemp(prefix="redpool-soak-"))
        (self.tmp / "logs").mkdir()
        self.b = (Cluster if a.cluster else Single)(self.tmp, self.ns)
        self.b.start()
        self.r = self.b.client()
        self.ledger = self.b.ledger_client()
        self.say(f"{self.b.describe()}; "
                 f"namespace {self.ns}; seed {a.seed}")
        t = time.monotonic()
        self.enqueue()
        self.say(f"enqueued {a.jobs} jobs of {TASK} ({a.job_ms[0]}-{a.job_ms[1]} ms each) "
                 f"in {time.monotonic() - t:.2f} s")
        self.t_run = time.monotonic()
        for slot in range(1, a.supervisors + 1):
            self.start_sup(slot, f"soak-{slot}")
        self.say(f"started {a.supervisors} supervisors (concurrency {a.concurrency}, "
                 f"lease {a.lease:g} s); logs in {self.tmp / 'logs'}")
        deadline = self.t_run + a.timeout_s
        next_kill = time.monotonic() + self.rng.uniform(0.5, 1.5)
        next_count = next_report = 0.0
        waited_for_quiet = None
        timed_out = False
        while True:
            now = time.monotonic()
            if now > deadline:
                timed_out = True
                self.say(f"TIMEOUT after {a.timeout_s:g} s with {self.done}/{a.jobs} results")
                break
            self.watch_exits()
            for slot, (when, name) in list(self.pending.items()):
                if now >= when:
                    del self.pending[slot]
                    self.start_sup(slot, name)
                    self.say(f"started {name}")
            try:
                if now >= next_count:
                    self.done = self.count_done()
                    self.samples.append((now, self.done))
                    next_count = now + 0.5
                self.poll_recoveries(now)
            except redis.RedisError as e:
                self.say(f"redis error while monitoring (retrying): {e}")
                time.sleep(0.2)
                continue
            if self.done >= a.jobs:
                self.say(f"all {a.jobs} jobs have a result")
                break
            if now >= next_report:
                next_report = now + 5.0
                self.say(f"progress {self.done}/{a.jobs} ({self.rate():.0f}/s); kills: "
                         f"{self.stats.child_kills} children, {self.stats.sup_kills} "
                         f"supervisors; {len(self.live())}/{a.supervisors} supervisors up")
            restart_due = self.stats.redis_restarts == 0 and self.done >= a.jobs / 2
            quiet = not self.pending and all(r.done_at is not None for r in self.recoveries)
            if restart_due:
                # a supervisor still starting up exits 4 when Redis is gone (documented):
                # restart Redis only once every supervisor is past its start-up
                quiet = quiet and all(now - s.started >= 3.0 for s in self.live())
                waited_for_quiet = waited_for_quiet or now
                # not quiet for long, or the jobs are about to run out: restart anyway
                if quiet or now - waited_for_quiet > 30.0 or self.done >= 0.9 * a.jobs:
                    try:
                        self.restart_redis()
                    except redis.RedisError as e:
                        self.say(f"redis error around the restart (carrying on): {e}")
                        self.stats.redis_restarts = max(1, self.stats.redis_restarts)
                    continue
            if now >= next_kill:
                want_sup = (not restart_due and not self.pending and quiet
                            and len(self.live()) == a.supervisors
                            and self.rng.random() < a.supervisor_share)
                try:
                    ok = self.kill_supervisor(now) if want_sup else self.kill_child()
                except redis.RedisError as e:
                    self.say(f"redis error during a kill (carrying on): {e}")
                    ok = True
                next_kill = time.monotonic() + (self.next_interval() if ok else 0.1)
            time.sleep(TICK)
        self.t_end = time.monotonic()
        return self.finish(timed_out)

    def watch_exits(self) -> None:
        for sup in list(self.sups.values()):
            code = sup.proc.poll()
            if code is not None and not sup.ours_to_end:
                sup.ours_to_end = True
                tail = sup.log_path.read_text(errors="replace").strip().splitlines()[-5:]
                note = f"{sup.name} (pid {sup.proc.pid}) exited by itself with code {code}"
                self.stats.unexpected_exits.append(note + "\n      " + "\n      ".join(tail))
                self.say("UNEXPECTED: " + note)
                del self.sups[sup.slot]
                self.gen[sup.slot] += 1
                self.pending[sup.slot] = (time.monotonic() + 1.0,
                                          f"soak-{sup.slot}-r{self.gen[sup.slot]}")

    # -- the end ---------------------------------------------------------------------------

    def locate(self) -> dict[str, list[str]]:
        """Where each job id sits in Redis, outside its result key."""
        where: dict[str, list[str]] = {}

        def note(raw: bytes, place: str) -> None:
            jid = job_id_of(raw)
            if jid:
                where.setdefault(jid, []).append(place)

        for q in self.queues:
            for raw in self.r.lrange(self.keys.queue(q), 0, -1):
                note(raw, f"queue:{q}")
        for key in self.r.scan_iter(match=self.pattern("processing"), count=1000):
            for raw in self.r.lrange(key, 0, -1):
                note(raw, key.decode())
        for key in self.r.scan_iter(match=self.pattern("scheduled"), count=1000):
            for raw in self.r.zrange(key, 0, -1):
                note(raw, key.decode())
        for key in self.dead_keys:
            for raw in self.r.lrange(key, 0, -1):
                try:
                    entry = json.loads(raw)
                    jid = entry.get("id") if isinstance(entry, dict) else None
                except ValueError:
                    jid = None
                if jid:
                    where.setdefault(jid, []).append("dead")
        # Redis Cluster: answers accepted, not yet written (JSON [result key, ttl, ...])
        prefix = self.keys.result("")
        for key in self.r.scan_iter(match=self.pattern("outbox"), count=1000):
            for raw in self.r.lrange(key, 0, -1):
                try:
                    rkey = json.loads(raw)[0]
                except (ValueError, IndexError, KeyError, TypeError):
                    continue
                if isinstance(rkey, str) and rkey.startswith(prefix):
                    where.setdefault(rkey[len(prefix):], []).append(key.decode())
        return where

    def stop_all(self) -> None:
        self.pending.clear()
        running = [s for s in self.sups.values() if s.proc.poll() is None]
        for s in running:
            s.ours_to_end = True
            try:
                s.proc.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + STOP_GRACE
        for s in running:
            try:
                s.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.say(f"{s.name} did not exit within {STOP_GRACE:g} s of SIGTERM: SIGKILL")
                try:
                    os.killpg(s.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                s.proc.wait()
            self.stats.stop_codes[s.name] = s.proc.returncode

    def finish(self, timed_out: bool) -> int:
        a = self.a
        missing_before: dict[str, list[str]] = {}
        if self.done < a.jobs:
            try:
                where = self.locate()
                envs = self.mget_results()
                missing_before = {j: where.get(j, []) for j in self.ids if envs.get(j) is None}
            except redis.RedisError as e:
                self.say(f"could not locate unfinished jobs before stopping: {e}")
        self.say("stopping the supervisors (SIGTERM)")
        self.stop_all()
        envs = self.mget_results()
        where = self.locate()
        missing = [j for j in self.ids if envs.get(j) is None]
        lost = [j for j in missing if not where.get(j)]
        completed = a.jobs - len(missing)
        not_ok = {j: e for j, e in envs.items() if e is not None and e.get("status") != "succeeded"}
        wrong = [j for j, e in envs.items() if e is not None and e.get("status") == "succeeded"
                 and e.get("result") != list(self.jobs[j])]
        # the ledger: one entry per run (retried writes repeat the run token)
        runs: dict[str, set] = {}
        entries = self.ledger.lrange(self.ledger_key, 0, -1)
        last: dict[str, tuple[str, str]] = {}   # pid -> its last run (job id, run)
        for e in entries:
            jid, _, rest = e.decode().partition(":")
            runs.setdefault(jid, set()).add(rest)
            last[rest.partition(":")[0]] = (jid, rest)
        n_runs = sum(len(v) for v in runs.values())
        duplicates = n_runs - len(runs)
        most = max((len(v) for v in runs.values()), default=0)
        # a repeat is explained by a kill: the job was held by a supervisor we killed,
        # or an earlier run was the last one of a pool child we killed
        held = {job_id_of(j) for r in self.recoveries for j in r.jobs}
        cut = Counter(last[str(p)][0] for p in self.stats.killed_pids if str(p) in last)
        unexplained = {j: sorted(v) for j, v in runs.items()
                       if len(v) - 1 > cut[j] and j not in held}
        no_run = [j for j, e in envs.items() if e is not None and e.get("status") == "succeeded"
                  and j not in runs]
        dead_len = sum(self.r.llen(k) for k in self.dead_keys)
        leftovers = self.leftovers()

        self.print_logs()
        wall = self.t_end - self.t_run
        rec = [r for r in self.recoveries if r.seconds is not None]
        worst = max(rec, key=lambda r: r.seconds, default=None)
        unrecovered = [r for r in self.recoveries if r.seconds is None]
        limit = a.lease + 5.0
        slow = [r for r in rec if r.seconds > limit]

        def worst_of(mode: str) -> str:
            rs = [r.seconds for r in rec if r.jobs and
                  (r.overlap if mode == "overlap" else r.mode == mode and not r.overlap)]
            return f"{max(rs):.2f} s over {len(rs)}" if rs else "-"

        rows = [
            ("jobs", f"{a.jobs} ({a.job_ms[0]}-{a.job_ms[1]} ms each)"),
            ("supervisors", f"{a.supervisors} x concurrency {a.concurrency}, lease {a.lease:g} s"),
            ("seed", str(a.seed)),
            ("kills: children", str(self.stats.child_kills)),
            ("kills: supervisors", f"{self.stats.sup_kills} ({self.stats.same_name} restarted "
                                   f"same name, {self.stats.new_name} new name)"),
            ("kills: total", f"{self.stats.child_kills + self.stats.sup_kills} (target "
                             f"{a.kills}{'' if self.stats.child_kills + self.stats.sup_kills >= a.kills else ', NOT REACHED'})"),
            ("redis restarts", f"{self.stats.redis_restarts} (down {self.stats.redis_down_s:.2f} s)"
             if self.stats.redis_restarts else "0 (NOT DONE: the jobs ran out first)"),
            ("AOF check", "; ".join(self.stats.aof_notes) or "ok (nothing acknowledged was lost)"),
            ("jobs completed", str(completed)),
            ("jobs lost", str(len(lost))),
            ("jobs unfinished", str(len(missing) - len(lost))),
            ("runs (ledger)", f"{n_runs} ({len(entries)} entries)"),
            ("duplicate runs", f"{duplicates} (most runs of one job: {most}; "
                               f"{len(unexplained)} job(s) not explained by a kill)"),
            ("results not 'succeeded'", str(len(not_ok))),
            ("results != input", str(len(wrong))),
            ("succeeded without a run", str(len(no_run))),
            ("dead-lettered", str(dead_len)),
            ("worst recovery", (f"{worst.seconds:.2f} s ({worst.name}, {worst.mode}, "
                                f"{len(worst.jobs)} jobs"
                                f"{', Redis restarted meanwhile' if worst.overlap else ''})")
             if worst else "-"),
            ("  same-name restarts", worst_of("same-name")),
            ("  new name (reaper)", worst_of("new-name")),
            ("  Redis restart overlapped", worst_of("overlap")),
            (f"  over lease+5 = {limit:g} s", str(len(slow))),
            ("  never recovered", str(len(unrecovered))),
            ("unexpected sup. exits", str(len(self.stats.unexpected_exits))),
            ("exit codes at stop", ", ".join(f"{n}={c}" for n, c in self.stats.stop_codes.items())),
            ("left in Redis", leftovers or "nothing"),
            ("wall time", f"{wall:.1f} s"),
            ("throughput", f"{completed / wall:.1f} jobs/s" if wall > 0 else "-"),
            ("timed out", "YES" if timed_out else "no"),
        ]
        width = max(len(k) for k, _ in rows)
        print("\n=== soak summary " + "=" * 50, flush=True)
        for k, v in rows:
            print(f"  {k:<{width}}  {v}")
        if lost:
            print(f"\nLOST JOBS ({len(lost)}): {', '.join(lost[:50])}")
            for j in lost[:20]:
                print(f"  {j}: before stopping: {missing_before.get(j, 'not looked up')}; "
                      f"ledger runs: {sorted(runs.get(j, ()))}")
        if missing and len(missing) > len(lost):
            print("\nunfinished but still in Redis: "
                  + ", ".join(f"{j} ({'/'.join(where[j])})" for j in missing if where.get(j))[:2000])
        if not_ok:
            print("\nresults not 'succeeded' (first 10):")
            for j, e in list(not_ok.items())[:10]:
                err = e.get("error") or {}
                print(f"  {j}: {e.get('status')} {err.get('type')}: {err.get('message')}")
        if wrong:
            print(f"\nresults that differ from their input: {wrong[:20]}")
        if unexplained:
            print("\nrepeated runs no kill explains (job: pid:run ...; first 20):")
            for j, v in list(unexplained.items())[:20]:
                print(f"  {j} ({self.queue_of.get(j)}): {' '.join(v)}")
        if slow or unrecovered:
            print("\nslow or missing recoveries:")
            for r in slow + unrecovered:
                print(f"  {r.name} ({r.mode}, {len(r.jobs)} jobs"
                      f"{', Redis restarted meanwhile' if r.overlap else ''}): "
                      f"{'never' if r.seconds is None else f'{r.seconds:.2f} s'}")
        if self.stats.unexpected_exits:
            print("\nunexpected supervisor exits:")
            for u in self.stats.unexpected_exits:
                print("  " + u)
        failed = bool(lost) or timed_out
        print(f"\nRESULT: {'FAIL' if failed else 'PASS'}"
              f"{' (jobs lost)' if lost else ''}{' (timed out)' if timed_out else ''}", flush=True)
        return 1 if failed else 0

    def mget_results(self) -> dict[str, dict | None]:
        out: dict[str, dict | None] = {}
        mget = self.r.mget_nonatomic if self.a.cluster else self.r.mget
        for ids, keys in zip(chunks(self.ids), chunks(self.result_keys)):
            for jid, raw in zip(ids, mget(keys)):
                out[jid] = json.loads(raw) if raw else None
        return out

    def leftovers(self) -> str:
        parts = []
        for q in self.queues:
            qlen = self.r.llen(self.keys.queue(q))
            if qlen:
                parts.append(f"queue {qlen}" if len(self.queues) == 1 else f"queue {q} {qlen}")
        for kind in ("processing", "outbox"):
            for key in self.r.scan_iter(match=self.pattern(kind), count=1000):
                n = self.r.llen(key)
                if n:
                    parts.append(f"{key.decode()} {n}")
        for key in self.r.scan_iter(match=self.pattern("scheduled"), count=1000):
            parts.append(f"{key.decode()} {self.r.zcard(key)}")
        names = sorted(n.decode() for n in self.r.smembers(self.keys.supervisors))
        if names:
            parts.append(f"registered supervisors {names}")
        leases = [k.decode() for k in self.r.scan_iter(match=self.keys.supervisor("*"))]
        if self.a.cluster:
            leases += [k.decode() for k in self.r.scan_iter(match=self.pattern("lease"))]
        if leases:
            parts.append(f"leases {leases}")
        return "; ".join(parts)

    def print_logs(self) -> None:
        """Count what the supervisors logged; quote what is not routine."""
        events: Counter = Counter()
        samples: dict[tuple[str, str], list[str]] = {}
        other: list[str] = []
        for sup in self.all_sups:
            try:
                lines = sup.log_path.read_text(errors="replace").splitlines()
            except OSError:
                continue
            for line in lines:
                try:
                    e = json.loads(line)
                except ValueError:
                    e = None
                if not isinstance(e, dict):
                    if line.strip():
                        other.append(f"{sup.log_path.name}: {line}")
                    continue
                key = (e.get("level", "?"), str(e.get("event")))
                events[key] += 1
                notable = key[1] not in EXPECTED_EVENTS or "exception" in e or "exc_info" in e
                if notable or len(samples.get(key, ())) < 1:
                    samples.setdefault(key, [])
                    if len(samples[key]) < (5 if notable else 1):
                        samples[key].append(f"{sup.log_path.name}: {line[:600]}")
        print("\n=== supervisor log events (all processes) " + "=" * 25)
        for (level, event), n in sorted(events.items(), key=lambda kv: (-kv[1], kv[0])):
            flag = "" if event in EXPECTED_EVENTS else "   <-- not routine"
            print(f"  {level:<8} {event:<24} {n:>6}{flag}")
        notable = [(k, v) for k, v in samples.items() if k[1] not in EXPECTED_EVENTS
                   or any('"exception"' in s for s in v)]
        if notable:
            print("\n  not routine, samples:")
            for _, lines in notable:
                for s in lines:
                    print("    " + s)
        if other:
            print(f"\n  lines that are not JSON events ({len(other)}; first 40):")
            for s in other[:40]:
                print("    " + s[:400])
        print("\n  one sample of each routine event:")
        for (level, event), lines in sorted(samples.items()):
            if event in EXPECTED_EVENTS:
                print("    " + lines[0][:400])

    # -- cleanup ---------------------------------------------------------------------------

    def cleanup(self) -> None:
        for sup in self.all_sups:
            if sup.proc.poll() is None:
                try:
                    os.killpg(sup.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                try:
                    sup.proc.wait(10)
                except subprocess.TimeoutExpired:
                    pass
        if self.b is not None:
            try:
                self.b.stop()
            except Exception:
                pass
        for client in (self.r, self.ledger):
            try:
                client.close()
            except Exception:
                pass
        if self.tmp is not None:
            if self.a.keep_logs and self.b is not None:
                dest = Path(self.a.keep_logs)
                try:
                    keep_logs(self.b, self.tmp, dest)
                    print(f"logs kept in {dest}", flush=True)
                except OSError as e:
                    print(f"could not keep the logs: {e}", file=sys.stderr)
            shutil.rmtree(self.tmp, ignore_errors=True)
        if self.b is not None:
            self.b.cleanup()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    soak = Soak(args)

    def on_term(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        return soak.run()
    except KeyboardInterrupt:
        print("\nsoak: interrupted; cleaning up", file=sys.stderr, flush=True)
        return 130
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # finish cleaning up
        try:
            soak.cleanup()
        finally:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
