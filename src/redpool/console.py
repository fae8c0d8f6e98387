"""Log lines for people: what `--log-format console` (stderr a terminal) prints.

The JSON lines keep every field as emitted, for machines.  A person reading a
terminal wants less, and in a readable form:

* the local time to the millisecond (``12:04:05.123``), not an ISO UTC stamp; a
  field that holds a unix time (``started_at``, ``enqueued_at``, ...) the same way;
* durations as ``12ms`` / ``1.52s`` / ``4m05s``;
* no noise: a field that is None or False is left out, and on a job's line so are
  ``result_id`` (the job's id again), a default ``ttl``, and ``attempt=1``; a failed
  job's ``error_type`` and ``error`` (its message) read as one ``error="Type: message"``;
* a traceback (exc_info, or a field holding one) on its own lines after the line;
* an event that carries a ``message`` sentence (``draining``) says the sentence.

A worker's lines start with the time and level (``12:04:05.123 info    started ...``);
a one-shot command's (status, dead, ...) read like any command-line tool's
(``redpool: cannot reach Redis at ...``).

Written here rather than with structlog's ConsoleRenderer: that renderer's columns,
padding and value quoting changed within the structlog versions we accept (the
golden lines of tests/test_output.py must not move with a library upgrade), and it
has no notion of per-event noise.  Exceptions go through structlog's plain
formatter (not rich's, which would print every frame's local variables).
"""

from __future__ import annotations

import json
import time
from io import StringIO
from typing import Any

import structlog

from .protocol import DEFAULT_RESULT_TTL

# Fields that hold a number of seconds: shown as 12ms, 1.52s, 30s, 4m05s.
SECONDS = frozenset({"duration", "uptime", "grace", "lease", "timeout", "retry_in",
                     "retry_delay", "drain_left", "age", "delay", "wait"})
# A job's line: these first, in this order, then the rest as emitted.
JOB_ORDER = ("task", "id", "queue", "status", "duration", "attempt", "error")
# `started` carries the lease's whole info dict (for status); on a person's screen
# only who and where matter: the counters are all zero and the times are now.
STARTED_NOISE = frozenset({"inflight", "succeeded", "failed", "retried", "dead", "state",
                           "heartbeat_at", "rate_1m", "started_at", "version"})
EVENT_WIDTH = 14
BELOW = "\0below"   # a field whose text goes on its own lines, below the line
LEVEL_WIDTH = 7

_RESET, _DIM, _BOLD = "\x1b[0m", "\x1b[2m", "\x1b[1m"
_LEVEL_COLOURS = {"debug": "\x1b[2m", "info": "\x1b[32m", "warning": "\x1b[33m",
                  "error": "\x1b[31;1m", "critical": "\x1b[31;1m"}


class ConsoleRenderer:
    """The last structlog processor of the console format (also used, through
    structlog.stdlib.ProcessorFormatter, for stdlib logging records)."""

    def __init__(self, *, clock: bool = True, colors: bool = False,
                 exception_formatter=None) -> None:
        self.clock = clock       # a worker's lines: time and level first
        self.colors = colors
        if exception_formatter is None:
            # Never structlog's default: with rich installed it is rich's traceback with
            # show_locals, which prints every frame's variables, passwords in Redis URLs
            # included (redact_url cannot reach them)
            exception_formatter = structlog.dev.plain_traceback
        self.exception_formatter = exception_formatter

    def __call__(self, logger: Any, method: str, event_dict: dict) -> str:
        ev = dict(event_dict)
        ts = ev.pop("timestamp", None)
        level = str(ev.pop("level", method) or "info")
        exc_info = ev.pop("exc_info", None)
        exception = ev.pop("exception", None)  # already formatted (format_exc_info)
        ev.pop("stack", None)
        event = str(ev.pop("event", ""))
        head, fields = self.headline(event, ev, ts)
        blocks: list[str] = []
        parts = []
        for key, value in fields.items():
            shown, block = show(key, value, ts)
            if block:
                blocks.append(block)
            if shown is not None:
                parts.append(f"{self._key(key)}={shown}")
        line = self.prefix(ts, level, head, fields) + (" ".join(parts))
        out = StringIO()
        out.write(line.rstrip())
        for b in blocks:
            out.write("\n" + b.rstrip("\n"))
        if exception:
            out.write("\n" + str(exception).rstrip("\n"))
        exc = _exc_info(exc_info)
        if exc:
            buf = StringIO()
            self.exception_formatter(buf, exc)
            out.write("\n" + buf.getvalue().strip("\n"))
        return out.getvalue()

    # -- the parts of a line -----------------------------------------------------------------

    def headline(self, event: str, ev: dict, ts) -> tuple[str, dict]:
        """The event as a person reads it, and the fields left to show after it."""
        if event == "fatal":
            error = str(ev.pop("error", "") or "")
            ev.pop("exit_code", None)
            first, _, rest = error.partition("\n")
            if rest:
                ev[BELOW] = rest   # the traceback of a module that raised: below the line
            return (f"redpool: {first}" if not self.clock else f"fatal: {first}"), ev
        message = ev.get("message")
        if isinstance(message, str) and message and "\n" not in message \
                and event in SENTENCES:
            for key in SENTENCES[event]:
                ev.pop(key, None)
            ev.pop("message")
            # a one-shot command's line is "redpool: warning: MESSAGE", as a tool's
            return (f"{event}: {message}" if self.clock else message), ev
        if event.startswith("job_"):
            ev = job_fields(ev)
        elif event == "started":
            ev = {k: v for k, v in ev.items() if k not in STARTED_NOISE}
        return event, ev

    def prefix(self, ts, level: str, head: str, fields: dict) -> str:
        padded = head.ljust(EVENT_WIDTH) + " " if fields else head
        if self.colors:
            padded = _BOLD + padded + _RESET
        if not self.clock:
            if head.startswith("redpool: "):
                return padded
            return f"redpool: {self._level(level, pad=False)}: {padded}"
        when = clock_time(ts) if ts is not None else clock_time(time.time())
        if self.colors:
            when = _DIM + when + _RESET
        return f"{when} {self._level(level)} {padded}"

    def _level(self, level: str, pad: bool = True) -> str:
        text = level.ljust(LEVEL_WIDTH) if pad else level
        if self.colors:
            return _LEVEL_COLOURS.get(level, "") + text + _RESET
        return text

    def _key(self, key: str) -> str:
        return f"\x1b[36m{key}{_RESET}" if self.colors else key


