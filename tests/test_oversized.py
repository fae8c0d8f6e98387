"""Jobs far over --max-payload (oversized.py): answered PayloadTooLarge and dead-lettered
with their head, on one server and on a Redis Cluster, without the supervisor ever
holding them whole; a supervisor that dies with one reserved leaves it whole in Redis."""

from __future__ import annotations

import json
import os
import socket
from hashlib import sha1

import pytest
import redis

from helpers import wait_for
from hostile.invariants import vm_kib
from redpool import protocol as p
from redpool.lease import Lease
from redpool.oversized import (Oversized, from_raw, head_fields, known_fields, limit,
                                refusal, tail_members)
from redpool.queue import RedisQueue

MAX_PAYLOAD = 100_000
BIG = 3 * 1024 * 1024


def big_job(label: str, reply_to: str) -> bytes:
    return json.dumps({"id": label, "reply_to": reply_to, "task": "jobs.echo",
                       "args": ["z" * BIG]}).encode()


def test_head_fields_reads_the_members_whole_within_the_head():
    head = b'\xef\xbb\xbf {"id": "a1", "reply_to":"ns:reply:a1", "result_ttl": 5, "args": ["zz'
    assert head_fields(head) == {"id": "a1", "reply_to": "ns:reply:a1", "result_ttl": 5}
    assert head_fields(b'{"task":"t","id":"x') == {"task": "t"}   # the id is cut off
    assert head_fields(b'[1, 2') == {} and head_fields(b'') == {}
    assert head_fields(b'{"x":' + b"[" * 5000) == {}              # too deep: nothing, no error


def test_tail_members_reads_the_top_level_members_after_the_last_nested_value():
    tail = b'zz"], "kwargs": {"a": 1, "b": 2}, "enqueued_at": 1.5, "reply_to": "r", "v": 1}\n'
    assert tail_members(tail) == {"enqueued_at": 1.5, "reply_to": "r", "v": 1}
    # a member of a nested object is not the job's
    assert tail_members(b'zz", "args": [{"k": 1, "reply_to": "evil"}]}') == {}
    assert tail_members(b'zz", "x": {"k": 1, "reply_to": "evil"}}') == {}
    # a string ending in a comma is no member's start
    assert tail_members(b'"a,", "b"], "id": "j"}') == {"id": "j"}
    assert tail_members(b"") == {} and tail_members(b"zzzz") == {}


def test_known_fields_of_a_job_as_redpool_writes_it():
    raw = p.encode_job(p.make_job("t.echo", ["z" * BIG], id="j1", reply_to="ns:reply:j1",
                                  result_ttl=60))
    job = from_raw(raw)
    assert known_fields(job) == {"job_id": "j1", "task": "t.echo", "reply_to": "ns:reply:j1",
                                 "result_ttl": 60, "enqueued_at": json.loads(raw)["enqueued_at"]}


def answered(r, reply_to: str, timeout: float = 60.0) -> dict:
    item = r.brpop(reply_to, timeout=timeout)
    assert item is not None, "no answer"
    return json.loads(item[1])


def check_refused(env: dict, dead: list[bytes], raw: bytes, label: str) -> None:
    assert env["status"] == "failed" and env["id"] == label
    assert env["error"]["type"] == p.E_PAYLOAD_TOO_LARGE and env["started_at"] is None
    entries = [json.loads(e) for e in dead]
    mine = [e for e in entries if e.get("id") == label]
    assert len(mine) == 1, entries
    e = mine[0]
    assert e["job_size"] == len(raw) and raw.startswith(e["job"].encode())
    assert len(e["job"]) == p.DEAD_JOB_KEPT and e["error_type"] == p.E_PAYLOAD_TOO_LARGE


