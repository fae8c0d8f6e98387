"""A producer's push, sent at most once.

A push (LPUSH of a batch, ZADD of delayed jobs) whose reply is lost with its connection
may well have run: sending it again queues the batch twice.  redis-py does send it
again when the client's policy says so: a RedisCluster's retry (three attempts by
default) runs a command again after a connection error, and a plain client with
``retry_on_error`` does too (measured: a batch of 50 became 100 behind a connection
that dropped after sending).  redpool's own clients retry nothing, but a Client may be
handed the caller's.  So a push goes out here, whatever the client:

* one server (and Sentinel): on one connection from the pool, by hand: connect (a
  failure sends nothing), send, read the reply;
* Redis Cluster: to the node of its key, named (``target_nodes``), which redis-py never
  retries (a MOVED or ASK redirect, which runs nothing, is still followed).

A failure before the command left is redis-py's error as ever: nothing was queued, and
the caller may send again.  A failure after it left is ``MaybeQueued`` (a ConnectionError
or TimeoutError of redis-py's, so existing handlers still catch it): the push may or may
not have run, and cannot be told from here in general (a worker may have taken the jobs
already); the Client says which ids, and what to do.
"""

from __future__ import annotations

import redis
from redis.cluster import ClusterNode, RedisCluster


class MaybeQueued(redis.ConnectionError):
    """The connection was lost after the push was sent: it may have run.  ``ids``: the
    jobs it carried (set by the Client)."""

    ids: list[str] = []

    @classmethod
    def of(cls, e: BaseException, queue: str, ids: list[str]) -> "MaybeQueued":
        err = cls(f"the connection to Redis was lost after {len(ids)} job(s) were sent to "
                  f"queue {queue!r} ({e}): they may or may not be queued, ids {ids[0]!r}"
                  + (f" to {ids[-1]!r}" if len(ids) > 1 else "") + "; sending them again may "
                  "queue them twice: look them up first (Client.result(id), redpool inspect "
                  "ID) and send again only those not there")
        err.ids = ids
        return err


def send_once(r: redis.Redis, *args):
    """Run the write command ``args`` (its key second) once at most; its reply."""
    if isinstance(r, RedisCluster):
        node = r.get_node_from_key(args[1])
        try:
            return r.execute_command(*args, target_nodes=node)
        except (redis.ConnectionError, redis.TimeoutError) as e:
            if _was_sent(e):
                raise MaybeQueued(str(e)) from e
            raise
    pool = r.connection_pool
    conn = pool.get_connection()   # (connects: an error here sent nothing)
    try:
        try:
            conn.send_command(*args)
        except (redis.ConnectionError, redis.TimeoutError):
            conn.disconnect()  # (at most part of it left: Redis runs no half command)
            raise
        try:
            return conn.read_response()
        except (redis.ConnectionError, redis.TimeoutError) as e:
            conn.disconnect()
            raise MaybeQueued(str(e)) from e
    finally:
        pool.release(conn)


def _was_sent(e: BaseException) -> bool:
    """redis-py's cluster client marks a node's error with the connection it had when it
    failed (``e.connection``), or with the node when it had none yet (connecting failed):
    only the first may have sent the command.  (topology.ClusterRedis wraps the error:
    the cause carries the mark.)"""
    for err in (e, e.__cause__):
        mark = getattr(err, "connection", None)
        if mark is not None:
            return not isinstance(mark, ClusterNode)
    return False
