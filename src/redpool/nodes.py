"""Redis Cluster, node by node: the commands of cluster.py's hot path sent per node on
the node's own connection (send_by_node), and the second step of a completion, writing
the answers an outbox holds into their own slots (write_answers, deliver).

A ClusterPipeline would do the routing, at ~30 us of CPU per command and, for EVALSHA, a
COMMAND GETKEYS round trip to find the keys: more than the rest of a tiny job's
handling.  Here each command names the key that routes it, and every node's commands go
out before any reply is read: one round trip however many nodes.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field

import redis
from redis.exceptions import RedisClusterException

from .breaker import attach
from .durable import PROBE_TTL_MS
from .oversized import read_bulk
from .protocol import Keys
from .queue import REPLY_TTL_WHEN_NO_RESULT, load_script
from .redirects import follow
from .topology import unreachable_as_connection_error


def rerun_unknown(script, keys: list, args: list, reply):
    """NOSCRIPT: the script did not run; load it and run it (once)."""
    if not isinstance(reply, redis.exceptions.NoScriptError):
        return reply
    try:
        return script(keys=keys, args=args)
    except redis.RedisError as e:
        return e


def deliver(r, keys: Keys, outbox: str, entries: list[bytes], progress: dict | None = None,
            durable=None) -> int:
    """Write the answers of an outbox's ``entries`` and remove those written (and, if
    ``durable``, confirmed) from it (by value: two deliverers racing cannot drop an
    entry the other has not written).  ``progress`` as write_answers', kept up to date.
    Returns the replies skipped; raises the first failure, once the rest is done."""
    if not entries:
        return 0
    written = write_answers(r, keys, entries, progress, durable)
    pipe = r.pipeline(transaction=False)
    for raw in entries:
        if raw not in written.failed:
            pipe.lrem(outbox, 1, raw)
            if progress is not None:
                progress.pop(raw, None)
    pipe.execute()
    if progress is not None:
        progress.update(written.failed)
    if written.error is not None:
        raise written.error
    return written.skipped


@dataclass(slots=True)
class Written:
    """What write_answers did: replies skipped (a reply_to that is one of our own keys
    -- it could be a queue --, holds another type, or that our ACL user may not write;
    an entry that does not parse), and the entries not fully written, each with the
    parts of it that were (0: the result key, 1: the reply), and the first error."""

    skipped: int = 0
    failed: dict = field(default_factory=dict)
    error: Exception | None = None


def write_answers(r, keys: Keys, entries: list[bytes], progress: dict | None = None,
                  durable=None) -> Written:
    """Write outbox entries' answers into their own slots in one round trip
    (send_by_node): the result key (SET with its TTL) and the reply (reply.lua: LPUSH
    and EXPIRE, or nothing on a key of another type).  A part that fails (its node is
    away, out of memory) leaves the entry to be written again; ``progress`` (entry ->
    the parts already written, from an earlier Written.failed) keeps a reply that went
    through from being pushed twice while, say, the result key's node is away.

    ``durable`` (durable.Durable, when on): each node written to is sent a WAIT after
    its writes, and an entry written to a node whose WAIT fell short is returned in
    ``failed`` too (every part written, no error): kept in its outbox.  Written again,
    its result key is SET again (the same bytes: back if a failover lost it) and, for
    a reply already pushed, a probe key in the reply's slot is written (Keys.probe), so
    that the WAIT covers the push without pushing the reply twice -- unless the reply's
    slot has moved to another node since (a failover): then it is pushed again, and
    may arrive twice rather than never."""
    own, replies = (f"{keys.ns}:", f"{{{keys.ns}}}:"), keys.reply("")
    reply_script = load_script(r, "reply")
    again = durable is not None and durable.on
    out = Written()
    commands: list[tuple] = []
    parts: list[tuple[bytes, int]] = []  # (entry, 0: result key, 1: reply, 2: probe)
    for raw in entries:
        try:
            result_key, ttl, reply_to, env = json.loads(raw)
        except (ValueError, TypeError):  # only we write outboxes; never crash on one
            out.skipped += 1
            continue
        done = progress.get(raw, ()) if progress else ()
        if result_key and ttl > 0 and (0 not in done or again):
            parts.append((raw, 0))
            commands.append((result_key, ("SET", result_key, env, "EX", ttl)))
        if not reply_to:
            continue
        if 1 in done and not (again and durable.moved(raw, reply_to)):
            if again and (probe := keys.probe(reply_to)):
                parts.append((raw, 2))
                commands.append((probe, ("SET", probe, "1", "PX", PROBE_TTL_MS)))
            continue
        if reply_to.startswith(own) and not reply_to.startswith(replies):
            out.skipped += 1
            continue
        parts.append((raw, 1))
        commands.append((reply_to, ("EVALSHA", reply_script.sha, 1, reply_to, env,
                                    ttl if ttl > 0 else REPLY_TTL_WHEN_NO_RESULT)))
    waits, nodes, need = durable.plan(commands) if again else ([], [], {})
    # what would only be written again to confirm it, on a node that lags: not now
    idle = {i for i, (raw, part) in enumerate(parts) if need.get(nodes[i], 0) is None
            and (part == 2 or part == 0 and 0 in (progress or {}).get(raw, ()))} if again else ()
    go = [i for i in range(len(commands)) if i not in idle]
    got = send_by_node(r, [commands[i] for i in go] + [w for _, w in waits])
    sent: list = [0] * len(commands)
    for i, reply in zip(go, got):
        sent[i] = reply
    sure = durable.confirmed(waits, got[len(go):], need) if again else None
    ok: dict = defaultdict(set)
    unsure: set = set()
    for i, ((raw, part), cmd, reply) in enumerate(zip(parts, commands, sent)):
        rerun = False  # (on a connection of its own: the WAIT does not cover it)
        if part == 1:
            rerun = isinstance(reply, redis.exceptions.NoScriptError)
            reply = rerun_unknown(reply_script, cmd[1][3:4], cmd[1][4:], reply)
            if reply == 0 or isinstance(reply, redis.exceptions.NoPermissionError):
                out.skipped += 1
                reply = 1
        if isinstance(reply, Exception):
            out.failed.setdefault(raw, set(progress.get(raw, ()) if progress else ()))
            out.error = out.error or reply
        else:
            if part < 2:
                ok[raw].add(part)
            if sure is not None and (rerun or nodes[i] not in sure):
                unsure.add(raw)
                if part == 1:
                    durable.pushed[raw] = nodes[i]
    for raw in unsure:
        out.failed.setdefault(raw, set(progress.get(raw, ()) if progress else ()))
    if again and durable.pushed:
        for raw, _ in parts:
            if raw not in out.failed:
                durable.pushed.pop(raw, None)
    for raw, done in out.failed.items():
        done |= ok[raw]
    return out


def send_by_node(r, commands: list[tuple[str, tuple]], over: int = 0) -> list:
    """Commands, each given as (the key that routes it, the command), all of whose keys
    share that key's slot: packed and sent per node on one of its connections, every
    node's writes before any read.  One round trip however many nodes, and none of a
    ClusterPipeline's per-command cost: ~30 us of CPU each, more than the rest of a
    tiny job's handling, and for EVALSHA a COMMAND GETKEYS round trip to the server to
    find the keys (measured: 4,900 -> 15,400 jobs/s for the supervisor's side alone).

    Replies in order, an error in place of its reply: a ResponseError, or, for every
    command of a node that could not be reached, its ConnectionError (or TimeoutError),
    so the other nodes' replies still count.  After such a failure the slot map is
    learned again, as the client does for its own commands (the node may have failed
    over to its replica).  A slot moving is followed (redirects.py): a command
    redirected by ASK goes to the importing node after ASKING, one by MOVED to the
    slot's new owner; TRYAGAIN (the slot's keys split between two nodes for now) is
    answered as it is, for the caller to wait a moment and try again.  A node that
    timed out opens its breaker (breaker.py): from then on nothing is sent to it, each
    of its commands answered by NodeOpen at once.

    ``over`` (a waiter's BLMOVE, alone): its first reply is read by oversized.py's
    reader, so that an element longer than ``over`` bytes is never held whole (its head
    and tail kept, the rest hashed as it streams past), as on one server.  Everything
    else is as for any command: an error reply (MOVED, ASK, TRYAGAIN, CLUSTERDOWN) is
    read in full and handled as above, a connection error trips the breaker and learns
    the slot map again; only the reply of a redirected BLMOVE is read by redis-py."""
    if not commands:
        return []
    by_node: dict = defaultdict(list)
    with unreachable_as_connection_error():
        for i, (key, _) in enumerate(commands):
            by_node[(r.get_node_from_key(key).name, False)].append(i)
    replies: list = [None] * len(commands)
    read = _streamed(over) if over and len(commands) == 1 else _read
    failed = _round(r, commands, by_node, replies, read)
    failed = follow(r, commands, replies, _round) or failed
    if failed:
        try:
            try:
                r.nodes_manager.initialize(last_failed_node_name=failed)
            except TypeError:  # redis-py before the hint: the same, asking in any order
                r.nodes_manager.initialize()
        except (redis.RedisError, RedisClusterException):
            pass  # the whole cluster is away: the next call tries again
    return replies


def _round(r, commands: list[tuple[str, tuple]], groups: dict, replies: list,
           read=None) -> str:
    """Send the commands ``groups`` names, {(node name, asking): their indexes}, every
    node's before any reply is read, and put the replies in place.  With ``asking``
    each command goes after an ASKING, on the same connection (a slot being imported
    there: redirects.py).  ``read``: how a reply is read (send_by_node's ``over``).
    Returns the name of a node that could not be reached, or ""."""
    read = read or _read
    held = []   # (node, pool, connection, indexes, asking) of the nodes written to
    failed = ""
    breaker = attach(r)
    for (name, asking), idx in groups.items():
        pool = conn = None
        if breaker.is_open(name):
            for i in idx:
                replies[i] = breaker.skip(name)
            continue
        try:
            pool = r.get_node(node_name=name).redis_connection.connection_pool
            conn = pool.get_connection()
            sent = [c for i in idx for c in ((("ASKING",), commands[i][1]) if asking
                                              else (commands[i][1],))]
            conn.send_packed_command(conn.pack_commands(sent))
            held.append((name, pool, conn, idx, asking))
            for i in idx:
                replies[i] = None  # (a redirect's, if sent again)
        except (redis.ConnectionError, redis.TimeoutError) as e:
            failed = e.node = name  # (the node it came from: ClusterQueue.node_hangs)
            breaker.trip(name, e, pool)
            _put_back(pool, conn, broken=True)
            for i in idx:
                replies[i] = e
    for name, pool, conn, idx, asking in held:
        try:
            for i in idx:
                if asking:
                    _read(conn)  # OK (an error: the command's own reply says more)
                replies[i] = read(conn)
            _put_back(pool, conn)
        except (redis.ConnectionError, redis.TimeoutError) as e:
            failed = e.node = name
            breaker.trip(name, e, pool)
            _put_back(pool, conn, broken=True)
            e.sent = True  # these commands went out: they may have run (lost_reply())
            for i in idx:
                if replies[i] is None:
                    replies[i] = e
        except BaseException:
            _put_back(pool, conn, broken=True)  # a reply may be half read
            raise
    return failed


def _read(conn):
    try:
        return conn.read_response()
    except redis.ResponseError as e:  # read in full: the connection stays in step
        return e


def _streamed(over: int):
    """A reader of one BLMOVE's reply (send_by_node's ``over``), as _read."""
    def read(conn):
        try:
            return read_bulk(conn, over)
        except redis.ResponseError as e:  # (one line, read in full: still in step)
            return e
    return read


def lost_reply(e: BaseException) -> bool:
    """A connection error after the command went out: it may have run.  (One that never
    reached the node -- refused, unreachable, not sent to a node that hangs -- ran
    nowhere.)"""
    if not isinstance(e, (redis.ConnectionError, redis.TimeoutError)):
        return False
    sent = getattr(e, "sent", None)
    return sent if sent is not None else "connecting to" not in str(e)


def _put_back(pool, conn, broken: bool = False) -> None:
    if conn is None:
        return
    if broken:
        conn.disconnect()
    pool.release(conn)
