"""Least-privilege Redis ACL rules for redpool's two kinds of users, declared once.

A *producer* may push jobs and read what comes back, nothing else; a *worker* may do
everything a supervisor does, inside its namespace.  docs/deploy.md shows these rules,
``redpool acl producer|worker`` prints them as an ``ACL SETUSER`` line, and
tests/test_redis_deploy.py runs a real daemon and Client under them, checks that the
server denied them nothing (ACL LOG), that the producer is refused everything else,
and that the documentation shows exactly what this module builds.

The command lists come from what the code sends: client.py for producers; queue.py,
lease.py, waiter.py, the metrics collector and the header of every script in lua/
for workers.  Scripts do not widen a user's rights: each command a script runs is
checked against the ACL of the user who runs it (Redis 7, Valkey).  Producers get no
scripting at all: ``enqueue(..., delay=...)`` is TIME then ZADD.

One line serves both key layouts (keys.py): on Redis Cluster a queue's keys carry a
hash tag, ``<ns>:queue:{q}``, which the patterns of one server match already; only
the worker's namespace-wide keys move, to ``{<ns>}:...``, and both users need the two
commands a cluster client learns the cluster with.  On one server these grant nothing
worth having (the cluster keys of the same namespace, the command table), so there
is no separate cluster variant to choose.

Producer rules use selectors and read- or write-only key patterns, so they need
Redis 7.0+ or Valkey 7.2+.  The rules keep the user's passwords (no ``reset``), so
the line can be run again after an upgrade; a new user has none and cannot log in
until one is set (``ACL SETUSER name '>password'``).
"""

from __future__ import annotations

import shlex

from .keys import glob_escape
from .protocol import DEFAULT_NAMESPACE, Keys
from .replies import check_patterns

ROLES = ("producer", "worker")

#: Every connection: PING (start-up check, health checks), SELECT (a URL with a db
#: other than 0), CLIENT SETINFO (redis-py names itself; a denial is harmless but
#: would fill the ACL LOG).
CONNECTION = ("ping", "select", "client|setinfo")

#: Redis Cluster: redis-py's RedisCluster reads the slot map (CLUSTER SLOTS) and the
#: command table (COMMAND, to find each command's keys) when it connects, and the
#: slot map again after a MOVED or a lost node.  ACLs are per node: set the user on
#: every node.
CLUSTER = ("cluster|slots", "command")

#: The producer's commands, by the keys they may touch (a selector each).
PRODUCER_ROOT = ("time",)                                   # delay=: the server's clock
PRODUCER_PUSH = ("lpush",)                                  # jobs: write-only
PRODUCER_SCHEDULE = ("zadd",)                               # at= / delay=
PRODUCER_RESULTS = ("get", "mget")                          # read-only
PRODUCER_REPLIES = ("brpop", "rpop", "rpush", "del")        # its own reply lists

#: The worker's commands: everything under its namespace (INFO: at start, to refuse a
#: Redis Cluster node clearly).
WORKER_SCRIPTS = ("evalsha", "script|load")
WORKER_DIRECT = ("blmove", "exists", "hget", "info", "lrange", "scan", "set", "smembers",
                 "type",  # keys of the wrong type, found and looked at again (keytypes.py)
                 "lpush", "expire", "lrem",  # these three: cluster.py's deliver()
                 "wait", "cluster|nodes")  # --durable-results (durable.py)
WORKER_IN_SCRIPTS = ("del", "exists", "expire", "hdel", "hget", "hincrby", "hset", "lmove",
                     "lindex", "llen",  # (lua/_by_hash.lua: a job named by its hash)
                     "lpos", "lpush", "lrem", "lrange", "ltrim", "pexpire", "pttl", "rpop",
                     "rpush", "sadd", "set", "srem", "time", "type", "zadd", "zrange",
                     "zrangebyscore", "zrem")
#: Reads of the metrics collector (--metrics-port), `redpool status`, `inspect` and
#: `dead` (which also needs LREM and its script), so operators may use this user too.
WORKER_OBSERVE = ("exec", "get", "lindex", "llen", "multi", "pttl", "time", "ttl", "zcard",
                  "zrange")

# The first rules of every line: they replace whatever the user could do before,
# except its passwords.
_BASE = ("on", "resetkeys", "resetchannels", "clearselectors", "-@all")


def _plus(commands) -> list[str]:
    return [f"+{c}" for c in sorted(set(commands))]


def rules(role: str, namespace: str = DEFAULT_NAMESPACE,
          reply_patterns: tuple[str, ...] | list[str] = ()) -> list[str]:
    """The ACL SETUSER rules of ``role`` for ``namespace``, one token each.
    ``reply_patterns``: the workers' ``--reply-to`` patterns, the reply_to lists outside
    ``<ns>:reply:`` they answer on (``myapp:replies:*``, replies.py): producers read
    them, workers write them.  Nothing else outside the namespace: not ``~*``."""
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}: {' or '.join(ROLES)}")
    check_patterns(namespace, reply_patterns)
    keys = Keys(glob_escape(namespace))
    replies = [f"~{p}" for p in reply_patterns]
    if role == "worker":
        commands = WORKER_SCRIPTS + WORKER_DIRECT + WORKER_IN_SCRIPTS + WORKER_OBSERVE
        # "~" alone matches the empty key name, which complete.lua gets for "no result
        # key / no reply / no retry" (an ACL checks every key a script is given)
        return [*_BASE, *_plus(CONNECTION + CLUSTER), *_plus(commands), f"~{keys.ns}:*",
                *_cluster_wide(namespace), "~", *replies]
    return [*_BASE, *_plus(CONNECTION + CLUSTER + PRODUCER_ROOT),
            _selector(PRODUCER_PUSH, f"%W~{keys.queue('*')}"),
            _selector(PRODUCER_SCHEDULE, f"~{keys.scheduled('*')}"),
            _selector(PRODUCER_RESULTS, f"%R~{keys.result('*')}"),
            _selector(PRODUCER_REPLIES, f"~{keys.reply('*')}", *replies)]


def _cluster_wide(namespace: str) -> list[str]:
    """The worker's namespace-wide keys in the Redis Cluster layout, ``{<ns>}:...``
    (its other keys are under ``<ns>:`` there too); none for a namespace that cannot
    be used on Redis Cluster."""
    try:
        keys = Keys(glob_escape(namespace), cluster=True)
    except ValueError:
        return []
    return [f"~{keys.supervisors}", f"~{keys.supervisor('*')}", f"~{keys.reaper}"]


def _selector(commands, *patterns: str) -> str:
    return f"({' '.join([*_plus(commands), *patterns])})"


def default_user(role: str) -> str:
    return f"redpool-{role}"


def setuser(role: str, user: str | None = None, namespace: str = DEFAULT_NAMESPACE,
            reply_patterns: tuple[str, ...] | list[str] = ()) -> str:
    """``ACL SETUSER <user> <rules>``, quoted for a shell (``redis-cli ...``) or a
    redis-cli prompt or pipe (which take the same single quotes)."""
    user = user or default_user(role)
    tokens = ["ACL", "SETUSER", user, *rules(role, namespace, reply_patterns)]
    return " ".join(shlex.quote(t) for t in tokens)
