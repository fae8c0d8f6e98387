"""The fault suite: faults injected for real (SIGKILL, SIGSTOP, Redis killed and frozen)
against real daemons and a real server, with assertions on what is in Redis and on a
ledger of every run.  The promise: at-least-once delivery, no job ever lost, and no
job run twice while its host is alive."""

from __future__ import annotations

import json
import os
import signal
import time
from collections import Counter

import pytest
import redis

from helpers import Daemon, envelope, lpush_jobs, wait_for
from test_protocol import ENVELOPE
from redpool.server import EmbeddedServer

pytestmark = pytest.mark.daemon


def ledger(r, keys) -> list[str]:
    return [x.decode() for x in r.lrange(keys.ns + ":ledger", 0, -1)]


def runs(r, keys, what: str) -> Counter:
    """How many times each job id logged ``what`` (start, attemptN, die, add...)."""
    return Counter(e.split(":")[0] for e in ledger(r, keys) if e.split(":")[1] == what)


def test_sigkill_of_a_child_reruns_exactly_that_job(r, keys, daemons):
    d = daemons("--concurrency", "2", ledger=keys.ns + ":ledger").wait_started()
    lpush_jobs(r, keys, [{"task": "t.sleep", "id": f"s{i}", "args": [0.2, i]} for i in range(6)]
               + [{"task": "t.sleep", "id": "victim", "args": [3, "v"]}])
    wait_for(lambda: runs(r, keys, "start")["victim"] == 1, what="victim start")
    pid = [e for e in ledger(r, keys) if e.startswith("victim:start")][0].rsplit(":", 1)[1]
    os.kill(int(pid), signal.SIGKILL)
    # Then the victim runs again (a crash is a redelivery) and every job succeeds once
    wait_for(lambda: all(envelope(r, keys, j) for j in [f"s{i}" for i in range(6)] + ["victim"]),
             timeout=30, what="all results")
    env = envelope(r, keys, "victim")
    assert env["status"] == "succeeded" and env["result"] == "v" and env["attempts"] == 2
    assert runs(r, keys, "start")["victim"] == 2
    assert all(n == 1 for j, n in runs(r, keys, "end").items())
    assert r.hlen(keys.crashes) == 0  # the count is dropped once the job is done
    assert d.proc.poll() is None


def test_a_dead_supervisor_is_reaped_and_its_jobs_finish_elsewhere(r, keys, daemons):
    # Given two "hosts" and long-ish jobs spread over both
    led = keys.ns + ":ledger"
    a = daemons("--concurrency", "2", "--lease", "2", name="host-a", ledger=led).wait_started()
    b = daemons("--concurrency", "2", "--lease", "2", name="host-b", ledger=led).wait_started()
    lpush_jobs(r, keys, [{"task": "t.sleep", "id": f"j{i}", "args": [1.0, i]} for i in range(12)])
    wait_for(lambda: r.llen(keys.processing("host-a", "default")) >= 1, what="host-a busy")
    # When host-a dies with SIGKILL
    held = r.lrange(keys.processing("host-a", "default"), 0, -1)
    os.killpg(a.pid, signal.SIGKILL)
    a.wait(10)
    # Then host-b puts host-a's jobs back once host-a's lease has run out (how soon is
    # a benchmark's business, not a test's: the machine may be busy), and finishes
    # everything
    wait_for(lambda: r.llen(keys.processing("host-a", "default")) == 0, timeout=60,
             what="host-a's jobs taken back")
    assert not r.exists(keys.supervisor("host-a"))
    assert held  # it did hold jobs
    wait_for(lambda: all(envelope(r, keys, f"j{i}") for i in range(12)), timeout=60,
             what="all results")
    assert all(envelope(r, keys, f"j{i}")["status"] == "succeeded" for i in range(12))
    assert not r.sismember(keys.supervisors, "host-a")
    assert any(e.get("event") == "reaped" and e.get("supervisor") == "host-a" for e in b.events())


