"""The state of a deployment as Redis holds it: what `redpool status`, `redpool inspect`
and the metrics' queue collector read.

Read-only, and meant to be safe against a busy production server: the reads one view
needs go in one pipeline; lists are read 1000 elements at a time (never a million in
one reply); the keyspace is walked with SCAN (never KEYS), and only to find queues no
supervisor listens to.

On Redis Cluster (``keys.cluster``) the same reads work node by node: redis-py splits a
pipeline per node and SCANs every primary.  Two things differ: TIME is not allowed in
a cluster pipeline, so it is asked for on its own (one more round trip); and each queue
has its own dead-letter list, so dead letters are counted exactly, by LLEN per queue,
with the queue's other reads, and a queue that has only a dead list is found by a
second SCAN.  Everything read is untrusted: a job, a lease's info or a dead
letter that is not what it should be shows as unknown, never as a crash; so is a key
of the wrong type (another program wrote to it: keytypes.py), which is listed with
what it stops and what to do, beside those the supervisors report.

Times are measured on the Redis server's clock (TIME), the one the leases and the
scheduled sets already use.  A job's age compares it with the ``enqueued_at`` its
producer wrote, so a producer's clock skew shows in the age.  A supervisor's
heartbeat age needs no clock but the server's: it is its lease length minus the
lease key's remaining PTTL, since every renewal (each lease/3) resets that TTL.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import redis

from .keytypes import EXPECTED, bad_key
from .protocol import Keys

CHUNK = 1000            # list elements per LRANGE / ZRANGE
SCAN_COUNT = 1000       # keys per SCAN call
DEAD_SCAN_MAX = 10_000  # dead letters read to count them per queue (the default --dead-max)


def number(v: Any) -> float | None:
    """``v`` if it is a finite JSON number (not a bool), else None."""
    if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
        return float(v)
    return None


def parse_object(raw: bytes | str | None) -> dict | None:
    """A JSON object, or None for anything else (missing, not JSON, not an object)."""
    if raw is None:
        return None
    try:
        v = json.loads(raw)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return None
    return v if isinstance(v, dict) else None


def server_time(r: redis.Redis) -> float:
    return time_of(r.time())


def time_of(reply) -> float:
    """TIME's reply, (seconds, microseconds), as seconds."""
    seconds, micros = reply
    return seconds + micros / 1e6


# -- queues ---------------------------------------------------------------------------------

@dataclass
class QueueState:
    name: str
    depth: int                      # jobs waiting in the list
    oldest_age: float | None        # seconds; None: empty, or its oldest job has no enqueued_at
    scheduled: int                  # jobs in its scheduled set (delayed jobs, retries)
    next_due_in: float | None       # seconds until the first scheduled one is due (< 0: overdue)
    dead: int = 0                   # dead letters of jobs taken from it (see DeadCounts;
                                    # on Redis Cluster the length of its own list)
    unusable: dict[str, str] = field(default_factory=dict)  # its keys of the wrong type


def discover_queues(r: redis.Redis, keys: Keys) -> set[str]:
    """Queues that have a list or a scheduled set (or, on Redis Cluster, a dead-letter
    list): one SCAN pass over the keyspace (two on Redis Cluster)."""
    found = set()
    for key in r.scan_iter(match=keys.queues_pattern, count=SCAN_COUNT):
        name = keys.queue_named(key.decode("utf-8", "replace"))
        if name and not any(c.isspace() for c in name):
            found.add(name)
    if keys.cluster:
        found |= {keys.dead_named(key) for key in dead_lists(r, keys)}
    return found


def dead_lists(r: redis.Redis, keys: Keys, queue: str | None = None) -> list[str]:
    """The dead-letter lists to read: the one list on one server; on Redis Cluster the
    list of ``queue``, or every queue's, found with SCAN (keys that only look like one,
    a queue name with braces say, are left alone)."""
    if not keys.cluster:
        return [keys.dead]
    if queue is not None:
        return [keys.dead_of(queue)]
    found = set()
    for raw in r.scan_iter(match=keys.dead_pattern, count=SCAN_COUNT):
        key = raw.decode("utf-8", "replace")
        q = keys.dead_named(key)
        if q and keys.dead_of(q) == key and not any(c.isspace() for c in q):
            found.add(key)
    return sorted(found)


