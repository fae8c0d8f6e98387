"""The Redis contract of RedisQueue, run against fakeredis and a real server.

One class, two backends: fakeredis (with Lua through lupa) for speed and for machines
without a server, and the session's private valkey-server for the truth.  A test that
passes on one and fails on the other is a finding about one of them, not noise.

Every test speaks of lists and keys only through protocol.Keys, as the code does.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Callable

import fakeredis
import pytest
import redis

from redpool import protocol as p
from redpool.errors import NameInUse
from redpool.queue import REPLY_TTL_WHEN_NO_RESULT, Completion, RedisQueue, connect

SUP = "sup-1"


@dataclass
class Backend:
    name: str
    r: redis.Redis
    keys: p.Keys
    connect: Callable[[], redis.Redis]   # a second connection (for blocking calls)


@pytest.fixture(params=["fakeredis", "real"])
def backend(request):
    if request.param == "fakeredis":
        server = fakeredis.FakeServer()
        client = fakeredis.FakeRedis(server=server)
        yield Backend("fakeredis", client, p.Keys(f"t{uuid.uuid4().hex[:10]}"),
                      lambda: fakeredis.FakeRedis(server=server))
        client.close()
    else:
        url = request.getfixturevalue("redis_url")
        yield Backend("real", request.getfixturevalue("r"),
                      p.Keys(request.getfixturevalue("namespace")),
                      lambda: connect(url, blocking_timeout=10.0))


# -- helpers ----------------------------------------------------------------------------------

def job(n: int, **kw) -> bytes:
    return p.encode_job(p.make_job("tests.work", [n], id=f"job-{n}", now=1700000000.0 + n, **kw))


def push(b: Backend, queue: str, *raws: bytes) -> None:
    """As a producer does: LPUSH, one at a time, oldest first."""
    for raw in raws:
        b.r.lpush(b.keys.queue(queue), raw)


def lrange(b: Backend, key: str) -> list[bytes]:
    return b.r.lrange(key, 0, -1)


def lists_holding(b: Backend, raw: bytes) -> list[str]:
    """Every list key in the namespace that holds ``raw``, once per occurrence."""
    out = []
    for key in b.r.scan_iter(match=f"{b.keys.ns}:*", count=1000):
        if b.r.type(key) == b"list":
            out += [key.decode()] * lrange(b, key).count(raw)
    return out


def completion(q: str, raw: bytes, *, ttl: int = 100, reply_to: str | None = None,
               result_id: str | None = "auto", dead: bytes | None = None,
               envelope: bytes | None = b"auto") -> Completion:
    job_id = p.loads(raw)["id"]
    if result_id == "auto":
        result_id = job_id if ttl > 0 else None
    if envelope == b"auto":
        envelope = p.dumps(p.envelope(id=job_id, task="tests.work", queue=q, status=p.SUCCEEDED,
                                      worker=SUP, result=job_id.upper(), finished_at=1.0))
    return Completion(q, raw, result_id, ttl, reply_to, envelope, dead)


def dead_pid() -> int:
    """A pid that belonged to a process of ours that has exited and been reaped."""
    for _ in range(10):
        proc = subprocess.Popen([sys.executable, "-c", "pass"])
        proc.wait()
        try:
            os.kill(proc.pid, 0)
        except ProcessLookupError:
            return proc.pid
    pytest.fail("could not find a dead pid (every reaped pid was reused at once)")


def wait_until(cond: Callable[[], bool], timeout: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.005)


# -- the contract -----------------------------------------------------------------------------

class TestRedisQueueContract:

    # reserve ---------------------------------------------------------------------------------

    def test_reserve_takes_the_oldest_job_first(self, backend):
        b = backend
        push(b, "a", job(1), job(2), job(3))
        q = RedisQueue(b.r, b.keys, SUP, ["a"])

        got = q.reserve(3)

        assert got == [("a", job(1)), ("a", job(2)), ("a", job(3))]

    def test_reserve_respects_n(self, backend):
        b = backend
        push(b, "a", *(job(i) for i in range(5)))
        q = RedisQueue(b.r, b.keys, SUP, ["a"])

        assert q.reserve(2) == [("a", job(0)), ("a", job(1))]
        assert q.reserve(0) == []
        assert q.reserve(-3) == []
        assert lrange(b, b.keys.queue("a")) == [job(4), job(3), job(2)]
        assert q.reserve(10) == [("a", job(2)), ("a", job(3)), ("a", job(4))]
        assert q.reserve(10) == []

    def test_reserve_empties_queues_in_the_given_priority_order(self, backend):
        b = backend
        # Given the priority order is the list order, not alphabetical
        push(b, "low", job(1), job(2))
        push(b, "mid", job(3))
        push(b, "high", job(4), job(5))
        q = RedisQueue(b.r, b.keys, SUP, ["high", "mid", "low"])

        # When fewer jobs are asked for than there are
        first = q.reserve(3)
        # Then the highest queue is emptied before the next one is touched
        assert first == [("high", job(4)), ("high", job(5)), ("mid", job(3))]
        assert q.reserve(10) == [("low", job(1)), ("low", job(2))]

    def test_reserve_prefers_a_higher_queue_even_for_older_jobs_below(self, backend):
        b = backend
        push(b, "low", job(1))
        q = RedisQueue(b.r, b.keys, SUP, ["high", "low"])
        assert q.reserve(1) == [("low", job(1))]
        push(b, "low", job(2))
        push(b, "high", job(3))
        assert q.reserve(1) == [("high", job(3))]

    def test_reserve_moves_each_job_into_its_queues_processing_list(self, backend):
        b = backend
        push(b, "a", job(1), job(2))
        push(b, "b", job(3))
        q = RedisQueue(b.r, b.keys, SUP, ["a", "b"])

        q.reserve(3)

        assert lrange(b, b.keys.queue("a")) == []
        assert lrange(b, b.keys.queue("b")) == []
        # newest at the left, like the queue itself
        assert lrange(b, b.keys.processing(SUP, "a")) == [job(2), job(1)]
        assert lrange(b, b.keys.processing(SUP, "b")) == [job(3)]
        for n, queue in ((1, "a"), (2, "a"), (3, "b")):
            assert lists_holding(b, job(n)) == [b.keys.processing(SUP, queue)]

    def test_a_job_is_always_in_exactly_one_list(self, backend):
        b = backend
        raws = [job(i) for i in range(8)]
        push(b, "a", *raws[:4])
        push(b, "b", *raws[4:])
        q = RedisQueue(b.r, b.keys, SUP, ["a", "b"])

        for step in (q.reserve(3), q.reserve(2)):
            assert step
            for raw in raws:
                assert len(lists_holding(b, raw)) == 1, raw

    def test_reserve_does_not_touch_other_supervisors_or_queues(self, backend):
        b = backend
        push(b, "a", job(1))
        push(b, "other", job(2))
        mine = RedisQueue(b.r, b.keys, SUP, ["a"])
        theirs = RedisQueue(b.r, b.keys, "sup-2", ["a"])
        assert theirs.reserve(5) == [("a", job(1))]
        assert mine.reserve(5) == []
        assert lrange(b, b.keys.queue("other")) == [job(2)]
        assert lrange(b, b.keys.processing("sup-2", "a")) == [job(1)]

    # block_reserve ---------------------------------------------------------------------------

    def test_block_reserve_times_out_with_none(self, backend):
        b = backend
        q = RedisQueue(b.r, b.keys, SUP, ["a"])
        assert q.block_reserve(b.connect(), "a", 0.05) is None

    def test_block_reserve_returns_a_job_pushed_while_it_waits(self, backend):
        b = backend
        if b.name == "fakeredis":
            pytest.skip("fakeredis's BLMOVE does not block: on an empty list it returns None "
                        "at once (checked with fakeredis 2.40)")
        q = RedisQueue(b.r, b.keys, SUP, ["a", "b"])
        conn = b.connect()
        my_id = conn.client_id()
        out: dict = {}
        t = threading.Thread(target=lambda: out.update(raw=q.block_reserve(conn, "b", 10.0)))

        # Given a connection blocked in BLMOVE on queue b
        t.start()

        def blocked() -> bool:
            return any(int(c["id"]) == my_id and "b" in c["flags"] for c in b.r.client_list())
        wait_until(blocked, what="the waiter to block in Redis")
        # When a producer pushes a job
        push(b, "b", job(7))
        t.join(10)

        # Then the waiter got it, and it moved atomically into our processing list
        assert not t.is_alive()
        assert out["raw"] == job(7)
        assert lrange(b, b.keys.queue("b")) == []
        assert lists_holding(b, job(7)) == [b.keys.processing(SUP, "b")]
        conn.close()

    # complete --------------------------------------------------------------------------------

    def test_complete_writes_result_and_reply_with_the_ttl(self, backend):
        b = backend
        push(b, "a", job(1))
        q = RedisQueue(b.r, b.keys, SUP, ["a"])
        q.reserve(1)
        c = completion("a", job(1), ttl=100, reply_to=b.keys.reply("client-1"))

        assert q.complete([c]) == (0, 0)

        assert b.r.get(b.keys.result("job-1")) == c.envelope
        assert 90 <= b.r.ttl(b.keys.result("job-1")) <= 100
        assert lrange(b, b.keys.reply("client-1")) == [c.envelope]
        assert 90 <= b.r.ttl(b.keys.reply("client-1")) <= 100
        assert lrange(b, b.keys.processing(SUP, "a")) == []
        assert b.r.llen(b.keys.dead) == 0

    def test_complete_accepts_the_largest_result_ttl(self, backend):
        b = backend
        push(b, "a", job(1))
        q = RedisQueue(b.r, b.keys, SUP, ["a"])
        q.reserve(1)
        reply = b.keys.reply("long")

        assert q.complete([completion("a", job(1), ttl=p.MAX_RESULT_TTL, reply_to=reply)]) == (0, 0)

        assert p.MAX_RESULT_TTL - 10 <= b.r.ttl(b.keys.result("job-1")) <= p.MAX_RESULT_TTL
        assert p.MAX_RESULT_TTL - 10 <= b.r.ttl(reply) <= p.MAX_RESULT_TTL

    def test_complete_with_ttl_0_writes_no_result_key_and_keeps_the_reply(self, backend):
        b = backend
        push(b, "a", job(1), job(2))
        q = RedisQueue(b.r, b.keys, SUP, ["a"])
        q.reserve(2)
        reply = b.keys.reply("c-ttl0")
        # One as the worker builds it (no result id), one with an id anyway: neither
        # may leave a result key behind that would never expire.
        c1 = completion("a", job(1), ttl=0, reply_to=reply)
        c2 = completion("a", job(2), ttl=0, reply_to=reply, result_id="job-2")
        assert c1.result_id is None

        assert q.complete([c1, c2]) == (0, 0)

        assert b.r.exists(b.keys.result("job-1"), b.keys.result("job-2")) == 0
        assert lrange(b, reply) == [c2.envelope, c1.envelope]
        assert REPLY_TTL_WHEN_NO_RESULT - 10 <= b.r.ttl(reply) <= REPLY_TTL_WHEN_NO_RESULT
        assert lrange(b, b.keys.processing(SUP, "a")) == []

    def test_complete_without_envelope_writes_nothing_but_removes_the_job(self, backend):
        b = backend
        push(b, "a", job(1))
        q = RedisQueue(b.r, b.keys, SUP, ["a"])
        q.reserve(1)
        c = completion("a", job(1), reply_to=b.keys.reply("c"), envelope=None)

        assert q.complete([c]) == (0, 0)

        assert b.r.exists(b.keys.result("job-1"), b.keys.reply("c")) == 0
        assert lists_holding(b, job(1)) == []

    def test_complete_writes_dead_entries_and_trims_the_dead_list(self, backend):
        b = backend
        raws = [job(i) for i in range(5)]
        push(b, "a", *raws)
        q = RedisQueue(b.r, b.keys, SUP, ["a"], dead_max=3)
        q.reserve(5)
        deads = [p.dumps({"n": i}) for i in range(5)]

        assert q.complete([completion("a", raw, dead=d) for raw, d in zip(raws, deads)]) == (0, 0)

        # the newest three survive, newest first
        assert lrange(b, b.keys.dead) == [deads[4], deads[3], deads[2]]
        assert b.r.ttl(b.keys.dead) == -1  # the dead list never expires
        # and results were still written for jobs that have a dead entry
        assert b.r.get(b.keys.result("job-0")) is not None

    def test_dead_list_trim_applies_across_calls(self, backend):
        b = backend
        raws = [job(i) for i in range(4)]
        push(b, "a", *raws)
        q = RedisQueue(b.r, b.keys, SUP, ["a"], dead_max=2)
        q.reserve(4)
        for i, raw in enumerate(raws):
            q.complete([completion("a", raw, dead=p.dumps({"n": i}))])
        assert [p.loads(x)["n"] for x in lrange(b, b.keys.dead)] == [3, 2]

    def test_complete_fences_jobs_no_longer_ours(self, backend):
        b = backend
        push(b, "a", job(1), job(2))
        q = RedisQueue(b.r, b.keys, SUP, ["a"])
        q.reserve(2)
        # Given a reaper took job 2 back to its queue (our lease had expired)
        assert b.r.lrem(b.keys.processing(SUP, "a"), 1, job(2)) == 1
        b.r.rpush(b.keys.queue("a"), job(2))
        reply = b.keys.reply("fenced")

        # When we acknowledge both
        missing = q.complete([completion("a", job(1), reply_to=reply),
                              completion("a", job(2), reply_to=reply, dead=b'{"x":1}')])

        # Then only ours is written; the other is counted and left alone
        assert missing == (1, 0)
        assert b.r.exists(b.keys.result("job-1")) == 1
        assert b.r.exists(b.keys.result("job-2")) == 0
        assert [p.loads(e)["id"] for e in lrange(b, reply)] == ["job-1"]
        assert b.r.llen(b.keys.dead) == 0
        assert lrange(b, b.keys.queue("a")) == [job(2)]
        assert lrange(b, b.keys.processing(SUP, "a")) == []

    def test_completing_twice_writes_once(self, backend):
        b = backend
        push(b, "a", job(1))
        q = RedisQueue(b.r, b.keys, SUP, ["a"])
        q.reserve(1)
        reply = b.keys.reply("twice")
        assert q.complete([completion("a", job(1), reply_to=reply)]) == (0, 0)
        assert q.complete([completion("a", job(1), reply_to=reply)]) == (1, 0)
        assert b.r.llen(reply) == 1

    def test_complete_of_an_empty_batch_is_a_no_op(self, backend):
        b = backend
        q = RedisQueue(b.r, b.keys, SUP, ["a"])
        assert q.complete([]) == (0, 0)
        assert q.complete(iter(())) == (0, 0)

    def test_a_large_batch_is_acknowledged_in_one_script_call(self, backend):
        b = backend
        n = 300
        raws = [job(i) for i in range(n)]
        push(b, "a", *raws[: n // 2])
        push(b, "b", *raws[n // 2:])
        q = RedisQueue(b.r, b.keys, SUP, ["a", "b"])
        taken = q.reserve(n)
        assert len(taken) == n
        calls = []
        script = q._complete
        q._complete = lambda **kw: calls.append(kw) or script(**kw)
        reply = b.keys.reply("batch")

        missing = q.complete(completion(queue, raw, reply_to=reply) for queue, raw in taken)

        assert missing == (0, 0)
        assert len(calls) == 1
        assert b.r.llen(reply) == n
        assert b.r.exists(*(b.keys.result(f"job-{i}") for i in range(n))) == n
        assert b.r.llen(b.keys.processing(SUP, "a")) == 0
        assert b.r.llen(b.keys.processing(SUP, "b")) == 0

    def test_complete_of_a_job_from_a_queue_no_longer_listened_on(self, backend):
        b = backend
        push(b, "old", job(1))
        RedisQueue(b.r, b.keys, SUP, ["old"]).reserve(1)
        q = RedisQueue(b.r, b.keys, SUP, ["new"])
        assert q.complete([completion("old", job(1))]) == (0, 0)
        assert lists_holding(b, job(1)) == []

    def test_a_reply_to_that_is_not_a_list_does_not_poison_the_batch(self, backend):
        b = backend
        push(b, "a", job(1), job(2), job(3))
        q = RedisQueue(b.r, b.keys, SUP, ["a"])
        q.reserve(3)
        reply, not_a_list = b.keys.reply("ok"), b.keys.reply("a-string")
        b.r.set(not_a_list, "someone else's value")

        result = q.complete([completion("a", job(1), reply_to=reply),
                             completion("a", job(2), reply_to=not_a_list, dead=b'{"d":2}'),
                             completion("a", job(3), reply_to=reply)])

        assert result == (0, 1)  # nothing missing, one reply skipped
        assert lrange(b, b.keys.processing(SUP, "a")) == []
        assert b.r.exists(*(b.keys.result(f"job-{i}") for i in (1, 2, 3))) == 3
        assert [p.loads(e)["id"] for e in lrange(b, reply)] == ["job-3", "job-1"]
        assert lrange(b, b.keys.dead) == [b'{"d":2}']
        assert b.r.get(not_a_list) == b"someone else's value"

    def test_a_reply_to_naming_one_of_our_own_keys_is_never_written(self, backend):
        # Given a job whose reply_to is a queue (LPUSH + EXPIRE would corrupt the queue)
        b = backend
        push(b, "a", job(1))
        push(b, "other", b"queued")
        q = RedisQueue(b.r, b.keys, SUP, ["a"])
        q.reserve(1)
        result = q.complete([completion("a", job(1), reply_to=b.keys.queue("other"))])
        # Then the reply is skipped, the queue untouched and without a TTL
        assert result == (0, 1)
        assert lrange(b, b.keys.queue("other")) == [b"queued"]
        assert b.r.ttl(b.keys.queue("other")) == -1
        assert b.r.exists(b.keys.result("job-1")) == 1

    # requeue ---------------------------------------------------------------------------------

    def test_requeue_puts_jobs_back_at_the_head_in_their_order(self, backend):
        b = backend
        push(b, "a", *(job(i) for i in range(1, 6)))
        q = RedisQueue(b.r, b.keys, SUP, ["a"])
        taken = q.reserve(3)
        assert [raw for _, raw in taken] == [job(1), job(2), job(3)]

        assert q.requeue(taken) == 3

        assert lrange(b, b.keys.processing(SUP, "a")) == []
        # the oldest is taken first next time, before the jobs that never left
        assert [raw for _, raw in q.reserve(5)] == [job(i) for i in range(1, 6)]

    def test_requeue_across_queues(self, backend):
        b = backend
        push(b, "a", job(1), job(2))
        push(b, "b", job(3), job(4))
        q = RedisQueue(b.r, b.keys, SUP, ["a", "b"])
        taken = q.reserve(3)   # 1, 2 from a; 3 from b

        assert q.requeue(taken) == 3

        assert lrange(b, b.keys.queue("a")) == [job(2), job(1)]
        assert lrange(b, b.keys.queue("b")) == [job(4), job(3)]
        assert q.reserve(4) == [("a", job(1)), ("a", job(2)), ("b", job(3)), ("b", job(4))]

    def test_requeue_skips_jobs_no_longer_in_processing(self, backend):
        b = backend
        push(b, "a", job(1), job(2), job(3))
        q = RedisQueue(b.r, b.keys, SUP, ["a"])
        taken = q.reserve(3)
        q.complete([completion("a", job(2))])

        assert q.requeue(taken) == 2

        assert lrange(b, b.keys.queue("a")) == [job(3), job(1)]
        assert lists_holding(b, job(2)) == []
        assert q.requeue([]) == 0

    # recover ---------------------------------------------------------------------------------

    def test_recover_returns_every_processing_list_to_its_queue_head(self, backend):
        b = backend
        # Given a previous run listened on "old" and "a", and was killed holding jobs
        push(b, "old", job(1), job(2))
        push(b, "a", job(3), job(4), job(5))
        RedisQueue(b.r, b.keys, SUP, ["old", "a"]).reserve(4)
        push(b, "a", job(6))

        # When the restarted supervisor listens on "a" only
        q = RedisQueue(b.r, b.keys, SUP, ["a"])
        moved = q.recover()

        # Then everything it held is back at the head of its queue, in order
        assert moved == {"old": 2, "a": 2}
        assert q.in_processing() == 0
        assert lrange(b, b.keys.processing(SUP, "old")) == []
        assert lrange(b, b.keys.queue("old")) == [job(2), job(1)]
        assert [raw for _, raw in q.reserve(10)] == [job(3), job(4), job(5), job(6)]
        assert q.recover() == {"a": 4}

    def test_recover_leaves_other_supervisors_alone(self, backend):
        b = backend
        push(b, "a", *(job(i) for i in range(6)))
        # names that share a prefix with ours must not match our pattern
        for name in ("sup-1x", "sup-10", "sup-"):
            RedisQueue(b.r, b.keys, name, ["a"]).reserve(1)
        mine = RedisQueue(b.r, b.keys, SUP, ["a"])
        mine.reserve(2)

        assert mine.recover() == {"a": 2}

        for name in ("sup-1x", "sup-10", "sup-"):
            assert b.r.llen(b.keys.processing(name, "a")) == 1
        assert b.r.llen(b.keys.queue("a")) == 3

    def test_recover_escapes_a_namespace_that_looks_like_a_glob(self, backend):
        b = backend
        globby = p.Keys(f"{b.keys.ns}:a?")
        plain = p.Keys(f"{b.keys.ns}:ab")   # matched by an unescaped "…:a?" pattern
        push(Backend(b.name, b.r, globby, b.connect), "q", job(1))
        push(Backend(b.name, b.r, plain, b.connect), "q", job(2))
        RedisQueue(b.r, plain, SUP, ["q"]).reserve(1)
        RedisQueue(b.r, globby, SUP, ["q"]).reserve(1)

        assert RedisQueue(b.r, globby, SUP, []).recover() == {"q": 1}

        assert lrange(b, plain.processing(SUP, "q")) == [job(2)]
        assert lrange(b, globby.queue("q")) == [job(1)]

    def test_recover_with_nothing_to_do(self, backend):
        b = backend
        q = RedisQueue(b.r, b.keys, SUP, ["a", "b"])
        assert q.recover() == {}
        assert q.in_processing() == 0

    # register / heartbeat / unregister -------------------------------------------------------

    def info(self, pid: int | None = None, host: str | None = None) -> dict:
        return {"name": SUP, "host": host or socket.gethostname(),
                "pid": os.getpid() if pid is None else pid, "version": "test"}

    def test_register_claims_the_name_with_a_lease(self, backend):
        b = backend
        q = RedisQueue(b.r, b.keys, SUP, ["a"])

        q.register(self.info(), lease=15.0)

        assert json.loads(b.r.get(b.keys.supervisor(SUP)))["pid"] == os.getpid()
        assert 14_000 <= b.r.pttl(b.keys.supervisor(SUP)) <= 15_000
        assert b.r.smembers(b.keys.supervisors) == {SUP.encode()}

    def test_register_refuses_a_live_holder_on_another_host(self, backend):
        b = backend
        theirs = json.dumps(self.info(pid=1, host="another-host.example"))
        b.r.set(b.keys.supervisor(SUP), theirs, px=15_000)
        q = RedisQueue(b.r, b.keys, SUP, ["a"])

        with pytest.raises(NameInUse, match="another-host.example") as e:
            q.register(self.info(), lease=15.0)

        assert "--name" in str(e.value)
        assert b.r.get(b.keys.supervisor(SUP)).decode() == theirs

    def test_register_refuses_a_live_process_on_this_host(self, backend):
        b = backend
        other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        try:
            theirs = json.dumps(self.info(pid=other.pid))
            b.r.set(b.keys.supervisor(SUP), theirs, px=15_000)
            q = RedisQueue(b.r, b.keys, SUP, ["a"])

            with pytest.raises(NameInUse, match=str(other.pid)):
                q.register(self.info(), lease=15.0)

            assert b.r.get(b.keys.supervisor(SUP)).decode() == theirs
        finally:
            other.kill()
            other.wait()

    def test_register_takes_over_a_dead_process_heartbeat_on_this_host(self, backend):
        b = backend
        # Given a heartbeat left by a supervisor on this host that was kill -9'd
        gone = dead_pid()
        b.r.set(b.keys.supervisor(SUP), json.dumps(self.info(pid=gone)), px=15_000)
        q = RedisQueue(b.r, b.keys, SUP, ["a"])

        # When we start under the same name within its lease
        q.register(self.info(), lease=5.0)

        # Then the name is ours, with our lease
        assert json.loads(b.r.get(b.keys.supervisor(SUP)))["pid"] == os.getpid()
        assert 4_000 <= b.r.pttl(b.keys.supervisor(SUP)) <= 5_000
        assert b.r.sismember(b.keys.supervisors, SUP)

    def test_register_waits_out_a_heartbeat_with_our_own_pid_then_takes_it(self, backend):
        # Given a heartbeat with our pid on this host (a restarted container is pid 1
        # again) that nobody renews
        b = backend
        b.r.set(b.keys.supervisor(SUP), json.dumps(self.info()), px=400)
        q = RedisQueue(b.r, b.keys, SUP, ["a"])
        # When we register, we wait for it to expire, then the name is ours
        q.register(self.info(), lease=2.0)
        assert 1_000 <= b.r.pttl(b.keys.supervisor(SUP)) <= 2_000

    def test_register_refuses_a_renewed_heartbeat_with_our_own_pid(self, backend):
        # Given a twin (same host name, same pid in its own pid namespace) that renews
        b = backend
        key = b.keys.supervisor(SUP)
        b.r.set(key, json.dumps(self.info()), px=1_000)
        q = RedisQueue(b.r, b.keys, SUP, ["a"])

        def renewing_sleep(seconds):
            b.r.pexpire(key, 1_000)
            time.sleep(0.05)

        with pytest.raises(NameInUse):
            q.register(self.info(), lease=1.0, sleep=renewing_sleep)

    def test_register_refuses_an_unreadable_live_heartbeat(self, backend):
        b = backend
        b.r.set(b.keys.supervisor(SUP), b"not json", px=15_000)
        q = RedisQueue(b.r, b.keys, SUP, ["a"])
        # no host, no pid: we cannot tell it is dead, so we must not take it
        with pytest.raises(NameInUse):
            q.register(self.info(), lease=15.0)

    def test_heartbeat_renews_the_lease_and_set_membership(self, backend):
        b = backend
        q = RedisQueue(b.r, b.keys, SUP, ["a"])
        q.register(self.info(), lease=2.0)
        b.r.srem(b.keys.supervisors, SUP)

        q.heartbeat({**self.info(), "inflight": 3}, lease=30.0)

        assert json.loads(b.r.get(b.keys.supervisor(SUP)))["inflight"] == 3
        assert 29_000 <= b.r.pttl(b.keys.supervisor(SUP)) <= 30_000
        assert b.r.sismember(b.keys.supervisors, SUP)

    def test_unregister_removes_the_heartbeat_and_membership(self, backend):
        b = backend
        q = RedisQueue(b.r, b.keys, SUP, ["a"])
        other = RedisQueue(b.r, b.keys, "sup-2", ["a"])
        q.register(self.info(), lease=15.0)
        other.register(self.info(host="elsewhere"), lease=15.0)

        q.unregister()

        assert b.r.exists(b.keys.supervisor(SUP)) == 0
        assert b.r.smembers(b.keys.supervisors) == {b"sup-2"}
        # and the name is free again
        RedisQueue(b.r, b.keys, SUP, ["a"]).register(self.info(pid=1, host="h2"), lease=15.0)
