"""Redis Cluster: the worker on a private three-primary cluster (redpool.server.
EmbeddedCluster), with queues spread over its shards.

What is checked: the key layout puts every key of one queue in one slot and the queues
on different primaries; real daemons run jobs on several queues at once with results,
replies, dead letters, retries, delayed jobs and priority; the two-step completion
(outbox) delivers answers after a crash between its steps; fencing drops a stale
result; a killed child reruns exactly its job; a killed supervisor is reaped queue by
queue; and a worker whose URL does not match the server says so at start.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest
import redis

from conftest import SPREAD_QUEUES
from helpers import ROOT, wait_for
from redpool.cluster import ClusterLease, ClusterQueue, ClusterReaper
from redpool.nodes import deliver
from redpool.keys import Keys, crash_started
from redpool.keytypes import KeyMap, Unusable
from redpool.queue import Completion

pytestmark = pytest.mark.daemon


def push(rc, keys, queue: str, **job) -> bytes:
    raw = json.dumps(job).encode()
    rc.lpush(keys.queue(queue), raw)
    return raw


def result(rc, keys, job_id: str) -> dict | None:
    raw = rc.get(keys.result(job_id))
    return json.loads(raw) if raw else None


def ledger(r, key: str) -> Counter:
    """How many times each job id logged a start (tests/taskmods/jobs.py)."""
    return Counter(e.decode().split(":")[0] for e in r.lrange(key, 0, -1)
                   if e.decode().split(":")[1] == "start")


# -- the key layout -------------------------------------------------------------------------------

def test_the_cluster_layout_tags_every_key_of_a_queue_with_its_name():
    k = Keys("app", cluster=True)
    assert k.queue("emails:high") == "app:queue:{emails:high}"
    assert k.scheduled("q") == "app:scheduled:{q}"
    assert k.processing("web-1", "q") == "app:processing:web-1:{q}"
    assert k.crashes_of("q") == "app:crashes:{q}" and k.dead_of("q") == "app:dead:{q}"
    assert k.fence("web-1", "q") == "app:lease:web-1:{q}"
    assert k.outbox("web-1", "q") == "app:outbox:web-1:{q}"
    assert (k.supervisors, k.supervisor("web-1"), k.reaper) == \
        ("{app}:supervisors", "{app}:supervisor:web-1", "{app}:reaper")
    assert k.result("j1") == "app:result:j1" and k.reply("c") == "app:reply:c"
    assert k.queue_of_processing("web-1", k.processing("web-1", "a:b")) == "a:b"
    assert k.queue_named(k.queue("q")) == "q" and k.queue_named(k.scheduled("q")) == "q"
    assert k.dead_named(k.dead_of("q")) == "q"
    with pytest.raises(ValueError, match="its own dead-letter list"):
        k.dead
    with pytest.raises(ValueError, match="hash tag"):
        k.check_queue("a{b}")
    with pytest.raises(ValueError, match="Redis Cluster"):
        Keys("{app}", cluster=True)
    # one server: the layout of protocol version 1, unchanged
    plain = Keys("app")
    assert (plain.queue("q"), plain.crashes_of("q"), plain.dead_of("q"), plain.supervisors) == \
        ("app:queue:q", "app:crashes", "app:dead", "app:supervisors")


def test_one_queues_keys_share_a_slot_and_the_test_queues_sit_on_three_primaries(rc):
    k = Keys("app", cluster=True)
    for q in SPREAD_QUEUES:
        slots = {rc.keyslot(key) for key in (
            k.queue(q), k.scheduled(q), k.processing("w", q), k.crashes_of(q), k.dead_of(q),
            k.fence("w", q), k.outbox("w", q))}
        assert len(slots) == 1, q
    assert len({rc.keyslot(key) for key in (k.supervisors, k.supervisor("w"), k.reaper)}) == 1
    assert len({rc.get_node_from_key(k.queue(q)).name for q in SPREAD_QUEUES}) == 3


def test_a_cluster_url_gives_a_cluster_client_that_never_retries_blindly(cluster):
    from redpool import topology
    from redpool.queue import connect as supervisor_connect

    r = supervisor_connect(cluster.url.replace("redis://", "redis+cluster://"))
    try:
        assert isinstance(r, topology.ClusterRedis) and r.retry.get_retries() == 0
        assert r.ping()
    finally:
        r.close()


# -- the daemon on a cluster ------------------------------------------------------------------------

def test_jobs_on_queues_spread_over_three_primaries_all_get_their_answers(
        rc, cluster_keys, cluster_daemons):
    keys = cluster_keys
    # (reply lists of the application's, which the operator allows)
    d = cluster_daemons("--concurrency", "2", *[a for q in SPREAD_QUEUES for a in ("--queue", q)],
                        "--reply-to", f"{keys.ns}-replies:*").wait_started()
    for i in range(60):
        push(rc, keys, SPREAD_QUEUES[i % 3], task="t.add", id=f"j{i}", args=[i, 1],
             reply_to=f"{keys.ns}-replies:{i % 3}")
    push(rc, keys, "a", task="t.boom", id="bad", dead_letter=True, reply_to=keys.reply("bad"))
    push(rc, keys, "b", task="no.such.task", id="unknown")
    rc.lpush(keys.queue("c"), b"{not json")
    wait_for(lambda: all(result(rc, keys, f"j{i}") for i in range(60)), what="60 results")
    assert all(result(rc, keys, f"j{i}")["result"] == i + 1 for i in range(60))
    assert {result(rc, keys, f"j{i}")["queue"] for i in range(60)} == set(SPREAD_QUEUES)
    # every reply list got its 20 answers, on whichever node it hashes to
    for n in range(3):
        got = [json.loads(x)["id"] for x in rc.lrange(f"{keys.ns}-replies:{n}", 0, -1)]
        assert sorted(got) == sorted(f"j{i}" for i in range(60) if i % 3 == n)
    # failures: answered, and dead-lettered in their own queue's list
    bad = json.loads(rc.brpop([keys.reply("bad")], 10)[1])
    assert bad["status"] == "failed" and bad["error"]["type"] == "ValueError"
    wait_for(lambda: result(rc, keys, "unknown"), what="unknown task answered")
    assert result(rc, keys, "unknown")["error"]["type"] == "UnknownTask"
    wait_for(lambda: rc.llen(keys.dead_of("c")) == 1, what="malformed job dead-lettered")
    assert json.loads(rc.lindex(keys.dead_of("a"), 0))["id"] == "bad"
    assert json.loads(rc.lindex(keys.dead_of("c"), 0))["error_type"] == "InvalidJob"
    # a reply_to the operator did not allow: refused, answered through its result key,
    # and the list left as it was (no push, no TTL)
    other = f"{keys.ns}-other:list"
    rc.rpush(other, "theirs")
    push(rc, keys, "b", task="t.add", id="elsewhere", args=[1, 1], reply_to=other)
    wait_for(lambda: result(rc, keys, "elsewhere"), what="the refusal answered")
    assert "not a key this worker answers on" in result(rc, keys, "elsewhere")["error"]["message"]
    assert rc.lrange(other, 0, -1) == [b"theirs"] and rc.ttl(other) == -1
    rc.delete(other)
    # two jobs sharing a reply list: the second one's result_ttl 1 does not cut the
    # first one's answer short (reply.lua, on the list's own node)
    shared = keys.reply("shared")
    push(rc, keys, "c", task="t.add", id="long", args=[1, 2], reply_to=shared, result_ttl=3600)
    wait_for(lambda: rc.llen(shared) == 1, what="the first answer")
    push(rc, keys, "c", task="t.add", id="short", args=[2, 2], reply_to=shared, result_ttl=1)
    wait_for(lambda: rc.llen(shared) == 2, what="the second answer")
    assert rc.pttl(shared) > 3000_000
    # nothing left behind: processing lists empty, and the outboxes too once the
    # delivered answers are trimmed (with the next round trip to their node, at the
    # latest the next promotion, every 0.5 s)
    assert not any(rc.llen(keys.processing("w1", q)) for q in SPREAD_QUEUES)
    wait_for(lambda: not any(rc.llen(keys.outbox("w1", q)) for q in SPREAD_QUEUES), timeout=5,
             what="the outboxes trimmed")
    # an orderly stop gives the name and the fences back
    d.signal(signal.SIGTERM)
    assert d.wait(30) == 0
    assert not rc.exists(keys.supervisor("w1"), *(keys.fence("w1", q) for q in SPREAD_QUEUES))
    assert not rc.sismember(keys.supervisors, "w1")


def test_retries_and_delayed_jobs_go_through_each_queues_scheduled_set(
        rc, cluster_keys, cluster_daemons):
    keys = cluster_keys
    cluster_daemons("--queue", "a", "--queue", "b").wait_started()
    push(rc, keys, "a", task="t.flaky", id="flaky", args=[2])
    due = float(rc.time()[0]) + 1.5
    rc.zadd(keys.scheduled("b"), {json.dumps({"task": "t.add", "id": "later", "args": [1, 1]}): due})
    wait_for(lambda: result(rc, keys, "flaky"), timeout=30, what="flaky to succeed")
    assert result(rc, keys, "flaky")["status"] == "succeeded"
    assert result(rc, keys, "flaky")["attempts"] == 3
    wait_for(lambda: result(rc, keys, "later"), timeout=10, what="the delayed job")
    assert result(rc, keys, "later")["started_at"] >= due - 0.05


def test_queues_are_taken_in_priority_order_across_shards(rc, cluster_keys, cluster_daemons):
    keys = cluster_keys
    for i in range(5):
        push(rc, keys, "c", task="t.add", id=f"low{i}", args=[i, 0])
        push(rc, keys, "a", task="t.add", id=f"high{i}", args=[i, 0])
    cluster_daemons("--concurrency", "1", "--queue", "a", "--queue", "c").wait_started()
    wait_for(lambda: all(result(rc, keys, f"{p}{i}") for p in ("low", "high") for i in range(5)),
             what="all ten")
    last_high = max(result(rc, keys, f"high{i}")["started_at"] for i in range(5))
    first_low = min(result(rc, keys, f"low{i}")["started_at"] for i in range(5))
    assert last_high <= first_low


def test_sigkill_of_a_child_reruns_exactly_that_job(rc, cluster_keys, cluster_daemons, r, keys):
    led = keys.ns + ":ledger"
    cluster_daemons("--concurrency", "2", "--queue", "b", ledger=led).wait_started()
    for i in range(4):
        push(rc, cluster_keys, "b", task="t.sleep", id=f"s{i}", args=[0.2, i])
    push(rc, cluster_keys, "b", task="t.sleep", id="victim", args=[3, "v"])
    wait_for(lambda: ledger(r, led)["victim"] == 1, what="victim start")
    entry = next(e.decode() for e in r.lrange(led, 0, -1) if e.startswith(b"victim:start"))
    os.kill(int(entry.rsplit(":", 1)[1]), signal.SIGKILL)
    wait_for(lambda: all(result(rc, cluster_keys, j) for j in ["victim", "s0", "s1", "s2", "s3"]),
             timeout=30, what="all results")
    assert result(rc, cluster_keys, "victim")["attempts"] == 2
    assert ledger(r, led)["victim"] == 2 and all(ledger(r, led)[f"s{i}"] == 1 for i in range(4))
    assert rc.hlen(cluster_keys.crashes_of("b")) == 0


def test_a_dead_supervisor_is_reaped_queue_by_queue(rc, cluster_keys, cluster_daemons):
    keys = cluster_keys
    queues = [a for q in SPREAD_QUEUES for a in ("--queue", q)]
    a = cluster_daemons("--concurrency", "2", "--lease", "2", *queues, name="host-a").wait_started()
    for i in range(18):
        push(rc, keys, SPREAD_QUEUES[i % 3], task="t.sleep", id=f"j{i}", args=[0.8, i])
    wait_for(lambda: sum(rc.llen(keys.processing("host-a", q)) for q in SPREAD_QUEUES) >= 2,
             what="host-a busy")
    os.killpg(a.pid, signal.SIGKILL)
    a.wait(10)
    b = cluster_daemons("--concurrency", "2", "--lease", "2", *queues, name="host-b").wait_started()
    wait_for(lambda: not any(rc.llen(keys.processing("host-a", q)) for q in SPREAD_QUEUES),
             timeout=60, what="host-a's jobs taken back")
    wait_for(lambda: all(result(rc, keys, f"j{i}") for i in range(18)), timeout=60,
             what="all results")
    assert all(result(rc, keys, f"j{i}")["status"] == "succeeded" for i in range(18))
    wait_for(lambda: not rc.sismember(keys.supervisors, "host-a"), what="host-a forgotten")
    assert any(e.get("event") == "reaped" and e.get("supervisor") == "host-a" for e in b.events())


def test_a_frozen_supervisor_is_fenced_per_queue_and_its_stale_result_dropped(
        r, rc, cluster_keys, cluster_daemons):
    keys = cluster_keys
    led = keys.ns + ":ledger"
    a = cluster_daemons("--concurrency", "1", "--lease", "2", "--prefetch", "0", "--queue", "c",
                        name="frozen", ledger=led).wait_started()
    push(rc, keys, "c", task="t.sleep", id="f1", args=[2.5, "x"])
    wait_for(lambda: rc.llen(keys.processing("frozen", "c")) == 1, what="f1 taken by 'frozen'")
    wait_for(lambda: ledger(r, led)["f1"], what="f1 started")
    cluster_daemons("--concurrency", "1", "--lease", "2", "--prefetch", "0", "--queue", "c",
                    name="healthy").wait_started()
    os.kill(a.pid, signal.SIGSTOP)
    try:
        wait_for(lambda: (result(rc, keys, "f1") or {}).get("worker") == "healthy", timeout=30,
                 what="f1 finished by the healthy supervisor")
    finally:
        os.kill(a.pid, signal.SIGCONT)
    wait_for(lambda: any(e.get("event") == "results_dropped" for e in a.events()), timeout=15,
             what="the thawed one to drop its stale result")
    assert any(e.get("event") == "reregistered" for e in a.events())
    assert result(rc, keys, "f1")["worker"] == "healthy"  # never overwritten
    assert not rc.llen(keys.outbox("frozen", "c"))
    for i in range(4):
        push(rc, keys, "c", task="t.add", id=f"after{i}", args=[i, 1])
    wait_for(lambda: all(result(rc, keys, f"after{i}") for i in range(4)), what="later jobs")
    assert a.proc.poll() is None and rc.sismember(keys.supervisors, "frozen")


def test_a_primary_killed_and_restarted_mid_run_loses_nothing(r, keys, redis_url, tmp_path):
    """kill -9 of the primary that holds queue b (append-only file, fsync always) while
    jobs run on three queues: the daemon waits Redis out, and every job is answered."""
    from helpers import Daemon
    from redis.cluster import RedisCluster
    from redpool.server import EmbeddedCluster

    led = keys.ns + ":ledger"
    with EmbeddedCluster(3, appendonly=True) as c:
        ck = Keys("crash", cluster=True)
        rc = RedisCluster.from_url(c.url)
        d = Daemon(c.url.replace("redis://", "redis+cluster://"), "crash", "--concurrency", "2",
                   *[a for q in SPREAD_QUEUES for a in ("--queue", q)],
                   env={"REDPOOL_LEDGER_URL": redis_url, "REDPOOL_LEDGER": led}).start(tmp_path)
        try:
            d.wait_started()
            for i in range(90):
                push(rc, ck, SPREAD_QUEUES[i % 3], task="t.sleep", id=f"j{i}", args=[0.05, i])
            wait_for(lambda: sum(rc.exists(ck.result(f"j{i}")) for i in range(90)) >= 15,
                     what="some progress")
            victim = c.node_of(ck.queue("b"))
            victim.proc.kill()
            victim.proc.wait()
            time.sleep(1.5)
            c.restart(victim)
            rc.close()
            rc = RedisCluster.from_url(c.url)
            wait_for(lambda: all(rc.exists(ck.result(f"j{i}")) for i in range(90)), timeout=60,
                     what="every job answered")
            assert all(result(rc, ck, f"j{i}")["status"] == "succeeded" for i in range(90))
            runs = ledger(r, led)
            assert all(runs[f"j{i}"] >= 1 for i in range(90))
            # one outage, said once each way (redis_up once it has answered for 6 s)
            wait_for(lambda: any(e.get("event") == "redis_up" for e in d.events()), 30, 0.2,
                     "redis_up")
            events = [e.get("event") for e in d.events()]
            assert events.count("redis_down") == 1 and events.count("redis_up") == 1
            assert d.proc.poll() is None
            print(f"runs beyond one: {sum(runs.values()) - 90}")
        finally:
            d.kill()
            rc.close()


def test_the_whole_cluster_away_is_an_outage_the_daemon_waits_out(tmp_path):
    """Every node down: redis-py cannot rebuild its slot map and raises its own
    RedisClusterException, which is not a RedisError; topology.ClusterRedis turns it into
    a ConnectionError, so the supervisor backs off instead of crashing."""
    import redis
    from helpers import Daemon
    from redpool.connection import connect
    from redpool.server import EmbeddedCluster

    with EmbeddedCluster(3) as c:
        url = c.url.replace("redis://", "redis+cluster://")
        d = Daemon(url, "away", "--queue", "a", "--queue", "b").start(tmp_path).wait_started()
        rc = connect(url, socket_timeout=2, socket_connect_timeout=1)
        try:
            for n in c.nodes:
                n.stop()
            # The first command names the node it could not reach (redis-py 8.2 rebuilds
            # its slot map later, at most once a second; 8.1 did it at once); once the
            # rebuild has found no node, the cluster as a whole is named
            with pytest.raises(redis.ConnectionError, match="Redis Cluster (node )?unreachable"):
                rc.get("anything")

            def cluster_named():
                try:
                    rc.get("anything")
                except redis.ConnectionError as e:
                    return "Redis Cluster unreachable" in str(e)
                raise AssertionError("a command succeeded with every node down")

            wait_for(cluster_named, timeout=15, interval=0.2, what="the whole cluster named")
            pipe = rc.pipeline(transaction=False)
            pipe.get("x")
            with pytest.raises(redis.ConnectionError):
                pipe.execute()
            wait_for(lambda: any(e.get("event") == "redis_down" for e in d.events()),
                     what="redis_down")
            time.sleep(1.0)
            for n in c.nodes:
                n.start()
            c.wait_ok(30)
            ck = Keys("away", cluster=True)
            push(rc, ck, "b", task="t.add", id="back", args=[1, 2])
            wait_for(lambda: result(rc, ck, "back"), timeout=30, what="a job after the outage")
            wait_for(lambda: any(e.get("event") == "redis_up" for e in d.events()), 30, 0.2,
                     "redis_up")
            assert d.proc.poll() is None
        finally:
            d.kill()
            rc.close()


def test_a_primary_that_fails_over_to_its_replica_is_followed(tmp_path):
    """Three primaries with a replica each; the primary of queue b is killed mid-run
    while a producer pushes without pause.  The cluster promotes its replica, and the
    daemon must follow (redis-py learns the new slot map, send_by_node included) and
    answer every job pushed after the failover.  As with Sentinel, what the old
    primary acknowledged but had not replicated may be lost: counted and printed."""
    import threading

    import redis
    from helpers import Daemon
    from redpool.client import Client
    from redpool.connection import connect
    from redpool.server import EmbeddedCluster

    window, max_lost = 2.0, 10
    with EmbeddedCluster(3, replicas=1) as c:
        url = c.url.replace("redis://", "redis+cluster://")
        ck = Keys("fo", cluster=True)
        d = Daemon(url, "fo", "--concurrency", "2", "--queue", "a", "--queue", "b", "--queue", "c",
                   name="w-fo").start(tmp_path)
        acked: dict[str, float] = {}
        stop = threading.Event()

        def produce() -> None:
            with Client(url, namespace="fo") as client:
                i = 0
                while not stop.is_set():
                    i += 1
                    try:
                        client.enqueue("t.add", i, 1, id=f"j{i}", queue=SPREAD_QUEUES[i % 3])
                        acked[f"j{i}"] = time.monotonic()
                    except redis.RedisError:
                        pass  # not acknowledged: the producer knows
                    stop.wait(0.02)

        admin = connect(url, socket_timeout=5)

        def answered(ids) -> dict:
            try:
                return dict(zip(ids, admin.mget_nonatomic([ck.result(i) for i in ids])))
            except redis.ConnectionError:  # the dead primary: the client learns the new map
                return dict.fromkeys(ids)

        producer = threading.Thread(target=produce, daemon=True)
        try:
            d.wait_started()
            producer.start()
            wait_for(lambda: sum(v is not None for v in answered(list(acked)).values()) >= 60,
                     60, 0.2, "jobs to flow before the kill")
            victim = c.node_of(ck.queue("b"))
            replica = c.replicas[victim.port][0]
            # a probe: a queue of its own on the victim, whose client nothing else uses
            pq = next(q for q in (f"probe{i}" for i in range(1000))
                      if c.node_of(ck.queue(q)) is victim)
            probe_r = connect(url, socket_timeout=5)
            probe, probe_lease = ClusterQueue(probe_r, ck, "probe", [pq]), \
                ClusterLease(probe_r, ck, "probe", [pq])
            probe_lease.register({"host": "elsewhere", "pid": 1}, 60)
            assert probe.reserve(0, probe_lease.epoch) == []
            kill_at = time.monotonic()
            victim.proc.kill()
            victim.proc.wait()
            wait_for(lambda: c._call(replica, "INFO", "replication").get("role") == "master",
                     45, 0.1, "the replica to be promoted")
            failover_at = time.monotonic()
            # its first call fails on the dead primary; the next ones go to the new one
            # (send_by_node learns the slot map again after a connection error)
            tries = []

            def probe_reserves() -> bool:
                try:
                    return probe.exchange([], 1, probe_lease.epoch)[2] == []
                except redis.ConnectionError as e:
                    tries.append(e)
                    return False
            wait_for(probe_reserves, 10, 0.2, "the probe to reach the new primary")
            assert len(tries) <= 2, tries
            wait_for(lambda: sum(t > failover_at and int(i[1:]) % 3 == 1
                                 for i, t in list(acked.items())) >= 30, 60, 0.2,
                     "pushes to queue b after the failover")
            stop.set()
            producer.join(30)
            after = [i for i, t in acked.items() if t > failover_at]
            wait_for(lambda: all(v is not None for v in answered(after).values()), 60, 0.2,
                     "every job pushed after the failover to be answered")
            assert d.proc.poll() is None, d.log()[-3000:]
            lost = sorted((i for i, v in answered(list(acked)).items() if v is None),
                          key=lambda i: acked[i])
            when = [round(acked[i] - kill_at, 3) for i in lost]
            print(f"\ncluster failover: {len(acked)} pushes acknowledged ({len(after)} after "
                  f"it); replica promoted {failover_at - kill_at:.2f} s after the kill; lost "
                  f"{len(lost)} acknowledged job(s) {lost} pushed at {when} s from the kill")
            assert len(lost) <= max_lost and all(-window <= w <= 0.5 for w in when), when
        finally:
            stop.set()
            d.kill()
            admin.close()


def test_one_node_down_leaves_the_other_queues_served_and_nothing_hoarded(tmp_path):
    """With cluster-require-full-coverage no, the nodes that are up keep serving while
    one is away: queue c's node stops; jobs on a and b are answered meanwhile, each
    reply once, and the supervisor does not pile them up unstarted in its processing
    lists; c's jobs run once its node is back."""
    from helpers import Daemon
    from redis.cluster import RedisCluster
    from redpool.server import EmbeddedCluster

    with EmbeddedCluster(3, appendonly=True,
                         extra_args=["--cluster-require-full-coverage", "no"]) as c:
        url = c.url.replace("redis://", "redis+cluster://")
        ck = Keys("part", cluster=True)
        # the node to stop: queue c's, neither the one the URL names nor the one of the
        # namespace-wide keys (leases: a supervisor cut off from its lease must stop)
        victim = c.node_of(ck.queue("c"))
        assert victim is not c.nodes[0] and victim is not c.node_of(ck.supervisors)
        d = Daemon(url, "part", "--concurrency", "2", "--queue", "a", "--queue", "b",
                   "--queue", "c", name="w-part").start(tmp_path).wait_started()
        rc = RedisCluster.from_url(c.url, socket_timeout=5)
        try:
            push(rc, ck, "c", task="t.add", id="c0", args=[0, 1])
            wait_for(lambda: result(rc, ck, "c0"), what="c0")
            victim.stop()
            # replies on lists in the slots of a and b; some result keys hash to the
            # stopped node, and are written once it is back
            for i in range(40):
                q = "ab"[i % 2]
                push(rc, ck, q, task="t.add", id=f"j{i}", args=[i, 1],
                     reply_to=ck.reply(f"{{{q}}}"))

            def replies() -> list[str]:
                return [json.loads(x)["id"] for q in "ab"
                        for x in rc.lrange(ck.reply(f"{{{q}}}"), 0, -1)]
            wait_for(lambda: len(replies()) >= 40, timeout=30,
                     what="queues a and b answered while c's node is down")
            assert sorted(replies()) == sorted(f"j{i}" for i in range(40))  # each once
            assert rc.llen(ck.processing("w-part", "a")) == 0
            assert rc.llen(ck.processing("w-part", "b")) == 0
            c.restart(victim)
            push(rc, ck, "c", task="t.add", id="c1", args=[1, 1])
            wait_for(lambda: result(rc, ck, "c1"), timeout=30, what="queue c once back")
            wait_for(lambda: all(result(rc, ck, f"j{i}") for i in range(40)), timeout=30,
                     what="every result key, the stopped node's too")
            time.sleep(1.0)  # the housekeeping's next rounds: no reply pushed again
            assert sorted(replies()) == sorted(f"j{i}" for i in range(40))
            assert d.proc.poll() is None
        finally:
            d.kill()
            rc.close()


