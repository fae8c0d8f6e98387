"""The wire format: jobs, result envelopes, dead-letter entries (key names: keys.py).

This module and keys.py are the contract with producers in every language and
mirror docs/protocol.md; change one, change the other (and the JSON Schemas in
schema/).  They import nothing else from redpool on purpose: a reviewer must be
able to read the whole contract in these two files.

Decoding is strict about the fields it knows and lenient about the ones it
does not: unknown fields are kept (``Job.extra``) and ignored, so a newer
producer can talk to an older worker.
"""

from __future__ import annotations

import json
import math
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from .encoding import TooLarge, dumps, job_fields  # noqa: F401  (part of the contract)
from .keys import DEFAULT_NAMESPACE, Keys  # noqa: F401  (re-exported: part of the contract)
from .strictjson import MAX_DEPTH, Refused, unpaired_surrogate  # noqa: F401  (the same)
from .strictjson import dumps_exactly, lenient, not_unicode, too_deep, top_level
from .strictjson import loads as _loads_job

VERSION = 1
DEFAULT_RESULT_TTL = 86400  # seconds
DEFAULT_MAX_PAYLOAD = 1024 * 1024  # bytes
# A retry may be this much over --max-payload: the worker writes it with the attempt
# number and, for a job that had none, the id it assigned (about 60 bytes).
RETRY_SLACK = 128
# Largest envelope of a succeeded job (--max-result-size): far below the 512 MB string
# Redis refuses, and what a supervisor may hold per job in flight (docs/design.md).
DEFAULT_MAX_RESULT_SIZE = 16 * 1024 * 1024
MAX_ERROR_TEXT = 64 * 1024  # characters of error.message and of error.traceback
DEAD_JOB_KEPT = 64 * 1024   # bytes kept of a job over --max-payload in its dead-letter entry
# Redis refuses EX/EXPIRE beyond ~9e15 s (and Lua numbers are doubles); past it the completion
# script fails after removing the job, losing it.  2**31-1 s (68 years) also fits an int32.
MAX_RESULT_TTL = 2**31 - 1
# Retries of one job, at most (its field, a task's option, --max-retries): ~35 days of
# retries at the default backoff cap, and bounded numbers for the backoff arithmetic.
MAX_RETRIES = 10_000
MAX_ATTEMPT = MAX_RETRIES + 1  # the last attempt of a job retried MAX_RETRIES times

# \Z, not $: in Python '$' also matches before a trailing newline, so "job-1\n" would pass.
# (The JSON Schemas say '$', which in their ECMA-262 dialect means the very end.)
ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}\Z")
# Supervisor names end up inside key names that are parsed back, so no ':'.
NAME_RE = re.compile(r"^[A-Za-z0-9._-]{1,128}\Z")

SUCCEEDED = "succeeded"
FAILED = "failed"

# Error types a worker puts in a failed envelope / dead-letter entry of its own, and
# TimeoutError (an attempt stopped at its timeout).  A task's exception is named by its
# class: built-ins bare (ValueError), any other class as module.QualName
# (myapp.errors.QuotaExceeded), so that two classes of one name stay apart
# (runner.error_type_of).
E_INVALID_JOB = "InvalidJob"
E_UNKNOWN_TASK = "UnknownTask"
E_PAYLOAD_TOO_LARGE = "PayloadTooLarge"
E_UNSERIALIZABLE_RESULT = "UnserializableResult"
E_RESULT_TOO_LARGE = "ResultTooLarge"
E_UNPRINTABLE_ERROR = "UnprintableError"   # a task's exception whose class cannot be named
E_WORKER_ERROR = "WorkerError"             # the worker failed to settle the job (a bug of ours)
E_WORKER_CRASHED = "WorkerCrashed"
E_TIMEOUT = "TimeoutError"


class InvalidJob(Exception):
    """A job the worker cannot run.  ``reason`` is written for a human."""

    def __init__(self, reason: str, error_type: str = E_INVALID_JOB,
                 job_id: str | None = None, reply_to: str | None = None,
                 result_ttl: int = DEFAULT_RESULT_TTL, task: str | None = None,
                 enqueued_at: float | None = None, attempt: int = 1) -> None:
        super().__init__(reason)
        self.reason = reason
        self.error_type = error_type
        self.job_id = job_id
        self.reply_to = reply_to
        self.result_ttl = result_ttl
        self.task = task
        self.enqueued_at = enqueued_at
        self.attempt = attempt   # the job's own, when it says one that reads well



