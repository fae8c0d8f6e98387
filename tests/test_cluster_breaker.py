"""Redis Cluster with one primary that hangs (SIGSTOP: it refuses nothing, answers
nothing) or is away: the other shards keep their speed (breaker.py), and the reaper
reaps what the shards that answer hold, delivering each answer once (cluster_reaper.py).

Each test starts its own EmbeddedCluster (it stops one of its nodes), with
``cluster-require-full-coverage no`` so that the nodes that are up keep serving.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections import Counter

import pytest
import redis
from redis.cluster import RedisCluster

from helpers import Daemon, wait_for
from redpool.breaker import NodeOpen, attach
from redpool.cluster import ClusterLease, ClusterQueue
from redpool.cluster_reaper import ClusterReaper
from redpool.keys import Keys
from redpool.nodes import send_by_node
from redpool.queue import connect
from redpool.server import EmbeddedCluster

pytestmark = pytest.mark.daemon

PARTIAL = ["--cluster-require-full-coverage", "no"]


def spread(c: EmbeddedCluster, stem: str) -> tuple[Keys, object]:
    """Keys of a namespace whose own keys (leases, the reaper's lock) are not on queue c's
    node, and that node: the one to stop."""
    for i in range(100):
        keys = Keys(f"{stem}{i}", cluster=True)
        victim = c.node_of(keys.queue("c"))
        if victim is not c.node_of(keys.supervisors) and victim is not c.nodes[0] \
                and len({c.node_of(keys.queue(q)).port for q in "abc"}) == 3:
            return keys, victim
    raise AssertionError("no namespace fits")


def push_batch(rc, keys, prefix: str, count: int) -> list[str]:
    """``count`` t.add jobs over queues a and b, each replying on a list in its queue's
    slot (so on a node that answers); returns their ids."""
    ids = {"a": [], "b": []}
    for i in range(count):
        ids["ab"[i % 2]].append(f"{prefix}{i}")
    for q, qids in ids.items():
        rc.lpush(keys.queue(q), *[json.dumps({"task": "t.add", "id": j, "args": [1, 2],
                                              "reply_to": keys.reply(f"{{{q}}}")})
                                  for j in qids])
    return ids["a"] + ids["b"]


def replied(rc, keys) -> Counter:
    return Counter(json.loads(x)["id"] for q in "ab"
                   for x in rc.lrange(keys.reply(f"{{{q}}}"), 0, -1))


def served(rc, keys, ids: list[str], what: str) -> float:
    """Seconds until every job of ``ids`` has replied."""
    start = time.monotonic()
    wait_for(lambda: all(replied(rc, keys)[j] for j in ids), timeout=120, interval=0.05,
             what=what)
    return time.monotonic() - start


def test_a_hung_primary_slows_only_its_own_queues(tmp_path, r, redis_url):
    """Given a daemon serving queues a, b and c on three primaries, jobs of c running
    When c's primary is SIGSTOPped (it hangs: no refusal, no answer)
    Then a and b are served throughout, the breaker saying the node hangs, once
    And after SIGCONT every job is answered, each ran once and replied once."""
    ledger = f"ledger:{os.getpid()}:{time.monotonic_ns()}"
    with EmbeddedCluster(3, extra_args=PARTIAL) as c:
        keys, victim = spread(c, "hang")
        url = "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in c.nodes)
        d = Daemon(url, keys.ns, "--concurrency", "4", "--queue", "a", "--queue", "b",
                   "--queue", "c", name="w-hang",
                   env={"REDPOOL_LEDGER_URL": redis_url, "REDPOOL_LEDGER": ledger})
        d.start(tmp_path).wait_started()
        rc = RedisCluster.from_url(c.url, socket_timeout=5)
        stopped = False
        try:
            n = 200
            before = served(rc, keys, push_batch(rc, keys, "pre", n), "jobs before the stop")
            # jobs of c running when its node hangs: their acknowledgements wait
            for i in range(2):
                rc.lpush(keys.queue("c"), json.dumps({"task": "t.sleep", "id": f"c{i}",
                                                      "args": [1.0, i]}))
            wait_for(lambda: rc.llen(keys.processing("w-hang", "c")) == 2, what="c's jobs run")
            os.kill(victim.proc.pid, signal.SIGSTOP)
            stopped = True
            first = served(rc, keys, push_batch(rc, keys, "hung", n),
                           "a and b served while c's node hangs (first batch)")
            second = served(rc, keys, push_batch(rc, keys, "more", n),
                            "a and b served while c's node hangs (second batch)")
            hung = [e for e in d.events() if e.get("event") == "redis_node_hung"]
            assert [e["node"] for e in hung] == [f"127.0.0.1:{victim.port}"]
            print(f"\nqueues a and b, {n} jobs a batch: before the stop {n / before:.0f} "
                  f"jobs/s; node hung: first batch (the one timeout) {n / first:.0f} jobs/s, "
                  f"second {n / second:.0f} jobs/s; redis_down events: "
                  f"{[e['during'] for e in d.events() if e.get('event') == 'redis_down']}")
            os.kill(victim.proc.pid, signal.SIGCONT)
            stopped = False
            wait_for(lambda: any(e.get("event") == "redis_node_back" for e in d.events()),
                     timeout=30, what="the breaker closed")
            rc.lpush(keys.queue("c"), json.dumps({"task": "t.add", "id": "c-after",
                                                  "args": [1, 1]}))
            every = [f"{p}{i}" for p in ("pre", "hung", "more") for i in range(n)]
            for jid in ("c0", "c1", "c-after", *every):
                wait_for(lambda: rc.get(keys.result(jid)), timeout=60, what=f"result {jid}")
            wait_for(lambda: not rc.llen(keys.processing("w-hang", "c")), timeout=30,
                     what="c's processing list emptied")
            time.sleep(1.5)  # the housekeeping's next rounds: no reply pushed again
            assert replied(rc, keys) == Counter(every)          # each replied once
            runs = Counter(e.decode().split(":")[0] for e in r.lrange(ledger, 0, -1)
                           if e.decode().split(":")[1] in ("add", "start"))
            assert runs == Counter(["c0", "c1", "c-after", *every])  # each ran once
            assert all(json.loads(rc.get(keys.result(j)))["status"] == "succeeded"
                       for j in ("c0", "c1", "c-after"))
            assert d.proc.poll() is None
        finally:
            if stopped:
                os.kill(victim.proc.pid, signal.SIGCONT)
            d.kill()
            rc.close()
            r.delete(ledger)


def answer(keys, result_id: str, reply_to: str) -> bytes:
    env = json.dumps({"v": 1, "id": result_id, "status": "succeeded", "result": 1})
    return json.dumps([keys.result(result_id), 60, reply_to, env]).encode()


def result_id_on(c: EmbeddedCluster, keys: Keys, node, stem: str, on: bool) -> str:
    """An id whose result key is (``on``) or is not on ``node``."""
    return next(f"{stem}{i}" for i in range(1000)
                if (c.node_of(keys.result(f"{stem}{i}")) is node) == on)


@pytest.mark.parametrize("how", ["hangs", "is down"])
def test_the_reaper_reaps_the_shards_that_answer_and_delivers_each_answer_once(how):
    """Given a dead supervisor with jobs and answers on queues a, b and c
    When c's primary hangs (SIGSTOP) or is down
    Then its jobs on a and b are reaped, and the answers there written, each reply once
    over several rounds, even those whose other part waits for c's node
    And once the node is back, the rest; the name is forgotten only then."""
    with EmbeddedCluster(3, appendonly=True, extra_args=PARTIAL) as c:
        keys, victim = spread(c, "reap")
        rc = connect(c.url.replace("redis://", "redis+cluster://"))  # (the daemon's client)
        try:
            lease = ClusterLease(rc, keys, "dead", ["a", "b", "c"])
            lease.register({"host": "elsewhere", "pid": 1}, 30)
            rq = ClusterQueue(rc, keys, "dead", ["a", "b", "c"])
            for q in "abc":
                rc.lpush(keys.queue(q), json.dumps({"task": "t", "id": f"{q}1"}))
            assert len(rq.reserve(10, lease.epoch)) == 3
            on_c = result_id_on(c, keys, victim, "on", True)
            off_c, off_c2 = (result_id_on(c, keys, victim, s, False) for s in ("off", "x"))
            whole = answer(keys, off_c, keys.reply("{a}"))          # both parts reachable
            reply_only = answer(keys, on_c, keys.reply("{a}"))      # its result key on c
            result_only = answer(keys, off_c2, keys.reply("{c}"))   # its reply on c
            rc.rpush(keys.outbox("dead", "a"), whole, reply_only)
            rc.rpush(keys.outbox("dead", "b"), result_only)
            rc.rpush(keys.outbox("dead", "c"), answer(keys, "c-answer", keys.reply("{b}")))
            # its lease expires (fences and all)
            rc.delete(keys.supervisor("dead"), *[keys.fence("dead", q) for q in "abc"])
            if how == "hangs":
                os.kill(victim.proc.pid, signal.SIGSTOP)
            else:
                victim.stop()
            reaper = ClusterReaper(rc, keys, "other")

            def round_() -> dict:
                rc.delete(keys.reaper)  # (the lock paces rounds: one a second)
                return reaper.run()

            assert round_() == {"dead": 2}           # a's and b's jobs; c's node is away
            for q in "ab":
                assert rc.lrange(keys.queue(q), 0, -1) == [
                    json.dumps({"task": "t", "id": f"{q}1"}).encode()]
                assert rc.llen(keys.processing("dead", q)) == 0
            for _ in range(3):                      # more rounds: nothing written twice
                assert round_() == {}               # (nothing moved: not said)
            assert rc.llen(keys.reply("{a}")) == 2  # whole's and reply_only's, once each
            assert rc.get(keys.result(off_c)) and rc.get(keys.result(off_c2))
            assert rc.sismember(keys.supervisors, "dead")   # not forgotten: c not seen
            assert [json.loads(x)[2] for x in rc.lrange(keys.outbox("dead", "a"), 0, -1)] \
                == [""]                              # reply_only, its reply written
            if how == "hangs":
                assert attach(rc).open_nodes == [f"127.0.0.1:{victim.port}"]
                os.kill(victim.proc.pid, signal.SIGCONT)
                wait_for(lambda: not attach(rc).open_nodes, timeout=30,
                         what="the probe closes the breaker")
            else:
                c.restart(victim)
            c.wait_ok(30)
            reaped = Counter()

            def reaped_whole() -> bool:
                reaped.update(round_())
                return not rc.sismember(keys.supervisors, "dead")
            wait_for(reaped_whole, timeout=30, what="the dead supervisor reaped whole")
            assert reaped == {"dead": 1}            # c's job, and then it was forgotten
            assert rc.lrange(keys.queue("c"), 0, -1) == [
                json.dumps({"task": "t", "id": "c1"}).encode()]
            assert rc.get(keys.result(on_c)) and rc.get(keys.result("c-answer"))
            for q in "abc":
                assert not rc.exists(keys.processing("dead", q), keys.outbox("dead", q))
            # each reply pushed once: a's two, c's one, b's one (from c's outbox)
            assert [rc.llen(keys.reply(f"{{{q}}}")) for q in "abc"] == [2, 1, 1]
        finally:
            if how == "hangs":
                os.kill(victim.proc.pid, signal.SIGCONT)
            rc.close()


def test_a_node_whose_breaker_is_open_is_not_sent_anything():
    """send_by_node answers NodeOpen (not a lost reply) for an open node's commands at
    once, and sends the others'; a probe closes it once the node answers PING."""
    from redpool.nodes import lost_reply

    with EmbeddedCluster(3, extra_args=PARTIAL) as c:
        rc = connect(c.url.replace("redis://", "redis+cluster://"))  # (the daemon's client)
        try:
            keys, victim = spread(c, "open")
            name = f"127.0.0.1:{victim.port}"
            breaker = attach(rc)
            os.kill(victim.proc.pid, signal.SIGSTOP)
            try:
                out = send_by_node(rc, [(keys.queue("a"), ("LLEN", keys.queue("a"))),
                                        (keys.queue("c"), ("LLEN", keys.queue("c")))])
                assert out[0] == 0 and isinstance(out[1], redis.TimeoutError)
                assert breaker.open_nodes == [name]    # the first timeout opened it
                out = send_by_node(rc, [(keys.queue("a"), ("LLEN", keys.queue("a"))),
                                        (keys.queue("c"), ("LLEN", keys.queue("c")))])
                assert out[0] == 0 and isinstance(out[1], NodeOpen)
                assert not lost_reply(out[1]) and lost_reply(redis.TimeoutError("Timeout"))
                time.sleep(3 * breaker.probe_every)
                assert breaker.open_nodes == [name]    # the probes find it still hung
            finally:
                os.kill(victim.proc.pid, signal.SIGCONT)
            wait_for(lambda: not breaker.open_nodes, timeout=30, what="the probe closes it")
            events = []
            breaker.tend(rc, lambda event, **f: events.append((event, f["node"])))
            assert events == [("redis_node_hung", name), ("redis_node_back", name)]
            assert send_by_node(rc, [(keys.queue("c"), ("LLEN", keys.queue("c")))]) == [0]
        finally:
            rc.close()


def test_a_hung_primary_failed_over_to_its_replica_is_followed(tmp_path, r, redis_url):
    """Given a daemon on queues a, b, c, each primary with a replica
    When c's primary hangs long enough for the cluster to promote its replica
    Then c's queue is served by the new primary while the old one still hangs (the
    breaker closed as "failed over"), a and b throughout
    And after SIGCONT nothing ran twice."""
    ledger = f"ledger:{os.getpid()}:{time.monotonic_ns()}"
    with EmbeddedCluster(3, replicas=1, extra_args=PARTIAL) as c:
        keys, victim = spread(c, "fo")
        url = "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in c.nodes)
        d = Daemon(url, keys.ns, "--concurrency", "4", "--queue", "a", "--queue", "b",
                   "--queue", "c", name="w-fo",
                   env={"REDPOOL_LEDGER_URL": redis_url, "REDPOOL_LEDGER": ledger})
        d.start(tmp_path).wait_started()
        rc = connect(url)
        stopped = False
        try:
            rc.lpush(keys.queue("c"), json.dumps({"task": "t.add", "id": "c0", "args": [0, 1]}))
            wait_for(lambda: rc.get(keys.result("c0")), what="c0")
            os.kill(victim.proc.pid, signal.SIGSTOP)
            stopped = True
            ab = push_batch(rc, keys, "ab", 100)
            served(rc, keys, ab, "a and b while c's primary hangs")

            def pushed_to_c() -> bool:  # (our client follows the failover too)
                try:
                    rc.lpush(keys.queue("c"), json.dumps(
                        {"task": "t.add", "id": "c1", "args": [1, 1],
                         "reply_to": keys.reply("{c}")}))
                    return True
                except redis.RedisError:
                    return False
            wait_for(pushed_to_c, timeout=60, interval=0.5, what="c's replica promoted")
            wait_for(lambda: rc.llen(keys.reply("{c}")), timeout=60,
                     what="queue c served by its new primary")
            back = [e for e in d.events() if e.get("event") == "redis_node_back"]
            assert any("failed over" in e["why"] for e in back), back
            print("\n" + "\n".join(f"{e['event']} {e['node']} {e.get('why', '')} {e.get('error', '')} {e['timestamp']}"
                                   for e in d.events() if e.get("event", "").startswith(
                                       "redis_node")))
            assert victim.proc.poll() is None  # (it still hangs: stopped, not dead)
            print("victim", victim.port, "replica", [x.port for x in c.replicas[victim.port]])
            os.kill(victim.proc.pid, signal.SIGCONT)
            stopped = False
            ab2 = push_batch(rc, keys, "after", 100)
            served(rc, keys, ab2, "a and b after SIGCONT")
            runs = Counter(e.decode().split(":")[0] for e in r.lrange(ledger, 0, -1))
            assert runs == Counter(["c0", "c1", *ab, *ab2])
            assert replied(rc, keys) == Counter([*ab, *ab2])
            assert d.proc.poll() is None
        finally:
            if stopped:
                os.kill(victim.proc.pid, signal.SIGCONT)
            d.kill()
            rc.close()
            r.delete(ledger)


def test_a_daemon_reaps_a_dead_supervisor_shard_by_shard_while_a_primary_hangs(
        tmp_path, r, redis_url):
    """Given supervisor A killed (SIGKILL) while running a job of each queue a, b, c, and
    supervisor B serving the same queues
    When c's primary hangs (SIGSTOP) before A's lease expires
    Then B reaps and reruns A's jobs of a and b meanwhile, and keeps A's name
    And once the node answers again, A's job of c; each job answered once."""
    ledger = f"ledger:{os.getpid()}:{time.monotonic_ns()}"
    env = {"REDPOOL_LEDGER_URL": redis_url, "REDPOOL_LEDGER": ledger}
    queues = ["--queue", "a", "--queue", "b", "--queue", "c"]
    with EmbeddedCluster(3, extra_args=PARTIAL) as c:
        keys, victim = spread(c, "dead")
        url = "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in c.nodes)
        a = Daemon(url, keys.ns, "--concurrency", "3", "--lease", "3", *queues,
                   name="host-a", env=env).start(tmp_path).wait_started()
        rc = connect(url)
        stopped = False
        b = None
        try:
            release = str(tmp_path / "release")
            for q in "abc":
                rc.lpush(keys.queue(q), json.dumps({
                    "task": "t.hold", "id": f"h-{q}", "args": [release, q],
                    "reply_to": keys.reply(f"{{{q}}}")}))
            wait_for(lambda: all(rc.llen(keys.processing("host-a", q)) for q in "abc"),
                     what="A runs a job of each queue")
            wait_for(lambda: len(r.lrange(ledger, 0, -1)) == 3, what="the three started")
            b = Daemon(url, keys.ns, "--concurrency", "3", "--lease", "3", *queues,
                       name="host-b", env=env).start(tmp_path).wait_started()
            a.kill()
            open(release, "w").close()  # (their reruns finish at once)
            os.kill(victim.proc.pid, signal.SIGSTOP)
            stopped = True
            for q in "ab":
                wait_for(lambda: rc.llen(keys.reply(f"{{{q}}}")), timeout=60,
                         what=f"A's job of {q} reaped and answered while c's node hangs")
            assert rc.sismember(keys.supervisors, "host-a")  # c not seen yet
            os.kill(victim.proc.pid, signal.SIGCONT)
            stopped = False
            wait_for(lambda: rc.llen(keys.reply("{c}")), timeout=60,
                     what="A's job of c reaped and answered once its node is back")
            wait_for(lambda: not rc.sismember(keys.supervisors, "host-a"), timeout=30,
                     what="A forgotten")
            time.sleep(1.5)  # more rounds of B's reaper and housekeeping: nothing twice
            assert [rc.llen(keys.reply(f"{{{q}}}")) for q in "abc"] == [1, 1, 1]
            runs = Counter(e.decode().rsplit(":", 1)[0] for e in r.lrange(ledger, 0, -1))
            assert runs == Counter({f"h-{q}:start": 2 for q in "abc"} |
                                   {f"h-{q}:end": 1 for q in "abc"})  # A's run, B's rerun
            reaped = [e for e in b.events() if e.get("event") == "reaped"]
            assert sum(e["jobs"] for e in reaped) == 3 and b.proc.poll() is None
        finally:
            if stopped:
                os.kill(victim.proc.pid, signal.SIGCONT)
            for d in (a, b):
                if d is not None:
                    d.kill()
            rc.close()
            r.delete(ledger)


def test_a_burst_worker_does_not_stop_while_a_queues_node_hangs():
    """--burst stops once the queues are empty.  A queue whose node hangs was passed
    over (NodeOpen) and so looked empty: the worker said burst_done and exited 0 with
    that queue's jobs still queued and the jobs it finished there unacknowledged."""
    with EmbeddedCluster(3, extra_args=PARTIAL) as c:
        url = "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in c.nodes)
        rc = connect(url)
        keys, victim = spread(c, "bh")
        c_ids = [f"c{i}" for i in range(40)]
        rc.lpush(keys.queue("c"), *[json.dumps({"task": "t.nap", "id": j, "args": [0.2]})
                                    for j in c_ids])
        d = Daemon(url, keys.ns, "--burst", "--concurrency", "2", "--queue", "a",
                   "--queue", "c", name="w-bh")
        d.start(None)
        stopped = False
        try:
            # Given c's node hangs while the burst worker is half way through c
            wait_for(lambda: sum(e.get("event") == "job_finished" for e in d.events()) >= 4
                     or d.proc.poll() is not None, 60, 0.05, "some of c's jobs to finish")
            os.kill(victim.proc.pid, signal.SIGSTOP)
            stopped = True
            wait_for(lambda: any(e.get("event") == "redis_node_hung" for e in d.events())
                     or d.proc.poll() is not None, 60, 0.05, "the breaker to open")
            # When queue a, on a node that answers, is served and runs dry, twice
            box = keys.reply("{a}")  # (in a's slot: a node that answers)
            for batch in range(2):
                ids = [f"a{batch}-{i}" for i in range(10)]
                rc.lpush(keys.queue("a"), *[json.dumps({"task": "t.add", "id": j, "args": [1, 2],
                                                        "reply_to": box}) for j in ids])
                wait_for(lambda: {json.loads(x)["id"] for x in rc.lrange(box, 0, -1)} >= set(ids)
                         or d.proc.poll() is not None, 60, 0.05, f"batch {batch} of a")
                # Then the worker is still there (it used to say burst_done here)
                assert d.proc.poll() is None, [e.get("event") for e in d.events()][-5:]
            os.kill(victim.proc.pid, signal.SIGCONT)
            stopped = False
            # And once the node answers, c is finished and acknowledged, then it stops
            assert d.wait(120) == 0
            events = [e.get("event") for e in d.events()]
            assert "burst_done" in events and "redis_node_back" in events
            assert rc.llen(keys.queue("c")) == 0 and rc.llen(keys.processing("w-bh", "c")) == 0
            assert all(rc.exists(keys.result(j)) for j in c_ids)
        finally:
            if stopped:
                os.kill(victim.proc.pid, signal.SIGCONT)
            d.kill()
            rc.close()
