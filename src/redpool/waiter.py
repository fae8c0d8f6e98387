"""Block in Redis, not in a polling loop, while every queue is empty.

BLMOVE moves a job atomically into our processing list the moment it is pushed,
but it watches only one list.  To wait on several queues at once we run one thread
per queue, each with its own connection, each in BLMOVE.  The threads only block
while the supervisor has "armed" them (room in the pool and nothing found by the
last reserve), so a host never hoards: at most one job per queue arrives beyond
what the pool asked for, and it is run in turn like any reserved job.

A job a thread receives is handed to the main loop through an inbox and a byte on
a pipe the loop waits on.  Redis errors are reported to the loop the same way and
retried with backoff; the threads never die on them.  BLMOVE on a key of the wrong type
moves nothing (Redis checks both lists first) and answers WRONGTYPE without naming the
key: the loop finds which (keytypes.py), and the thread of that queue then leaves it
alone until it is fixed.  On Redis Cluster, a thread whose queue's node hangs (its
BLMOVE timed out: breaker.py) leaves it alone until the node answers a probe again,
without reporting an outage: the other queues' threads and the loop carry on.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Callable

import redis

from .errors import RedisUnavailable
from .health import MOVING_MAX, MOVING_MIN
from .keytypes import classify
from .queue import RedisQueue, Reserved
from .wakeup import Wakeup

UNUSABLE_WAIT = 1.0  # seconds between two looks of a waiter whose queue is unusable
HUNG_WAIT = 0.2      # ... and of one whose Redis Cluster node hangs (breaker.py)


class Waiter:
    def __init__(self, rq: RedisQueue, connect: Callable[[], redis.Redis], *,
                 timeout: float = 1.0) -> None:
        self.rq = rq
        self.connect = connect
        self.timeout = timeout
        self.inbox: deque[Reserved] = deque()
        self.errors: deque[BaseException] = deque()
        self._armed = threading.Event()
        self._in_call = 0  # threads inside BLMOVE right now
        self._count_lock = threading.Lock()
        self._stop = threading.Event()
        self._pipe = Wakeup()
        self._threads = [threading.Thread(target=self._run, args=(q,), daemon=True,
                                          name=f"redpool-wait-{q}") for q in rq.queues]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def arm(self) -> None:
        self._armed.set()

    def disarm(self) -> None:
        self._armed.clear()

    @property
    def armed(self) -> bool:
        return self._armed.is_set()

    def busy(self) -> bool:
        """A thread is inside BLMOVE: a job may be moving into our processing list
        that is not in the inbox yet."""
        return self._in_call > 0

    def fileno(self) -> int:
        return self._pipe.rfd

    def take(self, pipe: bool = True) -> list[Reserved]:
        """The jobs the threads took.  ``pipe``: the wake-up pipe is readable; empty it."""
        if pipe:
            self._pipe.drain()
        out = []
        while self.inbox:
            out.append(self.inbox.popleft())
        return out

    def stop(self) -> None:
        """Stop and join the threads (at most one blocking timeout).  After this no
        job can arrive: whatever they took is in the inbox or our processing list."""
        self._stop.set()
        self._armed.set()  # release threads waiting to be armed
        for t in self._threads:
            if t.is_alive():
                t.join(self.timeout + 15)

    def close(self) -> None:
        self._pipe.close()

    def _run(self, queue: str) -> None:
        conn: redis.Redis | None = None
        backoff = 0.0
        while not self._stop.is_set():
            self._armed.wait()
            if self._stop.is_set():
                break
            if queue in self.rq.unusable.queues or self.rq.unusable.paused:
                # a key of this queue, or one every queue needs, holds another type
                # (keytypes.py): nothing to wait for until the supervisor finds it fixed
                # (it looks every few seconds; a BLMOVE already waiting ends within its
                # timeout, and may bring one job meanwhile)
                self._stop.wait(UNUSABLE_WAIT)
                continue
            if self.rq.node_hangs(queue):  # Redis Cluster: its node hangs (breaker.py)
                self._stop.wait(HUNG_WAIT)
                continue
            try:
                if conn is None:
                    conn = self.connect()
                with self._count_lock:
                    self._in_call += 1
                try:
                    got = self.rq.block_reserve(conn, queue, self.timeout)
                finally:
                    with self._count_lock:
                        self._in_call -= 1
                backoff = 0.0
            except (redis.RedisError, RedisUnavailable) as e:
                # (RedisUnavailable: connecting anew found no node of a Redis Cluster)
                if not self.rq.node_hangs(queue, e):  # (else the breaker says it, once)
                    self.errors.append(e)
                    self._pipe.wake()
                if classify(e) == "moving":  # a Cluster slot moving (TRYAGAIN): a moment
                    backoff = min(MOVING_MAX, max(MOVING_MIN, backoff * 2))
                    self._stop.wait(backoff)
                    continue
                if conn is not None:
                    conn.close()
                conn = None
                backoff = min(5.0, max(0.1, backoff * 2))
                self._stop.wait(backoff)
                continue
            if got is not None:
                # One job is the signal that work has arrived; the loop takes the rest
                # in batches and re-arms us only when the queues are empty again.
                self._armed.clear()
                self.inbox.append(got)
                self._pipe.wake()
        if conn is not None:
            conn.close()
