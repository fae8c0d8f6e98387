"""Everything redpool prints on stderr: its events, fatal errors, and the stdlib
`logging` of libraries (redis-py) and of task code, all through one renderer.

Two formats.  JSON lines for machines (journald, Procfile runners, containers):
every field as emitted, an ISO UTC ``timestamp``.  Console lines for people (stderr a
terminal, or ``--log-format console``): see console.py.  ``auto`` picks by terminal.

Levels below the configured one cost a no-op call (make_filtering_bound_logger), so
per-job lines can stay in the hot path.  Lines are written by one ``Sink`` per
process (structlog's events and stdlib records alike): one write per line under one
lock, so lines never interleave; and a reader that went away (``2>&1 | head``) is
not an error that could crash the daemon or print a traceback (see Sink).
"""

from __future__ import annotations

import errno
import logging
import os
import select
import sys
import threading
import time

import structlog

from .console import ConsoleRenderer

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
          "error": logging.ERROR}
FORMATS = ("auto", "json", "console")
_min_level = logging.DEBUG  # as configured: events below it are dropped before any work

# Pool children configure their logging from this (set by the supervisor's configure,
# inherited through the environment by spawned children): task code and the
# libraries it uses log in the worker's format, not as bare text among JSON lines.
CHILD_ENV = "REDPOOL_CHILD_LOGGING"

# A library logger the daemon speaks for: during an outage it reports once
# (redis_down, then redis_up), while redis-py logs each failed attempt, e.g. "Topology
# refresh failed, keeping the current one: ..." at ERROR once a second in a Redis
# Cluster outage.  Those add nothing to redis_down and would bury every other line, so
# during an outage they are demoted to debug; outside one, each of its call sites is
# shown at most once a minute (the next one says how many were left out meanwhile).
QUIETED = "redis"
REPEAT_WINDOW = 60.0


# Write errors that mean the reader is gone: a closed pipe or socket, or a terminal
# that was hung up (EIO, once its session ended).
GONE = (errno.EPIPE, errno.ECONNRESET, errno.EIO)


class Sink:
    """Writes lines to a stream; the logger structlog wraps, and the stdlib handler's
    output.  A reader gone (EPIPE) is never raised into the code that logs: the
    stream's descriptor is pointed at /dev/null (so neither this nor the interpreter's
    final flush can fail again, as CPython's docs on SIGPIPE recommend) and ``lost``
    is set: a one-shot command exits 141 for it.  A daemon carries on, its log
    silenced: its log's reader is not its work.  (Stopping it instead, as SIGPIPE stops
    a writer, turned one Ctrl-C on `redpool worker ... | tee log` into two: the pipe
    died with the first, and the stop it caused cut the running jobs' grace short.)"""

    def __init__(self, stream) -> None:
        self.stream = stream
        self.lost = False
        self._lock = threading.Lock()

    def msg(self, line: str) -> None:
        with self._lock:
            if self.lost:
                return
            try:
                self.stream.write(line + "\n")
                self.stream.flush()
            except ValueError:  # the stream was closed under us (at exit): nothing to say
                pass
            except OSError as e:
                if e.errno in GONE:
                    self._lose()
                # else (a full disk, say) this line is lost, with nowhere to say so; a
                # daemon does not stop for its log

    log = debug = info = warn = warning = error = err = critical = exception = fatal = msg
    failure = msg

    def _lose(self) -> None:
        self.lost = True
        silence(self.stream)


class _Quiet(logging.Filter):
    """See QUIETED.  Also drops records below the configured level (after demotion)."""

    def __init__(self, min_level: int) -> None:
        super().__init__()
        self.min_level = min_level
        self.outage = False
        self._sites: dict[tuple, tuple[float, int]] = {}
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name != QUIETED and not record.name.startswith(QUIETED + "."):
            return record.levelno >= self.min_level
        if self.outage and record.levelno > logging.DEBUG:
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        if record.levelno < self.min_level:
            return False
        site = (record.name, record.levelno, record.pathname, record.lineno)
        with self._lock:
            shown, left_out = self._sites.get(site, (None, 0))
            if shown is not None and record.created - shown < REPEAT_WINDOW:
                self._sites[site] = (shown, left_out + 1)
                return False
            self._sites[site] = (record.created, 0)
        if left_out:
            record.left_out = left_out
        return True


