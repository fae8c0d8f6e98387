"""Supervisor.tick(ready, now) driven with a fake queue, a fake pool and a fake clock.

No Redis, no processes: each test is a story of a few ticks and runs in milliseconds.
The fakes keep only the surface the supervisor uses.  The Done messages are genuine:
a real child.Runner runs a real task and packs its outcome exactly as a pool child does.
"""

from __future__ import annotations

import signal
from collections import deque

import pytest
import redis

from redpool import protocol as p
from redpool.child import Runner
from redpool.config import WorkerConfig
from redpool.hooks import Hooks
from redpool.pool import BootFailed, Died, Done, describe_exit
from redpool.registry import Registry
from redpool.supervisor import DRAINING, RUNNING, STOPPED, Supervisor

WORKER = "unit-sup"

registry = Registry()


@registry.task(name="tests.add")
def add(a, b):
    return a + b


@registry.task(name="tests.boom")
def boom():
    raise RuntimeError("boom")


def job(n: int, task: str = "tests.add", **kw) -> bytes:
    args = [n, 1] if task == "tests.add" else []
    return p.encode_job(p.make_job(task, args, id=f"job-{n}", now=1700000000.0, **kw))


# -- fakes ------------------------------------------------------------------------------------

class FakeQueue:
    """Records every call; serves a scripted list of (queue, raw) jobs; can be 'down'."""

    def __init__(self, jobs=(), queues=("default",)):
        self.queues = list(queues)
        self.ready: deque[tuple[str, bytes]] = deque(jobs)
        self.calls: list[str] = []
        self.reserve_calls: list[int] = []
        self.complete_calls: list[list] = []     # batches that reached "Redis"
        self.requeue_calls: list[list] = []
        self.recover_calls = 0
        self.heartbeats = 0
        self.registered = self.unregistered = False
        self.missing = 0
        self.down = False

    def _io(self, what: str) -> None:
        self.calls.append(what)
        if self.down:
            raise redis.ConnectionError("Error 111 connecting to localhost:6379. Connection refused.")

    def push(self, *jobs: tuple[str, bytes]) -> None:
        self.ready.extend(jobs)

    def reserve(self, n):
        self._io("reserve")
        self.reserve_calls.append(n)
        return [self.ready.popleft() for _ in range(min(n, len(self.ready)))]

    def complete(self, items):
        self._io("complete")
        self.complete_calls.append(list(items))
        return self.missing, 0

    def requeue(self, items):
        self._io("requeue")
        self.requeue_calls.append(list(items))
        self.ready.extendleft(reversed(items))   # back at the head, oldest first
        return len(items)

    def recover(self):
        self._io("recover")
        self.recover_calls += 1
        return {}

    def register(self, info, lease):
        self._io("register")
        self.registered = True

    def heartbeat(self, info, lease):
        self._io("heartbeat")
        self.heartbeats += 1

    def unregister(self):
        self._io("unregister")
        self.unregistered = True

    @property
    def completed(self) -> list:
        return [c for batch in self.complete_calls for c in batch]


class FakeChild:
    def __init__(self, pid: int):
        self.pid = pid
        self.ready = True
        self.token: int | None = None
        self.stopping = False


