"""Supervisor.tick(ready, now) driven with a fake queue, lease, reaper and pool, and a fake clock.

No Redis, no processes: each test is a story of a few ticks and runs in milliseconds.
The periodic duties are the real duties.Duties, built on the fakes.  The fakes keep
only the surface the supervisor uses, and just enough of Redis's behaviour (a job is
in the queue or in our processing list; a lease has an epoch) for the stories to be
true.  The messages are genuine: what the supervisor sends a child is decoded as
child.main decodes it, and a child's answer is a real runner.Runner's Outcome for a
real task, packed with child.encode_done exactly as a pool child does.
"""

from __future__ import annotations

import math
import signal
from collections import Counter, deque
from dataclasses import dataclass

import pytest
import redis

from redpool import protocol as p
from redpool.child import FAIL_HEADER, JOB_HEADER, MSG_FAIL, MSG_JOB, encode_done
from redpool.config import WorkerConfig
from redpool.duties import BACKOFF_MAX, PROMOTE_EVERY, REAP_EVERY, Duties
from redpool.errors import NameInUse
from redpool.hooks import Hooks
from redpool.pool import BootFailed, Died, Done, Started, describe_exit
from redpool.queue import Reserved
from redpool.registry import Registry
from redpool.runner import Policy, Runner
from redpool.supervisor import DRAINING, KILL_GRACE, RUNNING, STOPPED, Supervisor

WORKER = "unit-sup"
T0 = 1000.0

registry = Registry()


@registry.task(name="tests.add")
def add(a, b):
    return a + b


@registry.task(name="tests.boom")
def boom():
    raise RuntimeError("boom")


@registry.task(name="tests.slow", timeout=60.0)
def slow():
    return "done"


def job(n: int, task: str = "tests.add", **kw) -> bytes:
    args = [n, 1] if task == "tests.add" else []
    return p.encode_job(p.make_job(task, args, id=f"job-{n}", now=1700000000.0, **kw))


KILLED = -signal.SIGKILL   # a child's exit code when SIGKILL ended it
DOWN = redis.ConnectionError("Error 111 connecting to localhost:6379. Connection refused.")


# -- fakes ------------------------------------------------------------------------------------

class FakeQueue:
    """Redis as the supervisor sees it: queues, our processing list, crash counts, the
    live lease's epoch.  Records every call; can be 'down', or lose one reply."""

    def __init__(self, jobs=(), queues=("default",)):
        self.queues = list(queues)
        self.ready: deque[tuple[str, bytes]] = deque(jobs)   # left end: taken next
        self.processing: list[tuple[str, bytes]] = []
        self.crashes: Counter = Counter()                    # raw -> crashed deliveries
        self.epoch: str | None = None                         # of the live lease
        self.calls: list[str] = []
        self.reserve_calls: list[int] = []
        self.complete_calls: list[list] = []     # batches that reached "Redis"
        self.requeue_calls: list[list] = []
        self.crashed_calls: list[tuple[str, bytes]] = []
        self.recover_calls: list[bool] = []      # the crashed= flag of each call
        self.promote_calls: list[float] = []
        self.due: list[tuple[str, bytes]] = []  # scheduled jobs the next promote moves
        self.next_due: float | None = None       # what promote says of the rest
        self.down = False
        self.lose_reply: str | None = None      # the next call of this name runs, then fails
        self.clock = None

    def _io(self, what: str) -> None:
        self.calls.append(what)
        if self.down:
            raise DOWN

    def _reply(self, what: str, value):
        if self.lose_reply == what:
            self.lose_reply = None
            raise redis.ConnectionError("Connection reset by peer (the reply was lost)")
        return value

    def push(self, *jobs) -> None:
        self.ready.extend(jobs)

    # the surface the supervisor and the duties use
    def reserve(self, n, epoch):
        self._io("reserve")
        self.reserve_calls.append(n)
        if epoch != self.epoch:
            return None
        got = [self.ready.popleft() for _ in range(min(n, len(self.ready)))]
        self.processing += got
        return self._reply("reserve", [Reserved(q, raw, self.crashes[raw]) for q, raw in got])

    def complete(self, items):
        self._io("complete")
        batch = list(items)
        self.complete_calls.append(batch)
        missing = 0
        for c in batch:
            if (c.queue, c.raw) in self.processing:
                self.processing.remove((c.queue, c.raw))
                self.crashes.pop(c.raw, None)
            else:
                missing += 1
        return missing, 0

    def requeue(self, items):
        self._io("requeue")
        self.requeue_calls.append(list(items))
        back = [it for it in items if it in self.processing]
        for it in back:
            self.processing.remove(it)
        self.ready.extendleft(reversed(back))   # back at the head, oldest first
        return len(back)

    def crashed(self, queue, raw):
        self._io("crashed")
        self.crashed_calls.append((queue, raw))
        if (queue, raw) not in self.processing:
            return 0
        self.processing.remove((queue, raw))
        self.ready.appendleft((queue, raw))
        self.crashes[raw] += 1
        return self.crashes[raw]

    def promote(self, limit=1000):
        self._io("promote")
        self.promote_calls.append(self.clock() if self.clock else 0.0)
        moved, self.due = self.due, []
        self.ready.extend(moved)
        return len(moved), self.next_due

    def recover(self, *, crashed):
        self._io("recover")
        self.recover_calls.append(crashed)
        moved = Counter(q for q, _ in self.processing)
        for q, raw in self.processing:
            if crashed:
                self.crashes[raw] += 1
        self.ready.extendleft(reversed(self.processing))
        self.processing = []
        return dict(moved)

    def processing_contents(self):
        self._io("processing_contents")
        out: dict[str, list[bytes]] = {q: [] for q in self.queues}
        for q, raw in self.processing:
            out.setdefault(q, []).insert(0, raw)
        return out

    # what the test looks at
    @property
    def completed(self) -> list:
        return [c for batch in self.complete_calls for c in batch]


def reap(rq: FakeQueue) -> None:
    """What a reaper does to a supervisor whose lease expired: its jobs go back to the
    head of their queues, one crash more each."""
    for q, raw in rq.processing:
        rq.crashes[raw] += 1
    rq.ready.extendleft(reversed(rq.processing))
    rq.processing = []


class FakeLease:
    """A lease whose epoch is the one FakeQueue checks on reserve."""

    def __init__(self, rq: FakeQueue):
        self.rq = rq
        self.epoch = ""
        self.registered = 0
        self.renewals = 0
        self.unregistered = False
        self.refuse: BaseException | None = None   # what the next register() raises

    def register(self, info, lease, **kw):
        self.rq._io("register")
        if self.refuse is not None:
            e, self.refuse = self.refuse, None
            raise e
        self.registered += 1
        self.epoch = f"epoch-{self.registered}"
        self.rq.epoch = self.epoch

    def renew(self, info, lease):
        self.rq._io("renew")
        self.renewals += 1
        return self.rq.epoch == self.epoch

    def unregister(self):
        self.rq._io("unregister")
        if self.rq.epoch == self.epoch:
            self.rq.epoch = None
        self.unregistered = True