def test_a_drain_waits_for_completions_a_node_away_holds_up(tmp_path):
    """Jobs of queue c finish while c's node is away: their acknowledgements wait in
    the supervisor.  SIGTERM then must not stop before they are sent (within --grace):
    once the node is back they go, and the daemon exits 0 with every answer written."""
    from helpers import Daemon
    from redis.cluster import RedisCluster
    from redpool.server import EmbeddedCluster

    with EmbeddedCluster(3, appendonly=True,
                         extra_args=["--cluster-require-full-coverage", "no"]) as c:
        ck = Keys("drain", cluster=True)
        victim = c.node_of(ck.queue("c"))
        assert victim is not c.nodes[0] and victim is not c.node_of(ck.supervisors)
        url = "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in c.nodes)
        d = Daemon(url, "drain", "--concurrency", "2", "--queue", "c", "--grace", "20",
                   name="w-drain").start(tmp_path).wait_started()
        rc = RedisCluster.from_url(c.url, socket_timeout=5)
        try:
            for i in range(2):
                push(rc, ck, "c", task="t.sleep", id=f"s{i}", args=[1.0, i])
            wait_for(lambda: rc.llen(ck.processing("w-drain", "c")) == 2, what="both running")
            victim.stop()
            time.sleep(1.5)  # they finish meanwhile; their acknowledgements cannot go
            d.signal(signal.SIGTERM)
            time.sleep(1.0)
            assert d.proc.poll() is None, "stopped with acknowledgements unsent"
            c.restart(victim)
            assert d.wait(30) == 0
            assert all(result(rc, ck, f"s{i}")["status"] == "succeeded" for i in range(2))
            assert rc.llen(ck.processing("w-drain", "c")) == 0
        finally:
            d.kill()
            rc.close()