class FakePool:
    """Idle children that never run anything by themselves: the test finishes jobs."""

    def __init__(self, size: int):
        self.size = size
        self._pids = iter(range(1001, 10_000))
        self.children = [FakeChild(next(self._pids)) for _ in range(size)]
        self.respawn_backoff = 0.0
        self.next_spawn_at = 0.0
        self.sent: list[tuple[int, int, str, bytes]] = []   # (pid, token, queue, raw)
        self.events: deque = deque()
        self.reconciles: list[float] = []
        self.terminated = self.killed = self.closed = self.started = False
        self.runner = Runner(registry, WORKER, p.DEFAULT_MAX_PAYLOAD)

    # the surface the supervisor uses
    def start(self):
        self.started = True

    def idle(self):
        return [c for c in self.children if c.ready and c.token is None and not c.stopping]

    def send(self, c, token, queue, raw):
        c.token = token
        self.sent.append((c.pid, token, queue, raw))

    def poll(self, ready):
        out = list(self.events)
        self.events.clear()
        return out

    def waitables(self):
        return []

    def reconcile(self, now):
        self.reconciles.append(now)
        return []

    def terminate(self, grace=2.0):
        self.terminated = True
        self.children.clear()

    def kill_all(self):
        self.killed = True
        self.children.clear()

    def close(self, timeout=2.0):
        self.closed = True
        self.children.clear()

    @property
    def shut(self) -> bool:
        """Its children were ended, by whichever of close() / kill_all() the supervisor used."""
        return self.killed or self.closed

    # what the test makes happen
    def busy(self) -> dict[int, FakeChild]:
        return {c.token: c for c in self.children if c.token is not None}

    def finish(self, token: int) -> bytes:
        """The child holding ``token`` finishes: a genuine MSG_DONE from a real Runner."""
        c = self.busy()[token]
        _, _, queue, raw = next(s for s in self.sent if s[1] == token)
        msg = self.runner.run(token, queue, raw)
        c.token = None
        self.events.append(Done(token, msg, c.pid))
        return msg

    def finish_all(self) -> None:
        for token in list(self.busy()):
            self.finish(token)

    def die(self, token: int | None, exitcode: int = -signal.SIGKILL, pid: int | None = None):
        c = self.busy()[token] if token is not None else next(x for x in self.children if x.pid == pid)
        self.children.remove(c)
        self.events.append(Died(token, c.pid, exitcode, describe_exit(exitcode)))
        return c


class FakeWaiter:
    def __init__(self):
        self.armed = False
        self.inbox: deque = deque()
        self.errors: deque = deque()
        self.arms = self.disarms = 0
        self.started = self.stopped = False

    def start(self):
        self.started = True

    def stop(self):
        self.stopped = True

    def close(self):
        self.closed = True

    def arm(self):
        self.armed = True
        self.arms += 1

    def disarm(self):
        self.armed = False
        self.disarms += 1

    def take(self):
        out = list(self.inbox)
        self.inbox.clear()
        return out

    def fileno(self):
        return -1


class Clock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


class World:
    """A supervisor with its fakes, and the events it emitted."""

    def __init__(self, jobs=(), *, size=2, prefetch=2, burst=False, grace=10.0,
                 queues=("default",), waiter=False, lease=15.0):
        self.cfg = WorkerConfig(modules=["tests"], queues=list(queues), concurrency=size,
                                prefetch=prefetch, burst=burst, grace=grace, name=WORKER,
                                lease=lease)
        self.rq = FakeQueue([(queues[0], j) if isinstance(j, bytes) else j for j in jobs], queues)
        self.pool = FakePool(size)
        self.waiter = FakeWaiter() if waiter else None
        self.events: list[tuple[str, dict]] = []
        hooks = Hooks()
        hooks.subscribe(lambda name, fields: self.events.append((name, fields)))
        self.clock = Clock()
        self.sup = Supervisor(self.cfg, self.rq, self.pool, waiter=self.waiter, hooks=hooks,
                              clock=self.clock)
        # Heartbeats are tested on their own; elsewhere keep them out of the call logs.
        self.sup.next_heartbeat = float("inf")

    def tick(self, dt: float = 0.0) -> None:
        self.clock.t += dt
        self.sup.tick([], self.clock.t)

    def named(self, name: str) -> list[dict]:
        return [f for n, f in self.events if n == name]

    def inflight(self) -> dict[int, tuple[str, bytes]]:
        """token -> (queue, raw); whatever else the supervisor keeps per job is its own."""
        return {t: (v[0], v[1]) for t, v in self.sup.inflight.items()}

    def tokens(self) -> list[int]:
        return list(self.pool.busy())


def env_of(c) -> dict:
    return p.loads(c.envelope)


# -- reserving and dispatching ----------------------------------------------------------------

def test_reserve_asks_for_idle_children_plus_prefetch_minus_backlog():
    w = World([job(i) for i in range(10)], size=2, prefetch=3)

    w.tick()
    # 2 idle + 3 prefetch, nothing reserved yet
    assert w.rq.reserve_calls == [5]
    assert len(w.pool.sent) == 2
    assert len(w.sup.backlog) == 3

    w.tick()
    # no idle child and a full backlog: nothing asked for
    assert w.rq.reserve_calls == [5]

    w.pool.finish(w.tokens()[0])
    w.tick()
    # the freed child took one from the backlog; the backlog is topped up by one
    assert w.rq.reserve_calls == [5, 1]
    assert len(w.pool.sent) == 3
    assert len(w.sup.backlog) == 3