class FakeReaper:
    def __init__(self, rq: FakeQueue, clock):
        self.rq = rq
        self.clock = clock
        self.runs: list[tuple[float, float]] = []   # (when, lock_seconds)
        self.found: dict[str, int] = {}             # what the next round reaps

    def run(self, lock_seconds: float = 1.0):
        self.rq._io("reap")
        self.runs.append((self.clock(), lock_seconds))
        found, self.found = self.found, {}
        return found


class FakeChild:
    def __init__(self, pid: int, ready: bool = True):
        self.pid = pid
        self.ready = ready
        self.token: int | None = None
        self.stopping = False
        self.jobs_done = 0


@dataclass
class Sent:
    """One message to a child, decoded as child.main decodes it."""
    pid: int
    token: int
    kind: bytes
    queue: str
    raw: bytes
    crashes: int
    fail: dict | None = None


def decode_msg(pid: int, msg: bytes) -> Sent:
    kind = msg[:1]
    if kind == MSG_JOB:
        token, qlen, crashes = JOB_HEADER.unpack_from(msg, 1)
        o = 1 + JOB_HEADER.size
        return Sent(pid, token, kind, msg[o:o + qlen].decode(), msg[o + qlen:], crashes)
    assert kind == MSG_FAIL, msg[:1]
    token, qlen, crashes, elen = FAIL_HEADER.unpack_from(msg, 1)
    o = 1 + FAIL_HEADER.size
    err = p.loads(msg[o + qlen:o + qlen + elen])
    return Sent(pid, token, kind, msg[o:o + qlen].decode(), msg[o + qlen + elen:], crashes, err)


class FakePool:
    """Children that never run anything by themselves: the test finishes jobs, with a
    real Runner, as a child would."""

    def __init__(self, size: int, defaults: Policy):
        self.size = size
        self._pids = iter(range(1001, 10_000))
        self.children = [FakeChild(next(self._pids)) for _ in range(size)]
        self.respawn_backoff = 0.0
        self.next_spawn_at = 0.0
        self.sent: list[Sent] = []
        self.events: deque = deque()
        self.reconciles: list[float] = []
        self.signals: list[tuple[int, int]] = []    # (pid, signal)
        self.retired: list[tuple[int, int | None]] = []   # (pid, its token then)
        self.rss_of: dict[int, int] = {}
        self.terminated = self.killed = self.closed = self.started = False
        self.runner = Runner(registry, WORKER, p.DEFAULT_MAX_PAYLOAD, defaults=defaults)

    # the surface the supervisor uses
    def start(self):
        self.started = True

    def idle(self):
        return [c for c in self.children if c.ready and c.token is None and not c.stopping]

    def send(self, c, token, msg):
        assert c.token is None and c.ready and not c.stopping, "sent to a child that is not idle"
        c.token = token
        s = decode_msg(c.pid, msg)
        assert s.token == token
        self.sent.append(s)
        if s.kind == MSG_JOB:
            # as child.main does: say so when the job's own timeout is not the default
            try:
                _, _, policy = self.runner.prepare(s.raw)
            except p.InvalidJob:
                return
            if policy.timeout != self.runner.defaults.timeout:
                self.events.append(Started(token, policy.timeout))

    def find(self, token):
        return next((c for c in self.children if c.token == token), None)

    def retire(self, c):
        self.retired.append((c.pid, c.token))
        c.stopping = True

    def signal(self, c, sig):
        self.signals.append((c.pid, sig))

    def rss(self, c):
        return self.rss_of.get(c.pid)

    def poll(self, ready):
        # a retired child exits when its pipe closes: gone without an event
        self.children = [c for c in self.children if not (c.stopping and c.token is None)]
        out = list(self.events)
        self.events.clear()
        return out

    def waitables(self):
        return []

    def reconcile(self, now):
        self.reconciles.append(now)
        live = [c for c in self.children if not c.stopping]
        spawned = [FakeChild(next(self._pids), ready=False) for _ in range(self.size - len(live))]
        self.children += spawned
        return spawned

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
    def boot(self) -> None:
        """Replacements finish booting (they said MSG_READY)."""
        for c in self.children:
            c.ready = True

    def busy(self) -> dict[int, FakeChild]:
        return {c.token: c for c in self.children if c.token is not None}

    def msg_of(self, token: int) -> Sent:
        return next(s for s in self.sent if s.token == token)

    def finish(self, token: int) -> bytes:
        """The child holding ``token`` finishes: a genuine MSG_DONE from a real Runner."""
        c = self.busy()[token]
        s = self.msg_of(token)
        if s.kind == MSG_JOB:
            out = self.runner.run(s.queue, s.raw, s.crashes)
        else:
            out = self.runner.fail(s.queue, s.raw, s.crashes, s.fail["type"], s.fail["message"],
                                   retry=s.fail["retry"], dead=s.fail["dead"])
        msg = encode_done(token, out)
        c.token = None
        c.jobs_done += 1
        self.events.append(Done(token, msg, c.pid))
        return msg

    def finish_all(self) -> None:
        for token in list(self.busy()):
            self.finish(token)

    def die(self, token: int | None, exitcode: int = KILLED, pid: int | None = None):
        c = self.busy()[token] if token is not None else next(x for x in self.children if x.pid == pid)
        self.children.remove(c)
        self.events.append(Died(token, c.pid, exitcode, describe_exit(exitcode)))
        return c


class FakeWaiter:
    def __init__(self):
        self.armed = False
        self.inbox: deque[Reserved] = deque()
        self.errors: deque = deque()
        self.in_call = False          # a thread is inside BLMOVE
        self.arms = self.disarms = 0
        self.started = self.stopped = self.closed = False

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

    def busy(self):
        return self.in_call

    def take(self):
        out = list(self.inbox)
        self.inbox.clear()
        return out

    def fileno(self):
        return -1


class Clock:
    def __init__(self, t: float = T0):
        self.t = t

    def __call__(self) -> float:
        return self.t


