"""The operator tools on Redis Cluster: `redpool status`, `dead list|requeue|purge`,
`inspect` and the metrics' queue collector, against a real three-primary cluster whose
queues (SPREAD_QUEUES) live on three different nodes.  Keys are seeded by hand in the
cluster layout, as a worker would leave them."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from conftest import SPREAD_QUEUES
from helpers import ROOT
from redpool import cli, dead, protocol, status
from redpool.connection import connect
from redpool.metrics import Metrics

A, B, C = SPREAD_QUEUES
NOW = 1_732_492_800.0  # 2024-11-25T00:00:00Z


def redpool(*argv: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("REDPOOL_")}
    return subprocess.run([sys.executable, "-m", "redpool", *argv], cwd=ROOT,
                          env=dict(env, COLUMNS="100"), capture_output=True, text=True,
                          timeout=60)


def run(*argv: str) -> tuple[int, str, str]:
    """`redpool status|inspect|dead ...` in this process: (exit code, stdout, stderr)."""
    args = cli.build_parser().parse_args(list(argv))
    out, err = io.StringIO(), io.StringIO()
    if argv[0] == "status":
        code = status.run_status(args, out)
    elif argv[0] == "inspect":
        code = status.run_inspect(args, out, err)
    else:
        code = dead.run(args, out, err)
    return code, out.getvalue(), err.getvalue()


def bury(rc, keys, queue: str, id: str, *, at: float = NOW, task: str = "t.add") -> bytes:
    """Dead-letter a job of ``queue`` into that queue's own list, as a worker would."""
    raw = json.dumps({"task": task, "id": id, "attempt": 3}).encode()
    entry = protocol.dumps(protocol.dead_entry(raw, queue=queue, reason="boom", job_id=id,
                                               error_type="ValueError", worker="w1", now=at))
    rc.lpush(keys.dead_of(queue), entry)
    return entry


def register(rc, keys, name: str, queues: list[str], *, lease: float = 15.0) -> None:
    """A live supervisor's lease, as register.lua writes it."""
    info = {"host": "h1", "pid": 4242, "version": "x", "queues": queues, "state": "running",
            "concurrency": 4, "inflight": 1, "succeeded": 10, "failed": 2, "rate_1m": 1.5,
            "started_at": time.time() - 60, "heartbeat_at": time.time(), "lease": lease}
    rc.hset(keys.supervisor(name), mapping={"epoch": "e1", "info": json.dumps(info)})
    rc.pexpire(keys.supervisor(name), int(lease * 1000))
    rc.sadd(keys.supervisors, name)


def jobs(rc, keys, queue: str, n: int, enqueued_at: float | None = None) -> None:
    for i in range(n):
        rc.lpush(keys.queue(queue), json.dumps({"task": "t.add", "id": f"{queue}{i}",
                                                "enqueued_at": enqueued_at}))


# -- status -----------------------------------------------------------------------------------

def test_status_reads_every_queue_on_every_node(rc, cluster_keys, cluster_url, cluster_namespace):
    k, ns = cluster_keys, cluster_namespace
    # Given queues on three nodes: a with 3 jobs (the oldest 40 s old) and 2 dead letters,
    # b with 1 job, c with only 2 scheduled jobs and 1 dead letter; and one supervisor
    jobs(rc, k, A, 3, enqueued_at=time.time() - 40)
    jobs(rc, k, B, 1)
    rc.zadd(k.scheduled(C), {"x": time.time() + 100, "y": time.time() + 200})
    bury(rc, k, A, "d1")
    bury(rc, k, A, "d2")
    bury(rc, k, C, "d3")
    register(rc, k, "w1", [A, B])
    # and a queue known only by its dead letters
    bury(rc, k, "only-dead", "d4")

    # When `redpool status --json` runs (a real process)
    res = redpool("status", "--json", "--redis-url", cluster_url, "--namespace", ns)
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout)

    # Then each queue is there with its numbers, and the dead letters are counted per queue
    queues = {q["name"]: q for q in got["queues"]}
    assert sorted(queues) == sorted([A, B, C, "only-dead"])
    assert (queues[A]["depth"], queues[A]["dead"], queues[A]["scheduled"]) == (3, 2, 0)
    assert 39 <= queues[A]["oldest_age"] < 60
    assert (queues[B]["depth"], queues[B]["dead"]) == (1, 0)
    assert (queues[C]["depth"], queues[C]["scheduled"], queues[C]["dead"]) == (0, 2, 1)
    assert 90 < queues[C]["next_due_in"] <= 100
    assert queues["only-dead"]["dead"] == 1
    assert got["dead"] == {"total": 4, "scanned": 4, "unknown_queue": 0}
    (sup,) = got["supervisors"]
    assert (sup["name"], sup["alive"], sup["queues"], sup["pid"]) == ("w1", True, [A, B], 4242)
    assert 0 <= sup["heartbeat_age"] < 5 and got["throughput_1m"] == 1.5

    # and the text form names the dead-letter lists of the cluster
    code, text, _ = run("status", "--redis-url", cluster_url, "--namespace", ns)
    assert code == 0 and f"dead letters: 4 in {ns}:dead:{{*}}" in text
    assert "w1" in text and "h1" in text

    # and --queue reads only those, without a SCAN
    code, text, _ = run("status", "--json", "--queue", C, "--redis-url", cluster_url,
                        "--namespace", ns)
    assert [q["name"] for q in json.loads(text)["queues"]] == [C]