def test_a_frozen_supervisor_loses_its_lease_and_does_not_write_fenced_results(r, keys, daemons):
    led = keys.ns + ":ledger"
    # Given a supervisor running a job, and a second one that starts after it took the job
    a = daemons("--concurrency", "1", "--lease", "2", "--prefetch", "0", name="frozen",
                ledger=led).wait_started()
    lpush_jobs(r, keys, [{"task": "t.sleep", "id": "f1", "args": [2.5, "x"]}])
    wait_for(lambda: runs(r, keys, "start")["f1"] == 1, what="f1 started on 'frozen'")
    daemons("--concurrency", "1", "--lease", "2", "--prefetch", "0", name="healthy",
            ledger=led).wait_started()
    # When the supervisor holding it is frozen for longer than its lease (its child runs on)
    os.kill(a.pid, signal.SIGSTOP)
    try:
        # Then the other one takes the job back and runs it
        wait_for(lambda: (envelope(r, keys, "f1") or {}).get("worker") == "healthy", timeout=30,
                 what="f1 finished by the healthy supervisor")
    finally:
        os.kill(a.pid, signal.SIGCONT)
    # And the thawed one notices, re-registers, drops its stale result, and carries on
    wait_for(lambda: any(e.get("event") == "reregistered" for e in a.events()), timeout=15,
             what="re-registration")
    wait_for(lambda: any(e.get("event") == "job_finished" and e.get("id") == "f1"
                         for e in a.events()), timeout=15, what="the stale run to finish")
    wait_for(lambda: any(e.get("event") == "results_dropped" for e in a.events()), timeout=10,
             what="its stale result dropped")
    (dropped,) = [e for e in a.events() if e.get("event") == "results_dropped"]
    assert dropped["cause"] == "lease_expired" and "another worker" in dropped["reason"]
    assert envelope(r, keys, "f1")["worker"] == "healthy"  # never overwritten
    assert runs(r, keys, "start")["f1"] == 2
    lpush_jobs(r, keys, [{"task": "t.add", "id": f"after{i}", "args": [i, 1]} for i in range(6)])
    wait_for(lambda: all(envelope(r, keys, f"after{i}") for i in range(6)), what="later jobs")
    assert a.proc.poll() is None and r.sismember(keys.supervisors, "frozen")


def test_poison_pill_is_dead_lettered_after_max_crashes(r, keys, daemons):
    led = keys.ns + ":ledger"
    daemons("--concurrency", "1", "--max-crashes", "2", ledger=led).wait_started()
    t0 = time.time()
    lpush_jobs(r, keys, [{"task": "t.die", "id": "poison", "reply_to": keys.reply("r")},
                         {"task": "t.add", "id": "fine", "args": [1, 2]}])
    item = r.brpop(keys.reply("r"), timeout=60)
    assert item is not None
    env = json.loads(item[1])
    assert env["status"] == "failed" and env["error"]["type"] == "WorkerCrashed"
    assert "poison pill" in env["error"]["message"] and "SIGKILL" in env["error"]["message"]
    assert runs(r, keys, "die")["poison"] == 3  # max-crashes 2: the third crash ends it
    ENVELOPE.validate(env)
    assert t0 <= env["started_at"] <= env["finished_at"]  # it ran: never null
    dead = [json.loads(x) for x in r.lrange(keys.dead, 0, -1)]
    assert [d["id"] for d in dead] == ["poison"] and "--max-crashes 2" in dead[0]["reason"]
    wait_for(lambda: envelope(r, keys, "fine"), what="the good job")
    assert r.hlen(keys.crashes) == 0
    r.delete(keys.reply("r"))


def test_hung_task_is_killed_at_its_timeout_and_retried_per_its_policy(r, keys, daemons):
    led = keys.ns + ":ledger"
    d = daemons("--concurrency", "2", ledger=led).wait_started()
    lpush_jobs(r, keys, [{"task": "t.sleep", "id": "hung", "args": [60], "timeout": 1,
                          "max_retries": 1, "retry_backoff": 0.1},
                         {"task": "t.sleep", "id": "ok", "args": [0.5, "fine"]}])
    wait_for(lambda: envelope(r, keys, "hung"), timeout=30, what="the hung job's result")
    env = envelope(r, keys, "hung")
    assert env["status"] == "failed" and env["error"]["type"] == "TimeoutError"
    assert "timeout of 1 s" in env["error"]["message"]
    assert runs(r, keys, "start")["hung"] == 2 and runs(r, keys, "end")["hung"] == 0
    assert envelope(r, keys, "ok")["result"] == "fine"  # the other job was untouched
    # Each timeout names its job, and the stop that follows is logged as expected, at
    # info; no child_died error
    timeouts = [e for e in d.events() if e.get("event") == "job_timeout"]
    assert [(e["id"], e["task"], e["queue"], e["attempt"], e["timeout"], e["level"])
            for e in timeouts] == [("hung", "t.sleep", "default", n, 1.0, "warning") for n in (1, 2)]
    stopped = [e for e in d.events() if e.get("event") == "child_stopped"]
    assert [e["pid"] for e in stopped] == [e["pid"] for e in timeouts]
    assert all(e["level"] == "info" and e["had_job"] for e in stopped)
    assert not [e for e in d.events() if e.get("event") == "child_died"]
    # It ran: started_at is the start of the attempt that timed out (the second), and
    # the log's duration is how long that attempt ran, past its timeout
    ENVELOPE.validate(env)
    attempts = [e for e in d.events() if e.get("event") == "job_finished" and e["id"] == "hung"]
    assert [e["status"] for e in attempts] == ["retrying", "failed"]
    assert all(e["duration"] >= 1.0 for e in attempts), attempts
    assert env["started_at"] is not None
    assert env["started_at"] + attempts[1]["duration"] <= env["finished_at"] + 0.001