def test_a_waiter_outlives_a_cluster_it_cannot_reach():
    """Connecting anew to a cluster none of whose nodes answers raises RedisUnavailable
    (not a RedisError): the waiter thread reports it and tries again, and lives on."""
    from redpool.errors import RedisUnavailable
    from redpool.queue import Reserved
    from redpool.waiter import Waiter

    attempts = []

    class Connection:
        def close(self):
            pass

    def connect():
        attempts.append(1)
        if len(attempts) < 3:
            raise RedisUnavailable("no Redis Cluster node answered")
        return Connection()

    class Queue:
        queues = ["a"]
        unusable = Unusable(KeyMap(Keys("t"), "w", ["a"]))

        def block_reserve(self, conn, queue, timeout):
            return Reserved(queue, b"job")

        def node_hangs(self, queue, error=None):
            return False

    w = Waiter(Queue(), connect, timeout=0.1)
    w.start()
    w.arm()
    try:
        wait_for(lambda: w.inbox, timeout=10, what="the job, once connected")
        assert len(attempts) == 3 and len(w.errors) == 2
        assert all(t.is_alive() for t in w._threads)
    finally:
        w.stop()
        w.close()


# -- the two steps of a completion, fencing, the reaper (the Redis side alone) --------------------------

def completion(keys, queue: str, raw: bytes, job_id: str, reply_to: str | None = None):
    env = json.dumps({"v": 1, "id": job_id, "status": "succeeded", "result": 1}).encode()
    return Completion(queue, raw, job_id, 60, reply_to, env)