# Events whose `message` says everything: the line is "event: message", and these
# fields (said in the sentence) are not repeated after it.
SENTENCES: dict[str, tuple[str, ...]] = {
    "draining": ("signal", "running", "grace"),
    "password_on_command_line": (),
}


def job_fields(ev: dict) -> dict:
    """A job's line without the noise (see the module's docstring)."""
    ev = dict(ev)
    if ev.get("result_id") is None or ev.get("ttl") == DEFAULT_RESULT_TTL:
        ev.pop("ttl", None)
    ev.pop("result_id", None)   # the job's id again, when a result is kept
    if ev.get("attempt") == 1:
        ev.pop("attempt")
    error, etype = ev.pop("error", None), ev.pop("error_type", None)
    if isinstance(error, dict):  # {type, message}, as in an envelope
        etype, error = error.get("type") or etype, error.get("message")
    if error or etype:
        text = str(error or "")
        if etype and not text.startswith(str(etype)):
            text = f"{etype}: {text}" if text else str(etype)
        ev["error"] = text
    first = {k: ev.pop(k) for k in JOB_ORDER if k in ev}
    return {**first, **ev}


def show(key: str, value: Any, ts) -> tuple[str | None, str | None]:
    """(the value as shown after ``key=``, or None to leave the field out; a block
    of lines to print below the line, or None)."""
    if value is None or value is False:
        return None, None
    if key == BELOW:
        return None, str(value)
    if isinstance(value, str) and "\n" in value.strip("\n"):
        text = value.strip("\n")
        if text.startswith("Traceback"):
            return None, text
        first, _, rest = text.partition("\n")
        return quote(first), rest
    if isinstance(value, bool):
        return "true", None
    if isinstance(value, (int, float)):
        if key in SECONDS:
            return duration(value), None
        if key.endswith("_at") and value > 1e9:
            return when(value, ts), None
        return (f"{value:.6g}" if isinstance(value, float) else str(value)), None
    if isinstance(value, (list, tuple, set)) and all(isinstance(x, (str, int, float))
                                                     for x in value):
        return quote(",".join(str(x) for x in value)) if value else "[]", None
    if isinstance(value, (dict, list, tuple, set)):
        return json.dumps(value, separators=(",", ":"), default=str), None
    return quote(str(value)), None


def quote(s: str) -> str:
    """Bare when it reads unambiguously after ``key=``, else double-quoted."""
    s = "".join(c if c.isprintable() else " " for c in s)
    if s and not any(c in s for c in ' "=\\\''):
        return s
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def duration(seconds: float) -> str:
    """12ms, 1.52s, 30s, 4m05s, 1h30m (each unit until its rounding reaches the next)."""
    s = float(seconds)
    if s <= 0:
        return f"{s:g}s"
    ms = s * 1000
    if round(ms, 2) < 1:
        return f"{ms:.2f}ms"
    if round(ms) < 1000:
        return f"{ms:.0f}ms"
    if s.is_integer() and s < 60:
        return f"{s:.0f}s"
    if round(s, 2) < 10:
        return f"{s:.2f}s"
    if round(s, 1) < 60:
        return f"{s:.1f}s"
    if round(s) < 3600:
        m, rest = divmod(round(s), 60)
        return f"{m}m{rest:02d}s"
    h, rest = divmod(round(s), 3600)
    return f"{h}h{rest // 60:02d}m"


def clock_time(ts: float) -> str:
    """Local wall-clock time to the millisecond: 12:04:05.123."""
    whole, ms = divmod(round(ts * 1000), 1000)   # (not int(): 0.123 is 0.12299...)
    return time.strftime("%H:%M:%S", time.localtime(whole)) + f".{ms:03d}"


def when(value: float, ts) -> str:
    """A unix time: its clock time if on the line's own day, else with its date."""
    day = time.strftime("%Y-%m-%d", time.localtime(value))
    today = time.strftime("%Y-%m-%d", time.localtime(ts if ts is not None else time.time()))
    return clock_time(value) if day == today else f"{day}T{clock_time(value)}"


def _exc_info(exc_info):
    """exc_info as structlog accepts it (True, an exception, a tuple) -> a tuple."""
    if not exc_info:
        return None
    if isinstance(exc_info, BaseException):
        return (type(exc_info), exc_info, exc_info.__traceback__)
    if isinstance(exc_info, tuple):
        return exc_info if exc_info[0] is not None else None
    import sys
    info = sys.exc_info()
    return info if info[0] is not None else None
