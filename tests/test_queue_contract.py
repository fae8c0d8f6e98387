"""The Redis contract of RedisQueue, run against fakeredis and a real server.

One class, two backends: fakeredis (with Lua through lupa) for speed and for machines
without a server, and the session's private valkey-server for the truth.  A test that
passes on one and fails on the other is a finding about one of them, not noise.

Every test speaks of lists and keys only through protocol.Keys, as the code does.
Reserving needs a live lease (lease.Lease, tested in test_lease.py): its epoch fences
a supervisor that was declared dead.
"""

from __future__ import annotations

import hashlib
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
from redpool.lease import Lease
from redpool.keys import crash_started
from redpool.queue import REPLY_TTL_WHEN_NO_RESULT, Completion, RedisQueue, Reserved, connect

SUP = "sup-1"


@dataclass
class Backend:
    name: str
    r: redis.Redis
    keys: p.Keys
    connect: Callable[[], redis.Redis]   # a second connection (for blocking calls, threads)


def fake_server() -> fakeredis.FakeServer:
    """A FakeServer whose Lua has ``redis.sha1hex``.

    fakeredis 2.40 leaves it out of its ``redis`` table (every real server has had it
    since 2.6), and the crash counts are keyed by it.  The table lives in the server's
    one Lua runtime, created by the first script: add the function there, computed as
    the server computes it (lowercase hex SHA-1 of the bytes)."""
    server = fakeredis.FakeServer()
    client = fakeredis.FakeRedis(server=server)
    client.eval("return 1", 0)
    runtime = getattr(server, "_lua_runtime", None)
    if runtime is None:
        pytest.fail("fakeredis changed how it keeps its Lua runtime: update fake_server()")
    lua_redis = runtime.globals().redis
    if lua_redis.sha1hex is None:
        lua_redis.sha1hex = lambda data: hashlib.sha1(data).hexdigest().encode()
    client.close()
    return server


@pytest.fixture(params=["fakeredis", "real"])
def backend(request):
    if request.param == "fakeredis":
        server = fake_server()
        client = fakeredis.FakeRedis(server=server)
        yield Backend("fakeredis", client, p.Keys(f"t{uuid.uuid4().hex[:10]}"),
                      lambda: fakeredis.FakeRedis(server=server))
        client.close()
    else:
        url = request.getfixturevalue("redis_url")
        yield Backend("real", request.getfixturevalue("r"),
                      p.Keys(request.getfixturevalue("namespace")),
                      lambda: connect(url, blocking_timeout=10.0))


@pytest.fixture
def epoch(backend) -> str:
    """SUP's lease epoch: SUP is registered, as a supervisor is before it reserves."""
    return register(backend, SUP).epoch


# -- helpers ----------------------------------------------------------------------------------

def job(n: int, **kw) -> bytes:
    return p.encode_job(p.make_job("tests.work", [n], id=f"job-{n}", now=1700000000.0 + n, **kw))


def retry_of(raw: bytes) -> bytes:
    """The next attempt of ``raw``, as a worker schedules it."""
    return p.decode_job(raw).retry()


def info(name: str = SUP, pid: int | None = None, host: str | None = None) -> dict:
    """What a supervisor writes into its lease."""
    return {"name": name, "host": host or socket.gethostname(),
            "pid": os.getpid() if pid is None else pid, "version": "test"}


def register(b: Backend, name: str = SUP, lease: float = 15.0, keys: p.Keys | None = None) -> Lease:
    held = Lease(b.r, keys or b.keys, name)
    held.register(info(name), lease=lease)
    return held


def push(b: Backend, queue: str, *raws: bytes) -> None:
    """As a producer does: LPUSH, one at a time, oldest first."""
    for raw in raws:
        b.r.lpush(b.keys.queue(queue), raw)


def lrange(b: Backend, key: str) -> list[bytes]:
    return b.r.lrange(key, 0, -1)


def pairs(got: list[Reserved]) -> list[tuple[str, bytes]]:
    return [(x.queue, x.raw) for x in got]


def sha1(raw: bytes) -> str:
    return hashlib.sha1(raw).hexdigest()


def crash_count(b: Backend, raw: bytes) -> int | None:
    v = b.r.hget(b.keys.crashes, sha1(raw))
    return None if v is None else int(v)


def server_now(b: Backend) -> float:
    seconds, micros = b.r.time()
    return seconds + micros / 1_000_000


def lists_holding(b: Backend, raw: bytes) -> list[str]:
    """Every list key in the namespace that holds ``raw``, once per occurrence."""
    out = []
    for key in b.r.scan_iter(match=f"{b.keys.ns}:*", count=1000):
        if b.r.type(key) == b"list":
            out += [key.decode()] * lrange(b, key).count(raw)
    return out


