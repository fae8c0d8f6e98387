"""Running one job inside a pool process: decode, validate, run, encode.

Everything a job can get wrong becomes an outcome here (a dead-letter entry and a
failed envelope, or a retry): nothing a job does can end the child's loop except
killing the process.  The delivery policy (retries, backoff, timeout, dead-lettering)
is resolved here too, because only the child knows the task's options: job field,
then task option, then the worker's default.
"""

from __future__ import annotations

import difflib
import functools
import math
import random
import time
import traceback
from dataclasses import dataclass, replace
from typing import Any

from . import protocol as p
from .registry import JobInfo, Registry, Task, _current


@dataclass(frozen=True)
class Policy:
    max_retries: int = 0
    retry_backoff: float = 1.0
    retry_backoff_max: float = 300.0
    timeout: float = 0.0            # 0: no limit
    dead_letter: bool = False

    def resolve(self, job: p.Job, task: Task) -> "Policy":
        """Job field, else task option, else this (the worker's default)."""
        def pick(name: str) -> Any:
            v = getattr(job, name)
            if v is None:
                v = task.options.get(name)
            return getattr(self, name) if v is None else v
        policy = Policy(*(pick(n) for n in p.POLICY_FIELDS))
        if policy.max_retries > p.MAX_RETRIES:  # (a task's option: a job's is refused)
            policy = replace(policy, max_retries=p.MAX_RETRIES)
        return policy

    def backoff(self, attempt: int) -> float:
        """Exponential backoff with full jitter (AWS architecture blog's "full jitter"):
        uniform in [0, min(cap, base * 2^(attempt-1))).  Never overflows: past 2^1100
        any base > 0 (the smallest double is 2^-1074) is over any cap (at most 2^31)."""
        cap, base = float(self.retry_backoff_max), float(self.retry_backoff)
        try:
            span = min(cap, math.ldexp(base, min(attempt - 1, 1100)))
        except OverflowError:
            span = cap
        return random.uniform(0, span)


@dataclass
class Outcome:
    """What the child sends back for one job (see child.encode_done)."""
    meta: dict
    envelope: bytes | None = None
    dead: bytes | None = None
    retry: bytes | None = None


