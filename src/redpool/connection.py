"""Connecting to Redis: the one function every part of redpool connects through.

The supervisor, its waiter threads, the Client and each CLI command call ``connect()``,
so that every URL form works everywhere (docs/deploy.md shows them to operators):

    redis://[[user]:password@]host[:port][/db][?option=value&...]
    rediss://...                                      TLS
    unix:///path/to/redis.sock[?db=N&password=...]
    redis+sentinel://[[user]:password@]host[:port][,host[:port]...]/service[/db][?...]
    rediss+sentinel://...                             TLS to the sentinels and the primary
    redis+cluster://[[user]:password@]host[:port][,host[:port]...][?...]   Redis Cluster
    rediss+cluster://...                              TLS to every node

TLS files are redis-py's own URL options (``ssl_ca_certs``, ``ssl_certfile``,
``ssl_keyfile``; also ``ssl_cert_reqs``, ``ssl_check_hostname``, ``ssl_password``, ...)
or, more pleasant for operators, ``ca``/``cert``/``key`` (``--redis-ca``/``--redis-cert``/
``--redis-key``, ``REDPOOL_REDIS_CA``/``_CERT``/``_KEY``), which are folded into the URL
(``with_tls``): one description of the connection, whatever its source.  A file named
both ways must be the same file.  They are checked before connecting, so a typo is a
configuration error (exit 2), not a puzzling network one.

A Sentinel URL gives a client whose connections ask the sentinels for the current
primary each time they connect.  redis-py drops a connection to a primary that was
demoted and answers writes with READONLY, raising ConnectionError; a killed primary
is a ConnectionError anyway.  So a failover looks like any connection error, and
the caller's policy applies unchanged: the supervisor never retries by itself (see
``queue.connect``); it backs off, reconnects, and reconciles.  The credentials in the
URL are the primary's; the sentinels' own (if they have ``requirepass``) are the
query options ``sentinel_username`` and ``sentinel_password``.

``check()`` makes the first round trip and turns a failure into a RedisUnavailable
(exit code 4) whose message says what to fix: credentials, TLS files, CA, a server
that wants a client certificate, no primary known to the sentinels.
"""

from __future__ import annotations

import functools
import inspect
import os
from urllib.parse import parse_qs, parse_qsl, quote, urlsplit

import redis
from redis.cluster import REDIS_ALLOWED_KEYS, RedisCluster
from redis.sentinel import MasterNotFoundError

from .cliparser import suggestion
from .config import SETTINGS
from .errors import ConfigError, RedisUnavailable
from .topology import (CLUSTER_SCHEMES, SENTINEL_SCHEMES, FollowingConnection,  # noqa: F401
                       SentinelRedis, cluster_client, parse_cluster_url, parse_sentinel_url,
                       sentinel_client)
from .urls import URL_FORMS, check_url, redact_url

TLS_SCHEMES = ("rediss", "rediss+sentinel", "rediss+cluster")
# --redis-ca/--redis-cert/--redis-key and the URL options they stand for.
_TLS = {"ca": ("redis_ca", "ssl_ca_certs"), "cert": ("redis_cert", "ssl_certfile"),
        "key": ("redis_key", "ssl_keyfile")}
_SETTING = {s.dest: s for s in SETTINGS}
_FILES = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile")
# How a TLS server that refuses our (missing) client certificate looks from here: with
# TLS 1.3 our side of the handshake succeeds and the refusal arrives as the connection
# ending, in whatever words the first read or write finds for it.
_REFUSED_AFTER_HANDSHAKE = ("closed by server", "eof occurred in violation of protocol",
                            "connection reset by peer", "certificate required",
                            "alert handshake failure", "alert bad certificate",
                            "alert unknown ca")


def _source(option: str) -> str:
    s = _SETTING[_TLS[option][0]]
    return f"{s.flag} ({s.env})"


def tls_options(ca: str | None = None, cert: str | None = None, key: str | None = None, *,
                url: str | None = None, env: dict[str, str] | None = None) -> dict[str, str]:
    """The TLS files given, each one else from its REDPOOL_REDIS_* variable -- unless
    ``url`` names that file itself: the environment is a default, the URL is specific.
    Only those set: ``connect(url, **tls_options(args.redis_ca, ..., url=url))``."""
    env = os.environ if env is None else env
    named = _query(url) if url else {}
    out = {}
    for option, value in (("ca", ca), ("cert", cert), ("key", key)):
        dest, param = _TLS[option]
        if not value and param not in named:
            value = env.get(_SETTING[dest].env)
        if value:
            out[option] = value
    return out


def with_tls(url: str, *, ca: str | None = None, cert: str | None = None,
             key: str | None = None) -> str:
    """``url`` with the TLS files as its query options (ssl_ca_certs=...).  A file the
    URL names already must be the same one."""
    have = _query(url)
    add = []
    for option, value in (("ca", ca), ("cert", cert), ("key", key)):
        if not value:
            continue
        param = _TLS[option][1]
        if param in have and have[param] != value:
            raise ConfigError(f"{_source(option)} says {value} but the Redis URL's {param} "
                              f"says {have[param]}: name the file once")
        if param not in have:
            add.append(f"{param}={quote(value, safe='/')}")
    if not add:
        return url
    return f"{url}{'&' if '?' in url else '?'}{'&'.join(add)}"


