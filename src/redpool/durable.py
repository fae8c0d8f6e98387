"""Durable answers on Redis Cluster (--durable-results): an answer leaves its outbox only
once a replica of the node it was written to has it.

A completion on Redis Cluster takes two steps (cluster.py): complete_cluster.lua, in the
queue's slot, swaps the job in our processing list for its answer in our outbox; then
the answer is written into its own slots (nodes.write_answers: the result key, the
reply) and removed from the outbox by the next round trip.  Those slots may live on
another primary.  If that primary fails over before its replica has the answer, the
answer is gone, while the queue's shard -- which never failed -- no longer holds the job
nor its answer: the job ran, and its result vanished.

So, when durable, every node an answer is written to is sent, in the same pipeline and
on the same connection, ``WAIT 1 <wait_ms>``: WAIT covers every earlier write on that
connection (and all before it in the node's replication stream), so one WAIT per node
per round confirms the whole batch.  Only the answers of nodes whose WAIT reached a
replica are removed from the outbox; the others stay there and the housekeeping
confirms them later: it writes the result key again (the same bytes: a result key
that the failover lost comes back), and, for a reply already pushed, writes a probe key
in the reply's slot instead of pushing it twice (``Keys.probe``): a WAIT after any
write of ours covers the earlier ones too.  Only a reply whose slot has moved to
another node since it was pushed (its node failed over) is pushed again: it may then
arrive twice, which the protocol allows, rather than never.

The event loop is single-threaded: a WAIT that times out stalls every queue for
``wait_ms``.  So a node whose WAIT fell short is *lagging*: for ``retry`` seconds its
answers are written without a WAIT (kept in the outbox, not confirmed), then one WAIT is
tried again.  A node the slot map shows without replicas has nothing to wait for.

A node that *refuses* WAIT (an error reply: an ACL user without ``+wait``, a renamed
command, a managed service) would otherwise keep every answer in the outbox for ever,
the outbox growing and nobody told.  So a refusal switches durable results off for that
node: it is said once (``redis_error``, naming what to grant), its answers are confirmed
without waiting -- a failover of that node before its replica has them loses them, as
without --durable-results -- and WAIT is tried there again every REFUSED_RETRY seconds
(``redis_error_cleared`` once it answers).  WAIT is tried once at start too (``check``),
so that the refusal is said before the first answer.  An error that says the node is a
replica now (a failover) or that its slot moves is not a refusal: it lags, as above.
"""

from __future__ import annotations

import time

import redis
from redis.exceptions import RedisClusterException

from .keytypes import classify

#: --durable-results: auto (on for a cluster whose primaries have replicas), on, off
MODES = ("auto", "on", "off")
WAIT_MS = 100       # one WAIT's timeout: the longest one lagging replica stalls the loop
RETRY_LAGGING = 2.0  # seconds between two WAITs of a node whose replica lags
PROBE_TTL_MS = 60_000
REFRESH = 5.0        # seconds between two looks at which primary has how many replicas
REFUSED_RETRY = 60.0  # seconds between two WAITs of a node that refused WAIT
OUTBOX_PAGE = 500    # outbox entries the housekeeping reads per queue and tick (cluster.py)


