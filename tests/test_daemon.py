"""The real daemon as a subprocess, real signals, assertions on what is in Redis."""

from __future__ import annotations

import json
import os
import signal
from collections import Counter

import pytest

from helpers import envelope, lpush_jobs, wait_for

pytestmark = pytest.mark.daemon


def test_raw_lpush_jobs_are_run_and_answered_on_reply_to(r, keys, daemons):
    # Given a running worker and a producer with nothing but LPUSH
    d = daemons("--concurrency", "2").wait_started()
    replies = keys.reply("producer-1")
    jobs = [{"task": "t.add", "id": f"j{i}", "args": [i, 10], "reply_to": replies}
            for i in range(20)]
    lpush_jobs(r, keys, jobs)
    # Then every job is answered on reply_to and in its result key
    got = {}
    while len(got) < 20:
        item = r.brpop(replies, timeout=20)
        assert item is not None, d.log()
        env = json.loads(item[1])
        got[env["id"]] = env
    try:
        for i in range(20):
            env = got[f"j{i}"]
            assert env["status"] == "succeeded" and env["result"] == i + 10
            assert env["task"] == "t.add" and env["queue"] == "default" and env["worker"] == "w1"
            assert envelope(r, keys, f"j{i}") == env
            assert 0 < r.ttl(keys.result(f"j{i}")) <= 86400
        assert r.llen(keys.queue("default")) == 0
        assert r.llen(keys.processing("w1", "default")) == 0
    finally:
        r.delete(replies)


def test_blocks_in_redis_when_idle_and_picks_up_a_new_job(r, keys, daemons):
    d = daemons("--concurrency", "1").wait_started()
    # Given an idle worker: it waits inside Redis (BLMOVE), not in a polling loop
    wait_for(lambda: any(b"cmd=blmove" in line for line in r.execute_command("CLIENT", "LIST").split(b"\n")),
             what="a client blocked in BLMOVE")
    r.lpush(keys.queue("default"),
            json.dumps({"task": "t.add", "id": "late", "args": [1, 1], "reply_to": keys.reply("late")}))
    item = r.brpop(keys.reply("late"), timeout=10)
    assert item is not None and json.loads(item[1])["result"] == 2, d.log()


def test_strict_priority_in_the_order_given(r, keys, daemons):
    # Given jobs waiting on two queues before the worker starts
    lpush_jobs(r, keys, [{"task": "t.add", "id": f"low{i}", "args": [0, i]} for i in range(5)], "low")
    lpush_jobs(r, keys, [{"task": "t.add", "id": f"high{i}", "args": [0, i]} for i in range(5)], "high")
    d = daemons("--queue", "high", "--queue", "low", "--concurrency", "1", "--prefetch", "0", "--burst")
    assert d.wait(60) == 0, d.log()
    done = [e["id"] for e in d.events() if e.get("event") == "job_finished"]
    assert done == [f"high{i}" for i in range(5)] + [f"low{i}" for i in range(5)]