class World:
    """A started supervisor with its fakes, and the events it emitted."""

    def __init__(self, jobs=(), *, size=2, prefetch=2, burst=False, grace=10.0,
                 queues=("default",), waiter=False, lease=15.0, start=True, **settings):
        self.cfg = WorkerConfig(modules=["tests"], queues=list(queues), concurrency=size,
                                prefetch=prefetch, burst=burst, grace=grace, name=WORKER,
                                lease=lease, **settings)
        self.clock = Clock()
        self.rq = FakeQueue([(queues[0], j) if isinstance(j, bytes) else j for j in jobs], queues)
        self.rq.clock = self.clock
        self.lease = FakeLease(self.rq)
        self.reaper = FakeReaper(self.rq, self.clock)
        self.pool = FakePool(size, Policy(**self.cfg.child_defaults()))
        self.waiter = FakeWaiter() if waiter else None
        self.events: list[tuple[str, dict]] = []
        hooks = Hooks()
        hooks.subscribe(lambda name, fields: self.events.append((name, fields)))
        self.duties = Duties(self.cfg, self.rq, self.lease, self.reaper, hooks, clock=self.clock)
        self.sup = Supervisor(self.cfg, self.rq, self.pool, self.duties, waiter=self.waiter,
                              hooks=hooks, clock=self.clock)
        if start:
            self.sup.startup()

    def tick(self, dt: float = 0.0) -> None:
        self.clock.t += dt
        self.sup.tick([], self.clock.t)

    def ticks(self, until: float, step: float) -> None:
        """Tick every ``step`` seconds up to ``until`` (absolute), as a busy loop would."""
        while self.clock.t + step <= until + 1e-9:
            self.tick(step)

    def replace_dead(self) -> None:
        """Two ticks: the pool spawns a replacement for a dead child, which boots."""
        self.tick()
        self.pool.boot()
        self.tick()

    def named(self, name: str) -> list[dict]:
        return [f for n, f in self.events if n == name]

    def inflight(self) -> dict[int, tuple[str, bytes]]:
        """token -> (queue, raw); whatever else the supervisor keeps per job is its own."""
        return {t: (w.queue, w.raw) for t, w in self.sup.inflight.items()}

    def backlog(self) -> list[tuple[str, bytes]]:
        return [(w.queue, w.raw) for w in self.sup.backlog]

    def tokens(self) -> list[int]:
        return list(self.pool.busy())

    def sent_raws(self) -> list[bytes]:
        return [s.raw for s in self.pool.sent]


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

    assert [(s.pid, s.kind, s.raw, s.crashes) for s in w.pool.sent] == \
        [(1001, MSG_JOB, job(1), 0), (1002, MSG_JOB, job(2), 0)]
    tokens = [s.token for s in w.pool.sent]
    assert len(set(tokens)) == 2
    assert set(w.sup.inflight) == set(tokens)
    assert w.backlog() == [("default", job(3))]


def test_jobs_keep_their_queue_when_dispatched():
    w = World([("high", job(1)), ("low", job(2))], size=2, queues=("high", "low"))
    w.tick()
    assert [(s.queue, s.raw) for s in w.pool.sent] == [("high", job(1)), ("low", job(2))]


def test_the_crash_count_travels_with_the_job():
    w = World([job(1)], size=1, prefetch=0)
    w.rq.crashes[job(1)] = 2
    w.tick()
    (s,) = w.pool.sent
    assert (s.kind, s.crashes) == (MSG_JOB, 2)
    w.pool.finish_all()
    w.tick()
    (c,) = w.rq.completed
    assert env_of(c)["attempts"] == 1 + 2


def test_pool_is_reconciled_every_running_tick():
    w = World(size=1)
    w.tick()
    w.tick(1.0)
    assert w.pool.reconciles == [T0, T0 + 1.0]


def test_nothing_is_reserved_before_the_lease_is_held():
    w = World([job(1)], size=1, start=False)
    w.tick()
    assert w.rq.reserve_calls == [] and not w.pool.sent


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
    assert (ok.queue, ok.result_id, ok.ttl, ok.reply_to, ok.dead, ok.retry) == \
        ("default", "job-2", p.DEFAULT_RESULT_TTL, "replies", None, None)
    assert env_of(ok)["status"] == p.SUCCEEDED and env_of(ok)["result"] == 3
    assert env_of(ok)["worker"] == WORKER

    failed = env_of(by_raw[j3])
    assert failed["status"] == p.FAILED and failed["error"]["type"] == "RuntimeError"
    assert not w.sup.pending and not w.sup.inflight
    assert w.rq.processing == []
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
    assert c.raw == bad and c.dead is not None and c.retry is None
    assert env_of(c)["error"]["type"] == p.E_UNKNOWN_TASK
    assert w.sup.stats["dead"] == 1
    assert w.named("job_finished")[0]["dead"] is True


def test_a_retrying_outcome_becomes_a_completion_with_the_next_attempt():
    w = World([job(1, task="tests.boom", reply_to="r")], size=1, prefetch=0, max_retries=2,
              retry_backoff=1.0, retry_backoff_max=60.0)
    w.tick()
    w.pool.finish_all()
    w.tick()

    (c,) = w.rq.completed
    # no answer yet: the job leaves processing together with its next attempt
    assert c.envelope is None and c.dead is None
    assert (c.queue, c.raw, c.result_id, c.reply_to) == ("default", job(1, task="tests.boom",
                                                         reply_to="r"), "job-1", "r")
    nxt = p.decode_job(c.retry)
    assert (nxt.id, nxt.attempt, nxt.task) == ("job-1", 2, "tests.boom")
    assert 0.0 <= c.retry_delay <= 1.0   # full jitter below base * 2**0
    assert w.sup.stats["retrying"] == 1 and w.sup.stats["failed"] == 0
    (finished,) = w.named("job_finished")
    assert finished["status"] == "retrying" and finished["retry_delay"] == c.retry_delay


def test_results_dropped_by_fencing_are_reported():
    w = World([job(1)], size=1, prefetch=0)
    w.tick()
    # Given a reaper took the job back while it ran (our lease had expired)
    w.rq.processing.clear()
    w.pool.finish_all()
    w.tick()
    (dropped,) = w.named("results_dropped")
    assert dropped["count"] == 1 and "taken back" in dropped["reason"]
    assert not w.sup.pending


# -- children dying ---------------------------------------------------------------------------