def reserved_by(rc, keys, name: str, queues: list[str]) -> tuple[ClusterQueue, ClusterLease]:
    lease = ClusterLease(rc, keys, name, queues)
    lease.register({"host": "elsewhere", "pid": 1}, 30)
    return ClusterQueue(rc, keys, name, queues), lease


def test_answers_left_in_an_outbox_by_a_crash_are_delivered_at_the_next_start(rc, cluster_keys):
    keys = cluster_keys
    rq, lease = reserved_by(rc, keys, "sup", ["a", "b"])
    raws = [push(rc, keys, q, task="t", id=f"{q}1") for q in ("a", "b")]
    got = rq.reserve(10, lease.epoch)
    assert sorted(g.queue for g in got) == ["a", "b"]
    # the first step alone, as if the supervisor died right after it
    for q, raw in zip(("a", "b"), raws):
        missing, entries, broken = rq._complete_q(keys=rq._complete_keys(q), args=rq._complete_args(
            [completion(keys, q, raw, f"{q}1", reply_to=f"{keys.ns}-r")]))
        assert missing == 0 and len(entries) == 1 and broken == []
    assert rc.llen(keys.processing("sup", "a")) == 0 and rc.get(keys.result("a1")) is None
    # the next start delivers them, once
    ClusterQueue(rc, keys, "sup", ["a", "b"]).recover(crashed=True)
    assert result(rc, keys, "a1")["id"] == "a1" and result(rc, keys, "b1")["id"] == "b1"
    assert rc.llen(f"{keys.ns}-r") == 2 and rc.ttl(f"{keys.ns}-r") > 0
    assert not rc.exists(keys.outbox("sup", "a"), keys.outbox("sup", "b"))


