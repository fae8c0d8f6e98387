"""Redis losing its data, told apart from a lost lease.

A Redis server restarted without persistence (no AOF, no RDB snapshots), or flushed,
comes back empty: the queues, our processing lists, our lease are gone.  Seen from a
supervisor that looks exactly like a lease lost while it was frozen (renew and
reserve refuse its epoch) followed by a reaper taking its jobs back (completions find
them gone): the fencing rules would drop the results of the jobs it still holds and
report "ran elsewhere", while in truth nobody has them any more.

So each supervisor claims a marker, ``keys.dataset`` (per queue slot on Redis Cluster,
where each node can lose its data alone): a random token without a TTL, which nothing
ever deletes.  Whenever something looks fenced (a completion finds its job gone, the
lease is lost, a requeue or a crash count finds nothing, Redis is back after an outage)
the markers are read first, off the hot path: one gone, or another token in its place
(another supervisor found it gone first), means the data was lost, not taken.  Then the
jobs we still hold (reserved, running, finished but unacknowledged) are pushed back into
our processing lists, so their results are written and a stop puts them back; we
register anew, and say it once, with what we held.  What waited in the queues is gone,
and how much cannot be known from here.  The marker costs nothing per job: it is read
only when something already went wrong.

At start each supervisor also warns once when the server keeps nothing across a
restart (INFO for AOF, CONFIG GET for RDB's save points where it may be asked).
"""

from __future__ import annotations

import uuid
from collections import Counter

import redis

from .errors import NameInUse


def run_ids(nodes: list[redis.Redis]) -> dict[str, str]:
    """{server: run_id}, which a restart changes (INFO, which the worker's ACL grants).
    Empty when INFO is refused."""
    out = {}
    for node in nodes:
        try:
            info = node.info("server")
        except redis.ResponseError:
            return {}
        out[_address(node)] = str(info.get("run_id", ""))
    return out


def persistence(nodes: list[redis.Redis]) -> tuple[bool | None, str]:
    """Does every server keep what it acknowledged across a restart?  (True, how): AOF
    or RDB snapshots; (False, which servers keep nothing); (None, why it cannot be
    told).  INFO shows AOF; RDB's save points need CONFIG GET, which an ACL user made by
    `redpool acl` may not run: it is not even tried under a named user (the refusal
    would be written to the server's ACL LOG), and a server without the command
    (managed Redis) cannot say."""
    how, bare = set(), []
    for node in nodes:
        try:
            if int(node.info("persistence").get("aof_enabled", 0)):
                how.add("AOF")
                continue
            if _acl_user(node) not in (None, "default"):
                return None, f"CONFIG GET is not tried as ACL user {_acl_user(node)!r}"
            save = (node.config_get("save") or {}).get("save")
        except redis.ResponseError as e:
            return None, f"the server refused to say ({e})"
        if save and str(save).strip():
            how.add("RDB snapshots")
        else:
            bare.append(_address(node))
    if bare:
        return False, ", ".join(bare)
    return True, " and ".join(sorted(how))


def _address(r: redis.Redis) -> str:
    kw = r.connection_pool.connection_kwargs
    return f"{kw.get('host', '?')}:{kw.get('port', '?')}" if "host" in kw else \
        str(kw.get("path") or kw.get("service_name") or "redis")


def _acl_user(r: redis.Redis) -> str | None:
    return r.connection_pool.connection_kwargs.get("username")