@pytest.mark.daemon
@pytest.mark.parametrize("path", ["waiter", "reserve"])
def test_an_oversized_job_is_answered_and_dead_lettered_unread(daemons, r, keys, path):
    d = daemons("--max-payload", str(MAX_PAYLOAD), "--concurrency", "1")
    d.wait_started()
    base = vm_kib(d.pid)["VmHWM"]
    reply = keys.reply("big")
    raw = big_job("big", reply)
    if path == "reserve":
        # behind a plain job: the waiter brings that one, reserve.lua the big one
        r.lpush(keys.queue("default"), raw, json.dumps({"task": "jobs.echo", "args": [1]}))
    else:
        r.lpush(keys.queue("default"), raw)
    env = answered(r, reply)
    check_refused(env, r.lrange(keys.dead, 0, -1), raw, "big")
    wait_for(lambda: not any(r.llen(k) for k in r.scan_iter(match=f"{keys.ns}:processing:*")),
             timeout=30, what="its processing list to empty")
    grew = vm_kib(d.pid)["VmHWM"] - base
    print(f"supervisor peak +{grew} KiB for a job of {len(raw)} bytes ({path})")
    assert grew * 1024 < len(raw), "the supervisor held the job whole"


@pytest.mark.daemon
def test_an_oversized_job_alone_is_answered_at_once_in_burst_mode(daemons, r, keys):
    # Given only an oversized job queued (no waiter: --burst reserves with reserve.lua)
    reply = keys.reply("alone")
    raw = big_job("alone", reply)
    r.lpush(keys.queue("default"), raw)
    # When a --burst worker starts, it answers it and stops (the queue is then empty)
    d = daemons("--max-payload", str(MAX_PAYLOAD), "--concurrency", "1", "--burst")
    assert d.wait(60) == 0, d.log()
    check_refused(answered(r, reply, timeout=5), r.lrange(keys.dead, 0, -1), raw, "alone")


@pytest.mark.daemon
@pytest.mark.parametrize("path", ["waiter", "burst"])
def test_an_oversized_job_on_a_cluster(cluster_daemons, rc, cluster_keys, path):
    k = cluster_keys
    reply = k.reply("bigc")
    raw = big_job("bigc", reply)
    if path == "burst":   # reserve.lua, then complete_cluster.lua by hash
        rc.lpush(k.queue("default"), raw)
        d = cluster_daemons("--max-payload", str(MAX_PAYLOAD), "--concurrency", "1", "--burst")
        assert d.wait(90) == 0, d.log()
    else:                 # the waiter's BLMOVE, its reply read by oversized.read_bulk
        d = cluster_daemons("--max-payload", str(MAX_PAYLOAD), "--concurrency", "1")
        d.wait_started()
        base = vm_kib(d.pid)["VmHWM"]
        rc.lpush(k.queue("default"), raw)
    env = answered(rc, reply)
    check_refused(env, rc.lrange(k.dead_of("default"), 0, -1), raw, "bigc")
    if path == "waiter":   # (redis-py reading it whole cost twice its size)
        grew = vm_kib(d.pid)["VmHWM"] - base
        print(f"cluster supervisor peak +{grew} KiB for a job of {len(raw)} bytes (waiter)")
        assert grew * 1024 < len(raw), "the supervisor held the job whole"
    assert not rc.llen(k.processing("w1", "default"))   # (helpers.Daemon's default name)


def test_a_supervisor_dying_with_one_reserved_leaves_it_whole(r, keys, daemons):
    # Given a supervisor that reserved an oversized job (its head only) and died
    lease = Lease(r, keys, "gone")
    lease.register({"name": "gone", "host": socket.gethostname(), "pid": 999_999_999,
                    "version": "test"}, lease=1.0)
    q = RedisQueue(r, keys, "gone", ["default"])
    q.head_over = limit(MAX_PAYLOAD)
    reply = keys.reply("crash")
    raw = big_job("crash", reply)
    r.lpush(keys.queue("default"), raw)
    [got] = q.reserve(5, lease.epoch)
    assert isinstance(got.raw, Oversized) and len(got.raw) == p.DEAD_JOB_KEPT
    assert got.raw.size == len(raw) and raw.startswith(got.raw)
    assert got.raw.tail == raw[-p.DEAD_JOB_KEPT:] and got.raw.sha == sha1(raw).hexdigest()
    # Then the job is in its processing list, whole, byte for byte
    assert r.lrange(keys.processing("gone", "default"), 0, -1) == [raw]
    # and a completion naming another job by hash removes nothing
    from redpool.config import WorkerConfig
    other = Oversized(bytes(got.raw))
    other.size, other.sha = got.raw.size, "0" * 40
    _, done = refusal(other, "default", 0, WorkerConfig(max_payload=MAX_PAYLOAD))
    assert q.complete([done]) == (1, 0) and r.llen(keys.processing("gone", "default")) == 1
    # When a live worker's reaper finds it (its lease expired), it is answered once
    d = daemons("--max-payload", str(MAX_PAYLOAD), "--concurrency", "1")
    env = answered(r, reply)
    check_refused(env, r.lrange(keys.dead, 0, -1), raw, "crash")
    assert not r.exists(keys.processing("gone", "default"))
    d.kill()


