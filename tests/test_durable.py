"""--durable-results (durable.py): on Redis Cluster, a job's answer leaves its outbox (on
the queue's shard) only once a replica of the node the answer was written to has it.

What is checked: the WAITs planned per node and what they confirm (tiny units); on a
real cluster with replicas, answers written while the answer's replica is cut off stay
in the outbox and are trimmed once the replica is back; and the failure of issue 19
itself, run by real daemons: the replica of the answers' primary is cut off, jobs run,
that primary is killed and its replica promoted -- with durable results every answer is
there afterwards, without them (printed) the answers are gone.
"""

from __future__ import annotations

import json
import os
import signal
import time
from types import SimpleNamespace

import pytest
import redis

from helpers import Daemon, wait_for
from redpool.cluster import ClusterLease, ClusterQueue
from redpool.connection import connect
from redpool.durable import Durable
from redpool.keys import Keys
from redpool.nodes import deliver
from redpool.queue import Completion
from redpool.server import EmbeddedCluster


# -- the plan: one WAIT per node with replicas ----------------------------------------------------

def fake_cluster(slots: dict[str, list[str]]):
    """A stand-in RedisCluster: key -> [primary, replicas...] by name (key == slot)."""
    cache = {key: [SimpleNamespace(name=n) for n in names] for key, names in slots.items()}
    nodes = {}
    for names in slots.values():
        nodes[names[0]] = {"node_id": names[0], "flags": "master", "master_id": "-"}
        nodes.update({n: {"node_id": n, "flags": "slave", "master_id": names[0]}
                      for n in names[1:]})
    return SimpleNamespace(nodes_manager=SimpleNamespace(slots_cache=cache),
                           keyslot=lambda key: key, cluster_nodes=lambda: nodes)


def test_one_wait_per_node_with_replicas_after_its_last_write():
    r = fake_cluster({"k1": ["p1", "r1"], "k2": ["p1", "r1"], "k3": ["p2"], "k4": ["p3", "r3"]})
    d = Durable(r, "on", wait_ms=50)
    cmds = [(k, ("SET", k, "v")) for k in ("k1", "k3", "k2", "k4")]
    waits, nodes, need = d.plan(cmds)
    assert nodes == ["p1", "p2", "p1", "p3"]
    assert waits == [("p1", ("k2", ("WAIT", 1, 50))), ("p3", ("k4", ("WAIT", 1, 50)))]
    assert need == {"p1": 1, "p2": 0, "p3": 1}  # p2 has no replica: nothing to wait for
    # p1's replica has it, p3's WAIT fell short: only p1 and p2 are confirmed
    assert d.confirmed(waits, [1, 0], need) == {"p1", "p2"}
    assert (d.waits, d.short) == (2, 1)
    # a slot the client's map does not cover yet (mid-failover): nothing to wait on there
    assert d.plan([("k9", ("SET", "k9", "v"))])[0] == []


def test_a_node_whose_wait_fell_short_is_not_waited_on_again_until_the_retry():
    now = [100.0]
    r = fake_cluster({"k1": ["p1", "r1"]})
    d = Durable(r, "on", retry=1.0, clock=lambda: now[0])
    waits, _, need = d.plan([("k1", ("SET", "k1", "v"))])
    assert d.confirmed(waits, [0], need) == set()
    waits, _, need = d.plan([("k1", ("SET", "k1", "v"))])
    assert waits == [] and need == {"p1": None}  # lagging: no stall, not confirmed either
    assert d.confirmed(waits, [], need) == set()
    now[0] += 1.5
    waits, _, need = d.plan([("k1", ("SET", "k1", "v"))])
    assert len(waits) == 1
    assert d.confirmed(waits, [1], need) == {"p1"} and d.lagging == {}


