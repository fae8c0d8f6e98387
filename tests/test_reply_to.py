"""Where a worker answers: a job's reply_to, with the real daemon and a real server.

A producer names the list its answer goes to, and the worker gives that list a TTL.
These tests are about what a producer must not be able to do with that: make the
worker push onto another application's list or another namespace's queue (and set its
TTL, so that it later vanishes with what it held), or cut short another job's answer
on a shared reply list (docs/protocol.md, "reply_to"; src/redpool/replies.py).
"""

from __future__ import annotations

import json

import pytest

from helpers import envelope, lpush_jobs, wait_for
from redpool.protocol import Keys

pytestmark = pytest.mark.daemon


@pytest.fixture
def outside(r, namespace):
    """Names of keys outside the test's namespace, deleted afterwards."""
    made: list[str] = []

    def name(suffix: str) -> str:
        made.append(f"{namespace}-{suffix}")
        return made[-1]

    yield name
    if made:
        r.delete(*made)


def dead_reasons(r, keys) -> dict[str, str]:
    return {e["id"]: e["reason"] for e in map(json.loads, r.lrange(keys.dead, 0, -1))}


def test_a_reply_to_outside_the_allowed_keys_is_refused_and_the_list_left_alone(
        r, keys, namespace, daemons, outside):
    # Given another application's list, and another namespace's queue, holding work
    theirs = outside("otherapp:jobs")
    r.rpush(theirs, "their job")
    other_queue = Keys(f"{namespace}-other").queue("default")
    r.rpush(other_queue, '{"task":"t.add","args":[1,1]}')
    outside("other:queue:default")  # (that is its name: deleted afterwards)
    d = daemons("--concurrency", "1").wait_started()
    # When jobs name them as their reply_to
    lpush_jobs(r, keys, [{"task": "t.add", "id": "app", "args": [1, 2], "reply_to": theirs},
                         {"task": "t.add", "id": "queue", "args": [1, 2], "reply_to": other_queue},
                         {"task": "t.add", "id": "after", "args": [2, 2]}])
    wait_for(lambda: envelope(r, keys, "after"), what="the job after them")
    # Then neither ran; each is answered through its result key, with a reason that
    # names the key and what to do, and dead-lettered
    reasons = dead_reasons(r, keys)
    for job_id, key in (("app", theirs), ("queue", other_queue)):
        env = envelope(r, keys, job_id)
        assert env["status"] == "failed" and env["error"]["type"] == "InvalidJob", env
        assert env["started_at"] is None  # never ran: safe to send again, fixed
        message = env["error"]["message"]
        assert f"'reply_to' {key!r} is not a key this worker answers on" in message
        assert f"(allowed: {keys.reply('*')})" in message
        assert "start the workers with --reply-to '" in message
        assert reasons[job_id] == message
    # and the lists are as they were: nothing pushed, no TTL given
    assert r.lrange(theirs, 0, -1) == [b"their job"] and r.ttl(theirs) == -1
    assert r.lrange(other_queue, 0, -1) == [b'{"task":"t.add","args":[1,1]}']
    assert r.ttl(other_queue) == -1
    assert r.llen(keys.processing("w1", "default")) == 0
    assert not [e for e in d.events() if e.get("event") == "replies_skipped"]


def test_a_reply_to_an_operator_pattern_allows_is_answered(r, keys, namespace, daemons, outside):
    # Given a worker told to answer on the application's reply lists too
    allowed, elsewhere = outside("app:replies:7"), outside("app:other")
    d = daemons("--concurrency", "1", "--reply-to", f"{namespace}-app:replies:*").wait_started()
    lpush_jobs(r, keys, [{"task": "t.add", "id": "ok", "args": [1, 2], "reply_to": allowed,
                          "result_ttl": 600},
                         {"task": "t.add", "id": "no", "args": [1, 2], "reply_to": elsewhere}])
    # Then a job naming one of them is answered there, with the list's TTL
    wait_for(lambda: r.llen(allowed), what="the answer")
    env = json.loads(r.lindex(allowed, 0))
    assert env["id"] == "ok" and env["result"] == 3
    assert 0 < r.ttl(allowed) <= 600
    # and one naming another key of the application's is still refused, the pattern named
    wait_for(lambda: envelope(r, keys, "no"), what="the refusal")
    message = envelope(r, keys, "no")["error"]["message"]
    assert f"(allowed: {keys.reply('*')}, {namespace}-app:replies:*)" in message
    assert not r.exists(elsewhere)
    assert d.proc.poll() is None


def test_jobs_sharing_a_reply_list_cannot_cut_each_others_answers_short(r, keys, daemons):
    d = daemons("--concurrency", "1").wait_started()
    shared = keys.reply("shared")
    # Given a job answered on a shared reply list, to be kept for an hour
    lpush_jobs(r, keys, [{"task": "t.add", "id": "long", "args": [1, 2], "reply_to": shared,
                          "result_ttl": 3600}])
    wait_for(lambda: r.llen(shared) == 1, what="the first answer")
    # When another job on the same list asks for one second
    lpush_jobs(r, keys, [{"task": "t.add", "id": "short", "args": [2, 2], "reply_to": shared,
                          "result_ttl": 1}])
    wait_for(lambda: envelope(r, keys, "short") or r.llen(shared) != 1, what="the second answer")
    # Then the list keeps its hour (its TTL only grows), with both answers on it
    assert r.pttl(shared) > 3000_000
    assert sorted(json.loads(x)["id"] for x in r.lrange(shared, 0, -1)) == ["long", "short"]
    # and a job asking for longer lengthens it; result_ttl 0 counts as a day for the list
    lpush_jobs(r, keys, [{"task": "t.add", "id": "nokey", "args": [0, 0], "reply_to": shared,
                          "result_ttl": 0}])
    wait_for(lambda: r.llen(shared) == 3, what="the third answer")
    assert r.pttl(shared) > 86000_000
    assert d.proc.poll() is None
