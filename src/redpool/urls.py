"""Redis URLs: which one to use, refusing one that is malformed, and making one safe to
log, print and put in a repr.

**Which URL.**  ``--redis-url``, else ``--redis-url-file`` (a file holding the URL),
else ``REDPOOL_REDIS_URL``, else ``REDPOOL_REDIS_URL_FILE``, else localhost.  A file
keeps the password out of the command line (which every user of the host can read in
``ps``) and out of the environment; systemd's ``LoadCredential=`` hands a service
exactly such a file.  A flag and its file, or the two variables, set together are an
error rather than a silent choice: one of them would be stale.

**Malformed URLs** (``check_url``, called by ``connection.connect`` before any parser
sees the URL).  A password with an unencoded ``/``, ``?`` or ``#`` ends the URL's
address early: ``redis://:head@SECRET/tail@host`` is host ``SECRET``, and the error
("cannot connect to SECRET:6379") would print part of the password.  So the shapes
that a password can produce are refused, and the message quotes nothing of the URL:
an ``@`` after the address, a ``#``, a query item without ``=`` (an ``&`` in a
password given as ``?password=``), a port that is not a number (``redis://u:pw`` with
its ``@host`` forgotten), a bracket in the user name or password, an unknown scheme.
Several ``@`` within the address are accepted: every URL parser we know of (Python's,
WHATWG's, Go's) splits at the last one, which is what its writer meant.

``redact_url`` errs on the side of hiding too much.  The password after ``user:`` is
replaced, and so is a lone user-info part (``redis://secret@host``: some clients read
it as a password).  A query shows redis-py's common options (``SHOWN_OPTIONS``: db,
timeouts, the paths of TLS files: they help, and a path is not the key), the secret
ones as ``password=***`` (also ``sentinel_password``, ``ssl_password``), and any other
item as ``***``: after a ``password=`` cut by an unencoded ``&``, the rest of the
password looks like an option of its own.  A fragment is ``#***``.  A malformed URL
(an ``@`` after the address, or ``redis://user:password`` with its ``@host``
forgotten) is shown as ``redis://***``: nothing in it can be told from the password.
The Sentinel and Cluster forms (``redis+sentinel://user:pw@h1:26379,h2:26379/svc``)
have one user-info part for all their hosts, and are redacted like any other URL.
"""

from __future__ import annotations

import os
from typing import Mapping
from urllib.parse import unquote

from .errors import ConfigError

REDACTED = "***"
DEFAULT_URL = "redis://localhost:6379/0"   # when no --redis-url or REDPOOL_REDIS_URL says
URL_ENV, FILE_ENV = "REDPOOL_REDIS_URL", "REDPOOL_REDIS_URL_FILE"
URL_FORMS = ("use redis://[user:password@]host[:port][/db], rediss://..., "
             "unix:///path.sock, or redis+sentinel://[user:password@]host[:port],"
             "host[:port].../service[/db] (rediss+sentinel:// with TLS), or "
             "redis+cluster://[user:password@]host[:port],host[:port]... for Redis Cluster "
             "(rediss+cluster:// with TLS)")
NETWORK_SCHEMES = ("redis", "rediss", "redis+sentinel", "rediss+sentinel", "redis+cluster",
                   "rediss+cluster")
_ENCODE = ("percent-encode any of @ / ? # & [ ] % in the user name or password: %40 %2F "
           "%3F %23 %26 %5B %5D %25")
_SECRET_PARTS = ("pass", "pwd", "secret", "token", "auth")
# Query options shown as they are: redis-py's common ones, none of them a secret; and
# those shown as name=***.  Any other is hidden whole: after a "password=" cut by an
# unencoded '&', the rest of the password looks like an option of its own
# ("password=ab&cd=ef"), and its name, even one that says "secret", is part of it.
SECRET_OPTIONS = frozenset({"password", "sentinel_password", "ssl_password"})
SHOWN_OPTIONS = frozenset({
    "db", "protocol", "client_name", "username", "sentinel_username", "decode_responses",
    "encoding", "health_check_interval", "max_connections", "retry_on_timeout",
    "socket_timeout", "socket_connect_timeout", "socket_keepalive", "ssl_ca_certs",
    "ssl_ca_path", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs", "ssl_check_hostname",
    "ssl_ciphers", "ssl_min_version"})


