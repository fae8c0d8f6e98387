"""Keys of the wrong type, the supervisor's side (keytypes.py, health.py): another program
writes a string where redpool keeps a list (``SET redpool:queue:lo x``), or any other
type into any of redpool's keys, while workers run.

What is checked, with real daemons on a real server and on Redis Cluster: the key is said
once, the other queues are served, `redpool status` shows it, it is looked at again now
and then, and the queue is served again once an operator fixes it, without a restart; a
job that must be dead-lettered into a dead-letter list of the wrong type stays in its
processing list meanwhile; jobs of a processing list another program overwrote are
answered once it is fixed, or at a stop if they finished (the others go back to their
queue); a namespace-wide key
stops reserving, and nothing crashes.  The classification of errors (only an outage is
``redis_down``) is checked with the supervisor's fakes, and docs/deploy.md's examples
against the code.  The scripts alone: tests/test_wrongtype_scripts.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import redis

from helpers import ROOT, envelope, wait_for
from redpool.client import Client
from redpool.errors import WrongType
from redpool.keytypes import classify, culprit


# -- the daemon ---------------------------------------------------------------------------------

def named(d, event: str) -> list[dict]:
    return [e for e in d.events() if e.get("event") == event]


def beats_since(d, event: str) -> int:
    """Heartbeats (debug) logged after the first ``event``."""
    evs = [e.get("event") for e in d.events()]
    return evs[evs.index(event):].count("heartbeat") if event in evs else 0


def status_json(url: str, ns: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("REDPOOL_")}
    res = subprocess.run([sys.executable, "-m", "redpool", "status", "--json", "--redis-url", url,
                          "--namespace", ns], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def push(r, keys, queue: str, job_id: str, **extra) -> None:
    r.lpush(keys.queue(queue), json.dumps({"task": "t.add", "id": job_id, "args": [1, 2],
                                           **extra}))


def test_a_queue_of_the_wrong_type_is_said_once_and_the_other_queue_is_served(
        redis_url, r, keys, daemons):
    d = daemons("--queue", "hi", "--queue", "lo", "--log-level", "debug").wait_started()
    # Given another program writes a string where queue lo's list is, while the worker runs
    r.set(keys.queue("lo"), "not a list")
    # When jobs arrive on the other queue
    for i in range(5):
        push(r, keys, "hi", f"hi{i}")
    # Then they are answered, and lo is said to be unusable, with what to do
    wait_for(lambda: all(envelope(r, keys, f"hi{i}") for i in range(5)), timeout=30,
             what="the jobs of hi answered")
    wait_for(lambda: named(d, "queue_unusable"), timeout=30, what="queue_unusable")
    [said] = named(d, "queue_unusable")
    assert (said["queue"], said["key"], said["type"], said["expected"], said["level"]) == \
        ("lo", keys.queue("lo"), "string", "list", "error")
    assert "DEL it, or RENAME it away" in said["note"] and "uses it as a list" in said["note"]
    # ... and shown by `redpool status`, from any machine
    wait_for(lambda: any(u["key"] == keys.queue("lo") and "w1" in u["seen_by"]
                         for u in status_json(redis_url, keys.ns)["unusable"]), timeout=30,
             what="status showing the queue")
    snap = status_json(redis_url, keys.ns)
    assert {q["name"]: q["unusable"] for q in snap["queues"]} == \
        {"hi": {}, "lo": {keys.queue("lo"): "string"}}
    # ... once: it is looked at again now and then (every 5 s), and not said again
    wait_for(lambda: beats_since(d, "queue_unusable") >= 12, timeout=60, what="12 heartbeats")
    assert len(named(d, "queue_unusable")) == 1
    assert named(d, "redis_down") == [] and named(d, "redis_error") == []
    push(r, keys, "hi", "hi-late")
    wait_for(lambda: envelope(r, keys, "hi-late"), timeout=30, what="hi still served")

    # When an operator deletes the key and a job arrives on lo
    r.delete(keys.queue("lo"))
    push(r, keys, "lo", "lo1")
    # Then lo is served again, without a restart, and that is said once
    wait_for(lambda: envelope(r, keys, "lo1"), timeout=30, what="the job of lo answered")
    [back] = named(d, "queue_usable")
    assert (back["queue"], back["key"], back["served"]) == ("lo", keys.queue("lo"), True)
    assert status_json(redis_url, keys.ns)["unusable"] == [] or \
        wait_for(lambda: status_json(redis_url, keys.ns)["unusable"] == [], timeout=30,
                 what="status clear")
    assert named(d, "redis_down") == []
    d.signal(signal.SIGTERM)
    assert d.wait(60) == 0


def test_a_scheduled_set_of_the_wrong_type_stops_its_queue_until_fixed(r, keys, daemons,
                                                                      redis_url):
    d = daemons("--queue", "a", "--queue", "b").wait_started()
    # Given another program writes into queue a's scheduled set
    r.set(keys.scheduled("a"), "not a zset")
    wait_for(lambda: named(d, "queue_unusable"), timeout=30, what="queue_unusable")
    [said] = named(d, "queue_unusable")
    assert (said["queue"], said["key"], said["expected"]) == ("a", keys.scheduled("a"), "zset")
    # Then queue b is served; a producer's delayed job for a gets a clear error
    push(r, keys, "b", "b1")
    wait_for(lambda: envelope(r, keys, "b1"), timeout=30, what="b served")
    with Client(redis_url, namespace=keys.ns) as client:
        with pytest.raises(WrongType, match="holds a string where redpool keeps a zset"):
            client.enqueue("t.add", 1, 2, queue="a", delay=0.2, reply_to=False)
        # When it is fixed, a's delayed jobs are promoted and answered again
        r.delete(keys.scheduled("a"))
        res = client.enqueue("t.add", 2, 3, queue="a", delay=0.2, reply_to=False)
        wait_for(lambda: envelope(r, keys, res.id), timeout=30, what="the delayed job answered")
    assert envelope(r, keys, res.id)["result"] == 5
    assert len(named(d, "queue_usable")) == 1 and named(d, "redis_down") == []


def test_a_job_to_dead_letter_into_a_dead_list_of_the_wrong_type_waits_in_its_processing_list(
        r, keys, daemons):
    d = daemons("--log-level", "debug").wait_started()
    # Given the dead-letter list is a string, and a job fails that must be dead-lettered
    r.set(keys.dead, "not a list")
    r.lpush(keys.queue("default"), json.dumps({"task": "t.boom", "id": "bad",
                                               "dead_letter": True}))
    push(r, keys, "default", "ok1")
    wait_for(lambda: envelope(r, keys, "ok1"), timeout=30, what="another job served")
    wait_for(lambda: len(named(d, "job_finished")) == 2, timeout=30, what="both ran")
    assert sorted(e["id"] for e in named(d, "job_finished")) == ["bad", "ok1"]
    # Then that job is not lost: it stays in the worker's processing list, unanswered
    # (its answer goes with its dead letter), while other jobs are served
    assert [json.loads(x)["id"] for x in r.lrange(keys.processing("w1", "default"), 0, -1)] \
        == ["bad"]
    assert envelope(r, keys, "bad") is None
    wait_for(lambda: named(d, "key_unusable"), timeout=30, what="key_unusable")
    [said] = named(d, "key_unusable")
    assert (said["key"], said["type"], said["expected"]) == (keys.dead, "string", "list")
    assert "held back" in said["effect"]

    # When an operator deletes the key
    r.delete(keys.dead)
    # Then the job is dead-lettered and answered, once, without a restart
    wait_for(lambda: envelope(r, keys, "bad"), timeout=30, what="the failed job answered")
    assert envelope(r, keys, "bad")["status"] == "failed"
    assert [json.loads(e)["id"] for e in r.lrange(keys.dead, 0, -1)] == ["bad"]
    assert r.llen(keys.processing("w1", "default")) == 0
    wait_for(lambda: beats_since(d, "key_usable") >= 3, timeout=30, what="3 heartbeats")
    assert r.llen(keys.dead) == 1 and len(named(d, "job_finished")) == 2
    assert named(d, "redis_down") == [] and named(d, "results_dropped") == []


def test_a_namespace_wide_key_of_the_wrong_type_stops_reserving_until_fixed(r, keys, daemons):
    d = daemons("--log-level", "debug").wait_started()
    # Given another program overwrites the set of supervisors (renewed every lease/3)
    r.delete(keys.supervisors)
    r.set(keys.supervisors, "not a set")
    wait_for(lambda: named(d, "key_unusable"), timeout=30, what="key_unusable")
    [said] = named(d, "key_unusable")
    assert (said["key"], said["type"], said["expected"]) == (keys.supervisors, "string", "set")
    assert "no queue is served" in said["effect"]
    # Then nothing is reserved meanwhile (serving without it is not safe), nothing crashes
    # (a waiter already blocked in BLMOVE when it was found ends within its 1 s timeout)
    wait_for(lambda: beats_since(d, "key_unusable") >= 3, timeout=30, what="3 heartbeats")
    push(r, keys, "default", "j1")
    wait_for(lambda: beats_since(d, "key_unusable") >= 10, timeout=60, what="10 heartbeats")
    assert r.llen(keys.queue("default")) == 1 and d.proc.poll() is None
    assert len(named(d, "key_unusable")) == 1 and named(d, "redis_down") == []
    # When an operator deletes it, the worker registers again and serves
    r.delete(keys.supervisors)
    wait_for(lambda: envelope(r, keys, "j1"), timeout=30, what="the job answered")
    assert len(named(d, "key_usable")) == 1
    assert r.smembers(keys.supervisors) == {b"w1"}
    d.signal(signal.SIGTERM)
    assert d.wait(60) == 0


def overwrite_a_processing_list(r, keys, daemons, ledger: str):
    """A worker running one long job with two more held; then another program overwrites
    its processing list (which held all three)."""
    d = daemons("--concurrency", "1", "--prefetch", "2", ledger=ledger).wait_started()
    r.lpush(keys.queue("default"), json.dumps({"task": "t.sleep", "id": "long", "args": [2]}))
    wait_for(lambda: r.lrange(ledger, 0, -1), timeout=30, what="the long job started")
    for i in range(2):
        push(r, keys, "default", f"next{i}")
    wait_for(lambda: r.llen(keys.processing("w1", "default")) == 3, timeout=30,
             what="all three held")
    r.set(keys.processing("w1", "default"), "overwritten")
    return d


def test_jobs_of_an_overwritten_processing_list_are_answered_once_it_is_fixed(r, keys, daemons):
    ledger = f"{keys.ns}-ledger"
    d = overwrite_a_processing_list(r, keys, daemons, ledger)
    wait_for(lambda: named(d, "queue_unusable"), timeout=30, what="queue_unusable")
    wait_for(lambda: len(named(d, "job_finished")) == 3, timeout=30, what="the three ran")
    assert not any(envelope(r, keys, i) for i in ("long", "next0", "next1"))  # held back
    r.delete(keys.processing("w1", "default"))
    wait_for(lambda: all(envelope(r, keys, i) for i in ("long", "next0", "next1")), timeout=30,
             what="the three answered")
    assert r.llen(keys.processing("w1", "default")) == 0 and r.llen(keys.queue("default")) == 0
    assert len(named(d, "job_finished")) == 3 and named(d, "results_dropped") == []
    r.delete(ledger)


def test_at_a_stop_jobs_of_an_overwritten_processing_list_are_answered_or_go_back(
        r, keys, daemons):
    """The worker stops before anyone fixes the key: the jobs exist only in the
    supervisor now.  One that finished is answered (its completion was held back), never
    run again; those that did not finish go back to the head of their queue."""
    ledger = f"{keys.ns}-ledger"
    d = daemons("--concurrency", "1", "--prefetch", "2", "--grace", "1",
                ledger=ledger).wait_started()
    r.lpush(keys.queue("default"), json.dumps({"task": "t.sleep", "id": "long", "args": [2]}))
    wait_for(lambda: r.lrange(ledger, 0, -1), timeout=30, what="the long job started")
    r.lpush(keys.queue("default"), json.dumps({"task": "t.sleep", "id": "longer", "args": [60]}))
    push(r, keys, "default", "next")
    wait_for(lambda: r.llen(keys.processing("w1", "default")) == 3, timeout=30,
             what="all three held")
    r.set(keys.processing("w1", "default"), "overwritten")
    # long finishes (its answer held back: the list it must leave is a string); longer
    # starts, and is stopped at the end of the grace; next never starts
    wait_for(lambda: [e for e in named(d, "job_finished") if e["id"] == "long"], timeout=30,
             what="long finished")
    wait_for(lambda: any(x.startswith(b"longer:start:") for x in r.lrange(ledger, 0, -1)),
             timeout=30, what="longer started")
    assert envelope(r, keys, "long") is None   # held back
    d.signal(signal.SIGTERM)
    assert d.wait(60) == 0
    assert envelope(r, keys, "long")["status"] == "succeeded"
    back = sorted(json.loads(x)["id"] for x in r.lrange(keys.queue("default"), 0, -1))
    assert back == ["longer", "next"]
    runs = [x.decode().rsplit(":", 1)[0] for x in r.lrange(ledger, 0, -1)]
    assert runs.count("long:start") == 1 and runs.count("long:end") == 1
    assert r.get(keys.processing("w1", "default")) == b"overwritten"
    assert not list(r.scan_iter(f"{keys.ns}:stopping:*"))   # (no scratch list left)
    r.delete(ledger)


@pytest.mark.daemon
def test_on_redis_cluster_a_queue_of_the_wrong_type_stops_only_that_queue(
        rc, cluster_keys, cluster_daemons, cluster):
    from conftest import SPREAD_QUEUES

    keys = cluster_keys
    a, b = SPREAD_QUEUES[:2]   # on two different primaries
    d = cluster_daemons("--queue", a, "--queue", b).wait_started()
    rc.set(keys.queue(a), "not a list")
    for i in range(3):
        push(rc, keys, b, f"b{i}")
    wait_for(lambda: all(rc.get(keys.result(f"b{i}")) for i in range(3)), timeout=30,
             what="b served")
    wait_for(lambda: named(d, "queue_unusable"), timeout=30, what="queue_unusable")
    [said] = named(d, "queue_unusable")
    assert (said["queue"], said["key"], said["type"]) == (a, keys.queue(a), "string")
    url = cluster.url.replace("redis://", "redis+cluster://", 1)
    wait_for(lambda: any(u["key"] == keys.queue(a) for u in status_json(url, keys.ns)["unusable"]),
             timeout=30, what="status on the cluster")
    rc.delete(keys.queue(a))
    push(rc, keys, a, "a1")
    wait_for(lambda: rc.get(keys.result("a1")), timeout=30, what="a served again")
    assert len(named(d, "queue_usable")) == 1 and named(d, "redis_down") == []
    d.signal(signal.SIGTERM)
    assert d.wait(60) == 0


# -- the classification of errors (the loop with fakes: test_supervisor_unit.World) -------------

OOM = redis.ResponseError("OOM command not allowed when used memory > 'maxmemory'.")


def refusing(w, what: str, error: BaseException):
    """Make the fake queue's ``what`` calls fail with ``error`` until the returned
    function is called."""
    io = w.rq._io

    def failing(name):
        io(name)
        if name == what:
            raise error
    w.rq._io = failing
    return lambda: setattr(w.rq, "_io", io)


def test_classify_tells_an_outage_from_a_key_and_from_a_refusal():
    assert classify(redis.ConnectionError("Connection refused")) == "down"
    assert classify(redis.TimeoutError("Timeout reading from socket")) == "down"
    assert classify(redis.exceptions.BusyLoadingError("LOADING")) == "down"
    assert classify(redis.exceptions.ReadOnlyError("READONLY You can't write")) == "down"
    assert classify(redis.ResponseError("WRONGTYPE Operation against a key holding the wrong "
                                        "kind of value")) == "wrongtype"
    e = redis.ResponseError("WRONGTYPE redpool key ns:queue:a b holds a string, not a list")
    assert classify(e) == "wrongtype" and culprit(e) == ("ns:queue:a b", "string")
    assert classify(OOM) == "refused"
    assert classify(redis.exceptions.NoPermissionError("NOPERM")) == "refused"


def test_a_refused_command_is_not_an_outage_it_is_said_once_and_cleared():
    from test_supervisor_unit import World, job

    w = World([job(1)], size=1, prefetch=0)
    w.tick()
    restore = refusing(w, "exchange", OOM)
    w.pool.finish_all()
    for _ in range(6):   # retried with the backoff, said once
        w.tick(2.0)
    assert w.named("redis_down") == [] and w.duties.redis_down is False
    [said] = w.named("redis_error")
    assert said["during"] == "exchange" and "OOM" in said["error"]
    assert len(w.sup.pending) == 1
    restore()
    w.tick(2.0)
    assert not w.sup.pending and w.named("redis_error_cleared") == [{"during": "exchange"}]
    # a script refused half way may have written: our lists are reconciled once it passes
    assert "processing_contents" in w.rq.calls


def test_a_duty_redis_refuses_waits_alone_and_the_jobs_go_on():
    from test_supervisor_unit import World, job

    w = World([job(i) for i in range(40)], size=1, prefetch=0)
    restore = refusing(w, "promote", redis.exceptions.NoPermissionError(
        "NOPERM this user has no permissions to run the 'evalsha' command"))
    for _ in range(30):
        w.tick(0.1)
        w.pool.finish_all()
    promotes = w.rq.calls.count("promote")
    assert promotes <= 4                      # backing off (1 s, 2 s, ...), not every tick
    assert len(w.rq.completed) >= 25          # while the jobs went on, tick after tick
    assert len(w.named("redis_error")) == 1 and w.named("redis_down") == []
    restore()
    w.ticks(w.clock.t + 40, 0.5)
    assert w.named("redis_error_cleared") == [{"during": "duties"}]


def test_a_wrongtype_that_names_no_key_has_every_key_asked_its_type():
    from test_supervisor_unit import World, job

    w = World([job(1)], size=1, queues=("a", "b"))
    w.tick()
    key = w.rq.unusable.map.keys.queue("b")
    w.rq.types = {key: "string"}
    restore = refusing(w, "exchange", redis.ResponseError(
        "WRONGTYPE Operation against a key holding the wrong kind of value"))
    w.pool.finish_all()
    w.tick(0.1)
    restore()
    w.ticks(w.clock.t + 3, 0.1)
    [said] = w.named("queue_unusable")
    assert (said["queue"], said["key"], said["type"]) == ("b", key, "string")
    assert w.named("redis_down") == [] and w.named("redis_error") == []
    assert w.rq.unusable.queues == {"b"}
    # looked at again every RECHECK_EVERY seconds; fixed, served again, said once
    w.rq.types = {key: "none"}
    w.ticks(w.clock.t + 6, 0.5)
    assert w.named("queue_usable")[0]["queue"] == "b" and not w.rq.unusable


# -- what docs/deploy.md shows ------------------------------------------------------------------

def test_the_log_line_and_the_status_lines_docs_deploy_md_shows_are_the_real_ones():
    from doctools import ROOT as DOCS_ROOT, parse_blocks
    from redpool.deployment import QueueState, Snapshot
    from redpool.keys import Keys
    from redpool.keytypes import bad_key
    from redpool.status import render_status

    blocks = [b for b in parse_blocks(DOCS_ROOT / "docs" / "deploy.md")
              if b.directive == "tests/test_wrongtype.py"]
    log, status = blocks
    # the log line: the note the supervisor writes for that key, word for word
    k = Keys("redpool")
    line = json.loads(log.text)
    bad = bad_key(k, k.queue("lo"), "string")
    assert (line["event"], line["queue"], line["key"], line["type"], line["expected"]) == \
        ("queue_unusable", "lo", bad.key, bad.type, bad.expected)
    assert line["note"] == bad.fix
    # the status lines: what render_status prints for such a snapshot
    snap = Snapshot(0.0, [QueueState("hi", 0, None, 0, None, 0),
                          QueueState("lo", 0, None, 0, None, 0, {k.queue("lo"): "string"})],
                    [], 0, 0, 0, [{**bad.to_dict(), "seen_by": ["status", "web-1"]}])
    printed = render_status(snap, k, "redis://x").splitlines()
    for shown in status.text.splitlines():
        assert shown == "..." or shown in printed, shown