class Markers:
    """Mixin of RedisQueue (queue.py): the dataset markers, and what the servers say of
    themselves.  Needs its keys, queues, unusable, _proc_key(), _each() and nodes()."""

    def dataset_keys(self) -> list[str]:
        return list(dict.fromkeys([self.keys.dataset, *map(self.keys.dataset_of, self.queues)]))

    def read_markers(self) -> dict[str, bytes | None]:
        """The dataset markers as they stand (keys.dataset): one round trip."""
        keys = self.dataset_keys()
        return dict(zip(keys, self._each([(k, ("GET", k)) for k in keys])))

    def claim_markers(self) -> dict[str, bytes]:
        """Set each missing marker to a fresh token (SET NX: the first supervisor's
        wins) and return the ones that stand now."""
        keys, token = self.dataset_keys(), uuid.uuid4().hex
        out = self._each([c for k in keys for c in ((k, ("SET", k, token, "NX")),
                                                     (k, ("GET", k)))])
        return dict(zip(keys, out[1::2]))

    def restore(self, items: Counter) -> int:
        """Push (queue, raw) jobs back into our processing lists, as many times as
        counted: after the server lost its data, the jobs we still hold are ours again,
        so that their results are written and a stop puts them back.  Returns how many.
        A processing list of the wrong type (keytypes.py) gets its jobs once fixed."""
        by_key: dict[str, list[bytes]] = {}
        for (q, raw), n in items.items():
            if self._proc_key(q) not in self.unusable:
                by_key.setdefault(self._proc_key(q), []).extend([raw] * n)
        if by_key:
            self._each([(k, ("LPUSH", k, *raws)) for k, raws in by_key.items()])
        return sum(len(v) for v in by_key.values())

    def run_ids(self) -> dict[str, str]:
        return run_ids(self.nodes())

    def persistence(self) -> tuple[bool | None, str]:
        return persistence(self.nodes())