def completion(q: str, raw: bytes, *, ttl: int = 100, reply_to: str | None = None,
               result_id: str | None = "auto", dead: bytes | None = None,
               envelope: bytes | None = b"auto", retry: bytes | None = None,
               retry_delay: float = 0.0) -> Completion:
    job_id = p.loads(raw)["id"]
    if result_id == "auto":
        result_id = job_id if ttl > 0 else None
    if envelope == b"auto":
        envelope = p.dumps(p.envelope(id=job_id, task="tests.work", queue=q, status=p.SUCCEEDED,
                                      worker=SUP, result=job_id.upper(), finished_at=1.0))
    return Completion(q, raw, result_id, ttl, reply_to, envelope, dead, retry, retry_delay)


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

    def test_reserve_takes_the_oldest_job_first(self, backend, epoch):
        b = backend
        push(b, "a", job(1), job(2), job(3))
        q = RedisQueue(b.r, b.keys, SUP, ["a"])

        got = q.reserve(3, epoch)

        assert got == [Reserved("a", job(1), 0), Reserved("a", job(2), 0), Reserved("a", job(3), 0)]

    def test_reserve_respects_n(self, backend, epoch):
        b = backend
        push(b, "a", *(job(i) for i in range(5)))
        q = RedisQueue(b.r, b.keys, SUP, ["a"])

        assert pairs(q.reserve(2, epoch)) == [("a", job(0)), ("a", job(1))]
        assert q.reserve(0, epoch) == []
        assert q.reserve(-3, epoch) == []
        assert lrange(b, b.keys.queue("a")) == [job(4), job(3), job(2)]
        assert pairs(q.reserve(10, epoch)) == [("a", job(2)), ("a", job(3)), ("a", job(4))]
        assert q.reserve(10, epoch) == []

    def test_reserve_empties_queues_in_the_given_priority_order(self, backend, epoch):
        b = backend
        # Given the priority order is the list order, not alphabetical
        push(b, "low", job(1), job(2))
        push(b, "mid", job(3))
        push(b, "high", job(4), job(5))
        q = RedisQueue(b.r, b.keys, SUP, ["high", "mid", "low"])

        # When fewer jobs are asked for than there are
        first = q.reserve(3, epoch)
        # Then the highest queue is emptied before the next one is touched
        assert pairs(first) == [("high", job(4)), ("high", job(5)), ("mid", job(3))]
        assert pairs(q.reserve(10, epoch)) == [("low", job(1)), ("low", job(2))]

    def test_reserve_prefers_a_higher_queue_even_for_older_jobs_below(self, backend, epoch):
        b = backend
        push(b, "low", job(1))
        q = RedisQueue(b.r, b.keys, SUP, ["high", "low"])
        assert pairs(q.reserve(1, epoch)) == [("low", job(1))]
        push(b, "low", job(2))
        push(b, "high", job(3))
        assert pairs(q.reserve(1, epoch)) == [("high", job(3))]

    def test_reserve_moves_each_job_into_its_queues_processing_list(self, backend, epoch):
        b = backend
        push(b, "a", job(1), job(2))
        push(b, "b", job(3))
        q = RedisQueue(b.r, b.keys, SUP, ["a", "b"])

        q.reserve(3, epoch)

        assert lrange(b, b.keys.queue("a")) == []
        assert lrange(b, b.keys.queue("b")) == []
        # newest at the left, like the queue itself
        assert lrange(b, b.keys.processing(SUP, "a")) == [job(2), job(1)]
        assert lrange(b, b.keys.processing(SUP, "b")) == [job(3)]
        for n, queue in ((1, "a"), (2, "a"), (3, "b")):
            assert lists_holding(b, job(n)) == [b.keys.processing(SUP, queue)]

    def test_a_job_is_always_in_exactly_one_list(self, backend, epoch):
        b = backend
        raws = [job(i) for i in range(8)]
        push(b, "a", *raws[:4])
        push(b, "b", *raws[4:])
        q = RedisQueue(b.r, b.keys, SUP, ["a", "b"])

        for step in (q.reserve(3, epoch), q.reserve(2, epoch)):
            assert step
            for raw in raws:
                assert len(lists_holding(b, raw)) == 1, raw

    def test_reserve_does_not_touch_other_supervisors_or_queues(self, backend, epoch):
        b = backend
        push(b, "a", job(1))
        push(b, "other", job(2))
        mine = RedisQueue(b.r, b.keys, SUP, ["a"])
        theirs = RedisQueue(b.r, b.keys, "sup-2", ["a"])
        assert pairs(theirs.reserve(5, register(b, "sup-2").epoch)) == [("a", job(1))]
        assert mine.reserve(5, epoch) == []
        assert lrange(b, b.keys.queue("other")) == [job(2)]
        assert lrange(b, b.keys.processing("sup-2", "a")) == [job(1)]

    # reserve is fenced by the lease ----------------------------------------------------------

    def test_reserve_with_a_wrong_epoch_takes_nothing(self, backend, epoch):
        b = backend
        push(b, "a", job(1), job(2))
        q = RedisQueue(b.r, b.keys, SUP, ["a"])

        assert q.reserve(2, "not-" + epoch) is None

        assert lrange(b, b.keys.queue("a")) == [job(2), job(1)]
        assert lrange(b, b.keys.processing(SUP, "a")) == []
        # and the right epoch still works
        assert pairs(q.reserve(2, epoch)) == [("a", job(1)), ("a", job(2))]

    def test_reserve_without_any_lease_takes_nothing(self, backend):
        b = backend
        push(b, "a", job(1))
        q = RedisQueue(b.r, b.keys, SUP, ["a"])
        assert q.reserve(1, "") is None
        assert q.reserve(1, "some-epoch") is None
        assert lrange(b, b.keys.queue("a")) == [job(1)]

    def test_reserve_after_the_lease_expired_takes_nothing(self, backend):
        b = backend
        held = register(b, SUP, lease=0.2)
        push(b, "a", job(1))
        q = RedisQueue(b.r, b.keys, SUP, ["a"])

        # When the lease runs out (judged by the server's clock)
        wait_until(lambda: not b.r.exists(b.keys.supervisor(SUP)), what="the lease to expire")

        # Then the old epoch reserves nothing
        assert q.reserve(1, held.epoch) is None
        assert lrange(b, b.keys.queue("a")) == [job(1)]
        assert lrange(b, b.keys.processing(SUP, "a")) == []

    def test_reserve_with_the_epoch_of_a_previous_registration_takes_nothing(self, backend):
        b = backend
        # Given our lease expired and the name was registered again (by us, or a successor)
        old = register(b, SUP)
        b.r.delete(b.keys.supervisor(SUP))
        new = register(b, SUP)
        assert new.epoch != old.epoch
        push(b, "a", job(1))
        q = RedisQueue(b.r, b.keys, SUP, ["a"])

        assert q.reserve(1, old.epoch) is None
        assert lrange(b, b.keys.queue("a")) == [job(1)]
        assert pairs(q.reserve(1, new.epoch)) == [("a", job(1))]

    # crash counts ----------------------------------------------------------------------------

    def test_crashed_puts_the_job_back_at_the_head_and_counts(self, backend, epoch):
        b = backend
        push(b, "a", job(1), job(2))
        q = RedisQueue(b.r, b.keys, SUP, ["a"])
        assert q.reserve(1, epoch) == [Reserved("a", job(1), 0)]

        # When the child running job 1 (started at T) dies
        assert q.crashed("a", job(1), started_at=1700000100.25) == 1

        # Then job 1 is at the head of its queue (taken next), not in processing
        assert lrange(b, b.keys.queue("a")) == [job(2), job(1)]
        assert lrange(b, b.keys.processing(SUP, "a")) == []
        assert crash_count(b, job(1)) == 1
        # and its next delivery says how often it crashed, and when that run started
        assert q.reserve(1, epoch) == [Reserved("a", job(1), 1, 1700000100.25)]
        assert q.crashed("a", job(1), started_at=1700000200.5) == 2
        assert q.reserve(2, epoch) == [Reserved("a", job(1), 2, 1700000200.5),
                                       Reserved("a", job(2), 0)]
        assert crash_count(b, job(1)) == 2
        assert crash_count(b, job(2)) is None

    def test_a_job_over_max_crashes_stays_in_processing_to_be_dead_lettered(self, backend, epoch):
        b = backend
        push(b, "a", job(1))
        q = RedisQueue(b.r, b.keys, SUP, ["a"])
        assert q.reserve(1, epoch)[0].crashes == 0
        assert q.crashes_exist is False          # nothing has ever crashed
        assert q.crashed("a", job(1), max_crashes=1) == 1   # back to the queue
        assert q.crashes_exist is True
        assert q.reserve(1, epoch)[0].crashes == 1
        assert q.crashed("a", job(1), max_crashes=1) == 2   # a poison pill now
        assert lrange(b, b.keys.processing(SUP, "a")) == [job(1)]
        assert b.r.llen(b.keys.queue("a")) == 0

    def test_crashed_for_a_job_no_longer_ours_does_nothing(self, backend, epoch):
        b = backend
        push(b, "a", job(1))
        q = RedisQueue(b.r, b.keys, SUP, ["a"])
        # Given a reaper took job 1 back while its child was dying
        q.reserve(1, epoch)
        b.r.lrem(b.keys.processing(SUP, "a"), 1, job(1))
        b.r.rpush(b.keys.queue("a"), job(1))

        assert q.crashed("a", job(1)) == 0

        assert lrange(b, b.keys.queue("a")) == [job(1)]   # not pushed twice
        assert crash_count(b, job(1)) is None

    def test_a_requeue_keeps_the_crash_count(self, backend, epoch):
        b = backend
        push(b, "a", job(1))
        q = RedisQueue(b.r, b.keys, SUP, ["a"])
        q.reserve(1, epoch)
        q.crashed("a", job(1), started_at=1700000100.0)

        taken = q.reserve(1, epoch)
        assert q.requeue(pairs(taken)) == 1   # an orderly put-back is not a crash

        assert q.reserve(1, epoch) == [Reserved("a", job(1), 1, 1700000100.0)]

    def test_complete_clears_the_crash_count(self, backend, epoch):
        b = backend
        push(b, "a", job(1), job(2))
        q = RedisQueue(b.r, b.keys, SUP, ["a"])
        q.reserve(2, epoch)
        q.crashed("a", job(1))
        q.crashed("a", job(2))
        q.reserve(2, epoch)

        assert q.complete([completion("a", job(1))]) == (0, 0)

        assert crash_count(b, job(1)) is None          # HDEL, not a zero left behind
        assert b.r.hexists(b.keys.crashes, sha1(job(1))) == 0
        assert b.r.hexists(b.keys.crashes, crash_started(sha1(job(1)))) == 0   # nor its start
        assert crash_count(b, job(2)) == 1             # the other job's count stays
        assert b.r.hexists(b.keys.crashes, crash_started(sha1(job(2)))) == 1

    def test_completing_a_fenced_job_keeps_its_crash_count(self, backend, epoch):
        b = backend
        push(b, "a", job(1))
        q = RedisQueue(b.r, b.keys, SUP, ["a"])
        q.reserve(1, epoch)
        q.crashed("a", job(1))
        q.reserve(1, epoch)
        # Given a reaper took it back (counting another crash)
        b.r.lrem(b.keys.processing(SUP, "a"), 1, job(1))
        b.r.rpush(b.keys.queue("a"), job(1))
        b.r.hincrby(b.keys.crashes, sha1(job(1)), 1)

        assert q.complete([completion("a", job(1))]) == (1, 0)

        assert crash_count(b, job(1)) == 2

    # block_reserve ---------------------------------------------------------------------------

    def test_block_reserve_times_out_with_none(self, backend):
        b = backend
        q = RedisQueue(b.r, b.keys, SUP, ["a"])
        assert q.block_reserve(b.connect(), "a", 0.05) is None

    def test_block_reserve_reports_the_crash_count(self, backend, epoch):
        b = backend
        push(b, "a", job(1))
        q = RedisQueue(b.r, b.keys, SUP, ["a"])
        q.reserve(1, epoch)
        q.crashed("a", job(1), started_at=1700000100.125)

        got = q.block_reserve(b.connect(), "a", 0.05)

        assert got == Reserved("a", job(1), 1, 1700000100.125)
        assert lists_holding(b, job(1)) == [b.keys.processing(SUP, "a")]

    def test_block_reserve_returns_a_job_pushed_while_it_waits(self, backend):
        b = backend
        if b.name == "fakeredis":
            pytest.skip("fakeredis's BLMOVE does not block: on an empty list it returns None "
                        "at once (checked with fakeredis 2.40)")
        q = RedisQueue(b.r, b.keys, SUP, ["a", "b"])
        conn = b.connect()
        my_id = conn.client_id()
        out: dict = {}
        t = threading.Thread(target=lambda: out.update(got=q.block_reserve(conn, "b", 10.0)))

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
        assert out["got"] == Reserved("b", job(7), 0)
        assert lrange(b, b.keys.queue("b")) == []
        assert lists_holding(b, job(7)) == [b.keys.processing(SUP, "b")]
        conn.close()

    # complete --------------------------------------------------------------------------------

    def test_exchange_acknowledges_and_reserves_in_one_call(self, backend, epoch):
        b = backend
        push(b, "a", job(1), job(2), job(3))
        q = RedisQueue(b.r, b.keys, SUP, ["a"])
        q.reserve(1, epoch)
        missing, skipped, got = q.exchange([completion("a", job(1))], 5, epoch)
        assert (missing, skipped) == (0, 0) and pairs(got) == [("a", job(2)), ("a", job(3))]
        assert b.r.exists(b.keys.result("job-1")) == 1
        assert sorted(lrange(b, b.keys.processing(SUP, "a"))) == sorted([job(2), job(3)])

    def test_exchange_after_the_server_closed_its_idle_connection_just_works(self, backend, epoch):
        # (a server `timeout`, or a proxy, closes connections idle for a while: that is
        # not an outage, and the next call must not fail)
        b = backend
        if b.name == "fakeredis":
            pytest.skip("needs a real server to close a connection")
        own = b.connect()
        q = RedisQueue(own, b.keys, SUP, ["a"])
        b.r.lpush(b.keys.queue("a"), job(1), job(2))
        assert len(q.reserve(1, epoch)) == 1
        hot_id = q._hot.send_command("CLIENT", "ID") or q._hot.read_response()
        b.r.execute_command("CLIENT", "KILL", "ID", hot_id)
        q._hot_used -= 60  # it has been idle a minute
        assert [r.raw for r in q.reserve(1, epoch)] == [job(2)]
        q.close()
        own.close()

    def test_exchange_after_the_server_lost_its_scripts_reserves_nothing_twice(self, backend, epoch):
        # Given a server that forgot our scripts (restarted, SCRIPT FLUSH) between calls
        b = backend
        push(b, "a", *(job(i) for i in range(1, 8)))
        q = RedisQueue(b.r, b.keys, SUP, ["a"])
        q.reserve(1, epoch)
        b.r.script_flush()
        b.r.script_load(q._reserve.script)  # the reserve script is known, complete's is not
        # When one pipelined call both acknowledges and reserves
        _, _, got = q.exchange([completion("a", job(1))], 3, epoch)
        # Then each script ran exactly once: three jobs reserved, all of them known
        assert pairs(got) == [("a", job(2)), ("a", job(3)), ("a", job(4))]
        assert sorted(lrange(b, b.keys.processing(SUP, "a"))) == sorted([job(2), job(3), job(4)])
        assert b.r.llen(b.keys.queue("a")) == 3
        assert b.r.exists(b.keys.result("job-1")) == 1

    def test_complete_writes_result_and_reply_with_the_ttl(self, backend, epoch):
        b = backend
        push(b, "a", job(1))
        q = RedisQueue(b.r, b.keys, SUP, ["a"])
        q.reserve(1, epoch)
        c = completion("a", job(1), ttl=100, reply_to=b.keys.reply("client-1"))

        assert q.complete([c]) == (0, 0)

        assert b.r.get(b.keys.result("job-1")) == c.envelope
        assert 90 <= b.r.ttl(b.keys.result("job-1")) <= 100
        assert lrange(b, b.keys.reply("client-1")) == [c.envelope]
        assert 90 <= b.r.ttl(b.keys.reply("client-1")) <= 100
        assert lrange(b, b.keys.processing(SUP, "a")) == []
        assert b.r.llen(b.keys.dead) == 0
        assert b.r.exists(b.keys.scheduled("a")) == 0

    def test_complete_accepts_the_largest_result_ttl(self, backend, epoch):
        b = backend
        push(b, "a", job(1))
        q = RedisQueue(b.r, b.keys, SUP, ["a"])
        q.reserve(1, epoch)
        reply = b.keys.reply("long")

        assert q.complete([completion("a", job(1), ttl=p.MAX_RESULT_TTL, reply_to=reply)]) == (0, 0)

        assert p.MAX_RESULT_TTL - 10 <= b.r.ttl(b.keys.result("job-1")) <= p.MAX_RESULT_TTL
        assert p.MAX_RESULT_TTL - 10 <= b.r.ttl(reply) <= p.MAX_RESULT_TTL

    def test_complete_with_ttl_0_writes_no_result_key_and_keeps_the_reply(self, backend, epoch):
        b = backend
        push(b, "a", job(1), job(2))
        q = RedisQueue(b.r, b.keys, SUP, ["a"])
        q.reserve(2, epoch)
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

    def test_a_reply_lists_ttl_only_grows_whatever_the_jobs_sharing_it_ask(self, backend, epoch):
        b = backend
        push(b, "a", *(job(i) for i in range(1, 6)))
        q = RedisQueue(b.r, b.keys, SUP, ["a"])
        q.reserve(5, epoch)
        reply = b.keys.reply("shared")
        # Given two jobs sharing a reply list, the second asking for 1 s (one batch)
        c1 = completion("a", job(1), ttl=3600, reply_to=reply)
        c2 = completion("a", job(2), ttl=1, reply_to=reply, result_id="job-2")
        assert q.complete([c1, c2]) == (0, 0)
        # Then the list keeps the first one's hour, with both answers on it
        assert 3590_000 <= b.r.pttl(reply) <= 3600_000
        assert lrange(b, reply) == [c2.envelope, c1.envelope]
        assert 0 < b.r.pttl(b.keys.result("job-2")) <= 1000  # its own result key: 1 s
        # and so in calls of their own; a longer one lengthens it, result_ttl 0 counts
        # as the reply lists' own default (a day)
        assert q.complete([completion("a", job(3), ttl=5, reply_to=reply)]) == (0, 0)
        assert 3590_000 <= b.r.pttl(reply) <= 3600_000
        assert q.complete([completion("a", job(4), ttl=0, reply_to=reply)]) == (0, 0)
        assert (REPLY_TTL_WHEN_NO_RESULT - 10) * 1000 <= b.r.pttl(reply) \
            <= REPLY_TTL_WHEN_NO_RESULT * 1000
        assert b.r.llen(reply) == 4

    def test_a_reply_list_that_has_no_ttl_is_given_none(self, backend, epoch):
        b = backend
        push(b, "a", job(1))
        q = RedisQueue(b.r, b.keys, SUP, ["a"])
        q.reserve(1, epoch)
        # Given a list its owner keeps (no TTL), which a job names as its reply_to
        kept = b.keys.reply("kept")
        b.r.rpush(kept, "the owner's")
        assert q.complete([completion("a", job(1), ttl=60, reply_to=kept)]) == (0, 0)
        # Then the answer is on it, and it still has no TTL: it does not vanish
        assert b.r.llen(kept) == 2 and b.r.ttl(kept) == -1

    def test_complete_without_envelope_writes_nothing_but_removes_the_job(self, backend, epoch):
        b = backend
        push(b, "a", job(1))
        q = RedisQueue(b.r, b.keys, SUP, ["a"])
        q.reserve(1, epoch)
        c = completion("a", job(1), reply_to=b.keys.reply("c"), envelope=None)

        assert q.complete([c]) == (0, 0)

        assert b.r.exists(b.keys.result("job-1"), b.keys.reply("c")) == 0
        assert lists_holding(b, job(1)) == []

    def test_complete_writes_dead_entries_and_trims_the_dead_list(self, backend, epoch):
        b = backend
        raws = [job(i) for i in range(5)]
        push(b, "a", *raws)
        q = RedisQueue(b.r, b.keys, SUP, ["a"], dead_max=3)
        q.reserve(5, epoch)
        deads = [p.dumps({"n": i}) for i in range(5)]

        assert q.complete([completion("a", raw, dead=d) for raw, d in zip(raws, deads)]) == (0, 0)

        # the newest three survive, newest first
        assert lrange(b, b.keys.dead) == [deads[4], deads[3], deads[2]]
        assert b.r.ttl(b.keys.dead) == -1  # the dead list never expires
        # and results were still written for jobs that have a dead entry
        assert b.r.get(b.keys.result("job-0")) is not None

    def test_dead_list_trim_applies_across_calls(self, backend, epoch):
        b = backend
        raws = [job(i) for i in range(4)]
        push(b, "a", *raws)
        q = RedisQueue(b.r, b.keys, SUP, ["a"], dead_max=2)
        q.reserve(4, epoch)
        for i, raw in enumerate(raws):
            q.complete([completion("a", raw, dead=p.dumps({"n": i}))])
        assert [p.loads(x)["n"] for x in lrange(b, b.keys.dead)] == [3, 2]

    def test_complete_fences_jobs_no_longer_ours(self, backend, epoch):
        b = backend
        push(b, "a", job(1), job(2))
        q = RedisQueue(b.r, b.keys, SUP, ["a"])
        q.reserve(2, epoch)
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

    def test_completing_twice_writes_once(self, backend, epoch):
        b = backend
        push(b, "a", job(1))
        q = RedisQueue(b.r, b.keys, SUP, ["a"])
        q.reserve(1, epoch)
        reply = b.keys.reply("twice")
        assert q.complete([completion("a", job(1), reply_to=reply)]) == (0, 0)
        assert q.complete([completion("a", job(1), reply_to=reply)]) == (1, 0)
        assert b.r.llen(reply) == 1

    def test_complete_of_an_empty_batch_is_a_no_op(self, backend):
        b = backend
        q = RedisQueue(b.r, b.keys, SUP, ["a"])
        assert q.complete([]) == (0, 0)
        assert q.complete(iter(())) == (0, 0)

    def test_a_large_batch_is_acknowledged_in_one_script_call(self, backend, epoch):
        b = backend
        n = 300
        raws = [job(i) for i in range(n)]
        push(b, "a", *raws[: n // 2])
        push(b, "b", *raws[n // 2:])
        q = RedisQueue(b.r, b.keys, SUP, ["a", "b"])
        taken = q.reserve(n, epoch)
        assert len(taken) == n
        calls = []
        run = q._evalsha_pipeline
        q._evalsha_pipeline = lambda scripts: calls.append(scripts) or run(scripts)
        reply = b.keys.reply("batch")

        missing = q.complete(completion(x.queue, x.raw, reply_to=reply) for x in taken)

        assert missing == (0, 0)
        assert len(calls) == 1
        assert b.r.llen(reply) == n
        assert b.r.exists(*(b.keys.result(f"job-{i}") for i in range(n))) == n
        assert b.r.llen(b.keys.processing(SUP, "a")) == 0
        assert b.r.llen(b.keys.processing(SUP, "b")) == 0

    def test_complete_of_a_job_from_a_queue_no_longer_listened_on(self, backend, epoch):
        b = backend
        push(b, "old", job(1))
        RedisQueue(b.r, b.keys, SUP, ["old"]).reserve(1, epoch)
        q = RedisQueue(b.r, b.keys, SUP, ["new"])
        assert q.complete([completion("old", job(1))]) == (0, 0)
        assert lists_holding(b, job(1)) == []

    def test_a_reply_to_that_is_not_a_list_does_not_poison_the_batch(self, backend, epoch):
        b = backend
        push(b, "a", job(1), job(2), job(3))
        q = RedisQueue(b.r, b.keys, SUP, ["a"])
        q.reserve(3, epoch)
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

    def test_a_reply_to_naming_one_of_our_own_keys_is_never_written(self, backend, epoch):
        # Given a job whose reply_to is a queue (LPUSH + EXPIRE would corrupt the queue)
        b = backend
        push(b, "a", job(1))
        push(b, "other", b"queued")
        q = RedisQueue(b.r, b.keys, SUP, ["a"])
        q.reserve(1, epoch)
        result = q.complete([completion("a", job(1), reply_to=b.keys.queue("other"))])
        # Then the reply is skipped, the queue untouched and without a TTL
        assert result == (0, 1)
        assert lrange(b, b.keys.queue("other")) == [b"queued"]
        assert b.r.ttl(b.keys.queue("other")) == -1
        assert b.r.exists(b.keys.result("job-1")) == 1

    # complete with a retry -------------------------------------------------------------------

    def test_complete_with_a_retry_schedules_it_on_the_server_clock(self, backend, epoch):
        b = backend
        push(b, "a", job(1))
        q = RedisQueue(b.r, b.keys, SUP, ["a"])
        q.reserve(1, epoch)
        q.crashed("a", job(1))
        q.reserve(1, epoch)
        nxt = retry_of(job(1))
        reply = b.keys.reply("retry")
        # as the supervisor builds it from a "retrying" outcome: no envelope
        c = completion("a", job(1), reply_to=reply, envelope=None, retry=nxt, retry_delay=2.5)
        assert c.result_id == "job-1"

        before = server_now(b)
        assert q.complete([c]) == (0, 0)
        after = server_now(b)

        # Then the job left processing, and its next attempt waits in the scheduled set
        assert lists_holding(b, job(1)) == []
        ((member, due),) = b.r.zrange(b.keys.scheduled("a"), 0, -1, withscores=True)
        assert member == nxt
        # due = server time (whole ms) + 2.5 s
        assert before + 2.5 - 0.002 <= due <= after + 2.5 + 0.001
        # and nothing was answered: the producer waits for the last attempt
        assert b.r.exists(b.keys.result("job-1"), reply) == 0
        assert b.r.llen(b.keys.dead) == 0
        assert crash_count(b, job(1)) is None
        assert lrange(b, b.keys.queue("a")) == []

    def test_a_fenced_retry_is_not_scheduled(self, backend, epoch):
        b = backend
        push(b, "a", job(1))
        q = RedisQueue(b.r, b.keys, SUP, ["a"])
        q.reserve(1, epoch)
        b.r.lrem(b.keys.processing(SUP, "a"), 1, job(1))   # taken back by a reaper
        b.r.rpush(b.keys.queue("a"), job(1))

        c = completion("a", job(1), envelope=None, retry=retry_of(job(1)), retry_delay=1.0)
        assert q.complete([c]) == (1, 0)

        assert b.r.exists(b.keys.scheduled("a")) == 0
        assert lrange(b, b.keys.queue("a")) == [job(1)]

    def test_one_batch_mixes_results_retries_and_dead_letters(self, backend, epoch):
        b = backend
        push(b, "a", job(1), job(2))
        push(b, "b", job(3))
        q = RedisQueue(b.r, b.keys, SUP, ["a", "b"])
        q.reserve(3, epoch)

        assert q.complete([completion("a", job(1)),
                           completion("a", job(2), envelope=None, retry=retry_of(job(2)),
                                      retry_delay=60.0),
                           completion("b", job(3), dead=b'{"d":3}')]) == (0, 0)

        assert b.r.exists(b.keys.result("job-1"), b.keys.result("job-3")) == 2
        assert b.r.exists(b.keys.result("job-2")) == 0
        assert b.r.zrange(b.keys.scheduled("a"), 0, -1) == [retry_of(job(2))]
        assert b.r.exists(b.keys.scheduled("b")) == 0   # each retry goes to its own queue
        assert lrange(b, b.keys.dead) == [b'{"d":3}']
        assert q.processing_contents() == {"a": [], "b": []}

    # promote ---------------------------------------------------------------------------------

    def test_promote_with_nothing_scheduled(self, backend):
        b = backend
        q = RedisQueue(b.r, b.keys, SUP, ["a", "b"])
        assert q.promote() == (0, None)

    def test_promote_moves_due_jobs_and_leaves_future_ones(self, backend, epoch):
        b = backend
        now = server_now(b)
        push(b, "a", job(9))   # already waiting
        b.r.zadd(b.keys.scheduled("a"), {job(1): now - 5, job(2): now - 1, job(3): now + 100})
        b.r.zadd(b.keys.scheduled("b"), {job(4): now - 2})
        q = RedisQueue(b.r, b.keys, SUP, ["a", "b"])

        moved, until_next = q.promote()

        assert moved == 3
        assert 98.0 <= until_next <= 100.0
        # LPUSHed like new jobs: behind those already waiting, the earliest due first
        assert lrange(b, b.keys.queue("a")) == [job(2), job(1), job(9)]
        assert lrange(b, b.keys.queue("b")) == [job(4)]
        assert b.r.zrange(b.keys.scheduled("a"), 0, -1) == [job(3)]
        assert b.r.exists(b.keys.scheduled("b")) == 0
        assert pairs(q.reserve(4, epoch)) == [("a", job(9)), ("a", job(1)), ("a", job(2)),
                                              ("b", job(4))]
        # promoting again moves nothing and still says when the next one is due
        moved, until_next = q.promote()
        assert moved == 0 and 98.0 <= until_next <= 100.0

    def test_promote_judges_due_by_the_servers_clock(self, backend):
        b = backend
        # Given one job due a moment ago and one a moment ahead, by the server's TIME
        now = server_now(b)
        b.r.zadd(b.keys.scheduled("a"), {job(1): now - 0.05, job(2): now + 30})
        q = RedisQueue(b.r, b.keys, SUP, ["a"])
        assert q.promote()[0] == 1
        assert lrange(b, b.keys.queue("a")) == [job(1)]

    def test_promote_only_touches_our_queues(self, backend):
        b = backend
        now = server_now(b)
        b.r.zadd(b.keys.scheduled("other"), {job(1): now - 1})
        q = RedisQueue(b.r, b.keys, SUP, ["a"])
        assert q.promote() == (0, None)
        assert b.r.zcard(b.keys.scheduled("other")) == 1
        assert b.r.exists(b.keys.queue("other")) == 0

    def test_promote_moves_at_most_limit_per_queue(self, backend):
        b = backend
        now = server_now(b)
        b.r.zadd(b.keys.scheduled("a"), {job(i): now - 10 + i for i in range(5)})
        q = RedisQueue(b.r, b.keys, SUP, ["a"])

        assert q.promote(limit=2) == (2, 0.0)   # more are due already
        assert lrange(b, b.keys.queue("a")) == [job(1), job(0)]
        assert q.promote(limit=10) == (3, None)

    def test_concurrent_promotes_move_each_job_exactly_once(self, backend):
        b = backend
        n = 200
        now = server_now(b)
        b.r.zadd(b.keys.scheduled("a"), {job(i): now - 1 for i in range(n)})
        movers = [RedisQueue(b.connect(), b.keys, f"sup-{k}", ["a"]) for k in range(2)]
        start = threading.Barrier(len(movers))
        totals = [0] * len(movers)
        errors: list[BaseException] = []

        def promote_all(k: int) -> None:
            try:
                start.wait(5)
                while True:
                    moved, _ = movers[k].promote(limit=7)
                    if not moved:
                        return
                    totals[k] += moved
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

        threads = [threading.Thread(target=promote_all, args=(k,)) for k in range(len(movers))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)

        assert not errors
        assert sum(totals) == n
        queued = lrange(b, b.keys.queue("a"))
        assert len(queued) == n and set(queued) == {job(i) for i in range(n)}
        assert b.r.exists(b.keys.scheduled("a")) == 0

    # requeue ---------------------------------------------------------------------------------

    def test_requeue_puts_jobs_back_at_the_head_in_their_order(self, backend, epoch):
        b = backend
        push(b, "a", *(job(i) for i in range(1, 6)))
        q = RedisQueue(b.r, b.keys, SUP, ["a"])
        taken = q.reserve(3, epoch)
        assert [x.raw for x in taken] == [job(1), job(2), job(3)]

        assert q.requeue(pairs(taken)) == 3

        assert lrange(b, b.keys.processing(SUP, "a")) == []
        # the oldest is taken first next time, before the jobs that never left
        assert [x.raw for x in q.reserve(5, epoch)] == [job(i) for i in range(1, 6)]

    def test_requeue_across_queues(self, backend, epoch):
        b = backend
        push(b, "a", job(1), job(2))
        push(b, "b", job(3), job(4))
        q = RedisQueue(b.r, b.keys, SUP, ["a", "b"])
        taken = q.reserve(3, epoch)   # 1, 2 from a; 3 from b

        assert q.requeue(pairs(taken)) == 3

        assert lrange(b, b.keys.queue("a")) == [job(2), job(1)]
        assert lrange(b, b.keys.queue("b")) == [job(4), job(3)]
        assert pairs(q.reserve(4, epoch)) == [("a", job(1)), ("a", job(2)), ("b", job(3)),
                                              ("b", job(4))]

    def test_requeue_skips_jobs_no_longer_in_processing(self, backend, epoch):
        b = backend
        push(b, "a", job(1), job(2), job(3))
        q = RedisQueue(b.r, b.keys, SUP, ["a"])
        taken = q.reserve(3, epoch)
        q.complete([completion("a", job(2))])

        assert q.requeue(pairs(taken)) == 2

        assert lrange(b, b.keys.queue("a")) == [job(3), job(1)]
        assert lists_holding(b, job(2)) == []
        assert q.requeue([]) == 0

    # recover ---------------------------------------------------------------------------------

    def test_recover_returns_every_processing_list_to_its_queue_head(self, backend, epoch):
        b = backend
        # Given a previous run listened on "old" and "a", and was stopped holding jobs
        push(b, "old", job(1), job(2))
        push(b, "a", job(3), job(4), job(5))
        RedisQueue(b.r, b.keys, SUP, ["old", "a"]).reserve(4, epoch)
        push(b, "a", job(6))

        # When the restarted supervisor listens on "a" only
        q = RedisQueue(b.r, b.keys, SUP, ["a"])
        moved = q.recover(crashed=False)

        # Then everything it held is back at the head of its queue, in order
        assert moved == {"old": 2, "a": 2}
        assert q.processing_contents() == {"a": []}
        assert lrange(b, b.keys.processing(SUP, "old")) == []
        assert lrange(b, b.keys.queue("old")) == [job(2), job(1)]
        assert [x.raw for x in q.reserve(10, epoch)] == [job(3), job(4), job(5), job(6)]
        assert q.recover(crashed=False) == {"a": 4}

    def test_recover_after_a_crash_counts_one_for_each_job(self, backend, epoch):
        b = backend
        push(b, "a", job(1), job(2))
        q = RedisQueue(b.r, b.keys, SUP, ["a"])
        q.reserve(2, epoch)

        # When the jobs were left by a run that died
        before = server_now(b)
        assert q.recover(crashed=True) == {"a": 2}

        assert crash_count(b, job(1)) == 1 and crash_count(b, job(2)) == 1
        # Then which of them had started is unknown: the time of the recovery stands for
        # it (they may have run by then), on the server's clock
        got = q.reserve(2, epoch)
        assert pairs(got) == [("a", job(1)), ("a", job(2))] and [x.crashes for x in got] == [1, 1]
        at = got[0].crashed_at
        assert at == got[1].crashed_at and before <= at <= server_now(b)

        # When they are put back by an orderly shutdown: no crash is counted
        assert q.recover(crashed=False) == {"a": 2}

        assert crash_count(b, job(1)) == 1 and crash_count(b, job(2)) == 1
        assert q.reserve(2, epoch) == [Reserved("a", job(1), 1, at), Reserved("a", job(2), 1, at)]
        # and a known start is not replaced by the time of a later recovery
        q.crashed("a", job(1), started_at=1700000100.5)
        q.reserve(1, epoch)
        q.recover(crashed=True)
        assert Reserved("a", job(1), 3, 1700000100.5) in q.reserve(2, epoch)

    def test_recover_leaves_other_supervisors_alone(self, backend, epoch):
        b = backend
        push(b, "a", *(job(i) for i in range(6)))
        # names that share a prefix with ours must not match our pattern
        for name in ("sup-1x", "sup-10", "sup-"):
            RedisQueue(b.r, b.keys, name, ["a"]).reserve(1, register(b, name).epoch)
        mine = RedisQueue(b.r, b.keys, SUP, ["a"])
        mine.reserve(2, epoch)

        assert mine.recover(crashed=True) == {"a": 2}

        for name in ("sup-1x", "sup-10", "sup-"):
            assert b.r.llen(b.keys.processing(name, "a")) == 1
        assert b.r.llen(b.keys.queue("a")) == 3
        counts = {k: v for k, v in b.r.hgetall(b.keys.crashes).items() if b":" not in k}
        assert sorted(int(v) for v in counts.values()) == [1, 1]

    def test_recover_escapes_a_namespace_that_looks_like_a_glob(self, backend):
        b = backend
        globby = p.Keys(f"{b.keys.ns}:a?")
        plain = p.Keys(f"{b.keys.ns}:ab")   # matched by an unescaped "…:a?" pattern
        push(Backend(b.name, b.r, globby, b.connect), "q", job(1))
        push(Backend(b.name, b.r, plain, b.connect), "q", job(2))
        RedisQueue(b.r, plain, SUP, ["q"]).reserve(1, register(b, SUP, keys=plain).epoch)
        RedisQueue(b.r, globby, SUP, ["q"]).reserve(1, register(b, SUP, keys=globby).epoch)

        assert RedisQueue(b.r, globby, SUP, []).recover(crashed=False) == {"q": 1}

        assert lrange(b, plain.processing(SUP, "q")) == [job(2)]
        assert lrange(b, globby.queue("q")) == [job(1)]

    def test_recover_with_nothing_to_do(self, backend):
        b = backend
        q = RedisQueue(b.r, b.keys, SUP, ["a", "b"])
        assert q.recover(crashed=True) == {}
        assert q.processing_contents() == {"a": [], "b": []}
        assert b.r.exists(b.keys.crashes) == 0

    # processing_contents ---------------------------------------------------------------------

    def test_processing_contents_lists_what_redis_says_we_hold(self, backend, epoch):
        b = backend
        push(b, "old", job(1))
        push(b, "a", job(2), job(3))
        RedisQueue(b.r, b.keys, SUP, ["old"]).reserve(1, epoch)
        push(b, "a", job(4))
        RedisQueue(b.r, b.keys, "sup-2", ["a"]).reserve(1, register(b, "sup-2").epoch)
        q = RedisQueue(b.r, b.keys, SUP, ["a", "b"])
        q.reserve(5, epoch)

        # per queue, as the lists stand (newest first), with a queue we no longer listen
        # on, our empty ones, and nothing of another supervisor's
        assert q.processing_contents() == {"a": [job(4), job(3)], "b": [], "old": [job(1)]}

    # the dataset: did the server keep its data? ------------------------------------------------

    def test_the_dataset_marker_is_claimed_once_and_read_back(self, backend):
        b = backend
        q = RedisQueue(b.r, b.keys, SUP, ["a", "b"])
        assert q.read_markers() == {b.keys.dataset: None}      # one marker on one server
        mine = q.claim_markers()
        theirs = RedisQueue(b.r, b.keys, "sup-2", ["b"]).claim_markers()
        # the first claim wins; later ones adopt it; it has no TTL
        assert mine == theirs == q.read_markers() and mine[b.keys.dataset]
        assert b.r.ttl(b.keys.dataset) == -1
        # a server that lost it reads as such
        b.r.delete(b.keys.dataset)
        assert q.read_markers() == {b.keys.dataset: None}
        assert q.claim_markers() != mine

    def test_restore_puts_held_jobs_back_into_our_processing_lists(self, backend, epoch):
        from collections import Counter

        b = backend
        q = RedisQueue(b.r, b.keys, SUP, ["a", "b"])
        n = q.restore(Counter({("a", job(1)): 1, ("a", job(2)): 2, ("b", job(3)): 1}))
        assert n == 4
        assert sorted(lrange(b, b.keys.processing(SUP, "a"))) == sorted([job(1), job(2), job(2)])
        assert lrange(b, b.keys.processing(SUP, "b")) == [job(3)]
        assert q.restore(Counter()) == 0
        # and they are ours as any reserved job: completed, their results written
        assert q.complete([completion("a", job(1)), completion("b", job(3))]) == (0, 0)
        assert b.r.exists(b.keys.result("job-1"), b.keys.result("job-3")) == 2

    def test_completions_that_found_their_job_gone_are_kept_to_be_judged(self, backend, epoch):
        b = backend
        push(b, "a", job(1), job(2))
        q = RedisQueue(b.r, b.keys, SUP, ["a"])
        q.reserve(2, epoch)
        assert q.complete([completion("a", job(1))]) == (0, 0) and q.missed == []
        b.r.delete(b.keys.processing(SUP, "a"))     # gone (reaped, or the server's data lost)
        done = [completion("a", job(2))]
        assert q.complete(done) == (1, 0)
        assert q.missed == done
        # in a batch that mixes both, only the gone ones are kept: the rest were written
        # (sent again, they would answer twice)
        q.missed = []
        push(b, "a", job(4), job(5))
        q.reserve(2, epoch)
        b.r.lrem(b.keys.processing(SUP, "a"), 0, job(4))
        mixed = [completion("a", job(3)), completion("a", job(4)), completion("a", job(5))]
        assert q.complete(mixed) == (2, 0)
        assert q.missed == mixed[:2]
        assert b.r.exists(b.keys.result("job-5")) and not b.r.exists(b.keys.result("job-4"))

    def test_the_server_says_who_it_is_and_whether_it_keeps_its_data(self, backend):
        b = backend
        if b.name == "fakeredis":
            pytest.skip("fakeredis has no run_id nor persistence settings")
        q = RedisQueue(b.r, b.keys, SUP, ["a"])
        (addr, run_id), = q.run_ids().items()
        assert len(run_id) == 40 and addr.endswith(str(b.r.connection_pool.connection_kwargs["port"]))
        # the test session's server keeps nothing on disk (--save "", no AOF)
        assert q.persistence() == (False, addr)


class _Node:
    """A server as RedisQueue.persistence() asks it: INFO persistence, CONFIG GET save."""

    def __init__(self, port, *, aof=0, save="", user=None, config_refused=False):
        self.aof, self.save, self.config_refused = aof, save, config_refused
        self.connection_pool = type("Pool", (), {"connection_kwargs": {
            "host": "10.0.0.1", "port": port, "username": user}})()
        self.config_calls = 0

    def info(self, section):
        return {"aof_enabled": self.aof}

    def config_get(self, name):
        self.config_calls += 1
        if self.config_refused:
            raise redis.ResponseError("unknown command 'CONFIG'")
        return {"save": self.save}


@pytest.mark.parametrize("nodes, verdict", [
    ([_Node(1, aof=1)], (True, "AOF")),
    ([_Node(1, save="3600 1 300 100")], (True, "RDB snapshots")),
    ([_Node(1, aof=1), _Node(2, save="60 1")], (True, "AOF and RDB snapshots")),
    ([_Node(1, aof=1), _Node(2)], (False, "10.0.0.1:2")),
    ([_Node(1, save=""), _Node(2, save=" ")], (False, "10.0.0.1:1, 10.0.0.1:2")),
    ([_Node(1, user="default")], (False, "10.0.0.1:1")),
])
def test_persistence_is_aof_or_rdb_on_every_primary(nodes, verdict):
    q = RedisQueue(fakeredis.FakeRedis(), p.Keys("t"), SUP, ["a"])
    q.nodes = lambda: nodes
    assert q.persistence() == verdict


def test_persistence_is_not_asked_with_config_of_a_named_acl_user_nor_where_refused():
    q = RedisQueue(fakeredis.FakeRedis(), p.Keys("t"), SUP, ["a"])
    acl_user = _Node(1, user="redpool-worker")
    q.nodes = lambda: [acl_user]
    kept, why = q.persistence()
    assert kept is None and "'redpool-worker'" in why and acl_user.config_calls == 0
    # (AOF needs no CONFIG: it is read from INFO, which the worker's ACL grants)
    q.nodes = lambda: [_Node(1, aof=1, user="redpool-worker")]
    assert q.persistence() == (True, "AOF")
    q.nodes = lambda: [_Node(1, config_refused=True)]
    kept, why = q.persistence()
    assert kept is None and "unknown command 'CONFIG'" in why