def test_every_bad_input_is_dead_lettered_while_good_jobs_complete(r, keys, daemons):
    rt = keys.reply("bad")
    big = {"task": "t.add", "id": "big", "args": ["x" * (1024 * 1024), "y"], "reply_to": rt}
    bad = [
        b"this is not json",
        b"\xff\xfe not utf-8",
        json.dumps([1, 2, 3]).encode(),
        json.dumps("a string").encode(),
        json.dumps({"id": "no-task", "reply_to": rt}).encode(),
        json.dumps({"task": "no.such.task", "id": "unknown", "reply_to": rt}).encode(),
        json.dumps({"task": "t.ad", "id": "typo", "args": [1, 2], "reply_to": rt}).encode(),
        json.dumps({"task": "t.add", "id": "argtype", "args": {"a": 1}, "reply_to": rt}).encode(),
        json.dumps({"task": "t.add", "id": "kwtype", "kwargs": [1], "reply_to": rt}).encode(),
        json.dumps({"task": "t.add", "id": "bad id!", "reply_to": rt}).encode(),
        json.dumps({"task": "t.add", "id": "ttltype", "result_ttl": "soon", "reply_to": rt}).encode(),
        json.dumps({"task": "t.add", "id": "arity", "args": [1], "reply_to": rt}).encode(),
        json.dumps(big).encode(),
        json.dumps({"task": "t.unserialisable", "id": "unser", "reply_to": rt}).encode(),
        b"[" * 100000 + b"]" * 100000,
    ]
    q = keys.queue("default")
    for i, raw in enumerate(bad):
        r.lpush(q, json.dumps({"task": "t.add", "id": f"good{i}", "args": [i, 1]}))
        r.lpush(q, raw)
    r.lpush(q, json.dumps({"task": "t.add", "id": "good-last", "args": [1, 1]}))
    d = daemons("--concurrency", "2", "--burst")
    assert d.wait(60) == 0, d.log()

    # Good jobs around the bad ones all completed
    for i in range(len(bad)):
        assert envelope(r, keys, f"good{i}")["result"] == i + 1
    assert envelope(r, keys, "good-last")["result"] == 2
    # Every bad one is in the dead-letter list with a reason
    dead = [json.loads(x) for x in r.lrange(keys.dead, 0, -1)]
    assert len(dead) == len(bad), dead
    by_reason = " | ".join(e["reason"] for e in dead)
    for phrase in ["not valid JSON", "not UTF-8", "must be a JSON object", "no 'task' field",
                   "unknown task 'no.such.task' (registered: t.",
                   "unknown task 't.ad' (did you mean 't.add'?; registered: t.",
                   "'args' must be a JSON array",
                   "'kwargs' must be a JSON object", "'id' must be", "'result_ttl' must be",
                   "arguments do not match", "over the limit of 1048576", "not JSON-serialisable",
                   "nested too deeply"]:
        assert phrase in by_reason, phrase
    assert all(e["queue"] == "default" and e["failed_at"] > 0 for e in dead)
    # Producers that can be reached got a failed envelope: a waiting producer always gets an answer
    replies = {json.loads(x)["id"]: json.loads(x) for x in r.lrange(rt, 0, -1)}
    for jid in ["unknown", "typo", "argtype", "kwtype", "ttltype", "arity", "big", "unser"]:
        assert replies[jid]["status"] == "failed", jid
    assert replies["unknown"]["error"]["type"] == replies["typo"]["error"]["type"] == "UnknownTask"
    assert replies["big"]["error"]["type"] == "PayloadTooLarge"
    assert replies["unser"]["error"]["type"] == "UnserializableResult"
    # started_at is null exactly for the jobs that never ran: a producer may send them again
    from test_protocol import ENVELOPE
    for env in replies.values():
        ENVELOPE.validate(env)
        assert (env["started_at"] is None) == (env["id"] != "unser"), env
    assert len(replies) == 10  # also "no-task" and "bad id!" (reply_to only, id assigned)
    assert r.llen(keys.processing("w1", "default")) == 0


def test_sigkill_of_a_child_mid_job_fails_exactly_that_job(r, keys, daemons):
    # (--max-crashes 0: the first crash fails the job; by default it is retried)
    d = daemons("--concurrency", "2", "--max-crashes", "0", ledger=keys.ns + ":ledger").wait_started()
    jobs = [{"task": "t.sleep", "id": f"s{i}", "args": [0.3, i]} for i in range(8)]
    jobs.insert(2, {"task": "t.sleep", "id": "victim", "args": [30]})
    lpush_jobs(r, keys, jobs)
    ledger = keys.ns + ":ledger"
    # When the child running "victim" is killed by SIGKILL
    wait_for(lambda: any(x.startswith(b"victim:start") for x in r.lrange(ledger, 0, -1)), what="victim start")
    victim = [x for x in r.lrange(ledger, 0, -1) if x.startswith(b"victim:start")][0]
    os.kill(int(victim.rsplit(b":", 1)[1]), signal.SIGKILL)
    # Then exactly that job fails, naming the signal, and every other job completes
    wait_for(lambda: all(envelope(r, keys, f"s{i}") for i in range(8)) and envelope(r, keys, "victim"),
             timeout=30, what="all results")
    env = envelope(r, keys, "victim")
    assert env["status"] == "failed" and env["error"]["type"] == "WorkerCrashed"
    assert "SIGKILL" in env["error"]["message"]
    assert all(envelope(r, keys, f"s{i}")["status"] == "succeeded" for i in range(8))
    # and the pool is back to full strength
    wait_for(lambda: len(d.children()) == 2, what="replacement child")
    assert d.proc.poll() is None
    assert any(e.get("event") == "child_died" for e in d.events())


