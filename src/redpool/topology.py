"""The URL forms that name several hosts: Redis Sentinel and Redis Cluster.

``redis+sentinel://`` gives a client whose connections ask the sentinels for the current
primary each time they connect; ``redis+cluster://`` a RedisCluster, which learns the
slot map from the nodes named and sends each command to the node of its keys.  Both
keep the caller's policy: no blind retries (see connection.py, which is the one entry
point, ``connect()``, and re-exports what tests and callers need from here).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from urllib.parse import parse_qs, unquote, urlsplit

import redis
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.connection import URL_QUERY_ARGUMENT_PARSERS, SSLConnection
from redis.exceptions import RedisClusterException
from redis.retry import Retry
from redis.sentinel import Sentinel, SentinelManagedConnection

from .breaker import attach
from .errors import ConfigError, RedisUnavailable
from .urls import redact_url

SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")
CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")
SENTINEL_PORT = 26379
REDIS_PORT = 6379
#: Socket timeouts towards the sentinels: they answer from memory, and discovery asks
#: them one after the other, so one unreachable sentinel must not stall it for long.
SENTINEL_TIMEOUT = 2.0


# -- Sentinel --------------------------------------------------------------------------------

@dataclass(frozen=True)
class SentinelURL:
    """``redis+sentinel://[user:password@]host:port,host:port/service[/db][?options]``."""

    hosts: list[tuple[str, int]]
    service: str
    db: int = 0
    username: str | None = None
    password: str | None = None
    tls: bool = False
    options: dict[str, str] = field(default_factory=dict)


def parse_sentinel_url(url: str) -> SentinelURL:
    def bad(why: str) -> ConfigError:
        return ConfigError(f"invalid Sentinel URL {redact_url(url)}: {why}; use "
                           "redis+sentinel://[user:password@]host[:port],host[:port].../"
                           "service[/db]")

    hosts, path, options, creds = _several_hosts(url, SENTINEL_SCHEMES, SENTINEL_PORT, bad)
    if not path or len(path) > 2:
        raise bad("name the service (the name the sentinels monitor), then optionally the db")
    db = options.pop("db", path[1] if len(path) == 2 else "0")
    try:
        db = int(db)
    except ValueError:
        raise bad(f"db {db!r} is not a number") from None
    return SentinelURL(hosts, path[0], db, *creds, options)


def _several_hosts(url: str, schemes: tuple[str, ...], default_port: int, bad):
    """What a URL naming several hosts holds: (hosts, path segments, query options,
    (user name, password, TLS?)), everything unquoted."""
    try:
        parts = urlsplit(url)
        username, password = parts.username, parts.password
    except ValueError:
        raise bad("it does not parse") from None
    if parts.scheme.lower() not in schemes:
        raise bad(f"the scheme is {parts.scheme!r}")
    hosts = _hosts(parts.netloc.rpartition("@")[2], default_port, bad)
    path = [unquote(p) for p in parts.path.split("/") if p]
    options = {k: v[0] for k, v in parse_qs(parts.query).items() if v}
    return hosts, path, options, (unquote(username) if username else None,
                                  unquote(password) if password else None,
                                  parts.scheme.lower().startswith("rediss"))


def _hosts(netloc: str, default_port: int, bad) -> list[tuple[str, int]]:
    """``host[:port],[::1]:port,...`` of a Sentinel or Cluster URL."""
    hosts = []
    for item in netloc.split(","):
        host, port = item, default_port
        if item.startswith("["):  # [::1]:26379
            host, _, rest = item[1:].partition("]")
            if rest:
                port = rest.removeprefix(":")
        elif ":" in item:
            host, _, port = item.rpartition(":")
        try:
            port = int(port)
        except ValueError:
            # not quoted: a password holding '/', '?' or '#' (not percent-encoded) cuts
            # the address short, and what looks like a port may be part of it
            raise bad("a port is not a number (percent-encode '/', '?', '#' and '@' in a "
                      "user name or password)") from None
        if not host:
            raise bad("an address is empty")
        hosts.append((host, port))
    return hosts