def test_a_node_that_refuses_wait_is_said_once_and_its_answers_are_confirmed_without():
    """A WAIT refused (no +wait, a renamed command) is not a WAIT that fell short: kept
    so, every answer would stay in the outbox for ever, and nothing be said."""
    now = [100.0]
    r = fake_cluster({"k1": ["p1", "r1"], "k2": ["p2", "r2"]})
    d = Durable(r, "on", clock=lambda: now[0])
    nope = redis.exceptions.NoPermissionError(
        "User w has no permissions to run the 'wait' command")
    cmds = [("k1", ("SET", "k1", "v")), ("k2", ("SET", "k2", "v"))]
    waits, _, need = d.plan(cmds)
    assert d.confirmed(waits, [nope, 1], need) == {"p1", "p2"}
    assert d.lagging == {} and set(d.refused) == {"p1"}
    emitted: list = []
    d.tell(lambda event, **f: emitted.append((event, f)))
    [(event, fields)] = emitted
    assert event == "redis_error" and fields["during"] == "durable_results"
    assert "+wait" in fields["note"] and "loses them" in fields["note"]
    # refused: no WAIT sent there until the retry, its answers confirmed; said once
    waits, _, need = d.plan(cmds)
    assert [n for n, _ in waits] == ["p2"] and need["p1"] == 0
    assert d.confirmed(waits, [1], need) == {"p1", "p2"}
    now[0] += d.retry_refused + 1
    waits, _, need = d.plan(cmds)
    assert d.confirmed(waits, [nope, 1], need) == {"p1", "p2"}
    d.tell(lambda event, **f: emitted.append((event, f)))
    assert len(emitted) == 1
    # a renamed command is a refusal too; a node that is a replica now is not (it lags)
    other = redis.ResponseError("unknown command 'WAIT', with args beginning with: ")
    replica = redis.ResponseError("WAIT cannot be used with replica instances.")
    now[0] += d.retry_refused + 1
    waits, _, need = d.plan(cmds)
    assert d.confirmed(waits, [other, replica], need) == {"p1"} and "p2" in d.lagging
    # WAIT answered again: cleared
    now[0] += d.retry_refused + 1
    waits, _, need = d.plan(cmds)
    assert d.confirmed(waits, [1, 1], need) == {"p1", "p2"} and d.refused == {}
    d.tell(lambda event, **f: emitted.append((event, f)))
    assert [e for e, _ in emitted[1:]] == ["redis_error", "redis_error_cleared"]


def test_auto_is_on_only_when_the_cluster_has_replicas():
    assert not Durable(fake_cluster({"k1": ["p1"]}), "auto").on
    failed = fake_cluster({"k1": ["p1", "r1"]})
    failed.cluster_nodes()["r1"]["flags"] = "slave,fail"  # (back, it may be promoted)
    assert Durable(failed, "auto").on
    r = fake_cluster({"k1": ["p1"], "k2": ["p2", "r2"]})
    assert Durable(r, "auto").on and not Durable(r, "off").on
    assert Durable(r, "auto").describe() == {"on": True, "mode": "auto",
                                            "why": "the primaries have replicas"}
    with pytest.raises(ValueError, match="not one of auto, on, off"):
        Durable(r, "yes")


def test_a_probe_key_shares_the_slot_of_the_key_it_stands_for():
    k = Keys("ns", cluster=True)
    for key in ("ns:reply:abc", "x{a}b", "q{b}{c}", "{a", "myapp:replies:1"):
        probe = k.probe(key)
        assert redis.cluster.key_slot(probe.encode()) == redis.cluster.key_slot(key.encode())
    assert k.probe("a}b") is None and k.probe("x{}y") is None


# -- a real cluster: the outbox is trimmed only after the WAIT -------------------------------------

def cut_off(c: EmbeddedCluster, primary) -> object:
    """Freeze ``primary``'s replica (SIGSTOP) and close its replication link on the
    primary: from now on what the primary writes reaches no replica.  Returns the
    replica, to be SIGCONT'ed."""
    replica = c.replicas[primary.port][0]
    os.kill(replica.proc.pid, signal.SIGSTOP)
    with redis.Redis(port=primary.port, socket_timeout=5) as p:
        p.execute_command("CLIENT", "KILL", "TYPE", "replica")
        wait_for(lambda: p.info("replication")["connected_slaves"] == 0, 30, 0.05,
                 "the primary to drop its replica")
    return replica