def test_sigterm_drains_running_jobs_within_grace_and_loses_nothing(r, keys, daemons):
    d = daemons("--concurrency", "2", "--grace", "20", ledger=keys.ns + ":ledger").wait_started()
    lpush_jobs(r, keys, [{"task": "t.sleep", "id": f"d{i}", "args": [1.5]} for i in range(6)])
    ledger = keys.ns + ":ledger"
    wait_for(lambda: r.llen(ledger) >= 2, what="two jobs running")
    # When SIGTERM arrives while two long jobs run
    d.signal(signal.SIGTERM)
    assert d.wait(60) == 0, d.log()
    # within the grace: the running jobs were not cut short
    assert not [e for e in d.events() if e.get("event") in ("grace_expired", "stop_now")]
    # Then the running jobs finished, the rest went back to the head of the queue
    finished = [f"d{i}" for i in range(6) if envelope(r, keys, f"d{i}")]
    queued = [json.loads(x)["id"] for x in r.lrange(keys.queue("default"), 0, -1)]
    assert len(finished) >= 2
    assert sorted(finished + queued) == sorted(f"d{i}" for i in range(6))
    assert queued == sorted(queued, reverse=True)  # original FIFO order kept
    assert r.llen(keys.processing("w1", "default")) == 0
    assert not r.exists(keys.supervisor("w1"))


def test_grace_expiry_requeues_unfinished_jobs_and_exits_0(r, keys, daemons):
    d = daemons("--concurrency", "1", "--grace", "1", ledger=keys.ns + ":ledger").wait_started()
    lpush_jobs(r, keys, [{"task": "t.sleep", "id": "long", "args": [60]}])
    wait_for(lambda: r.llen(keys.ns + ":ledger") >= 1, what="job start")
    d.signal(signal.SIGTERM)
    assert d.wait(30) == 0, d.log()
    assert [json.loads(x)["id"] for x in r.lrange(keys.queue("default"), 0, -1)] == ["long"]
    assert not envelope(r, keys, "long")



def test_ctrl_c_counts_each_job_that_went_back_once(r, keys, daemons):
    # Given two 20 s jobs running and a third held (prefetch), the idle waiter blocked in
    # BLMOVE: the issue's --grace 8 and three 20 s jobs, with a shorter grace
    led = keys.ns + ":ledger"
    d = daemons("--concurrency", "2", "--grace", "2", ledger=led).wait_started()
    lpush_jobs(r, keys, [{"task": "t.sleep", "id": f"long{i}", "args": [20]} for i in range(3)])
    wait_for(lambda: r.llen(led) >= 2, what="two jobs running")
    wait_for(lambda: r.llen(keys.queue("default")) == 0, what="the third one held")
    # When Ctrl-C arrives (SIGINT) and the grace runs out
    d.signal(signal.SIGINT)
    assert d.wait(30) == 0, d.log()
    # Then all three are back in the queue, and the stopped event says three, not more
    back = [json.loads(x)["id"] for x in r.lrange(keys.queue("default"), 0, -1)]
    assert sorted(back) == ["long0", "long1", "long2"]
    (stopped,) = [e for e in d.events() if e.get("event") == "stopped"]
    assert stopped["requeued"] == 3, d.log()

def test_second_sigterm_stops_now_and_still_requeues(r, keys, daemons):
    d = daemons("--concurrency", "1", "--grace", "60", ledger=keys.ns + ":ledger").wait_started()
    lpush_jobs(r, keys, [{"task": "t.sleep", "id": "long", "args": [60]}])
    wait_for(lambda: r.llen(keys.ns + ":ledger") >= 1, what="job start")
    d.signal(signal.SIGTERM)
    wait_for(lambda: any(e.get("event") == "draining" for e in d.events()), what="draining")
    d.signal(signal.SIGINT)
    assert d.wait(15) == 0, d.log()
    assert [json.loads(x)["id"] for x in r.lrange(keys.queue("default"), 0, -1)] == ["long"]


