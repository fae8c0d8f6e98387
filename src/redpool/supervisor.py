"""The loop.  Glue only: Redis through RedisQueue and Lease, processes through ProcessPool.

One iteration, ``tick(ready, now)``, reads like a to-do list:

1. act on recorded signals (handlers only record),
2. collect what children finished, how they died, which jobs overran their timeout,
3. acknowledge finished jobs in one script call,
4. hand work to idle children (failures to settle first, then reserved jobs),
5. reserve more when there is room, or arm the blocking waiters when queues are empty,
6. periodic duties: renew the lease, reap dead supervisors, promote due jobs.

Between iterations the loop sleeps in one ``poll()`` on every child pipe and pidfd,
the signal pipe and the waiter pipe, until the next deadline: it never polls and never
blocks on a single job, nor on a child (pool.py).
"""

from __future__ import annotations

import time
from collections import Counter, deque
from itertools import count

import redis

from . import protocol as p
from .child import FLUSH_SECONDS, RETURN_AFTER_SECONDS, encode_batch, fail_entry, job_entry
from .config import WorkerConfig
from .duties import Duties
from .hooks import Hooks
from .lifecycle import DRAINING, RUNNING, STOPPED, Lifecycle
from .outcomes import ChildEvents, job_names
from .poller import Poller
from .pool import ProcessPool
from .completion import Completion
from .queue import Oversized, RedisQueue, Reserved
from .signals import SignalInbox
from .waiter import Waiter
from .work import Work

# Short jobs are handed to a child in batches worth about BATCH_SECONDS of work (one
# pipe message instead of one per job); long jobs one at a time, so that no host
# holds more than a few milliseconds of work per process beyond what it is running.
BATCH_SECONDS = 0.005
MAX_BATCH = 64
# Jobs shorter than this are double-buffered: each child holds the next one, so it
# never waits for the supervisor between jobs (for a 10 ms job that wait is ~2%).
# Longer jobs go one at a time: a host must not sit on a long job another could run.
DOUBLE_BUFFER_BELOW = 0.1
# A child gives back the jobs it holds and has not started once its batch has run
# past RETURN_AFTER_SECONDS, or this many average jobs if that is longer: a long job
# among short ones has nothing waiting behind it, while jobs of 20-100 ms, which the
# child holds two at a time, keep their next one at hand.
RETURN_AFTER_JOBS = 4
# Under a backlog (every child holds its next job), acknowledgements of such jobs may
# wait up to one job time, at most ACK_DELAY, to share a round trip: fewer wake-ups of
# the supervisor and of Redis per job, CPU the jobs get back (measured at 10 ms jobs on
# 2 cores: supervisor 430 -> 361 us and Redis 170 -> 99 us of CPU per job).  A result
# waited for then arrives up to that much later, behind a backlog that delays it far
# more; an idle worker (a child with nothing queued behind its job) acknowledges at
# once.  Jobs shorter than FLUSH_SECONDS need none of this: their answers already come
# together from the child.
ACK_DELAY = 0.01