def test_prefetch_zero_reserves_only_for_idle_children():
    w = World([job(i) for i in range(10)], size=3, prefetch=0)
    w.tick()
    assert w.rq.reserve_calls == [3]
    assert not w.sup.backlog


def test_jobs_are_dispatched_to_distinct_idle_children_in_order():
    w = World([job(1), job(2), job(3)], size=2, prefetch=1)

    w.tick()

    assert [(pid, raw) for pid, _, _, raw in w.pool.sent] == [(1001, job(1)), (1002, job(2))]
    tokens = [t for _, t, _, _ in w.pool.sent]
    assert len(set(tokens)) == 2
    assert set(w.sup.inflight) == set(tokens)
    assert list(w.sup.backlog) == [("default", job(3))]


def test_jobs_keep_their_queue_when_dispatched():
    w = World([("high", job(1)), ("low", job(2))], size=2, queues=("high", "low"))
    w.tick()
    assert [(q, raw) for _, _, q, raw in w.pool.sent] == [("high", job(1)), ("low", job(2))]


def test_pool_is_reconciled_every_running_tick():
    w = World(size=1)
    w.tick()
    w.tick(1.0)
    assert w.pool.reconciles == [1000.0, 1001.0]


# -- acknowledging ----------------------------------------------------------------------------

def test_completions_from_several_done_events_are_flushed_in_one_call():
    j1, j2, j3 = job(1), job(2, reply_to="replies"), job(3, task="tests.boom")
    w = World([j1, j2, j3], size=3, prefetch=0)
    w.tick()
    assert len(w.pool.sent) == 3

    # Given three children finish between two ticks
    w.pool.finish_all()
    w.tick()

    # Then one complete() call acknowledges all three
    assert len(w.rq.complete_calls) == 1
    by_raw = {c.raw: c for c in w.rq.complete_calls[0]}
    assert set(by_raw) == {j1, j2, j3}

    ok = by_raw[j2]
    assert (ok.queue, ok.result_id, ok.ttl, ok.reply_to, ok.dead) == \
        ("default", "job-2", p.DEFAULT_RESULT_TTL, "replies", None)
    assert env_of(ok)["status"] == p.SUCCEEDED and env_of(ok)["result"] == 3
    assert env_of(ok)["worker"] == WORKER

    failed = env_of(by_raw[j3])
    assert failed["status"] == p.FAILED and failed["error"]["type"] == "RuntimeError"
    assert not w.sup.pending and not w.sup.inflight
    assert w.sup.stats["succeeded"] == 2 and w.sup.stats["failed"] == 1
    assert [f["id"] for f in w.named("job_finished")] == ["job-1", "job-2", "job-3"]


def test_nothing_to_acknowledge_makes_no_call():
    w = World([job(1)], size=1)
    w.tick()
    w.tick()
    assert w.rq.complete_calls == []


def test_a_bad_job_is_acknowledged_with_a_dead_entry():
    bad = b'{"id":"job-9","task":"no.such.task","reply_to":"r"}'
    w = World([bad], size=1, prefetch=0)
    w.tick()
    w.pool.finish_all()
    w.tick()
    (c,) = w.rq.completed
    assert c.raw == bad and c.dead is not None
    assert env_of(c)["error"]["type"] == p.E_UNKNOWN_TASK
    assert w.sup.stats["dead"] == 1
    assert w.named("job_finished")[0]["dead"] is True


def test_results_dropped_by_fencing_are_reported():
    w = World([job(1)], size=1, prefetch=0)
    w.tick()
    w.rq.missing = 1
    w.pool.finish_all()
    w.tick()
    assert w.named("results_dropped") == [
        {"count": 1, "reason": "jobs were no longer in our processing list (taken back)"}]
    assert not w.sup.pending


# -- children dying ---------------------------------------------------------------------------