@pytest.mark.parametrize("size", [0, 1, 65535, 65536, 65537, 200_000, 1_000_000])
def test_a_waiter_reads_blmove_replies_itself(r, keys, size):
    """oversized.blmove: BLMOVE's reply read from the socket by us.  An element up to
    the limit comes back byte for byte; a longer one as its head, length and SHA-1,
    while the element itself moves whole; nil and errors as redis-py gives them."""
    import hashlib

    from redpool.queue import connect

    lease = Lease(r, keys, "w")
    lease.register({"name": "w", "host": socket.gethostname(), "pid": os.getpid(),
                    "version": "test"}, lease=15.0)
    q = RedisQueue(r, keys, "w", ["default"])
    q.head_over = 100_000
    conn = connect(r.connection_pool.connection_kwargs and
                   f"redis://{r.connection_pool.connection_kwargs['host']}:"
                   f"{r.connection_pool.connection_kwargs['port']}/0", blocking_timeout=0.2)
    try:
        assert q.block_reserve(conn, "default", 0.1) is None          # nil, after a wait
        raw = os.urandom(size)
        r.hset(keys.crashes_of("default"), sha1(raw).hexdigest(), 2)  # (its crash count)
        r.lpush(keys.queue("default"), raw)
        got = q.block_reserve(conn, "default", 1.0)
        assert got.crashes == 2   # found by the whole job's hash, not its head's
        assert r.lrange(keys.processing("w", "default"), 0, -1) == [raw]
        if size <= q.head_over:
            assert got.raw == raw and got.raw.__class__ is bytes
        else:
            assert isinstance(got.raw, Oversized) and got.raw == raw[:p.DEAD_JOB_KEPT]
            assert got.raw.size == size and got.raw.sha == hashlib.sha1(raw).hexdigest()
            assert got.raw.tail == raw[-p.DEAD_JOB_KEPT:]
        assert conn.ping()                                            # still in step
        r.delete(keys.queue("default"))
        r.set(keys.queue("default"), "not a list")
        with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
            q.block_reserve(conn, "default", 0.1)
        assert conn.ping()
    finally:
        conn.close()


