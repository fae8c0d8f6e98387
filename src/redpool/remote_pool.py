"""multiprocessing.Pool's surface over Redis: Pool, and IMapIterator for imap."""

from __future__ import annotations

import itertools
import threading
import weakref
from collections import deque
from queue import Empty, SimpleQueue
from typing import Any, Callable, Iterable, Iterator

from .client import BATCH, Client
from .registry import task_name
from .results import AsyncResult, MapResult, TimeoutError

__all__ = ["Pool", "IMapIterator"]


class IMapIterator:
    """Results of Pool.imap (input order) or imap_unordered (as they finish).  Jobs are
    enqueued lazily, a batch at a time, at most WINDOW ahead of the consumer, so a huge
    iterable is not all enqueued before the first result."""

    WINDOW = 2 * BATCH

    def __init__(self, pool: Pool, func: Any, calls: Iterator[tuple[Any, None]],
                 ordered: bool) -> None:
        self._pool, self._func, self._calls, self._ordered = pool, func, calls, ordered
        self._lock = threading.Lock()       # guards feeding and the counts
        self._next_lock = threading.Lock()  # one consumer at a time
        self._inflight: deque[AsyncResult] = deque()      # imap: enqueued, not yet yielded
        self._finished: SimpleQueue[AsyncResult] = SimpleQueue()  # imap_unordered
        self._count = 0  # enqueued, not yet yielded
        self._exhausted = False

    def __iter__(self) -> IMapIterator:
        return self

    def next(self, timeout: float | None = None) -> Any:
        with self._next_lock:
            if self._count < self.WINDOW // 2:
                self._feed(self.WINDOW)
            if self._count == 0:
                raise StopIteration
            if self._ordered:
                ar = self._inflight[0]
                ar.wait(timeout)
                if not ar._event.is_set():
                    raise TimeoutError(f"job {ar.id} did not finish within {timeout} s")
                self._inflight.popleft()
            else:
                try:
                    ar = self._finished.get(timeout=timeout)
                except Empty:
                    raise TimeoutError(f"no job finished within {timeout} s") from None
            with self._lock:
                self._count -= 1
        return ar.get(0)

    __next__ = next  # multiprocessing's iterator has next(timeout) too

    def _feed(self, limit: int | None = None) -> None:
        """Enqueue until ``limit`` jobs are ahead of the consumer (None: all the rest)."""
        with self._lock:
            while not self._exhausted and (limit is None or self._count < limit):
                want = BATCH if limit is None else min(BATCH, limit - self._count)
                chunk = list(itertools.islice(self._calls, want))
                self._exhausted = len(chunk) < want
                if not chunk:
                    break
                on_done = None if self._ordered else (lambda i, ar: self._finished.put(ar))
                results = self._pool._submit(self._func, chunk, on_done=on_done, feeding=True)
                if self._ordered:
                    self._inflight.extend(results)
                self._count += len(results)


_RUN, _CLOSE, _TERMINATE = "RUN", "CLOSE", "TERMINATE"