class DataLoss:
    """Mixin of Duties: needs its cfg, rq, lease, hooks, sup, info(), redis_failed(),
    and the state Duties.__init__ sets for it (markers, run_ids, data_lost_during,
    lost_counts, dropped, leased, name_lost, next_renew)."""

    def check_persistence(self) -> None:
        """At start: warn once if the server keeps nothing across a restart (at-least-once
        needs a server that keeps what it acknowledged)."""
        try:
            kept, detail = self.rq.persistence()
        except redis.RedisError as e:
            kept, detail = None, str(e)
        if kept is None:
            self.hooks.emit("redis_persistence_unknown", reason=detail)
        elif not kept:
            self.hooks.emit(
                "redis_not_persistent", servers=detail,
                note="the Redis server has neither AOF nor RDB snapshots: if it restarts, "
                     "every queued, scheduled and running job is lost, and no worker can "
                     "know which; turn on AOF (appendonly yes) or snapshots (save ...)")

    def judge_missing(self, now: float, missing: int) -> None:
        """``missing`` completions found their job gone from our processing lists: taken
        back by a reaper after our lease expired (they ran elsewhere, and their results
        are dropped: fencing), or lost with the server's data (restored and sent again).
        If Redis cannot be asked now, they are judged when it is back (redis_ok)."""
        self.dropped += missing
        try:
            if self.check_dataset(now, "complete"):
                return
        except redis.RedisError as e:
            self.redis_failed(e, now, "dataset")
            return
        self.report_dropped(now)

    def report_dropped(self, now: float) -> None:
        """Say that completions found their job gone (its result not written), and why,
        as far as it can be told here: our lease unrenewed for longer than it lasts
        (frozen, cut off) lets a reaper take them; a lease that held means no reaper
        did, and Redis itself lost them (a failover to a replica that had not received
        them) or another program removed them."""
        self.rq.missed = []
        if not self.dropped:
            return
        count, self.dropped = self.dropped, 0
        since = now - self.renewed_at
        if since >= self.cfg.lease:
            self.hooks.emit(
                "results_dropped", count=count, cause="lease_expired",
                reason=f"jobs were no longer in our processing list, and this supervisor had "
                       f"not renewed its lease for {since:.0f} s, longer than it lasts "
                       f"({self.cfg.lease:g} s): a reaper gave them back to their queue, so "
                       "they ran, or will run, on another worker (or Redis lost them in a "
                       "failover meanwhile: then they are queued again, or lost)",
                note="nothing to do for these jobs; find why this host stalled or was cut off "
                     "from Redis that long (lease_lost says when), or raise --lease")
            return
        self.hooks.emit(
            "results_dropped", count=count, cause="gone_from_redis",
            reason=f"jobs were no longer in our processing list although our lease held "
                   f"(renewed {max(0.0, since):.0f} s before, it lasts {self.cfg.lease:g} s), so "
                   "no reaper took them: Redis lost the write that gave them to us (a failover "
                   "promoted a replica that had not received it: they are back in their queue "
                   "and run again, or are lost if their enqueue was lost too), or an "
                   "acknowledgement of ours whose reply was lost had gone through (their "
                   "results are written), or another program removed them",
            note="these jobs may run again (delivery is at least once) or not at all: check "
                 "each was answered (redpool inspect ID) and send again what was not; to "
                 "narrow the window, min-replicas-to-write (docs/deploy.md, What can be lost)")

    def check_dataset(self, now: float, during: str, also: list[tuple[str, bytes]] = ()) -> bool:
        """Has the server lost its data since we last looked (a marker gone, or set anew
        by another supervisor that found it gone)?  If so, handle it (data_lost) and
        return True.  ``also``: jobs to restore with those we hold (one a dead child
        held).  Redis errors propagate."""
        if self.markers is None:
            return False
        found = self.rq.read_markers()  # (without those a hung cluster node holds)
        if all(found.get(k, v) == v for k, v in self.markers.items()):
            return False
        self.data_lost(now, during, also)
        return True

    def data_lost(self, now: float, during: str, also: list[tuple[str, bytes]] = ()) -> None:
        """The server lost its data: our lease, our processing lists, the queues.  Nobody
        took our jobs back (no lease_lost, no results_dropped): they are gone from Redis.
        Put every job we still hold back into our processing lists (so their results are
        written, and a stop puts them back in their queues), register anew, say it once.
        Redis errors propagate; the next tick resumes the work, and it is said once."""
        s = self.sup
        if self.data_lost_during is None:  # (found now, not resumed)
            self.lost_counts = {"running": len(s.inflight) + len(also),
                                "reserved": len(s.backlog),
                                "unacknowledged": len(s.pending) + len(self.rq.missed),
                                "restored": 0}
        self.data_lost_during = during
        self.dropped = 0   # (nothing was fenced: the jobs were lost, and are restored)
        self.lost_counts["restored"] += self.restore_held(also)
        try:
            self.lease.register(self.info(), self.cfg.lease)
        except NameInUse as e:
            self.name_lost = True
            self.hooks.emit("name_taken", error=str(e))
            s.lifecycle.stop_now()
            return
        self.leased = True
        self.renewed_at = now
        self.next_renew = now + self.cfg.lease / 3
        self.markers = self.rq.claim_markers()
        before, self.run_ids = self.run_ids, self.rq.run_ids()
        self.data_lost_during = None
        self.say_lost(during, sorted(k for k, v in self.run_ids.items()
                                     if before.get(k) not in (None, v)))

    def restore_held(self, also: list[tuple[str, bytes]], queues: set[str] | None = None) -> int:
        """Push back into our processing lists every job we hold that Redis has not:
        reserved, running, finished (their completions are sent again).  How many.
        ``queues``: only those queues' (a processing list another program overwrote)."""
        s = self.sup
        if s.waiter is not None:
            s.receive(s.waiter.take())
        s.pending[:0] = self.rq.missed     # their results were not written: again
        self.rq.missed = []
        held = s.held()   # (not a job known by its head: its bytes were never here; one
        held.update(also)  # cut in Redis, oversized.Oversized, is told apart by its hash)
        for queue, raws in self.rq.processing_contents().items():
            held.subtract((queue, raw) for raw in raws)
        if queues is not None:
            held = Counter({k: n for k, n in held.items() if k[0] in queues})
        return self.rq.restore(+held)

    def say_lost(self, during: str, restarted: list[str]) -> None:
        counts = self.lost_counts
        cause = (f"the Redis server ({', '.join(restarted)}) restarted without its data: it "
                 "keeps no AOF or RDB snapshots, or lost them" if restarted else
                 "Redis lost this namespace's keys (a restart without persistence, FLUSHALL "
                 "or FLUSHDB, or eviction under maxmemory)")
        self.hooks.emit(
            "redis_data_lost", during=during, cause=cause,
            held=counts["running"] + counts["reserved"] + counts["unacknowledged"], **counts,
            note="the jobs this supervisor held are back in Redis and will be answered; jobs "
                 "that were waiting in the queues, scheduled jobs and retries, results and "
                 "dead letters on that server are gone, and how many cannot be known here: "
                 "producers must send again what was not answered; give Redis persistence "
                 "(appendonly yes)")
