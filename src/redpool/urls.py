"""Redis URLs made safe to log, print and put in a repr.

``redact_url`` errs on the side of hiding too much: everything before the last ``@``
of the authority is replaced (a password someone forgot to percent-encode may hold
``/``, ``?`` or ``#``, which would fool ``urllib.parse``), and so are query values
that carry secrets (``unix:///run/redis.sock?password=...``, ``sentinel_password=``,
``ssl_password=``: any option whose name has pass, pwd, secret, token or auth in it).
A lone user-info part (``redis://secret@host``) is hidden too: some clients read it as
a password.  The Sentinel forms (``redis+sentinel://user:pw@h1:26379,h2:26379/svc``)
have one user-info part for all their hosts, and are redacted like any other URL.
Paths of TLS files (``ssl_ca_certs``, ``ssl_keyfile``) are shown: they help, and a path
is not the key.
"""

from __future__ import annotations

import os
from urllib.parse import unquote

REDACTED = "***"
DEFAULT_URL = "redis://localhost:6379/0"   # when no --redis-url or REDPOOL_REDIS_URL says


def chosen_url(flag: str | None = None) -> str:
    """The Redis URL to use: the flag's, else REDPOOL_REDIS_URL, else DEFAULT_URL."""
    return flag or os.environ.get("REDPOOL_REDIS_URL") or DEFAULT_URL

_SECRET_PARTS = ("pass", "pwd", "secret", "token", "auth")


def redact_url(url: str) -> str:
    """``url`` with its password (and any secret query parameter) replaced by ``***``.

    >>> redact_url("redis://user:s3cret@db.internal:6380/2")
    'redis://user:***@db.internal:6380/2'
    >>> redact_url("unix:///run/redis.sock?db=1&password=s3cret")
    'unix:///run/redis.sock?db=1&password=***'
    >>> redact_url("rediss+sentinel://:pw@s1:26379,s2:26379/main?ssl_keyfile=/k.pem&sentinel_password=x")
    'rediss+sentinel://:***@s1:26379,s2:26379/main?ssl_keyfile=/k.pem&sentinel_password=***'
    """
    scheme, sep, rest = url.partition("://")
    if not sep:  # not a URL we understand: show nothing that could be a secret
        return url if "@" not in url and "pass" not in url.lower() else REDACTED
    at = rest.rfind("@")
    if at != -1 and not rest.startswith("/"):  # "unix:///a@b.sock" has no authority
        userinfo, rest = rest[:at], rest[at + 1:]
        user, colon, _password = userinfo.partition(":")
        userinfo = f"{user}:{REDACTED}" if colon else REDACTED
        rest = f"{userinfo}@{rest}"
    head, q, query = rest.partition("?")
    if not q:
        return f"{scheme}://{head}"
    query, hash_, fragment = query.partition("#")
    params = []
    for param in query.split("&"):
        name, eq, _value = param.partition("=")
        if eq and any(part in unquote(name).lower() for part in _SECRET_PARTS):
            param = f"{name}={REDACTED}"
        params.append(param)
    return f"{scheme}://{head}?{'&'.join(params)}{hash_}{fragment}"