def test_a_cluster_node_reached_by_redis_url_is_named_not_moved(cluster, cluster_namespace):
    res = redpool("status", "--redis-url", cluster.url, "--namespace", cluster_namespace)
    assert res.returncode == 2 and "redis+cluster://" in res.stderr, res.stderr
    res = redpool("dead", "list", "--redis-url", cluster.url, "--namespace", cluster_namespace)
    assert res.returncode == 2 and "redis+cluster://" in res.stderr, res.stderr


# -- dead -------------------------------------------------------------------------------------

def test_dead_list_merges_every_queue_list_newest_first(rc, cluster_keys, cluster_url,
                                                        cluster_namespace):
    k, ns = cluster_keys, cluster_namespace
    bury(rc, k, A, "a-old", at=NOW)
    bury(rc, k, B, "b-mid", at=NOW + 10)
    bury(rc, k, A, "a-new", at=NOW + 30)
    bury(rc, k, C, "c-newest", at=NOW + 40)
    rc.lpush(k.dead_of(B), b"\xffnot json")  # undated, at the head of its list: newest

    shown, matching, total = dead.list_entries(rc, k, limit=0)
    assert [e.id for e in shown] == [None, "c-newest", "a-new", "b-mid", "a-old"]
    assert [(e.key, e.pos) for e in shown[1:3]] == [(k.dead_of(C), 0), (k.dead_of(A), 0)]
    assert (matching, total) == (5, 5)
    shown, matching, total = dead.list_entries(rc, k, limit=2, queue=A)
    assert [e.id for e in shown] == ["a-new", "a-old"] and (matching, total) == (2, 2)

    # the command: a table across the lists, JSON lines, and per-queue summaries
    code, out, err = run("dead", "list", "--limit", "3", "--redis-url", cluster_url,
                         "--namespace", ns)
    lines = out.splitlines()
    assert code == 0 and [line.split()[3] for line in lines[2:4]] == ["c-newest", "a-new"]
    assert lines[-1] == f"3 shown of 5 dead letters in {ns}:dead:{{*}}, newest first"
    res = redpool("dead", "list", "--json", "--queue", B, "--redis-url", cluster_url,
                  "--namespace", ns)
    assert res.returncode == 0, res.stderr
    assert [json.loads(line)["id"] for line in res.stdout.splitlines()] == ["b-mid"]
    assert f"1 shown of 1 dead letter from queue '{B}' (2 in {k.dead_of(B)})" in res.stderr