class Durable:
    """Per-node WAITs for write_answers (nodes.py), and the memory of lagging nodes."""

    def __init__(self, r, mode: str = "auto", *, wait_ms: int = WAIT_MS,
                 retry: float = RETRY_LAGGING, clock=time.monotonic) -> None:
        if mode not in MODES:
            raise ValueError(f"durable results: {mode!r} is not one of {', '.join(MODES)}")
        self.r, self.mode, self.wait_ms, self.retry, self.clock = r, mode, wait_ms, retry, clock
        self.retry_refused = REFUSED_RETRY
        self.lagging: dict[str, float] = {}  # node name -> when to WAIT on it again
        self._known: dict[str, int] | None = None  # primary name -> its replicas
        self._seen, self._refresh_at = None, 0.0
        self.on = mode == "on" or (mode == "auto" and any(self.replicas().values()))
        self.waits = self.short = 0          # WAITs sent, and those that fell short
        self.pushed: dict[bytes, str] = {}   # entry -> node its reply went to, unconfirmed
        self.refused: dict[str, tuple[str, float]] = {}  # node -> (error, next WAIT)
        self.news: list[tuple[str, dict]] = []  # events for the loop (tell)
        self._said: set[str] = set()  # the refusals said (once each)

    def check(self) -> None:
        """At start, when on: WAIT 0 on every primary (it answers at once), so that a
        node that refuses WAIT is said before the first answer is kept waiting."""
        if not self.on:
            return
        try:
            primaries = self.r.get_primaries()
        except (redis.RedisError, RedisClusterException):
            return
        for node in primaries:
            try:
                node.redis_connection.execute_command("WAIT", 0, 1)
            except redis.ResponseError as e:
                if _refusal(e):
                    self.refuse(node.name, e)
            except (redis.RedisError, RedisClusterException):
                pass  # (a node away: its writes fail too, and say so)

    def refuse(self, name: str, e: Exception) -> None:
        """Node ``name`` refused WAIT: its answers are confirmed without waiting for
        REFUSED_RETRY seconds; said once per distinct error (``news``)."""
        self.refused[name] = (str(e), self.clock() + self.retry_refused)
        if str(e) in self._said:
            return
        self._said.add(str(e))
        grant = "grant the worker's ACL user +wait (`redpool acl worker` prints its rules)" \
            if isinstance(e, redis.exceptions.NoPermissionError) or "NOPERM" in str(e) else \
            "let the worker's Redis user run WAIT (it may be renamed or disabled there)"
        self.news.append(("redis_error", dict(
            error=str(e), during="durable_results", node=name,
            note=f"Redis refused WAIT, which --durable-results needs: answers written to "
                 f"{name} (and any node refusing alike) now leave their outbox without "
                 f"waiting for a replica, so a failover of that node before its replica "
                 f"has them loses them (their jobs ran; result keys and replies vanish). "
                 f"To keep them, {grant}; "
                 f"to say it is meant, set --durable-results off. WAIT is tried again "
                 f"every {self.retry_refused:g} s; redis_error_cleared once it answers")))

    def tell(self, emit) -> None:
        """Hand the events the refusals left to the loop's ``emit`` (cluster.py promote)."""
        while self.news and emit is not None:
            event, fields = self.news.pop(0)
            emit(event, **fields)

    def describe(self) -> dict:
        """What to log once at start (cli.py)."""
        why = {"on": "asked for", "off": "asked for"}.get(self.mode) or (
            "the primaries have replicas" if self.on else "no primary has a replica")
        out = {"on": self.on, "mode": self.mode, "why": why}
        if self.refused:
            out["wait_refused_by"] = sorted(self.refused)  # (redis_error says what to do)
        return out

    def replicas(self) -> dict[str, int]:
        """Each primary's replicas, by CLUSTER NODES, looked at again every REFRESH
        seconds and whenever the client learns a new slot map.  (Not CLUSTER SLOTS, the
        client's slot map: it leaves out a replica that has not yet reported an offset,
        as on a cluster that has written nothing yet, and one marked failed -- which,
        back, may yet be promoted with what it has: so it is waited for too.)"""
        now, cache = self.clock(), self.r.nodes_manager.slots_cache
        if self._known is not None and cache is self._seen and now < self._refresh_at:
            return self._known
        try:
            nodes = self.r.cluster_nodes()
        except (redis.RedisError, RedisClusterException):
            if self._known is None:  # (an ACL user of an older `redpool acl`: the slot map)
                self._known = {owners[0].name: len(owners) - 1 for owners in cache.values()}
            return self._known  # (the next call asks again)
        ids = {v["node_id"]: name for name, v in nodes.items()}
        known = {name: 0 for name, v in nodes.items() if "master" in v["flags"].split(",")}
        for v in nodes.values():
            flags = v["flags"].split(",")
            if "slave" in flags and ids.get(v["master_id"]) in known:
                known[ids[v["master_id"]]] += 1
        self._known, self._seen, self._refresh_at = known, cache, now + REFRESH
        return known

    def moved(self, raw: bytes, key: str) -> bool:
        """Whether the reply of ``raw``, pushed but not confirmed, was pushed to a node
        that no longer serves ``key`` (failed over: the push may be lost with it)."""
        name = self.pushed.get(raw)
        if name is None:
            return False
        owners = self.r.nodes_manager.slots_cache.get(self.r.keyslot(key)) or ()
        return bool(owners) and owners[0].name != name

    def plan(self, commands: list[tuple[str, tuple]]) -> tuple[list, list[str], dict]:
        """For ``commands`` (key, command) about to go out with send_by_node: the
        WAITs to append, as (node name, (key, command)), one per node that has
        replicas and does not lag; each command's node name; and per node the
        replicas needed (0: nothing to wait for; None: lagging, not confirmed now)."""
        slots = self.r.nodes_manager.slots_cache
        known = self.replicas()
        now = self.clock()
        nodes: list[str] = []
        need: dict[str, int | None] = {}
        last: dict[str, str] = {}
        for key, _ in commands:
            owners = slots.get(self.r.keyslot(key)) or ()
            name = owners[0].name if owners else ""
            nodes.append(name)
            last[name] = key
            need[name] = min(1, max(0, known.get(name, len(owners) - 1)))
        waits = []
        for name, n in need.items():
            if not n:
                continue
            if self.lagging.get(name, 0) > now:
                need[name] = None
                continue
            if name in self.refused and self.refused[name][1] > now:
                need[name] = 0  # (WAIT refused: confirmed without it, as said)
                continue
            waits.append((name, (last[name], ("WAIT", n, self.wait_ms))))
        return waits, nodes, need

    def confirmed(self, waits: list, replies: list, need: dict) -> set[str]:
        """The nodes whose answers are confirmed: those with nothing to wait for, and
        those whose WAIT (``replies``, in the order of ``waits``) reached the replicas
        needed.  A node that fell short lags from now on, for ``retry`` seconds; one
        that refused WAIT is confirmed without it (``refuse``)."""
        ok = {name for name, n in need.items() if n == 0}
        now = self.clock()
        for (name, (_, (_, n, _))), reply in zip(waits, replies):
            self.waits += 1
            if isinstance(reply, redis.ResponseError) and _refusal(reply):
                self.refuse(name, reply)
                ok.add(name)
                continue
            if name in self.refused and not isinstance(reply, Exception):
                del self.refused[name]  # (WAIT answers there again)
                if not self.refused and self._said:
                    self._said.clear()
                    self.news.append(("redis_error_cleared", {"during": "durable_results"}))
            if not isinstance(reply, Exception) and int(reply) >= n:
                ok.add(name)
                self.lagging.pop(name, None)
            else:
                self.short += 1
                if not isinstance(reply, redis.ConnectionError):  # (a node away: no stall)
                    self.lagging[name] = now + self.retry
        return ok


def _refusal(e: Exception) -> bool:
    """An error reply to WAIT that is a refusal (no permission, an unknown or renamed
    command), not a node that is a replica now (a failover) nor a slot moving."""
    return classify(e) == "refused" and "replica" not in str(e).lower()