def connect(url: str, *, ca: str | None = None, cert: str | None = None,
            key: str | None = None, **kwargs) -> redis.Redis:
    """A redis-py client for ``url`` (any form above) with the TLS files ``ca``,
    ``cert``, ``key`` if given.  ``kwargs`` are redis-py's (timeouts, retry policy,
    decode_responses); for a Sentinel URL they apply to the primary, and the socket
    timeouts and retry policy (capped at SENTINEL_TIMEOUT) to the sentinels too.
    Nothing is sent yet: ``check()`` makes the first round trip.  A malformed URL (a
    password with an unencoded '/', '?', '@'...) is refused first, without quoting it
    (urls.check_url)."""
    check_url(url)
    url = with_tls(url, ca=ca, cert=cert, key=key)
    scheme = url.partition("://")[0].lower()
    options = _query(url)
    _check_tls(url, scheme, options)
    if scheme in CLUSTER_SCHEMES:
        # redis-py's RedisCluster drops options it does not know without a word
        _refuse_unknown(url, _keywords(RedisCluster) | set(REDIS_ALLOWED_KEYS))
        try:  # it connects here, to learn the slot map
            return cluster_client(url, parse_cluster_url(url), kwargs)
        except redis.RedisError as e:
            raise RedisUnavailable(explain(e, url)) from None
    if scheme in SENTINEL_SCHEMES:
        client = sentinel_client(url, parse_sentinel_url(url), kwargs)
    else:
        try:
            client = redis.Redis.from_url(url, **kwargs)
        except ValueError:  # its text may quote part of the URL, a password say: not shown
            raise ConfigError(f"invalid Redis URL {redact_url(url)}: {URL_FORMS}") from None
    _refuse_unknown(url, _keywords(client.connection_pool.connection_class))
    _check_values(client.connection_pool, options)
    return client


def _check_values(pool: redis.ConnectionPool, options: dict[str, str]) -> None:
    """redis-py hands every query option of a URL to its connection class as a keyword,
    and finds a value it cannot use (``ssl_cert_reqs=maybe``) only when it makes the
    first connection, in an error that quotes it: it may be part of a password cut at
    '?' or '&'.  So one connection object is built here, unconnected, and a failure is
    said without quoting any value."""
    try:
        pool.connection_class(**pool.connection_kwargs)
    except (TypeError, ValueError, redis.RedisError):
        raise ConfigError(f"the value of one of the Redis URL's query options "
                          f"({', '.join(options)}) is one redis-py cannot use (not quoted: "
                          "it may be part of a password)") from None


def _refuse_unknown(url: str, known: set[str]) -> None:
    """An option redis-py does not know would be a TypeError at the first connection
    that names it (RedisCluster drops it silently, and one without a value is dropped
    by the URL parser): it may be part of a password cut at '?' or '&'.  Refused, not
    quoted; a close known name is suggested."""
    known = known | {"sentinel_username", "sentinel_password"}
    try:
        names = [name for name, _ in parse_qsl(urlsplit(url).query, keep_blank_values=True)]
    except ValueError:
        return
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ConfigError("the Redis URL has a query option that redis-py does not know "
                          "(not quoted: it may be part of a password holding '?' or '&', "
                          "which must be percent-encoded as %3F and %26)"
                          + suggestion(unknown[0], sorted(known)))


