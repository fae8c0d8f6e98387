"""Jobs far over --max-payload (oversized.py): answered PayloadTooLarge and dead-lettered
with their head, on one server and on a Redis Cluster, without the supervisor ever
holding them whole; a supervisor that dies with one reserved leaves it whole in Redis."""

from __future__ import annotations

import json
import os
import socket

import pytest
import redis

from helpers import wait_for
from hostile.invariants import vm_kib
from redpool import protocol as p
from redpool.lease import Lease
from redpool.oversized import Oversized, head_fields, limit, refusal
from redpool.queue import RedisQueue

MAX_PAYLOAD = 100_000
BIG = 3 * 1024 * 1024


def big_job(label: str, reply_to: str) -> bytes:
    return json.dumps({"id": label, "reply_to": reply_to, "task": "jobs.echo",
                       "args": ["z" * BIG]}).encode()


def test_head_fields_reads_the_members_whole_within_the_head():
    head = b'\xef\xbb\xbf {"id": "a1", "reply_to":"ns:reply:a1", "result_ttl": 5, "args": ["zz'
    assert head_fields(head) == {"job_id": "a1", "reply_to": "ns:reply:a1", "result_ttl": 5}
    assert head_fields(b'{"task":"t","id":"x') == {"task": "t"}   # the id is cut off
    assert head_fields(b'[1, 2') == {} and head_fields(b'') == {}
    assert head_fields(b'{"x":' + b"[" * 5000) == {}              # too deep: nothing, no error


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
def test_an_oversized_job_on_a_cluster(cluster_daemons, rc, cluster_keys):
    d = cluster_daemons("--max-payload", str(MAX_PAYLOAD), "--concurrency", "1")
    d.wait_started()
    k = cluster_keys
    reply = k.reply("bigc")
    raw = big_job("bigc", reply)
    rc.lpush(k.queue("default"), raw)
    env = answered(rc, reply)
    check_refused(env, rc.lrange(k.dead_of("default"), 0, -1), raw, "bigc")


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