def test_a_dead_child_fails_exactly_its_job():
    j1 = job(1, reply_to="replies")
    w = World([j1, job(2)], size=2, prefetch=0)
    w.tick()
    t1, t2 = [t for _, t, _, _ in w.pool.sent]

    # When the child running job 1 is killed by SIGKILL
    w.pool.die(t1, exitcode=-signal.SIGKILL)
    w.tick()

    # Then exactly one failed completion, for job 1, names the cause
    (c,) = w.rq.completed
    assert (c.queue, c.raw, c.result_id, c.reply_to, c.dead) == \
        ("default", j1, "job-1", "replies", None)
    env = env_of(c)
    assert env["status"] == p.FAILED and env["id"] == "job-1" and env["task"] == "tests.add"
    assert env["error"]["type"] == p.E_WORKER_CRASHED
    assert describe_exit(-signal.SIGKILL) in env["error"]["message"]
    assert "out-of-memory" in env["error"]["message"]
    # and the other job runs on, untouched
    assert w.inflight() == {t2: ("default", job(2))}
    assert w.sup.stats["crashed"] == 1
    (died,) = w.named("child_died")
    assert died["had_job"] is True and died["exitcode"] == -signal.SIGKILL
    assert w.named("job_crashed")[0]["id"] == "job-1"


def test_a_crashed_job_with_result_ttl_0_writes_no_result_key():
    w = World([job(1, result_ttl=0, reply_to="r")], size=1, prefetch=0)
    w.tick()
    w.pool.die(w.tokens()[0], exitcode=1)
    w.tick()
    (c,) = w.rq.completed
    assert c.result_id is None and c.ttl == 0 and c.reply_to == "r"
    assert "exited with code 1" in env_of(c)["error"]["message"]


def test_a_crashed_unreadable_job_is_still_removed():
    w = World([b"\xff not json"], size=1, prefetch=0)
    w.tick()
    w.pool.die(w.tokens()[0])
    w.tick()
    (c,) = w.rq.completed
    assert c.raw == b"\xff not json" and c.envelope is None


def test_a_child_dying_idle_fails_nothing():
    w = World([job(1)], size=2, prefetch=0)
    w.tick()
    idle = next(c for c in w.pool.children if c.token is None)
    w.pool.die(None, exitcode=-signal.SIGSEGV, pid=idle.pid)
    w.tick()
    assert w.rq.complete_calls == []
    assert len(w.sup.inflight) == 1
    (died,) = w.named("child_died")
    assert died["had_job"] is False and "segmentation fault" in died["description"]


def test_boot_failure_of_a_replacement_is_reported_with_its_backoff():
    w = World(size=1)
    w.pool.respawn_backoff = 2.0
    w.pool.events.append(BootFailed(4242, "ImportError: no module named tests"))
    w.tick()
    assert w.named("child_boot_failed") == [
        {"pid": 4242, "message": "ImportError: no module named tests", "retry_in": 2.0}]
    assert w.sup.state == RUNNING


# -- burst ------------------------------------------------------------------------------------

def test_burst_stops_at_once_on_empty_queues():
    w = World([], burst=True)
    w.tick()
    assert w.sup.state == STOPPED
    assert len(w.named("burst_done")) == 1


def test_burst_waits_for_in_flight_work_before_stopping():
    w = World([job(1), job(2)], size=2, prefetch=2, burst=True)

    w.tick()
    # the queues are empty, but two jobs run
    assert w.sup.state == RUNNING
    w.tick()
    assert w.sup.state == RUNNING

    w.pool.finish(w.tokens()[0])
    w.tick()
    assert w.sup.state == RUNNING   # one still runs

    w.pool.finish_all()
    w.tick()
    assert w.sup.state == STOPPED
    assert len(w.rq.completed) == 2
    assert w.named("burst_done") == [{}]


def test_burst_does_not_stop_with_unacknowledged_results():
    w = World([job(1)], size=1, prefetch=0, burst=True)
    w.tick()
    w.rq.down = True
    w.pool.finish_all()
    w.tick()
    assert w.sup.state == RUNNING and len(w.sup.pending) == 1
    w.rq.down = False
    w.tick(10.0)
    assert w.sup.state == STOPPED
    assert len(w.rq.completed) == 1


# -- stopping ---------------------------------------------------------------------------------

