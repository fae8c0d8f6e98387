"""Supervisor events, as an onion of subscribers (dramatiq's broker middleware).

The supervisor emits what happens (a job finished, a child died, ...); logging and,
later, metrics subscribe.  The loop knows nothing of either.  A subscriber that
raises is logged and skipped: an observer never takes the daemon down.
"""

from __future__ import annotations

from typing import Any, Callable

from . import logs

Subscriber = Callable[[str, dict[str, Any]], None]


class Hooks:
    def __init__(self) -> None:
        self._subs: list[Subscriber] = []
        self._log = logs.get("redpool.hooks")

    def subscribe(self, fn: Subscriber) -> Subscriber:
        self._subs.append(fn)
        return fn

    def emit(self, event: str, **fields: Any) -> None:
        for fn in self._subs:
            try:
                fn(event, fields)
            except Exception:
                self._log.exception("hook_failed", hook=repr(fn), hook_event=event)