class Supervisor:
    def __init__(self, cfg: WorkerConfig, rq: RedisQueue, pool: ProcessPool, duties: Duties, *,
                 waiter: Waiter | None = None, inbox: SignalInbox | None = None,
                 hooks: Hooks | None = None, clock=time.monotonic) -> None:
        self.cfg = cfg
        self.rq = rq
        self.pool = pool
        self.duties = duties
        self.waiter = waiter
        self.inbox = inbox
        self.hooks = hooks or Hooks()
        self.clock = clock
        self.state = RUNNING
        self.backlog: deque[Work] = deque()        # held, not yet started
        self.inflight: dict[int, Work] = {}        # token -> work a child runs
        self.pending: list[Completion] = []        # finished, not yet acknowledged
        self.ack_due = 0.0                         # when the oldest pending one must go
        self._tokens = count(1)
        self.avg_duration = 0.0                    # moving average of job run times
        self.drain_deadline = 0.0
        self.put_back: Counter = Counter()         # (queue, raw) requeued since the drain began
        self.poller = Poller()
        self.reloading = False                     # SIGHUP: a new generation is taking over
        self.woken = False                         # this tick, the waiters brought jobs
        self.gave_back = False                     # a child gave back jobs; it still runs long
        self.answer_now = False                    # refused unread: acknowledge next tick
        self.stats = {"succeeded": 0, "failed": 0, "retrying": 0, "dead": 0, "crashed": 0,
                      "timed_out": 0, "requeued": 0}
        # job_started (debug) costs a decode of every job, which the loop otherwise never
        # does (it only moves bytes): it is emitted only when the log listens at debug.
        self.announce_starts = cfg.log_level == "debug"
        self.events = ChildEvents(self)            # what children said, and their deaths
        self.lifecycle = Lifecycle(self)           # signals, draining, stopping
        duties.bind(self)

    # -- the outer loop ----------------------------------------------------------------------

    def run(self) -> None:
        """Run until told to stop (or, with --burst, until the queues are empty)."""
        try:
            self.startup()
            self.tick([])  # take what is already queued without waiting for a wake-up
            while self.state != STOPPED:
                ready = self.poller.wait(self.waitables(), self.wait_timeout(self.clock()),
                                         self.pool.writing())
                self.tick(ready)
        finally:
            self.lifecycle.shutdown()

    def startup(self) -> None:
        self.duties.start(self.clock())
        self.pool.start()
        if self.waiter is not None:
            self.waiter.start()
        self.hooks.emit("started", **self.duties.info())

    def waitables(self) -> list:
        objs = self.pool.waitables()
        if self.inbox is not None:
            objs.append(self.inbox.fileno())
        if self.waiter is not None:
            objs.append(self.waiter.fileno())
        return objs

    def wait_timeout(self, now: float) -> float:
        if self.answer_now:  # (a job refused in an exchange: its answer goes at once)
            return 0.0
        deadlines = [self.duties.next_due(now)]
        if self.state == DRAINING:
            deadlines.append(self.drain_deadline)
        for _, w in self.events.running():
            deadlines.append(min(w.deadline, w.kill_at))
        if self.pending and self.ack_due > now:
            deadlines.append(self.ack_due)
        # (the pool's own clock: see ProcessPool.check_at; math.inf when all is well)
        deadlines.append(now + max(0.0, self.pool.check_at - time.monotonic()))
        if self.state == RUNNING and len(self.pool.children) < self.pool.size \
                and self.pool.next_spawn_at > now:
            deadlines.append(self.pool.next_spawn_at)
        return max(0.0, min(deadlines) - now)

    # -- one iteration -----------------------------------------------------------------------

    def tick(self, ready: list, now: float | None = None) -> None:
        now = self.clock() if now is None else now
        if self.inbox is not None:
            self.lifecycle.take_signals(ready, now)
        for ev in self.pool.poll(ready):
            self.events.handle_event(ev, now)
        self.events.enforce_timeouts(now)
        self.woken = False
        if self.waiter is not None:
            taken = self.waiter.take(pipe=self.waiter.fileno() in ready)
            self.woken = bool(taken)
            self.receive(taken)
            while self.waiter.errors:
                self.duties.redis_failed(self.waiter.errors.popleft(), now, "wait")
        if self.state == DRAINING:
            self.flush(now)
            self.dispatch(settle_only=True)
            self.lifecycle.tick_draining(now)
        elif self.state == RUNNING:
            self.pool.reconcile(now)
            if self.reloading and not self.pool.reloading:
                self.reloading = False
                self.hooks.emit("reloaded", generation=self.pool.generation)
            self.dispatch()
            if self.gave_back:
                self.shed(now)
            self.exchange(now)
        else:
            self.flush(now)
        if self.state != STOPPED:
            self.duties.tick(now)

    def flush(self, now: float) -> None:
        """Acknowledge every finished job in one round trip."""
        self.answer_now = False
        if not (self.pending or self.rq.unsent) or not self.duties.redis_ready(now):
            return
        try:
            missing, skipped = self.rq.complete(self.pending)
        except redis.RedisError as e:
            self.duties.redis_failed(e, now, "complete")
            return
        self.acknowledged(missing, skipped, now)
        self.duties.redis_ok(now, "complete")

    def acknowledged(self, missing: int, skipped: int, now: float) -> None:
        """The pending completions reached Redis (all of them: one script).  Those that
        found their job gone from our processing list are judged by the duties: fenced
        (a reaper took them), or lost with the server's data (restored, sent again)."""
        self.pending.clear()
        self.ack_due = 0.0
        if missing:
            self.duties.judge_missing(now, missing)
        if skipped:
            self.hooks.emit("replies_skipped", count=skipped,
                            reason="reply_to names a key that is not a list, or one this "
                            "worker's ACL user may not write: grant its --reply-to patterns "
                            "(redpool acl worker --reply-to ...)")

    def batch_size(self) -> int:
        if self.avg_duration <= 0:
            return 1  # nothing known yet: one at a time
        if self.avg_duration >= DOUBLE_BUFFER_BELOW:
            return 1
        return max(2, min(MAX_BATCH, int(BATCH_SECONDS / self.avg_duration)))

    def wall(self, t: float, now: float) -> float:
        """Unix time of ``t`` on the loop's clock (monotonic), ``now`` being the same
        clock's present: for envelopes of runs the supervisor stopped."""
        return time.time() - (now - t)

    def started(self, w: Work, now: float, pid: int) -> None:
        """``w`` starts running now, in child ``pid``: its timeout starts counting.  (For
        a job in a batch, "now" is when the answer of the one before it arrived.)"""
        w.started = now
        if w.fail is None:
            if self.cfg.timeout > 0:
                w.deadline = now + self.cfg.timeout
            if self.announce_starts:
                self.announce(w, pid)

    def announce(self, w: Work, pid: int) -> None:
        """job_started, once per run (debug only: see announce_starts).  A job of a batch
        whose answer came with the one before it is announced with its answer."""
        if not w.announced and w.fail is None:
            w.announced = True
            self.hooks.emit("job_started", **job_names(w.raw), queue=w.queue, pid=pid)

    def dispatch(self, settle_only: bool = False) -> None:
        """Hand out held work: a child gets a batch when it has room for at least half
        a batch (so messages stay large), topped up before it runs dry."""
        k = self.batch_size()
        return_after = max(RETURN_AFTER_SECONDS, RETURN_AFTER_JOBS * self.avg_duration)
        # the children holding least first: an idle child gets work before a busy one
        # gets more to hold (jobs that trickle in one by one are spread, not stacked)
        for c in sorted(self.pool.accepting(), key=lambda c: len(c.tokens)):
            room = self.room(c, k)
            if not self.backlog or room <= 0 or (c.tokens and room < max(1, k // 2)):
                continue
            entries, tokens, now = [], [], self.clock()
            while self.backlog and len(tokens) < room:
                if settle_only and self.backlog[0].fail is None:
                    break
                w = self.backlog.popleft()
                token = next(self._tokens) & 0xFFFFFFFF
                if not c.tokens and not tokens:
                    self.started(w, now, c.pid)
                if w.fail is None:
                    entries.append(job_entry(token, w.queue, w.raw, w.crashes))
                else:
                    f = w.fail
                    entries.append(fail_entry(token, w.queue, w.raw, w.crashes, f["error_type"],
                                              f["message"], retry=f["retry"], dead=f["dead"],
                                              started_at=f.get("started_at"), ran=f.get("ran")))
                tokens.append(token)
                self.inflight[token] = w
            if tokens:
                self.pool.send(c, tokens, encode_batch(entries, return_after))

    def want(self) -> int:
        """How many jobs to reserve: room in the children's batches, plus the prefetch
        allowance (in batches), less what is already held."""
        k = self.batch_size()
        room = sum(max(0, self.room(c, k)) for c in self.pool.accepting())
        return room + self.cfg.prefetch * k - len(self.backlog)

    def room(self, c, k: int) -> int:
        """How many more jobs child ``c`` may be handed: up to a batch of ``k`` held,
        and no more than it has left to run under --max-jobs-per-child; none while it
        runs a job so long that it gave back the others."""
        if c.stalled:
            return 0
        room = k - len(c.tokens)
        if self.cfg.max_jobs_per_child:
            room = min(room, self.cfg.max_jobs_per_child - c.jobs_done - len(c.tokens))
        return room

    def exchange(self, now: float) -> None:
        """Acknowledge what finished and reserve more in one round trip; when the
        queues run dry, let the waiters block in Redis for the next job."""
        self.answer_now = False
        if self.ack_can_wait(now):
            return
        if self.woken and len(self.rq.queues) == 1 and not self.pending \
                and self.duties.may_reserve and not self.duties.reconcile_pending \
                and self.duties.redis_ready(now) and self.want() > 0:
            # A waiter has just brought a job from an empty queue.  More may follow, but
            # asking for them here would hold this job's answer up by a round trip (the
            # loop would be waiting on Redis when the answer comes).  The waiter asks
            # instead, from its thread (BLMOVE returns at once if a job is waiting); the
            # next acknowledgement reserves in batches, as ever.  With several queues
            # the reserve stays here: one waiter per queue would take from each in turn,
            # and only reserve.lua honours their priority.
            self.waiter.arm()
            return
        ready = self.duties.redis_ready(now)
        done = self.pending if ready else []
        n = self.want() if ready and self.duties.may_reserve else 0
        if not done and n <= 0 and not (ready and self.rq.unsent):
            if self.waiter is not None:
                self.waiter.disarm()
            return
        epoch = self.duties.epoch
        try:
            missing, skipped, got = self.rq.exchange(done, n, epoch)
        except redis.RedisError as e:
            self.duties.redis_failed(e, now, "exchange")
            return
        self.acknowledged(missing, skipped, now)
        if got is None:
            self.duties.redis_ok(now, "exchange")
            if self.duties.epoch == epoch:  # (else: registered anew since, data lost)
                self.duties.lease_lost(now, "reserve")
            return
        # held before redis_ok(): after an outage it reconciles, and must see these as ours
        self.hold(got)
        self.duties.redis_ok(now, "exchange")
        self.dispatch()
        if n <= 0:
            return
        empty = len(got) < n
        if empty and self.cfg.burst and not self.backlog and not self.inflight \
                and not self.pending and self.duties.nothing_scheduled and not (
                    self.rq.unsent or self.rq.partial or self.rq.passed_over):
            # (not while a Redis Cluster node is away or hangs: its queues are not seen
            # empty, and its acknowledgements wait)
            self.hooks.emit("burst_done")
            self.state = STOPPED
        elif self.waiter is not None:
            if empty and not self.duties.reconcile_pending:
                self.waiter.arm()
            else:
                self.waiter.disarm()

    def shed(self, now: float) -> None:
        """Jobs a child gave back because its job runs long, that no other child could
        take: beyond what --prefetch allows, they go back to the head of their queues,
        so that another host can run them rather than this one holding them until a
        process is free.  Only while such a child runs on: otherwise what is held was
        reserved within the allowance, and sizing it again as batch sizes drift would
        cost round trips for nothing."""
        surplus = -self.want()
        if surplus > 0:
            self.lifecycle.requeue_backlog(now, keep=sum(w.fail is None for w in self.backlog) - surplus)
        if not any(c.stalled for c in self.pool.children):
            self.gave_back = False

    def ack_can_wait(self, now: float) -> bool:
        """May the pending acknowledgements wait for more to join them (ACK_DELAY)?
        Only while every child has its next job in hand: nobody runs dry meanwhile."""
        if not self.pending or not FLUSH_SECONDS <= self.avg_duration < DOUBLE_BUFFER_BELOW:
            return False
        if not self.ack_due:
            self.ack_due = now + min(ACK_DELAY, self.avg_duration)
        if now >= self.ack_due:
            return False
        children = self.pool.accepting()
        return bool(children) and all(len(c.tokens) >= 2 for c in children)

    def receive(self, taken: list[Reserved]) -> None:
        """Hold what the waiters took.  A waiter already inside BLMOVE when the drain
        began may take back a job the drain has just put back: it goes back again, and
        is counted as requeued once, not twice."""
        if self.put_back:
            for r in taken:
                if self.put_back[(r.queue, r.raw)] > 0:
                    self.put_back[(r.queue, r.raw)] -= 1
                    self.stats["requeued"] -= 1
        self.hold(taken)

    def hold(self, got: list[Reserved]) -> None:
        """Hold reserved jobs to run; a job far over --max-payload (of which we have only
        its head) is answered at once instead, without a child (oversized.py)."""
        for r in got:
            if r.raw.__class__ is Oversized:
                self.events.refuse(r.queue, r.raw, r.crashes)
            else:
                self.backlog.append(self.admit(r))

    def admit(self, r: Reserved) -> Work:
        """A reserved job, or a poison pill: one whose host or process died running it
        more than --max-crashes times is dead-lettered instead of run again."""
        w = Work(r.queue, r.raw, r.crashes)
        if r.crashes > self.cfg.max_crashes:
            # It did run (that is how it crashed): its envelope says when its last crashed
            # run started, as recorded with the count; never null, which would tell the
            # producer it is safe to submit again.
            w.fail = dict(error_type=p.E_WORKER_CRASHED, retry=False, dead=True,
                          started_at=r.crashed_at if r.crashed_at is not None else time.time(),
                          message=f"its host or pool process died while running it {r.crashes} "
                                  f"times (--max-crashes {self.cfg.max_crashes}): dead-lettered "
                                  "as a poison pill")
        return w

    # -- what observers see --------------------------------------------------------------------

    def snapshot(self, now: float) -> dict:
        """The loop's state for the heartbeat event (systemd status, metrics, titles)."""
        return {"state": self.state, "inflight": len(self.inflight), "held": len(self.backlog),
                "busy": len(self.pool.busy()),
                "unacknowledged": len(self.pending) + self.rq.unsent, "concurrency": self.pool.size,
                "children": len(self.pool.children), "redis_down": self.duties.redis_down,
                "unusable": len(self.rq.unusable.bad),
                "drain_left": max(0.0, self.drain_deadline - now)
                if self.state == DRAINING else None, **self.stats}

    # -- what we hold (for reconciling with Redis) -------------------------------------------

    def held(self, *, cut: bool = False) -> Counter:
        """Every (queue, raw job) this supervisor holds, with multiplicity.  A job known
        by its head only (oversized.py) only with ``cut``: only Redis has it whole, and
        must never be given the head for it (a caller that pushes jobs by value leaves
        it out; one that compares with Redis names it by hash: oversized.ident)."""
        held = Counter((w.queue, w.raw) for w in self.backlog)
        held.update((w.queue, w.raw) for w in self.inflight.values())
        held.update((c.queue, c.raw) for c in self.pending)
        held.update(self.rq.holding())  # (completions a key of the wrong type holds back)
        for k in [] if cut else [k for k in held if k[1].__class__ is Oversized]:
            del held[k]
        return held
