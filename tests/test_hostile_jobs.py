"""Hostile jobs against real daemons: whatever a producer pushes, the supervisor never
exits and the pool process never dies; the job ends in one failed envelope with a
reason, and a dead-letter entry; a waiting producer with a usable reply_to gets its
answer; the job pushed after it still runs.  The corpus is tests/corpus.py."""

from __future__ import annotations

import base64
import itertools
import json
import os
import signal
import uuid

import pytest

from corpus import CASES, follow_up
from helpers import Daemon, envelope, wait_for
from redpool.protocol import Keys

pytestmark = pytest.mark.daemon

MODULES = ("tests.taskmods.jobs", "tests.taskmods.hostile_jobs")
# the corpus's reply lists (tests/corpus.py): an application's own, allowed by the operator
REPLIES = ("--reply-to", "hostile:*")
CRASHES = ("child_died", "job_crashed", "internal_error", "fatal")
_n = itertools.count(1)


@pytest.fixture(scope="module")
def worker(redis_url, tmp_path_factory):
    """One daemon for the whole corpus (one process: jobs run in the order pushed)."""
    import redis
    ns = f"t{uuid.uuid4().hex[:10]}"
    d = Daemon(redis_url, ns, "--concurrency", "1", *REPLIES, modules=MODULES)
    d.start(tmp_path_factory.mktemp("hostile")).wait_started()
    yield d, Keys(ns)
    d.kill()
    r = redis.Redis.from_url(redis_url)
    for pattern in (f"{ns}:*", "hostile:*"):
        keys = list(r.scan_iter(match=pattern, count=1000))
        if keys:
            r.delete(*keys)
    r.close()


def raw_of(entry: dict) -> bytes:
    return base64.b64decode(entry["job_b64"]) if "job_b64" in entry else entry["job"].encode()


def dead_entries(r, keys, raw: bytes) -> list[dict]:
    return [e for e in map(json.loads, r.lrange(keys.dead, 0, -1)) if raw_of(e) == raw]


def crashes(d: Daemon) -> list[dict]:
    return [e for e in d.events() if e.get("event") in CRASHES]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_a_hostile_job_is_answered_once_and_the_worker_carries_on(case, worker, r):
    d, keys = worker
    before = len(crashes(d))
    n = next(_n)
    # Given the hostile job, and a good one behind it
    r.lpush(keys.queue("default"), case.raw)
    r.lpush(keys.queue("default"), follow_up(n))
    # Then the good one runs (so the hostile one is done: one process, in order) ...
    wait_for(lambda: envelope(r, keys, f"after-{n}") or d.proc.poll() is not None,
             timeout=60, what="the job after it")
    assert d.proc.poll() is None, f"the supervisor exited:\n{d.log()[-4000:]}"
    assert envelope(r, keys, f"after-{n}")["result"] == n + 1
    # ... with no process dead on the way, and nothing the supervisor had to contain
    assert crashes(d)[before:] == []
    # and the hostile one is answered: once on its reply_to, under its result key
    answers = []
    if case.answered_on:
        answers += [json.loads(x) for x in r.lrange(case.answered_on, 0, -1)]
        assert len(answers) == 1, answers
    if case.result_id:
        answers.append(envelope(r, keys, case.result_id))
    for env in answers:
        assert (env["status"], env["error"]["type"]) == ("failed", case.error_type)
        assert case.reason in env["error"]["message"]
        assert (env["attempts"], env["started_at"]) == (1, None)  # refused, never ran
    # and dead-lettered, once, with the same reason
    (entry,) = dead_entries(r, keys, case.raw)
    assert case.reason in entry["reason"] and entry["id"] == case.result_id


def test_a_retry_carries_an_unpaired_surrogate_to_the_next_attempt(worker, r):
    d, keys = worker
    r.lpush(keys.queue("default"), b'{"task":"h.codepoints","id":"cp-1","args":["a\\ud800"]}')
    env = wait_for(lambda: envelope(r, keys, "cp-1"), timeout=60, what="its result")
    assert (env["status"], env["result"], env["attempts"]) == ("succeeded", [97, 0xD800], 2)