def test_retries_run_in_order_with_backoff_then_succeed(r, keys, daemons):
    led = keys.ns + ":ledger"
    daemons("--concurrency", "2", ledger=led).wait_started()
    lpush_jobs(r, keys, [{"task": "t.flaky", "id": "flaky", "args": [2]}])
    wait_for(lambda: envelope(r, keys, "flaky"), timeout=30, what="flaky result")
    env = envelope(r, keys, "flaky")
    assert env["status"] == "succeeded" and env["result"] == 3 and env["attempts"] == 3
    attempts = [e.split(":")[1] for e in ledger(r, keys) if e.startswith("flaky:")]
    assert attempts == ["attempt1", "attempt2", "attempt3"]


def test_failure_after_the_last_retry_is_dead_lettered_when_asked(r, keys, daemons):
    daemons("--concurrency", "1").wait_started()
    lpush_jobs(r, keys, [{"task": "t.boom", "id": "b1", "args": ["no"], "max_retries": 2,
                          "retry_backoff": 0.05, "dead_letter": True},
                         {"task": "t.boom", "id": "b2", "args": ["no"]}])
    wait_for(lambda: envelope(r, keys, "b1") and envelope(r, keys, "b2"), timeout=30,
             what="results")
    assert envelope(r, keys, "b1")["attempts"] == 3 and envelope(r, keys, "b2")["attempts"] == 1
    dead = [json.loads(x) for x in r.lrange(keys.dead, 0, -1)]
    assert [d["id"] for d in dead] == ["b1"] and "after 3 attempt(s)" in dead[0]["reason"]


def test_delayed_jobs_run_after_their_time_not_before(redis_url, namespace, r, keys, daemons):
    from redpool import Client

    daemons("--concurrency", "1").wait_started()
    with Client(redis_url, namespace=namespace) as c:
        t0 = time.time()
        res = c.enqueue("t.add", 1, 2, delay=1.5)
        assert r.zcard(keys.scheduled("default")) == 1 and r.llen(keys.queue("default")) == 0
        assert res.get(timeout=30) == 3
        assert res.envelope["started_at"] >= t0 + 1.5 - 0.05  # server and host share a clock here
        assert r.zcard(keys.scheduled("default")) == 0


def test_children_are_recycled_after_max_jobs_never_mid_job(r, keys, daemons):
    daemons("--concurrency", "1", "--max-jobs-per-child", "3").wait_started()
    lpush_jobs(r, keys, [{"task": "t.pid", "id": f"p{i}"} for i in range(9)])
    wait_for(lambda: all(envelope(r, keys, f"p{i}") for i in range(9)), what="results")
    pids = [envelope(r, keys, f"p{i}")["result"] for i in range(9)]
    # three processes, three jobs each (which jobs is up to scheduling)
    assert sorted(Counter(pids).values()) == [3, 3, 3]


def test_children_over_the_memory_limit_are_replaced_after_their_job(r, keys, daemons):
    d = daemons("--concurrency", "1", "--max-memory-per-child", "150M").wait_started()
    lpush_jobs(r, keys, [{"task": "t.alloc", "id": "a1", "args": [200]},
                         {"task": "t.pid", "id": "a2"}])
    wait_for(lambda: envelope(r, keys, "a1") and envelope(r, keys, "a2"), what="results")
    assert envelope(r, keys, "a1")["status"] == "succeeded"
    assert envelope(r, keys, "a1")["result"] != envelope(r, keys, "a2")["result"]
    assert any(e.get("event") == "child_retired" for e in d.events())


# -- Redis going away ---------------------------------------------------------------------------

@pytest.fixture
def aof_server(tmp_path):
    """A private server of this test's own, with AOF on (fsync always), so it can be
    killed and restarted on the same port without losing what it acknowledged."""
    (tmp_path / "aof").mkdir()
    srv = EmbeddedServer(appendonly=True, dir=str(tmp_path / "aof")).start()
    yield srv
    srv.stop()