def ids_on(c: EmbeddedCluster, keys: Keys, node, n: int) -> dict[str, str]:
    """``n`` job ids whose result key hashes to ``node``, each with a reply list there
    too.  (Not ``keys.reply(id)``: CRC16 being linear, its slot is tied to the result
    key's, and for some pairs of nodes never on the same one.)"""
    ids = [i for i in (f"j{x}" for x in range(100_000)) if c.node_of(keys.result(i)) is node]
    return {i: next(key for key in (keys.reply(f"{i}-{y}") for y in range(1000))
                    if c.node_of(key) is node) for i in ids[:n]}


def test_answers_stay_in_the_outbox_until_a_replica_of_their_node_has_them():
    with EmbeddedCluster(3, replicas=1) as c:
        r = connect(c.url.replace("redis://", "redis+cluster://"), socket_timeout=5)
        k = Keys("tr", cluster=True)
        home = c.node_of(k.queue("a"))
        answers = next(n for n in c.nodes if n is not home)
        reply_of = ids_on(c, k, answers, 5)
        ids = list(reply_of)
        durable = Durable(r, "auto")
        assert durable.on
        rq = ClusterQueue(r, k, "w", ["a"], durable=durable)
        lease = ClusterLease(r, k, "w", ["a"])
        lease.register({"host": "here", "pid": 1}, 60)
        box = k.outbox("w", "a")

        def run(job_ids):
            for i in job_ids:
                r.lpush(k.queue("a"), json.dumps({"id": i, "task": "t.add", "args": [1, 2]}))
            done = []
            for x in rq.reserve(len(job_ids), lease.epoch):
                i = json.loads(x.raw)["id"]
                env = json.dumps({"id": i, "ok": True}).encode()
                done.append(Completion("a", x.raw, i, 600, reply_of[i], env))
            rq.complete(done)

        run(ids[:2])  # replicas in step: confirmed, trimmed by the next round trip
        rq.promote()
        assert r.llen(box) == 0
        replica = cut_off(c, answers)
        try:
            run(ids[2:])
            assert all(r.get(k.result(i)) for i in ids[2:])  # written on the primary...
            rq.promote()
            assert r.llen(box) == 3  # ...but kept: no replica has them
            assert durable.short >= 1 and durable.lagging
            # the reaper delivers a dead supervisor's outbox the same way
            dead_box, progress = k.outbox("gone", "a"), {}
            entry = json.dumps([k.result("reaped"), 600, reply_of[ids[0]], '{"id": "reaped"}'])
            r.rpush(dead_box, entry)
            deliver(r, k, dead_box, r.lrange(dead_box, 0, -1), progress, durable)
            assert r.llen(dead_box) == 1 and progress == {entry.encode(): {0, 1}}
        finally:
            os.kill(replica.proc.pid, signal.SIGCONT)
        wait_for(lambda: c._call(replica, "INFO", "replication").get("master_link_status") == "up",
                 60, 0.1, "the replica to catch up")
        durable.lagging.clear()  # (not waiting out the retry)
        wait_for(lambda: (rq.promote(), r.llen(box))[1] == 0, 30, 0.2,
                 "the housekeeping to confirm and trim the answers")
        assert [json.loads(r.get(k.result(i)))["id"] for i in ids] == ids
        deliver(r, k, dead_box, r.lrange(dead_box, 0, -1), progress, durable)
        assert r.llen(dead_box) == 0 and progress == {}
        # confirmed by a probe, not by a second push: each reply arrived once
        assert [r.llen(reply_of[i]) for i in ids] == [2, 1, 1, 1, 1]  # (ids[0]: two jobs)


# -- issue 19: the answer's primary fails over while its replica lags ------------------------------

