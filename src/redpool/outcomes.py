"""What happens when a child answers, dies, or overruns its job's timeout.

Part of the supervisor (a mixin of Supervisor, kept apart so that each file stays
one readable responsibility): it turns pool events into completions to acknowledge,
crash counts, failures for a child to settle, and retired children.  It makes no
Redis call except crashed.lua, through the queue.
"""

from __future__ import annotations

import math
import signal

import redis

from . import protocol as p
from .pool import BootFailed, Died, Done, Ready, Returned, Started
from .child import decode_done
from .queue import Completion
from .work import Work

KILL_GRACE = 2.0  # seconds between SIGTERM and SIGKILL for a child past its timeout


def job_names(raw: bytes) -> dict:
    """id, task and attempt of a raw job, for an event about it.  The supervisor only
    moves bytes: this decodes, so it is for rare events (a timeout) or for observers
    that asked (job_started at debug).  The id is null when the job had none (the one
    its child made up is not known here)."""
    job = p.salvage(raw)
    if isinstance(job, p.Job):
        return {"id": None if job.id_assigned else job.id, "task": job.task,
                "attempt": job.attempt}
    return {"id": job.job_id, "task": job.task, "attempt": None}


class ChildEvents:
    """Mixin of Supervisor: needs its cfg, rq, pool, duties, hooks, clock, backlog,
    inflight, pending, stats, avg_duration, reloading, gave_back, announce_starts,
    started(), announce() and wall()."""

    def handle_event(self, ev, now: float) -> None:
        if isinstance(ev, Done):
            self.job_done(ev)
        elif isinstance(ev, Started):
            w = self.inflight.get(ev.token)
            if w is not None:
                w.deadline = w.started + ev.timeout if ev.timeout > 0 else math.inf
        elif isinstance(ev, Died):
            running = self.inflight.pop(ev.running, None) if ev.running is not None else None
            rest = [self.inflight.pop(t) for t in ev.tokens if t in self.inflight]
            if running is not None and ev.doomed and not running.timed_out:
                # we stopped it for another job's timeout, which answered just before:
                # the job it had moved on to did not crash it
                rest.insert(0, running)
                running = None
            if ev.doomed:
                # we asked for this death (a timeout): expected, so not an error
                self.hooks.emit("child_stopped", pid=ev.pid, exitcode=ev.exitcode,
                                description=ev.description, had_job=running is not None,
                                reason="its job ran past its timeout" if running is not None
                                else "its job overran its timeout, then answered as it was "
                                     "stopped")
            else:
                self.hooks.emit("child_died", pid=ev.pid, exitcode=ev.exitcode,
                                description=ev.description, had_job=running is not None)
            # The rest of its batch: not started, or finished in the last ~2 ms with the
            # answer not yet sent.  First in line again, as they were, with no crash.
            self.backlog.extendleft(reversed([w.again() for w in rest]))
            if running is not None:
                self.job_died(running, ev, now)
        elif isinstance(ev, Ready):
            # a child spawned after start-up (resize, replacement, reload) takes jobs now
            self.hooks.emit("child_ready", pid=ev.pid, generation=ev.generation)
        elif isinstance(ev, Returned):
            # first in line again, in their order (the batch ran long).  A child that
            # gave them back while its job runs on gets no more until that job ends;
            # what no other child can take may go back to Redis (Supervisor.shed).
            self.backlog.extendleft(reversed([self.inflight.pop(t).again() for t in ev.tokens
                                              if t in self.inflight]))
            c = next((c for c in self.pool.children if c.pid == ev.pid), None)
            if c is not None and c.tokens:
                c.stalled = self.gave_back = True
        elif isinstance(ev, BootFailed):
            if ev.import_error and self.reloading and ev.generation == self.pool.generation:
                # SIGHUP's new code does not import: keep the children we have
                self.pool.abort_reload()
                self.reloading = False
                self.hooks.emit("reload_failed", pid=ev.pid, message=ev.message,
                                generation=self.pool.generation)
                return
            self.hooks.emit("child_boot_failed", pid=ev.pid, message=ev.message,
                            retry_in=self.pool.respawn_backoff)

    def job_done(self, ev: Done) -> None:
        work = self.inflight.pop(ev.token)
        if self.announce_starts:
            self.announce(work, ev.pid)
        meta, env, dead, retry = decode_done(ev.msg)
        if work.fail is None:  # settling a failure takes no time: it says nothing of jobs
            d = meta["duration"]
            self.avg_duration = d if not self.avg_duration else 0.8 * self.avg_duration + 0.2 * d
        self.pending.append(Completion(work.queue, work.raw, meta["result_id"], meta["ttl"],
                                       meta["reply_to"], env, dead, retry,
                                       meta.get("retry_delay", 0.0)))
        self.stats[meta["status"]] += 1
        if dead is not None:
            self.stats["dead"] += 1
        meta.pop("t", None)
        self.hooks.emit("job_finished", queue=work.queue, **meta, dead=dead is not None)
        c = next((c for c in self.pool.children if c.pid == ev.pid), None)
        if c is None:
            return
        c.stalled = False  # (its long job, if it was one, is over)
        if work.timed_out:
            # It finished just as it was signalled: it is dying anyway.  The rest of its
            # batch must not be blamed for that death (see handle_event: doomed).
            c.doomed = True
            self.pool.retire(c)
            return
        if c.tokens:  # the next job of its batch starts now
            self.started(self.inflight[c.tokens[0]], self.clock(), c.pid)
        if not c.stopping and not c.retiring:
            self.maybe_retire(c)

    def maybe_retire(self, c) -> None:
        """A child past --max-jobs-per-child or --max-memory-per-child is replaced
        between jobs, never in the middle of one."""
        why = None
        if self.cfg.max_jobs_per_child and c.jobs_done >= self.cfg.max_jobs_per_child:
            why = f"ran {c.jobs_done} jobs (--max-jobs-per-child {self.cfg.max_jobs_per_child})"
        elif self.cfg.max_memory_per_child:
            rss = self.pool.rss(c)
            if rss is not None and rss > self.cfg.max_memory_per_child:
                why = (f"resident memory {rss // 1048576} MiB is over --max-memory-per-child "
                       f"{self.cfg.max_memory_per_child // 1048576} MiB")
        if why:
            self.pool.retire(c)
            self.hooks.emit("child_retired", pid=c.pid, reason=why)

    def job_died(self, work: Work, ev: Died, now: float) -> None:
        """A child died holding ``work``: settle exactly that job, nothing else."""
        # the run that died: when it started, and how long it ran (for the envelope and
        # the job_finished event of a job failed for it)
        ran = dict(started_at=self.wall(work.started, now), ran=max(0.0, now - work.started))
        if work.timed_out:
            self.stats["timed_out"] += 1
            self.settle(work, p.E_TIMEOUT, f"the job ran past its timeout of "
                        f"{work.timed_out:g} s and its process was stopped ({ev.description})",
                        retry=True, dead=False, **ran)
            return
        if work.fail is not None:  # the child died settling a failure: write it ourselves
            self.pending.append(self.duties.crash_completion(work, ev.description))
            return
        self.stats["crashed"] += 1
        what = f"the pool process (pid {ev.pid}) running this job {ev.description}"
        try:
            # counted in Redis, which knows every crash of this job on every host
            crashes = self.rq.crashed(work.queue, work.raw, self.cfg.max_crashes,
                                      ran["started_at"])
        except redis.RedisError as e:
            self.duties.redis_failed(e, now, "crashed")
            crashes = work.crashes + 1
            if crashes <= self.cfg.max_crashes:
                self.backlog.appendleft(work.again(crashes=crashes))  # retry it here
                return
        if crashes == 0:
            # no longer ours: taken back while we were cut off (it runs elsewhere), or
            # lost with the server's data (then it runs again here, restored)
            again = work.again(crashes=work.crashes + 1)
            try:
                if self.duties.check_dataset(now, "crashed", also=[(work.queue, work.raw)]):
                    self.backlog.appendleft(again)
            except redis.RedisError as e:
                self.duties.redis_failed(e, now, "dataset")
            return
        if crashes > self.cfg.max_crashes:
            self.settle(work.again(crashes=crashes - 1), p.E_WORKER_CRASHED,
                        f"{what}; it has now crashed {crashes} times (--max-crashes "
                        f"{self.cfg.max_crashes}): dead-lettered as a poison pill",
                        retry=False, dead=True, **ran)
            return
        self.hooks.emit("job_crashed", queue=work.queue, crashes=crashes, description=what)

    def settle(self, work: Work, error_type: str, message: str, *, retry: bool, dead: bool,
               started_at: float | None, ran: float | None = None) -> None:
        """Have a child fail a job as if its task had raised (it knows the task's
        retry policy): first in line, before any new job.  ``started_at``: when the run
        that was stopped started (unix seconds); ``ran``: for how long."""
        self.backlog.appendleft(work.again(fail=dict(
            error_type=error_type, message=message, retry=retry, dead=dead,
            started_at=started_at, ran=ran)))

    def running(self):
        """(child, work) for each child's running job: the only ones with a deadline."""
        for c in self.pool.children:
            w = self.inflight.get(c.tokens[0]) if c.tokens else None
            if w is not None:
                yield c, w

    def enforce_timeouts(self, now: float) -> None:
        for c, w in self.running():
            if now >= w.kill_at:
                self.pool.signal(c, signal.SIGKILL)
                w.kill_at = math.inf
            elif now >= w.deadline and not w.timed_out:
                w.timed_out = w.deadline - w.started
                w.deadline = math.inf  # from now on only kill_at matters
                w.kill_at = now + KILL_GRACE
                self.hooks.emit("job_timeout", **job_names(w.raw), queue=w.queue,
                                timeout=round(w.timed_out, 3), pid=c.pid)
                c.doomed = True
                self.pool.signal(c, signal.SIGTERM)
