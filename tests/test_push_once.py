"""A producer's push is sent at most once (sendonce.py): a connection lost after a
batch was sent must not queue it twice, whatever the client's retry policy, and the
producer is told the batch may be queued (MaybeQueued, with its ids) rather than
"nothing was enqueued".  Real servers; the fault is injected after the command left,
by a proxy that swallows the reply (one server) or a connection whose reply is lost
(Redis Cluster: its client finds the nodes itself, past any proxy)."""

from __future__ import annotations

import pytest
import redis
import redis.connection
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster
from redis.retry import Retry

from dropproxy import DropProxy
from redpool.client import Client
from redpool.keys import Keys
from redpool.sendonce import MaybeQueued
from redpool.server import EmbeddedServer

N = 50


def jobs():
    return [(i, 1) for i in range(N)]


@pytest.fixture
def server():
    with EmbeddedServer() as s:
        yield s


def test_a_batch_whose_reply_is_lost_is_queued_once_and_said_maybe_queued(server):
    proxy = DropProxy(server.port, b"LPUSH")
    r = redis.Redis(port=server.port)
    keys = Keys("once")
    try:
        with Client(f"redis://127.0.0.1:{proxy.port}", namespace="once") as client:
            with pytest.raises(MaybeQueued) as e:
                client.enqueue_many("t.add", jobs(), queue="q", reply_to=False)
        assert proxy.dropped == 1 and r.llen(keys.queue("q")) == N
        assert len(e.value.ids) == N and "may or may not be queued" in str(e.value)
        assert "sending them again may queue them twice" in str(e.value)
        assert isinstance(e.value, redis.ConnectionError)  # (handlers of old still catch it)
    finally:
        proxy.close()


def test_a_callers_client_that_retries_on_connection_errors_does_not_push_twice(server):
    # Given the caller's own client, told to retry a command after a connection error
    proxy = DropProxy(server.port, b"LPUSH")
    theirs = redis.Redis(port=proxy.port, retry=Retry(NoBackoff(), 3),
                         retry_on_error=[redis.ConnectionError])
    try:
        with Client(redis=theirs, namespace="once") as client:
            with pytest.raises(MaybeQueued):
                client.enqueue_many("t.add", jobs(), queue="theirs", reply_to=False)
        assert redis.Redis(port=server.port).llen(Keys("once").queue("theirs")) == N
    finally:
        proxy.close()


def test_delayed_jobs_whose_reply_is_lost_are_scheduled_once(server):
    proxy = DropProxy(server.port, b"ZADD")
    try:
        with Client(f"redis://127.0.0.1:{proxy.port}", namespace="once") as client:
            with pytest.raises(MaybeQueued):
                client.enqueue_many("t.add", jobs(), queue="later", delay=60, reply_to=False)
        assert redis.Redis(port=server.port).zcard(Keys("once").scheduled("later")) == N
    finally:
        proxy.close()


def test_nothing_sent_is_redis_pys_error_as_ever(server):
    # a server that cannot be reached: nothing left, so nothing may be queued
    port = server.port
    server.stop()
    with Client(f"redis://127.0.0.1:{port}", namespace="once") as client:
        with pytest.raises(redis.ConnectionError) as e:
            client.enqueue_many("t.add", jobs(), queue="q", reply_to=False)
    assert not isinstance(e.value, MaybeQueued)


@pytest.fixture
def lose_one_reply(monkeypatch):
    """Connections whose reply to the next LPUSH, once armed, is lost after the server
    ran it (as with the proxy above)."""
    state = {"armed": False, "lost": 0}
    send, read = redis.connection.Connection.send_packed_command, \
        redis.connection.Connection.read_response

    def sending(self, command, check_health=True):
        data = command if isinstance(command, (bytes, bytearray)) else b"".join(command)
        if state["armed"] and b"LPUSH" in data:
            state["armed"] = False
            self._lose_reply = True
        return send(self, command, check_health)

    def reading(self, *a, **kw):
        reply = read(self, *a, **kw)
        if getattr(self, "_lose_reply", False):
            self._lose_reply = False
            state["lost"] += 1
            self.disconnect()
            raise redis.ConnectionError("Connection reset by peer (injected after sending)")
        return reply

    monkeypatch.setattr(redis.connection.Connection, "send_packed_command", sending)
    monkeypatch.setattr(redis.connection.Connection, "read_response", reading)
    return state


def test_on_a_cluster_a_batch_whose_reply_is_lost_is_queued_once(cluster, lose_one_reply):
    url = cluster.url.replace("redis://", "redis+cluster://")
    keys = Keys("once", cluster=True)
    check = RedisCluster.from_url(cluster.url)
    # redpool's own client, and a caller's RedisCluster with redis-py's default retry
    for queue, make in (("ours", lambda: Client(url, namespace="once")),
                        ("theirs", lambda: Client(redis=RedisCluster.from_url(cluster.url),
                                                  namespace="once"))):
        check.delete(keys.queue(queue))
        with make() as client:
            lose_one_reply["armed"] = True
            with pytest.raises(MaybeQueued) as e:
                client.enqueue_many("t.add", jobs(), queue=queue, reply_to=False)
        assert len(e.value.ids) == N
        assert check.llen(keys.queue(queue)) == N, queue
    assert lose_one_reply["lost"] == 2
    check.close()


def test_on_a_cluster_a_node_that_cannot_be_reached_is_redis_pys_error_as_ever(
        cluster, monkeypatch):
    url = cluster.url.replace("redis://", "redis+cluster://")
    with Client(url, namespace="once") as client:
        client.enqueue("t.add", 0, 1, queue="ours", reply_to=False)  # (connected and known)

        def refused(self, *a, **kw):
            raise redis.ConnectionError("Error 111 connecting to the node. Connection refused.")
        for c in client._redis.get_node_from_key(Keys("once", cluster=True).queue("ours")) \
                .redis_connection.connection_pool._available_connections:
            c.disconnect()
        monkeypatch.setattr(redis.connection.Connection, "connect", refused)
        with pytest.raises(redis.ConnectionError) as e:
            client.enqueue_many("t.add", jobs(), queue="ours", reply_to=False)
        monkeypatch.undo()
    assert "Connection refused" in str(e.value) and not isinstance(e.value, MaybeQueued), e.value


def test_redpool_enqueue_says_the_jobs_may_be_queued_and_does_not_exit_4(server):
    # exit 4 means "Redis cannot be reached": a script would take the jobs for unsent
    import os
    import subprocess
    import sys

    from helpers import ROOT

    proxy = DropProxy(server.port, b"LPUSH")
    env = {k: v for k, v in os.environ.items() if not k.startswith("REDPOOL_")}
    try:
        res = subprocess.run([sys.executable, "-m", "redpool", "enqueue", "t.add", "--from", "-",
                              "--redis-url", f"redis://127.0.0.1:{proxy.port}",
                              "--namespace", "once-cli"], cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=120,
                             input="".join(f"[{i}, 1]\n" for i in range(N)))
    finally:
        proxy.close()
    assert res.returncode == 1, res.stderr
    assert "may or may not be queued" in res.stderr and "redpool inspect" in res.stderr
    assert redis.Redis(port=server.port).llen(Keys("once-cli").queue("default")) == N