def test_sigterm_drains_requeues_backlog_and_stops_when_work_is_done():
    w = World([job(i) for i in range(6)], size=1, prefetch=2)
    w.tick()
    assert len(w.sup.inflight) == 1 and len(w.sup.backlog) == 2
    reserves = len(w.rq.reserve_calls)

    # When SIGTERM arrives
    w.sup.handle_signal(signal.SIGTERM, w.clock.t)

    # Then the unstarted jobs go back, oldest first, and nothing more is taken
    assert w.sup.state == DRAINING
    assert w.rq.requeue_calls == [[("default", job(1)), ("default", job(2))]]
    assert not w.sup.backlog
    (draining,) = w.named("draining")
    assert draining == {"signal": "SIGTERM", "running": 1, "grace": 10.0}
    w.tick(1.0)
    w.tick(1.0)
    assert len(w.rq.reserve_calls) == reserves
    assert w.sup.state == DRAINING
    assert len(w.pool.sent) == 1

    # When the running job finishes, it is acknowledged and the supervisor stops
    w.pool.finish_all()
    w.tick(1.0)
    assert w.sup.state == STOPPED
    assert [c.raw for c in w.rq.completed] == [job(0)]
    assert not w.pool.terminated


def test_sigint_drains_like_sigterm():
    w = World([job(1)], size=1)
    w.tick()
    w.sup.handle_signal(signal.SIGINT, w.clock.t)
    assert w.sup.state == DRAINING
    assert w.named("draining")[0]["signal"] == "SIGINT"


def test_draining_with_nothing_running_stops_on_the_next_tick():
    w = World([], size=2)
    w.tick()
    w.sup.handle_signal(signal.SIGTERM, w.clock.t)
    w.tick()
    assert w.sup.state == STOPPED
    assert not w.pool.terminated


def test_drain_deadline_passing_stops_now():
    w = World([job(1)], size=1, grace=10.0)
    w.tick()
    w.sup.handle_signal(signal.SIGTERM, w.clock.t)

    w.tick(9.9)
    assert w.sup.state == DRAINING and not w.pool.terminated

    w.tick(0.2)
    assert w.sup.state == STOPPED
    assert w.pool.terminated
    assert w.named("grace_expired") == [{"running": 1}]
    # the job stays ours: shutdown() puts it back with recover()
    assert w.rq.complete_calls == []


def test_a_job_finishing_as_the_deadline_passes_is_still_acknowledged():
    w = World([job(1)], size=1, grace=5.0)
    w.tick()
    w.sup.handle_signal(signal.SIGTERM, w.clock.t)
    w.pool.finish_all()
    w.tick(6.0)
    assert [c.raw for c in w.rq.completed] == [job(1)]
    assert w.sup.state == STOPPED and not w.pool.terminated


def test_second_sigterm_stops_now():
    w = World([job(1), job(2)], size=2)
    w.tick()
    w.sup.handle_signal(signal.SIGTERM, w.clock.t)
    assert w.sup.state == DRAINING

    w.sup.handle_signal(signal.SIGTERM, w.clock.t + 0.5)

    assert w.sup.state == STOPPED
    assert w.pool.terminated
    assert w.named("stop_now") == [{"signal": "SIGTERM"}]


def test_stop_now_still_collects_results_already_sent():
    w = World([job(1), job(2)], size=2, prefetch=0)
    w.tick()
    w.sup.handle_signal(signal.SIGTERM, w.clock.t)
    t1, t2 = w.tokens()
    w.pool.finish(t1)          # sent just before the second signal
    w.sup.handle_signal(signal.SIGTERM, w.clock.t)
    assert [c.raw for c in w.sup.pending] == [job(1)]
    assert list(w.sup.inflight) == [t2]

    w.sup.shutdown()
    assert [c.raw for c in w.rq.completed] == [job(1)]


def test_shutdown_flushes_pending_then_recovers_and_unregisters():
    w = World([job(1), job(2)], size=1, prefetch=1, waiter=True)
    w.tick()
    w.rq.down = True
    w.pool.finish_all()
    w.tick()
    assert len(w.sup.pending) == 1
    w.rq.down = False

    # shutdown does not wait for the backoff
    w.sup.shutdown()

    assert w.sup.state == STOPPED
    assert w.pool.shut and w.waiter.stopped
    assert [c.raw for c in w.rq.completed] == [job(1)]
    assert not w.sup.pending
    assert w.rq.recover_calls == 1 and w.rq.unregistered
    ordered = [c for c in w.rq.calls if c in ("complete", "recover", "unregister")]
    assert ordered[-3:] == ["complete", "recover", "unregister"]
    assert len(w.named("stopped")) == 1


