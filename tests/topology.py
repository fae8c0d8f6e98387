"""A failover harness: the tests start a real replicated topology, feed it jobs, kill a
primary, and account for every job they were told is safe.

* ``SentinelTopology``: a primary, a replica and three sentinels; ``ClusterTopology``: a
  three-primary Redis Cluster with a replica each.  Both name the primary to kill (the
  *victim*) and its replica, and say when that replica has been promoted.
* ``Producer``: one thread per queue, each pushing a job at a steady pace and sending
  ``WAIT 1 <ms>`` after it on the same connection.  A push counts as *confirmed* only
  when WAIT says a replica has it: that is the only push a producer may consider safe
  from a failover (Redis replicates asynchronously; docs/deploy.md, "What can be lost").
* the ledger: the task ``t.logged`` (tests/taskmods/jobs.py) writes every run, with its
  time, to a list on a separate plain server, which no failover touches.
* ``cut_off``: makes a replica lag.  SIGSTOP does not: what the primary sends meanwhile
  waits in the stopped replica's socket buffer and is applied after SIGCONT, so nothing
  is lost (tried by hand with valkey-server 8.1: 100 writes made while the replica was
  stopped all survived the primary's SIGKILL; with ``CLIENT PAUSE`` on the replica, or
  the cut below, all 100 were lost).  The cut: the replica's link is closed and it is
  given a masterauth the primary does not have, so it cannot reconnect; every write
  from then on exists on the primary alone, for a reason that is plain to see.  ``lag`` reports how many bytes of replication stream the
  replica missed, so a test can check the lag was real.
* ``settled`` and ``account``: wait until no job is queued, reserved or in an outbox,
  then check every confirmed job has its answer (a result key or a dead-letter entry),
  and that the jobs that ran twice ran first in the window docs/deploy.md allows: the
  writes the promoted replica never received.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from helpers import wait_for
from redpool.config import SETTINGS
from redpool.connection import connect
from redpool.errors import ConfigError
from redpool.keys import Keys
from redpool.protocol import encode_job, make_job
from redpool.server import EmbeddedCluster, EmbeddedSentinel, EmbeddedServer

QUEUES = ("a", "b", "c")   # on three different primaries of EmbeddedCluster(3) (conftest)
VICTIM_QUEUE = "b"         # on a cluster, the primary of this queue is the one killed
CUT_PASSWORD = "topology-cut"  # the masterauth a cut-off replica tries, in vain
SLACK = 2.0   # seconds: a job may complete this long after it ran (a busy 2-core machine)


def node_client(node: EmbeddedServer) -> redis.Redis:
    return redis.Redis(host="127.0.0.1", port=node.port, socket_timeout=5,
                       decode_responses=True)


def replication(node: EmbeddedServer) -> dict:
    with node_client(node) as r:
        return r.info("replication")


def wait_replicating(node: EmbeddedServer, primary: EmbeddedServer,
                     timeout: float = 60) -> None:
    """Until ``node`` is a replica in step with ``primary``; else fail saying what both
    report (and the tail of node's log)."""
    def ok() -> bool:
        info = replication(node)
        return info.get("role") == "slave" and info.get("master_link_status") == "up" \
            and int(info.get("master_port", 0)) == primary.port
    try:
        wait_for(ok, timeout, 0.1, "the old primary to replicate the promoted one")
    except AssertionError as e:
        raise AssertionError(f"{e}: it says {replication(node)}; the promoted one says "
                             f"{replication(primary)}; its log: {node._tail_log()}") from None


def durable_results_flag() -> list[str]:
    """The daemon flag that keeps answers until a replica confirms them, if this
    version of redpool has it and TOPOLOGY_DURABLE_RESULTS is not "off": the hook a test
    uses to run with it (or, set to off, to show what goes wrong without it)."""
    if os.environ.get("TOPOLOGY_DURABLE_RESULTS", "auto") == "off":
        return []
    if any(s.flag == "--durable-results" for s in SETTINGS):
        return ["--durable-results", "on"]
    return []


# -- topologies -----------------------------------------------------------------------------------

class SentinelTopology:
    """A primary, one replica and three sentinels watching the primary as ``service``."""

    service = "redpool-topology"

    def __init__(self) -> None:
        self.started: list[EmbeddedServer] = []
        try:
            self.victim = EmbeddedServer().start()
            self.started.append(self.victim)
            self.victim_replica = EmbeddedServer(
                extra_args=["--replicaof", "127.0.0.1", str(self.victim.port)]).start()
            self.started.append(self.victim_replica)
            self.sentinels = [self._sentinel(EmbeddedSentinel(
                self.victim.port, service=self.service, down_after=1000,
                failover_timeout=5000)) for _ in range(3)]
            wait_for(self._ready, 30, 0.2, "the replica in sync and the sentinels to meet")
        except BaseException:
            self.cleanup()
            raise

    def _sentinel(self, srv: EmbeddedSentinel) -> EmbeddedSentinel:
        try:
            srv.start()
        except ConfigError as e:
            import pytest
            pytest.skip(f"{srv.binary} cannot run as a sentinel here: {e}")
        self.started.append(srv)
        return srv

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{hosts}/{self.service}/0"

    def sentinel_view(self, s: EmbeddedSentinel) -> dict:
        with redis.Redis(host="127.0.0.1", port=s.port, socket_timeout=2,
                         decode_responses=True) as c:
            # not sentinel_master(): redis-py's parser of it breaks on some versions
            view = c.execute_command("SENTINEL", "MASTER", self.service)
        if isinstance(view, list):
            view = dict(zip(view[::2], view[1::2]))
        return view

    def _ready(self) -> bool:
        views = [self.sentinel_view(s) for s in self.sentinels]
        return (replication(self.victim_replica).get("master_link_status") == "up"
                and all(int(v["num-slaves"]) == 1 and int(v["num-other-sentinels"]) == 2
                        for v in views))

    def promoted(self) -> bool:
        """The replica is a primary, and the sentinels say so (one is enough: clients ask
        any of them)."""
        return replication(self.victim_replica).get("role") == "master" and \
            any(int(self.sentinel_view(s)["port"]) == self.victim_replica.port
                for s in self.sentinels)

    def rejoin(self) -> None:
        """Start the killed primary again, empty, as a replica of the promoted one (what
        an operator does next), so that pushes can be confirmed by WAIT again."""
        self.victim.extra_args = ["--replicaof", "127.0.0.1", str(self.victim_replica.port)]
        self.victim.start()
        wait_replicating(self.victim, self.victim_replica)

    def job_id(self, queue: str, i: int, keys: Keys) -> str:
        return f"{queue}-{i}"

    def namespace(self, prefix: str) -> str:
        return f"{prefix}{uuid.uuid4().hex[:8]}"

    def cleanup(self) -> None:
        for srv in reversed(self.started):
            srv.cleanup()


class ClusterTopology:
    """Three primaries with a replica each; the victim is the primary of VICTIM_QUEUE.
    ``job_id`` picks ids whose result key lives on the victim too, whatever their queue:
    an answer written there for a job of another shard is what a failover can lose."""

    def __init__(self) -> None:
        self.cluster = EmbeddedCluster(3, replicas=1).start()
        probe = Keys("x", cluster=True)
        self.victim = self.cluster.node_of(probe.queue(VICTIM_QUEUE))
        self.victim_replica = self.cluster.replicas[self.victim.port][0]

    @property
    def url(self) -> str:
        return self.cluster.url.replace("redis://", "redis+cluster://", 1)

    def promoted(self) -> bool:
        try:
            return replication(self.victim_replica).get("role") == "master"
        except redis.RedisError:
            return False

    def rejoin(self) -> None:
        """Start the killed primary again (its nodes.conf, no data): the cluster makes it
        a replica of the promoted one, so that pushes can be confirmed by WAIT again."""
        self.victim.start()
        wait_replicating(self.victim, self.victim_replica)

    def namespace(self, prefix: str) -> str:
        """A fresh namespace whose own shard (``{ns}``: the supervisors' leases) is not
        the victim's, so that every run kills the same kind of shard: one of queues and
        answers."""
        while True:
            ns = f"{prefix}{uuid.uuid4().hex[:8]}"
            if self.cluster.node_of(Keys(ns, cluster=True).supervisors) is not self.victim:
                return ns

    def job_id(self, queue: str, i: int, keys: Keys) -> str:
        for k in range(1000):
            jid = f"{queue}-{i}-{k}"
            if self.cluster.node_of(keys.result(jid)) is self.victim:
                return jid
        raise AssertionError("no job id of 1000 has its result key on the victim")

    def cleanup(self) -> None:
        self.cluster.cleanup()


# -- lag and kill ---------------------------------------------------------------------------------

def cut_off(replica: EmbeddedServer) -> None:
    """Stop ``replica`` receiving its primary's writes: its link is closed, and it
    cannot open another (the primary has no such password).  It stays up, answering
    sentinels and the cluster bus, so it can still be promoted."""
    with node_client(replica) as r:
        r.config_set("masterauth", CUT_PASSWORD)
        r.execute_command("CLIENT", "KILL", "TYPE", "master")
    wait_for(lambda: replication(replica).get("master_link_status") == "down", 10, 0.02,
             "the replica's link to its primary to close")


def lag(primary: EmbeddedServer, replica: EmbeddedServer) -> int:
    """Bytes of replication stream the primary has and ``replica`` does not (the
    replica is asked first: what the primary writes in between counts as missed)."""
    behind = int(replication(replica)["master_repl_offset"])
    return int(replication(primary)["master_repl_offset"]) - behind


def kill(node: EmbeddedServer) -> float:
    """SIGKILL a server (its process group); returns when, on the wall clock."""
    at = time.time()
    os.killpg(node.proc.pid, signal.SIGKILL)
    node.proc.wait(10)
    return at


def restore(replica: EmbeddedServer) -> None:
    """Undo cut_off's setting (the replica is a primary by now; for tidiness)."""
    with node_client(replica) as r:
        r.config_set("masterauth", "")


# -- the producer ---------------------------------------------------------------------------------

class Producer:
    """One thread per queue, each pushing ``t.logged`` jobs every ``pace`` seconds, then
    ``WAIT 1 wait_ms`` on the same connection.  ``confirmed``: job id -> when WAIT said a
    replica has it (wall clock); ``unconfirmed``: pushes that failed, or that no replica
    acknowledged in time (the producer would have to retry those: they are not counted)."""

    def __init__(self, topo, keys: Keys, queues=QUEUES, *, pace: float = 0.04,
                 wait_ms: int = 1000) -> None:
        self.topo, self.keys, self.queues = topo, keys, queues
        self.pace, self.wait_ms = pace, wait_ms
        self.confirmed: dict[str, float] = {}
        self.pushed: dict[str, float] = {}   # job id -> when its push was sent (wall clock)
        self.queue_of: dict[str, str] = {}   # job id -> its queue
        self.unconfirmed = 0
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(q,), daemon=True,
                                          name=f"producer-{q}") for q in queues]

    def start(self) -> "Producer":
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            if t.ident is not None:
                t.join(30)

    def _client(self):
        # no retries by redis-py: a push it sent again after a lost connection could be
        # queued twice, and run twice for a reason that is not the failover's
        return connect(self.topo.url, socket_timeout=5, socket_connect_timeout=2,
                       retry=Retry(NoBackoff(), 0))

    def confirmed_since(self, t: float, queue: str | None = None) -> int:
        return sum(when > t and (queue is None or self.queue_of[i] == queue)
                   for i, when in list(self.confirmed.items()))

    def _run(self, queue: str) -> None:
        client = self._client()
        qkey = self.keys.queue(queue)
        i = 0
        try:
            while not self._stop.is_set():
                i += 1
                jid = self.topo.job_id(queue, i, self.keys)
                data = encode_job(make_job("t.logged", [i], id=jid))
                self.pushed[jid] = time.time()
                self.queue_of[jid] = queue
                try:
                    if self._push(client, qkey, data) >= 1:
                        self.confirmed[jid] = time.time()
                    else:
                        self.unconfirmed += 1
                except redis.RedisError:
                    self.unconfirmed += 1
                    self._relearn(client)
                    self._stop.wait(0.1)
                self._stop.wait(self.pace)
        finally:
            client.close()

    def _push(self, client, qkey: str, *data: bytes, wait_ms: int | None = None) -> int:
        """LPUSH then WAIT on one connection (WAIT counts that connection's writes): a
        pipeline on one server; on a cluster, one on the connection of the key's node.
        Returns how many replicas WAIT says have the push."""
        node = client
        if hasattr(client, "get_node_from_key"):
            node = client.get_node_from_key(qkey).redis_connection
        pipe = node.pipeline(transaction=False)
        pipe.lpush(qkey, *data)
        pipe.execute_command("WAIT", 1, wait_ms or self.wait_ms)
        return int(pipe.execute()[1])

    def burst(self, n: int, seconds: float) -> int:
        """Push ``n`` jobs of ``seconds`` each onto each queue at once, each queue's
        confirmed by one WAIT: a backlog that is still running when a replica is cut off
        or a primary killed.  Returns how many were confirmed."""
        done = 0
        client = self._client()
        try:
            for queue in self.queues:
                ids = [self.topo.job_id(queue, 1_000_000 + k, self.keys) for k in range(n)]
                data = [encode_job(make_job("t.logged", [k, seconds], id=jid))
                        for k, jid in enumerate(ids)]
                # (the replica is in step: it answers at once; 5 s for a busy machine)
                if self._push(client, self.keys.queue(queue), *data, wait_ms=5000) >= 1:
                    at = time.time()
                    for jid in ids:
                        self.queue_of[jid] = queue
                        self.confirmed[jid] = at
                    done += n
                else:
                    self.unconfirmed += n
        finally:
            client.close()
        return done

    @staticmethod
    def _relearn(client) -> None:
        if hasattr(client, "nodes_manager"):   # a cluster: the slot map may have changed
            try:
                client.nodes_manager.initialize()
            except redis.RedisError:
                pass


