"""Logging through structlog: JSON lines for machines, readable lines for people.

JSON when stderr is not a terminal (journald, Procfile runners, containers), the
console renderer when it is.  Levels below the configured one cost a no-op call
(make_filtering_bound_logger), so per-job lines can stay in the hot path.
"""

from __future__ import annotations

import logging
import sys

import structlog

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
          "error": logging.ERROR}
_min_level = logging.DEBUG  # as configured: events below it are dropped before any work


def configure(level: str = "info", fmt: str = "auto", stream=None) -> None:
    global _min_level
    _min_level = LEVELS[level.lower()]
    stream = stream or sys.stderr
    if fmt == "auto":
        fmt = "console" if stream.isatty() else "json"
    processors: list = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if fmt == "json":
        processors += [structlog.processors.format_exc_info,
                       structlog.processors.JSONRenderer()]
    else:
        processors += [structlog.dev.ConsoleRenderer(colors=stream.isatty())]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS[level.lower()]),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )


def get(name: str = "redpool"):
    return structlog.get_logger(name)


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
    "reload_failed": "error", "signal_ignored": "warning",
    "child_stopped": "info", "job_started": "debug", "redis_data_lost": "error",
    "redis_not_persistent": "warning", "redis_persistence_unknown": "debug",
}


def event_logger(logger=None):
    """A Hooks subscriber that writes each supervisor event as one log line."""
    log = logger or get("redpool.supervisor")

    def on_event(event: str, fields: dict) -> None:
        level = _LEVELS.get(event, "info")
        if event == "job_finished" and fields.get("status") == "failed":
            level = "warning"
        if LEVELS[level] < _min_level:
            return  # off: not even a logger lookup (per-job lines are on the hot path)
        if event == "job_finished":
            fields = dict(fields)
            fields["duration"] = round(fields.get("duration") or 0.0, 6)
            fields.pop("t", None)
            fields.pop("result_id", None)
        getattr(log, level)(event, **fields)

    return on_event