class _Handler(logging.Handler):
    """The root logger's one handler: records rendered as our events are, written by
    the same Sink."""

    def __init__(self, sink: Sink, formatter: logging.Formatter, quiet: _Quiet) -> None:
        super().__init__()
        self.sink = sink
        self.setFormatter(formatter)
        self.addFilter(quiet)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:
            self.handleError(record)
            return
        self.sink.msg(line)


class _State:
    sink: Sink | None = None
    daemon: bool = False
    quiet: _Quiet | None = None
    handler: _Handler | None = None


_state = _State()


def configure(level: str = "info", fmt: str = "auto", stream=None, *,
              daemon: bool = False, clock: bool | None = None) -> str:
    """Set up every output of this process; returns the format chosen ("json" or
    "console").  ``daemon``: a worker (its pool children log in its format, and
    losing its log's reader is not a reason to exit 141: see Sink).  ``clock``: console lines start with
    the time and level (by default, a daemon's do; a one-shot command's read
    ``redpool: ...``)."""
    global _min_level
    _min_level = LEVELS[level.lower()]
    stream = stream or sys.stderr
    if fmt == "auto":
        fmt = "console" if _isatty(stream) else "json"
    sink = Sink(stream)
    if fmt == "json":
        stamp = structlog.processors.TimeStamper(fmt="iso", utc=True)
        render = [structlog.processors.format_exc_info, structlog.processors.JSONRenderer()]
    else:
        stamp = _unix_time
        colors = _isatty(stream) and not os.environ.get("NO_COLOR")
        render = [ConsoleRenderer(clock=daemon if clock is None else clock, colors=colors)]
    structlog.configure(
        processors=[structlog.contextvars.merge_contextvars,
                    structlog.processors.add_log_level, stamp, *render],
        wrapper_class=structlog.make_filtering_bound_logger(_min_level),
        logger_factory=lambda *args: sink,
        cache_logger_on_first_use=False,
    )
    _route_stdlib(sink, stamp, render)
    _state.sink = sink
    _state.daemon = daemon
    if daemon:
        os.environ[CHILD_ENV] = f"{level.lower()}:{fmt}"
    return fmt


def configure_child() -> None:
    """In a pool child, once the task modules and @on_child_start hooks ran: the
    supervisor's level and format (CHILD_ENV) for the stdlib logging of task code and
    the libraries it uses, unless that code set up logging of its own (handlers on the
    root logger, or structlog configured: then it is left alone, as
    logging.basicConfig would leave it).
    Losing stderr never stops a child (the supervisor decides), and a task must not
    fail because its log line could not be written."""
    level, _, fmt = os.environ.get(CHILD_ENV, "").partition(":")
    if logging.getLogger().handlers or structlog.is_configured():
        return
    if level in LEVELS and fmt in ("json", "console"):
        configure(level, fmt, daemon=False, clock=True)


def point_at(old, new) -> None:
    """Our log lines go to ``new`` where they went to ``old`` (a pool child's stderr,
    closed by a task and opened again: leftovers.py)."""
    if _state.sink is not None and _state.sink.stream is old:
        _state.sink.stream = new


def _route_stdlib(sink: Sink, stamp, render: list) -> None:
    """stdlib logging (libraries, task code, warnings.warn) through our renderer, in
    our format: no bare text among JSON lines from logging's last-resort handler."""
    quiet = _Quiet(_min_level)
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[structlog.stdlib.add_log_level, structlog.stdlib.add_logger_name,
                           structlog.stdlib.ExtraAdder(allow=["left_out"]), stamp],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *render],
    )
    root = logging.getLogger()
    if _state.handler is not None:
        root.removeHandler(_state.handler)
    handler = _Handler(sink, formatter, quiet)
    root.addHandler(handler)
    root.setLevel(_min_level)
    logging.captureWarnings(True)
    _state.handler, _state.quiet = handler, quiet


def _unix_time(logger, method: str, event_dict: dict) -> dict:
    event_dict.setdefault("timestamp", time.time())
    return event_dict


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def get(name: str = "redpool"):
    return structlog.get_logger(name)