def dead_label(keys: Keys, queue: str | None = None) -> str:
    """The dead-letter list(s) as messages name them: ``<ns>:dead:{*}`` for all the
    lists of Redis Cluster."""
    return keys.dead if not keys.cluster else keys.dead_of("*" if queue is None else queue)


def read_queues(r: redis.Redis, keys: Keys, names: list[str]) -> tuple[float, list[QueueState]]:
    """(server time, the state of each named queue): one round trip, four O(1) or
    O(log n) commands per queue.  The oldest job is the one at the right end, taken
    next; it is parsed only to read its ``enqueued_at``.  On Redis Cluster: a round
    trip for TIME, then one per node, and a fifth command per queue, the LLEN of its
    dead-letter list (``QueueState.dead``)."""
    per = 5 if keys.cluster else 4
    pipe = r.pipeline(transaction=False)
    if not keys.cluster:
        pipe.time()
    for q in names:
        pipe.llen(keys.queue(q))
        pipe.lindex(keys.queue(q), -1)
        pipe.zcard(keys.scheduled(q))
        pipe.zrange(keys.scheduled(q), 0, 0, withscores=True)
        if keys.cluster:
            pipe.llen(keys.dead_of(q))
    out = pipe.execute(raise_on_error=False)
    wrong = [i for i, x in enumerate(out) if isinstance(x, Exception)]
    if any(not str(out[i]).startswith("WRONGTYPE") for i in wrong):
        raise next(out[i] for i in wrong if not str(out[i]).startswith("WRONGTYPE"))
    now = server_time(r) if keys.cluster else time_of(out.pop(0))
    broken = dict(wrong_types(r, keys, [k for q in names for k in (
        keys.queue(q), keys.scheduled(q), *([keys.dead_of(q)] if keys.cluster else []))]
        if wrong else []))
    out = [None if isinstance(x, Exception) else x for x in out]
    states = []
    for i, q in enumerate(names):
        depth, oldest, scheduled, first, *dead = out[per * i:per * (i + 1)]
        depth, scheduled, dead = depth or 0, scheduled or 0, [d or 0 for d in dead]
        first = first or []
        job = parse_object(oldest)
        enqueued = number(job.get("enqueued_at")) if job else None
        states.append(QueueState(q, depth, None if enqueued is None else max(0.0, now - enqueued),
                                 scheduled, first[0][1] - now if first else None, *dead))
        states[-1].unusable = {k: t for k, t in broken.items() if keys.kind_of(k)[1] == q}
    return now, states


def wrong_types(r: redis.Redis, keys: Keys, names: list[str]) -> list[tuple[str, str]]:
    """(key, type) of each of ``names`` that holds another type than redpool keeps there
    (another program wrote to it: keytypes.py): one round trip of TYPE."""
    pipe = r.pipeline(transaction=False)
    for k in names:
        pipe.type(k)
    out = []
    for k, t in zip(names, pipe.execute()):
        t = t.decode() if isinstance(t, bytes) else str(t)
        if t not in ("none", EXPECTED.get(keys.kind_of(k)[0])):
            out.append((k, t))
    return out


