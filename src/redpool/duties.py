"""The supervisor's periodic duties and its relation to Redis as a whole.

* the lease: register at start, renew every lease/3, and when it is found lost
  (this host was frozen or cut off for longer than the lease) re-register under a
  new epoch and reconcile, instead of resuming as if nothing happened;
* the reaper: once a second, one supervisor in the cluster puts the jobs of
  supervisors whose lease expired back at the head of their queues;
* promotion of due scheduled jobs (delayed jobs, retries) onto their queues;
* Redis health: one log line when Redis goes away and one when it is back, retries
  with capped backoff in between, and a reconcile after every outage (a reply lost
  with the connection may hide a script that did run);
* Redis losing its data (restarted without persistence, flushed): found by the dataset
  markers (keys.dataset), said once, and the jobs this supervisor still holds put back
  into Redis rather than taken for jobs "taken back by a reaper".

Kept apart from the loop so that supervisor.py stays a to-do list.
"""

from __future__ import annotations

import os
import socket
import time
from collections import Counter
from typing import TYPE_CHECKING

import redis

from . import __version__
from .config import WorkerConfig
from .dataset import DataLoss
from .errors import NameInUse
from .hooks import Hooks
from .lease import Lease, Reaper
from .queue import RedisQueue

if TYPE_CHECKING:
    from .supervisor import Supervisor

REAP_EVERY = 1.0          # seconds between reaper rounds, cluster-wide
PROMOTE_EVERY = 0.5       # the longest a due scheduled job waits to be promoted
BACKOFF_MAX = 2.0         # Redis retry backoff cap: back within ~2 s of Redis returning
HEARTBEAT_EVERY = 1.0     # the "heartbeat" event: the loop is alive (systemd's watchdog, status)