def test_completions_taken_over_are_kept_when_the_call_fails_outright(rc, cluster_keys,
                                                                     monkeypatch):
    import redpool.cluster

    keys = cluster_keys
    rq, lease = reserved_by(rc, keys, "sup", ["a", "b"])
    raw = push(rc, keys, "a", task="t", id="a1")
    assert len(rq.reserve(5, lease.epoch)) == 1
    done = [completion(keys, "a", raw, "a1")]

    def broken(r, commands):
        raise redis.exceptions.InvalidResponse("garbled")
    monkeypatch.setattr(redpool.cluster, "send_by_node", broken)
    with pytest.raises(redis.exceptions.InvalidResponse):
        rq.exchange(done, 5, lease.epoch)
    assert done == [] and rq.unsent == 1  # taken over, and still held
    monkeypatch.undo()
    assert rq.complete([]) == (0, 0) and rq.unsent == 0  # sent with the next call
    assert result(rc, keys, "a1")["id"] == "a1"


def test_a_requeue_a_node_fails_for_leaves_those_jobs_to_a_reconcile(rc, cluster_keys):
    keys = cluster_keys
    rq, lease = reserved_by(rc, keys, "sup", ["a", "c"])
    raws = {q: push(rc, keys, q, task="t", id=f"{q}1") for q in ("a", "c")}
    assert len(rq.reserve(5, lease.epoch)) == 2
    real = rq._requeue

    def failing_for_c(keys, args):
        if any("{c}" in k for k in keys):
            raise redis.ConnectionError("Error 111 connecting to 127.0.0.1:1. Connection refused.")
        return real(keys=keys, args=args)
    rq._requeue = failing_for_c
    assert rq.requeue([("a", raws["a"]), ("c", raws["c"])]) == 1
    assert rc.lrange(keys.queue("a"), 0, -1) == [raws["a"]]  # a's went back at once
    assert rc.lrange(keys.processing("sup", "c"), 0, -1) == [raws["c"]]  # c's waits...
    assert rq.suspect  # ...for the reconcile, which puts it back once c's node answers
    with pytest.raises(redis.ConnectionError):  # every queue failing: nothing moved
        rq.requeue([("c", raws["c"])])


