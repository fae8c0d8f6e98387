"""Running one job inside a pool process: decode, validate, run, encode.

Everything a job can get wrong becomes an outcome here (a dead-letter entry and a
failed envelope, or a retry): nothing a job does can end the child's loop except
killing the process.  That includes what its task returns or raises: a result JSON
cannot hold or too large to send, an exception whose message or class cannot be read;
and, as a last resort, a fault of ours while settling it (``total``).  The delivery
policy (retries, backoff, timeout, dead-lettering) is resolved here too, because only the child knows the task's options: job field,
then task option, then the worker's default.
"""

from __future__ import annotations

import difflib
import functools
import math
import random
import time
import traceback
import types
from dataclasses import dataclass, replace
from typing import Any

from . import encoding
from . import protocol as p
from .registry import JobInfo, Registry, Task, _current
from .replies import ReplyRule


@dataclass(frozen=True)
class Policy:
    max_retries: int = 0
    retry_backoff: float = 1.0
    retry_backoff_max: float = 300.0
    timeout: float = 0.0            # 0: no limit
    dead_letter: bool = False
    # The worker's alone, never a job's or a task's: the patterns of reply_to keys it
    # answers on besides <ns>:reply:* (--reply-to; replies.py)
    reply_patterns: tuple[str, ...] = ()

    def resolve(self, job: p.Job, task: Task) -> "Policy":
        """Job field, else task option, else this (the worker's default)."""
        def pick(name: str) -> Any:
            v = getattr(job, name)
            if v is None:
                v = task.options.get(name)
            return getattr(self, name) if v is None else v
        policy = Policy(*(pick(n) for n in p.POLICY_FIELDS), self.reply_patterns)
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