def test_a_dead_childs_job_goes_back_to_its_queue_with_one_crash_more():
    j1 = job(1, reply_to="replies")
    w = World([j1, job(2)], size=2, prefetch=0, max_crashes=3)
    w.tick()
    t1, t2 = [s.token for s in w.pool.sent]

    # When the child running job 1 is killed by SIGKILL
    w.pool.die(t1, exitcode=-signal.SIGKILL)
    w.tick()

    # Then job 1 is not failed: it goes back to the head of its queue, one crash more
    assert w.rq.crashed_calls == [("default", j1)]
    assert w.rq.completed == []
    assert w.rq.crashes[j1] == 1
    assert w.sup.stats["crashed"] == 1 and w.sup.stats["failed"] == 0
    (crashed,) = w.named("job_crashed")
    assert crashed["crashes"] == 1 and crashed["queue"] == "default"
    assert "out-of-memory" in crashed["description"]
    (died,) = w.named("child_died")
    assert died["had_job"] is True and died["exitcode"] == -signal.SIGKILL
    # and the other job runs on, untouched
    assert w.inflight() == {t2: ("default", job(2))}

    # When a replacement has booted, job 1 is delivered again, saying it crashed once
    w.pool.boot()
    w.tick()
    again = w.pool.sent[-1]
    assert (again.raw, again.kind, again.crashes) == (j1, MSG_JOB, 1)


def test_a_child_dying_idle_fails_nothing():
    w = World([job(1)], size=2, prefetch=0)
    w.tick()
    idle = next(c for c in w.pool.children if c.token is None)
    w.pool.die(None, exitcode=-signal.SIGSEGV, pid=idle.pid)
    w.tick()
    assert w.rq.complete_calls == [] and w.rq.crashed_calls == []
    assert len(w.sup.inflight) == 1
    (died,) = w.named("child_died")
    assert died["had_job"] is False and "segmentation fault" in died["description"]


def test_a_crash_while_redis_is_down_is_retried_here():
    w = World([job(1)], size=1, prefetch=0, max_crashes=3)
    w.tick()
    w.pool.die(w.tokens()[0])
    w.rq.down = True
    w.tick()
    assert w.named("redis_down")[0]["during"] == "crashed"
    # it stays in our processing list, and runs again here, counted
    assert w.backlog() == [("default", job(1))] and w.sup.backlog[0].crashes == 1
    w.rq.down = False
    w.pool.boot()
    w.tick(1.0)
    assert (w.pool.sent[-1].raw, w.pool.sent[-1].crashes) == (job(1), 1)


def test_a_job_that_crashes_once_too_often_is_settled_first_as_a_poison_pill():
    pill = job(1, reply_to="r")
    w = World([pill, job(2), job(3)], size=2, prefetch=1, max_crashes=1)
    w.rq.crashes[pill] = 1          # it killed a process once already
    w.tick()
    pill_token = next(s.token for s in w.pool.sent if s.raw == pill)
    other = next(s.token for s in w.pool.sent if s.raw == job(2))
    assert w.backlog() == [("default", job(3))]

    # When it kills its child again: 2 crashes > --max-crashes 1
    w.pool.die(pill_token)
    w.tick()

    # Then it is not put back, but settled: a `fail` Work first in the backlog
    assert w.rq.crashed_calls == []
    first = w.sup.backlog[0]
    assert (first.raw, first.fail["error_type"], first.fail["dead"], first.fail["retry"]) == \
        (pill, p.E_WORKER_CRASHED, True, False)
    assert "2 times" in first.fail["message"] and "--max-crashes 1" in first.fail["message"]
    assert w.backlog()[1:] == [("default", job(3))]

    # When the next child is free, it settles the pill before any other job
    w.pool.finish(other)
    w.tick()
    s = w.pool.sent[-1]
    assert (s.kind, s.raw, s.fail["type"], s.fail["dead"], s.fail["retry"]) == \
        (MSG_FAIL, pill, p.E_WORKER_CRASHED, True, False)
    assert job(3) not in w.sent_raws()

    # and its outcome is a failed envelope and a dead-letter entry, never a retry
    w.pool.finish(s.token)
    w.tick()
    (c,) = [c for c in w.rq.completed if c.raw == pill]
    assert c.retry is None and c.reply_to == "r"
    assert env_of(c)["error"]["type"] == p.E_WORKER_CRASHED
    assert p.loads(c.dead)["reason"] == first.fail["message"]
    assert w.sup.stats["dead"] == 1


def test_a_reserved_job_past_max_crashes_is_admitted_as_a_poison_pill():
    # Given a job whose hosts died running it 4 times (reaped, or recovered at start)
    w = World([job(1), job(2)], size=1, prefetch=1, max_crashes=3)
    w.rq.crashes[job(1)] = 4

    w.tick()

    # Then it is never run: the child is asked to fail it, dead-lettered
    s = w.pool.sent[0]
    assert (s.kind, s.raw, s.crashes, s.fail["type"], s.fail["dead"]) == \
        (MSG_FAIL, job(1), 4, p.E_WORKER_CRASHED, True)
    assert "4 times" in s.fail["message"]
    w.pool.finish_all()
    w.tick()
    (c,) = w.rq.completed
    assert c.dead is not None and c.retry is None
    assert env_of(c)["status"] == p.FAILED


def test_a_job_at_max_crashes_still_runs():
    w = World([job(1)], size=1, prefetch=0, max_crashes=3)
    w.rq.crashes[job(1)] = 3
    w.tick()
    assert (w.pool.sent[0].kind, w.pool.sent[0].crashes) == (MSG_JOB, 3)


def test_a_poison_pill_with_result_ttl_0_writes_no_result_key():
    w = World([job(1, result_ttl=0, reply_to="r")], size=1, prefetch=0, max_crashes=0)
    w.tick()
    w.pool.die(w.tokens()[0], exitcode=1)
    w.replace_dead()
    w.pool.finish_all()
    w.tick()
    (c,) = w.rq.completed
    assert c.result_id is None and c.ttl == 0 and c.reply_to == "r"
    assert "exited with code 1" in env_of(c)["error"]["message"]


def test_an_unreadable_job_that_kills_its_child_is_dead_lettered():
    w = World([b"\xff not json"], size=1, prefetch=0, max_crashes=0)
    w.tick()
    w.pool.die(w.tokens()[0])
    w.replace_dead()
    w.pool.finish_all()
    w.tick()
    (c,) = w.rq.completed
    assert c.raw == b"\xff not json" and c.envelope is None and c.dead is not None


def test_a_child_dying_while_settling_a_failure_is_settled_by_the_supervisor():
    w = World([job(1, reply_to="r")], size=1, prefetch=0, max_crashes=0)
    w.tick()
    w.pool.die(w.tokens()[0])
    w.replace_dead()
    assert w.pool.sent[-1].kind == MSG_FAIL

    # When even the child settling it dies
    w.pool.die(w.tokens()[0], exitcode=-signal.SIGKILL)
    w.tick()

    # Then the supervisor writes the failure itself, without a child
    (c,) = w.rq.completed
    assert (c.raw, c.reply_to, c.result_id) == (job(1, reply_to="r"), "r", "job-1")
    env = env_of(c)
    assert env["error"]["type"] == p.E_WORKER_CRASHED
    assert "then the process settling it was killed by SIGKILL" in env["error"]["message"]
    assert p.loads(c.dead)["id"] == "job-1"


