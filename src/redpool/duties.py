"""The supervisor's periodic duties and its relation to Redis as a whole.

* the lease: register at start, renew every lease/3, and when it is found lost
  (this host was frozen or cut off for longer than the lease) re-register under a
  new epoch and reconcile, instead of resuming as if nothing happened;
* the reaper: once a second, one supervisor in the cluster puts the jobs of
  supervisors whose lease expired back at the head of their queues;
* promotion of due scheduled jobs (delayed jobs, retries) onto their queues;
* Redis health: one log line when Redis goes away and one when it is back, retries
  with capped backoff in between, and a reconcile after every outage (a reply lost
  with the connection may hide a script that did run).  Only a failure to reach Redis
  is an outage: a key of the wrong type is that key's (keytypes.py: said once, the
  rest served, looked at again every few seconds), and any other error reply is Redis
  refusing a command (said once, retried with backoff);
* Redis losing its data (restarted without persistence, flushed): found by the dataset
  markers (keys.dataset), said once, and the jobs this supervisor still holds put back
  into Redis rather than taken for jobs "taken back by a reaper".

Kept apart from the loop so that supervisor.py stays a to-do list.
"""

from __future__ import annotations

import math
import os
import socket
import time
from collections import Counter, deque
from typing import Any, Protocol

import redis

from . import __version__
from .config import WorkerConfig
from .dataset import DataLoss
from .errors import NameInUse
from .hooks import Hooks
from .health import BACKOFF_MAX, RedisHealth
from .keytypes import classify
from .lease import Lease, Reaper
from .queue import RedisQueue
from . import suspicion

REAP_EVERY = 1.0          # seconds between reaper rounds, cluster-wide
PROMOTE_EVERY = 0.5       # the longest a due scheduled job waits to be promoted
HEARTBEAT_EVERY = 1.0     # the "heartbeat" event: the loop is alive (systemd's watchdog, status)
HELD_MAX = 1000           # completions a key of the wrong type holds back before we stop reserving


class Loop(Protocol):
    """What the duties use of the loop that binds them (supervisor.Supervisor, named by
    what it offers rather than imported: it imports this module, and the arrow runs
    one way).  Its counts and holdings, for info() and for reconciling with Redis;
    flush() at shutdown; its lifecycle, to put back what it holds or to stop."""
    state: str
    stats: dict[str, int]
    pool: Any
    waiter: Any
    lifecycle: Any
    inflight: dict
    backlog: deque
    pending: list

    def flush(self, now: float) -> None: ...
    def receive(self, taken: list) -> None: ...
    def held(self, *, cut: bool = False) -> Counter: ...
    def snapshot(self, now: float) -> dict: ...