# -- which URL ------------------------------------------------------------------------------

def given_url(flag: str | None = None, file: str | None = None,
              env: Mapping[str, str] | None = None) -> str | None:
    """The URL the command line or the environment names, None if neither does."""
    env = os.environ if env is None else env
    if flag and file:
        raise ConfigError("--redis-url and --redis-url-file both name the Redis URL: give one")
    if flag:
        return flag
    if file:
        return read_url_file(file, "--redis-url-file")
    url, path = env.get(URL_ENV), env.get(FILE_ENV)
    if url and path:
        raise ConfigError(f"{URL_ENV} and {FILE_ENV} are both set: unset one (the file "
                          "keeps the password out of the environment)")
    if url:
        return url
    return read_url_file(path, FILE_ENV) if path else None


def chosen_url(flag: str | None = None, file: str | None = None,
               env: Mapping[str, str] | None = None) -> str:
    """The Redis URL to use: ``given_url``'s, else DEFAULT_URL."""
    return given_url(flag, file, env) or DEFAULT_URL


def read_url_file(path: str, source: str) -> str:
    """The URL in the file at ``path``: its one line, without surrounding white space.
    Errors name the file, never its content."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read(65536)
    except (OSError, UnicodeDecodeError) as e:
        why = e.strerror if isinstance(e, OSError) and e.strerror else "not UTF-8 text"
        raise ConfigError(f"{source} {path}: cannot read the Redis URL from it: {why}") from None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) != 1:
        raise ConfigError(f"{source} {path}: the file must hold the Redis URL on one line "
                          f"(it holds {len(lines)} lines that are not empty)")
    return lines[0]


# -- malformed URLs -------------------------------------------------------------------------

def check_url(url: str) -> None:
    """Refuse a URL whose password (or user name) holds a character that changes what the
    URL means, before anything reads a host or a port out of it.  Nothing of the URL is
    quoted: any part of it may be part of the password."""
    def bad(why: str) -> ConfigError:
        return ConfigError(f"the Redis URL is malformed: {why}; {_ENCODE}")

    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in (*NETWORK_SCHEMES, "unix"):
        raise ConfigError(f"the Redis URL does not start with a scheme redpool knows (the "
                          f"URL is not shown: it may hold a password); {URL_FORMS}")
    if "#" in rest:
        raise bad("it holds a '#', which ends a URL where it stands")
    address, tail = ("", rest) if scheme == "unix" else _address(rest)
    if scheme != "unix" and _at_after_address(tail):
        raise bad("an '@' comes after the '/' or '?' that ends the address, so the password "
                  "(or user name) before it holds a '/' or '?'")
    if any(item and not item.partition("=")[0] or item and "=" not in item
           for item in tail.partition("?")[2].split("&")):
        raise bad("its query holds an item that is not NAME=VALUE (an '&' in a password "
                  "given as ?password=... cuts it in two)")
    if scheme == "unix":
        return
    userinfo, _, hosts = address.rpartition("@")
    if "[" in userinfo or "]" in userinfo:
        raise bad("the user name or password holds '[' or ']'")
    why = _bad_hosts(hosts)
    if why:
        raise bad(why)


def _address(rest: str) -> tuple[str, str]:
    """(authority, the rest from the first '/' or '?' on) of what follows ``scheme://``."""
    end = min((i for i in (rest.find("/"), rest.find("?")) if i != -1), default=len(rest))
    return rest[:end], rest[end:]