def test_shutdown_survives_redis_being_down():
    w = World([job(1)], size=1)
    w.tick()
    w.rq.down = True
    w.sup.shutdown()
    assert w.pool.shut
    assert len(w.named("shutdown_redis_error")) == 1
    assert len(w.named("stopped")) == 1


def test_startup_registers_recovers_and_starts_the_pool():
    w = World(waiter=True)
    w.sup.startup()
    assert w.rq.calls[:2] == ["register", "recover"]
    assert w.pool.started and w.waiter.started
    assert w.named("started")[0]["name"] == WORKER


# -- Redis going away and coming back ---------------------------------------------------------

def test_redis_down_keeps_completions_and_retries_after_backoff():
    w = World([job(1), job(2)], size=2, prefetch=0)
    w.tick()
    # Given Redis goes away while two jobs finish
    w.rq.down = True
    w.pool.finish_all()

    # When the loop tries to acknowledge them, nothing raises
    w.tick()
    assert len(w.sup.pending) == 2
    (down,) = w.named("redis_down")
    assert down["during"] == "complete" and "Connection refused" in down["error"]
    attempts = w.rq.calls.count("complete")

    # Within the backoff nothing is tried again, and nothing is reported twice
    w.tick(0.01)
    assert w.rq.calls.count("complete") == attempts
    w.tick(0.1)   # past the first backoff: tried, fails again
    assert w.rq.calls.count("complete") == attempts + 1
    assert len(w.named("redis_down")) == 1
    assert len(w.sup.pending) == 2
    assert w.named("redis_up") == []

    # When Redis is back, after the (doubled) backoff, both are acknowledged at once
    w.rq.down = False
    w.tick(1.0)
    assert [sorted(c.raw for c in batch) for batch in w.rq.complete_calls] == [[job(1), job(2)]]
    assert not w.sup.pending
    assert w.named("redis_up") == [{}]
    assert w.sup.redis_down is False


def test_backoff_grows_and_is_capped():
    w = World([], size=1)
    w.rq.down = True
    waits = []
    for _ in range(10):
        w.tick()
        waits.append(round(w.sup.redis_retry_at - w.clock.t, 3))
        w.clock.t = w.sup.redis_retry_at
    assert waits[:4] == [0.05, 0.1, 0.2, 0.4]
    assert max(waits) == 5.0
    assert len(w.named("redis_down")) == 1


def test_redis_down_during_reserve_does_not_raise_and_recovers():
    w = World([job(1)], size=1)
    w.rq.down = True

    w.tick()

    assert w.sup.state == RUNNING
    assert w.named("redis_down")[0]["during"] == "reserve"
    assert not w.pool.sent
    w.rq.down = False
    w.tick(1.0)
    assert [raw for _, _, _, raw in w.pool.sent] == [job(1)]
    assert w.named("redis_up") == [{}]


def test_redis_down_while_draining_keeps_the_backlog_until_it_is_back():
    w = World([job(1), job(2)], size=1, prefetch=1)
    w.tick()
    w.rq.down = True
    w.sup.handle_signal(signal.SIGTERM, w.clock.t)
    assert list(w.sup.backlog) == [("default", job(2))]
    w.rq.down = False
    w.tick(1.0)
    assert w.rq.requeue_calls == [[("default", job(2))]]
    assert not w.sup.backlog


def test_heartbeat_is_renewed_every_third_of_the_lease():
    w = World([], size=1, lease=9.0)
    w.sup.next_heartbeat = 0.0
    w.tick()
    assert w.rq.heartbeats == 1
    w.tick(2.9)
    assert w.rq.heartbeats == 1
    w.tick(0.2)
    assert w.rq.heartbeats == 2


def test_a_failing_heartbeat_does_not_raise():
    w = World([], size=1)
    w.sup.next_heartbeat = 0.0
    w.rq.down = True
    w.tick()
    assert w.sup.state == RUNNING and w.sup.redis_down


def test_a_failing_hook_never_stops_the_loop():
    w = World([job(1)], size=1, prefetch=0)

    def broken(name, fields):
        raise ValueError("subscriber bug")
    w.sup.hooks._subs.insert(0, broken)
    w.tick()
    w.pool.finish_all()
    w.tick()
    assert len(w.rq.completed) == 1
    assert len(w.named("job_finished")) == 1