def test_an_answer_the_supervisor_cannot_send_fails_only_its_job(r, keys, daemons):
    # Given a child that answers h.forged jobs with a reply_to no Redis key can be
    d = daemons("--concurrency", "1", *REPLIES, modules=MODULES).wait_started()
    raw = b'{"task":"h.forged","id":"forged-1","reply_to":"hostile:forged-r1"}'
    r.lpush(keys.queue("default"), raw)
    r.lpush(keys.queue("default"), follow_up(1))
    # Then the job after it runs, the supervisor lives, and says once what it contained
    wait_for(lambda: envelope(r, keys, "after-1") or d.proc.poll() is not None, timeout=60,
             what="the job after it")
    assert d.proc.poll() is None, f"the supervisor exited:\n{d.log()[-4000:]}"
    (event,) = [e for e in d.events() if e["event"] == "internal_error"]
    assert (event["id"], event["level"]) == ("forged-1", "error")
    # and the forged job is failed, answered on its own reply_to, and dead-lettered
    (reply,) = [json.loads(x) for x in r.lrange("hostile:forged-r1", 0, -1)]
    assert reply == envelope(r, keys, "forged-1")
    assert reply["error"]["type"] == "InvalidJob"
    assert "could not handle this job's outcome" in reply["error"]["message"]
    (entry,) = dead_entries(r, keys, raw)
    assert entry["reason"] == reply["error"]["message"]
    r.delete("hostile:forged-r1")


def test_one_hostile_job_cannot_stop_two_supervisors(r, keys, daemons):
    # Given supervisor A holding a hostile job (reserved behind a long one), killed -9
    a = daemons("--concurrency", "1", "--lease", "2", *REPLIES, name="host-a", modules=MODULES)
    a.wait_started()
    bad = b'{"task":"t.add\\ud800","id":"bad-1","reply_to":"hostile:two","args":[1,2]}'
    r.lpush(keys.queue("default"), json.dumps({"task": "t.sleep", "id": "hold", "args": [2]}))
    r.lpush(keys.queue("default"), bad)
    wait_for(lambda: bad in r.lrange(keys.processing("host-a", "default"), 0, -1),
             what="A holding the hostile job")
    os.killpg(a.pid, signal.SIGKILL)
    a.wait(10)
    # When B reaps A's jobs and runs them, and A comes back under its name
    b = daemons("--concurrency", "2", "--lease", "2", *REPLIES, name="host-b", modules=MODULES)
    b.wait_started()
    env = wait_for(lambda: envelope(r, keys, "bad-1"), timeout=60, what="the hostile job's answer")
    a2 = daemons("--concurrency", "1", "--lease", "2", *REPLIES, name="host-a", modules=MODULES)
    a2.wait_started()
    wait_for(lambda: envelope(r, keys, "hold"), timeout=60, what="the long job's result")
    r.lpush(keys.queue("default"), follow_up(2), follow_up(3))
    wait_for(lambda: envelope(r, keys, "after-2") and envelope(r, keys, "after-3"),
             timeout=60, what="the jobs after it")
    # Then both live, the hostile job is answered once (it did reach a process: the
    # reap counts as a crash) and dead-lettered once
    assert b.proc.poll() is None and a2.proc.poll() is None, b.log()[-3000:] + a2.log()[-3000:]
    assert not [e for d in (b, a2) for e in crashes(d)]
    assert env["error"]["type"] == "InvalidJob" and "'task' is not valid Unicode" in \
        env["error"]["message"]
    assert [json.loads(x) for x in r.lrange("hostile:two", 0, -1)] == [env]
    assert len(dead_entries(r, keys, bad)) == 1
    r.delete("hostile:two")