class Duties(DataLoss, RedisHealth):
    def __init__(self, cfg: WorkerConfig, rq: RedisQueue, lease: Lease, reaper: Reaper,
                 hooks: Hooks, clock=time.monotonic) -> None:
        self.cfg = cfg
        self.rq = rq
        self.lease = lease
        self.reaper = reaper
        self.hooks = hooks
        self.clock = clock
        self.sup: Loop | None = None
        self.started = time.time()
        self.leased = False
        self.name_lost = False
        self.nothing_scheduled = False
        self.outage = None                # an outage in progress (outage.py)
        self.retry_at = 0.0
        self._backoff = 0.0
        self.moving_since: float | None = None  # a Cluster slot of ours moving (health.py)
        self.moving_last = 0.0
        self._moving_backoff = 0.0
        self.next_renew = self.next_reap = self.next_promote = self.next_heartbeat = 0.0
        self.reap_not_before = 0.0
        self.reconcile_pending = False
        self._finished_history: list[tuple[float, int]] = []  # (clock, jobs finished): rate_1m
        self.markers: dict[str, bytes] | None = None  # the dataset markers as we last saw them
        self.run_ids: dict[str, str] = {}             # the servers' run_id as we last saw them
        self.data_lost_during: str | None = None      # a loss found, not yet fully handled
        self.lost_counts: dict[str, int] = {}         # what we held when it was found
        self.dropped = 0   # completions that found their job gone, not yet judged
        self.renewed_at = -math.inf  # (clock) our lease last registered or renewed
        self.begun = False                # registered and recovered (start(), or later)
        self.refusals: dict[str, str] = {}  # where Redis refused a command -> its error
        self.duties_at = 0.0              # duties Redis refused wait until then
        self._duty_backoff = 0.0
        self.probe_at: float | None = None  # a WRONGTYPE named no key: ask every key's type
        self.recheck_at = 0.0             # next look at the keys of the wrong type
        self.fixed: list = []             # keys of the wrong type fixed, not yet acted on
        rq.unusable.emit = hooks.emit

    def bind(self, sup: Loop) -> None:
        self.sup = sup

    @property
    def epoch(self) -> str:
        return self.lease.epoch

    def info(self) -> dict:
        """What `redpool status` shows of this supervisor, written into the lease at
        registration and at every renewal (lease/3), which is therefore its heartbeat.

        ``rate_1m`` is jobs finished (succeeded or failed) per second over the last
        minute, from the counts at each call: a few dozen (time, count) pairs at most,
        no timer of its own.  Until a minute has passed it is the rate since start."""
        s = self.sup
        now = self.clock()
        finished = s.stats["succeeded"] + s.stats["failed"] if s else 0
        history = self._finished_history
        history.append((now, finished))
        while len(history) > 2 and history[1][0] <= now - 60.0:
            history.pop(0)  # keep one sample at least a minute old, as the baseline
        since, before = history[0]
        return {"name": self.cfg.name, "host": socket.gethostname(), "pid": os.getpid(),
                "version": __version__, "queues": self.cfg.queues,
                "concurrency": s.pool.size if s else self.cfg.concurrency,
                "started_at": self.started,
                "inflight": len(s.inflight) if s else 0,
                "succeeded": s.stats["succeeded"] if s else 0,
                "failed": s.stats["failed"] if s else 0,
                "retried": s.stats["retrying"] if s else 0,
                "dead": s.stats["dead"] if s else 0,
                "state": s.state if s else "starting",
                "heartbeat_at": time.time(), "lease": self.cfg.lease,
                "rate_1m": round((finished - before) / (now - since), 3) if now > since else 0.0,
                # keys of the wrong type (keytypes.py), only when there are some: the
                # started line and the heartbeat say nothing of them otherwise
                **({"unusable": self.rq.unusable.to_info()} if self.rq.unusable.bad else {})}

    # -- start and stop ----------------------------------------------------------------------

    @property
    def may_reserve(self) -> bool:
        """Our lease holds, no namespace-wide key is of the wrong type, and not too
        many completions wait for one (keytypes.py)."""
        rq = self.rq
        return self.leased and not rq.unusable.paused and len(rq.holding()) < HELD_MAX

    def start(self, now: float) -> None:
        """Look at the type of every key we use first (one round trip): a key another
        program wrote to is said, and passed over, before anything touches it.  One
        the guarantees rest on (our lease, the crash counts...) defers the rest until
        it is fixed (tick())."""
        self.next_renew = now + self.cfg.lease / 3
        self.next_reap = now + REAP_EVERY
        self.next_promote = now
        self.next_heartbeat = now + HEARTBEAT_EVERY
        self.check_types(now, probe=True)
        if not self.rq.unusable.paused:
            try:
                self.begin(now)
            except redis.RedisError as e:
                if classify(e) == "down":
                    raise
                self.redis_failed(e, now, "start")  # (a key broken since: later)

    def begin(self, now: float) -> None:
        """Register (NameInUse propagates), put back what a run of ours left, claim
        the dataset markers."""
        self.lease.register(self.info(), self.cfg.lease)
        self.renewed_at = now
        self.leased = self.begun = True
        # Jobs left under our name were held by a run of ours that died: each counts
        # as a crash (a job that keeps killing its host ends as a poison pill).
        moved = self.rq.recover(crashed=True)
        if moved:
            self.hooks.emit("recovered", jobs=moved)
        self.markers = self.rq.claim_markers()
        self.run_ids = self.rq.run_ids()
        self.check_persistence()
        self.next_renew = now + self.cfg.lease / 3

    def shutdown(self) -> None:
        """Acknowledge what finished, put everything else back, give the name back."""
        if self.name_lost or not self.begun:  # another supervisor has our name (its lists
            return                            # are not ours), or we never took any job
        s = self.sup
        try:
            self.apply_fixes()  # (a fixed processing list first gets its jobs back)
            for _ in range(2):  # again if Redis turned out to have lost the jobs: restored
                if s is not None and (s.pending or self.rq.unsent):
                    self.retry_at = 0.0
                    s.flush(self.clock())
            moved = self.rq.recover(crashed=False)
            if s is not None:
                s.stats["requeued"] += sum(moved.values()) + self.rescue_overwritten()
            self.lease.unregister()
        except redis.RedisError as e:
            self.hooks.emit("shutdown_redis_error", error=str(e),
                            note="unfinished jobs stay in our processing lists: a reaper puts "
                                 "them back when our lease expires, or we do at the next start")

    # -- the periodic duties -----------------------------------------------------------------

    def next_due(self, now: float) -> float:
        # nothing is done before a Redis call waiting out its backoff may be retried
        due = min(self.next_renew, self.next_reap, self.next_promote)
        if self.rq.unusable.paused:
            # reaping and promoting (and, before we are registered, everything) wait for
            # the keys of the wrong type: overdue meanwhile, they are not what is due, the
            # next look at those keys is (else the loop would spin: found in review)
            due = min(self.next_renew if self.begun else math.inf, max(self.recheck_at, now))
            if self.probe_at is not None:
                due = min(due, max(self.probe_at, now))
        if self.reconcile_pending:  # waiting for the waiters' BLMOVE calls to return
            due = min(due, now + 0.05)
        return min(max(due, self.retry_at), self.next_heartbeat)

    def tick(self, now: float) -> None:
        if now >= self.next_heartbeat:
            # Emitted by the loop itself, Redis or not: proof that it is turning (systemd's
            # watchdog is fed from this), with a snapshot for observers (status, metrics).
            self.next_heartbeat = now + HEARTBEAT_EVERY
            self.hooks.emit("heartbeat", **self.sup.snapshot(now))
        if not self.redis_ready(now) or now < self.duties_at:
            return
        paused = self.rq.unusable.paused
        try:
            if self.probe_at is not None and now >= self.probe_at or \
                    self.rq.unusable and now >= self.recheck_at:
                self.check_types(now, probe=self.probe_at is not None)
                paused = self.rq.unusable.paused
            elif self.fixed:
                self.apply_fixes()
            if not self.begun:
                if not paused:
                    self.begin_late(now)
                return
            if self.data_lost_during is not None:
                self.data_lost(now, self.data_lost_during)
            if not self.leased and not self.name_lost and not paused:
                self.reregister(now)
            if (self.reconcile_pending or self.rq.suspect) and not self.rq.partial:
                seen = suspicion.mark(self.rq)  # (a waiter may raise it meanwhile: kept)
                self.reconcile()  # (partial: a Redis Cluster node hangs; once it answers)
                suspicion.lower(self.rq, seen)  # (after it: one that failed is tried again)
            if now >= self.next_renew:
                self.next_renew = now + self.cfg.lease / 3
                if self.lease.renew(self.info(), self.cfg.lease):
                    self.renewed_at = now
                else:
                    self.lease_lost(now, "renew")
            if now >= self.next_reap and not paused:
                self.next_reap = now + REAP_EVERY
                if now >= self.reap_not_before and self.rq.unusable.reaping:
                    for name, jobs in self.reaper.run(lock_seconds=REAP_EVERY,
                                                      wrongtype=self.rq.unusable.add).items():
                        self.hooks.emit("reaped", supervisor=name, jobs=jobs)
            if now >= self.next_promote and not paused:
                moved, until_next = self.rq.promote()
                self.nothing_scheduled = until_next is None
                self.next_promote = now + min(PROMOTE_EVERY, until_next if until_next is not None
                                              else PROMOTE_EVERY)
                if moved:
                    self.hooks.emit("promoted", jobs=moved)
        except redis.RedisError as e:
            self.redis_failed(e, now, "duties")
            return
        self.redis_ok(now, "duties")

    # -- the lease ---------------------------------------------------------------------------

    def lease_lost(self, now: float, during: str) -> None:
        """Our lease expired: to the cluster we were dead, and a reaper may have taken
        our jobs back.  Results for those are not written (complete.lua finds them gone);
        jobs we reserved but had not started go back; we re-register under a new epoch.
        Unless the server lost its data: then nobody took our jobs, they are gone."""
        try:
            if self.check_dataset(now, during):
                return
        except redis.RedisError as e:
            self.redis_failed(e, now, "dataset")
            return
        self.leased = False
        self.hooks.emit("lease_lost", during=during, lease=self.cfg.lease,
                        note="this supervisor was frozen or cut off for longer than its "
                             "lease; jobs taken back by a reaper ran elsewhere")
        self.sup.lifecycle.requeue_backlog(now)
        try:
            self.reregister(now)
        except redis.RedisError as e:
            self.redis_failed(e, now, "register")

    def reregister(self, now: float) -> None:
        """Claim our name again under a new epoch (Redis errors propagate: retried on a
        later tick, since ``leased`` stays False and nothing is reserved meanwhile)."""
        try:
            self.lease.register(self.info(), self.cfg.lease)
        except NameInUse as e:
            self.name_lost = True
            self.hooks.emit("name_taken", error=str(e))
            self.sup.lifecycle.stop_now()
            return
        self.leased = True
        self.renewed_at = now
        self.next_renew = now + self.cfg.lease / 3
        self.hooks.emit("reregistered", epoch=self.lease.epoch)
        self.reconcile()

    def reconcile(self) -> None:
        """Make our processing lists hold exactly what we hold.  A script whose reply
        was lost may have reserved jobs we never heard of: they go back to the head of
        their queues (anything we hold that Redis lost is fenced at completion)."""
        s = self.sup
        if self.rq.partial:  # a Redis Cluster node hangs (breaker.py): it needs them all
            self.rq.suspect = True  # (the tick reconciles once it answers)
            return
        if s.waiter is not None:
            # A BLMOVE in flight may be moving a job into our list right now: it would
            # look like a stray and be put back while we run it.  Wait until none is.
            s.waiter.disarm()
            if s.waiter.busy():
                self.reconcile_pending = True
                return
            s.receive(s.waiter.take())
        self.reconcile_pending = False
        self.rq.settle()
        # (a job far over --max-payload, held and in Redis, as its head: Oversized, which
        # compares by its hash; a stray such goes back by hash: oversized.py)
        held = s.held(cut=True)
        extra: list[tuple[str, bytes]] = []
        for queue, raws in self.rq.processing_contents().items():
            for raw, n in Counter(raws).items():
                surplus = n - held.get((queue, raw), 0)
                extra += [(queue, raw)] * max(0, surplus)
        if extra:
            moved = self.rq.requeue(extra)
            self.hooks.emit("reconciled", requeued=moved)