def test_boot_failure_of_a_replacement_is_reported_with_its_backoff():
    w = World(size=1)
    w.pool.respawn_backoff = 2.0
    w.pool.events.append(BootFailed(4242, "ImportError: no module named tests"))
    w.tick()
    assert w.named("child_boot_failed") == [
        {"pid": 4242, "message": "ImportError: no module named tests", "retry_in": 2.0}]
    assert w.sup.state == RUNNING


# -- timeouts ---------------------------------------------------------------------------------

def test_a_job_past_its_timeout_is_terminated_then_killed_and_retried():
    w = World([job(1)], size=1, prefetch=0, timeout=10.0, max_retries=1)
    w.tick()
    (s,) = w.pool.sent
    pid = s.pid

    w.tick(9.9)
    assert w.pool.signals == []

    # When the timeout passes: SIGTERM
    w.tick(0.1)
    assert w.pool.signals == [(pid, signal.SIGTERM)]
    (timeout,) = w.named("job_timeout")
    assert timeout == {"queue": "default", "timeout": 10.0, "pid": pid}

    # When it has not died KILL_GRACE later: SIGKILL, once
    w.tick(KILL_GRACE - 0.1)
    assert w.pool.signals == [(pid, signal.SIGTERM)]
    w.tick(0.1)
    w.tick(0.5)
    assert w.pool.signals == [(pid, signal.SIGTERM), (pid, signal.SIGKILL)]

    # When its death is reported, the job is settled as a TimeoutError to retry
    w.pool.die(s.token, exitcode=-signal.SIGKILL)
    w.replace_dead()
    assert w.rq.crashed_calls == []       # a timeout is not a crash
    f = w.pool.sent[-1]
    assert (f.kind, f.raw, f.fail["type"], f.fail["retry"], f.fail["dead"]) == \
        (MSG_FAIL, job(1), "TimeoutError", True, False)
    assert "timeout of 10 s" in f.fail["message"]
    assert w.sup.stats["timed_out"] == 1

    w.pool.finish_all()
    w.tick()
    (c,) = w.rq.completed
    assert p.decode_job(c.retry).attempt == 2 and c.envelope is None


def test_a_timed_out_job_that_dies_on_sigterm_is_not_killed_again():
    w = World([job(1)], size=1, prefetch=0, timeout=5.0)
    w.tick()
    w.tick(5.0)
    w.pool.die(w.tokens()[0], exitcode=-signal.SIGTERM)
    w.tick(0.1)
    w.tick(KILL_GRACE)
    assert [sig for _, sig in w.pool.signals] == [signal.SIGTERM]
    assert w.sup.backlog[0].fail["error_type"] == "TimeoutError"


def test_a_job_specific_timeout_overrides_the_default_deadline():
    # tests.slow has timeout=60 as a task option; the worker's default is 10
    w = World([job(1, task="tests.slow")], size=1, prefetch=0, timeout=10.0)
    w.tick()
    w.tick(0.01)          # the child's Started event arrives
    w.tick(10.0)
    assert w.pool.signals == []
    w.tick(50.0)
    assert [sig for _, sig in w.pool.signals] == [signal.SIGTERM]
    assert w.named("job_timeout")[0]["timeout"] == 60.0


def test_a_job_field_timeout_applies_even_without_a_default():
    w = World([job(1, timeout=2.0)], size=1, prefetch=0, timeout=0.0)   # 0: no limit
    w.tick()
    assert w.sup.inflight[w.tokens()[0]].deadline == math.inf
    w.tick(0.01)
    w.tick(2.0)
    assert [sig for _, sig in w.pool.signals] == [signal.SIGTERM]


def test_no_timeout_means_no_signal():
    w = World([job(1)], size=1, prefetch=0, timeout=0.0)
    w.tick()
    w.tick(10_000.0)
    assert w.pool.signals == []


def test_a_job_finishing_before_its_timeout_is_never_signalled():
    w = World([job(1)], size=1, prefetch=0, timeout=5.0)
    w.tick()
    w.tick(4.0)
    w.pool.finish_all()
    w.tick(2.0)
    w.tick(KILL_GRACE)
    assert w.pool.signals == [] and len(w.rq.completed) == 1


def test_no_busy_loop_between_sigterm_and_sigkill():
    w = World([job(1)], size=1, prefetch=0, timeout=5.0, lease=60.0)
    w.tick()
    w.tick(5.0)
    assert [sig for _, sig in w.pool.signals] == [signal.SIGTERM]
    # the loop should sleep until the SIGKILL is due (or something else), not spin
    assert w.sup.wait_timeout(w.clock.t) > 0


def test_a_child_signalled_for_a_timeout_is_not_given_another_job():
    w = World([job(1), job(2)], size=1, prefetch=1, timeout=5.0)
    w.tick()
    (first,) = w.pool.sent
    w.tick(5.0)
    assert w.pool.signals == [(first.pid, signal.SIGTERM)]
    # the job finished just as the signal was sent: its Done is read first
    w.pool.finish(first.token)
    w.tick(0.01)
    assert len(w.rq.completed) == 1
    assert [s.raw for s in w.pool.sent if s.pid == first.pid] == [job(1)]


# -- recycling children -----------------------------------------------------------------------

def test_a_child_is_retired_after_max_jobs_per_child():
    w = World([job(i) for i in range(5)], size=1, prefetch=0, max_jobs_per_child=2)
    w.tick()
    first_pid = w.pool.sent[0].pid
    w.pool.finish_all()
    w.tick()
    assert w.pool.retired == []           # one job done: keeps going
    assert w.pool.sent[-1].pid == first_pid

    w.pool.finish_all()
    w.tick()

    # after its 2nd job, between jobs: retired (never while it holds a job)
    assert w.pool.retired == [(first_pid, None)]
    (retired,) = w.named("child_retired")
    assert retired["pid"] == first_pid and "--max-jobs-per-child 2" in retired["reason"]
    assert [s.pid for s in w.pool.sent] == [first_pid, first_pid]   # no 3rd job for it
    assert len(w.rq.completed) == 2

    # its successor takes the next job once booted
    w.tick()
    w.pool.boot()
    w.tick()
    assert w.pool.sent[-1].pid != first_pid and w.pool.sent[-1].raw == job(2)