@dataclass(slots=True)
class Job:
    task: str
    id: str
    args: list[Any] = field(default_factory=list)
    kwargs: dict[str, Any] = field(default_factory=dict)
    reply_to: str | None = None
    result_ttl: int = DEFAULT_RESULT_TTL
    enqueued_at: float | None = None
    v: int = VERSION
    # delivery policy; None: the task's option, else the worker's default
    max_retries: int | None = None
    retry_backoff: float | None = None
    retry_backoff_max: float | None = None
    timeout: float | None = None
    dead_letter: bool | None = None
    attempt: int = 1           # 1 for the first run; the worker counts retries up
    id_assigned: bool = False  # True when the worker made the id up
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = dict(self.extra)
        d.update(task=self.task, args=self.args, kwargs=self.kwargs)
        if not self.id_assigned:
            d["id"] = self.id
        if self.reply_to is not None:
            d["reply_to"] = self.reply_to
        if self.result_ttl != DEFAULT_RESULT_TTL:
            d["result_ttl"] = self.result_ttl
        if self.enqueued_at is not None:
            d["enqueued_at"] = self.enqueued_at
        for name in POLICY_FIELDS:
            value = getattr(self, name)
            if value is not None:
                d[name] = value
        if self.attempt != 1:
            d["attempt"] = self.attempt
        d["v"] = self.v
        return d

    def retry(self) -> bytes:
        """The job's next attempt, as bytes to schedule.  The id is kept (even one the
        worker assigned), so every attempt of a job shares it."""
        d = self.to_dict()
        d["id"] = self.id
        d["attempt"] = self.attempt + 1
        return dumps_exactly(d)  # (an unpaired surrogate in args comes back as it went)


#: Optional job fields that override a task's options and the worker's defaults.
POLICY_FIELDS = ("max_retries", "retry_backoff", "retry_backoff_max", "timeout", "dead_letter")

_KNOWN = frozenset({"task", "id", "args", "kwargs", "reply_to", "result_ttl", "enqueued_at", "v",
                    "attempt", *POLICY_FIELDS})


def new_id() -> str:
    return uuid.uuid4().hex


def make_job(task: str, args: list | tuple = (), kwargs: dict | None = None, *,
             id: str | None = None, reply_to: str | None = None,
             result_ttl: int | None = None, now: float | None = None,
             **policy: Any) -> dict[str, Any]:
    """Build a job object as a producer would; validated like a worker would.
    ``policy``: any of POLICY_FIELDS (max_retries, retry_backoff, timeout, ...)."""
    unknown = set(policy) - set(POLICY_FIELDS)
    if unknown:
        raise TypeError(f"unknown job option(s) {sorted(unknown)}; known: {list(POLICY_FIELDS)}")
    job: dict[str, Any] = {
        "v": VERSION,
        "id": new_id() if id is None else id,
        "task": task,
        "args": list(args),
        "kwargs": dict(kwargs or {}),
        "enqueued_at": time.time() if now is None else now,
    }
    if reply_to is not None:
        job["reply_to"] = reply_to
    if result_ttl is not None:
        job["result_ttl"] = result_ttl
    job.update((k, v) for k, v in policy.items() if v is not None)
    _validate(job)  # fail in the producer, not later in a dead-letter list
    return job


def encode_job(job: dict[str, Any]) -> bytes:
    return dumps(job)


def loads(data: bytes | str) -> Any:
    return json.loads(data)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    # Finite only: json.loads accepts NaN/Infinity (and 1e400 -> inf), which dumps() refuses,
    # so a non-finite enqueued_at would make the job's envelope unwritable.
    if isinstance(v, float):
        return math.isfinite(v)
    return isinstance(v, int) and not isinstance(v, bool)


def _usable(obj: dict[str, Any]) -> dict[str, Any]:
    """What can still be salvaged from a bad job to answer its producer."""
    out: dict[str, Any] = {}
    jid = obj.get("id")
    if isinstance(jid, str) and ID_RE.match(jid):
        out["job_id"] = jid
    rt = obj.get("reply_to")
    if isinstance(rt, str) and rt and unpaired_surrogate(rt) is None:
        out["reply_to"] = rt
    ttl = obj.get("result_ttl")
    if _is_int(ttl) and 0 <= ttl <= MAX_RESULT_TTL:
        out["result_ttl"] = ttl
    task = obj.get("task")
    if isinstance(task, str) and unpaired_surrogate(task) is None:
        out["task"] = task
    if _is_number(obj.get("enqueued_at")):
        out["enqueued_at"] = obj["enqueued_at"]
    attempt = obj.get("attempt")
    if _is_int(attempt) and 1 <= attempt <= MAX_ATTEMPT:
        out["attempt"] = attempt
    return out