def test_dead_requeue_puts_jobs_back_on_their_own_queues(rc, cluster_keys, cluster_url,
                                                         cluster_namespace):
    k, ns = cluster_keys, cluster_namespace
    for q in SPREAD_QUEUES:
        bury(rc, k, q, f"{q}1", at=NOW)
        bury(rc, k, q, f"{q}2", at=NOW + 1)
    # an entry whose queue is not the queue of its list cannot be requeued in one slot
    rc.lpush(k.dead_of(A), protocol.dumps(protocol.dead_entry(
        b'{"task":"t.add"}', queue=B, reason="r", job_id="stray", error_type="E", worker="w")))

    # When one job of b is requeued by id (a real process)
    res = redpool("dead", "requeue", f"{B}2", "--redis-url", cluster_url, "--namespace", ns)
    assert res.returncode == 0 and res.stdout.strip() == f"requeued 1 job ({B}: 1)", res.stderr
    # Then it is back on b, without its spent attempts, and out of b's dead list
    back = [json.loads(j) for j in rc.lrange(k.queue(B), 0, -1)]
    assert back == [{"task": "t.add", "id": f"{B}2"}]
    assert [json.loads(e)["id"] for e in rc.lrange(k.dead_of(B), 0, -1)] == [f"{B}1"]

    # When all of a is requeued, Then oldest first, and the stray entry is left with a reason
    code, out, err = run("dead", "requeue", "--all", "--queue", A, "--redis-url", cluster_url,
                         "--namespace", ns)
    assert out.strip() == f"requeued 2 jobs ({A}: 2)"
    assert [json.loads(j)["id"] for j in rc.lrange(k.queue(A), 0, -1)] == [f"{A}2", f"{A}1"]
    assert rc.llen(k.dead_of(A)) == 1  # the stray one names queue b: not "of queue a"

    # When everything is requeued, Then every list is emptied but for the stray entry
    code, out, err = run("dead", "requeue", "--all", "--redis-url", cluster_url, "--namespace", ns)
    assert out.strip() == f"requeued 3 jobs ({B}: 1, {C}: 2)"
    assert f"of {k.dead_of(A)} (job stray)" in err and f"not the queue of {k.dead_of(A)}" in err
    assert [rc.llen(k.dead_of(q)) for q in SPREAD_QUEUES] == [1, 0, 0]
    assert rc.llen(k.queue(C)) == 2 and rc.llen(k.queue(B)) == 2

    # and an id that is nowhere exits 1
    code, _, err = run("dead", "requeue", "nope", "--redis-url", cluster_url, "--namespace", ns)
    assert code == 1 and "no dead letter with id 'nope'" in err


def test_dead_purge_works_list_by_list(rc, cluster_keys, cluster_url, cluster_namespace):
    k, ns = cluster_keys, cluster_namespace
    now = time.time()
    for q in SPREAD_QUEUES:
        bury(rc, k, q, f"{q}-old", at=now - 7200)
        bury(rc, k, q, f"{q}-new", at=now)
    assert dead.purge(rc, k, older_than=3600, queue=C) == 1
    code, out, _ = run("dead", "purge", "--older-than", "1h", "--redis-url", cluster_url,
                       "--namespace", ns)
    assert code == 0 and out.strip() == "purged 2 entries"
    assert [rc.llen(k.dead_of(q)) for q in SPREAD_QUEUES] == [1, 1, 1]
    res = redpool("dead", "purge", "--all", "--redis-url", cluster_url, "--namespace", ns)
    assert res.returncode == 0 and res.stdout.strip() == "purged 3 entries", res.stderr
    assert list(rc.scan_iter(match=k.dead_pattern)) == []
    code, out, _ = run("dead", "list", "--redis-url", cluster_url, "--namespace", ns)
    assert code == 0 and out.strip() == "no dead letters"


# -- inspect ----------------------------------------------------------------------------------