class FollowingConnection(SentinelManagedConnection):
    """A connection to the primary that asks the sentinels where it is whenever it
    connects again.  redis-py (8.1) reconnects a dropped connection on its next send by
    itself (send_packed_command -> connect_check_health), to the address it had, past
    SentinelManagedConnection.connect(): a connection held outside the pool (the
    supervisor's hot path, queue.py) would knock at the dead primary's door forever
    after a failover.  tests/test_sentinel.py fails without this."""

    def send_packed_command(self, command, check_health=True):
        if not self._sock:
            self.connect()  # SentinelManagedConnection's: the current primary's address
        super().send_packed_command(command, check_health)


class FollowingSSLConnection(FollowingConnection, SSLConnection):
    pass


class SentinelRedis(redis.Redis):
    """The primary's client; closing it also closes its connections to the sentinels."""

    sentinel: Sentinel | None = None

    def close(self) -> None:
        try:
            super().close()
        finally:
            if self.sentinel is not None:
                close_sentinels(self.sentinel)


def close_sentinels(manager: Sentinel) -> None:
    """Sentinel.close() exists from redis-py 8.1; before, each sentinel's client is closed."""
    if hasattr(manager, "close"):
        manager.close()
    else:
        for client in manager.sentinels:
            client.close()


def sentinel_client(url: str, target: SentinelURL, kwargs: dict) -> redis.Redis:
    primary, sentinels = dict(kwargs), {}
    for name, value in target.options.items():
        if name in ("sentinel_username", "sentinel_password"):
            sentinels[name.removeprefix("sentinel_")] = value
            continue
        parse = URL_QUERY_ARGUMENT_PARSERS.get(name)
        try:
            primary[name] = parse(value) if parse else value
        except (TypeError, ValueError):
            raise ConfigError(f"invalid value for {name!r} in the Redis URL "
                              f"{redact_url(url)}") from None
    tls = {k: v for k, v in primary.items() if k.startswith("ssl_")}
    primary["connection_class"] = FollowingSSLConnection if target.tls else FollowingConnection
    if target.tls:
        sentinels.update(tls, ssl=True)
    for name in ("socket_timeout", "socket_connect_timeout"):
        sentinels[name] = min(primary.get(name) or SENTINEL_TIMEOUT, SENTINEL_TIMEOUT)
    if "retry" in primary:
        sentinels["retry"] = primary["retry"]
    manager = Sentinel(target.hosts, sentinel_kwargs=sentinels)
    client = manager.master_for(target.service, redis_class=SentinelRedis, db=target.db,
                                username=target.username, password=target.password, **primary)
    client.sentinel = manager
    return client


# -- Cluster -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class ClusterURL:
    """``redis+cluster://[user:password@]host[:port][,host[:port]...][?options]``."""

    hosts: list[tuple[str, int]]
    username: str | None = None
    password: str | None = None
    tls: bool = False
    options: dict[str, str] = field(default_factory=dict)


def parse_cluster_url(url: str) -> ClusterURL:
    def bad(why: str) -> ConfigError:
        return ConfigError(f"invalid Redis Cluster URL {redact_url(url)}: {why}; use "
                           "redis+cluster://[user:password@]host[:port],host[:port]...")

    hosts, path, options, creds = _several_hosts(url, CLUSTER_SCHEMES, REDIS_PORT, bad)
    if path not in ([], ["0"]) or options.pop("db", "0") != "0":
        raise bad("Redis Cluster has only database 0")
    return ClusterURL(hosts, *creds, options)