def test_kill_9_then_restart_completes_every_job(r, keys, daemons):
    ledger = keys.ns + ":ledger"
    lpush_jobs(r, keys, [{"task": "t.sleep", "id": f"k{i}", "args": [0.2, i]} for i in range(20)])
    d = daemons("--concurrency", "2", ledger=ledger).wait_started()
    wait_for(lambda: r.llen(ledger) >= 4, what="some jobs started")
    # When the whole daemon is killed with SIGKILL mid-run
    children = d.children()
    os.kill(d.pid, signal.SIGKILL)
    d.wait(10)
    # Then its children exit too instead of running on as orphans
    wait_for(lambda: not any(_alive(p) for p in children), timeout=10, what="orphans to exit")
    # And a restart under the same name finishes every job (duplicates allowed, losses not)
    d2 = daemons("--concurrency", "2", "--burst", ledger=ledger)
    assert d2.wait(60) == 0, d2.log()
    assert any(e.get("event") == "recovered" for e in d2.events()) or \
        r.llen(keys.processing("w1", "default")) == 0
    for i in range(20):
        env = envelope(r, keys, f"k{i}")
        assert env and env["status"] == "succeeded" and env["result"] == i, f"k{i}"
    assert r.llen(keys.queue("default")) == 0
    assert r.llen(keys.processing("w1", "default")) == 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purpose
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False
    return True


def test_module_that_cannot_be_imported_stops_start_up_with_exit_code_3(daemons):
    d = daemons(modules=("tests.taskmods.broken",))
    assert d.wait(60) == 3
    assert "broken on purpose" in d.log()


def test_a_second_live_supervisor_with_the_same_name_is_refused(daemons):
    daemons("--concurrency", "1").wait_started()
    d2 = daemons("--concurrency", "1")
    assert d2.wait(60) == 5
    assert "--name" in d2.log()


def test_prefetch_is_bounded(r, keys, daemons):
    lpush_jobs(r, keys, [{"task": "t.sleep", "id": f"p{i}", "args": [5]} for i in range(30)])
    d = daemons("--concurrency", "1", "--prefetch", "2", ledger=keys.ns + ":ledger").wait_started()
    wait_for(lambda: r.llen(keys.ns + ":ledger") >= 1, what="first job")
    # one running + two prefetched (+ at most one taken by the blocking waiter)
    assert r.llen(keys.processing("w1", "default")) <= 4
    assert r.llen(keys.queue("default")) >= 26
    d.signal(signal.SIGTERM)
    wait_for(lambda: any(e.get("event") == "draining" for e in d.events()), what="draining")
    d.signal(signal.SIGTERM)  # the second one: stop now
    assert d.wait(20) == 0
    assert r.llen(keys.queue("default")) == 30  # everything back, none lost
    assert r.llen(keys.processing("w1", "default")) == 0


def test_a_child_killed_while_booting_is_replaced_not_taken_for_an_import_error(r, keys, daemons):
    # Given a worker whose children take a while to import their task modules
    d = daemons("--concurrency", "2", modules=("tests.taskmods.slow_import",))
    # When one child is killed (an operator, the OOM killer) before it is ready
    first = wait_for(lambda: d.children(), what="children spawning")[0]
    os.kill(first, signal.SIGKILL)
    # Then the daemon starts all the same, with a replacement, and runs jobs
    d.wait_started()
    lpush_jobs(r, keys, [{"task": "slow.ping", "id": "sp"}])
    wait_for(lambda: envelope(r, keys, "sp"), timeout=30, what="the result")
    assert envelope(r, keys, "sp")["result"] == "pong"
    assert len(d.children()) == 2 and first not in d.children()


def test_a_crash_inside_a_batch_of_short_jobs_is_pinned_on_exactly_that_job(r, keys, daemons):
    # Given short jobs, which a child receives in batches, one of which kills its child
    led = keys.ns + ":ledger"
    d = daemons("--concurrency", "2", ledger=led).wait_started()
    lpush_jobs(r, keys, [{"task": "t.add", "id": f"warm{i}", "args": [i, 1]} for i in range(200)])
    wait_for(lambda: all(envelope(r, keys, f"warm{i}") for i in range(200)), what="warm-up")
    lpush_jobs(r, keys, [{"task": "t.die_if", "id": f"b{i}", "args": [i, 50]} for i in range(300)])
    wait_for(lambda: all(envelope(r, keys, f"b{i}") for i in range(300)), timeout=60,
             what="every result")
    # Then the crash is counted on b50 alone: it ran again and succeeded; every other job
    # succeeded with no crash on its record
    assert envelope(r, keys, "b50")["attempts"] == 2
    others = [envelope(r, keys, f"b{i}") for i in range(300) if i != 50]
    assert all(e["status"] == "succeeded" and e["attempts"] == 1 for e in others)
    assert sum(1 for e in d.events() if e.get("event") == "job_crashed") == 1
    assert r.hlen(keys.crashes) == 0