def test_a_child_over_max_memory_is_retired_after_its_job():
    w = World([job(1), job(2), job(3)], size=2, prefetch=0, max_memory_per_child=512 * 2**20)
    w.tick()
    big, small = [s.pid for s in w.pool.sent]
    w.pool.rss_of = {big: 600 * 2**20, small: 100 * 2**20}

    w.pool.finish_all()
    w.tick()

    assert w.pool.retired == [(big, None)]
    (retired,) = w.named("child_retired")
    assert retired["pid"] == big and "600 MiB" in retired["reason"] and "512 MiB" in retired["reason"]
    assert w.pool.sent[-1].pid == small


def test_unknown_memory_retires_nothing():
    w = World([job(1)], size=1, prefetch=0, max_memory_per_child=1)
    w.tick()
    w.pool.finish_all()     # rss() is None: /proc unreadable
    w.tick()
    assert w.pool.retired == []


# -- burst ------------------------------------------------------------------------------------

def test_burst_stops_on_empty_queues_once_nothing_is_scheduled():
    w = World([], burst=True)
    w.tick()
    w.tick()
    assert w.sup.state == STOPPED
    assert w.rq.promote_calls                # it asked
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
    w.tick(1.0)
    assert w.sup.state == STOPPED
    assert len(w.rq.completed) == 1


def test_burst_does_not_stop_while_something_is_scheduled():
    # Given an empty queue, and a retry due in 3 s
    w = World([], size=1, burst=True)
    w.rq.next_due = 3.0
    w.ticks(T0 + 2.5, 0.25)
    assert w.sup.state == RUNNING
    assert w.duties.nothing_scheduled is False

    # When it is due, promote moves it; it runs; then the worker stops
    w.rq.due, w.rq.next_due = [("default", job(1))], None
    w.tick(0.5)
    assert w.named("promoted") == [{"jobs": 1}]
    w.tick()
    assert w.sent_raws() == [job(1)] and w.sup.state == RUNNING
    w.pool.finish_all()
    w.tick()
    w.tick()
    assert w.sup.state == STOPPED


# -- periodic duties --------------------------------------------------------------------------

def test_promote_runs_every_half_second_or_when_the_next_job_is_due():
    w = World([], size=1)
    w.tick()
    w.ticks(T0 + 2.0, 0.125)
    assert [x - T0 for x in w.rq.promote_calls] == [0.0, 0.5, 1.0, 1.5, 2.0]
    assert w.duties.nothing_scheduled is True

    # When the next scheduled job is due sooner, promote runs then
    w.rq.next_due = 0.25
    w.tick(0.5)
    t = w.clock.t
    w.ticks(t + 1.0, 0.125)
    assert [x - t for x in w.rq.promote_calls if x > t] == [0.25, 0.5, 0.75, 1.0]
    assert w.duties.nothing_scheduled is False


def test_the_lease_is_renewed_every_third_of_the_lease():
    w = World([], size=1, lease=9.0)
    w.tick()
    assert w.lease.renewals == 0
    w.tick(2.9)
    assert w.lease.renewals == 0
    w.tick(0.2)
    assert w.lease.renewals == 1
    w.tick(2.9)
    assert w.lease.renewals == 1
    w.tick(0.2)
    assert w.lease.renewals == 2


def test_the_reaper_runs_at_most_once_per_reap_every():
    w = World([], size=1)
    w.reaper.found = {"sup-dead": 2}
    w.ticks(T0 + 3.0, 0.125)
    times = [t for t, _ in w.reaper.runs]
    assert [t - T0 for t in times] == [1.0, 2.0, 3.0]
    assert all(lock == REAP_EVERY for _, lock in w.reaper.runs)
    assert w.named("reaped") == [{"supervisor": "sup-dead", "jobs": 2}]


def test_the_reaper_waits_after_an_outage():
    # After an outage every lease looks stale for a moment: others need time to renew
    w = World([], size=1, lease=15.0)
    w.ticks(T0 + 1.0, 0.5)
    runs = len(w.reaper.runs)
    w.rq.down = True
    w.tick(1.0)
    w.rq.down = False
    w.tick(0.5)
    assert w.named("redis_up") == [{}]
    back = w.clock.t
    quiet = 15.0 / 3 + BACKOFF_MAX + 1.0
    w.ticks(back + quiet - 0.5, 0.25)
    assert len(w.reaper.runs) == runs
    w.ticks(back + quiet + 1.5, 0.25)
    assert len(w.reaper.runs) > runs
    assert all(t >= back + quiet for t, _ in w.reaper.runs[runs:])


# -- the lease --------------------------------------------------------------------------------

def test_startup_registers_recovers_and_starts_the_pool():
    w = World(waiter=True, start=False)
    w.rq.processing = [("default", job(1))]     # left by a run of ours that died
    w.sup.startup()
    assert w.rq.calls[:2] == ["register", "recover"]
    assert w.rq.recover_calls == [True]          # counted as crashes
    assert w.rq.crashes[job(1)] == 1
    assert w.named("recovered") == [{"jobs": {"default": 1}}]
    assert w.pool.started and w.waiter.started
    assert w.named("started")[0]["name"] == WORKER
    assert w.duties.epoch == "epoch-1"


def test_a_lost_lease_found_by_reserve_is_reregistered():
    w = World([job(i) for i in range(6)], size=1, prefetch=2)
    w.tick()
    assert w.backlog() == [("default", job(1)), ("default", job(2))]
    w.pool.finish_all()
    w.tick()
    assert w.backlog() == [("default", job(2)), ("default", job(3))]

    # Given our lease expired (we were frozen), so reserve refuses our epoch
    w.rq.epoch = None
    w.pool.finish_all()
    w.tick()

    (lost,) = w.named("lease_lost")
    assert lost["during"] == "reserve"
    # the job reserved but not started went back to the head of the queue
    assert w.rq.requeue_calls == [[("default", job(3))]]
    assert w.rq.ready[0] == ("default", job(3))
    # then the name was claimed again, under a new epoch
    assert [n for n, _ in w.events if n in ("lease_lost", "reregistered")] == \
        ["lease_lost", "reregistered"]
    assert w.lease.registered == 2
    assert w.named("reregistered") == [{"epoch": "epoch-2"}]
    assert "processing_contents" in w.rq.calls      # reconciled
    assert w.duties.leased

    # and the next reserve, under the new epoch, takes them again, in order
    w.tick()
    assert w.rq.reserve_calls[-1] > 0
    assert [s.raw for s in w.pool.sent][:3] == [job(0), job(1), job(2)]
    held = w.sup.held()
    assert sorted(held.elements()) == sorted(Counter(w.rq.processing).elements())