def test_only_an_error_after_sending_counts_as_a_lost_reply():
    from redpool.nodes import lost_reply

    assert not lost_reply(redis.ConnectionError("Error 111 connecting to 127.0.0.1:1. "
                                                "Connection refused."))  # never sent
    assert lost_reply(redis.ConnectionError("Connection reset by peer"))
    assert lost_reply(redis.TimeoutError("Timeout reading from socket"))
    sent = redis.ConnectionError("Error 111 connecting to x")
    sent.sent = True  # send_by_node's mark: written, then the read failed
    assert lost_reply(sent) and not lost_reply(redis.ResponseError("WRONGTYPE"))


def test_a_lost_reply_on_one_queue_while_others_answer_asks_for_a_reconcile(
        rc, cluster_keys, monkeypatch):
    import redpool.cluster

    keys = cluster_keys
    rq, lease = reserved_by(rc, keys, "sup", ["a", "b"])
    push(rc, keys, "a", task="t", id="a1")
    real = redpool.cluster.send_by_node

    def lost_for_b(r, commands):  # queue b's reservation (a round trip of its own)
        if any(keys.queue("b") in cmd for _, cmd in commands):
            e = redis.ConnectionError("Connection reset by peer (the reply was lost)")
            e.sent = True
            return [e] * len(commands)
        return real(r, commands)
    monkeypatch.setattr(redpool.cluster, "send_by_node", lost_for_b)
    assert [g.queue for g in rq.exchange([], 5, lease.epoch)[2]] == ["a"]
    assert rq.suspect  # the duties reconcile before anything else