def test_a_batch_that_runs_long_is_shared_out_again(r, keys, daemons):
    # Given a worker that has only seen very short jobs (so it hands out big batches)
    daemons("--concurrency", "2").wait_started()
    lpush_jobs(r, keys, [{"task": "t.add", "id": f"w{i}", "args": [i, 1]} for i in range(300)])
    wait_for(lambda: all(envelope(r, keys, f"w{i}") for i in range(300)), what="warm-up")
    # When long jobs arrive
    lpush_jobs(r, keys, [{"task": "t.nap", "id": f"l{i}", "args": [0.1]} for i in range(20)])
    wait_for(lambda: all(envelope(r, keys, f"l{i}") for i in range(20)), timeout=30,
             what="the long jobs")
    # Then both processes worked on them: the child that got a big batch gave back what
    # it had not started, and its sibling took a share
    pids = Counter(envelope(r, keys, f"l{i}")["result"] for i in range(20))
    assert len(pids) == 2 and min(pids.values()) >= 5, pids


def test_short_jobs_behind_a_long_one_go_to_another_worker(r, keys, daemons, tmp_path):
    # Given a worker of one process, --prefetch 0, that has seen only short jobs (so it
    # hands out big batches), running a job of no fixed length
    led = keys.ns + ":ledger"
    w1 = daemons("--concurrency", "1", "--prefetch", "0", name="w1", ledger=led).wait_started()
    lpush_jobs(r, keys, [{"task": "t.add", "id": f"w{i}", "args": [i, 1]} for i in range(200)])
    wait_for(lambda: all(envelope(r, keys, f"w{i}") for i in range(200)), what="warm-up")
    release = tmp_path / "release"
    lpush_jobs(r, keys, [{"task": "t.hold", "id": "long", "args": [str(release)]}])
    wait_for(lambda: (release.parent / "release.started").exists(), what="the long job")
    long_raw = r.lrange(keys.processing("w1", "default"), 0, -1)
    # When five short jobs arrive after it
    short = [f"s{i}" for i in range(5)]
    lpush_jobs(r, keys, [{"task": "t.add", "id": s, "args": [i, 1]} for i, s in enumerate(short)])
    # Then it does not keep them behind its long job (its process gives them back, and
    # with no process free and no prefetch they go back to the queue, in their order)
    wait_for(lambda: r.lrange(keys.processing("w1", "default"), 0, -1) == long_raw
             and r.llen(keys.queue("default")) == 5, what="the short jobs back in the queue")
    queued = [json.loads(x)["id"] for x in r.lrange(keys.queue("default"), 0, -1)]
    assert queued == short[::-1]    # the next to be taken is the first that came
    # and a second worker runs them all while the long job still runs on the first
    w2 = daemons("--concurrency", "1", name="w2", ledger=led).wait_started()
    wait_for(lambda: all(envelope(r, keys, s) for s in short), what="the short jobs")
    assert [envelope(r, keys, s)["worker"] for s in short] == ["w2"] * 5
    runs = [x.decode().split(":")[:2] for x in r.lrange(led, 0, -1)]
    assert [i for i, what in runs if i in short] == short     # in the order they came
    assert ["long", "end"] not in runs
    release.touch()
    wait_for(lambda: envelope(r, keys, "long"), what="the long job")
    assert envelope(r, keys, "long")["worker"] == "w1"
    for d in (w1, w2):
        d.signal(signal.SIGTERM)
        assert d.wait(60) == 0, d.log()
    # (the first worker did take some of them: it put them back itself)
    (stopped,) = [e for e in w1.events() if e.get("event") == "stopped"]
    assert stopped["requeued"] >= 1 and stopped["succeeded"] == 201, w1.log()