class Runner:
    def __init__(self, registry: Registry, worker: str, max_payload: int,
                 namespace: str = p.DEFAULT_NAMESPACE, defaults: Policy | None = None) -> None:
        self.registry = registry
        self.worker = worker
        self.max_payload = max_payload
        # our keys: <ns>:..., and on Redis Cluster the namespace-wide {<ns>}:... (refused on
        # one server too: a producer has no reason to name such a key)
        self.own_prefixes = (f"{namespace}:", f"{{{namespace}}}:")
        self.reply_prefix = p.Keys(namespace).reply("")
        self.defaults = defaults or Policy()

    def prepare(self, raw: bytes) -> tuple[p.Job, Task, Policy]:
        """Decode and check a job; raises InvalidJob saying what to fix."""
        job = p.decode_job(raw, self.max_payload)
        task = self._check(job)
        return job, task, self.defaults.resolve(job, task)

    def run(self, queue: str, raw: bytes, crashes: int = 0, on_start=None) -> Outcome:
        """Run one job.  ``on_start(timeout)`` is called just before the task runs."""
        t0 = time.perf_counter()
        try:
            job, task, policy = self.prepare(raw)
        except p.InvalidJob as bad:
            return self._invalid(queue, raw, bad, t0, crashes)  # started_at null: nothing ran
        if on_start is not None:
            on_start(policy.timeout)
        started = time.time()
        ctx = _current.set(JobInfo(job.id, job.task, queue, job.attempt, self.worker, crashes))
        try:
            result = task.fn(*job.args, **job.kwargs)
        except BaseException as e:  # a task calling sys.exit() fails its job, not the child
            return self._failed(queue, raw, job, policy, crashes, error_type_of(e), str(e),
                                traceback.format_exc(), started, t0)
        finally:
            _current.reset(ctx)
        base = self._base(job, queue, crashes, started)
        try:
            env = p.dumps(p.envelope(status=p.SUCCEEDED, result=result, **base))
        except (TypeError, ValueError, RecursionError) as e:
            reason = (f"result of task {job.task!r} is not JSON-serialisable ({e}); "
                      "return only dicts, lists, strings, numbers, booleans and None")
            return self._failed(queue, raw, job, policy, crashes, p.E_UNSERIALIZABLE_RESULT,
                                reason, None, started, t0, retry=False, dead=True)
        return Outcome(self._meta(job, p.SUCCEEDED, None, t0), env)

    def fail(self, queue: str, raw: bytes, crashes: int, error_type: str, message: str, *,
             retry: bool, dead: bool, started_at: float | None = None,
             ran: float | None = None) -> Outcome:
        """Fail a job the supervisor had to stop (timeout, poison pill) as if its task
        had raised: retried per its policy when ``retry``, dead-lettered when ``dead``.
        ``started_at``: when the run that was stopped started (unix seconds; None if no
        run of it ever started); ``ran``: how long it ran (the event's duration)."""
        t0 = time.perf_counter()
        try:
            job, _task, policy = self.prepare(raw)
        except p.InvalidJob as bad:
            # It ran, so it read well when it started; a reload since may have taken its
            # task away or changed its signature.  The verdict stands, with our defaults.
            try:
                job, policy = p.decode_job(raw, self.max_payload), self.defaults
            except p.InvalidJob:
                return self._invalid(queue, raw, bad, t0, crashes)
        return self._failed(queue, raw, job, policy, crashes, error_type, message, None,
                            started_at, t0, retry=retry, dead=dead, ran=ran)

    # -- outcomes ----------------------------------------------------------------------------

    def _failed(self, queue, raw, job: p.Job, policy: Policy, crashes, error_type, message,
                tb, started, t0, *, retry: bool = True, dead: bool = False,
                ran: float | None = None) -> Outcome:
        if retry and job.attempt <= policy.max_retries:
            delay = policy.backoff(job.attempt)
            meta = self._meta(job, "retrying", error_type, t0, ran)
            meta["retry_delay"] = delay
            meta["error"] = brief(message)
            return Outcome(meta, retry=job.retry())
        base = self._base(job, queue, crashes, started)
        env = p.envelope(status=p.FAILED, error=p.error_dict(error_type, message, tb), **base)
        entry = None
        if dead or policy.dead_letter:
            reason = message if dead else f"failed after {job.attempt} attempt(s): {error_type}: {message}"
            entry = p.dumps(p.dead_entry(raw, queue=queue, reason=reason, error_type=error_type,
                                         worker=self.worker, job_id=job.id))
        meta = self._meta(job, p.FAILED, error_type, t0, ran)
        meta["error"] = brief(message)
        return Outcome(meta, p.dumps(env), entry)

    def _invalid(self, queue, raw, bad: p.InvalidJob, t0, crashes: int = 0) -> Outcome:
        if self._own_key(bad.reply_to):
            bad.reply_to = None  # answered through the result key only
        # attempts as for any job: its attempt number (a retry refused after a reload took
        # its task away is not a first attempt), plus the runs of it a crash cut short.
        # started_at stays null only if no run of the job ever started ("safe to send
        # again"); an earlier attempt's or a crashed run's start is not known here, so
        # the refusal's own time stands for it: the latest that run can have started
        ran_before = bad.attempt > 1 or crashes > 0
        env = p.failed_envelope_for(bad, queue=queue, worker=self.worker, crashes=crashes,
                                    started_at=time.time() if ran_before else None)
        dead = p.dead_entry(raw, queue=queue, reason=bad.reason, error_type=bad.error_type,
                            worker=self.worker, job_id=bad.job_id)
        meta = {"id": bad.job_id, "task": bad.task, "status": p.FAILED,
                "error_type": bad.error_type, "result_id": bad.job_id if bad.result_ttl > 0 else None,
                "ttl": bad.result_ttl, "reply_to": bad.reply_to,
                "duration": time.perf_counter() - t0, "error": brief(bad.reason)}
        return Outcome(meta, p.dumps(env) if env else None, p.dumps(dead))

    def _base(self, job: p.Job, queue: str, crashes: int, started) -> dict:
        return dict(id=job.id, task=job.task, queue=queue, worker=self.worker,
                    attempts=job.attempt + crashes, enqueued_at=job.enqueued_at,
                    started_at=started)

    @staticmethod
    def _meta(job: p.Job, status: str, error_type: str | None, t0: float,
              ran: float | None = None) -> dict:
        # The result key is only worth writing when the producer knows the id.
        rid = None if job.id_assigned or job.result_ttl <= 0 else job.id
        return {"id": job.id, "task": job.task, "status": status, "error_type": error_type,
                "result_id": rid, "ttl": job.result_ttl, "reply_to": job.reply_to,
                "attempt": job.attempt,
                "duration": time.perf_counter() - t0 if ran is None else ran}

    # -- checks ------------------------------------------------------------------------------

    def _check(self, job: p.Job) -> Task:
        """The registered task for ``job``, or InvalidJob saying what to fix."""
        known = dict(job_id=None if job.id_assigned else job.id, result_ttl=job.result_ttl,
                     task=job.task, enqueued_at=job.enqueued_at, attempt=job.attempt)
        rt = job.reply_to
        if self._own_key(rt):
            raise p.InvalidJob(f"'reply_to' {rt!r} is one of redpool's own keys: use a key "
                               f"outside the {self.own_prefixes[0]!r} namespace, or "
                               f"{self.reply_prefix}<anything>", reply_to=rt, **known)
        t = self.registry.get(job.task)
        if t is None:
            names = self.registry.names()
            shown = ", ".join(names[:20]) + (f" and {len(names) - 20} more" if len(names) > 20 else "")
            close = suggest(job.task, tuple(names))
            hint = f"did you mean {' or '.join(map(repr, close))}?; " if close else ""
            raise p.InvalidJob(f"unknown task {job.task!r} ({hint}registered: {shown or 'none'}); "
                               "check the name, or start the worker with the module that defines it",
                               p.E_UNKNOWN_TASK, reply_to=rt, **known)
        why = t.check_arguments(job.args, job.kwargs)
        if why:
            raise p.InvalidJob(why, reply_to=rt, **known)
        return t

    def _own_key(self, key: str | None) -> bool:
        """A reply pushed onto one of our own keys (a queue!) would corrupt it."""
        return bool(key) and key.startswith(self.own_prefixes) and not key.startswith(self.reply_prefix)