def test_a_fenced_completion_writes_nothing_and_lost_fences_stop_reserving(rc, cluster_keys):
    keys = cluster_keys
    rq, lease = reserved_by(rc, keys, "sup", ["a", "c"])
    raw = push(rc, keys, "c", task="t", id="c1")
    assert [g.raw for g in rq.reserve(5, lease.epoch)] == [raw]
    # a reaper took the job back (our lease had expired)
    rc.delete(keys.processing("sup", "c"))
    done = [completion(keys, "c", raw, "c1", reply_to=f"{keys.ns}-r")]
    assert rq.complete(done) == (1, 0)
    assert rc.get(keys.result("c1")) is None and not rc.exists(f"{keys.ns}-r")
    assert done == []  # acknowledged (as missing): nothing left to send again
    # one fence gone: that queue is passed over (nothing taken from it), the others serve
    push(rc, keys, "c", task="t", id="c2")
    rc.delete(keys.fence("sup", "c"))
    assert rq.reserve(5, lease.epoch) == []
    assert rc.llen(keys.queue("c")) == 1
    # until the next renewal, which sets it again (the lease held all along)
    assert lease.renew({}, 30) and rc.hget(keys.fence("sup", "c"), "epoch") == lease.epoch.encode()
    assert [g.queue for g in rq.reserve(5, lease.epoch)] == ["c"]
    # every fence gone (a frozen host: they expire together) is a lost lease
    push(rc, keys, "a", task="t", id="a2")
    rc.delete(keys.fence("sup", "a"), keys.fence("sup", "c"))
    assert rq.reserve(5, lease.epoch) is None
    assert rc.llen(keys.queue("a")) == 1
    # the supervisor then re-registers: its old lease, still standing, is its own to replace
    old = lease.epoch
    lease.register({"host": "elsewhere", "pid": 1}, 30)
    assert lease.epoch != old and rc.hget(keys.fence("sup", "a"), "epoch") == lease.epoch.encode()
    assert [g.queue for g in rq.reserve(5, lease.epoch)] == ["a"]


def test_a_reply_that_cannot_be_written_for_now_stays_in_the_outbox(rc, cluster_keys, cluster):
    keys = cluster_keys
    box, to = keys.outbox("sup", "a"), f"{keys.ns}-oom"
    entry = json.dumps([keys.result("oom1"), 60, to, json.dumps({"id": "oom1"})]).encode()
    rc.rpush(box, entry)
    node = rc.get_node_from_key(to)
    rc.config_set("maxmemory", 1, target_nodes=node)  # every write there: OOM
    try:
        with pytest.raises(redis.ResponseError, match="maxmemory"):
            deliver(rc, keys, box, [entry])
    finally:
        rc.config_set("maxmemory", 0, target_nodes=node)
    assert rc.lrange(box, 0, -1) == [entry]  # not dropped: delivered later, once
    assert deliver(rc, keys, box, [entry]) == 0
    assert rc.llen(to) == 1 and rc.llen(box) == 0


def test_deliver_skips_replies_it_must_not_write_and_keeps_the_rest(rc, cluster_keys):
    keys = cluster_keys
    box = keys.outbox("sup", "a")
    rc.set(f"{keys.ns}-string", "x")
    entries = [json.dumps([keys.result(j), 60, to, json.dumps({"id": j})]).encode()
               for j, to in (("ok", f"{keys.ns}-list"), ("wrongtype", f"{keys.ns}-string"),
                             ("ours", keys.queue("a")), ("none", ""))]
    rc.rpush(box, *entries)
    assert deliver(rc, keys, box, entries) == 2
    assert rc.llen(f"{keys.ns}-list") == 1 and rc.llen(keys.queue("a")) == 0
    assert rc.ttl(f"{keys.ns}-string") == -1  # a key of another type is left as it was
    assert all(result(rc, keys, j) for j in ("ok", "wrongtype", "ours", "none"))
    assert rc.llen(box) == 0


def test_a_reply_lists_ttl_only_grows_on_a_cluster_too(rc, cluster_keys):
    keys = cluster_keys
    box, to = keys.outbox("sup", "a"), keys.reply("shared")
    # Given two answers for one reply list, the second asking for 1 s
    entries = [json.dumps([keys.result(j), ttl, to, json.dumps({"id": j})]).encode()
               for j, ttl in (("long", 3600), ("short", 1))]
    rc.rpush(box, *entries)
    assert deliver(rc, keys, box, entries) == 0
    # Then the list keeps the hour, with both answers
    assert 3590_000 <= rc.pttl(to) <= 3600_000 and rc.llen(to) == 2
    # and a later, longer one lengthens it (reply.lua, on the list's own node)
    later = json.dumps([keys.result("later"), 7200, to, json.dumps({"id": "later"})]).encode()
    rc.rpush(box, later)
    assert deliver(rc, keys, box, [later]) == 0
    assert 7190_000 <= rc.pttl(to) <= 7200_000 and rc.llen(to) == 3