@pytest.mark.daemon
def test_answers_survive_the_failover_of_their_primary_with_durable_results(tmp_path):
    """Queue a lives on a shard that never fails.  For each setting, the results and
    replies of the jobs hash to another primary whose replica is cut off; the jobs run
    (each pushed and confirmed with WAIT on the queue's shard) and their answers are
    seen on that primary; then it is killed and its replica promoted.  On: every
    result is there afterwards (rewritten from the outbox), every reply too (pushed
    again, its node having changed: once or twice), and the outbox is empty.  Off:
    printed (and the control: answers are lost, the setup does test something)."""
    n = 20
    with EmbeddedCluster(3, replicas=1) as c:
        home = c.node_of(Keys("x", cluster=True).queue("a"))
        url = f"redis+cluster://127.0.0.1:{home.port}"  # (the node that stays up)
        victims = [node for node in c.nodes if node is not home]
        lost = {}
        for mode, victim in zip(("on", "off"), victims):
            k = Keys(f"du{mode}", cluster=True)
            reply_of = ids_on(c, k, victim, n)
            ids = list(reply_of)
            d = Daemon(url, k.ns, "--concurrency", "2", "--queue", "a",
                       "--durable-results", mode, name=f"w-{mode}").start(tmp_path)
            admin = connect(url, socket_timeout=5)
            try:
                d.wait_started()
                said = [e for e in d.events() if e.get("event") == "durable_results"]
                assert said and said[0]["on"] is (mode == "on")
                replica = cut_off(c, victim)
                try:
                    with redis.Redis(port=home.port, socket_timeout=10) as q:
                        for i in ids:
                            q.lpush(k.queue("a"), json.dumps({"id": i, "task": "t.add",
                                                              "args": [1, 2],
                                                              "reply_to": reply_of[i]}))
                        assert q.execute_command("WAIT", 1, 5000) == 1  # the job is durable
                    with redis.Redis(port=victim.port, socket_timeout=5) as v:
                        wait_for(lambda: all(v.get(k.result(i)) and v.llen(reply_of[i])
                                                 for i in ids), 60, 0.1,
                                 "every result and reply, on the answers' primary")
                    acked = time.monotonic()
                    # acknowledged on the queue's shard: nothing left there but, when
                    # durable, the answers in the outbox
                    wait_for(lambda: admin.llen(k.queue("a")) == 0
                             and admin.llen(k.processing(f"w-{mode}", "a")) == 0, 30, 0.1,
                             "the jobs to leave the queue")
                    in_box = admin.llen(k.outbox(f"w-{mode}", "a"))
                    victim.proc.kill()
                    victim.proc.wait()
                finally:
                    os.kill(replica.proc.pid, signal.SIGCONT)
                wait_for(lambda: c._call(replica, "INFO", "replication").get("role") == "master",
                         60, 0.1, "the replica to be promoted")

                def results() -> list:
                    try:
                        return admin.mget_nonatomic([k.result(i) for i in ids])
                    except redis.ConnectionError:  # the dead primary: the map is learned again
                        return [None] * len(ids)

                def replies() -> list:
                    try:
                        return [admin.llen(reply_of[i]) for i in ids]
                    except redis.ConnectionError:
                        return [0] * len(ids)

                if mode == "on":
                    assert in_box == n  # nothing confirmed while the replica was cut off
                    wait_for(lambda: all(results()), 60, 0.2, "every result after the failover")
                    wait_for(lambda: all(replies()), 60, 0.2, "every reply after the failover")
                    wait_for(lambda: admin.llen(k.outbox(f"w-{mode}", "a")) == 0, 30, 0.2,
                             "the outbox to be trimmed")
                    twice = sum(x > 1 for x in replies())
                    assert max(replies()) <= 2
                    print(f"\ndurable on: {n} of {n} results and replies there after the "
                          f"failover, {time.monotonic() - acked:.1f} s after the acknowledgement;"
                          f" {twice} replies arrived twice")
                else:
                    wait_for(lambda: results() != [None] * n or
                             c._call(replica, "CLUSTER", "INFO").find("cluster_state:ok") >= 0,
                             30, 0.2, "the cluster to be ok again")
                    time.sleep(2)  # what the daemon would still do (nothing: no outbox)
                    lost[mode] = sum(x is None for x in results())
                    print(f"\ndurable off: {lost[mode]} of {n} results and "
                          f"{sum(x == 0 for x in replies())} replies lost with their "
                          f"primary (acknowledged: in no queue or processing list; {in_box} were still in the outbox at the kill, trimmed since)")
                assert [json.loads(x)["id"] for x in results() if x] == \
                    [i for i, x in zip(ids, results()) if x]
                assert admin.llen(k.queue("a")) == 0
                assert admin.llen(k.processing(f"w-{mode}", "a")) == 0
                assert d.proc.poll() is None
            finally:
                d.kill()
                admin.close()
        assert lost["off"] > 0  # the control: without durable results the setup loses some


