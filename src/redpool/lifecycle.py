"""Signals and stopping: how the supervisor's state changes from outside.

A collaborator the supervisor owns (``Supervisor.lifecycle``, as outcomes.py is
``Supervisor.events``), kept apart so that each file stays one readable
responsibility.  SIGTERM / SIGINT drain, then stop; SIGTTIN / SIGTTOU resize the pool;
SIGHUP reloads it.  Handlers only recorded the signal (signals.py): everything here
runs in the loop, between iterations.
"""

from __future__ import annotations

import signal
import time
from collections import deque
from multiprocessing.connection import wait

import redis

from .outcomes import KILL_GRACE, job_names
from .pool import Done
from .signals import HANDLED, signame

RUNNING, DRAINING, STOPPED = "running", "draining", "stopped"


class Lifecycle:
    """Owned by the Supervisor (``sup.lifecycle``): the signals it took, draining and
    stopping.  It changes the supervisor's ``state`` and works on what it holds
    (``sup``: backlog, inflight, pending, stats, drain_deadline, reloading, put_back,
    waiter, inbox; receive(), events.job_done()) through its collaborators (pool,
    queue, duties, hooks)."""

    def __init__(self, sup) -> None:
        # (the supervisor is not imported: it imports this module)
        self.sup = sup
        self.cfg, self.rq, self.pool, self.duties, self.hooks = (sup.cfg, sup.rq, sup.pool,
                                                                 sup.duties, sup.hooks)

    def take_signals(self, ready: list, now: float) -> None:
        """Act on the signals received, but those a pool process (or what it started)
        sent: a task must not stop, reload, resize or kill its worker (signals.py).  One
        the worker does not act on, from anyone else, does what it did before it was
        guarded (its default action: end the process, or stop it)."""
        for got in self.sup.inbox.drain(pipe=self.sup.inbox.fileno() in ready):
            c = self.pool.owner(got.lineage, got.pgid) if got.pid else None
            if c is not None:
                self.signal_from_pool(got, c)
            elif got.signum in HANDLED:
                self.handle_signal(got.signum, now)
            else:
                self.sup.inbox.default_action(got.signum)
        self.pool.forget_gone()   # (owner() knew those a tick had reaped since the last)

    def signal_from_pool(self, got, c) -> None:
        """Ignored; said once per pool process, with the job it was running."""
        if c.signalled_us:
            return
        c.signalled_us = True
        # the job it runs, else the one it finished last: a task that signals and returns
        # at once is often done before its signal is read
        w = self.sup.inflight.get(c.tokens[0]) if c.tokens else c.last_work
        job = job_names(w.raw) if w is not None else {"id": None, "task": None, "attempt": None}
        self.hooks.emit("signal_from_pool", signal=signame(got.signum),
                        sender=got.pid, pid=c.pid, **job,
                        note="a task (or a program it ran) signalled the supervisor: ignored, "
                             "as every signal this pool process sends; only SIGKILL and "
                             "SIGSTOP cannot be")

    def handle_signal(self, signum: int, now: float) -> None:
        s = self.sup
        name = signal.Signals(signum).name
        if signum in (signal.SIGTERM, signal.SIGINT):
            if s.state == RUNNING:
                self.begin_drain(now, name)
            else:
                self.hooks.emit("stop_now", signal=name)
                self.stop_now()
        elif s.state != RUNNING:
            self.hooks.emit("signal_ignored", signal=name, reason=f"the worker is {s.state}")
        elif signum in (signal.SIGTTIN, signal.SIGTTOU):
            # one child more / fewer (never below one); a removed child finishes what
            # it holds first (reconcile picks the one holding least)
            size = self.pool.size + (1 if signum == signal.SIGTTIN else -1)
            if size < 1:
                self.hooks.emit("signal_ignored", signal=name, reason="the pool is at one child")
                return
            self.pool.resize(size)
            self.hooks.emit("resized", signal=name, concurrency=self.pool.size)
        elif signum == signal.SIGHUP:
            self.pool.reload()
            s.reloading = True
            self.hooks.emit("reloading", generation=self.pool.generation,
                            children=len(self.pool.children))

    def begin_drain(self, now: float, why: str) -> None:
        """Stop taking jobs; running ones get ``grace`` seconds; unstarted ones go back."""
        s = self.sup
        s.state = DRAINING
        s.drain_deadline = now + self.cfg.grace
        if s.waiter is not None:
            s.waiter.disarm()
        self.hooks.emit("draining", signal=why, running=len(s.inflight), grace=self.cfg.grace)
        self.requeue_backlog(now)

    def tick_draining(self, now: float) -> None:
        s = self.sup
        self.requeue_backlog(now)
        if not s.inflight and not s.pending and not s.backlog and not self.rq.unsent:
            s.state = STOPPED
        elif now >= s.drain_deadline:
            self.hooks.emit("grace_expired", running=len(s.inflight))
            self.stop_now()

    def requeue_backlog(self, now: float, keep: int = 0) -> None:
        """Unstarted jobs go back to the head of their queue, but for the first
        ``keep`` of them (failures still to settle stay: they are quick, and their
        outcome is decided)."""
        s = self.sup
        jobs = [w for w in s.backlog if w.fail is None]
        kept = set(map(id, jobs[:max(0, keep)]))
        items = [(w.queue, w.raw) for w in jobs[max(0, keep):]]
        if not items or not self.duties.redis_ready(now):
            return
        try:
            moved = self.rq.requeue(items)
            if moved < len(items) and self.duties.check_dataset(now, "requeue"):
                return  # Redis lost them: restored into our lists, put back next tick
        except redis.RedisError as e:
            self.duties.redis_failed(e, now, "requeue")
            return
        s.stats["requeued"] += moved
        if s.state != RUNNING and moved == len(items):
            s.put_back.update(items)  # (see receive(): a waiter may take them back)
        s.backlog = deque(w for w in s.backlog if w.fail is not None or id(w) in kept)

    def stop_now(self) -> None:
        """Collect results already sent, kill the children; their jobs stay in our
        processing lists and go back to their queues in shutdown()."""
        for ev in self.pool.poll(wait(self.pool.waitables(), timeout=0)):
            if isinstance(ev, Done):
                self.sup.events.job_done(ev)
        self.pool.terminate(grace=KILL_GRACE)
        self.sup.state = STOPPED

    def shutdown(self) -> None:
        """Whatever happened: acknowledge what finished, put everything else back."""
        s = self.sup
        s.state = STOPPED
        if s.waiter is not None:
            s.waiter.stop()
            s.receive(s.waiter.take())
            s.waiter.close()
        self.pool.close()
        self.duties.shutdown()
        self.hooks.emit("stopped", uptime=round(time.time() - self.duties.started, 3), **s.stats)