def test_inspect_finds_a_job_in_each_place(rc, cluster_keys, cluster_url, cluster_namespace):
    k, ns = cluster_keys, cluster_namespace
    # Given a job queued on c, one scheduled on b, one running (and one finishing) under a
    # live supervisor of a, one dead-lettered from b, and one whose result is written
    jobs(rc, k, C, 3)
    rc.zadd(k.scheduled(B), {json.dumps({"task": "t.add", "id": "sch"}): time.time() + 3600})
    register(rc, k, "w1", [A])
    rc.lpush(k.processing("w1", A), json.dumps({"task": "t.sleep", "id": "run"}))
    env = protocol.envelope(id="fin", task="t.add", queue=A, status="succeeded", worker="w1",
                            result=5)
    rc.rpush(k.outbox("w1", A), json.dumps([k.result("fin"), 60, "", json.dumps(env)]))
    bury(rc, k, B, "dd")
    rc.set(k.result("ok"), json.dumps({**env, "id": "ok"}), ex=100)

    def places(job_id: str) -> list[dict]:
        code, out, _ = run("inspect", job_id, "--json", "--redis-url", cluster_url,
                           "--namespace", ns)
        found = json.loads(out)
        assert code == (0 if found["found"] else 1)
        return found["places"]

    # Then each is found where it is
    (p,) = places(f"{C}1")
    assert (p["state"], p["queue"], p["key"], p["ahead"], p["length"]) == \
        ("queued", C, k.queue(C), 1, 3)
    (p,) = places("sch")
    assert (p["state"], p["queue"]) == ("scheduled", B) and 3500 < p["due_in"] <= 3600
    (p,) = places("run")
    assert (p["state"], p["key"], p["supervisor"], p["supervisor_alive"]) == \
        ("running", k.processing("w1", A), "w1", True)
    (p,) = places("fin")
    assert (p["state"], p["status"], p["key"], p["queue"]) == \
        ("finishing", "succeeded", k.outbox("w1", A), A)
    assert p["body"]["result"] == 5
    (p,) = places("dd")
    assert (p["state"], p["key"], p["queue"], p["position"]) == ("dead", k.dead_of(B), B, 0)
    (p,) = places("ok")
    assert p["state"] == "succeeded" and 90 < p["expires_in"] <= 100
    assert places("never-was") == []

    # and in words (a real process)
    res = redpool("inspect", "fin", "--redis-url", cluster_url, "--namespace", ns)
    assert res.returncode == 0, res.stderr
    assert f"finished (succeeded) on supervisor 'w1', from queue '{A}'" in res.stdout
    res = redpool("inspect", "dd", "--redis-url", cluster_url, "--namespace", ns)
    assert f"dead-lettered from queue '{B}', at position 0 of {k.dead_of(B)}" in res.stdout


def test_inspect_finds_what_a_dead_supervisor_holds(rc, cluster_keys, cluster_url,
                                                    cluster_namespace):
    # Given a supervisor that died (no lease, name still registered) holding a job and an answer
    k, ns = cluster_keys, cluster_namespace
    rc.sadd(k.supervisors, "gone-1")
    rc.lpush(k.processing("gone-1", B), json.dumps({"task": "t.add", "id": "held"}))
    env = protocol.envelope(id="held2", task="t.add", queue=C, status="failed", worker="gone-1")
    rc.rpush(k.outbox("gone-1", C), json.dumps(["", 0, "", json.dumps(env)]))
    code, out, _ = run("inspect", "held", "--json", "--redis-url", cluster_url, "--namespace", ns)
    (p,) = json.loads(out)["places"]
    assert (p["state"], p["queue"], p["supervisor_alive"]) == ("running", B, False)
    code, out, _ = run("inspect", "held2", "--json", "--redis-url", cluster_url, "--namespace", ns)
    (p,) = json.loads(out)["places"]
    assert (p["state"], p["status"], p["queue"]) == ("finishing", "failed", C)


# -- metrics ----------------------------------------------------------------------------------

def test_queue_metrics_on_cluster(rc, cluster_keys, cluster_url):
    k = cluster_keys
    jobs(rc, k, A, 2, enqueued_at=time.time() - 30)
    jobs(rc, k, C, 1)
    rc.zadd(k.scheduled(B), {"x": time.time() + 100})
    bury(rc, k, A, "d1")
    bury(rc, k, B, "d2")
    bury(rc, k, "elsewhere", "d3")  # not a queue of this supervisor: not counted
    m = Metrics("w9", list(SPREAD_QUEUES), k, lambda: connect(cluster_url))
    got = {(s.name, tuple(s.labels.items())): s.value
           for f in text_string_to_metric_families(generate_latest(m.registry).decode())
           for s in f.samples}
    assert got[("redpool_queue_metrics_ok", ())] == 1
    assert [got[("redpool_queue_depth", (("queue", q),))] for q in SPREAD_QUEUES] == [2, 0, 1]
    assert 29 <= got[("redpool_queue_oldest_job_age_seconds", (("queue", A),))] < 60
    assert got[("redpool_scheduled_jobs", (("queue", B),))] == 1
    assert got[("redpool_dead_letters", ())] == 2