class ClusterRedis(RedisCluster):
    """A RedisCluster whose failures to reach the cluster are redis.ConnectionError.

    redis-py raises RedisClusterException, which is not a RedisError, when it cannot
    rebuild its slot map (every node it knows is unreachable, or the nodes' maps leave
    slots uncovered while a primary is away): a Redis outage like any other to the
    supervisor's backoff and the producer's error handling, not a crash.  Also for
    pipelines, which execute on a path of their own."""

    def execute_command(self, *args, **kwargs):
        with unreachable_as_connection_error():
            return super().execute_command(*args, **kwargs)

    def script_load(self, script):
        """SCRIPT LOAD on every primary that answers.  redis-py sends it to all of them
        and fails if one is away; a Script whose node answered NOSCRIPT (restarted)
        would then stay unable to run while any other node is down.  A node that hangs
        is skipped (its breaker open, or opened here: breaker.py), not waited for."""
        sha, error, breaker = None, None, attach(self)
        for node in self.get_primaries():
            if breaker.is_open(node.name):
                continue
            try:
                sha = node.redis_connection.script_load(script)
            except (redis.ConnectionError, redis.TimeoutError) as e:
                error = e
                breaker.trip(node.name, e, node.redis_connection.connection_pool)
        if sha is None:
            raise error or redis.ConnectionError("no Redis Cluster primary answered")
        return sha

    def pipeline(self, *args, **kwargs):
        pipe = super().pipeline(*args, **kwargs)
        execute = pipe.execute

        def guarded(*a, **kw):
            with unreachable_as_connection_error():
                return execute(*a, **kw)

        pipe.execute = guarded
        return pipe


def _known(r: RedisCluster | None) -> list[tuple[str, int]]:
    """The nodes ``r`` knows, primaries first.  (Read from another thread, a waiter's,
    while ``r`` may be rebuilding its map: a copy that fails is none.)"""
    try:
        nodes = list(r.get_nodes()) if r is not None else []
    except RuntimeError:  # (its dict changed size while copied)
        return []
    return [(n.host, n.port) for n in sorted(nodes, key=lambda n: n.server_type != "primary")]


@contextlib.contextmanager
def unreachable_as_connection_error():
    """Failures to reach the cluster, as redis.ConnectionError, with a message that says
    it is a cluster.  redis-py up to 8.1 rebuilt its slot map at once after a connection
    error, and raised RedisClusterException when no node answered; 8.2 defers that
    rebuild (at most one a second, run by a later command) and raises the node's own
    ConnectionError meanwhile.  Both are an outage to us; the second is named as a node's."""
    try:
        yield
    except RedisClusterException as e:
        raise redis.ConnectionError(f"Redis Cluster unreachable: {e}") from e
    except (redis.ConnectionError, redis.TimeoutError) as e:
        if type(e) not in (redis.ConnectionError, redis.TimeoutError) \
                or str(e).startswith("Redis Cluster"):
            raise  # a refused login, say, is not an outage: as it is
        raise type(e)(f"Redis Cluster node unreachable: {e}") from e


def cluster_client(url: str, target: ClusterURL, kwargs: dict) -> redis.Redis:
    """A RedisCluster client: it learns the slot map from the nodes named and sends each
    command to the node of its keys.  Its own retries (on a lost connection it would
    send a script again) are off, as everywhere: ``retry`` sets the count, 0 unless
    the caller asks.  ``known_from``: a cluster client whose nodes are tried first (a
    connection made anew -- a waiter's -- must not depend on the nodes the URL names
    being up: after a failover the URL may name only the dead one)."""
    options = dict(kwargs)
    retry = options.pop("retry", None)
    hosts = list(dict.fromkeys([*_known(options.pop("known_from", None)), *target.hosts]))
    options.pop("health_check_interval", None)  # per node pool, not meaningful here
    for name, value in target.options.items():
        parse = URL_QUERY_ARGUMENT_PARSERS.get(name)
        try:
            options[name] = parse(value) if parse else value
        except (TypeError, ValueError):
            raise ConfigError(f"invalid value for {name!r} in the Redis URL "
                              f"{redact_url(url)}") from None
    if target.tls:
        options["ssl"] = True
    try:
        return ClusterRedis(startup_nodes=[ClusterNode(h, p) for h, p in hosts],
                            username=target.username, password=target.password,
                            retry=retry or Retry(NoBackoff(), 0), **options)
    except RedisClusterException as e:
        if "not enabled" in str(e):
            raise ConfigError(f"Redis at {redact_url(url)} is not a Redis Cluster node "
                              "(cluster mode is not enabled): use redis:// (or "
                              "redis+sentinel://) for one server") from None
        raise RedisUnavailable(f"no Redis Cluster node at {redact_url(url)} answered: {e}; are "
                               "the nodes running, and is --redis-url (REDPOOL_REDIS_URL) "
                               "right?") from None
