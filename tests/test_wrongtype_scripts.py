"""Keys of the wrong type, the Redis side (keytypes.py): another program writes a string
where redpool keeps a list (``SET redpool:queue:lo x``), or any other type into any of
redpool's keys.

What is checked, on a real server: each script that writes finds such a key before its
first write, so nothing is lost or doubled (a snapshot of every key of the namespace
before and after); it passes over what needs the key and reports it, or refuses as a
whole naming it; completions that need such a key are held back, their jobs left in
their processing lists, and written once it is fixed; the reaper, the lease, a waiter,
`redpool dead requeue` and a producer's push each say what is wrong.  The supervisor's
side, real daemons and `redpool status`: tests/test_wrongtype.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import redis

from helpers import ROOT, envelope
from redpool.client import Client
from redpool.errors import WrongType
from redpool.keytypes import classify, culprit
from redpool.lease import Lease, Reaper
from redpool.queue import Completion, RedisQueue


# -- helpers ----------------------------------------------------------------------------------

def snapshot(r, ns: str) -> dict:
    """Every key of the namespace with its type and content (order kept where it means
    something), to compare before and after a script."""
    out = {}
    for key in sorted(r.scan_iter(match=f"{ns}:*", count=1000)):
        t = r.type(key).decode()
        content = {"list": lambda k: r.lrange(k, 0, -1),
                   "zset": lambda k: r.zrange(k, 0, -1, withscores=True),
                   "hash": lambda k: sorted(r.hgetall(k).items()),
                   "set": lambda k: sorted(r.smembers(k)),
                   "string": r.get}[t](key)
        out[key.decode()] = (t, content)
    return out


def job(i: int, **extra) -> bytes:
    return json.dumps({"task": "t.add", "id": f"j{i}", "args": [i, 1], **extra}).encode()


def registered(r, keys, name: str = "w") -> Lease:
    lease = Lease(r, keys, name)
    lease.register({"host": "elsewhere", "pid": 1}, 30)
    return lease


def answer(q: str, raw: bytes, job_id: str, *, dead: bytes | None = None,
           retry: bytes | None = None) -> Completion:
    env = json.dumps({"v": 1, "id": job_id, "status": "failed" if dead else "succeeded"})
    return Completion(q, raw, job_id, 60, None, env.encode(), dead, retry, 0.0)


# -- the scripts: a key of the wrong type is found before any write -----------------------------

def test_reserve_passes_over_a_queue_of_the_wrong_type_and_moves_nothing_of_it(r, keys):
    # Given queue a holds jobs, queue b's list is a string, and queue c's jobs wait
    # behind a processing list of ours that another program overwrote
    lease = registered(r, keys)
    rq = RedisQueue(r, keys, "w", ["a", "b", "c"])
    r.lpush(keys.queue("a"), job(1), job(2))
    r.set(keys.queue("b"), "not a list")
    r.lpush(keys.queue("c"), job(3))
    r.hset(keys.processing("w", "c"), "x", "y")
    before = snapshot(r, keys.ns)

    # When a reserve asks for more than a holds
    got = rq.reserve(10, lease.epoch)

    # Then a's jobs are taken (oldest first), b and c are reported, and nothing of
    # theirs moved: the only change is a's jobs in our processing list
    assert [x.raw for x in got] == [job(1), job(2)]
    assert set(rq.unusable.bad) == {keys.queue("b"), keys.processing("w", "c")}
    assert rq.unusable.queues == {"b", "c"}
    after = snapshot(r, keys.ns)
    moved = {keys.queue("a"), keys.processing("w", "a")}
    assert {k: v for k, v in after.items() if k not in moved} == \
        {k: v for k, v in before.items() if k not in moved}
    assert r.lrange(keys.processing("w", "a"), 0, -1) == [job(2), job(1)]  # as before

    # And the next reserve leaves them alone (their keys are not given to the script)
    r.lpush(keys.queue("a"), job(4))
    assert [x.raw for x in rq.reserve(10, lease.epoch)] == [job(4)]


def test_reserve_with_a_lease_of_the_wrong_type_takes_nothing(r, keys):
    lease = registered(r, keys)
    rq = RedisQueue(r, keys, "w", ["a"])
    r.lpush(keys.queue("a"), job(1))
    r.delete(keys.supervisor("w"))
    r.set(keys.supervisor("w"), "x")
    before = snapshot(r, keys.ns)
    assert rq.reserve(10, lease.epoch) == []
    assert rq.unusable.paused and keys.supervisor("w") in rq.unusable
    assert snapshot(r, keys.ns) == before


def test_complete_holds_back_what_needs_a_key_of_the_wrong_type_and_writes_it_once_fixed(
        r, keys):
    # Given three finished jobs: one plain, one to dead-letter into a dead-letter list
    # that is a string, one to retry into a scheduled set that is a hash
    lease = registered(r, keys)
    rq = RedisQueue(r, keys, "w", ["a", "b"])
    r.lpush(keys.queue("a"), job(1), job(2))
    r.lpush(keys.queue("b"), job(3))
    rq.reserve(10, lease.epoch)
    r.set(keys.dead, "not a list")
    r.hset(keys.scheduled("b"), "x", "y")
    batch = [answer("a", job(1), "j1"), answer("a", job(2), "j2", dead=b'{"id":"j2"}'),
             answer("b", job(3), "j3", retry=job(3, attempt=2))]

    # When they are acknowledged together
    assert rq.complete(batch) == (0, 0)

    # Then the plain one is written; the two others are held back, untouched: their
    # jobs stay in our processing lists, nothing of theirs is written
    assert envelope(r, keys, "j1") and not envelope(r, keys, "j2") and not envelope(r, keys, "j3")
    assert r.lrange(keys.processing("w", "a"), 0, -1) == [job(2)]
    assert r.lrange(keys.processing("w", "b"), 0, -1) == [job(3)]
    assert (r.type(keys.dead), r.type(keys.scheduled("b"))) == (b"string", b"hash")
    assert sorted(rq.holding()) == [("a", job(2)), ("b", job(3))] and rq.unsent == 0
    # ... and stay held while the keys are wrong (a batch that needs them sends nothing)
    assert rq.complete([]) == (0, 0) and len(rq.holding()) == 2

    # When an operator fixes both keys and the supervisor sees it
    r.delete(keys.dead, keys.scheduled("b"))
    rq.unusable.clear(keys.dead)
    rq.unusable.clear(keys.scheduled("b"))
    assert rq.unsent == 2

    # Then the held completions go, once each
    assert rq.complete([]) == (0, 0)
    assert envelope(r, keys, "j2")["status"] == "failed" and envelope(r, keys, "j3")
    assert r.lrange(keys.dead, 0, -1) == [b'{"id":"j2"}']
    assert r.zrange(keys.scheduled("b"), 0, -1) == [job(3, attempt=2)]
    assert not r.exists(keys.processing("w", "a"), keys.processing("w", "b"))
    assert rq.holding() == [] and rq.unsent == 0
    assert rq.complete([]) == (0, 0)
    assert r.llen(keys.dead) == 1


def test_complete_holds_back_a_job_whose_processing_list_was_overwritten(r, keys):
    lease = registered(r, keys)
    rq = RedisQueue(r, keys, "w", ["a", "b"])
    r.lpush(keys.queue("a"), job(1))
    r.lpush(keys.queue("b"), job(2))
    rq.reserve(10, lease.epoch)
    r.set(keys.processing("w", "a"), "overwritten")
    assert rq.complete([answer("b", job(2), "j2"), answer("a", job(1), "j1")]) == (0, 0)
    assert envelope(r, keys, "j2") and not envelope(r, keys, "j1")
    assert rq.holding() == [("a", job(1))] and "a" in rq.unusable.queues
    assert r.get(keys.processing("w", "a")) == b"overwritten"


def test_promote_leaves_due_jobs_of_a_queue_of_the_wrong_type_where_they_are(r, keys):
    rq = RedisQueue(r, keys, "w", ["a", "b", "c"])
    for q, i in (("a", 1), ("b", 2)):
        r.zadd(keys.scheduled(q), {job(i): 1})   # long due
    r.set(keys.queue("b"), "not a list")
    r.set(keys.scheduled("c"), "not a zset")
    moved, _ = rq.promote()
    assert moved == 1 and r.lrange(keys.queue("a"), 0, -1) == [job(1)]
    assert r.zrange(keys.scheduled("b"), 0, -1) == [job(2)]
    assert set(rq.unusable.bad) == {keys.queue("b"), keys.scheduled("c")}
    before = snapshot(r, keys.ns)
    assert rq.promote() == (0, None) and snapshot(r, keys.ns) == before


def test_requeue_leaves_a_job_whose_queue_is_of_the_wrong_type_in_our_list(r, keys):
    lease = registered(r, keys)
    rq = RedisQueue(r, keys, "w", ["a", "b"])
    r.lpush(keys.queue("a"), job(1))
    r.lpush(keys.queue("b"), job(2))
    rq.reserve(10, lease.epoch)
    r.set(keys.queue("b"), "x")
    assert rq.requeue([("a", job(1)), ("b", job(2))]) == 1
    assert r.lrange(keys.queue("a"), 0, -1) == [job(1)]
    assert r.lrange(keys.processing("w", "b"), 0, -1) == [job(2)]
    assert keys.queue("b") in rq.unusable


def test_crashed_refuses_before_counting_when_the_queue_is_of_the_wrong_type(r, keys):
    lease = registered(r, keys)
    rq = RedisQueue(r, keys, "w", ["a"])
    r.lpush(keys.queue("a"), job(1))
    rq.reserve(1, lease.epoch)
    r.set(keys.queue("a"), "x")
    before = snapshot(r, keys.ns)
    with pytest.raises(redis.ResponseError) as e:
        rq.crashed("a", job(1))
    assert culprit(e.value) == (keys.queue("a"), "string") and classify(e.value) == "wrongtype"
    assert snapshot(r, keys.ns) == before   # not counted, not moved: the job is still ours


def test_recover_puts_back_what_it_can_and_leaves_the_rest(r, keys):
    # Given a run of ours died holding jobs of a and b, and b's list is now a string
    r.lpush(keys.processing("w", "a"), job(1))
    r.lpush(keys.processing("w", "b"), job(2))
    r.set(keys.queue("b"), "x")
    rq = RedisQueue(r, keys, "w", ["a", "b"])
    assert rq.recover(crashed=True) == {"a": 1}
    assert r.lrange(keys.queue("a"), 0, -1) == [job(1)]
    assert r.lrange(keys.processing("w", "b"), 0, -1) == [job(2)]
    crashes = r.hgetall(keys.crashes)   # counted for a's job only
    assert len([f for f in crashes if not f.endswith(b":started")]) == 1


def test_the_reaper_refuses_a_dead_supervisor_whose_lists_are_wrong_and_reaps_the_others(
        r, keys):
    # Given two dead supervisors; one left jobs of b, whose list is now a string
    for name, q, i in (("x", "a", 1), ("y", "b", 2)):
        registered(r, keys, name)
        r.lpush(keys.processing(name, q), job(i))
        r.delete(keys.supervisor(name))   # its lease expired
    r.set(keys.queue("b"), "x")
    found = []
    assert Reaper(r, keys, "w").run(wrongtype=lambda *kt: found.append(kt)) == {"x": 1}
    assert found == [(keys.queue("b"), "string")]
    assert r.lrange(keys.processing("y", "b"), 0, -1) == [job(2)]   # untouched
    assert r.smembers(keys.supervisors) == {b"y"}                  # not forgotten


def test_the_reaper_lock_of_the_wrong_type_is_said(r, keys):
    r.lpush(keys.reaper, "x")
    found = []
    assert Reaper(r, keys, "w").run(wrongtype=lambda *kt: found.append(kt)) == {}
    assert found == [(keys.reaper, "list")]


@pytest.mark.parametrize("broken", ["supervisors", "lease"])
def test_register_and_renew_refuse_before_writing(r, keys, broken):
    lease = registered(r, keys)
    key = keys.supervisors if broken == "supervisors" else keys.supervisor("w")
    r.delete(key)
    r.set(key, "x")
    before = snapshot(r, keys.ns)
    other = Lease(r, keys, "v" if broken == "supervisors" else "w")
    for call in (lambda: lease.renew({}, 30), lambda: other.register({}, 30)):
        with pytest.raises(redis.ResponseError) as e:
            call()
        assert culprit(e.value) == (key, "string")
    assert snapshot(r, keys.ns) == before


def test_dead_requeue_refuses_before_removing_an_entry(redis_url, r, keys):
    from test_dead import bury, redpool_dead

    bury(r, keys, job(1), id="j1")
    r.set(keys.queue("default"), "x")
    before = snapshot(r, keys.ns)
    res = redpool_dead(redis_url, keys.ns, "requeue", "--all")
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert f"{keys.queue('default')} holds a string" in res.stderr and "DEL it" in res.stderr
    assert snapshot(r, keys.ns) == before


def test_a_result_key_of_another_type_is_replaced_and_a_reply_to_of_another_type_skipped(r, keys):
    # Given a result key that holds a list, and a reply_to that is a string
    lease = registered(r, keys)
    rq = RedisQueue(r, keys, "w", ["a"])
    r.lpush(keys.queue("a"), job(1))
    rq.reserve(1, lease.epoch)
    r.rpush(keys.result("j1"), "someone's list")
    r.set("elsewhere:reply", "a string")
    c = answer("a", job(1), "j1")
    c.reply_to = "elsewhere:reply"
    # When the job is acknowledged: the result is written (SET replaces any type), the
    # reply skipped and counted (replies_skipped), the string left as it was
    assert rq.complete([c]) == (0, 1)
    assert envelope(r, keys, "j1")["id"] == "j1" and r.ttl(keys.result("j1")) > 0
    assert r.get("elsewhere:reply") == b"a string" and r.ttl("elsewhere:reply") == -1
    assert not r.exists(keys.processing("w", "a")) and not rq.unusable
    r.delete("elsewhere:reply")


def test_a_waiter_on_a_queue_of_the_wrong_type_reports_it_and_waits_for_it_to_be_fixed(
        redis_url, r, keys):
    from helpers import wait_for as wait
    from redpool.waiter import Waiter

    rq = RedisQueue(r, keys, "w", ["a"])
    r.set(keys.queue("a"), "x")
    w = Waiter(rq, lambda: redis.Redis.from_url(redis_url), timeout=0.2)
    w.start()
    w.arm()
    try:
        # BLMOVE answers WRONGTYPE (naming no key: the supervisor then asks every key)
        wait(lambda: w.errors, timeout=10, what="the waiter's error")
        e = w.errors[0]
        assert classify(e) == "wrongtype" and culprit(e) is None
        assert r.get(keys.queue("a")) == b"x" and not r.exists(keys.processing("w", "a"))
        rq.unusable.add(keys.queue("a"), "string")   # (what the supervisor's probe does)
        # fixed: it takes the next job
        r.delete(keys.queue("a"))
        rq.unusable.clear(keys.queue("a"))
        w.arm()
        r.lpush(keys.queue("a"), job(1))
        wait(lambda: w.inbox, timeout=10, what="the job, once fixed")
        assert w.inbox[0].raw == job(1)
    finally:
        w.stop()
        w.close()


# -- producers ----------------------------------------------------------------------------------

def test_enqueue_onto_a_queue_of_the_wrong_type_is_a_clear_error(redis_url, r, keys):
    r.set(keys.queue("lo"), "not a list")
    r.hset(keys.scheduled("lo"), "x", "y")
    with Client(redis_url, namespace=keys.ns) as client:
        with pytest.raises(WrongType) as e:
            client.enqueue("t.add", 1, 2, queue="lo", reply_to=False)
        assert str(e.value).startswith(f"{keys.queue('lo')} holds a string where redpool keeps "
                                       "a list (the queue's waiting jobs)")
        with pytest.raises(WrongType, match="holds a hash where redpool keeps a zset"):
            client.enqueue("t.add", 1, 2, queue="lo", reply_to=False, delay=5)
    env = {k: v for k, v in os.environ.items() if not k.startswith("REDPOOL_")}
    res = subprocess.run([sys.executable, "-m", "redpool", "enqueue", "t.add", "1", "2",
                          "--queue", "lo", "--redis-url", redis_url, "--namespace", keys.ns],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 1 and res.stdout == "" and "Traceback" not in res.stderr
    [line] = res.stderr.splitlines()
    assert f"{keys.queue('lo')} holds a string" in line and "DEL it, or RENAME it away" in line
    assert r.get(keys.queue("lo")) == b"not a list"


def test_reserve_refused_for_another_reason_than_a_type_says_so_rather_than_find_nothing(
        r, redis_url, keys):
    # Given a worker user that may not move jobs (an ACL rule; Redis out of memory refuses
    # the first write of the script in the same way): its queue holds a job
    import uuid

    import redis as redis_py
    lease = registered(r, keys)
    r.lpush(keys.queue("a"), job(1))
    user, password = f"nolmove-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    r.acl_setuser(user, enabled=True, passwords=[f"+{password}"], keys=["*"],
                  commands=["+@all", "-lmove"])
    limited = redis_py.Redis.from_url(redis_url, username=user, password=password)
    try:
        rq = RedisQueue(limited, keys, "w", ["a"])
        # Then the reserve raises Redis's refusal (the loop logs it once, as redis_error),
        # instead of answering "the queue is empty" while a job waits in it
        with pytest.raises(redis_py.ResponseError, match="NOPERM|no permissions"):
            rq.reserve(10, lease.epoch)
        assert r.lrange(keys.queue("a"), 0, -1) == [job(1)] and not rq.unusable
    finally:
        limited.close()
        r.acl_deluser(user)