def _validate(obj: dict[str, Any]) -> None:
    """Raise InvalidJob naming the first field that is wrong, and how to fix it."""
    def bad(reason: str) -> InvalidJob:
        return InvalidJob(reason, **_usable(obj))

    if "task" not in obj:
        raise bad("job has no 'task' field: set it to the name of a registered task")
    task = obj["task"]
    if not isinstance(task, str) or not task:
        raise bad(f"'task' must be a non-empty string, got {_type(task)}")
    if not task.isascii() and unpaired_surrogate(task) is not None:
        raise bad(not_unicode("task", task, "no task is registered under such a name: "
                               "send the task's name as whole characters"))
    if "id" in obj:
        jid = obj["id"]
        if not isinstance(jid, str) or not ID_RE.match(jid):
            raise bad(f"'id' must be 1-128 characters of [A-Za-z0-9._:-], got {_short(jid)}")
    if "args" in obj and not isinstance(obj["args"], list):
        raise bad(f"'args' must be a JSON array, got {_type(obj['args'])}")
    if "kwargs" in obj and not isinstance(obj["kwargs"], dict):
        raise bad(f"'kwargs' must be a JSON object, got {_type(obj['kwargs'])}")
    if "reply_to" in obj:
        rt = obj["reply_to"]
        if not isinstance(rt, str) or not rt:
            raise bad(f"'reply_to' must be a non-empty string (a list key), got {_type(rt)}")
        if not rt.isascii() and unpaired_surrogate(rt) is not None:  # (answered by result key)
            raise bad(not_unicode("reply_to", rt, "no Redis key can hold it: use a key of "
                                   "whole characters, e.g. myapp:reply:<id>"))
    if "result_ttl" in obj:
        ttl = obj["result_ttl"]
        if not _is_int(ttl) or not 0 <= ttl <= MAX_RESULT_TTL:
            raise bad(f"'result_ttl' must be a whole number of seconds >= 0 and <= {MAX_RESULT_TTL}, "
                      f"got {_short(ttl)}")
    if "enqueued_at" in obj and not _is_number(obj["enqueued_at"]):
        raise bad(f"'enqueued_at' must be a finite number (unix seconds), "
                  f"got {_short(obj['enqueued_at'])}")
    for name, low, high in (("max_retries", 0, MAX_RETRIES), ("attempt", 1, MAX_ATTEMPT)):
        if name in obj and (not _is_int(obj[name]) or not low <= obj[name] <= high):
            raise bad(f"'{name}' must be a whole number >= {low} and <= {high}, "
                      f"got {_short(obj[name])}")
    for name in ("retry_backoff", "retry_backoff_max", "timeout"):
        if name in obj and (not _is_number(obj[name]) or obj[name] <= 0 or obj[name] > MAX_RESULT_TTL):
            raise bad(f"'{name}' must be a number of seconds > 0 and <= {MAX_RESULT_TTL}, "
                      f"got {_short(obj[name])}")
    if "dead_letter" in obj and not isinstance(obj["dead_letter"], bool):
        raise bad(f"'dead_letter' must be true or false, got {_short(obj['dead_letter'])}")
    if "v" in obj:
        v = obj["v"]
        if not _is_int(v) or v < 1:
            raise bad(f"'v' must be a positive integer protocol version, got {_short(v)}")
        if v > VERSION:
            raise bad(f"protocol version {v} is newer than this worker understands "
                      f"(max {VERSION}): upgrade redpool on the workers")


def _type(v: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
            int: "a number", float: "a number", type(None): "null"}.get(type(v), type(v).__name__)


def _short(v: Any) -> str:
    r = json.dumps(v, default=repr)
    return r if len(r) <= 60 else r[:57] + "..."


#: A UTF-8 byte-order mark: producers must not send one, a worker ignores one at the start.
UTF8_BOM = b"\xef\xbb\xbf"


def decode_job(raw: bytes, max_payload: int = DEFAULT_MAX_PAYLOAD) -> Job:
    """Parse and validate raw job bytes.  Raises InvalidJob with a human reason."""
    if len(raw) > max_payload and not (len(raw) <= max_payload + RETRY_SLACK
                                        and _salvaged(raw).get("attempt", 1) > 1):
        raise InvalidJob(f"payload is {len(raw)} bytes, over the limit of {max_payload} "
                         "(--max-payload): store large data elsewhere and pass a reference",
                         E_PAYLOAD_TOO_LARGE, **_salvaged(raw))
    if raw[:3] == UTF8_BOM:  # ignored, as RFC 8259 allows (.NET and PowerShell write one)
        raw = raw[3:]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidJob(f"job is not UTF-8 text ({e.reason} at byte {e.start}): send JSON "
                         "encoded as UTF-8", **_salvaged(raw)) from None
    try:
        obj = _loads_job(text, raw)
    except Refused as e:
        raise InvalidJob(e.reason, **_salvaged(raw)) from None
    if not isinstance(obj, dict):
        raise InvalidJob(f"job must be a JSON object, got {_type(obj)}")
    _validate(obj)
    jid = obj.get("id")
    return Job(
        task=obj["task"],
        id=jid if jid is not None else new_id(),
        id_assigned=jid is None,
        args=obj.get("args", []),
        kwargs=obj.get("kwargs", {}),
        reply_to=obj.get("reply_to"),
        result_ttl=obj.get("result_ttl", DEFAULT_RESULT_TTL),
        enqueued_at=obj.get("enqueued_at"),
        v=obj.get("v", VERSION),
        max_retries=obj.get("max_retries"),
        retry_backoff=obj.get("retry_backoff"),
        retry_backoff_max=obj.get("retry_backoff_max"),
        timeout=obj.get("timeout"),
        dead_letter=obj.get("dead_letter"),
        attempt=obj.get("attempt", 1),
        extra={k: v for k, v in obj.items() if k not in _KNOWN},
    )