def test_redis_killed_and_restarted_mid_run_loses_nothing(aof_server, namespace, tmp_path):
    from redpool.protocol import Keys

    keys = Keys(namespace)
    r = redis.Redis.from_url(aof_server.url)
    lpush_jobs(r, keys, [{"task": "t.sleep", "id": f"r{i}", "args": [0.05, i]} for i in range(60)])
    d = Daemon(aof_server.url, namespace, "--concurrency", "2", "--lease", "5").start(tmp_path)
    try:
        d.wait_started()
        wait_for(lambda: r.exists(keys.result("r5")), what="some progress")
        # When Redis dies (kill -9) and comes back on the same port with its AOF
        aof_server.proc.kill()
        aof_server.proc.wait()
        time.sleep(1.0)  # the outage itself: the daemon must ride it out
        aof_server.start()
        r = redis.Redis.from_url(aof_server.url)
        # Then every job completes, and the daemon logged the outage once and its end
        wait_for(lambda: all(r.exists(keys.result(f"r{i}")) for i in range(60)), timeout=60,
                 what="all results after the restart")
        assert d.proc.poll() is None
        wait_for(lambda: any(e.get("event") == "redis_up" for e in d.events()), 30, 0.2,
                 "redis_up")
        events = [e.get("event") for e in d.events()]
        assert events.count("redis_down") == 1 and events.count("redis_up") == 1
        assert events.count("redis_down") <= 3  # once per outage, not once per retry
        assert r.llen(keys.processing("w1", "default")) == 0
    finally:
        d.kill()


def test_redis_frozen_for_a_few_seconds(aof_server, namespace, tmp_path):
    from redpool.protocol import Keys

    keys = Keys(namespace)
    r = redis.Redis.from_url(aof_server.url)
    d = Daemon(aof_server.url, namespace, "--concurrency", "2", "--lease", "10").start(tmp_path)
    try:
        d.wait_started()
        lpush_jobs(r, keys, [{"task": "t.sleep", "id": f"z{i}", "args": [0.05, i]} for i in range(40)])
        wait_for(lambda: r.exists(keys.result("z3")), what="some progress")
        os.kill(aof_server.proc.pid, signal.SIGSTOP)
        time.sleep(4)  # frozen: connections hang rather than fail
        os.kill(aof_server.proc.pid, signal.SIGCONT)
        wait_for(lambda: all(r.exists(keys.result(f"z{i}")) for i in range(40)), timeout=60,
                 what="all results after the freeze")
        assert d.proc.poll() is None
    finally:
        os.kill(aof_server.proc.pid, signal.SIGCONT)
        d.kill()


def test_a_poison_pill_judged_after_its_supervisor_died_did_run(r, keys, daemons):
    # Given a supervisor killed (with its pool) while it runs a job
    led = keys.ns + ":ledger"
    a = daemons("--concurrency", "1", name="host-a", ledger=led).wait_started()
    lpush_jobs(r, keys, [{"task": "t.sleep", "id": "victim", "args": [30],
                          "reply_to": keys.reply("r")}])
    wait_for(lambda: runs(r, keys, "start")["victim"] == 1, what="victim started")
    os.killpg(a.pid, signal.SIGKILL)
    a.wait(10)
    killed = time.time()
    # When it restarts with --max-crashes 0: the job it held counts one crash, and is
    # judged a poison pill when reserved again (which of its jobs had started, the
    # restart cannot know)
    daemons("--concurrency", "1", "--max-crashes", "0", name="host-a", ledger=led)
    item = r.brpop(keys.reply("r"), timeout=60)
    assert item is not None
    env = json.loads(item[1])
    ENVELOPE.validate(env)
    assert env["error"]["type"] == "WorkerCrashed" and env["attempts"] == 2
    # Then its envelope does not say it never ran: started_at is the time the crash was
    # counted, the latest it can have started
    assert killed <= env["started_at"] <= env["finished_at"]
    assert runs(r, keys, "start")["victim"] == 1
    r.delete(keys.reply("r"))


# -- Redis restarted without persistence ------------------------------------------------------

@pytest.fixture
def bare_server(tmp_path):
    """A private server of this test's own that keeps nothing on disk, on a fixed port:
    stopped and started again, it comes back empty."""
    (tmp_path / "bare").mkdir()
    srv = EmbeddedServer(dir=str(tmp_path / "bare")).start()
    yield srv
    srv.stop()