def test_sigterm_sent_to_every_process_of_the_worker_lets_running_jobs_finish(
        r, keys, daemons, tmp_path):
    # Given two jobs running on a worker (Heroku's dyno manager stops a dyno by sending
    # SIGTERM to every one of its processes, pool processes included, by pid)
    led = keys.ns + ":ledger"
    d = daemons("--concurrency", "2", "--grace", "60", ledger=led).wait_started()
    release = tmp_path / "release"
    lpush_jobs(r, keys, [{"task": "t.hold", "id": f"h{i}", "args": [str(release), i]}
                         for i in range(2)])
    wait_for(lambda: r.llen(led) >= 2, what="two jobs running")
    # When every process of the worker gets SIGTERM
    procs = _session(d.pid)
    assert d.pid in procs and set(d.children()) <= set(procs)
    for pid in procs:
        os.kill(pid, signal.SIGTERM)
    wait_for(lambda: any(e.get("event") == "draining" for e in d.events()), what="draining")
    # Then the jobs run on and finish within the grace; the worker exits 0
    release.touch()
    assert d.wait(60) == 0, d.log()
    for i in range(2):
        env = envelope(r, keys, f"h{i}")
        assert env is not None, d.log()   # (a process that died of it: the job runs again)
        assert env["status"] == "succeeded" and env["result"] == i and env["attempts"] == 1
    # none crashed, none ran twice, nothing was cut short
    assert sorted(x.decode().split(":")[0] for x in r.lrange(led, 0, -1)) == \
        ["h0", "h0", "h1", "h1"]  # each: one start, one end
    names = [e.get("event") for e in d.events()]
    assert not {"child_died", "job_crashed", "grace_expired", "stop_now"} & set(names), d.log()
    assert r.hlen(keys.crashes) == 0 and r.llen(keys.queue("default")) == 0


def _session(sid: int) -> list[int]:
    """Live processes of session ``sid`` (the daemon runs in its own: all of its processes,
    whatever process group they moved to)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] != "Z" and int(fields[3]) == sid:
                out.append(int(entry))
    return out


def test_a_task_modules_own_exception_is_named_by_module_and_qualified_name(
        redis_url, namespace, r, keys, daemons):
    from redpool import Client
    from redpool.errors import JobFailed
    from test_protocol import DEAD, ENVELOPE

    d = daemons("--concurrency", "1").wait_started()
    with Client(redis_url, namespace=namespace) as c:
        # Given a task raising a class of its module's own, retried once and dead-lettered
        own = c.enqueue("t.quota", 5, id="quota", max_retries=1, retry_backoff=0.05,
                        dead_letter=True)
        # and one raising a built-in
        builtin = c.enqueue("t.boom", "no", id="builtin")
        with pytest.raises(JobFailed) as failed:
            own.get(timeout=30)
        with pytest.raises(JobFailed) as plain:
            builtin.get(timeout=30)
    # Then every place that names the error says the same: module and qualified name
    qualified = "tests.taskmods.jobs.QuotaExceeded"
    assert failed.value.type == qualified and failed.value.message == "over the quota of 5"
    env = envelope(r, keys, "quota")
    ENVELOPE.validate(env)
    assert env["error"]["type"] == qualified and env["attempts"] == 2
    assert f"{qualified}: over the quota of 5" in env["error"]["traceback"]
    (dead,) = [json.loads(x) for x in r.lrange(keys.dead, 0, -1)]
    DEAD.validate(dead)
    assert dead["error_type"] == qualified
    assert dead["reason"] == f"failed after 2 attempt(s): {qualified}: over the quota of 5"
    finished = [e for e in d.events() if e.get("event") == "job_finished" and e["id"] == "quota"]
    assert [(e["status"], e["error_type"], e["error"]) for e in finished] == [
        ("retrying", qualified, "over the quota of 5"), ("failed", qualified, "over the quota of 5")]
    # while a built-in keeps its bare name
    assert plain.value.type == "ValueError" == envelope(r, keys, "builtin")["error"]["type"]


def test_at_debug_a_long_job_is_seen_starting(r, keys, daemons):
    led = keys.ns + ":ledger"
    d = daemons("--concurrency", "1", "--log-level", "debug", ledger=led).wait_started()
    lpush_jobs(r, keys, [{"task": "t.sleep", "id": "long", "args": [30]}])
    # While it runs, the log already says which job started, in which process
    started = wait_for(lambda: [e for e in d.events() if e.get("event") == "job_started"],
                       what="job_started")
    assert [(e["id"], e["task"], e["queue"], e["attempt"], e["level"]) for e in started] == [
        ("long", "t.sleep", "default", 1, "debug")]
    wait_for(lambda: r.llen(led), what="the task's own start")
    assert r.lrange(led, 0, -1)[0] == f"long:start:{started[0]['pid']}".encode()
    assert not [e for e in d.events() if e.get("event") == "job_finished"]


def test_below_debug_no_job_started_is_logged(r, keys, daemons):
    lpush_jobs(r, keys, [{"task": "t.add", "id": f"a{i}", "args": [i, i]} for i in range(3)])
    d = daemons("--concurrency", "1", "--burst")
    assert d.wait(60) == 0, d.log()
    events = [e.get("event") for e in d.events()]
    assert events.count("job_finished") == 3 and "job_started" not in events