def test_a_lost_lease_found_by_renewal_is_reregistered():
    w = World([job(1), job(2)], size=1, prefetch=1, lease=9.0)
    w.tick()
    assert w.backlog() == [("default", job(2))]

    # Given we were frozen past our lease, and a reaper put our jobs back meanwhile
    w.rq.epoch = None
    reap(w.rq)
    w.tick(3.0)

    # Then the renewal finds the lease lost: the backlog is handed back (it is not ours
    # any more, so nothing moves), and we register again under a new epoch
    (lost,) = w.named("lease_lost")
    assert lost["during"] == "renew"
    assert w.rq.requeue_calls == [[("default", job(2))]]
    assert [n for n, _ in w.events if n in ("lease_lost", "reregistered")] == \
        ["lease_lost", "reregistered"]
    assert w.named("reregistered") == [{"epoch": "epoch-2"}]
    assert w.duties.leased and w.rq.epoch == "epoch-2"
    assert not w.sup.backlog

    # and the job that ran on is fenced: its result is not written; it is delivered
    # again (here or elsewhere) from its queue, with the crash the reaper counted
    w.pool.finish_all()
    w.tick()
    assert w.named("results_dropped")[0]["count"] == 1
    assert w.rq.completed[0].raw == job(1)
    again = w.pool.sent[-1]
    assert (again.raw, again.crashes) == (job(1), 1)


def test_redis_failing_during_reregistration_is_retried_later():
    w = World([job(1)], size=1, prefetch=0)
    w.rq.epoch = None
    w.lease.refuse = redis.ConnectionError("gone again")
    w.tick()
    assert w.named("lease_lost")[0]["during"] == "reserve"
    assert not w.duties.leased and w.sup.state == RUNNING
    assert w.named("redis_down")[0]["during"] == "register"
    assert not w.pool.sent
    w.tick(1.0)
    assert w.duties.leased and w.named("reregistered") == [{"epoch": "epoch-2"}]
    w.tick()
    assert w.sent_raws() == [job(1)]


def test_a_name_taken_while_we_were_away_stops_the_supervisor():
    w = World([job(1), job(2)], size=1, prefetch=1)
    w.tick()
    w.rq.epoch = "someone-else"
    w.lease.refuse = NameInUse("another supervisor named 'unit-sup' is alive")
    w.pool.finish_all()
    w.tick()
    assert w.named("name_taken")[0]["error"].startswith("another supervisor")
    assert w.sup.state == STOPPED and w.pool.terminated
    w.sup.shutdown()
    # its processing lists are the new holder's now: shutdown leaves them alone
    assert w.rq.recover_calls == [True] and not w.lease.unregistered


# -- reconciling with Redis -------------------------------------------------------------------

def test_jobs_reserved_by_a_lost_reply_are_put_back_when_redis_is_back():
    w = World([job(1)], size=1, prefetch=0)
    # Given a reserve that moved job 1 into our processing list, but whose reply was lost
    w.rq.lose_reply = "reserve"
    w.tick()
    assert w.named("redis_down")[0]["during"] == "reserve"
    assert w.rq.processing == [("default", job(1))] and not w.pool.sent

    # When Redis answers again, the job we never heard of goes back to its queue
    w.tick(1.0)
    assert w.named("redis_up") == [{}]
    assert w.named("reconciled") == [{"requeued": 1}]
    # and is then reserved and run once, normally
    w.tick()
    assert w.sent_raws() == [job(1)]
    assert w.rq.processing == [("default", job(1))]


def test_reconcile_keeps_what_we_hold():
    w = World([job(1), job(2), job(3), job(4)], size=1, prefetch=1)
    w.tick()
    w.pool.finish_all()
    w.rq.down = True
    w.tick()                                   # pending result, running job, backlog
    w.rq.down = False
    w.rq.processing.append(("default", b"stray"))
    w.tick(1.0)
    assert w.named("reconciled") == [{"requeued": 1}]
    assert w.rq.requeue_calls[-1] == [("default", b"stray")]
    held = w.sup.held()
    assert sorted(held.elements()) == sorted(Counter(w.rq.processing).elements())


def test_jobs_reserved_by_the_first_call_after_an_outage_are_not_put_back():
    w = World([], size=1, prefetch=0)
    w.tick()
    # Given Redis went away for a moment while we were idle
    w.rq.down = True
    w.tick(1.0)
    assert w.duties.redis_down
    # and a producer pushed a job meanwhile
    w.rq.down = False
    w.rq.push(("default", job(1)))

    w.tick(1.0)

    # Then the job we reserved runs, and stays in our processing list (it is not also
    # back in the queue for another supervisor to take)
    assert w.sent_raws() == [job(1)]
    assert w.rq.processing == [("default", job(1))]
    assert ("default", job(1)) not in w.rq.ready


def test_reconcile_waits_while_a_waiter_is_inside_blmove():
    w = World([], size=1, prefetch=0, waiter=True)
    w.tick()
    assert w.waiter.armed
    w.waiter.in_call = True
    w.rq.down = True
    w.tick(1.0)
    w.rq.down = False
    w.tick(1.0)
    # a job may be moving into our list right now: no reconcile yet, waiter disarmed
    assert w.duties.reconcile_pending and not w.waiter.armed
    assert "processing_contents" not in w.rq.calls
    assert w.sup.wait_timeout(w.clock.t) <= 0.05

    # When the BLMOVE returned with a job, it is held, not mistaken for a stray
    w.waiter.in_call = False
    w.rq.processing.append(("default", job(7)))
    w.waiter.inbox.append(Reserved("default", job(7), 0))
    w.tick(0.05)
    assert not w.duties.reconcile_pending
    assert w.named("reconciled") == []
    assert w.sent_raws() == [job(7)]


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


def test_a_poison_pill_is_still_settled_while_draining():
    w = World([job(1), job(2)], size=2, prefetch=0, max_crashes=0)
    w.tick()
    t1, t2 = [s.token for s in w.pool.sent]
    w.sup.handle_signal(signal.SIGTERM, w.clock.t)
    w.pool.die(t1)
    w.pool.finish(t2)
    w.tick()
    # the settle goes to the child that is free; no new job does
    s = w.pool.sent[-1]
    assert (s.kind, s.raw) == (MSG_FAIL, job(1))
    assert w.sup.state == DRAINING
    w.pool.finish_all()
    w.tick()
    assert w.sup.state == STOPPED
    assert sorted(c.raw for c in w.rq.completed) == [job(1), job(2)]


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
    # and the killed child's job goes back without a crash counted
    assert w.rq.recover_calls == [True, False]
    assert w.rq.ready == deque([("default", job(2))]) and not w.rq.crashes


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
    assert w.rq.recover_calls == [True, False] and w.lease.unregistered
    ordered = [c for c in w.rq.calls if c in ("complete", "recover", "unregister")]
    assert ordered[-3:] == ["complete", "recover", "unregister"]
    assert w.rq.ready == deque([("default", job(2))])
    (stopped,) = w.named("stopped")
    assert stopped["succeeded"] == 1 and stopped["requeued"] == 1