def _salvaged(raw: bytes) -> dict[str, Any]:
    """What identifies the producer of a job that cannot be read whole (not UTF-8, too
    deep, not JSON, too large), to answer it: its top-level fields, read leniently.
    Bytes that are not UTF-8 become lone surrogates, so a reply_to holding any is not
    taken (_usable); a field nested too deeply to read is left out, not its siblings."""
    try:
        if too_deep(raw):
            raw = top_level(raw)
        obj = lenient(raw.decode("utf-8", "surrogateescape"))
    except (ValueError, RecursionError):
        return {}
    return _usable(obj) if isinstance(obj, dict) else {}


def salvage(raw: bytes) -> InvalidJob | Job:
    """Best effort: whatever identifies the producer of ``raw``, never raises."""
    try:
        return decode_job(raw, max_payload=len(raw))
    except InvalidJob as e:
        return e
    except Exception as e:  # pragma: no cover - belt and braces for "never crash on input"
        return InvalidJob(f"job could not be read: {e!r}")


# -- result envelopes -------------------------------------------------------------------------

def envelope(*, id: str, task: str | None, queue: str, status: str, worker: str,
             attempts: int = 1, result: Any = None, error: dict[str, Any] | None = None,
             enqueued_at: float | None = None, started_at: float | None = None,
             finished_at: float | None = None, warnings: list[str] | None = None) -> dict[str, Any]:
    env: dict[str, Any] = {
        "v": VERSION,
        "id": id,
        "task": task,
        "queue": queue,
        "status": status,
        "attempts": attempts,
        "worker": worker,
        "enqueued_at": enqueued_at,
        "started_at": started_at,
        "finished_at": time.time() if finished_at is None else finished_at,
    }
    if status == SUCCEEDED:
        env["result"] = result
    else:
        env["error"] = error or error_dict("Error", "unknown error")
    if warnings:
        env["warnings"] = list(warnings)
    return env


def error_dict(type_: str, message: str, traceback: str | None = None) -> dict[str, Any]:
    return {"type": type_, "message": message, "traceback": traceback}


def failed_envelope_for(bad: InvalidJob, *, queue: str, worker: str,
                        started_at: float | None = None, crashes: int = 0) -> dict[str, Any] | None:
    """The failed envelope that tells a bad job's producer why, if it can be reached.
    ``crashes``: the runs of this attempt a crash cut short (they count in attempts)."""
    if bad.job_id is None and bad.reply_to is None:
        return None
    return envelope(id=bad.job_id or new_id(), task=bad.task, queue=queue, status=FAILED,
                    worker=worker, error=error_dict(bad.error_type, bad.reason),
                    attempts=bad.attempt + crashes, enqueued_at=bad.enqueued_at,
                    started_at=started_at)


def dead_entry(raw: bytes, *, queue: str, reason: str, error_type: str, worker: str,
               job_id: str | None = None, now: float | None = None,
               max_job: int | None = None, warnings: list[str] | None = None) -> dict[str, Any]:
    """A dead-letter entry.  The raw job is kept as text when it is UTF-8, else base64;
    of a job over ``max_job`` bytes (--max-payload) only its first DEAD_JOB_KEPT, and
    ``job_size`` says how long it was (such an entry cannot be requeued)."""
    entry: dict[str, Any] = {
        "v": VERSION,
        "id": job_id,
        "queue": queue,
        "reason": reason,
        "error_type": error_type,
        "worker": worker,
        "failed_at": time.time() if now is None else now,
    }
    fields, cut = job_fields(raw, max_job, DEAD_JOB_KEPT)
    entry.update(fields)
    warnings = [*(warnings or ()), *([cut] if cut else [])]
    if warnings:
        entry["warnings"] = warnings
    return entry