class Duties(DataLoss):
    def __init__(self, cfg: WorkerConfig, rq: RedisQueue, lease: Lease, reaper: Reaper,
                 hooks: Hooks, clock=time.monotonic) -> None:
        self.cfg = cfg
        self.rq = rq
        self.lease = lease
        self.reaper = reaper
        self.hooks = hooks
        self.clock = clock
        self.sup: Supervisor | None = None
        self.started = time.time()
        self.leased = False
        self.name_lost = False
        self.nothing_scheduled = False
        self.redis_down = False
        self.retry_at = 0.0
        self._backoff = 0.0
        self.next_renew = self.next_reap = self.next_promote = self.next_heartbeat = 0.0
        self.reap_not_before = 0.0
        self.reconcile_pending = False
        self._finished_history: list[tuple[float, int]] = []  # (clock, jobs finished): rate_1m
        self.markers: dict[str, bytes] | None = None  # the dataset markers as we last saw them
        self.run_ids: dict[str, str] = {}             # the servers' run_id as we last saw them
        self.data_lost_during: str | None = None      # a loss found, not yet fully handled
        self.lost_counts: dict[str, int] = {}         # what we held when it was found
        self.dropped = 0   # completions that found their job gone, not yet judged

    def bind(self, sup: Supervisor) -> None:
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
                "rate_1m": round((finished - before) / (now - since), 3) if now > since else 0.0}

    # -- start and stop ----------------------------------------------------------------------

    def start(self, now: float) -> None:
        self.lease.register(self.info(), self.cfg.lease)
        self.leased = True
        # Jobs left under our name were held by a run of ours that died: each counts
        # as a crash (a job that keeps killing its host ends as a poison pill).
        moved = self.rq.recover(crashed=True)
        if moved:
            self.hooks.emit("recovered", jobs=moved)
        self.markers = self.rq.claim_markers()
        self.run_ids = self.rq.run_ids()
        self.check_persistence()
        self.next_renew = now + self.cfg.lease / 3
        self.next_reap = now + REAP_EVERY
        self.next_promote = now
        self.next_heartbeat = now + HEARTBEAT_EVERY

    def shutdown(self) -> None:
        """Acknowledge what finished, put everything else back, give the name back."""
        if self.name_lost:  # another supervisor has our name: its lists are not ours
            return
        s = self.sup
        try:
            for _ in range(2):  # again if Redis turned out to have lost the jobs: restored
                if s is not None and (s.pending or self.rq.unsent):
                    self.retry_at = 0.0
                    s.flush(self.clock())
            moved = self.rq.recover(crashed=False)
            if s is not None:
                s.stats["requeued"] += sum(moved.values())
            self.lease.unregister()
        except redis.RedisError as e:
            self.hooks.emit("shutdown_redis_error", error=str(e),
                            note="unfinished jobs stay in our processing lists: a reaper puts "
                                 "them back when our lease expires, or we do at the next start")

    # -- the periodic duties -----------------------------------------------------------------

    def next_due(self, now: float) -> float:
        # nothing is done before a Redis call waiting out its backoff may be retried
        due = min(self.next_renew, self.next_reap, self.next_promote)
        if self.reconcile_pending:  # waiting for the waiters' BLMOVE calls to return
            due = min(due, now + 0.05)
        return min(max(due, self.retry_at), self.next_heartbeat)

    def tick(self, now: float) -> None:
        if now >= self.next_heartbeat:
            # Emitted by the loop itself, Redis or not: proof that it is turning (systemd's
            # watchdog is fed from this), with a snapshot for observers (status, metrics).
            self.next_heartbeat = now + HEARTBEAT_EVERY
            self.hooks.emit("heartbeat", **self.sup.snapshot(now))
        if not self.redis_ready(now):
            return
        try:
            if self.data_lost_during is not None:
                self.data_lost(now, self.data_lost_during)
            if not self.leased and not self.name_lost:
                self.reregister(now)
            if self.reconcile_pending or self.rq.suspect:
                self.reconcile()
                self.rq.suspect = False  # (after it: one that failed is tried again)
            if now >= self.next_renew:
                self.next_renew = now + self.cfg.lease / 3
                if not self.lease.renew(self.info(), self.cfg.lease):
                    self.lease_lost(now, "renew")
            if now >= self.next_reap:
                self.next_reap = now + REAP_EVERY
                if now >= self.reap_not_before:
                    for name, jobs in self.reaper.run(lock_seconds=REAP_EVERY).items():
                        self.hooks.emit("reaped", supervisor=name, jobs=jobs)
            if now >= self.next_promote:
                moved, until_next = self.rq.promote()
                self.nothing_scheduled = until_next is None
                self.next_promote = now + min(PROMOTE_EVERY, until_next if until_next is not None
                                              else PROMOTE_EVERY)
                if moved:
                    self.hooks.emit("promoted", jobs=moved)
        except redis.RedisError as e:
            self.redis_failed(e, now, "duties")
            return
        self.redis_ok(now)

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
        self.sup.requeue_backlog(now)
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
            self.sup.stop_now()
            return
        self.leased = True
        self.next_renew = now + self.cfg.lease / 3
        self.hooks.emit("reregistered", epoch=self.lease.epoch)
        self.reconcile()

    # -- Redis health ------------------------------------------------------------------------

    def redis_ready(self, now: float) -> bool:
        return now >= self.retry_at

    def redis_failed(self, e: BaseException, now: float, during: str) -> None:
        self._backoff = min(BACKOFF_MAX, max(0.05, self._backoff * 2))
        self.retry_at = now + self._backoff
        if not self.redis_down:
            self.redis_down = True
            self.hooks.emit("redis_down", error=str(e), during=during)

    def redis_ok(self, now: float) -> None:
        if not self.redis_down:
            self._backoff = 0.0
            return
        self.redis_down = False
        self.hooks.emit("redis_up")
        self.next_renew = now  # renew first thing; others need a moment to renew theirs
        self.reap_not_before = now + self.cfg.lease / 3 + BACKOFF_MAX + 1.0
        try:
            if not self.check_dataset(now, "outage"):  # (a server back empty: first of all)
                self.report_dropped()
            self.reconcile()
        except redis.RedisError as e:
            # (the backoff goes on growing: a reconcile that keeps failing while other
            # calls succeed -- a Redis Cluster node away -- must not spin)
            self.redis_failed(e, now, "reconcile")
            return
        self._backoff = 0.0

    def reconcile(self) -> None:
        """Make our processing lists hold exactly what we hold.  A script whose reply
        was lost may have reserved jobs we never heard of: they go back to the head of
        their queues (anything we hold that Redis lost is fenced at completion)."""
        s = self.sup
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
        held = s.held()
        extra: list[tuple[str, bytes]] = []
        for queue, raws in self.rq.processing_contents().items():
            for raw, n in Counter(raws).items():
                surplus = n - held.get((queue, raw), 0)
                extra += [(queue, raw)] * max(0, surplus)
        if extra:
            moved = self.rq.requeue(extra)
            self.hooks.emit("reconciled", requeued=moved)
