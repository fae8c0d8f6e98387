"""The producer API: Client enqueues jobs and delivers their results.

Results come back by push, not by polling: every job names this client's reply list
(``Keys.reply``) unless the caller chose another ``reply_to`` (or none, False), and one
listener thread per Client pops envelopes and resolves the waiting AsyncResult.  Ten thousand
outstanding jobs cost one blocking connection, not ten thousand pollers.  A result that
is not pushed here (the caller's own ``reply_to``, or ``Client.result(id)`` for a job
enqueued elsewhere) is read from its result key, polled with a short backoff.

Workers LPUSH replies and the listener pops them with BRPOP (not BLPOP), so the reply
list is a FIFO and a burst is resolved oldest first.  Jobs go onto a queue with one
variadic LPUSH per batch: one round trip, and atomic, per batch.

On Redis Cluster (a ``redis+cluster://`` URL, or a RedisCluster of your own) the keys
take the cluster layout of keys.py, a queue's list and scheduled set sharing its hash
tag.  Every command here names one key, but for the sweep's MGET, sent per slot; so
which node holds what is redis-py's business, not ours.
"""
from __future__ import annotations

import functools
import os
import threading
import time
import uuid
from collections import OrderedDict
from datetime import datetime
from typing import Any, Callable, Iterable

import redis as redispy
import structlog

from . import protocol
from .connection import connect, is_cluster_url, tls_options
from .errors import ConfigError, RedpoolError
from .keytypes import wrong_type
from .registry import task_name
from .sendonce import MaybeQueued, send_once
from .results import AsyncResult, MapResult, TimeoutError
from .urls import chosen_url, redact_url

__all__ = ["Client", "AsyncResult", "MapResult", "TimeoutError"]

log = structlog.get_logger(__name__)

BLOCK_SECONDS = 1.0       # the listener's BRPOP timeout ...
SOCKET_TIMEOUT = 10.0     # ... which must stay below the socket timeout
CONNECT_TIMEOUT = 5.0
BATCH = 500               # jobs per LPUSH, and replies drained per RPOP
BATCH_BYTES = 4 << 20     # ... or fewer, so one command never buffers huge payloads
UNCLAIMED_MAX = 10_000    # envelopes of ids nobody waits for, kept for Client.result()
SWEEP_SECONDS = 10.0      # how often the listener looks for replies that never came
_WAKE = b"redpool:wake"   # close() pushes this so the listener's blocking pop returns now

def _due(delay: float | None, at: datetime | None) -> tuple[str, float] | None:
    if delay is not None and at is not None:
        raise ValueError("give delay or at, not both")
    if delay is not None:
        if not isinstance(delay, (int, float)) or not delay >= 0 or delay == float("inf"):
            raise ValueError(f"delay must be a number of seconds >= 0, got {delay!r}")
        return ("delay", float(delay))
    if at is not None:
        if not isinstance(at, datetime):
            raise TypeError(f"at must be a datetime, got {type(at).__name__}")
        return ("at", at.timestamp())  # a naive datetime is taken as local time
    return None


def _parse_envelope(raw: bytes | str) -> dict[str, Any] | None:
    try:
        env = protocol.loads(raw)
    except ValueError:  # JSONDecodeError and UnicodeDecodeError both are
        return None
    return env if isinstance(env, dict) and isinstance(env.get("id"), str) else None

