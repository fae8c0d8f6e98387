"""Supervisor leases and the reaper (lease.py), against fakeredis and a real server.

A lease is a hash {epoch, info} at keys.supervisor(name) with a TTL judged by the
server's clock.  Reserving needs the epoch (test_queue_contract.py); here: who gets
a name, when a lease counts as lost, and how a dead supervisor's jobs come back.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pytest

from redpool.errors import NameInUse
from redpool.lease import Lease, Reaper
from redpool.queue import RedisQueue, Reserved
from test_queue_contract import (SUP, Backend, backend, crash_count, dead_pid,  # noqa: F401
                                 info, job, lrange, push, register, wait_until)

OTHER = "sup-2"


def plant(b: Backend, name: str, holder: dict | bytes, *, px: int = 15_000,
          epoch: str = "their-epoch") -> None:
    """A lease written by some other supervisor (or an earlier run of ours)."""
    key = b.keys.supervisor(name)
    b.r.hset(key, mapping={"epoch": epoch,
                           "info": holder if isinstance(holder, bytes) else json.dumps(holder)})
    b.r.pexpire(key, px)
    b.r.sadd(b.keys.supervisors, name)


def lease_of(b: Backend, name: str = SUP) -> tuple[str | None, dict | None]:
    """(epoch, info) of the lease on ``name``, or (None, None)."""
    h = b.r.hgetall(b.keys.supervisor(name))
    if not h:
        return None, None
    return h[b"epoch"].decode(), json.loads(h[b"info"])


def next_round(b: Backend) -> None:
    """The reaper lock expires (without the wait): another round may start."""
    b.r.delete(b.keys.reaper)


def expire_lease(b: Backend, name: str) -> None:
    """What the server does when a lease is not renewed in time (without the wait)."""
    b.r.delete(b.keys.supervisor(name))


# -- register ---------------------------------------------------------------------------------

def test_register_claims_a_free_name_with_an_epoch_and_a_ttl(backend):
    b = backend
    held = Lease(b.r, b.keys, SUP)

    held.register(info(), lease=15.0)

    epoch, written = lease_of(b)
    assert held.epoch and epoch == held.epoch
    assert written == info()
    assert 14_000 <= b.r.pttl(b.keys.supervisor(SUP)) <= 15_000
    assert b.r.smembers(b.keys.supervisors) == {SUP.encode()}


def test_every_registration_has_a_new_epoch(backend):
    b = backend
    first = register(b, SUP)
    expire_lease(b, SUP)
    second = register(b, SUP)
    assert first.epoch != second.epoch
    assert lease_of(b)[0] == second.epoch


def test_register_refuses_a_live_holder_on_another_host(backend):
    b = backend
    plant(b, SUP, info(pid=1, host="another-host.example"))

    with pytest.raises(NameInUse, match="another-host.example") as e:
        Lease(b.r, b.keys, SUP).register(info(), lease=15.0)

    assert "--name" in str(e.value)
    assert lease_of(b) == ("their-epoch", info(pid=1, host="another-host.example"))


def test_register_refuses_a_live_process_on_this_host(backend):
    b = backend
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        plant(b, SUP, info(pid=other.pid))

        with pytest.raises(NameInUse, match=str(other.pid)):
            Lease(b.r, b.keys, SUP).register(info(), lease=15.0)

        assert lease_of(b)[0] == "their-epoch"
    finally:
        other.kill()
        other.wait()


def test_register_refuses_an_unreadable_live_lease(backend):
    b = backend
    plant(b, SUP, b"not json")
    # no host, no pid: we cannot tell it is dead, so we must not take it
    with pytest.raises(NameInUse):
        Lease(b.r, b.keys, SUP).register(info(), lease=15.0)
    assert b.r.hget(b.keys.supervisor(SUP), "info") == b"not json"


def test_register_takes_over_a_lease_left_by_a_dead_process_on_this_host(backend):
    b = backend
    # Given a lease left by a supervisor on this host that was kill -9'd
    plant(b, SUP, info(pid=dead_pid()))
    held = Lease(b.r, b.keys, SUP)

    # When we start under the same name within its lease
    held.register(info(), lease=5.0)

    # Then the name is ours, under our epoch and lease
    epoch, written = lease_of(b)
    assert epoch == held.epoch != "their-epoch"
    assert written["pid"] == os.getpid()
    assert 4_000 <= b.r.pttl(b.keys.supervisor(SUP)) <= 5_000
    assert b.r.sismember(b.keys.supervisors, SUP)


def test_register_waits_out_a_lease_with_our_own_pid_then_takes_it(backend):
    # Given a lease with our pid on this host (a restarted container is pid 1 again)
    # that nobody renews
    b = backend
    plant(b, SUP, info(), px=400)
    held = Lease(b.r, b.keys, SUP)
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        time.sleep(seconds)

    # When we register, we wait for it to expire, then the name is ours
    held.register(info(), lease=2.0, sleep=sleep)

    assert slept, "it was taken without waiting"
    assert lease_of(b)[0] == held.epoch
    assert 1_000 <= b.r.pttl(b.keys.supervisor(SUP)) <= 2_000


def test_register_refuses_a_renewed_lease_with_our_own_pid(backend):
    # Given a twin (same host name, same pid in its own pid namespace) that renews
    b = backend
    key = b.keys.supervisor(SUP)
    plant(b, SUP, info(), px=1_000)

    def renewing_sleep(seconds: float) -> None:
        b.r.pexpire(key, 1_000)
        time.sleep(0.02)

    with pytest.raises(NameInUse):
        Lease(b.r, b.keys, SUP).register(info(), lease=0.3, sleep=renewing_sleep)

    assert lease_of(b)[0] == "their-epoch"


# -- renew ------------------------------------------------------------------------------------

def test_renew_extends_our_lease_and_set_membership(backend):
    b = backend
    held = register(b, SUP, lease=2.0)
    b.r.srem(b.keys.supervisors, SUP)

    assert held.renew({**info(), "inflight": 3}, lease=30.0) is True

    epoch, written = lease_of(b)
    assert epoch == held.epoch and written["inflight"] == 3
    assert 29_000 <= b.r.pttl(b.keys.supervisor(SUP)) <= 30_000
    assert b.r.sismember(b.keys.supervisors, SUP)


def test_renew_after_the_lease_expired_is_refused(backend):
    b = backend
    held = register(b, SUP, lease=0.2)
    wait_until(lambda: not b.r.exists(b.keys.supervisor(SUP)), what="the lease to expire")

    assert held.renew(info(), lease=15.0) is False

    # and the lease is not brought back to life: we must register anew
    assert b.r.exists(b.keys.supervisor(SUP)) == 0


def test_renew_after_someone_else_registered_is_refused(backend):
    b = backend
    held = register(b, SUP)
    expire_lease(b, SUP)
    successor = register(b, SUP, lease=15.0)

    assert held.renew({**info(), "mine": True}, lease=60.0) is False

    epoch, written = lease_of(b)
    assert epoch == successor.epoch and "mine" not in written
    assert b.r.pttl(b.keys.supervisor(SUP)) <= 15_000


# -- unregister -------------------------------------------------------------------------------

def test_unregister_removes_our_lease_and_membership(backend):
    b = backend
    held = register(b, SUP)
    register(b, OTHER)

    held.unregister()

    assert b.r.exists(b.keys.supervisor(SUP)) == 0
    assert b.r.smembers(b.keys.supervisors) == {OTHER.encode()}
    # and the name is free again, even for a supervisor on another host
    Lease(b.r, b.keys, SUP).register(info(pid=1, host="h2"), lease=15.0)


def test_unregister_leaves_a_successors_lease_alone(backend):
    b = backend
    held = register(b, SUP)
    expire_lease(b, SUP)
    successor = register(b, SUP)

    held.unregister()

    assert lease_of(b)[0] == successor.epoch
    assert b.r.sismember(b.keys.supervisors, SUP)
    assert successor.renew(info(), lease=15.0) is True


# -- the reaper -------------------------------------------------------------------------------

def dead_supervisor_holding_jobs(b: Backend) -> tuple[RedisQueue, str]:
    """A alive and holding job 9; B registered, took jobs 1, 2 (queue a) and 4 (queue b),
    then its lease ran out.  Job 3 still waits on queue a.  Returns (A's queue, A's epoch)."""
    a_epoch = register(b, "sup-a").epoch
    a = RedisQueue(b.r, b.keys, "sup-a", ["c"])
    push(b, "c", job(9))
    assert a.reserve(1, a_epoch) == [Reserved("c", job(9), 0)]
    push(b, "a", job(1), job(2), job(3))
    push(b, "b", job(4))
    dead = RedisQueue(b.r, b.keys, "sup-b", ["a", "b"])
    dead_epoch = register(b, "sup-b").epoch
    assert [x.raw for x in dead.reserve(2, dead_epoch)] == [job(1), job(2)]
    assert [x.raw for x in RedisQueue(b.r, b.keys, "sup-b", ["b"]).reserve(1, dead_epoch)] \
        == [job(4)]
    expire_lease(b, "sup-b")
    return a, a_epoch


def test_reaper_puts_a_dead_supervisors_jobs_back_at_the_head(backend):
    b = backend
    a, _ = dead_supervisor_holding_jobs(b)
    a_lease = lease_of(b, "sup-a")

    reaped = Reaper(b.r, b.keys, "sup-a").run(lock_seconds=5.0)

    assert reaped == {"sup-b": 3}
    # at the head (right end) of their queues, in the order they were taken: the oldest
    # is the next to be taken, before job 3 that never left
    assert lrange(b, b.keys.queue("a")) == [job(3), job(2), job(1)]
    assert lrange(b, b.keys.queue("b")) == [job(4)]
    assert lrange(b, b.keys.processing("sup-b", "a")) == []
    assert lrange(b, b.keys.processing("sup-b", "b")) == []
    # each one crashed once (its host died running it); the job that waited did not
    assert [crash_count(b, job(n)) for n in (1, 2, 3, 4)] == [1, 1, None, 1]
    # B is no longer a member; A is untouched
    assert b.r.smembers(b.keys.supervisors) == {b"sup-a"}
    assert lease_of(b, "sup-a") == a_lease
    assert lrange(b, b.keys.processing("sup-a", "c")) == [job(9)]
    assert crash_count(b, job(9)) is None
    # and the lock is left to expire: it paces the rounds, cluster-wide
    assert b.r.get(b.keys.reaper) == b"sup-a"
    assert 0 < b.r.pttl(b.keys.reaper) <= 5_000


def test_the_reaper_survives_a_name_and_a_key_that_are_not_utf8(backend):
    # Given what redpool never writes: a member of the supervisors set, and one of its
    # processing lists, named with bytes that are not UTF-8 (by hand, or another tool)
    b = backend
    register(b, "sup-a")
    name, queue = b"sup-\xff", b"q\xfe"
    ns = b.keys.ns.encode()
    b.r.sadd(b.keys.supervisors, name)
    b.r.lpush(ns + b":processing:" + name + b":" + queue, job(1))
    # When a reaper runs (every supervisor's, once a second)
    reaped = Reaper(b.r, b.keys, "sup-a").run()
    # Then it puts the job back where it came from, byte for byte, instead of raising
    assert reaped == {"sup-\udcff": 1}
    assert lrange(b, ns + b":queue:" + queue) == [job(1)]
    assert b.r.smembers(b.keys.supervisors) == {b"sup-a"}


def test_a_reaped_job_is_reserved_again_with_its_crash_count(backend):
    b = backend
    _, a_epoch = dead_supervisor_holding_jobs(b)
    assert Reaper(b.r, b.keys, "sup-a").run() == {"sup-b": 3}
    a = RedisQueue(b.r, b.keys, "sup-a", ["a", "b"])

    got = a.reserve(10, a_epoch)

    assert [(x.queue, x.raw, x.crashes) for x in got] == [
        ("a", job(1), 1), ("a", job(2), 1), ("a", job(3), 0), ("b", job(4), 1)]
    # which of a dead supervisor's jobs had started is unknown: the reap's time stands
    # for the start of each (it may have run by then), never nothing
    reaped = {x.crashed_at for x in got if x.crashes}
    assert len(reaped) == 1 and None not in reaped and got[2].crashed_at is None


def test_reaper_leaves_live_supervisors_alone(backend):
    b = backend
    register(b, "sup-a")
    push(b, "a", job(1))
    RedisQueue(b.r, b.keys, "sup-b", ["a"]).reserve(1, register(b, "sup-b").epoch)

    assert Reaper(b.r, b.keys, "sup-a").run() == {}

    assert lrange(b, b.keys.processing("sup-b", "a")) == [job(1)]
    assert b.r.smembers(b.keys.supervisors) == {b"sup-a", b"sup-b"}


def test_reaper_unregisters_a_dead_supervisor_that_held_nothing(backend):
    b = backend
    register(b, "sup-a")
    register(b, "sup-b")
    expire_lease(b, "sup-b")
    assert Reaper(b.r, b.keys, "sup-a").run() == {"sup-b": 0}
    assert b.r.smembers(b.keys.supervisors) == {b"sup-a"}


def test_reap_does_nothing_if_the_lease_came_back(backend):
    b = backend
    dead_supervisor_holding_jobs(b)
    reaper = Reaper(b.r, b.keys, "sup-a")
    # Given B renewed (re-registered) after it was found dead but before it was reaped
    register(b, "sup-b")

    assert reaper.reap("sup-b") == 0

    assert lrange(b, b.keys.processing("sup-b", "a")) == [job(2), job(1)]
    assert lrange(b, b.keys.processing("sup-b", "b")) == [job(4)]
    assert lrange(b, b.keys.queue("a")) == [job(3)]
    assert b.r.exists(b.keys.crashes) == 0
    assert b.r.sismember(b.keys.supervisors, "sup-b")


def test_only_one_reaper_runs_at_a_time(backend):
    b = backend
    dead_supervisor_holding_jobs(b)
    first = Reaper(b.r, b.keys, "sup-a")
    second = Reaper(b.connect(), b.keys, "sup-c")
    inside, release = threading.Event(), threading.Event()
    real_reap = first.reap

    def slow_reap(dead: str) -> int:
        inside.set()
        release.wait(10)
        return real_reap(dead)

    first.reap = slow_reap
    out: dict = {}
    t = threading.Thread(target=lambda: out.update(first=first.run(lock_seconds=10.0)))

    # Given one reaper in the middle of a round (holding keys.reaper)
    t.start()
    assert inside.wait(10)
    assert b.r.get(b.keys.reaper) == b"sup-a"

    # When another supervisor starts a round, it does nothing
    assert second.run() == {}
    assert lrange(b, b.keys.processing("sup-b", "a")) == [job(2), job(1)]

    # Then the first one finishes its round; the jobs were put back once
    release.set()
    t.join(10)
    assert out["first"] == {"sup-b": 3}
    assert [crash_count(b, job(n)) for n in (1, 2, 4)] == [1, 1, 1]
    assert second.run() == {}   # still within the first one's round
    next_round(b)
    assert second.run() == {}   # nothing left to reap
    assert [crash_count(b, job(n)) for n in (1, 2, 4)] == [1, 1, 1]


def test_rounds_are_paced_by_the_lock_cluster_wide(backend):
    b = backend
    register(b, "sup-a")
    register(b, "sup-b")
    reaper_a, reaper_c = Reaper(b.r, b.keys, "sup-a"), Reaper(b.r, b.keys, "sup-c")
    assert reaper_a.run(lock_seconds=0.15) == {}

    # When B dies right after a round, no supervisor reaps again within lock_seconds
    expire_lease(b, "sup-b")
    assert reaper_a.run(lock_seconds=0.15) == {}
    assert reaper_c.run(lock_seconds=0.15) == {}
    assert b.r.sismember(b.keys.supervisors, "sup-b")

    # Then the next round, by whoever comes first, reaps it
    wait_until(lambda: not b.r.exists(b.keys.reaper), what="the reaper lock to expire")
    assert reaper_c.run(lock_seconds=0.15) == {"sup-b": 0}


def test_a_stale_reaper_lock_expires(backend):
    b = backend
    dead_supervisor_holding_jobs(b)
    # Given a reaper died holding the lock
    b.r.set(b.keys.reaper, "sup-gone", px=150)
    reaper = Reaper(b.r, b.keys, "sup-a")
    assert reaper.run() == {}

    wait_until(lambda: not b.r.exists(b.keys.reaper), what="the reaper lock to expire")
    assert reaper.run() == {"sup-b": 3}


def test_a_reaper_leaves_a_lock_it_does_not_hold(backend):
    b = backend
    b.r.set(b.keys.reaper, "sup-other", px=10_000)
    assert Reaper(b.r, b.keys, "sup-a").run() == {}
    assert b.r.get(b.keys.reaper) == b"sup-other"


def test_a_reaper_never_reaps_itself(backend):
    # Our own lost lease is noticed by renewal (which re-registers and reconciles), not
    # by our reaper taking our running jobs away from under us.
    b = backend
    held = register(b, "sup-a")
    push(b, "a", job(1))
    RedisQueue(b.r, b.keys, "sup-a", ["a"]).reserve(1, held.epoch)
    expire_lease(b, "sup-a")

    assert Reaper(b.r, b.keys, "sup-a").run() == {}
    assert lrange(b, b.keys.processing("sup-a", "a")) == [job(1)]

    # but any other supervisor does
    next_round(b)
    assert Reaper(b.r, b.keys, "sup-c").run() == {"sup-a": 1}
    assert lrange(b, b.keys.queue("a")) == [job(1)]