def test_redis_restarted_without_persistence_is_said_once_and_held_jobs_are_answered(
        bare_server, namespace, redis_url, r, tmp_path):
    from redpool.logs import _LEVELS
    from redpool.protocol import Keys

    keys = Keys(namespace)
    led = keys.ns + ":ledger"          # on the session's server: it survives the restart
    bare = redis.Redis.from_url(bare_server.url)
    # Given a worker holding four jobs (two running, two reserved) and two more queued
    lpush_jobs(bare, keys, [{"task": "t.sleep", "id": "long", "args": [5, "L"]},
                            {"task": "t.sleep", "id": "short", "args": [1, "S"]},
                            {"task": "t.sleep", "id": "h1", "args": [0.2, "1"]},
                            {"task": "t.sleep", "id": "h2", "args": [0.2, "2"]},
                            {"task": "t.add", "id": "q1", "args": [1, 1]},
                            {"task": "t.add", "id": "q2", "args": [2, 2]}])
    d = Daemon(bare_server.url, namespace, "--concurrency", "2", "--prefetch", "2",
               "--lease", "5", env={"REDPOOL_LEDGER_URL": redis_url, "REDPOOL_LEDGER": led}
               ).start(tmp_path)
    try:
        d.wait_started()
        wait_for(lambda: runs(r, keys, "start")["long"] and runs(r, keys, "start")["short"],
                 what="long and short running")
        assert bare.llen(keys.queue("default")) == 2       # q1, q2 wait in the queue
        # When Redis stops and comes back empty (no AOF, no snapshots), after "short"
        # finished meanwhile (its result not yet written)
        bare_server.stop()
        wait_for(lambda: runs(r, keys, "end")["short"], what="short finished during the outage")
        bare_server.start()
        bare = redis.Redis.from_url(bare_server.url)
        # Then every job it held is answered: the running, the finished, the reserved
        wait_for(lambda: all(envelope(bare, keys, j) for j in ("long", "short", "h1", "h2")),
                 timeout=60, what="the held jobs' results on the new server")
        assert [envelope(bare, keys, j)["result"] for j in ("long", "short", "h1", "h2")] == \
            ["L", "S", "1", "2"]
        # and the loss was said once, as what it is, with what this supervisor held
        events = d.events()
        (lost,) = [e for e in events if e.get("event") == "redis_data_lost"]
        assert lost["level"] == _LEVELS["redis_data_lost"] == "error"
        assert lost["held"] == lost["restored"] == 4, lost
        assert "restarted without its data" in lost["cause"]
        assert "cannot be known" in lost["note"]
        assert not [e for e in events if e.get("event") in ("lease_lost", "results_dropped")]
        # The jobs that waited in the queue are gone with the server's data: nobody has them
        assert not envelope(bare, keys, "q1") and bare.llen(keys.queue("default")) == 0
        assert runs(r, keys, "start")["long"] == 1                 # nothing ran twice
        wait_for(lambda: bare.llen(keys.processing("w1", "default")) == 0, what="all acknowledged")
        assert d.proc.poll() is None
        # (and at start it warned, once, that this server keeps nothing)
        assert [e["level"] for e in events if e.get("event") == "redis_not_persistent"] == \
            ["warning"]
    finally:
        d.kill()
        r.delete(led)


def test_a_server_with_aof_is_not_warned_about(aof_server, namespace, tmp_path):
    d = Daemon(aof_server.url, namespace, "--concurrency", "1").start(tmp_path)
    try:
        d.wait_started()
        names = [e.get("event") for e in d.events()]
        assert "redis_not_persistent" not in names and "started" in names
    finally:
        d.kill()


def test_an_idle_worker_finds_a_server_restarted_empty_and_serves_it_at_once(
        bare_server, namespace, tmp_path):
    from redpool.protocol import Keys

    keys = Keys(namespace)
    d = Daemon(bare_server.url, namespace, "--concurrency", "1", "--lease", "3").start(tmp_path)
    try:
        d.wait_started()
        # When the server restarts empty while the worker has nothing to do
        bare_server.stop()
        bare_server.start()
        bare = redis.Redis.from_url(bare_server.url)
        # Then it says so, once, holding nothing, and takes new work from the new server
        wait_for(lambda: any(e.get("event") == "redis_data_lost" for e in d.events()),
                 timeout=30, what="redis_data_lost")
        lpush_jobs(bare, keys, [{"task": "t.add", "id": "after", "args": [1, 2]}])
        wait_for(lambda: envelope(bare, keys, "after"), timeout=30, what="a job after the restart")
        events = d.events()
        (lost,) = [e for e in events if e.get("event") == "redis_data_lost"]
        assert lost["held"] == 0 and lost["restored"] == 0
        assert not [e for e in events if e.get("event") in ("lease_lost", "results_dropped")]
        assert bare.sismember(keys.supervisors, "w1") and bare.exists(keys.dataset)
    finally:
        d.kill()