def total(method):
    """Runner.run and Runner.fail always return an Outcome: whatever escapes them (a
    bug of ours, MemoryError) fails the job through _last_resort instead of killing
    the process, which would only put the job back for the next one to die on."""
    @functools.wraps(method)
    def guarded(self: "Runner", queue: str, raw: bytes, crashes: int = 0, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return method(self, queue, raw, crashes, *args, **kwargs)
        except BaseException as e:
            return self._last_resort(queue, raw, crashes, e, t0)
    return guarded


class Runner:
    def __init__(self, registry: Registry, worker: str, max_payload: int,
                 namespace: str = p.DEFAULT_NAMESPACE, defaults: Policy | None = None,
                 max_result_size: int = p.DEFAULT_MAX_RESULT_SIZE) -> None:
        self.registry = registry
        self.worker = worker
        self.max_payload = max_payload
        self.max_result_size = max_result_size
        self.defaults = defaults or Policy()
        # where this worker may push answers: <ns>:reply:*, and the operator's patterns
        self.replies = ReplyRule(namespace, self.defaults.reply_patterns)
        self.reply_prefix = self.replies.reply_prefix

    def prepare(self, raw: bytes) -> tuple[p.Job, Task, Policy]:
        """Decode and check a job; raises InvalidJob saying what to fix."""
        job = p.decode_job(raw, self.max_payload)
        task = self._check(job)
        return job, task, self.defaults.resolve(job, task)

    @total
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
            return self._failed(queue, raw, job, policy, crashes, error_type_of(e),
                                message_of(e), traceback_of(e), started, t0)
        finally:
            _current.reset(ctx)
        base = self._base(job, queue, crashes, started)
        try:
            env = p.dumps(p.envelope(status=p.SUCCEEDED, result=result, **base),
                          self.max_result_size)
        except p.TooLarge as e:
            reason = (f"result of task {job.task!r} is too large: its envelope is "
                      f"{'' if e.exact else 'at least '}{e.size} bytes of JSON, over the limit "
                      f"of {e.limit} (--max-result-size); store large data elsewhere (a file, "
                      "an object store, a key of your own) and return a reference to it")
            return self._failed(queue, raw, job, policy, crashes, p.E_RESULT_TOO_LARGE,
                                reason, None, started, t0, retry=False, dead=True)
        except BaseException as e:  # TypeError, ValueError, RecursionError; or whatever
            # a dict subclass's items() or an object's __class__ raises
            reason = (f"result of task {job.task!r} is not JSON-serialisable "
                      f"({unserialisable(e, result)}); return only dicts, lists, strings, "
                      "numbers, booleans and None")
            return self._failed(queue, raw, job, policy, crashes, p.E_UNSERIALIZABLE_RESULT,
                                reason, None, started, t0, retry=False, dead=True)
        return Outcome(self._meta(job, p.SUCCEEDED, None, t0), env)

    @total
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
            if self._refused(job.reply_to):  # (a worker that allows it ran it)
                out = self._failed(queue, raw, job, policy, crashes, error_type, message,
                                   None, started_at, t0, retry=retry, dead=dead, ran=ran)
                out.meta["reply_to"] = None  # answered through the result key only
                return out
        return self._failed(queue, raw, job, policy, crashes, error_type, message, None,
                            started_at, t0, retry=retry, dead=dead, ran=ran)

    # -- outcomes ----------------------------------------------------------------------------

    def _failed(self, queue, raw, job: p.Job, policy: Policy, crashes, error_type, message,
                tb, started, t0, *, retry: bool = True, dead: bool = False,
                ran: float | None = None) -> Outcome:
        if retry and job.attempt <= policy.max_retries:
            again = job.retry()
            if len(again) <= self.max_payload + p.RETRY_SLACK:
                meta = self._meta(job, "retrying", error_type, t0, ran)
                meta["retry_delay"] = policy.backoff(job.attempt)
                meta["error"] = brief(message)
                return Outcome(meta, retry=again)
            # written again (numbers as Python writes them), it no longer fits: it fails
            # now, saying why, rather than be refused as PayloadTooLarge when it comes back
            message += (f" (not retried: its next attempt would be {len(again)} bytes, over "
                        f"--max-payload {self.max_payload})")
        base = self._base(job, queue, crashes, started)
        message, cut_message = encoding.cut(message, p.MAX_ERROR_TEXT, "error message")
        cut_tb = None
        if tb is not None:
            tb, cut_tb = encoding.cut(tb, p.MAX_ERROR_TEXT, "traceback")
        warnings = [w for w in (cut_message, cut_tb) if w]
        env = p.envelope(status=p.FAILED, error=p.error_dict(error_type, message, tb),
                         warnings=warnings, **base)
        entry = None
        if dead or policy.dead_letter:
            reason = message if dead else f"failed after {job.attempt} attempt(s): {error_type}: {message}"
            entry = p.dumps(p.dead_entry(raw, queue=queue, reason=reason, error_type=error_type,
                                         worker=self.worker, job_id=job.id,
                                         max_job=self.max_payload,
                                         warnings=[cut_message] if cut_message else None))
        meta = self._meta(job, p.FAILED, error_type, t0, ran)
        meta["error"] = brief(message)
        return Outcome(meta, p.dumps(env), entry)

    def _invalid(self, queue, raw, bad: p.InvalidJob, t0, crashes: int = 0, *,
                 ran: bool = False, tb: str | None = None) -> Outcome:
        if self._refused(bad.reply_to):
            bad.reply_to = None  # answered through the result key only
        # a failed envelope is small whatever the job: a task name of megabytes (or one
        # the reason quotes) is cut as an error message is
        bad.reason, cut_reason = encoding.cut(bad.reason, p.MAX_ERROR_TEXT, "error message")
        cut_task = None
        if bad.task is not None:
            bad.task, cut_task = encoding.cut(bad.task, p.MAX_ERROR_TEXT, "task")
        # attempts as for any job: its attempt number (a retry refused after a reload took
        # its task away is not a first attempt), plus the runs of it a crash cut short.
        # started_at stays null only if no run of the job ever started ("safe to send
        # again"); an earlier attempt's or a crashed run's start is not known here, so
        # the refusal's own time stands for it: the latest that run can have started
        ran_before = ran or bad.attempt > 1 or crashes > 0
        env = p.failed_envelope_for(bad, queue=queue, worker=self.worker, crashes=crashes,
                                    started_at=time.time() if ran_before else None)
        if env is not None:
            env["error"]["traceback"] = tb
            if cut_reason or cut_task:
                env["warnings"] = [w for w in (cut_reason, cut_task) if w]
        dead = p.dead_entry(raw, queue=queue, reason=bad.reason, error_type=bad.error_type,
                            worker=self.worker, job_id=bad.job_id, max_job=self.max_payload,
                            warnings=[cut_reason] if cut_reason else None)
        meta = {"id": bad.job_id, "task": bad.task, "status": p.FAILED,
                "error_type": bad.error_type, "result_id": bad.job_id if bad.result_ttl > 0 else None,
                "ttl": bad.result_ttl, "reply_to": bad.reply_to,
                "duration": time.perf_counter() - t0, "error": brief(bad.reason)}
        return Outcome(meta, p.dumps(env) if env else None, p.dumps(dead))

    def _last_resort(self, queue: str, raw: bytes, crashes: int, e: BaseException,
                     t0: float) -> Outcome:
        """A fault of ours while settling a job (see ``total``): fail it with WorkerError,
        dead-lettered, not retried; answered as any failed job (what salvage finds).  It
        may have run: its started_at is now, not null."""
        message = (f"the worker failed while settling this job: {error_type_of(e)}: "
                   f"{message_of(e)}; this is a bug in redpool (or the process ran out of "
                   "memory): please report it with this envelope's traceback")
        tb = traceback_of(e)
        try:
            found = p.salvage(raw)
            bad = found if isinstance(found, p.InvalidJob) else p.InvalidJob(
                "", job_id=None if found.id_assigned else found.id, reply_to=found.reply_to,
                result_ttl=found.result_ttl, task=found.task, enqueued_at=found.enqueued_at,
                attempt=found.attempt)
            bad.reason, bad.error_type = message, p.E_WORKER_ERROR
            return self._invalid(queue, raw, bad, t0, crashes, ran=True,
                                 tb=encoding.cut(tb, p.MAX_ERROR_TEXT, "traceback")[0])
        except BaseException:  # (no memory left, say): no envelope, but the job is kept
            dead = p.dumps(p.dead_entry(raw, queue=queue, reason=message[:p.MAX_ERROR_TEXT],
                                        error_type=p.E_WORKER_ERROR, worker=self.worker,
                                        max_job=0))
            return Outcome({"id": None, "task": None, "status": p.FAILED,
                            "error_type": p.E_WORKER_ERROR, "result_id": None, "ttl": 0,
                            "reply_to": None, "duration": time.perf_counter() - t0,
                            "error": brief(message)}, None, dead)

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
        if self._refused(rt):
            raise p.InvalidJob(self.replies.refusal(rt), reply_to=rt, **known)
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

    def _refused(self, key: str | None) -> bool:
        """A reply_to this worker may not push onto: one of our own keys (a queue!), or
        another application's list the operator did not allow (replies.py)."""
        return key is not None and not key.startswith(self.reply_prefix) \
            and not self.replies.allows(key)


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


# -- what a task raised or returned, said whatever it is -------------------------------------
# Each of these never raises: a task's exception may have a __str__ that raises, a class
# whose __module__ is not a string, a traceback that cannot be formatted.

#: The longest error.type: a class's qualified name can be as long as anyone likes.
MAX_TYPE = 256


def error_type_of(e: BaseException) -> str:
    """``error.type`` of a task's exception: a built-in by its bare name (ValueError), any
    other class as module.QualName (myapp.errors.QuotaExceeded), so that a task's own
    class never passes for a built-in or for another module's class of the same name.
    A module that is not a string reads ``<unknown>``, as in Python's tracebacks; a class
    whose name cannot be read at all is UnprintableError.  Unpaired surrogates (a
    ``__qualname__`` or ``__module__`` may hold them) are replaced by U+FFFD here, so
    the type reads the same in the envelope, the dead letter, the events and the logs."""
    try:
        t = type(e)
        name, module = str.__str__(t.__qualname__), t.__module__
        if type(module) is str and module == "builtins":
            return name[:MAX_TYPE]
        module = str.__str__(module) if issubclass(type(module), str) and module else "<unknown>"
        text = brief(f"{module}.{name}", MAX_TYPE)
        return text if text.isascii() else encoding.fix(text)[0]
    except BaseException:
        return p.E_UNPRINTABLE_ERROR


def message_of(e: BaseException) -> str:
    """``str(e)``, or what went wrong reading it; never empty."""
    try:
        text = str.__str__(str(e))  # (an exact str, whatever __str__ returned)
        # MemoryError(), KeyError(): an empty message would tell the producer nothing
        return text or f"{error_type_of(e)} raised with no message (see the traceback)"
    except BaseException as inner:
        return f"<the exception's message could not be read: str() raised {error_type_of(inner)}>"


def traceback_of(e: BaseException) -> str:
    try:
        return "".join(traceback.format_exception(e))
    except BaseException as inner:
        return (f"<the traceback of {error_type_of(e)} could not be formatted: "
                f"{error_type_of(inner)} was raised formatting it>")


def unserialisable(e: BaseException, result: Any) -> str:
    """Why json refused a task's result, with a hint for the usual mistakes."""
    kind = type(e)   # (not isinstance: that may ask the object's own __class__)
    if issubclass(kind, RecursionError):
        why = "it is nested too deeply"
    elif issubclass(kind, MemoryError):
        why = "the worker ran out of memory encoding it"
    elif issubclass(kind, (TypeError, ValueError)):
        why = brief(message_of(e))
        if why.startswith("Out of range float"):
            why = "it holds NaN or an infinity, which JSON cannot"
    else:
        why = f"{error_type_of(e)} was raised encoding it: {brief(message_of(e))}"
    if type(result) is types.GeneratorType:
        why += "; a generator: return a list of what it yields"
    elif type(result) is types.CoroutineType:
        why += "; a coroutine: tasks are plain functions (run it with asyncio.run inside one)"
        try:
            result.close()  # (no "never awaited" warning: said here)
        except BaseException:
            pass
    return why
