"""Futures of job results: AsyncResult (one job) and MapResult (a map), with
multiprocessing.pool's ready / successful / wait / get, and redpool's TimeoutError.

Results are resolved by the Client's listener thread (pushed) or polled from the result
key; callbacks run before get() returns, in the listener thread, as in multiprocessing.
"""

from __future__ import annotations

import builtins
import multiprocessing
import threading
import time
from typing import Any, Callable

import structlog

from . import protocol
from .errors import JobFailed, RedpoolError

__all__ = ["AsyncResult", "MapResult", "TimeoutError"]

log = structlog.get_logger(__name__)


class TimeoutError(builtins.TimeoutError, multiprocessing.TimeoutError):
    """get() ran out of time.  Both ``except TimeoutError`` and code written for
    multiprocessing.Pool (``except multiprocessing.TimeoutError``) catch it."""


def _safely(fn: Callable[..., Any], arg: Any) -> None:
    """Run a user callback or internal hook; whatever it raises must not kill the listener."""
    try:
        fn(arg)
    except Exception:
        log.exception("result callback raised", callback=getattr(fn, "__qualname__", repr(fn)))

def _closed_error(job_id: str) -> RedpoolError:
    return RedpoolError(f"the client was closed before job {job_id} finished: read its result "
                        f"later with Client.result({job_id!r}) (kept for the job's result_ttl)")


class _Outcome:
    """multiprocessing's ready / successful / wait / get, shared by AsyncResult and MapResult."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._value: Any = None
        self._error: BaseException | None = None

    def ready(self) -> bool:
        return self._event.is_set()

    def successful(self) -> bool:
        if not self.ready():
            raise ValueError(f"{self!r} not ready")
        return self._error is None

    def wait(self, timeout: float | None = None) -> None:
        self._event.wait(timeout)

    def get(self, timeout: float | None = None) -> Any:
        """The result; raises the job's JobFailed, or TimeoutError if not ready in time."""
        self.wait(timeout)
        if not self.ready():
            raise TimeoutError(f"{self!r} not ready within {timeout} s")
        if self._error is not None:
            raise self._error
        return self._value


class AsyncResult(_Outcome):
    """The future result of one job.  ``envelope`` is the raw result envelope once ready.
    ``read(job_id)`` reads it from its result key (None: not there yet): the Client's,
    handed in so that this module needs none of the client's (client.py imports it)."""

    def __init__(self, read: Callable[[str], dict[str, Any] | None], job_id: str, *,
                 pushed: bool = True, callback: Callable | None = None,
                 error_callback: Callable | None = None,
                 on_done: Callable[[AsyncResult], Any] | None = None) -> None:
        super().__init__()
        self.id = job_id
        self.envelope: dict[str, Any] | None = None
        self._read = read
        self._pushed = pushed  # delivered by the client's listener, else polled from its key
        self._callback, self._error_callback, self._on_done = callback, error_callback, on_done

    def ready(self) -> bool:
        if not self._event.is_set() and not self._pushed:
            self._poll()
        return self._event.is_set()

    def wait(self, timeout: float | None = None) -> None:
        if self._pushed:
            self._event.wait(timeout)
            return
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = 0.001
        while not self._poll():
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return
            time.sleep(delay if left is None else min(delay, left))
            delay = min(delay * 2, 0.05)

    def _poll(self) -> bool:
        if not self._event.is_set():
            env = self._read(self.id)
            if env is not None:
                self._resolve(env)
        return self._event.is_set()

    def _resolve(self, env: dict[str, Any] | None) -> None:
        """Record the outcome (None: the client closed first).  Callbacks run before
        get() returns, in the listener thread, as in multiprocessing."""
        if self._event.is_set():
            return
        self.envelope = env
        if env is None:
            self._error = _closed_error(self.id)
        elif env.get("status") == protocol.SUCCEEDED:
            self._value = env.get("result")
            if self._callback is not None:
                _safely(self._callback, self._value)
        else:
            self._error = JobFailed(env)
            if self._error_callback is not None:
                _safely(self._error_callback, self._error)
        self._event.set()
        if self._on_done is not None:
            _safely(self._on_done, self)

    def __repr__(self) -> str:
        state = self.envelope["status"] if self.envelope else "pending"
        return f"<redpool.AsyncResult {self.id} {state}>"

class MapResult(_Outcome):
    """The future list of results of Pool.map_async / starmap_async.  Ready when every
    job has finished; if any failed, get() raises the first failure to arrive."""

    def __init__(self, n: int, callback: Callable | None = None,
                 error_callback: Callable | None = None) -> None:
        super().__init__()
        self._value, self._left = [None] * n, n
        self._callback, self._error_callback = callback, error_callback
        self._lock = threading.Lock()
        if n == 0:
            self._event.set()

    def _item_done(self, i: int, ar: AsyncResult) -> None:
        with self._lock:
            if ar._error is None:
                self._value[i] = ar._value
            elif self._error is None:
                self._error = ar._error
            self._left -= 1
            if self._left:
                return
        if self._error is None and self._callback is not None:
            _safely(self._callback, self._value)
        elif self._error is not None and self._error_callback is not None:
            _safely(self._error_callback, self._error)
        self._event.set()

    def __repr__(self) -> str:
        return f"<redpool.MapResult {len(self._value) - self._left}/{len(self._value)} done>"