# -- the ledger -----------------------------------------------------------------------------------

def runs(ledger: redis.Redis, key: str) -> dict[str, list[float]]:
    """Job id -> the times it ran (t.logged's entries: ``<id>:run@<time>:<pid>``)."""
    out: dict[str, list[float]] = defaultdict(list)
    for e in ledger.lrange(key, 0, -1):
        jid, what, _pid = e.decode().split(":")
        if what.startswith("run@"):
            out[jid].append(float(what[4:]))
    return {j: sorted(ts) for j, ts in out.items()}


def settled(admin, keys: Keys, queues=QUEUES) -> bool:
    """No job left anywhere but answered: every queue empty, every processing list and
    outbox gone.  (A job still on its way may not be counted as lost.)"""
    try:
        if any(admin.llen(keys.queue(q)) for q in queues):
            return False
        return not any(True for pat in (f"{keys.ns}:processing:*", f"{keys.ns}:outbox:*")
                       for _ in admin.scan_iter(match=pat, count=1000))
    except redis.RedisError:   # a node away, or the map changed: ask again
        return False


def answered(admin, keys: Keys, ids: list[str], queues=QUEUES) -> set[str]:
    """The ids among ``ids`` that have an answer: a result key, or a dead-letter entry."""
    got: set[str] = set()
    for n in range(0, len(ids), 500):
        chunk = ids[n:n + 500]
        vals = (admin.mget_nonatomic if hasattr(admin, "mget_nonatomic") else admin.mget)(
            [keys.result(i) for i in chunk])
        got.update(i for i, v in zip(chunk, vals) if v is not None)
    dead_keys = {keys.dead_of(q) for q in queues} if keys.cluster else {keys.dead}
    for dk in dead_keys:
        got.update(json.loads(e)["id"] for e in admin.lrange(dk, 0, -1))
    return got & set(ids)