@pytest.mark.daemon
def test_a_reconcile_while_its_refusal_is_held_back_reads_no_oversized_job(tmp_path, namespace):
    # Given a 16 MB job refused (PayloadTooLarge) whose completion is held back: the
    # dead-letter list holds another type (keytypes.py), so the job stays, whole, in
    # our processing list, and we hold only its head
    import time

    from helpers import Daemon
    from redpool.protocol import Keys
    from redpool.server import EmbeddedServer

    keys = Keys(namespace)
    (tmp_path / "aof").mkdir()
    srv = EmbeddedServer(appendonly=True, dir=str(tmp_path / "aof")).start()
    d = None
    try:
        r = redis.Redis.from_url(srv.url, socket_timeout=120)  # (BRPOP waits 60 s)
        r.set(keys.dead, "not a list")
        d = Daemon(srv.url, namespace, "--max-payload", str(MAX_PAYLOAD), "--concurrency", "1",
                   "--lease", "10").start(tmp_path)
        d.wait_started()
        base = vm_kib(d.pid)["VmHWM"]
        reply = keys.reply("huge")
        raw = json.dumps({"id": "huge", "reply_to": reply, "task": "jobs.echo",
                          "args": ["z" * (16 * 1024 * 1024)]}).encode()
        r.lpush(keys.queue("default"), raw)
        proc = keys.processing("w1", "default")
        wait_for(lambda: any(e.get("event") == "job_finished" for e in d.events()),
                 timeout=60, what="its refusal")
        assert r.llen(proc) == 1 and not r.exists(reply)   # held back, not answered
        # When Redis goes away and comes back (its AOF keeps the job): a reconcile
        # follows the outage (a reply lost with the connection may hide a script that ran)
        srv.proc.kill()
        srv.proc.wait()
        time.sleep(1.0)
        srv.start()
        r = redis.Redis.from_url(srv.url, socket_timeout=120)  # (BRPOP waits 60 s)
        wait_for(lambda: any(e.get("event") == "redis_up" for e in d.events()), 60, 0.2,
                 "redis_up")
        # Then the reconcile (at the tick that saw Redis back: allowed two seconds) knows
        # the job by its hash: it stays in our list, not put back in its queue as a stray
        time.sleep(2.0)
        assert r.llen(keys.queue("default")) == 0 and r.llen(proc) == 1
        # and once the dead-letter list is fixed, the job is answered once and dead-lettered
        r.delete(keys.dead)
        env = answered(r, reply)
        check_refused(env, r.lrange(keys.dead, 0, -1), raw, "huge")
        wait_for(lambda: not r.llen(proc), timeout=30, what="its processing list to empty")
        time.sleep(1.0)
        assert not r.exists(reply) and r.llen(keys.queue("default")) == 0
        events = [e.get("event") for e in d.events()]
        assert "results_dropped" not in events and "reconciled" not in events, events
        assert events.count("job_finished") == 1
        grew = vm_kib(d.pid)["VmHWM"] - base
        print(f"supervisor peak +{grew} KiB for a job of {len(raw)} bytes (a reconcile "
              "while its refusal was held back)")
        assert grew * 1024 < len(raw) // 2, "the supervisor read the job whole"
    finally:
        if d is not None:
            d.kill()
        srv.stop()


def test_processing_lists_are_read_with_oversized_jobs_cut_and_put_back_by_hash(r, keys):
    # Given our processing list holding a small job and two big ones sharing a head
    q = RedisQueue(r, keys, "w", ["default"])
    q.head_over = limit(MAX_PAYLOAD)
    small = b'{"task": "t", "args": [1]}'
    one, two = big_job("same", "r") + b" ", big_job("same", "r") + b"  "
    r.lpush(keys.processing("w", "default"), one, small, two)
    # When it is read for a reconcile, each big one comes as its head, told apart by hash
    got = q.processing_contents()["default"]
    assert got[1] == small and got[1].__class__ is bytes
    big = [got[0], got[2]]
    assert all(isinstance(b, Oversized) and len(b) == p.DEAD_JOB_KEPT for b in big)
    assert [(b.size, b.sha) for b in big] == [(len(two), sha1(two).hexdigest()),
                                              (len(one), sha1(one).hexdigest())]
    assert big[0] != big[1] and len({big[0], big[1]}) == 2 and bytes(big[0]) == bytes(big[1])
    # Then one put back (a stray: a reply was lost) moves whole, found by hash in Redis
    assert q.requeue([("default", big[1]), ("default", small)]) == 2
    assert r.lrange(keys.queue("default"), 0, -1) == [small, one]   # (one: the next taken)
    assert r.lrange(keys.processing("w", "default"), 0, -1) == [two]
    # and one named by a hash that is not there moves nothing
    ghost = Oversized(bytes(big[0]))
    ghost.size, ghost.sha, ghost.tail = big[0].size, "0" * 40, big[0].tail
    assert q.requeue([("default", ghost)]) == 0
    assert r.lrange(keys.processing("w", "default"), 0, -1) == [two]