def test_a_worker_whose_acl_refuses_wait_says_so_once_and_empties_its_outbox():
    """The ACL of an older `redpool acl` (no +wait) on a cluster with replicas: auto is
    on, every WAIT is refused.  The answers used to stay in the outbox for ever (and
    the loop to read the whole outbox twice a second), with nothing said."""
    with EmbeddedCluster(3, replicas=1) as c:
        for n in list(c.nodes) + [x for xs in c.replicas.values() for x in xs]:
            with redis.Redis(port=n.port) as admin:
                admin.execute_command("ACL", "SETUSER", "w", "on", ">pw", "~*", "&*",
                                      "+@all", "-wait")
        seeds = ",".join(f"127.0.0.1:{n.port}" for n in c.nodes)
        r = connect(f"redis+cluster://{seeds}", socket_timeout=5)
        k = Keys("wr", cluster=True)
        d = Daemon(f"redis+cluster://w:pw@{seeds}", k.ns, "--concurrency", "2",
                   "--queue", "a", name="w-wr")
        d.start(None).wait_started()
        try:
            ids = [f"j{i}" for i in range(300)]
            r.lpush(k.queue("a"), *[json.dumps({"task": "t.add", "id": j, "args": [1, 2]})
                                    for j in ids])
            wait_for(lambda: all(r.exists(k.result(j)) for j in ids[::10]), 60, 0.1, "results")
            wait_for(lambda: r.llen(k.outbox("w-wr", "a")) == 0, 60, 0.1,
                     "the outbox to empty")
            said = [e for e in d.events() if e.get("event") == "redis_error"
                    and e.get("during") == "durable_results"]
            assert said and "+wait" in said[0]["note"]
            assert len({e["error"] for e in said}) == 1  # once per error (and per node)
            start = next(e for e in d.events() if e.get("event") == "durable_results")
            assert start["on"] and start["wait_refused_by"]  # found at start already
            print(f"refusals said: {len(said)} (nodes: {sorted(e['node'] for e in said)})")
        finally:
            d.kill()
            r.close()


def test_the_housekeeping_reads_an_outbox_a_page_at_a_time(cluster):
    """Answers left in an outbox (a write that failed, a WAIT that fell short) are
    written again by the housekeeping twice a second.  It read the whole outbox each
    time: an outbox that grew made every tick slower.  Now a page (OUTBOX_PAGE) a tick."""
    from redpool.durable import OUTBOX_PAGE
    r = connect(cluster.url.replace("redis://", "redis+cluster://"), socket_timeout=5)
    k = Keys(f"pg{os.getpid()}", cluster=True)
    try:
        rq = ClusterQueue(r, k, "sup", ["q"])
        box, n = k.outbox("sup", "q"), 2 * OUTBOX_PAGE + 200
        ids = [f"p{i}" for i in range(n)]
        r.rpush(box, *[json.dumps([k.result(i), 60, "", json.dumps({"id": i})]) for i in ids])
        rq._undelivered.add("q")  # (as a failed write leaves it)
        asked: list[tuple[int, int]] = []
        lrange = r.lrange
        r.lrange = lambda key, a, b: asked.append((a, b)) or lrange(key, a, b)
        for _ in range(10):
            if not r.exists(box):
                break
            rq.promote()
        print(f"{n} answers delivered in {len(asked)} pages: {asked}")
        assert not r.exists(box) and all(r.exists(k.result(i)) for i in ids[::50])
        assert asked and all(0 <= a <= b and b - a + 1 <= OUTBOX_PAGE for a, b in asked)
    finally:
        r.close()