def _at_after_address(tail: str, *, known_only: bool = False) -> bool:
    """An '@' in the path or the query, other than inside a query option's value
    (``?ssl_ca_certs=/etc/a@b.pem``); ``known_only``: other than inside the value of an
    option redact_url shows or hides by name (not ``?Zq=@host``, a password's '?')."""
    path, _, query = tail.partition("?")
    if "@" in path:
        return True
    for item in query.split("&"):
        name, eq, value = item.partition("=")
        if "@" in name or ("@" in value and known_only and not _known_option(name)):
            return True
    return False


def _bad_hosts(hosts: str) -> str | None:
    """Why the ``host[:port][,host[:port]...]`` part cannot be an address, or None."""
    for item in hosts.split(","):
        port = ""
        if item.startswith("["):
            host, close, port = item[1:].partition("]")
            if not close or "[" in host or (port and not port.startswith(":")):
                return "an IPv6 address is not closed with ']' (or a password holds '[')"
            port = port[1:]
        elif "]" in item:
            return "a ']' stands outside an IPv6 address (or a password holds one)"
        elif ":" in item:  # from the first ':', as urllib reads it
            port = item.partition(":")[2]
        if port and not port.isdigit():
            return ("a port is not a number (a password whose '@host' is missing, or that "
                    "holds ':' with '/' or '?', is read as an address)")
        if port and not 0 < int(port) < 65536:
            return "a port is out of the range 1-65535"
    return None


# -- safe to show ---------------------------------------------------------------------------

def holds_password(url: str | None) -> bool:
    """Does ``url`` carry a password: after ``user:`` (or ``:``), or as a query option
    whose name says it is one (``password=``, ``sentinel_password=``, ``ssl_password=``)?
    A lone user name (``redis://name@host``) is not one: redis-py sends it as the user."""
    if not url:
        return False
    scheme, sep, rest = url.partition("://")
    if not sep:
        return "@" in url
    address = "" if rest.startswith("/") else _address(rest)[0]
    if address.rpartition("@")[0].partition(":")[2]:
        return True
    query = rest.partition("?")[2].partition("#")[0]
    return any(eq and value and _secret_name(name)
               for name, eq, value in (p.partition("=") for p in query.split("&")))


def _secret_name(name: str) -> bool:
    return any(part in unquote(name).lower() for part in _SECRET_PARTS)


def _known_option(name: str) -> bool:
    return unquote(name) in SHOWN_OPTIONS or unquote(name) in SECRET_OPTIONS


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
    if not sep:  # not a URL: perhaps the password itself, given where the URL goes
        return REDACTED
    if not rest.startswith("/"):  # "unix:///a@b.sock" has no authority
        address, tail = _address(rest)
        forgotten = "@" not in address and scheme.lower() in NETWORK_SCHEMES \
            and _bad_hosts(address.partition("#")[0])
        if forgotten or _at_after_address(tail, known_only=True):
            # malformed: "redis://user:password" with its '@host' forgotten, or a password
            # that holds '/' or '?' (or '&' in "?password=..."): all of it may be secret
            return f"{scheme}://{REDACTED}"
        userinfo, at, host = address.rpartition("@")
        if at:
            user, colon, _password = userinfo.partition(":")
            rest = f"{user}:{REDACTED}@{host}{tail}" if colon else f"{REDACTED}@{host}{tail}"
    rest, hash_, _fragment = rest.partition("#")
    fragment = f"#{REDACTED}" if hash_ else ""  # a Redis URL has none: a password cut at '#'
    head, q, query = rest.partition("?")
    if not q:
        return f"{scheme}://{head}{fragment}"
    params = []
    for param in query.split("&"):
        name, eq, _value = param.partition("=")
        if eq and unquote(name) in SECRET_OPTIONS:
            param = f"{name}={REDACTED}"
        elif param and not (eq and unquote(name) in SHOWN_OPTIONS):
            param = REDACTED
        params.append(param)
    return f"{scheme}://{head}?{'&'.join(params)}{fragment}"