def test_shutdown_survives_redis_being_down():
    w = World([job(1)], size=1)
    w.tick()
    w.rq.down = True
    w.sup.shutdown()
    assert w.pool.shut
    assert len(w.named("shutdown_redis_error")) == 1
    assert len(w.named("stopped")) == 1


def test_jobs_a_waiter_took_during_shutdown_are_put_back():
    w = World([], size=1, prefetch=0, waiter=True)
    w.tick()
    w.rq.processing.append(("default", job(3)))
    w.waiter.inbox.append(Reserved("default", job(3), 0))
    w.sup.shutdown()
    assert w.rq.ready == deque([("default", job(3))])


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
    calls = len(w.rq.calls)
    w.tick(0.01)
    assert len(w.rq.calls) == calls
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
    assert w.duties.redis_down is False


def test_backoff_grows_and_is_capped():
    w = World([], size=1)
    w.rq.down = True
    waits = []
    for _ in range(10):
        calls = len(w.rq.calls)
        w.tick()
        assert len(w.rq.calls) == calls + 1      # one attempt per retry, not one per duty
        waits.append(round(w.duties.retry_at - w.clock.t, 3))
        w.clock.t = w.duties.retry_at
    assert waits[:4] == [0.05, 0.1, 0.2, 0.4]
    assert max(waits) == BACKOFF_MAX
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
    assert w.sent_raws() == [job(1)]
    assert w.named("redis_up") == [{}]


def test_redis_down_while_draining_keeps_the_backlog_until_it_is_back():
    w = World([job(1), job(2)], size=1, prefetch=1)
    w.tick()
    w.rq.down = True
    w.sup.handle_signal(signal.SIGTERM, w.clock.t)
    assert w.backlog() == [("default", job(2))]
    w.rq.down = False
    w.tick(1.0)
    assert w.rq.requeue_calls == [[("default", job(2))]]
    assert not w.sup.backlog


def test_a_failing_renewal_does_not_raise():
    w = World([job(1)], size=1, prefetch=0, lease=3.0)
    w.tick()
    assert len(w.sup.inflight) == 1          # the pool is full: only the duties call Redis
    w.rq.down = True
    w.tick(1.0)
    assert w.sup.state == RUNNING and w.duties.redis_down
    assert w.named("redis_down")[0]["during"] == "duties"
    assert w.named("lease_lost") == []       # unreachable is not lost
    assert w.duties.leased


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
    w.rq.processing.append(("default", job(5)))
    w.waiter.inbox.append(Reserved("default", job(5), 0))
    w.tick()
    assert w.sent_raws() == [job(5)]
    assert not w.waiter.armed   # the pool is full now


def test_a_poison_pill_from_the_waiter_is_not_run():
    w = World([], size=1, prefetch=0, waiter=True, max_crashes=2)
    w.tick()
    w.waiter.inbox.append(Reserved("default", job(5), 3))
    w.tick()
    assert (w.pool.sent[0].kind, w.pool.sent[0].fail["type"]) == (MSG_FAIL, p.E_WORKER_CRASHED)


def test_waiter_is_disarmed_on_sigterm_and_its_jobs_go_back():
    w = World([job(1)], size=1, prefetch=0, waiter=True)
    w.tick()
    w.sup.handle_signal(signal.SIGTERM, w.clock.t)
    assert not w.waiter.armed
    w.rq.processing.append(("default", job(2)))
    w.waiter.inbox.append(Reserved("default", job(2), 0))   # arrived as we began to drain
    w.tick()
    assert w.rq.requeue_calls[-1] == [("default", job(2))]
    assert w.sent_raws() == [job(1)]


def test_waiter_errors_are_reported_as_redis_down():
    w = World([], size=1, waiter=True)
    w.waiter.errors.append(redis.ConnectionError("gone"))
    w.tick()
    assert w.named("redis_down") == [{"error": "gone", "during": "wait"}]
    assert not w.waiter.errors
    w.tick(1.0)
    assert w.named("redis_up") == [{}]


# -- sleeping until something can happen ------------------------------------------------------

def test_wait_timeout_is_the_nearest_deadline():
    w = World([job(1)], size=1, grace=3.0, lease=30.0, timeout=0.3)
    w.tick()
    # the job's timeout (0.3 s) comes before the next promote (0.5 s)
    assert w.sup.wait_timeout(w.clock.t) == pytest.approx(0.3)
    w.pool.finish_all()
    w.tick()
    assert w.sup.wait_timeout(w.clock.t) == pytest.approx(PROMOTE_EVERY)
    w.rq.next_due = 0.2
    w.tick(0.5)
    assert w.sup.wait_timeout(w.clock.t) == pytest.approx(0.2)
    w.sup.handle_signal(signal.SIGTERM, w.clock.t)
    w.sup.drain_deadline = w.clock.t + 0.1
    assert w.sup.wait_timeout(w.clock.t) == pytest.approx(0.1)


def test_wait_timeout_waits_out_the_redis_backoff():
    w = World([job(1)], size=1, lease=30.0)
    w.tick()
    w.rq.down = True
    w.pool.finish_all()
    w.tick(1.0)                     # the duties were due; Redis is down
    assert w.sup.wait_timeout(w.clock.t) == pytest.approx(0.05)


def test_no_busy_loop_while_draining_after_a_child_died():
    w = World([job(1), job(2)], size=2, prefetch=0, grace=30.0)
    w.tick()
    w.sup.handle_signal(signal.SIGTERM, w.clock.t)
    w.pool.die(w.tokens()[0])
    w.tick(0.5)
    assert w.sup.state == DRAINING   # the other job still runs

    # the loop should sleep until something can happen, not spin
    assert w.sup.wait_timeout(w.clock.t) > 0


def test_no_busy_loop_after_a_failed_renewal_with_a_full_pool():
    w = World([job(1)], size=1, prefetch=0, lease=15.0)
    w.tick()
    assert len(w.sup.inflight) == 1          # the pool is full, nothing to reserve
    w.rq.down = True
    w.tick(5.0)                              # the renewal fails: a Redis blip
    w.rq.down = False
    assert w.duties.redis_down
    assert w.sup.wait_timeout(w.clock.t) > 0  # sleeps until the retry, does not spin
    w.tick(0.1)                              # past the retry time: the duties are retried
    assert not w.duties.redis_down
    w.tick()                                 # and the renewal first thing after
    assert w.lease.renewals == 1
    assert w.sup.wait_timeout(w.clock.t) > 0
