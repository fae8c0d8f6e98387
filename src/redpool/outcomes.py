"""What happens when a child answers, dies, or overruns its job's timeout.

A collaborator the supervisor owns (``Supervisor.events``) and hands every pool event
to, kept apart so that each file stays one readable responsibility: it turns pool
events into completions to acknowledge, crash counts, failures for a child to settle,
and retired children.  It makes no Redis call except crashed.lua, through the queue.
"""

from __future__ import annotations

import math
import signal
from typing import TYPE_CHECKING

import redis

from . import protocol as p
from .pool import BootFailed, Died, Done, Ready, Returned, Started
from .child import decode_done
from .oversized import Oversized, refusal
from .completion import Completion
from .work import Work

if TYPE_CHECKING:
    from .config import WorkerConfig

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


def answer_of(work: Work, msg: bytes) -> tuple[dict, Completion]:
    """A child's answer (MSG_DONE) for ``work``: the job_finished event's fields and the
    completion to acknowledge (which refuses what no script call could carry)."""
    meta, env, dead, retry = decode_done(msg, views=True)
    done = Completion(work.queue, work.raw, meta["result_id"], meta["ttl"], meta["reply_to"],
                      env, dead, retry, meta.get("retry_delay", 0.0))
    if meta["status"] not in (p.SUCCEEDED, p.FAILED, "retrying") \
            or not 0.0 <= meta["duration"] < math.inf:
        raise ValueError(f"its status {meta['status']!r} or duration {meta['duration']!r} "
                         "is not one a child reports")
    meta.pop("t", None)
    return meta, done


def last_resort(work: Work, error_type: str, message: str, cfg: WorkerConfig,
                started_at: float | None) -> Completion:
    """Fail ``work`` in the supervisor, when no child can (it died settling the job) or
    what one said cannot be used: a dead-letter entry, and a failed envelope for the
    producer if the raw job names a usable id or reply_to (protocol.salvage: any bytes).
    If even that cannot be made, the dead-letter entry alone, from text of our own."""
    message = _printable(message)

    def dead(job_id: str | None) -> bytes:
        return p.dumps(p.dead_entry(work.raw, queue=work.queue, reason=message,
                                    error_type=error_type, worker=cfg.name, job_id=job_id,
                                    max_job=cfg.max_payload))
    try:
        found = p.salvage(work.raw)
        if isinstance(found, p.Job):
            job_id = None if found.id_assigned else found.id
            reply_to, ttl, task, enq = found.reply_to, found.result_ttl, found.task, found.enqueued_at
        else:
            job_id, reply_to, ttl, task, enq = (found.job_id, found.reply_to, found.result_ttl,
                                                found.task, found.enqueued_at)
        if reply_to is not None and not cfg.reply_rule().allows(reply_to):
            reply_to = None  # as a child would have refused it (runner.py)
        if not (job_id or reply_to):
            return Completion(work.queue, work.raw, None, ttl, None, None, dead(None))
        env = p.dumps(p.envelope(id=job_id or p.new_id(), task=task, queue=work.queue,
                                 status=p.FAILED, worker=cfg.name, enqueued_at=enq,
                                 started_at=started_at, attempts=found.attempt + work.crashes,
                                 error=p.error_dict(error_type, message)))
        return Completion(work.queue, work.raw, job_id if ttl > 0 else None, ttl, reply_to, env,
                          dead(job_id))
    except Exception:  # (salvage validates what it returns: this would be a bug of ours)
        return Completion(work.queue, work.raw, None, p.DEFAULT_RESULT_TTL, None, None, dead(None))


def _printable(text: str) -> str:
    """``text`` with anything UTF-8 cannot hold (an unpaired surrogate) escaped."""
    return text.encode("utf-8", "backslashreplace").decode()