class Pool:
    """multiprocessing.Pool over Redis: ``Pool(4)`` becomes ``Pool("redis://host")`` and the
    work runs on every host running ``redpool worker`` for ``queue``.  Differences:

    - ``func`` travels by name: it must be registered (@task, or a module-level function
      the workers import); arguments and results travel as JSON.
    - ``chunksize`` is accepted for compatibility and ignored: each item is one job
      (jobs are enqueued in batches, so that costs no extra round trips).
    - terminate() only stops waiting: jobs already queued are in Redis, not in our
      children, and still run on the workers.
    """

    def __init__(self, url: str | None = None, queue: str = "default", *,
                 namespace: str | None = None, client: Client | None = None) -> None:
        if isinstance(url, int):
            raise TypeError("Pool's first argument is a Redis URL, not a process count: "
                            "the number of processes is set on each worker host")
        if client is not None and (url is not None or namespace is not None):
            raise ValueError("pass client= or url/namespace, not both")
        self._own_client = client is None
        self.client = client if client is not None else Client(url, namespace=namespace)
        self.queue = queue
        self._state = _RUN
        self._cond = threading.Condition()
        self._outstanding: set[AsyncResult] = set()
        self._iterators: weakref.WeakSet[IMapIterator] = weakref.WeakSet()

    def apply(self, func: Any, args: tuple = (), kwds: dict | None = None) -> Any:
        return self.apply_async(func, args, kwds).get()

    def apply_async(self, func: Any, args: tuple = (), kwds: dict | None = None,
                    callback: Callable | None = None,
                    error_callback: Callable | None = None) -> AsyncResult:
        return self._submit(func, [(args, kwds)], callback=callback, error_callback=error_callback)[0]

    def map(self, func: Any, iterable: Iterable, chunksize: int | None = None) -> list[Any]:
        return self.map_async(func, iterable).get()

    def map_async(self, func: Any, iterable: Iterable, chunksize: int | None = None,
                  callback: Callable | None = None, error_callback: Callable | None = None) -> MapResult:
        return self._map(func, [((x,), None) for x in iterable], callback, error_callback)

    def starmap(self, func: Any, iterable: Iterable[Iterable], chunksize: int | None = None) -> list[Any]:
        return self.starmap_async(func, iterable).get()

    def starmap_async(self, func: Any, iterable: Iterable[Iterable], chunksize: int | None = None,
                      callback: Callable | None = None, error_callback: Callable | None = None) -> MapResult:
        return self._map(func, [(tuple(a), None) for a in iterable], callback, error_callback)

    def imap(self, func: Any, iterable: Iterable, chunksize: int = 1) -> IMapIterator:
        return self._imap(func, iterable, ordered=True)

    def imap_unordered(self, func: Any, iterable: Iterable, chunksize: int = 1) -> IMapIterator:
        return self._imap(func, iterable, ordered=False)

    def close(self) -> None:
        """Accept no more work; what was submitted (every imap item too) still runs."""
        with self._cond:
            if self._state == _RUN:
                self._state = _CLOSE

    def join(self) -> None:
        """Wait for everything submitted, then release the connection if we made it."""
        if self._state == _RUN:
            raise ValueError("Pool is still running")
        for it in list(self._iterators):  # like multiprocessing: every imap item runs
            if self._state != _TERMINATE:
                it._feed()
        with self._cond:
            while self._outstanding and self._state != _TERMINATE:
                self._cond.wait()
        if self._own_client:
            self.client.close()

    def terminate(self) -> None:
        """Stop waiting.  Jobs already queued still run remotely; nothing cancels them."""
        with self._cond:
            self._state = _TERMINATE
            self._cond.notify_all()
        if self._own_client:
            self.client.close()

    def __enter__(self) -> Pool:
        self._check_running()
        return self

    def __exit__(self, *exc: object) -> None:
        self.terminate()

    def __repr__(self) -> str:
        return (f"<redpool.Pool state={self._state} queue={self.queue!r} "
                f"outstanding={len(self._outstanding)} {self.client!r}>")

    def _check_running(self) -> None:
        if self._state != _RUN:
            raise ValueError("Pool not running")

    def _map(self, func: Any, calls: list, callback: Callable | None,
             error_callback: Callable | None) -> MapResult:
        self._check_running()
        result = MapResult(len(calls), callback, error_callback)
        self._submit(func, calls, on_done=result._item_done)
        return result

    def _imap(self, func: Any, iterable: Iterable, ordered: bool) -> IMapIterator:
        self._check_running()
        it = IMapIterator(self, func, (((x,), None) for x in iterable), ordered)
        self._iterators.add(it)
        return it

    def _submit(self, func: Any, calls: list, *, on_done: Callable | None = None,
                feeding: bool = False, **callbacks: Any) -> list[AsyncResult]:
        if self._state != _RUN and not (feeding and self._state == _CLOSE):
            raise ValueError("Pool not running")

        def done(i: int, ar: AsyncResult) -> None:
            try:
                if on_done is not None:
                    on_done(i, ar)
            finally:
                with self._cond:
                    self._outstanding.discard(ar)
                    self._cond.notify_all()

        results = self.client._submit(task_name(func), calls, queue=self.queue,
                                      on_done=done, **callbacks)
        with self._cond:  # done() runs after the result is set, so this cannot miss one
            self._outstanding.update(ar for ar in results if not ar._event.is_set())
        return results
