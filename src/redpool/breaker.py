"""Redis Cluster: a circuit breaker per node, so that one node that hangs does not slow
the queues of the others.

A node that is down costs its neighbours nothing: the connection is refused at once,
its commands fail (nodes.send_by_node), its queues wait, the others go on.  A node
that *hangs* -- SIGSTOPped, its host frozen or swapping, a network that drops packets
-- answers nothing and refuses nothing: every command sent to it waits out the socket
timeout (5 s, queue.connect), and the loop, which sends every queue's commands in one
round trip, would serve the other shards' queues once every 5 s.

So the first timeout from a node *opens* its breaker.  From then on:

* no command is sent to it: send_by_node answers ``NodeOpen`` in place of each of its
  replies, at once, which every caller already takes as that node being away
  (completions held, its queues passed over, its answers left in their outboxes, its
  fences renewed once it is back), and the waiter of each of its queues leaves it alone;
* a probe thread asks it PING on a connection of its own, with a short timeout
  (PROBE_TIMEOUT), every PROBE_EVERY: the first answer closes the breaker.  A thread,
  not the loop's housekeeping: a probe of a node that still hangs would stall the loop
  for its whole timeout, every time;
* the housekeeping (ClusterQueue.promote) learns the slot map anew every REFRESH_EVERY,
  asking the open node last, so that a failover to its replica is followed: a node
  that no longer serves slots is forgotten, and its queues go to the new primary.

One timeout is enough to open (not, as classic breakers, a count of failures in a
window): a timeout has already cost the loop 5 s, a second one would cost 5 more; and a
node that answers again is closed within PROBE_EVERY.  What a hung node was sent
before it froze may still run when it wakes (its reply lost): the callers treat that
as any lost reply (cluster.py: ``suspect``, a reconcile once every node answers).

The breaker belongs to the client (``attach``): the queue, the lease's fences and the
reaper, which share it, share one view of which nodes hang.  The loop is told of
changes by ``tend()`` (events ``redis_node_hung``, ``redis_node_back``), never by the
probe thread itself: the loop acts, the thread only records.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Callable

import redis
from redis.exceptions import RedisClusterException

PROBE_EVERY = 0.5     # seconds between two probes of a node whose breaker is open
PROBE_TIMEOUT = 0.5   # a probe's connect and read timeout: a node that answers does in ~1 ms
REFRESH_EVERY = 1.0   # seconds between two slot map refreshes while a breaker is open


class NodeOpen(redis.ConnectionError):
    """A command not sent: its node hangs (its breaker is open).  It ran nowhere."""

    sent = False  # (nodes.lost_reply: not a lost reply)


class Breaker:
    """Which Redis Cluster nodes hang, by node name ("host:port")."""

    def __init__(self, *, probe_every: float = PROBE_EVERY,
                 probe_timeout: float = PROBE_TIMEOUT, refresh_every: float = REFRESH_EVERY,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.probe_every = probe_every
        self.probe_timeout = probe_timeout
        self.refresh_every = refresh_every
        self.clock = clock
        self._open: dict[str, tuple[float, dict]] = {}  # name -> (since, how to connect)
        self._lock = threading.Lock()
        self._news: deque[tuple[str, dict]] = deque()  # for the loop (tend)
        self._prober: threading.Thread | None = None
        self._refresh_at = 0.0

    # -- asked on the hot path (any thread) ----------------------------------------------------

    def is_open(self, name: str) -> bool:
        return name in self._open

    @property
    def open_nodes(self) -> list[str]:
        return list(self._open)

    def skip(self, name: str) -> NodeOpen:
        return NodeOpen(f"Redis Cluster node {name} hangs (it timed out; its breaker is "
                        "open): its commands wait until it answers a probe")

    def trip(self, name: str, error: BaseException, pool=None) -> None:
        """A command to ``name`` timed out: open its breaker (if not already).  ``pool``:
        the node's connection pool, whose settings (credentials, TLS) the probe uses."""
        if not isinstance(error, redis.TimeoutError) or not name:
            return  # (refused, reset: the node answers that much; nothing waits)
        kwargs = dict(pool.connection_kwargs) if pool is not None else {}
        cls = pool.connection_class if pool is not None else redis.Connection
        with self._lock:
            if name in self._open:
                return
            self._open[name] = (self.clock(), {"cls": cls, "kwargs": kwargs})
            self._news.append(("redis_node_hung", {
                "node": name, "error": str(error),
                "note": "its queues wait, the other nodes' are served; a probe every "
                        f"{self.probe_every:g} s closes it once the node answers"}))
            self._refresh_at = 0.0
            if self._prober is None:
                self._prober = threading.Thread(target=self._probe_loop, daemon=True,
                                                name="redpool-breaker")
                self._prober.start()

    def close(self, name: str, why: str = "answered") -> None:
        with self._lock:
            entry = self._open.pop(name, None)
            if entry is not None:
                self._news.append(("redis_node_back", {
                    "node": name, "why": why, "seconds": round(self.clock() - entry[0], 3)}))

    # -- the loop's housekeeping ---------------------------------------------------------------

    def tend(self, r, emit: Callable[..., None] | None = None, now: float | None = None) -> None:
        """While a breaker is open, learn the slot map anew every ``refresh_every`` (the
        open node asked last), and forget an open node that no longer serves slots (it
        failed over).  Then tell ``emit`` what changed."""
        now = self.clock() if now is None else now
        if self._open and now >= self._refresh_at:
            self._refresh_at = now + self.refresh_every
            try:
                r.nodes_manager.initialize(last_failed_node_name=self.open_nodes[0])
                serving = {n.name for n in r.get_primaries()}
                for name in self.open_nodes:
                    if name not in serving:
                        self.close(name, why="failed over: it serves no slots")
            except (redis.RedisError, RedisClusterException, TypeError):
                pass  # the next round tries again
        while self._news and emit is not None:
            event, fields = self._news.popleft()
            emit(event, **fields)

    # -- the probe thread ----------------------------------------------------------------------

    def _probe_loop(self) -> None:
        while True:
            with self._lock:
                todo = dict(self._open)
                if not todo:
                    self._prober = None  # (a trip from now on starts another)
                    return
            for name, (_, how) in todo.items():
                if self.probe(name, how):
                    self.close(name)
            time.sleep(self.probe_every)

    def probe(self, name: str, how: dict) -> bool:
        """PING ``name`` on a connection of its own, with the short timeout."""
        host, _, port = name.rpartition(":")
        kwargs = dict(how["kwargs"], host=host, port=int(port),
                      socket_timeout=self.probe_timeout,
                      socket_connect_timeout=self.probe_timeout)
        conn = None
        try:
            conn = how["cls"](**kwargs)
            conn.send_command("PING")
            return conn.read_response() in (b"PONG", "PONG", True)
        except (redis.RedisError, OSError, ValueError, TypeError):
            return False
        finally:
            if conn is not None:
                conn.disconnect()


def attach(r) -> Breaker:
    """The breaker of client ``r`` (made on first use): one per client, shared by all
    that use it."""
    breaker = getattr(r, "redpool_breaker", None)
    if breaker is None:
        breaker = r.redpool_breaker = Breaker()
    return breaker
