"""One outage is one event (outage.py): a Redis Cluster failover, where calls to the
other primaries succeed while those to the dead one fail and each client learns the new
slot map on its own first failure, is logged as one ``redis_down`` and one ``redis_up``
per worker, not a pair per flap (issue 19: five to seven pairs, once sixty in five
seconds).  Real daemons on a real cluster with replicas; a primary SIGKILLed."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time

import pytest
import redis

from helpers import ROOT, Daemon, kill_group, wait_for
from redpool.client import Client
from redpool.connection import connect
from redpool.keys import Keys
from redpool.server import EmbeddedCluster

pytestmark = pytest.mark.daemon


def named(d: Daemon, *events: str) -> list[dict]:
    return [e for e in d.events() if e.get("event") in events]


def name(d: Daemon) -> str:
    return d.cmd[d.cmd.index("--name") + 1]


def test_a_cluster_failover_is_one_redis_down_and_one_redis_up_per_worker(tmp_path):
    """Two workers on queues spread over three primaries (one replica each,
    cluster-node-timeout 2000) under a steady stream of jobs; the primary the URL names
    is SIGKILLed (so a connection made anew from the URL alone would find no node), and
    its replica promoted."""
    with EmbeddedCluster(3, replicas=1) as c:
        url = c.url.replace("redis://", "redis+cluster://")
        # the workers are given the victim alone; the test's own clients, every node
        every = "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in c.everyone)
        ck = Keys("one", cluster=True)
        victim = c.nodes[0]
        queues = ["a", "b", "c"]
        on_victim = next(q for q in (f"q{i}" for i in range(1000))
                         if c.node_of(ck.queue(q)) is victim)
        queues.append(on_victim)
        flags = [x for q in queues for x in ("--queue", q)]
        daemons = [Daemon(url, "one", "--concurrency", "2", *flags, name=f"w-{i}").start(tmp_path)
                   for i in range(2)]
        stop = threading.Event()
        pushed: list[str] = []

        def produce() -> None:
            with Client(every, namespace="one") as client:
                i = 0
                while not stop.is_set():
                    i += 1
                    try:
                        client.enqueue("t.add", i, 1, id=f"j{i}", queue=queues[i % len(queues)],
                                       reply_to=False)
                        pushed.append(f"j{i}")
                    except redis.RedisError:
                        pass
                    stop.wait(0.02)

        admin = connect(every, socket_timeout=5)
        producer = threading.Thread(target=produce, daemon=True)
        try:
            for d in daemons:
                d.wait_started()
            producer.start()
            wait_for(lambda: len(pushed) >= 60, 60, 0.1, "jobs to flow before the kill")
            replica = c.replicas[victim.port][0]
            kill_at = time.monotonic()
            victim.proc.kill()
            victim.proc.wait()
            wait_for(lambda: c._call(replica, "INFO", "replication").get("role") == "master",
                     45, 0.1, "the replica to be promoted")
            promoted = time.monotonic() - kill_at
            for d in daemons:
                wait_for(lambda: named(d, "redis_up"), 90, 0.2, f"{name(d)}: redis_up")
            # the queue on the promoted replica is served again, by workers still running
            stop.set()
            producer.join(30)
            with Client(every, namespace="one") as client:
                client.enqueue("t.add", 2, 3, id="after", queue=on_victim, reply_to=False)

            def after():
                try:
                    return admin.get(ck.result("after"))
                except redis.ConnectionError:
                    return None
            wait_for(after, 60, 0.2, "a job on the promoted replica's queue")
            time.sleep(2.0)  # (anything flapping late would show in the log by now)
            for d in daemons:
                assert d.proc.poll() is None, d.log()[-3000:]
                outage = named(d, "redis_down", "redis_up")
                print(f"\n{name(d)}: promoted {promoted:.2f} s after the kill; "
                      f"{[(e['event'], e.get('during') or e.get('duration'), e.get('failures')) for e in outage]}")
                assert [e["event"] for e in outage] == ["redis_down", "redis_up"], outage
                up = outage[1]
                assert up["failures"] >= 1 and 0 < up["duration"] < 90
                # no failure to reach Redis is taken for Redis refusing a command
                assert named(d, "redis_error") == [], named(d, "redis_error")
        finally:
            stop.set()
            for d in daemons:
                d.kill()
            admin.close()


def test_a_job_rolled_back_while_the_lease_held_is_not_said_to_have_run_elsewhere(
        r, keys, daemons):
    """results_dropped says what happened (issue 19): a job that vanishes from our
    processing list while our lease holds was not taken by a reaper.  A failover to a
    replica that had not received the reservation leaves Redis as this test does: the
    job back in its queue, not in our list."""
    d = daemons("--concurrency", "1", "--prefetch", "0", "--queue", "rb", name="w-rb")
    d.wait_started()
    r.lpush(keys.queue("rb"), json.dumps({"task": "t.sleep", "id": "g1", "args": [1.5, "x"]}))
    proc = keys.processing("w-rb", "rb")
    wait_for(lambda: r.llen(proc) == 1, what="g1 reserved")
    # Given the reservation rolled back while the job runs
    assert r.lmove(proc, keys.queue("rb"), "LEFT", "RIGHT")
    # Then its result is dropped, said as what it is, and the job runs again
    (dropped,) = wait_for(lambda: named(d, "results_dropped"), 30, 0.1, "results_dropped")
    print(f"\n{dropped}")
    assert dropped["count"] == 1 and dropped["cause"] == "gone_from_redis"
    assert "although our lease held" in dropped["reason"]
    assert "ran elsewhere" not in dropped["reason"] and "inspect" in dropped["note"]
    wait_for(lambda: r.get(keys.result("g1")), 30, 0.1, "g1 answered by its second run")
    assert json.loads(r.get(keys.result("g1")))["status"] == "succeeded"
    assert named(d, "lease_lost") == []


def test_status_watch_on_a_cluster_waits_for_a_node_to_answer(tmp_path):
    """`redpool status --watch` started while no node of a Redis Cluster answers says
    so and retries, as on one server (it exited 4: the cluster client must reach a node
    to be made); once the nodes are up it shows the deployment; Ctrl-C ends it, 0."""
    with EmbeddedCluster(3) as c:
        url = "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in c.nodes)
        for n in c.nodes:
            n.stop()
        out = tmp_path / "watch.out"
        with open(out, "wb") as f:
            proc = subprocess.Popen([sys.executable, "-m", "redpool", "status", "--watch", "0.3",
                                     "--json", "--redis-url", url, "--namespace", "wq"],
                                    cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            def lines() -> list[dict]:
                return [json.loads(x) for x in out.read_text().splitlines() if x.strip()]
            wait_for(lambda: len(lines()) >= 3 or proc.poll() is not None, 60, 0.1,
                     "three refreshes with the cluster away")
            assert proc.poll() is None, out.read_text()
            assert all("no Redis Cluster node" in x["error"] for x in lines())
            for n in c.nodes:
                n.start()
            c.wait_ok(30)
            snap = wait_for(lambda: next((x for x in lines() if "error" not in x), None),
                            60, 0.1, "a snapshot once the nodes answer")
            assert snap["namespace"] == "wq" and proc.poll() is None
            proc.send_signal(signal.SIGINT)
            assert proc.wait(30) == 0
        finally:
            kill_group(proc)