# -- the blocking waiter ----------------------------------------------------------------------

def test_waiter_is_armed_when_the_queues_are_empty():
    w = World([job(1)], size=2, prefetch=0, waiter=True)
    w.tick()
    # one job for two idle children: the queues ran dry
    assert w.waiter.armed


def test_waiter_is_disarmed_when_the_pool_is_full():
    w = World([job(i) for i in range(3)], size=2, prefetch=1, waiter=True)
    w.waiter.armed = True
    w.tick()
    # all children busy and the prefetch allowance used up: no room for more
    assert len(w.sup.inflight) == 2 and len(w.sup.backlog) == 1
    assert not w.waiter.armed
    w.tick()
    assert not w.waiter.armed


def test_waiter_stays_disarmed_while_reserve_finds_jobs():
    w = World([job(i) for i in range(10)], size=2, prefetch=2, waiter=True)
    w.tick()
    assert not w.waiter.armed


def test_jobs_from_the_waiter_are_dispatched():
    w = World([], size=1, prefetch=0, waiter=True)
    w.tick()
    assert w.waiter.armed
    # the waiter's BLMOVE got one (and disarmed itself)
    w.waiter.armed = False
    w.waiter.inbox.append(("default", job(5)))
    w.tick()
    assert [raw for _, _, _, raw in w.pool.sent] == [job(5)]
    assert not w.waiter.armed   # the pool is full now


def test_waiter_is_disarmed_on_sigterm_and_its_jobs_go_back():
    w = World([job(1)], size=1, prefetch=0, waiter=True)
    w.tick()
    w.sup.handle_signal(signal.SIGTERM, w.clock.t)
    assert not w.waiter.armed
    w.waiter.inbox.append(("default", job(2)))   # arrived as we began to drain
    w.tick()
    assert w.rq.requeue_calls[-1] == [("default", job(2))]
    assert [raw for _, _, _, raw in w.pool.sent] == [job(1)]


def test_waiter_errors_are_reported_as_redis_down():
    w = World([], size=1, waiter=True)
    w.waiter.errors.append(redis.ConnectionError("gone"))
    w.tick()
    assert w.named("redis_down") == [{"error": "gone", "during": "wait"}]
    assert not w.waiter.errors
    w.tick(1.0)
    assert w.named("redis_up") == [{}]


def test_wait_timeout_covers_heartbeat_drain_and_retry():
    w = World([job(1)], size=1, grace=3.0)
    w.sup.next_heartbeat = w.clock.t + 5.0
    w.tick()
    assert w.sup.wait_timeout(w.clock.t) == pytest.approx(5.0)
    w.sup.handle_signal(signal.SIGTERM, w.clock.t)
    assert w.sup.wait_timeout(w.clock.t) == pytest.approx(3.0)
    w.rq.down = True
    w.pool.finish_all()
    w.tick()
    assert w.sup.wait_timeout(w.clock.t) == pytest.approx(0.05)


# -- no busy loops ----------------------------------------------------------------------------

def test_no_busy_loop_while_draining_after_a_child_died():
    w = World([job(1), job(2)], size=2, prefetch=0, grace=30.0)
    w.tick()
    w.sup.handle_signal(signal.SIGTERM, w.clock.t)
    w.pool.die(w.tokens()[0])
    w.tick(0.5)
    assert w.sup.state == DRAINING   # the other job still runs

    # the loop should sleep until something can happen (the drain deadline), not spin
    assert w.sup.wait_timeout(w.clock.t) > 0


def test_no_busy_loop_after_a_failed_heartbeat_with_a_full_pool():
    w = World([job(1)], size=1, prefetch=0, lease=15.0)
    w.tick()
    assert len(w.sup.inflight) == 1          # the pool is full, nothing to reserve
    w.sup.next_heartbeat = w.clock.t
    w.rq.down = True
    w.tick()                                 # the heartbeat fails: a Redis blip
    w.rq.down = False
    assert w.sup.redis_down
    assert w.sup.wait_timeout(w.clock.t) > 0  # sleeps until the retry, does not spin
    w.tick(0.1)                              # past the retry time: the heartbeat is retried

    assert not w.sup.redis_down
    assert w.sup.wait_timeout(w.clock.t) > 0
