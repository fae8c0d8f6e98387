"""The loop.  Glue only: Redis through RedisQueue, processes through ProcessPool.

One iteration, ``tick(ready, now)``, reads like a to-do list:

1. act on recorded signals (handlers only record),
2. collect what children finished or how they died,
3. acknowledge finished jobs in one script call,
4. hand reserved jobs to idle children,
5. reserve more when there is room, or arm the blocking waiters when the queues
   are empty,
6. renew the heartbeat.

Between iterations the loop sleeps in one ``wait()`` on every child pipe and
process sentinel, the signal pipe and the waiter pipe: it never polls and never
blocks on a single job.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from collections import deque
from itertools import count
from multiprocessing.connection import wait

import redis

from . import __version__
from . import protocol as p
from .child import decode_done
from .config import WorkerConfig
from .hooks import Hooks
from .pool import BootFailed, Died, Done, ProcessPool
from .queue import Completion, RedisQueue
from .signals import SignalInbox
from .waiter import Waiter

RUNNING, DRAINING, STOPPED = "running", "draining", "stopped"


class Supervisor:
    def __init__(self, cfg: WorkerConfig, rq: RedisQueue, pool: ProcessPool, *,
                 waiter: Waiter | None = None, inbox: SignalInbox | None = None,
                 hooks: Hooks | None = None, clock=time.monotonic) -> None:
        self.cfg = cfg
        self.rq = rq
        self.pool = pool
        self.waiter = waiter
        self.inbox = inbox
        self.hooks = hooks or Hooks()
        self.clock = clock
        self.state = RUNNING
        self.backlog: deque[tuple[str, bytes]] = deque()   # reserved, not yet started
        self.inflight: dict[int, tuple[str, bytes, float]] = {}  # token -> (queue, job, started)
        self.pending: list[Completion] = []                # finished, not yet acknowledged
        self._tokens = count(1)
        self.queues_empty = False
        self.drain_deadline = 0.0
        self.next_heartbeat = 0.0
        self.redis_retry_at = 0.0
        self._redis_backoff = 0.0
        self.redis_down = False
        self.started = time.time()
        self.stats = {"succeeded": 0, "failed": 0, "dead": 0, "crashed": 0, "requeued": 0}

    # -- the outer loop ----------------------------------------------------------------------

    def run(self) -> None:
        """Run until told to stop (or, with --burst, until the queues are empty)."""
        try:
            self.startup()
            self.tick([])  # take what is already queued without waiting for a wake-up
            while self.state != STOPPED:
                ready = wait(self.waitables(), timeout=self.wait_timeout(self.clock()))
                self.tick(ready)
        finally:
            self.shutdown()

    def startup(self) -> None:
        self.rq.register(self.info(), self.cfg.lease)
        moved = self.rq.recover()
        if moved:
            self.hooks.emit("recovered", jobs=moved)
        self.pool.start()
        if self.waiter is not None:
            self.waiter.start()
        self.next_heartbeat = self.clock() + self.cfg.lease / 3
        self.hooks.emit("started", **self.info())

    def waitables(self) -> list:
        objs = self.pool.waitables()
        if self.inbox is not None:
            objs.append(self.inbox.fileno())
        if self.waiter is not None:
            objs.append(self.waiter.fileno())
        return objs

    def wait_timeout(self, now: float) -> float:
        deadlines = [self.next_heartbeat]
        if self.state == DRAINING:
            deadlines.append(self.drain_deadline)
        if self.redis_retry_at > now:  # a Redis call is waiting out its backoff
            deadlines.append(self.redis_retry_at)
        if self.state == RUNNING and len(self.pool.children) < self.pool.size \
                and self.pool.next_spawn_at > now:
            deadlines.append(self.pool.next_spawn_at)
        return max(0.0, min(deadlines) - now)

    # -- one iteration -----------------------------------------------------------------------

    def tick(self, ready: list, now: float | None = None) -> None:
        now = self.clock() if now is None else now
        if self.inbox is not None:
            for signum in self.inbox.drain():
                self.handle_signal(signum, now)
        for ev in self.pool.poll(ready):
            self.handle_event(ev)
        if self.waiter is not None:
            self.backlog.extend(self.waiter.take())
            while self.waiter.errors:
                self._redis_failed(self.waiter.errors.popleft(), now, "wait")
        self.flush(now)
        if self.state == DRAINING:
            self.tick_draining(now)
        elif self.state == RUNNING:
            self.pool.reconcile(now)
            self.dispatch()
            self.fill(now)
        if now >= self.next_heartbeat and self.state != STOPPED:
            self.heartbeat(now)

    def handle_signal(self, signum: int, now: float) -> None:
        if signum in (signal.SIGTERM, signal.SIGINT):
            if self.state == RUNNING:
                self.begin_drain(now, signal.Signals(signum).name)
            else:
                self.hooks.emit("stop_now", signal=signal.Signals(signum).name)
                self.stop_now()

    def handle_event(self, ev) -> None:
        if isinstance(ev, Done):
            queue, raw, _ = self.inflight.pop(ev.token)
            meta, env, dead = decode_done(ev.msg)
            self.pending.append(Completion(queue, raw, meta["result_id"], meta["ttl"],
                                           meta["reply_to"], env, dead))
            self.stats[meta["status"]] += 1
            if dead is not None:
                self.stats["dead"] += 1
            self.hooks.emit("job_finished", queue=queue, **meta, dead=dead is not None)
        elif isinstance(ev, Died):
            job = self.inflight.pop(ev.token, None) if ev.token is not None else None
            self.hooks.emit("child_died", pid=ev.pid, exitcode=ev.exitcode,
                            description=ev.description, had_job=job is not None)
            if job is not None:
                self.stats["crashed"] += 1
                self.pending.append(self._crashed(*job, ev))
        elif isinstance(ev, BootFailed):
            self.hooks.emit("child_boot_failed", pid=ev.pid, message=ev.message,
                            retry_in=self.pool.respawn_backoff)

    def _crashed(self, queue: str, raw: bytes, started: float, ev: Died) -> Completion:
        """Exactly the job a dead child held fails, with an error naming the cause."""
        found = p.salvage(raw)
        if isinstance(found, p.Job):
            job_id = None if found.id_assigned else found.id
            reply_to, ttl, task, enq = found.reply_to, found.result_ttl, found.task, found.enqueued_at
        else:
            job_id, reply_to, ttl, task, enq = (found.job_id, found.reply_to, found.result_ttl,
                                                found.task, found.enqueued_at)
        message = f"the pool process (pid {ev.pid}) running this job {ev.description}"
        self.hooks.emit("job_crashed", id=job_id, task=task, queue=queue, description=message)
        env = None
        if job_id or reply_to:
            env = p.dumps(p.envelope(id=job_id or p.new_id(), task=task, queue=queue,
                                     status=p.FAILED, worker=self.cfg.name, enqueued_at=enq,
                                     started_at=started,
                                     error=p.error_dict(p.E_WORKER_CRASHED, message)))
        return Completion(queue, raw, job_id if ttl > 0 else None, ttl, reply_to, env)

    def flush(self, now: float) -> None:
        """Acknowledge every finished job in one round trip."""
        if not self.pending or now < self.redis_retry_at:
            return
        try:
            missing, skipped = self.rq.complete(self.pending)
        except redis.RedisError as e:
            self._redis_failed(e, now, "complete")
            return
        if missing:
            self.hooks.emit("results_dropped", count=missing,
                            reason="jobs were no longer in our processing list (taken back)")
        if skipped:
            self.hooks.emit("replies_skipped", count=skipped,
                            reason="reply_to names a key that is not a list")
        self.pending.clear()
        self._redis_ok()

    def dispatch(self) -> None:
        for c in self.pool.idle():
            if not self.backlog:
                break
            queue, raw = self.backlog.popleft()
            token = next(self._tokens) & 0xFFFFFFFF
            self.inflight[token] = (queue, raw, time.time())
            self.pool.send(c, token, queue, raw)

    def fill(self, now: float) -> None:
        """Reserve what the pool can start now plus the prefetch allowance; when the
        queues run dry, let the waiters block in Redis for the next job."""
        want = len(self.pool.idle()) + self.cfg.prefetch - len(self.backlog)
        if want <= 0 or now < self.redis_retry_at:
            if self.waiter is not None:
                self.waiter.disarm()
            return
        try:
            got = self.rq.reserve(want)
        except redis.RedisError as e:
            self._redis_failed(e, now, "reserve")
            return
        self._redis_ok()
        self.backlog.extend(got)
        self.dispatch()
        self.queues_empty = len(got) < want
        if self.queues_empty and self.cfg.burst and not self.backlog and not self.inflight \
                and not self.pending:
            self.hooks.emit("burst_done")
            self.state = STOPPED
        elif self.waiter is not None:
            if self.queues_empty:
                self.waiter.arm()
            else:
                self.waiter.disarm()

    # -- stopping ----------------------------------------------------------------------------

    def begin_drain(self, now: float, why: str) -> None:
        """Stop taking jobs; running ones get ``grace`` seconds; unstarted ones go back."""
        self.state = DRAINING
        self.drain_deadline = now + self.cfg.grace
        if self.waiter is not None:
            self.waiter.disarm()
        self.hooks.emit("draining", signal=why, running=len(self.inflight), grace=self.cfg.grace)
        self.requeue_backlog(now)

    def tick_draining(self, now: float) -> None:
        self.requeue_backlog(now)
        if not self.inflight and not self.pending:
            self.state = STOPPED
        elif now >= self.drain_deadline:
            self.hooks.emit("grace_expired", running=len(self.inflight))
            self.stop_now()

    def requeue_backlog(self, now: float) -> None:
        if not self.backlog or now < self.redis_retry_at:
            return
        items = list(self.backlog)
        try:
            self.stats["requeued"] += self.rq.requeue(items)
        except redis.RedisError as e:
            self._redis_failed(e, now, "requeue")
            return
        self.backlog.clear()

    def stop_now(self) -> None:
        """Collect results already sent, kill the children; their jobs stay in our
        processing lists and go back to their queues in shutdown()."""
        for ev in self.pool.poll(wait(self.pool.waitables(), timeout=0)):
            if isinstance(ev, Done):
                self.handle_event(ev)
        self.pool.terminate(grace=2.0)
        self.state = STOPPED

    def shutdown(self) -> None:
        """Whatever happened: acknowledge what finished, put everything else back."""
        self.state = STOPPED
        if self.waiter is not None:
            self.waiter.stop()
            self.backlog.extend(self.waiter.take())
            self.waiter.close()
        self.pool.close()
        try:
            if self.pending:
                self.redis_retry_at = 0.0
                self.flush(self.clock())
            moved = self.rq.recover()
            self.stats["requeued"] += sum(moved.values())
            self.rq.unregister()
        except redis.RedisError as e:
            self.hooks.emit("shutdown_redis_error", error=str(e),
                            note="unfinished jobs stay in our processing lists and are "
                                 "recovered when this supervisor starts again")
        self.hooks.emit("stopped", uptime=round(time.time() - self.started, 3), **self.stats)

    # -- heartbeat and Redis health ----------------------------------------------------------

    def info(self) -> dict:
        return {"name": self.cfg.name, "host": socket.gethostname(), "pid": os.getpid(),
                "version": __version__, "queues": self.cfg.queues,
                "concurrency": self.cfg.concurrency, "started_at": self.started,
                "inflight": len(self.inflight), "succeeded": self.stats["succeeded"],
                "failed": self.stats["failed"]}

    def heartbeat(self, now: float) -> None:
        self.next_heartbeat = now + self.cfg.lease / 3
        try:
            self.rq.heartbeat(self.info(), self.cfg.lease)
        except redis.RedisError as e:
            self._redis_failed(e, now, "heartbeat")
            self.next_heartbeat = self.redis_retry_at
            return
        self._redis_ok()

    def _redis_failed(self, e: BaseException, now: float, during: str) -> None:
        self._redis_backoff = min(5.0, max(0.05, self._redis_backoff * 2))
        self.redis_retry_at = now + self._redis_backoff
        if not self.redis_down:
            self.redis_down = True
            self.hooks.emit("redis_down", error=str(e), during=during)

    def _redis_ok(self) -> None:
        if self.redis_down:
            self.redis_down = False
            self.hooks.emit("redis_up")
        self._redis_backoff = 0.0