def test_the_reaper_waits_for_each_queues_fence_and_delivers_the_dead_ones_outbox(
        rc, cluster_keys):
    keys = cluster_keys
    rq, lease = reserved_by(rc, keys, "dead", ["a", "b"])
    raws = {q: push(rc, keys, q, task="t", id=f"{q}1") for q in ("a", "b")}
    assert len(rq.reserve(10, lease.epoch)) == 2
    rc.rpush(keys.outbox("dead", "b"), json.dumps([keys.result("done1"), 60, "", "{}"]))
    # its lease hash expires, but the fence of queue b is still alive: a is reaped, b waits
    rc.delete(keys.supervisor("dead"), keys.fence("dead", "a"))
    reaper = ClusterReaper(rc, keys, "other")
    assert reaper.run() == {"dead": 1}
    assert rc.lrange(keys.queue("a"), 0, -1) == [raws["a"]]
    assert rc.llen(keys.processing("dead", "b")) == 1 and rc.sismember(keys.supervisors, "dead")
    # once b's fence is gone too, b is reaped, the outbox delivered, the name forgotten
    rc.delete(keys.fence("dead", "b"), keys.reaper)
    assert reaper.run() == {"dead": 1}
    assert rc.lrange(keys.queue("b"), 0, -1) == [raws["b"]]
    assert rc.get(keys.result("done1")) == b"{}" and not rc.exists(keys.outbox("dead", "b"))
    assert not rc.sismember(keys.supervisors, "dead")
    # a reaped job counts as a crash, and the reap's time stands for its run's start
    sha = hashlib.sha1(raws["a"]).hexdigest()
    counts = rc.hgetall(keys.crashes_of("a"))
    assert counts[sha.encode()] == b"1" and float(counts[crash_started(sha).encode()]) > 0


# -- the URL must match the server -------------------------------------------------------------------

def run_worker(url: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("REDPOOL_REDIS_URL", None)
    return subprocess.run([sys.executable, "-m", "redpool", "worker", "tests.taskmods.jobs",
                           "--redis-url", url, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60)


def test_a_cluster_node_reached_by_redis_url_is_refused_with_the_url_to_use(cluster):
    done = run_worker(cluster.url)
    assert done.returncode == 2
    assert "is a Redis Cluster node" in done.stderr and "redis+cluster://" in done.stderr


def test_a_plain_server_reached_by_a_cluster_url_is_refused(redis_url):
    done = run_worker(redis_url.replace("redis://", "redis+cluster://").removesuffix("/0"))
    assert done.returncode == 2 and "is not a Redis Cluster node" in done.stderr


def test_a_queue_name_with_braces_is_refused_on_a_cluster(cluster_url):
    done = run_worker(cluster_url, "--queue", "a{b}")
    assert done.returncode == 2 and "hash tag" in done.stderr


# -- the dataset: a node back without its data ---------------------------------------------------

def test_each_queues_slot_has_its_dataset_marker_and_restore_goes_per_node(rc, cluster_keys):
    from collections import Counter as C

    keys = cluster_keys
    rq, lease = reserved_by(rc, keys, "sup", list(SPREAD_QUEUES))
    markers = rq.claim_markers()
    assert set(markers) == {keys.dataset, *(keys.dataset_of(q) for q in SPREAD_QUEUES)}
    assert keys.dataset == f"{keys.ns}:dataset:{{{keys.ns}}}"   # the leases' slot, under <ns>:
    assert rq.read_markers() == markers and all(markers.values())
    rc.delete(keys.dataset_of("b"))                    # node of queue b lost its data
    assert [k for k, v in rq.read_markers().items() if v != markers[k]] == [keys.dataset_of("b")]
    assert rq.restore(C({("a", b"ja"): 1, ("b", b"jb"): 2})) == 3
    assert rc.lrange(keys.processing("sup", "b"), 0, -1) == [b"jb", b"jb"]
    assert rc.lrange(keys.processing("sup", "a"), 0, -1) == [b"ja"]
    # every primary is asked who it is and whether it keeps its data
    assert len(rq.run_ids()) == 3
    kept, where = rq.persistence()
    assert kept is False and len(where.split(", ")) == 3


def test_a_primary_restarted_without_its_data_is_said_and_its_held_job_answered(
        r, keys, redis_url, tmp_path):
    from helpers import Daemon
    from redis.cluster import RedisCluster
    from redpool.server import EmbeddedCluster

    led = keys.ns + ":ledger"
    with EmbeddedCluster(3) as c:                    # no AOF, no snapshots
        ck = Keys("bare", cluster=True)
        rc = RedisCluster.from_url(c.url)
        for q in SPREAD_QUEUES:
            push(rc, ck, q, task="t.sleep", id=f"long-{q}", args=[4, q])
        d = Daemon(c.url.replace("redis://", "redis+cluster://"), "bare", "--concurrency", "3",
                   "--lease", "5", *[a for q in SPREAD_QUEUES for a in ("--queue", q)],
                   env={"REDPOOL_LEDGER_URL": redis_url, "REDPOOL_LEDGER": led}).start(tmp_path)
        try:
            d.wait_started()
            wait_for(lambda: len(ledger(r, led)) == 3, what="three jobs running")
            # When the primary of queue b dies and comes back empty
            victim = c.node_of(ck.queue("b"))
            victim.proc.kill()
            victim.proc.wait()
            time.sleep(1.0)
            c.restart(victim)
            rc.close()
            rc = RedisCluster.from_url(c.url)
            # Then every job is answered, b's too (restored into its new, empty node)
            wait_for(lambda: all(result(rc, ck, f"long-{q}") for q in SPREAD_QUEUES),
                     timeout=60, what="every job answered")
            assert [result(rc, ck, f"long-{q}")["result"] for q in SPREAD_QUEUES] == \
                list(SPREAD_QUEUES)
            assert ledger(r, led) == Counter({f"long-{q}": 1 for q in SPREAD_QUEUES})
            events = d.events()
            (lost,) = [e for e in events if e.get("event") == "redis_data_lost"]
            assert lost["restored"] >= 1, lost
            assert not [e for e in events if e.get("event") == "results_dropped"]
            assert d.proc.poll() is None
        finally:
            d.kill()
            rc.close()