class DeadCounts:
    """Dead letters per queue.  The list is capped (--dead-max) but its entries hold
    whole jobs, so it is read again only when it changed: same length and same newest
    entry means same contents (entries are only pushed at the left and trimmed at the
    right, or removed by an operator, which changes the length).  On Redis Cluster it
    reads nothing: each queue's list is counted with the queue (read_queues)."""

    def __init__(self, limit: int = DEAD_SCAN_MAX) -> None:
        self.limit = limit
        self._seen: tuple[int, bytes | None] | None = None
        self.total = 0
        self.scanned = 0
        self.by_queue: Counter = Counter()

    def read(self, r: redis.Redis, keys: Keys) -> "DeadCounts":
        if keys.cluster:
            return self
        pipe = r.pipeline(transaction=True)
        pipe.llen(keys.dead)
        pipe.lindex(keys.dead, 0)
        seen = tuple(pipe.execute())
        if seen == self._seen:
            return self
        by_queue: Counter = Counter()
        scanned = 0
        while scanned < min(seen[0], self.limit):
            batch = r.lrange(keys.dead, scanned, min(scanned + CHUNK, self.limit) - 1)
            if not batch:
                break
            for raw in batch:
                entry = parse_object(raw)
                q = entry.get("queue") if entry else None
                by_queue[q if isinstance(q, str) else None] += 1
            scanned += len(batch)
        self._seen, self.total, self.scanned, self.by_queue = seen, seen[0], scanned, by_queue
        return self


# -- supervisors ----------------------------------------------------------------------------

@dataclass
class SupervisorState:
    name: str
    alive: bool                     # its lease key exists (False: expired, not yet reaped)
    host: str | None = None
    pid: int | None = None
    version: str | None = None
    queues: list[str] = field(default_factory=list)
    state: str | None = None        # running, draining
    concurrency: int | None = None
    inflight: int | None = None
    succeeded: int | None = None
    failed: int | None = None
    rate_1m: float | None = None    # jobs finished per second over its last minute
    uptime: float | None = None
    heartbeat_age: float | None = None  # seconds since it last renewed its lease
    unusable: list[dict] = field(default_factory=list)  # keys of the wrong type it found

    def to_dict(self) -> dict:
        return asdict(self)