#: The longest exception message a job_finished event carries (the envelope keeps it whole).
ERROR_IN_EVENT = 300


def brief(message: str, limit: int = ERROR_IN_EVENT) -> str:
    """``message`` cut to ``limit`` characters for a log line, saying that it was cut."""
    return message if len(message) <= limit else message[:limit - 1] + "…"


@functools.lru_cache(maxsize=256)
def suggest(name: str, names: tuple[str, ...], limit: int = 3) -> list[str]:
    """The registered names ``name`` was probably meant to be.

    Task names share long module prefixes (``myapp.tasks.``), which make every name of
    a module look alike to a plain similarity ratio; so a name whose function part is
    exactly ours comes first (a task moved to another module, or named without its
    module), and otherwise only the closest names by difflib's ratio, those within a
    hair of the best one.  Cached: a producer sending thousands of jobs of a wrong name
    must not make each one cost a comparison with every registered name."""
    tail = name.rsplit(".", 1)[-1]
    same = [n for n in names if n.rsplit(".", 1)[-1] == tail]
    if same:
        return same[:limit]
    scored = sorted((-difflib.SequenceMatcher(None, name, n).ratio(), n) for n in names)
    if not scored or -scored[0][0] < 0.8:
        return []
    best = -scored[0][0]
    return [n for score, n in scored[:limit] if -score >= best - 0.04]


def error_type_of(e: BaseException) -> str:
    """``error.type`` of a task's exception: a built-in by its bare name (ValueError), any
    other class as module.QualName (myapp.errors.QuotaExceeded), so that a task's own
    class never passes for a built-in or for another module's class of the same name."""
    t = type(e)
    return t.__qualname__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"