@dataclass
class Outcome:
    """What one failover cost, for printing and checking."""
    kind: str
    confirmed: int
    unconfirmed: int
    lost: list[str]
    twice: dict[str, list[float]]          # id -> its run times, for jobs that ran more
    outside: list[str]                     # ids that ran twice outside the window
    promotion_s: float
    serving_s: float
    missed_bytes: int
    exposed: int | None = None             # confirmed jobs run in the lag, answer on victim

    def line(self) -> str:
        return (f"\n{self.kind}: {self.confirmed} pushes confirmed by WAIT "
                f"({self.unconfirmed} not); lost {len(self.lost)} {self.lost[:10]}; "
                f"ran twice {len(self.twice)} (outside the window: {len(self.outside)} "
                f"{self.outside[:10]}); replica promoted {self.promotion_s:.2f} s after the "
                f"kill, jobs served again after {self.serving_s:.2f} s; replica missed "
                f"{self.missed_bytes} bytes"
                + ("" if self.exposed is None else
                   f"; {self.exposed} confirmed jobs of other shards ran in the lag with "
                   f"their answer on the killed primary"))


def account(kind: str, producer: Producer, ledger_runs: dict[str, list[float]],
            have_answer: set[str], *, window_from: float, kill_at: float,
            promoted_at: float, missed_bytes: int, victim_queue: str | None = None,
            lag_from: float | None = None) -> Outcome:
    """Count what was lost and what ran twice.  The documented window for running twice
    is the writes the promoted replica never had: jobs whose first run was from
    ``window_from`` (the cut, or the kill when in sync) less SLACK, up to the moment the
    daemon served again from the new primary (plus SLACK).  ``victim_queue``: on a
    cluster, the queue on the killed primary (the others are served throughout); on one
    primary, None: every queue."""
    confirmed = dict(producer.confirmed)
    lost = sorted(i for i in confirmed if i not in have_answer)
    # served again: the first run of a job pushed to the victim's queue after the kill
    after = [ts[0] for i, ts in ledger_runs.items() if producer.pushed.get(i, 0) > kill_at
             and victim_queue in (None, producer.queue_of[i])]
    serving_at = min(after) if after else float("inf")
    twice = {i: ts for i, ts in ledger_runs.items() if len(ts) > 1}
    outside = sorted(i for i, ts in twice.items()
                     if not window_from - SLACK <= ts[0] <= serving_at + SLACK)
    exposed = None
    if lag_from is not None and victim_queue is not None:
        exposed = sum(1 for i, ts in ledger_runs.items() if i in confirmed
                      and producer.queue_of[i] != victim_queue
                      and lag_from <= ts[0] <= kill_at)
    return Outcome(kind, len(confirmed), producer.unconfirmed, lost, twice, outside,
                   promoted_at - kill_at, serving_at - kill_at, missed_bytes, exposed)
