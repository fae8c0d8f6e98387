"""Redis URLs made safe to log, print and put in a repr.

``redact_url`` errs on the side of hiding too much: everything before the last ``@``
of the authority is replaced (a password someone forgot to percent-encode may hold
``/``, ``?`` or ``#``, which would fool ``urllib.parse``), and so are query values
that carry secrets (``unix:///run/redis.sock?password=...``).  A lone user-info part
(``redis://secret@host``) is hidden too: some clients read it as a password.
"""

from __future__ import annotations

REDACTED = "***"
_SECRET_PARAMS = frozenset({"password", "pass", "passwd", "pwd", "auth", "token", "secret"})


def redact_url(url: str) -> str:
    """``url`` with its password (and any secret query parameter) replaced by ``***``.

    >>> redact_url("redis://user:s3cret@db.internal:6380/2")
    'redis://user:***@db.internal:6380/2'
    >>> redact_url("unix:///run/redis.sock?db=1&password=s3cret")
    'unix:///run/redis.sock?db=1&password=***'
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
        if eq and (name.lower() in _SECRET_PARAMS or "password" in name.lower()):
            param = f"{name}={REDACTED}"
        params.append(param)
    return f"{scheme}://{head}?{'&'.join(params)}{hash_}{fragment}"