def fatal(message: str, exit_code: int, *, exc_info=None) -> None:
    """The one message of an error that ends a command, in the configured format."""
    get("redpool").error("fatal", error=message, exit_code=exit_code, exc_info=exc_info)


def lost() -> bool:
    """Did this one-shot command lose its messages' reader (EPIPE on stderr)?  (A
    daemon's exit status says how its work ended, not whether its log was read.)"""
    return _state.sink is not None and _state.sink.lost and not _state.daemon


# -- standard streams whose reader went away -------------------------------------------------

def reader_gone(stream) -> bool:
    """Is ``stream`` a pipe (or socket) whose reading end is closed?  poll() says so
    without writing (POLLERR on a pipe, POLLHUP on a socket)."""
    try:
        fd = stream.fileno()
        p = select.poll()
        p.register(fd, select.POLLOUT)
        return any(ev & (select.POLLERR | select.POLLHUP) for _, ev in p.poll(0))
    except (AttributeError, ValueError, OSError):
        return False


def silence(stream) -> None:
    """Point ``stream``'s descriptor at /dev/null: whatever is still buffered, and the
    interpreter's final flush, go nowhere instead of raising BrokenPipeError again."""
    try:
        fd = stream.fileno()
    except (AttributeError, ValueError, OSError):
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)


# How each supervisor event is logged.  Per-job lines are at info ("job"), so
# --log-level warning turns them off at the cost of a no-op call.
_LEVELS = {
    "job_finished": "info", "started": "info", "recovered": "warning", "draining": "info",
    "stopped": "info", "burst_done": "info", "child_died": "error", "job_crashed": "error",
    "child_boot_failed": "error", "grace_expired": "warning", "stop_now": "warning",
    "redis_down": "error", "redis_up": "warning", "results_dropped": "error", "replies_skipped": "warning",
    "shutdown_redis_error": "error", "lease_lost": "error", "name_taken": "error",
    "reregistered": "warning", "reaped": "warning", "reconciled": "warning",
    "job_timeout": "warning", "child_retired": "info", "child_ready": "info", "promoted": "debug",
    "heartbeat": "debug", "resized": "info", "reloading": "info", "reloaded": "info",
    "reload_failed": "error", "signal_ignored": "warning", "signal_from_pool": "warning",
    "child_stopped": "info", "job_started": "debug", "redis_data_lost": "error",
    "internal_error": "error",
    "redis_not_persistent": "warning", "redis_persistence_unknown": "debug",
    "queue_unusable": "error", "key_unusable": "error", "queue_usable": "warning",
    "key_usable": "warning", "redis_error": "error", "redis_error_cleared": "warning",
    "redis_node_hung": "error", "redis_node_back": "warning",
    "slot_moving": "warning", "slot_moved": "info",
}


def event_logger(logger=None):
    """A Hooks subscriber that writes each supervisor event as one log line."""
    log = logger or get("redpool.supervisor")

    def on_event(event: str, fields: dict) -> None:
        if event in ("redis_down", "redis_up") and _state.quiet is not None:
            _state.quiet.outage = event == "redis_down"   # see QUIETED
        level = _LEVELS.get(event, "info")
        if event == "job_finished" and fields.get("status") == "failed":
            level = "warning"
        if LEVELS[level] < _min_level:
            return  # off: not even a logger lookup (per-job lines are on the hot path)
        if event == "job_finished":
            fields = dict(fields)
            fields["duration"] = round(fields.get("duration") or 0.0, 6)
            fields.pop("t", None)
        elif event == "draining":
            fields = {**fields, "message": draining_message(fields)}
        getattr(log, level)(event, **fields)

    return on_event


def draining_message(fields: dict) -> str:
    """What a first Ctrl-C / SIGTERM started, and how to cut it short: said once."""
    running, grace = fields.get("running") or 0, fields.get("grace") or 0
    again = {"SIGINT": "press Ctrl-C again", "SIGTERM": "send SIGTERM again"}.get(
        fields.get("signal"), "a second SIGTERM or Ctrl-C")
    if not running:
        return "no job running: stopping"
    jobs = "1 job running gets" if running == 1 else f"{running} jobs running get"
    return (f"{jobs} up to {grace:g} s to finish; {again} to stop now (unfinished jobs go "
            "back to their queues)")
