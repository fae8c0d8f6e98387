"""The loop with a real RedisQueue on a real server (the pool faked, as in
test_supervisor_unit): what happens when another program overwrites our processing
list while jobs finish, and an operator then fixes it.

The completions the overwrite held back may go only once our jobs are back in the fixed
list: released before (while putting them back failed), they would find their jobs
gone, be taken for jobs a reaper took, and their answers be dropped (found in review)."""

from __future__ import annotations

import redis

from helpers import envelope
from redpool.config import WorkerConfig
from redpool.duties import Duties
from redpool.hooks import Hooks
from redpool.keytypes import RECHECK_EVERY, classify
from redpool.lease import Lease, Reaper
from redpool.queue import RedisQueue
from redpool.runner import Policy
from redpool.supervisor import Supervisor
from test_supervisor_unit import WORKER, Clock, FakePool, job


class Loop:
    def __init__(self, r, keys) -> None:
        self.cfg = WorkerConfig(modules=["tests"], queues=["default"], concurrency=1,
                                prefetch=0, name=WORKER)
        self.clock = Clock()
        self.rq = RedisQueue(r, keys, WORKER, ["default"])
        self.pool = FakePool(1, Policy(**self.cfg.child_defaults()))
        self.events: list[tuple[str, dict]] = []
        hooks = Hooks()
        hooks.subscribe(lambda name, fields: self.events.append((name, fields)))
        self.duties = Duties(self.cfg, self.rq, Lease(r, keys, WORKER), Reaper(r, keys, WORKER),
                             hooks, clock=self.clock)
        self.sup = Supervisor(self.cfg, self.rq, self.pool, self.duties, hooks=hooks,
                              clock=self.clock)
        self.sup.startup()

    def tick(self, dt: float = 0.0) -> None:
        self.clock.t += dt
        self.sup.tick([], self.clock.t)

    def named(self, event: str) -> list[dict]:
        return [f for name, f in self.events if name == event]


def test_held_completions_wait_until_the_fixed_processing_list_has_our_jobs_again(
        r, keys, monkeypatch):
    loop = Loop(r, keys)
    r.lpush(keys.queue("default"), job(1))
    loop.tick()
    [token] = loop.pool.busy()
    proc = keys.processing(WORKER, "default")
    assert r.lrange(proc, 0, -1) == [job(1)]

    # Another program overwrites our processing list; the job then finishes: its
    # completion is held back (the list it must leave is a string)
    r.set(proc, "overwritten")
    loop.pool.finish(token)
    loop.tick()
    assert loop.rq.holding() == [("default", job(1))]
    assert loop.named("queue_unusable") and not envelope(r, keys, "job-1")

    # An operator deletes the key; the supervisor sees it, but putting our job back
    # into the list fails (Redis went away at that moment)
    r.delete(proc)
    restore = loop.rq.restore
    calls = []

    def failing(items):
        calls.append(items)
        raise redis.ConnectionError("Connection reset by peer")
    monkeypatch.setattr(loop.rq, "restore", failing)
    loop.tick(RECHECK_EVERY + 0.1)
    assert calls, "the fix was seen and a restore tried"
    # Then the completion is still held back: nothing went that would find its job gone
    assert loop.rq.holding() == [("default", job(1))]
    for _ in range(3):
        loop.tick(0.1)
    assert not envelope(r, keys, "job-1") and not loop.named("results_dropped")

    # Once the restore works, the job is back in the list and answered from there
    monkeypatch.setattr(loop.rq, "restore", restore)
    for _ in range(20):
        loop.tick(0.5)
        if envelope(r, keys, "job-1"):
            break
    assert envelope(r, keys, "job-1")["status"] == "succeeded"
    assert loop.rq.holding() == [] and r.llen(proc) == 0
    assert not loop.named("results_dropped") and len(loop.named("queue_usable")) == 1


# -- errors told apart (keytypes.classify) -------------------------------------------------------

def test_a_script_on_a_read_only_replica_is_an_outage_whatever_wraps_the_error():
    """Redis 6.2 wraps the error of a command a script runs ("Error running script ...
    -READONLY ..."), which redis-py takes for a plain reply: still Redis read-only (a
    replica after a failover), an outage, not a refusal.  Likewise the other codes of
    an outage, and WRONGTYPE; a refusal stays one."""
    wrapped = ("Error running script (call to f_0123456789abcdef0123456789abcdef01234567): "
               "@user_script:12: @user_script: 12: -{} ")
    assert classify(redis.ResponseError(wrapped.format(
        "READONLY You can't write against a read only replica."))) == "down"
    assert classify(redis.ResponseError(wrapped.format(
        "LOADING Redis is loading the dataset in memory"))) == "down"
    assert classify(redis.ResponseError(wrapped.format(
        "MASTERDOWN Link with MASTER is down and replica-serve-stale-data is set to 'no'."
    ))) == "down"
    assert classify(redis.ResponseError(wrapped.format(
        "TRYAGAIN Multiple keys request during rehashing of slot"))) == "moving"
    assert classify(redis.ResponseError(wrapped.format(
        "WRONGTYPE Operation against a key holding the wrong kind of value"))) == "wrongtype"
    assert classify(redis.ResponseError(wrapped.format(
        "OOM command not allowed when used memory > 'maxmemory'."))) == "refused"
    assert classify(redis.ResponseError("ERR unknown command 'READONLY'")) == "refused"


def test_a_script_that_writes_on_a_real_replica_is_an_outage(redis_url):
    from redpool.server import EmbeddedServer

    port = redis.Redis.from_url(redis_url).connection_pool.connection_kwargs["port"]
    with EmbeddedServer(extra_args=["--replicaof", "127.0.0.1", str(port)]) as replica:
        rr = redis.Redis.from_url(replica.url)
        try:
            rr.eval("return redis.call('SET', KEYS[1], 'x')", 1, "redpool-readonly-probe")
        except redis.RedisError as e:
            print("Redis", rr.info("server")["redis_version"], "said:", repr(e))
            assert classify(e) == "down"
        else:
            raise AssertionError("a replica took a write")
        finally:
            rr.close()


# -- TYPE refused (an ACL user without +type) ----------------------------------------------------

def test_a_refused_type_is_said_once_with_what_to_grant_and_cleared_once_granted(r, keys,
                                                                                 redis_url):
    from redpool import acl

    assert "+type" in acl.rules("worker", keys.ns)   # what `redpool acl worker` grants
    user = f"{keys.ns}-worker"
    rules = [x for x in acl.rules("worker", keys.ns) if x != "+type"]
    r.execute_command("ACL", "SETUSER", user, *rules, ">pw")
    port = r.connection_pool.connection_kwargs["port"]
    worker = redis.Redis(host="127.0.0.1", port=port, username=user, password="pw")
    try:
        loop = Loop(worker, keys)     # (its start asks the type of every key it uses)
        said = [f for f in loop.named("redis_error") if f["during"] == "types"]
        assert len(said) == 1 and "'type'" in said[0]["error"] and "+type" in said[0]["note"]
        loop.duties.check_types(loop.clock.t + 10, probe=True)
        assert len([f for f in loop.named("redis_error") if f["during"] == "types"]) == 1
        r.execute_command("ACL", "SETUSER", user, "+type")
        loop.duties.check_types(loop.clock.t + 20, probe=True)
        assert [f for f in loop.named("redis_error_cleared") if f["during"] == "types"]
    finally:
        worker.close()
        r.execute_command("ACL", "DELUSER", user)