@functools.lru_cache(maxsize=None)
def _keywords(cls: type) -> frozenset[str]:
    """The keywords a connection class takes (its own, and its bases' it passes on)."""
    names: set[str] = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        params = inspect.signature(init).parameters.values()
        names |= {p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            break
    return frozenset(names - {"self"})


def check(r: redis.Redis, url: str) -> None:
    """One PING; a failure becomes a RedisUnavailable that says what to fix."""
    try:
        r.ping()
    except redis.RedisError as e:
        raise RedisUnavailable(explain(e, url)) from None


def is_cluster_url(url: str) -> bool:
    """A redis+cluster:// URL: the key layout of Redis Cluster (keys.Keys(cluster=True))."""
    return url.partition("://")[0].lower() in CLUSTER_SCHEMES


def check_cluster(r: redis.Redis, url: str) -> None:
    """The URL's form must match the server: a Redis Cluster node reached by redis://
    would answer the first multi-queue script with CROSSSLOT or MOVED, and a plain
    server reached by redis+cluster:// cannot be used as one.  Said at start, clearly.
    A user whose ACL denies INFO is let through: no such check is worth a refused start."""
    try:
        enabled = str(r.info("cluster").get("cluster_enabled", 0)) == "1"
    except redis.ResponseError:
        return
    except redis.RedisError as e:
        raise RedisUnavailable(explain(e, url)) from None
    where = redact_url(url)
    if enabled and not is_cluster_url(url):
        raise ConfigError(f"Redis at {where} is a Redis Cluster node: connect with "
                          f"{_as_cluster(where)} (redis+cluster://, naming one or more nodes), "
                          "so that every queue's keys share a hash tag; see docs/deploy.md, "
                          "\"Redis Cluster\"")
    if not enabled and is_cluster_url(url):
        raise ConfigError(f"Redis at {where} is not a Redis Cluster node (cluster_enabled:0): "
                          "use redis:// (or redis+sentinel://) for one server")


def _as_cluster(where: str) -> str:
    scheme, sep, rest = where.partition("://")
    return f"{scheme}+cluster{sep}{rest}" if scheme in ("redis", "rediss") else "redis+cluster://..."


def explain(e: BaseException, url: str) -> str:
    """What went wrong connecting to ``url``, and what to do about it."""
    where = redact_url(url)
    scheme = url.partition("://")[0].lower()
    options = _query(url)
    text = str(e)
    if isinstance(e, redis.AuthenticationError):
        return (f"Redis at {where} refused our credentials: {text}; check the user name and "
                "password in the URL")
    if isinstance(e, redis.exceptions.NoPermissionError):
        return (f"Redis at {where} accepted our credentials but this user may not run "
                f"what redpool needs: {text}; give it the rules `redpool acl` prints")
    if isinstance(e, MasterNotFoundError):
        if "Authentication" in text:
            hint = "the sentinels refused our credentials: set sentinel_password in the URL"
        else:
            service = parse_sentinel_url(url).service
            hint = (f"are the sentinels running, do they monitor {service!r} (SENTINEL "
                    "MASTERS), and is its primary up?")
        return f"no sentinel at {where} knows a primary: {text}; {hint}"
    tls = scheme in TLS_SCHEMES
    low = text.lower()
    if tls and "certificate verify failed" in low:
        if "mismatch" in low:
            return (f"TLS with Redis at {where} failed: the server's certificate does not "
                    f"name the host we connect to ({text}); connect by a name or address "
                    "the certificate carries")
        return (f"TLS with Redis at {where} failed: the server's certificate is not signed "
                f"by a CA we trust ({text}); point {_source('ca')}, or ssl_ca_certs in the "
                "URL, at the CA that signed the server's certificate")
    if tls and ("pem lib" in low or "key values mismatch" in low or "no such file" in low):
        return (f"cannot load our TLS client certificate or key for {where}: {text}; "
                f"{_source('cert')} and {_source('key')} must be a PEM certificate and its "
                "private key (ssl_password in the URL unlocks an encrypted key)")
    if tls and any(sign in low for sign in _REFUSED_AFTER_HANDSHAKE):
        if "ssl_certfile" not in options:
            return (f"Redis at {where} closed the connection after the TLS handshake: it "
                    "most likely requires a client certificate (tls-auth-clients); pass "
                    f"{_source('cert')} and {_source('key')}, or ssl_certfile and "
                    "ssl_keyfile in the URL")
        return (f"Redis at {where} closed the connection after the TLS handshake: it most "
                "likely does not accept our client certificate; is it signed by the CA in "
                "the server's tls-ca-cert-file?")
    if tls and ("handshake" in low or "wrong version number" in low or "record layer" in low):
        return (f"no TLS from Redis at {where}: {text}; is this port the server's tls-port? "
                "A plain-text port needs redis://")
    hint = ("; if the server expects TLS, use rediss://" if not tls and "closed by server" in low
            else "")
    return (f"cannot reach Redis at {where}: {text}{hint}; is it running, and is --redis-url "
            "(REDPOOL_REDIS_URL) right?")


# -- URL options -----------------------------------------------------------------------------

def _query(url: str) -> dict[str, str]:
    try:
        query = urlsplit(url).query
    except ValueError:
        return {}
    return {k: v[0] for k, v in parse_qs(query).items() if v}


def _check_tls(url: str, scheme: str, options: dict[str, str]) -> None:
    tls_params = sorted(k for k in options if k.startswith("ssl_"))
    if tls_params and scheme not in TLS_SCHEMES:
        raise ConfigError(f"TLS options ({', '.join(tls_params)}; {_source('ca')} and the like "
                          f"end up there) need a TLS URL, rediss://, rediss+sentinel:// or "
                          f"rediss+cluster://, not "
                          f"{redact_url(url)}")
    if "ssl_keyfile" in options and "ssl_certfile" not in options:
        raise ConfigError(f"{_source('key')} (ssl_keyfile) is the key of a client certificate: "
                          f"give the certificate too, {_source('cert')} (ssl_certfile)")
    for param in _FILES:
        path = options.get(param)
        if path is not None and not (os.path.isfile(path) and os.access(path, os.R_OK)):
            option = next(o for o, (_, p) in _TLS.items() if p == param)
            raise ConfigError(f"{param}={path} ({_source(option)}): no such readable file")