def _int(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def _str(v: Any) -> str | None:
    return v if isinstance(v, str) else None


def supervisor_state(name: str, info_raw: bytes | None, pttl: int, now: float) -> SupervisorState:
    """A supervisor as its lease shows it (PTTL -2: the lease key is gone).  Fields an
    older (or newer) supervisor did not write, or wrote oddly, are None."""
    info = parse_object(info_raw) or {}
    s = SupervisorState(name=name, alive=pttl != -2)
    s.host, s.version, s.state = (_str(info.get(k)) for k in ("host", "version", "state"))
    s.pid, s.concurrency, s.inflight, s.succeeded, s.failed = (
        _int(info.get(k)) for k in ("pid", "concurrency", "inflight", "succeeded", "failed"))
    queues = info.get("queues")
    s.queues = [q for q in queues if isinstance(q, str)] if isinstance(queues, list) else []
    s.rate_1m = number(info.get("rate_1m"))
    found = info.get("unusable")
    s.unusable = [{k: _str(u.get(k)) for k in ("key", "type", "expected", "queue", "effect")}
                  for u in (found if isinstance(found, list) else []) if isinstance(u, dict)
                  and isinstance(u.get("key"), str)]
    started = number(info.get("started_at"))
    s.uptime = max(0.0, now - started) if started is not None and s.alive else None
    lease = number(info.get("lease"))
    beat = number(info.get("heartbeat_at"))
    if s.alive and lease is not None and pttl >= 0:
        s.heartbeat_age = max(0.0, lease - pttl / 1000)
    elif beat is not None:  # a supervisor of an older version, or an expired lease
        s.heartbeat_age = max(0.0, now - beat)
    return s


def read_supervisors(r: redis.Redis, keys: Keys, now: float) -> list[SupervisorState]:
    """Every registered supervisor, live or with an expired lease not yet reaped."""
    names = sorted(n.decode("utf-8", "replace") for n in r.smembers(keys.supervisors))
    pipe = r.pipeline(transaction=False)
    for n in names:
        pipe.hget(keys.supervisor(n), "info")
        pipe.pttl(keys.supervisor(n))
    out = pipe.execute(raise_on_error=False)  # (a lease of the wrong type: no info)
    for x in out:
        if isinstance(x, Exception) and not str(x).startswith("WRONGTYPE"):
            raise x
    out = [None if isinstance(x, Exception) else x for x in out]
    return [supervisor_state(n, out[2 * i], out[2 * i + 1], now) for i, n in enumerate(names)]


# -- one view of everything -----------------------------------------------------------------

@dataclass
class Snapshot:
    time: float                     # the Redis server's clock
    queues: list[QueueState]
    supervisors: list[SupervisorState]
    dead_total: int
    dead_scanned: int               # entries read to count dead letters per queue
    dead_unknown_queue: int         # of those, entries that name no queue
    unusable: list[dict] = field(default_factory=list)  # keys of the wrong type (keytypes.py)

    @property
    def throughput(self) -> float:
        """Jobs per second over the last minute, summed over live supervisors."""
        return sum(s.rate_1m or 0.0 for s in self.supervisors if s.alive)

    def to_dict(self) -> dict:
        return {"time": self.time, "throughput_1m": round(self.throughput, 3),
                "queues": [asdict(q) for q in self.queues],
                "supervisors": [s.to_dict() for s in self.supervisors],
                "dead": {"total": self.dead_total, "scanned": self.dead_scanned,
                         "unknown_queue": self.dead_unknown_queue},
                "unusable": self.unusable}


class Observer:
    """Reads Snapshots; keeps what is costly to read (the SCAN for queues, the dead
    counts) between reads, so that `status --watch` stays cheap."""

    def __init__(self, r: redis.Redis, keys: Keys, *, queues: list[str] | None = None,
                 rescan_every: float = 30.0, clock=time.monotonic) -> None:
        self.r = r
        self.keys = keys
        self.only = list(queues) if queues else None   # --queue: these, and no SCAN
        self.rescan_every = rescan_every
        self.clock = clock
        self.discovered: set[str] = set()
        self.scanned_at: float | None = None
        self.dead = DeadCounts()

    def queue_names(self, supervisors: list[SupervisorState], dead: DeadCounts) -> list[str]:
        """--queue if given; else every queue with a list or a scheduled set (SCAN, at
        most every ``rescan_every`` seconds), one a supervisor listens to, or one that
        dead letters name."""
        if self.only is not None:
            return self.only
        if self.scanned_at is None or self.clock() - self.scanned_at >= self.rescan_every:
            self.discovered = discover_queues(self.r, self.keys)
            self.scanned_at = self.clock()
        listened = {q for s in supervisors for q in s.queues}
        named = {q for q in dead.by_queue if q and not any(c.isspace() for c in q)}
        return sorted(self.discovered | listened | named)

    def read(self) -> Snapshot:
        k = self.keys
        wide = dict(wrong_types(self.r, k, [k.supervisors, k.reaper, k.dataset, *(
            [] if k.cluster else [k.crashes, k.dead])]))
        supervisors = [] if k.supervisors in wide else \
            read_supervisors(self.r, k, server_time(self.r))
        dead = DeadCounts() if not k.cluster and k.dead in wide else self.dead.read(self.r, k)
        now, queues = read_queues(self.r, k, self.queue_names(supervisors, dead))
        snap = Snapshot(now, queues, supervisors, dead.total, dead.scanned, dead.by_queue[None])
        if k.cluster:  # counted exactly, per queue (read_queues)
            snap.dead_total = snap.dead_scanned = sum(q.dead for q in queues)
        else:
            for q in queues:
                q.dead = dead.by_queue.get(q.name, 0)
        snap.unusable = unusable(k, wide, queues, supervisors)
        return snap


def unusable(keys: Keys, wide: dict, queues: list[QueueState],
             supervisors: list[SupervisorState]) -> list[dict]:
    """Every key of the wrong type: those seen here (namespace-wide keys, queue lists,
    scheduled sets) and those the supervisors report (their processing lists...), each
    with who saw it."""
    out: dict[str, dict] = {}
    for key, type_ in [*wide.items(), *(kv for q in queues for kv in q.unusable.items())]:
        out[key] = {**bad_key(keys, key, type_).to_dict(), "seen_by": ["status"]}
    for s in supervisors:
        for u in s.unusable:
            entry = out.setdefault(u["key"], {**u, "seen_by": []})
            entry["seen_by"].append(s.name)
    return list(out.values())