class ChildEvents:
    """Owned by the Supervisor (``sup.events``), which hands it every pool event.  It
    works on what the supervisor holds (``sup``: backlog, inflight, pending, stats,
    avg_duration, reloading, gave_back, answer_now; started(), announce(), wall()) and
    calls the supervisor's collaborators (pool, queue, duties, hooks) itself."""

    def __init__(self, sup) -> None:
        # (the supervisor is not imported: it imports this module)
        self.sup = sup
        self.cfg, self.rq, self.pool, self.duties, self.hooks = (sup.cfg, sup.rq, sup.pool,
                                                                 sup.duties, sup.hooks)

    def handle_event(self, ev, now: float) -> None:
        s = self.sup
        if isinstance(ev, Done):
            self.job_done(ev)
        elif isinstance(ev, Started):
            w = s.inflight.get(ev.token)
            if w is not None:
                w.deadline = w.started + ev.timeout if ev.timeout > 0 else math.inf
        elif isinstance(ev, Died):
            running = s.inflight.pop(ev.running, None) if ev.running is not None else None
            rest = [s.inflight.pop(t) for t in ev.tokens if t in s.inflight]
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
            s.backlog.extendleft(reversed([w.again() for w in rest]))
            if running is not None:
                self.job_died(running, ev, now)
        elif isinstance(ev, Ready):
            # a child spawned after start-up (resize, replacement, reload) takes jobs now
            self.hooks.emit("child_ready", pid=ev.pid, generation=ev.generation)
        elif isinstance(ev, Returned):
            # first in line again, in their order (the batch ran long).  A child that
            # gave them back while its job runs on gets no more until that job ends;
            # what no other child can take may go back to Redis (Supervisor.shed).
            s.backlog.extendleft(reversed([s.inflight.pop(t).again() for t in ev.tokens
                                           if t in s.inflight]))
            c = next((c for c in self.pool.children if c.pid == ev.pid), None)
            if c is not None and c.tokens:
                c.stalled = s.gave_back = True
        elif isinstance(ev, BootFailed):
            if ev.import_error and s.reloading and ev.generation == self.pool.generation:
                # SIGHUP's new code does not import: keep the children we have
                self.pool.abort_reload()
                s.reloading = False
                self.hooks.emit("reload_failed", pid=ev.pid, message=ev.message,
                                generation=self.pool.generation)
                return
            self.hooks.emit("child_boot_failed", pid=ev.pid, message=ev.message,
                            retry_in=self.pool.respawn_backoff)

    def job_done(self, ev: Done) -> None:
        s = self.sup
        work = s.inflight.pop(ev.token)
        if s.announce_starts:
            s.announce(work, ev.pid)
        try:
            meta, done = answer_of(work, ev.msg)
        except Exception as e:
            # The containment boundary (docs/design.md, "Bad input"): what a child said of
            # ONE job could not become a completion.  That job is failed and dead-lettered
            # here; the loop, and every other job, go on.
            self.contain(work, e, "job_done", started_at=s.wall(work.started, s.clock()))
        else:
            if work.fail is None:  # settling a failure takes no time: it says nothing of jobs
                d = meta["duration"]
                s.avg_duration = d if not s.avg_duration else 0.8 * s.avg_duration + 0.2 * d
            s.pending.append(done)
            s.stats[meta["status"]] += 1
            if done.dead is not None:
                s.stats["dead"] += 1
            self.hooks.emit("job_finished", queue=work.queue, **meta, dead=done.dead is not None)
        c = next((c for c in self.pool.children if c.pid == ev.pid), None)
        if c is None:
            return
        c.stalled = False  # (its long job, if it was one, is over)
        c.last_work = work  # (names a signal its task sent that is read after it ended)
        if work.timed_out:
            # It finished just as it was signalled: it is dying anyway.  The rest of its
            # batch must not be blamed for that death (see handle_event: doomed).
            c.doomed = True
            self.pool.retire(c)
            return
        if c.tokens:  # the next job of its batch starts now
            s.started(s.inflight[c.tokens[0]], s.clock(), c.pid)
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
        s = self.sup
        ran = dict(started_at=s.wall(work.started, now), ran=max(0.0, now - work.started))
        if work.timed_out:
            s.stats["timed_out"] += 1
            self.settle(work, p.E_TIMEOUT, f"the job ran past its timeout of "
                        f"{work.timed_out:g} s and its process was stopped ({ev.description})",
                        retry=True, dead=False, **ran)
            return
        if work.fail is not None:  # the child died settling a failure: write it ourselves
            s.pending.append(last_resort(
                work, work.fail["error_type"],
                f"{work.fail['message']}; then the process settling it {ev.description}",
                self.cfg, work.fail.get("started_at")))
            return
        s.stats["crashed"] += 1
        what = f"the pool process (pid {ev.pid}) running this job {ev.description}"
        try:
            # counted in Redis, which knows every crash of this job on every host
            crashes = self.rq.crashed(work.queue, work.raw, self.cfg.max_crashes,
                                      ran["started_at"])
        except redis.RedisError as e:
            self.duties.redis_failed(e, now, "crashed")
            crashes = work.crashes + 1
            if crashes <= self.cfg.max_crashes:
                s.backlog.appendleft(work.again(crashes=crashes))  # retry it here
                return
        if crashes == 0:
            # no longer ours: taken back while we were cut off (it runs elsewhere), or
            # lost with the server's data (then it runs again here, restored)
            again = work.again(crashes=work.crashes + 1)
            try:
                if self.duties.check_dataset(now, "crashed", also=[(work.queue, work.raw)]):
                    s.backlog.appendleft(again)
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

    def contain(self, work: Work, e: Exception, during: str, started_at: float | None) -> None:
        """Fail ``work`` here, for an error handling it that is neither Redis's nor a
        signal: one error event, a dead-letter entry, and the producer's answer."""
        s = self.sup
        why = _printable(f"{type(e).__name__}: {e}")
        s.pending.append(last_resort(
            work, p.E_INVALID_JOB, f"the worker could not handle this job's outcome ({why}); "
            "what the job holds is the likely cause (its task, reply_to or id): check it, and "
            "report this to redpool's maintainers with this dead-letter entry",
            self.cfg, started_at))
        s.stats["failed"] += 1
        s.stats["dead"] += 1
        self.hooks.emit("internal_error", during=during, queue=work.queue, error=why,
                        **job_names(work.raw), note="a bug in redpool: the job was failed and "
                        "dead-lettered, and the worker carries on")

    def refuse(self, queue: str, job: Oversized, crashes: int) -> None:
        """A job far over --max-payload, of which we hold only its head: answered and
        dead-lettered here, never handed to a child (oversized.py)."""
        s = self.sup
        try:
            meta, done = refusal(job, queue, crashes, self.cfg)
        except ValueError:  # (an id or reply_to no key can be named by: answered by none)
            meta, done = refusal(job, queue, crashes, self.cfg, answer=False)
        s.pending.append(done)
        s.answer_now = True  # (found in an exchange, after it sent what was pending)
        s.stats["failed"] += 1
        s.stats["dead"] += 1
        self.hooks.emit("job_finished", queue=queue, **meta, dead=True)

    def settle(self, work: Work, error_type: str, message: str, *, retry: bool, dead: bool,
               started_at: float | None, ran: float | None = None) -> None:
        """Have a child fail a job as if its task had raised (it knows the task's
        retry policy): first in line, before any new job.  ``started_at``: when the run
        that was stopped started (unix seconds); ``ran``: for how long."""
        self.sup.backlog.appendleft(work.again(fail=dict(
            error_type=error_type, message=message, retry=retry, dead=dead,
            started_at=started_at, ran=ran)))

    def running(self):
        """(child, work) for each child's running job: the only ones with a deadline."""
        for c in self.pool.children:
            w = self.sup.inflight.get(c.tokens[0]) if c.tokens else None
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