class Client:
    """Enqueues jobs and delivers their results.  Thread-safe.  close() it, or use ``with``."""

    def __init__(self, url: str | None = None, *, namespace: str | None = None,
                 redis: redispy.Redis | redispy.RedisCluster | None = None,
                 ca: str | None = None, cert: str | None = None, key: str | None = None) -> None:
        """``url``: any form of connection.py (``rediss://``, ``redis+sentinel://``,
        ``redis+cluster://``, ...), else REDPOOL_REDIS_URL, else the one in the file
        REDPOOL_REDIS_URL_FILE names, else localhost.  ``ca``,
        ``cert``, ``key``: TLS files, else REDPOOL_REDIS_CA, _CERT, _KEY.  Or your own
        ``redis`` client (a RedisCluster for Redis Cluster) instead of a URL."""
        if url is not None and redis is not None:
            raise ValueError("pass a Redis URL or a redis.Redis, not both")
        if redis is not None and (ca or cert or key):
            raise ValueError("TLS files go with a URL: configure your own redis.Redis yourself")
        self.namespace = namespace or os.environ.get("REDPOOL_NAMESPACE") or protocol.DEFAULT_NAMESPACE
        self._own_redis = redis is None
        if redis is None:
            self.url = chosen_url(url)
            cluster = is_cluster_url(self.url)
        else:
            self.url, cluster = _describe(redis), isinstance(redis, redispy.RedisCluster)
        self.keys = protocol.Keys(self.namespace, cluster=cluster)  # checked before connecting
        if self._own_redis:
            redis = connect(self.url, **tls_options(ca, cert, key, url=self.url),
                            decode_responses=False, socket_timeout=SOCKET_TIMEOUT,
                            socket_connect_timeout=CONNECT_TIMEOUT)
        self._redis = redis
        # A caller's connection may time out sooner than our default block; stay below it.
        sock_timeout = _connection_kwargs(redis).get("socket_timeout")
        self._block = BLOCK_SECONDS if not sock_timeout else min(BLOCK_SECONDS, sock_timeout / 2)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._closed = False
        self._new_identity()

    def _new_identity(self) -> None:
        self._pid, self.id = os.getpid(), uuid.uuid4().hex
        self.reply_key = self.keys.reply(self.id)
        self._pending: dict[str, AsyncResult] = {}
        self._unclaimed: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._listener: threading.Thread | None = None

    def enqueue(self, task: Any, *args: Any, queue: str = "default", kwargs: dict | None = None,
                id: str | None = None, result_ttl: int | None = None,
                reply_to: str | bool | None = None, callback: Callable[[Any], Any] | None = None,
                error_callback: Callable[[BaseException], Any] | None = None,
                delay: float | None = None, at: datetime | None = None,
                **options: Any) -> AsyncResult:
        """Queue ``task(*args, **kwargs)``.  ``task`` is a name, a @task or a plain function.

        ``delay`` (seconds, measured on the Redis server's clock) or ``at`` (a datetime)
        schedule the job for later.  ``options``: the job's delivery policy, overriding
        the task's and the worker's: max_retries, retry_backoff, retry_backoff_max,
        timeout, dead_letter.  ``reply_to``: None (the default) delivers the result to
        this client; a list key of yours has the worker push it there (under
        ``<ns>:reply:``, or allowed by the workers' ``--reply-to``: others are refused);
        False asks for no reply at all (only the result key, which the AsyncResult
        polls): nothing is left in Redis for a result nobody waits for."""
        return self._submit(task_name(task), [(args, kwargs)], queue=queue, id=id,
                            result_ttl=result_ttl, reply_to=reply_to,
                            callback=callback, error_callback=error_callback,
                            due=_due(delay, at), options=options)[0]

    def enqueue_many(self, task: Any, arg_tuples: Iterable[tuple], *, queue: str = "default",
                     kwargs_list: Iterable[dict | None] | None = None, result_ttl: int | None = None,
                     reply_to: str | bool | None = None,
                     options_list: Iterable[dict | None] | None = None,
                     delay: float | None = None, at: datetime | None = None,
                     on_pushed: Callable[[int], Any] | None = None,
                     **options: Any) -> list[AsyncResult]:
        """Queue one job per argument tuple, BATCH jobs per round trip.  If Redis fails
        midway, the batches before the failure are already queued.  ``options``,
        ``result_ttl``, ``reply_to``, ``delay``, ``at``: for every job, as in enqueue().
        ``options_list``: per job, a dict (or None) of its own ``id``, ``result_ttl`` or
        options, winning over the shared ones.  ``on_pushed(n)``: after each round trip,
        with the number of jobs it queued (a progress bar's update)."""
        arg_list = list(arg_tuples)
        kw_list = [None] * len(arg_list) if kwargs_list is None else list(kwargs_list)
        own_list = [None] * len(arg_list) if options_list is None else list(options_list)
        if len(kw_list) != len(arg_list):
            raise ValueError(f"{len(arg_list)} argument tuples but {len(kw_list)} kwargs dicts")
        if len(own_list) != len(arg_list):
            raise ValueError(f"{len(arg_list)} argument tuples but {len(own_list)} options dicts")
        return self._submit(task_name(task), zip(arg_list, kw_list, own_list), queue=queue,
                            result_ttl=result_ttl, reply_to=reply_to, due=_due(delay, at),
                            options=options, on_pushed=on_pushed)

    def result(self, job_id: str) -> AsyncResult:
        """The result of any job by id, including one enqueued by another client."""
        if not isinstance(job_id, str) or not protocol.ID_RE.match(job_id):
            raise ValueError(f"invalid job id {job_id!r}")
        with self._lock:
            ar, env = self._pending.get(job_id), self._unclaimed.get(job_id)
        if ar is not None:
            return ar
        ar = AsyncResult(self._read_result, job_id, pushed=False)
        if env is not None:
            ar._resolve(env)
        return ar

    def close(self) -> None:
        """Stop the listener, drop the reply list.  Results still pending raise RedpoolError."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            pending, self._pending = list(self._pending.values()), {}
        self._stop.set()
        if self._listener is not None:
            try:
                self._redis.rpush(self.reply_key, _WAKE)
            except redispy.RedisError:
                pass  # the listener notices _stop within BLOCK_SECONDS anyway
            if self._listener is not threading.current_thread():
                self._listener.join(SOCKET_TIMEOUT)
            try:
                self._redis.delete(self.reply_key)
            except redispy.RedisError:
                pass  # the workers' EXPIRE removes it later
        for ar in pending:
            ar._resolve(None)
        if self._own_redis:
            self._redis.close()

    @property
    def redis(self) -> redispy.Redis:
        """The redis-py client this Client uses (for your own reads and writes)."""
        return self._redis

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<redpool.Client {redact_url(self.url)} namespace={self.namespace!r} id={self.id}>"

    # -- enqueueing ----------------------------------------------------------------------------

    def _submit(self, name: str, calls: Iterable[tuple], *, queue: str,
                id: str | None = None, result_ttl: int | None = None,
                reply_to: str | bool | None = None,
                callback: Callable | None = None, error_callback: Callable | None = None,
                on_done: Callable[[int, AsyncResult], Any] | None = None,
                due: tuple[str, float] | None = None, options: dict | None = None,
                on_pushed: Callable[[int], Any] | None = None) -> list[AsyncResult]:
        """Build, validate and push calls, (args, kwargs[, own id/result_ttl/options]);
        ``on_done(i, result)`` runs when call ``i`` ends."""
        if not isinstance(queue, str) or not queue:
            raise ValueError(f"queue must be a non-empty string, got {queue!r}")
        self.keys.check_queue(queue)
        if reply_to is True or reply_to == "":
            raise ValueError("reply_to must be a list key, None (this client) or False (none)")
        pushed = reply_to is None
        if not pushed and (callback or error_callback or on_done):
            raise ValueError("callbacks need the result delivered to this client: drop reply_to")
        if pushed:
            self._start_listener()
        shared = {"id": id, "result_ttl": result_ttl, **(options or {})}
        reply = self.reply_key if pushed else (reply_to or None)
        qkey, results, batch, size = self.keys.queue(queue), [], [], 0
        for i, (args, kwargs, *own) in enumerate(calls):
            fields = {**shared, **own[0]} if own and own[0] else shared
            try:
                job = protocol.make_job(name, args, kwargs, reply_to=reply, **fields)
            except protocol.InvalidJob as e:
                raise ValueError(str(e)) from None
            try:
                data = protocol.encode_job(job)
            except (TypeError, ValueError) as e:
                raise type(e)(f"arguments of task {name!r} cannot be sent as JSON: {e}") from e
            results.append(AsyncResult(self._read_result, job["id"], pushed=pushed,
                                       callback=callback, error_callback=error_callback,
                                       on_done=functools.partial(on_done, i) if on_done else None))
            batch.append(data)
            size += len(data)
            if len(batch) >= BATCH or size >= BATCH_BYTES:
                self._push(qkey, batch, results[-len(batch):], queue, due, on_pushed)
                batch, size = [], 0
        if batch:
            self._push(qkey, batch, results[-len(batch):], queue, due, on_pushed)
        return results

    def _push(self, qkey: str, batch: list[bytes], results: list[AsyncResult], queue: str = "",
              due: tuple[str, float] | None = None,
              on_pushed: Callable[[int], Any] | None = None) -> None:
        # Register before pushing: a fast worker's reply must find its AsyncResult waiting.
        with self._lock:
            if self._closed:
                raise RedpoolError(f"{self!r} is closed")
            if results[0]._pushed:
                for ar in results:
                    if ar.id in self._pending:
                        raise ValueError(f"job id {ar.id!r} is already waiting for its result")
                self._pending.update((ar.id, ar) for ar in results)
        try:
            # sent once at most, whatever the client's retry policy (sendonce.py)
            if due is None:
                send_once(self._redis, "LPUSH", qkey, *batch)
            else:
                if due[0] == "at":
                    when = due[1]
                else:  # "delay": the due time is taken from the server's clock (TIME),
                    # so producers with skewed clocks agree; no script, so a producer's
                    # ACL user needs no scripting rights
                    sec, usec = self._redis.time()
                    when = sec + usec / 1_000_000 + due[1]
                send_once(self._redis, "ZADD", self.keys.scheduled(queue),
                          *(x for data in batch for x in (repr(when), data)))
        except BaseException as e:
            with self._lock:
                for ar in results:
                    self._pending.pop(ar.id, None)
            if isinstance(e, redispy.exceptions.MovedError):  # only a cluster node says MOVED
                raise ConfigError(f"Redis at {redact_url(self.url)} is a Redis Cluster node: "
                                  "connect with redis+cluster://host:port (see docs/deploy.md, "
                                  "\"Redis Cluster\")") from None
            if isinstance(e, redispy.ResponseError) and str(e).startswith("WRONGTYPE"):
                raise wrong_type(self._redis, self.keys, self.keys.scheduled(queue) if due
                                 else qkey, f"{len(batch)} job(s) not enqueued") from None
            if isinstance(e, MaybeQueued):
                raise MaybeQueued.of(e, queue, [ar.id for ar in results]) from e
            raise
        if on_pushed is not None:
            on_pushed(len(batch))

    def _read_result(self, job_id: str) -> dict[str, Any] | None:
        if self._closed:
            raise RedpoolError(f"{self!r} is closed")
        key = self.keys.result(job_id)
        raw = self._redis.get(key)
        if raw is None:
            return None
        env = _parse_envelope(raw)
        if env is None:
            raise RedpoolError(f"{key} does not hold a JSON result envelope")
        return env

    # -- result delivery -----------------------------------------------------------------------

    def _start_listener(self) -> None:
        with self._lock:
            if self._closed:
                raise RedpoolError(f"{self!r} is closed")
            if self._pid != os.getpid():  # forked (gunicorn --preload): the listener stayed behind
                self._new_identity()
            if self._listener is None:
                self._listener = threading.Thread(target=self._listen, daemon=True,
                                                  name=f"redpool-results-{self.id[:8]}")
                self._listener.start()

    def _listen(self) -> None:
        backoff, next_sweep = 0.1, time.monotonic() + SWEEP_SECONDS
        while not self._stop.is_set():
            try:
                if time.monotonic() >= next_sweep:
                    self._sweep()
                    next_sweep = time.monotonic() + SWEEP_SECONDS
                item = self._redis.brpop([self.reply_key], timeout=self._block)
                if item is None:
                    continue
                batch = [item[1], *(self._redis.rpop(self.reply_key, BATCH) or ())]
            except Exception as e:  # a Redis outage must not end result delivery
                if self._stop.is_set():
                    break
                log.warning("result listener cannot read replies; retrying", url=redact_url(self.url),
                            reply_key=self.reply_key, error=repr(e), retry_in=backoff)
                self._stop.wait(backoff)
                backoff, next_sweep = min(backoff * 2, 5.0), 0.0
                continue
            backoff = 0.1
            for raw in batch:
                self._deliver(raw)

    def _sweep(self) -> None:
        """Resolve pending results from their result keys.  A reply popped just as the
        connection broke is lost (redis-py may even retry the BRPOP without telling us),
        but its result key is not; so this runs after every error and every SWEEP_SECONDS."""
        with self._lock:
            ids = list(self._pending)
        # result keys are untagged: on Redis Cluster they spread over the slots, and
        # mget_nonatomic sends one MGET per slot (pipelined per node)
        mget = self._redis.mget_nonatomic if self.keys.cluster else self._redis.mget
        for start in range(0, len(ids), BATCH):
            chunk = ids[start:start + BATCH]
            for raw in mget([self.keys.result(i) for i in chunk]):
                if raw is not None:
                    self._deliver(raw)

    def _deliver(self, raw: bytes | str) -> None:
        if raw in (_WAKE, _WAKE.decode()):  # str if the caller's redis decodes responses
            return
        env = _parse_envelope(raw)
        if env is None:
            log.warning("ignoring a reply that is not a result envelope",
                        reply_key=self.reply_key, reply=raw[:200])
            return
        with self._lock:
            ar = self._pending.pop(env["id"], None)
            if ar is None:
                self._unclaimed[env["id"]] = env
                if len(self._unclaimed) > UNCLAIMED_MAX:
                    self._unclaimed.popitem(last=False)
        if ar is not None:
            ar._resolve(env)


def _connection_kwargs(r: redispy.Redis) -> dict[str, Any]:
    # A RedisCluster has a pool per node, all made with the same arguments.
    if isinstance(r, redispy.RedisCluster):
        return r.nodes_manager.connection_kwargs
    return r.connection_pool.connection_kwargs


def _describe(r: redispy.Redis) -> str:
    """A URL for a caller's redis.Redis (for repr and logs; never holds the password)."""
    if isinstance(r, redispy.RedisCluster):
        node = r.get_default_node()
        scheme = "rediss" if r.nodes_manager.connection_kwargs.get("ssl") else "redis"
        return f"{scheme}+cluster://{node.host}:{node.port}"
    pool = r.connection_pool
    kw = pool.connection_kwargs
    if "path" in kw:
        return f"unix://{kw['path']}?db={kw.get('db', 0)}"
    scheme = "rediss" if issubclass(pool.connection_class, redispy.SSLConnection) else "redis"
    return f"{scheme}://{kw.get('host', 'localhost')}:{kw.get('port', 6379)}/{kw.get('db', 0)}"
