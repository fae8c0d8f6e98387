"""Supervisor.tick(ready, now) driven with a fake queue, lease, reaper and pool, and a fake clock.

No Redis, no processes: each test is a story of a few ticks and runs in milliseconds.
The periodic duties are the real duties.Duties, built on the fakes.  The fakes keep
only the surface the supervisor uses, and just enough of Redis's behaviour (a job is
in the queue or in our processing list; a lease has an epoch) for the stories to be
true.  The messages are genuine: the batches the supervisor sends a child are decoded
with child.decode_batch, as child.main decodes them, and a child's answer is a real
runner.Runner's Outcome for a real task, packed with child.encode_done exactly as a
pool child does.  Only the outcome's measured "duration" is chosen by the test (it
drives the adaptive batch size): LONG by default, so that jobs go one at a time
unless a test says they are short.
"""

from __future__ import annotations

import math
import random
import signal
from collections import Counter, deque
from dataclasses import dataclass

import pytest
import redis

from redpool import protocol as p
from redpool.child import MSG_BATCH, RETURN_AFTER_SECONDS, decode_batch, encode_done, return_after_of
from redpool.config import WorkerConfig
from redpool.duties import BACKOFF_MAX, PROMOTE_EVERY, REAP_EVERY, Duties
from redpool.errors import NameInUse
from redpool.hooks import Hooks
from redpool.keytypes import KeyMap, Unusable
from redpool.keys import Keys
from redpool.pool import BootFailed, Died, Done, Ready, Returned, Started, describe_exit
from redpool.queue import RedisQueue, Reserved
from redpool.registry import Registry
from redpool.runner import Policy, Runner
from redpool.outcomes import KILL_GRACE
from redpool.outage import UP_AFTER
from redpool.supervisor import (ACK_DELAY, BATCH_SECONDS, DRAINING, MAX_BATCH, RUNNING, STOPPED,
                                Supervisor)

WORKER = "unit-sup"
R, R2 = "redpool:reply:r", "redpool:reply:replies"  # reply lists every worker answers on
T0 = 1000.0

# entry kinds of a batch (child.job_entry / child.fail_entry)
JOB, FAIL = b"J", b"F"

# Job durations a child reports (meta "duration"); powers of two, so that a moving
# average of equal samples stays exactly equal.
LONG = 1.0            # batch of int(0.005 / 1.0) -> 1: one at a time
SHORT = 2.0 ** -11    # 0.49 ms: batches of int(0.005 / SHORT) = 10
TINY = 2.0 ** -20     # ~1 us: batches capped at MAX_BATCH
REAL = None           # keep the duration the real Runner measured
DEFAULT = object()    # FakePool.duration

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


def jobs(*ns) -> list[bytes]:
    return [job(n) for n in ns]


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
        self.crash_started: dict[bytes, float] = {}          # raw -> its last crashed run's start
        self.epoch: str | None = None                         # of the live lease
        self.calls: list[str] = []
        self.exchange_calls: list[tuple[int, int]] = []  # (completions carried, n to reserve)
        self.reserve_calls: list[int] = []       # n of each exchange that reserved (n > 0)
        self.complete_calls: list[list] = []     # batches that reached "Redis" (either call)
        self.requeue_calls: list[list] = []
        self.crashed_calls: list[tuple[str, bytes]] = []
        self.recover_calls: list[bool] = []      # the crashed= flag of each call
        self.promote_calls: list[float] = []
        self.due: list[tuple[str, bytes]] = []  # scheduled jobs the next promote moves
        self.next_due: float | None = None       # what promote says of the rest
        self.down = False
        self.away: set[str] = set()             # calls that fail (a cluster node away)
        self.lose_reply: str | None = None      # the next call of this name runs, then fails
        self.clock = None
        self.markers: dict[str, bytes] = {}     # keys.dataset: None until a claim
        self.run_id = "run-1"
        self.kept: tuple = (True, "AOF")        # what persistence() says
        self.missed: list = []                  # as RedisQueue.missed
        self.restore_calls: list[Counter] = []
        self.unusable = Unusable(KeyMap(Keys("t"), "w", self.queues))  # as RedisQueue's
        self.types: dict[str, str] = {}         # what key_types() answers (a key -> its type)

    def _io(self, what: str) -> None:
        self.calls.append(what)
        if self.down or what in self.away:
            raise DOWN

    def _reply(self, what: str, value):
        if self.lose_reply == what:
            self.lose_reply = None
            raise redis.ConnectionError("Connection reset by peer (the reply was lost)")
        return value

    def push(self, *jobs) -> None:
        self.ready.extend(jobs)

    def _complete(self, batch: list) -> tuple[int, int]:
        self.complete_calls.append(batch)
        missing = 0
        for c in batch:
            if (c.queue, c.raw) in self.processing:
                self.processing.remove((c.queue, c.raw))
                self.crashes.pop(c.raw, None)
                self.crash_started.pop(c.raw, None)
            else:
                missing += 1
                self.missed.append(c)   # only those: the rest were written
        return missing, 0

    # the server itself
    def lose_data(self) -> None:
        """What a restart without persistence does: everything is gone."""
        self.ready.clear()
        self.processing.clear()
        self.crashes.clear()
        self.epoch = None
        self.markers = {}
        self.run_id = "run-2"

    def read_markers(self):
        self._io("read_markers")
        return {"dataset": self.markers.get("dataset")}

    def claim_markers(self):
        self._io("claim_markers")
        self.markers.setdefault("dataset", f"token-{self.run_id}".encode())
        return dict(self.markers)

    def run_ids(self):
        return {"127.0.0.1:6379": self.run_id}

    def persistence(self):
        return self.kept

    def restore(self, items):
        self._io("restore")
        self.restore_calls.append(Counter(items))
        for (q, raw), n in items.items():
            self.processing += [(q, raw)] * n
        return sum(items.values())

    # the surface the supervisor and the duties use
    def exchange(self, done, n, epoch):
        """complete.lua then reserve.lua, pipelined: one round trip (RedisQueue.exchange)."""
        self._io("exchange")
        batch = list(done)   # the supervisor clears its list afterwards
        self.exchange_calls.append((len(batch), n))
        assert batch or n > 0, "an exchange with nothing to do"
        missing, skipped = self._complete(batch) if batch else (0, 0)
        got: list | None = []
        if n > 0:
            self.reserve_calls.append(n)
            if epoch != self.epoch:
                got = None
            else:
                taken = [self.ready.popleft() for _ in range(min(n, len(self.ready)))]
                self.processing += taken
                got = [Reserved(q, raw, self.crashes[raw], self.crash_started.get(raw))
                       for q, raw in taken]
        return self._reply("exchange", (missing, skipped, got))

    def complete(self, items):
        self._io("complete")
        return self._reply("complete", self._complete(list(items)))

    def requeue(self, items):
        self._io("requeue")
        self.requeue_calls.append(list(items))
        back = [it for it in items if it in self.processing]
        for it in back:
            self.processing.remove(it)
        self.ready.extendleft(reversed(back))   # back at the head, oldest first
        return len(back)

    def crashed(self, queue, raw, max_crashes=2 ** 31, started_at=None):
        """crashed.lua: one crash more, and when the run that crashed started; back to
        the head of its queue unless that makes it a poison pill (it then stays in our
        processing list).  0: not ours."""
        self._io("crashed")
        self.crashed_calls.append((queue, raw))
        if (queue, raw) not in self.processing:
            return 0
        self.crashes[raw] += 1
        self.crash_started[raw] = started_at
        if self.crashes[raw] <= max_crashes:
            self.processing.remove((queue, raw))
            self.ready.appendleft((queue, raw))
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

    unsent = 0        # as RedisQueue's: nothing is held back on one server
    suspect = RedisQueue.__dict__["suspect"]  # (the real one: raised from any thread)
    partial = False   # (no Redis Cluster node hangs: breaker.py)
    passed_over = 0   # (no queue passed over: every node answers)

    def holding(self):
        return []     # (completions a key of the wrong type holds back: keytypes.Holding)

    def key_types(self, keys, errors=None):
        return {k: t for k, t in self.types.items() if k in keys}

    def probe_keys(self):
        return list(self.unusable.map.expected())

    def settle(self):
        return 0  # as RedisQueue's: on one server no acknowledgement is left half done

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

    def run(self, lock_seconds: float = 1.0, wrongtype=None):
        self.rq._io("reap")
        self.runs.append((self.clock(), lock_seconds))
        found, self.found = self.found, {}
        return found


class FakeChild:
    """pool.Child as the supervisor sees it."""

    def __init__(self, pid: int, ready: bool = True):
        self.pid = pid
        self.ready = ready
        self.tokens: deque[int] = deque()   # handed to it, the running job first
        self.retiring = False               # gets no more jobs; retired once it has none
        self.stopping = False               # its pipe is closed: it exits
        self.doomed = False                 # signalled by the supervisor
        self.stalled = False                # gave back its other jobs while a long one runs
        self.jobs_done = 0
        self.generation = 0                 # pool.Child.generation (SIGHUP: a new one)

    @property
    def token(self) -> int | None:
        return self.tokens[0] if self.tokens else None


@dataclass
class Sent:
    """One entry of a batch, decoded as child.main decodes it."""
    pid: int
    token: int
    kind: bytes
    queue: str
    raw: bytes
    crashes: int
    fail: dict | None = None


@dataclass
class Batch:
    """One message to a child, and the child's state when it was sent."""
    pid: int
    tokens: list[int]
    entries: list[Sent]
    held: int            # jobs the child held already (the running one included)
    done: int            # jobs it had finished
    return_after: float = 0.0   # when it gives back what it has not started

    @property
    def raws(self) -> list[bytes]:
        return [s.raw for s in self.entries]


def decode_msg(pid: int, msg: bytes) -> list[Sent]:
    assert msg[:1] == MSG_BATCH, msg[:1]
    return [Sent(pid, token, kind, queue, raw, crashes, error)
            for kind, token, crashes, queue, error, raw in decode_batch(msg)]


class FakePool:
    """Children that never run anything by themselves: the test finishes jobs, with a
    real Runner, as a child would (in order, one answer per job)."""

    def __init__(self, size: int, defaults: Policy):
        self.size = size
        self._pids = iter(range(1001, 10_000))
        self.children = [FakeChild(next(self._pids)) for _ in range(size)]
        self.respawn_backoff = 0.0
        self.next_spawn_at = 0.0
        self.batches: list[Batch] = []
        self.sent: list[Sent] = []                  # every entry of every batch, in order
        self.events: deque = deque()
        self.reconciles: list[float] = []
        self.signals: list[tuple[int, int]] = []    # (pid, signal)
        self.retired: list[tuple[int, list[int]]] = []   # (pid, the tokens it held then)
        self.rss_of: dict[int, int] = {}
        self.duration = LONG                        # what finish() reports by default
        self.terminated = self.killed = self.closed = self.started = False
        self.runner = Runner(registry, WORKER, p.DEFAULT_MAX_PAYLOAD, defaults=defaults)

    # the surface the supervisor uses
    def start(self):
        self.started = True

    def accepting(self):
        return [c for c in self.children if c.ready and not c.retiring and not c.stopping]

    def send(self, c, tokens, msg):
        assert c in self.accepting(), "sent to a child that takes no jobs"
        assert tokens, "an empty batch"
        entries = decode_msg(c.pid, msg)
        assert [s.token for s in entries] == list(tokens)
        assert not set(tokens) & {t for x in self.children for t in x.tokens}, "token reused"
        self.batches.append(Batch(c.pid, list(tokens), entries, len(c.tokens), c.jobs_done,
                                  return_after_of(msg)))
        self.sent += entries
        was_idle = not c.tokens
        c.tokens.extend(tokens)
        if was_idle:
            self._starting(c)

    def find(self, token):
        return next((c for c in self.children if c.tokens and c.tokens[0] == token), None)

    def retire(self, c):
        self.retired.append((c.pid, list(c.tokens)))
        c.retiring = True
        if not c.tokens:
            c.stopping = True

    def signal(self, c, sig):
        self.signals.append((c.pid, sig))

    def rss(self, c):
        return self.rss_of.get(c.pid)

    def poll(self, ready):
        # a retired child exits when its pipe closes: gone without an event
        self.children = [c for c in self.children if not (c.stopping and not c.tokens)]
        out = list(self.events)
        self.events.clear()
        return out

    def waitables(self):
        return []

    def writing(self):
        return []

    check_at = math.inf   # (pidfds: no exit status to look at on a timer)

    generation = 0

    def resize(self, size):
        self.size = max(1, size)

    def reload(self):
        self.generation += 1

    @property
    def reloading(self):
        return any(c.generation != self.generation and not c.stopping for c in self.children)

    def abort_reload(self):
        self.aborted = True
        for c in self.children:
            c.generation = self.generation

    def reconcile(self, now):
        self.reconciles.append(now)
        for c in self.children:
            if c.retiring and not c.tokens:
                c.stopping = True   # done with its last batch: its pipe is closed
        live = [c for c in self.children if not c.stopping and not c.retiring]
        current = [c for c in live if c.generation == self.generation]
        spawned = [FakeChild(next(self._pids), ready=False) for _ in range(self.size - len(current))]
        for c in spawned:
            c.generation = self.generation
        self.children += spawned
        # as ProcessPool: one old child goes per ready successor
        old = [c for c in live if c.generation != self.generation]
        ready = [c for c in current if c.ready]
        for c in old[:max(0, len(old) + len(ready) - self.size)]:
            self.retire(c)
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
        """running token -> its child"""
        return {c.tokens[0]: c for c in self.children if c.tokens}

    def child(self, pid: int) -> FakeChild:
        return next(c for c in self.children if c.pid == pid)

    def held(self, pid: int) -> list[int]:
        return list(self.child(pid).tokens)

    def batches_to(self, pid: int) -> list[Batch]:
        return [b for b in self.batches if b.pid == pid]

    def msg_of(self, token: int) -> Sent:
        return next(s for s in self.sent if s.token == token)

    def _starting(self, c: FakeChild) -> None:
        """c starts the job at the head of its batch: as child.main does, it says so
        when the job's own timeout is not the default."""
        s = self.msg_of(c.tokens[0])
        if s.kind != JOB:
            return
        try:
            _, _, policy = self.runner.prepare(s.raw)
        except p.InvalidJob:
            return
        if policy.timeout != self.runner.defaults.timeout:
            self.events.append(Started(s.token, policy.timeout))

    def finish(self, token: int, duration=DEFAULT) -> bytes:
        """The child running ``token`` finishes it: a genuine MSG_DONE from a real Runner,
        reporting ``duration`` (default: self.duration; REAL: as measured)."""
        c = self.busy()[token]
        s = self.msg_of(token)
        if s.kind == JOB:
            out = self.runner.run(s.queue, s.raw, s.crashes)
        else:
            out = self.runner.fail(s.queue, s.raw, s.crashes, s.fail["type"], s.fail["message"],
                                   retry=s.fail["retry"], dead=s.fail["dead"],
                                   started_at=s.fail["started_at"], ran=s.fail["ran"])
        if duration is DEFAULT:
            duration = self.duration
        if duration is not REAL:
            out.meta["duration"] = duration
        msg = encode_done(token, out)
        c.tokens.popleft()
        c.jobs_done += 1
        self.events.append(Done(token, msg, c.pid))
        if c.tokens:
            self._starting(c)   # the next job of its batch starts at once
        return msg

    def finish_all(self, duration=DEFAULT) -> None:
        """Every busy child finishes the job it runs (one each)."""
        for token in list(self.busy()):
            self.finish(token, duration)

    def finish_everything(self, duration=DEFAULT) -> None:
        """Every child works through its whole batch (read in one poll, as the real
        pool reads every message a child sent)."""
        while self.busy():
            self.finish_all(duration)

    def give_back(self, pid: int) -> list[int]:
        """Child ``pid``'s job has run long: it gives back every job it holds but that
        one (the rest of its batch, and the batches in its pipe), as child.Mailbox does."""
        c = self.child(pid)
        back = list(c.tokens)[1:]
        for t in back:
            c.tokens.remove(t)
        self.events.append(Returned(pid, back))
        return back

    def die(self, token: int | None, exitcode: int = KILLED, pid: int | None = None):
        """The child running ``token`` (or child ``pid``) dies, holding its batch."""
        c = self.busy()[token] if token is not None else self.child(pid)
        self.children.remove(c)
        # (the real child's shared progress word names the job it was running: here,
        # the first of its batch)
        self.events.append(Died(list(c.tokens), c.pid, exitcode,
                                describe_exit(exitcode, c.doomed), c.token, c.doomed))
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

    def take(self, pipe=True):
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

    def outage_over(self, step: float = 0.5) -> list[dict]:
        """Tick on for UP_AFTER (the loop's housekeeping calls Redis every half second):
        the redis_up events by then (outage.py)."""
        self.ticks(self.clock.t + UP_AFTER, step)
        return self.named("redis_up")

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

    def finish_running(self, duration=DEFAULT) -> None:
        """Every busy child finishes the job it runs, reporting ``duration``; one tick."""
        self.pool.finish_all(duration)
        self.tick()

    def expected_want(self) -> int:
        """want() as specified: room in the accepting children's batches (no more than
        each has left under --max-jobs-per-child), plus the prefetch allowance in
        batches, less what is held."""
        k = self.sup.batch_size()
        cap = self.cfg.max_jobs_per_child
        room = sum(max(0, min(k - len(c.tokens), cap - c.jobs_done - len(c.tokens))
                       if cap else k - len(c.tokens)) for c in self.pool.accepting())
        return room + self.cfg.prefetch * k - len(self.sup.backlog)


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
    # the freed child took one from the backlog; the backlog is topped up by one, in
    # the same round trip that acknowledged the finished job
    assert w.rq.reserve_calls == [5, 1]
    assert w.rq.exchange_calls == [(0, 5), (1, 1)]
    assert len(w.pool.sent) == 3
    assert len(w.sup.backlog) == 3
    # jobs of unknown duration go one at a time
    assert [len(b.tokens) for b in w.pool.batches] == [1, 1, 1]


def test_prefetch_zero_reserves_only_for_idle_children():
    w = World([job(i) for i in range(10)], size=3, prefetch=0)
    w.tick()
    assert w.rq.reserve_calls == [3]
    assert not w.sup.backlog


def test_jobs_are_dispatched_to_distinct_idle_children_in_order():
    w = World([job(1), job(2), job(3)], size=2, prefetch=1)

    w.tick()

    assert [(s.pid, s.kind, s.raw, s.crashes) for s in w.pool.sent] == \
        [(1001, JOB, job(1), 0), (1002, JOB, job(2), 0)]
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
    assert (s.kind, s.crashes) == (JOB, 2)
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
    j1, j2, j3 = job(1), job(2, reply_to=R2), job(3, task="tests.boom")
    w = World([j1, j2, j3], size=3, prefetch=0)
    w.tick()
    assert len(w.pool.sent) == 3

    # Given three children finish between two ticks
    w.pool.finish_all()
    w.tick()

    # Then one exchange() call acknowledges all three (and reserves for the idle children)
    assert len(w.rq.complete_calls) == 1
    assert w.rq.exchange_calls[-1] == (3, 3) and "complete" not in w.rq.calls
    by_raw = {c.raw: c for c in w.rq.complete_calls[0]}
    assert set(by_raw) == {j1, j2, j3}

    ok = by_raw[j2]
    assert (ok.queue, ok.result_id, ok.ttl, ok.reply_to, ok.dead, ok.retry) == \
        ("default", "job-2", p.DEFAULT_RESULT_TTL, R2, None, None)
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
    bad = b'{"id":"job-9","task":"no.such.task","reply_to":"redpool:reply:r"}'
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
    w = World([job(1, task="tests.boom", reply_to=R)], size=1, prefetch=0, max_retries=2,
              retry_backoff=1.0, retry_backoff_max=60.0)
    w.tick()
    w.pool.finish_all()
    w.tick()

    (c,) = w.rq.completed
    # no answer yet: the job leaves processing together with its next attempt
    assert c.envelope is None and c.dead is None
    assert (c.queue, c.raw, c.result_id, c.reply_to) == ("default", job(1, task="tests.boom",
                                                         reply_to=R), "job-1", R)
    nxt = p.decode_job(c.retry)
    assert (nxt.id, nxt.attempt, nxt.task) == ("job-1", 2, "tests.boom")
    assert 0.0 <= c.retry_delay <= 1.0   # full jitter below base * 2**0
    assert w.sup.stats["retrying"] == 1 and w.sup.stats["failed"] == 0
    (finished,) = w.named("job_finished")
    assert finished["status"] == "retrying" and finished["retry_delay"] == c.retry_delay
    assert finished["error"] == "boom"   # what went wrong, for the log line


def test_job_finished_says_what_went_wrong_and_nothing_more_when_all_went_well():
    w = World([job(1), job(2, task="tests.boom"), b'{"id":"j3","task":"t.nope"}'], size=1,
              prefetch=0)
    for _ in range(3):
        w.tick()
        w.pool.finish_all()
    w.tick()
    ok, failed, bad = w.named("job_finished")
    assert ok["status"] == "succeeded" and "error" not in ok
    assert (failed["status"], failed["error_type"], failed["error"]) == ("failed", "RuntimeError",
                                                                         "boom")
    assert bad["error_type"] == p.E_UNKNOWN_TASK
    assert bad["error"].startswith("unknown task 't.nope' (registered: tests.")
    # the fields every job_finished has stay as they were
    assert set(ok) == {"queue", "id", "task", "status", "error_type", "result_id", "ttl",
                       "reply_to", "attempt", "duration", "dead"}
    assert set(failed) == set(ok) | {"error"}


def test_results_dropped_by_fencing_are_reported():
    w = World([job(1)], size=1, prefetch=0, lease=15.0)
    w.tick()
    # Given a reaper took the job back while it ran: this supervisor was frozen for
    # longer than its lease (no tick, no renewal, for 20 s)
    w.rq.processing.clear()
    w.pool.finish_all()
    w.clock.t += 20.0
    w.tick()
    (dropped,) = w.named("results_dropped")
    assert dropped["count"] == 1 and dropped["cause"] == "lease_expired"
    assert "not renewed its lease for 20 s" in dropped["reason"]
    assert "another worker" in dropped["reason"] and "--lease" in dropped["note"]
    assert not w.sup.pending


def test_results_dropped_while_the_lease_held_are_not_said_to_have_run_elsewhere():
    w = World([job(1)], size=1, prefetch=0, lease=15.0)
    w.ticks(T0 + 6.0, 0.5)   # (renewed at 5 s)
    # Given the job vanished from our processing list while our lease held: a failover
    # to a replica that had not received our reservation rolls it back so
    w.rq.processing.clear()
    w.pool.finish_all()
    w.tick(0.5)
    (dropped,) = w.named("results_dropped")
    assert dropped["count"] == 1 and dropped["cause"] == "gone_from_redis"
    assert "renewed 2 s before" in dropped["reason"] and "failover" in dropped["reason"]
    assert "elsewhere" not in dropped["reason"] and "another worker" not in dropped["reason"]
    assert "redpool inspect" in dropped["note"]


# -- children dying ---------------------------------------------------------------------------

def test_a_dead_childs_job_goes_back_to_its_queue_with_one_crash_more():
    j1 = job(1, reply_to=R2)
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
    assert (again.raw, again.kind, again.crashes) == (j1, JOB, 1)


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
    pill = job(1, reply_to=R)
    w = World([pill, job(2), job(3)], size=2, prefetch=1, max_crashes=1)
    w.rq.crashes[pill] = 1          # it killed a process once already
    w.tick()
    pill_token = next(s.token for s in w.pool.sent if s.raw == pill)
    other = next(s.token for s in w.pool.sent if s.raw == job(2))
    assert w.backlog() == [("default", job(3))]

    # When it kills its child again: 2 crashes > --max-crashes 1
    w.pool.die(pill_token)
    w.tick()

    # Then it is not put back, but settled: a `fail` Work first in the backlog (the
    # crash may be counted in Redis, but the job stays in our processing list)
    assert w.rq.crashed_calls in ([], [("default", pill)])
    assert ("default", pill) not in w.rq.ready and ("default", pill) in w.rq.processing
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
        (FAIL, pill, p.E_WORKER_CRASHED, True, False)
    assert job(3) not in w.sent_raws()

    # and its outcome is a failed envelope and a dead-letter entry, never a retry
    w.pool.finish(s.token)
    w.tick()
    (c,) = [c for c in w.rq.completed if c.raw == pill]
    assert c.retry is None and c.reply_to == R
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
        (FAIL, job(1), 4, p.E_WORKER_CRASHED, True)
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
    assert (w.pool.sent[0].kind, w.pool.sent[0].crashes) == (JOB, 3)


def test_a_poison_pill_with_result_ttl_0_writes_no_result_key():
    w = World([job(1, result_ttl=0, reply_to=R)], size=1, prefetch=0, max_crashes=0)
    w.tick()
    w.pool.die(w.tokens()[0], exitcode=1)
    w.replace_dead()
    w.pool.finish_all()
    w.tick()
    (c,) = w.rq.completed
    assert c.result_id is None and c.ttl == 0 and c.reply_to == R
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
    w = World([job(1, reply_to=R)], size=1, prefetch=0, max_crashes=0)
    w.tick()
    w.pool.die(w.tokens()[0])
    w.replace_dead()
    assert w.pool.sent[-1].kind == FAIL

    # When even the child settling it dies
    w.pool.die(w.tokens()[0], exitcode=-signal.SIGKILL)
    w.tick()

    # Then the supervisor writes the failure itself, without a child
    (c,) = w.rq.completed
    assert (c.raw, c.reply_to, c.result_id) == (job(1, reply_to=R), R, "job-1")
    env = env_of(c)
    assert env["error"]["type"] == p.E_WORKER_CRASHED
    assert "then the process settling it was killed by SIGKILL" in env["error"]["message"]
    assert p.loads(c.dead)["id"] == "job-1"


def test_the_supervisor_settling_a_job_itself_answers_only_where_a_child_would():
    # Given a job whose reply_to is another application's list (as a worker that allows
    # it would have taken it), whose settling child dies too
    w = World([job(1, reply_to="myapp:replies")], size=1, prefetch=0, max_crashes=0)
    w.tick()
    w.pool.die(w.tokens()[0])
    w.replace_dead()
    w.pool.die(w.tokens()[0], exitcode=-signal.SIGKILL)
    w.tick()
    # Then its answer goes to its result key only
    (c,) = w.rq.completed
    assert c.reply_to is None and c.result_id == "job-1" and env_of(c)["id"] == "job-1"



# -- started_at of jobs the supervisor stopped: they ran, and the envelope says when --------------

def _wall_ago(w: World, seconds: float) -> tuple[float, float]:
    """The unix-time window of "``seconds`` ago on the fake clock", around now."""
    import time
    return time.time() - seconds - 1.0, time.time() - seconds + 1.0


def test_a_timed_out_job_says_when_its_attempt_started_and_ran_for_its_real_duration():
    from test_protocol import ENVELOPE

    w = World([job(1, reply_to=R)], size=1, prefetch=0, timeout=10.0, max_retries=0)
    w.tick()
    w.tick(10.0)                                  # SIGTERM at the deadline
    w.tick(0.5)
    w.pool.die(w.tokens()[0], exitcode=-signal.SIGTERM)
    lo, _ = _wall_ago(w, 10.5)
    w.tick()
    _, hi = _wall_ago(w, 10.5)
    w.pool.boot()
    w.tick()
    w.pool.finish_all(duration=REAL)
    w.tick()
    (c,) = w.rq.completed
    env = env_of(c)
    ENVELOPE.validate(env)
    assert env["error"]["type"] == "TimeoutError"
    assert lo <= env["started_at"] <= hi          # the attempt's start, not null
    (finished,) = w.named("job_finished")
    assert finished["duration"] == 10.5           # from its start to its death, not ~0


def test_a_job_that_crashes_once_too_often_here_says_when_that_run_started():
    from test_protocol import ENVELOPE

    pill = job(1, reply_to=R)
    w = World([pill], size=1, prefetch=0, max_crashes=0)
    w.tick()
    w.tick(3.0)
    lo, _ = _wall_ago(w, 3.0)
    w.pool.die(w.tokens()[0])
    w.tick()
    _, hi = _wall_ago(w, 3.0)
    # the start is kept with the crash count in Redis, for any worker judging it later
    assert lo <= w.rq.crash_started[pill] <= hi
    w.pool.boot()
    w.tick()
    w.pool.finish_all(duration=REAL)
    w.tick()
    env = env_of(w.rq.completed[0])
    ENVELOPE.validate(env)
    assert env["error"]["type"] == p.E_WORKER_CRASHED and lo <= env["started_at"] <= hi
    assert w.named("job_finished")[0]["duration"] == 3.0


def test_a_poison_pill_judged_after_crashes_elsewhere_says_when_its_last_crashed_run_started():
    from test_protocol import ENVELOPE

    # Given a job that crashed 4 times elsewhere, the last run started at T
    pill = job(1, reply_to=R)
    w = World([pill, job(2, reply_to=R)], size=1, prefetch=1, max_crashes=3)
    w.rq.crashes[pill] = 4
    w.rq.crash_started[pill] = 1700000500.25
    # and one whose count was left without a start (an older redpool counted it)
    w.rq.crashes[job(2, reply_to=R)] = 5
    w.tick()
    w.pool.finish_everything(duration=REAL)
    w.tick()
    w.pool.finish_everything(duration=REAL)
    w.tick()
    envs = {e["id"]: e for e in (env_of(c) for c in w.rq.completed)}
    for env in envs.values():
        ENVELOPE.validate(env)
        assert env["error"]["type"] == p.E_WORKER_CRASHED
    assert envs["job-1"]["started_at"] == 1700000500.25
    # it did run: never null, which would tell its producer it is safe to send again
    assert envs["job-2"]["started_at"] is not None


def test_a_failure_the_supervisor_writes_itself_keeps_the_start_of_the_stopped_run():
    from test_protocol import ENVELOPE

    w = World([job(1, reply_to=R)], size=1, prefetch=0, timeout=5.0, max_retries=0)
    w.tick()
    w.tick(5.0)
    w.tick(0.25)
    lo, _ = _wall_ago(w, 5.25)
    w.pool.die(w.tokens()[0], exitcode=-signal.SIGTERM)
    w.replace_dead()
    _, hi = _wall_ago(w, 5.25)
    assert w.pool.sent[-1].kind == FAIL
    # When even the child settling the timeout dies
    w.pool.die(w.tokens()[0], exitcode=-signal.SIGKILL)
    w.tick()
    env = env_of(w.rq.completed[0])
    ENVELOPE.validate(env)
    assert env["error"]["type"] == "TimeoutError" and lo <= env["started_at"] <= hi

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
    assert timeout == {"id": "job-1", "task": "tests.add", "queue": "default", "attempt": 1,
                       "timeout": 10.0, "pid": pid}

    # When it has not died KILL_GRACE later: SIGKILL, once
    w.tick(KILL_GRACE - 0.1)
    assert w.pool.signals == [(pid, signal.SIGTERM)]
    w.tick(0.1)
    w.tick(0.5)
    assert w.pool.signals == [(pid, signal.SIGTERM), (pid, signal.SIGKILL)]

    # When its death is reported, the job is settled as a TimeoutError to retry
    w.pool.die(s.token, exitcode=-signal.SIGKILL)
    w.replace_dead()
    # and the death, which we asked for, is no error
    assert w.named("child_died") == []
    (stopped,) = w.named("child_stopped")
    assert stopped == {"pid": pid, "exitcode": -signal.SIGKILL, "had_job": True,
                       "description": describe_exit(-signal.SIGKILL, stopped=True),
                       "reason": "its job ran past its timeout"}
    assert w.rq.crashed_calls == []       # a timeout is not a crash
    f = w.pool.sent[-1]
    assert (f.kind, f.raw, f.fail["type"], f.fail["retry"], f.fail["dead"]) == \
        (FAIL, job(1), "TimeoutError", True, False)
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
    assert w.pool.retired == [(first_pid, [])]
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

    assert w.pool.retired == [(big, [])]
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
    assert w.duties.outage.back_at == w.clock.t   # answered, reconciled (redis_up: later)
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
    w.sup.lifecycle.shutdown()
    # its processing lists are the new holder's now: shutdown leaves them alone
    assert w.rq.recover_calls == [True] and not w.lease.unregistered


# -- reconciling with Redis -------------------------------------------------------------------

def test_jobs_reserved_by_a_lost_reply_are_put_back_when_redis_is_back():
    w = World([job(1)], size=1, prefetch=0)
    # Given an exchange that moved job 1 into our processing list, but whose reply was lost
    w.rq.lose_reply = "exchange"
    w.tick()
    assert w.named("redis_down")[0]["during"] == "exchange"
    assert w.rq.processing == [("default", job(1))] and not w.pool.sent

    # When Redis answers again, the job we never heard of goes back to its queue
    w.tick(1.0)
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


def test_a_suspicion_raised_during_the_reconcile_brings_another_reconcile():
    """The waiter thread raises rq.suspect when its BLMOVE times out on a node that hangs
    (the move may run when the node wakes).  Raised while a reconcile was reading our
    lists, it was reset with the reconcile's own, and the job moved stayed unreported."""
    w = World([], size=1, prefetch=0)
    w.tick()
    read = w.rq.processing_contents
    waiter_raised = []

    def reading():  # the waiter thread, while the loop reconciles
        out = read()
        if not waiter_raised:
            waiter_raised.append(True)
            w.rq.suspect = True
            w.rq.processing.append(("default", b"moved by the waiter"))
        return out
    w.rq.processing_contents = reading
    w.rq.suspect = True  # a reply was lost
    w.tick(1.0)
    assert w.named("reconciled") == [] and waiter_raised  # (nothing stray at the read)
    assert w.rq.suspect  # the waiter's raise is kept...
    w.tick(1.0)
    # ...and the next tick reconciles again: the job the waiter moved goes back
    assert w.named("reconciled") == [{"requeued": 1}] and not w.rq.suspect
    assert w.rq.requeue_calls[-1] == [("default", b"moved by the waiter")]


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
    w.sup.lifecycle.handle_signal(signal.SIGTERM, w.clock.t)
    exchanges = len(w.rq.exchange_calls)

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
    # (while draining, finished jobs are acknowledged without reserving: complete())
    assert len(w.rq.exchange_calls) == exchanges and w.rq.calls.count("complete") == 1
    assert not w.pool.terminated



def test_a_job_put_back_and_taken_again_by_a_waiter_in_blmove_is_counted_once():
    # Given two long jobs running and one held, the waiter blocked in BLMOVE
    w = World([job(1), job(2), job(3)], size=2, prefetch=1, waiter=True, grace=8.0)
    w.tick()
    assert len(w.sup.inflight) == 2 and w.backlog() == [("default", job(3))]
    w.waiter.in_call = True

    # When Ctrl-C puts the held job back, and the BLMOVE already in flight takes it again
    w.sup.lifecycle.handle_signal(signal.SIGINT, w.clock.t)
    assert w.rq.ready == deque([("default", job(3))])
    w.rq.processing.append(w.rq.ready.popleft())
    w.waiter.inbox.append(Reserved("default", job(3)))
    w.waiter.in_call = False
    w.tick(0.1)

    # Then it goes back again (nothing is run while draining) ...
    assert w.rq.ready == deque([("default", job(3))]) and not w.sup.backlog
    # ... and when the grace runs out, the running ones go back too
    w.tick(8.0)
    assert w.sup.state == STOPPED
    w.sup.lifecycle.shutdown()
    assert sorted(raw for _, raw in w.rq.ready) == sorted(jobs(1, 2, 3))
    # and the stopped event counts what went back: three jobs, each once
    (stopped,) = w.named("stopped")
    assert stopped["requeued"] == 3 == len(w.rq.ready)

def test_sigint_drains_like_sigterm():
    w = World([job(1)], size=1)
    w.tick()
    w.sup.lifecycle.handle_signal(signal.SIGINT, w.clock.t)
    assert w.sup.state == DRAINING
    assert w.named("draining")[0]["signal"] == "SIGINT"


def test_draining_with_nothing_running_stops_on_the_next_tick():
    w = World([], size=2)
    w.tick()
    w.sup.lifecycle.handle_signal(signal.SIGTERM, w.clock.t)
    w.tick()
    assert w.sup.state == STOPPED
    assert not w.pool.terminated


def test_a_poison_pill_is_still_settled_while_draining():
    w = World([job(1), job(2)], size=2, prefetch=0, max_crashes=0)
    w.tick()
    t1, t2 = [s.token for s in w.pool.sent]
    w.sup.lifecycle.handle_signal(signal.SIGTERM, w.clock.t)
    w.pool.die(t1)
    w.pool.finish(t2)
    w.tick()
    # the settle goes to the child that is free; no new job does
    s = w.pool.sent[-1]
    assert (s.kind, s.raw) == (FAIL, job(1))
    assert w.sup.state == DRAINING
    w.pool.finish_all()
    w.tick()
    assert w.sup.state == STOPPED
    assert sorted(c.raw for c in w.rq.completed) == [job(1), job(2)]


def test_drain_deadline_passing_stops_now():
    w = World([job(1)], size=1, grace=10.0)
    w.tick()
    w.sup.lifecycle.handle_signal(signal.SIGTERM, w.clock.t)

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
    w.sup.lifecycle.handle_signal(signal.SIGTERM, w.clock.t)
    w.pool.finish_all()
    w.tick(6.0)
    assert [c.raw for c in w.rq.completed] == [job(1)]
    assert w.sup.state == STOPPED and not w.pool.terminated


def test_second_sigterm_stops_now():
    w = World([job(1), job(2)], size=2)
    w.tick()
    w.sup.lifecycle.handle_signal(signal.SIGTERM, w.clock.t)
    assert w.sup.state == DRAINING

    w.sup.lifecycle.handle_signal(signal.SIGTERM, w.clock.t + 0.5)

    assert w.sup.state == STOPPED
    assert w.pool.terminated
    assert w.named("stop_now") == [{"signal": "SIGTERM"}]


def test_stop_now_still_collects_results_already_sent():
    w = World([job(1), job(2)], size=2, prefetch=0)
    w.tick()
    w.sup.lifecycle.handle_signal(signal.SIGTERM, w.clock.t)
    t1, t2 = w.tokens()
    w.pool.finish(t1)          # sent just before the second signal
    w.sup.lifecycle.handle_signal(signal.SIGTERM, w.clock.t)
    assert [c.raw for c in w.sup.pending] == [job(1)]
    assert list(w.sup.inflight) == [t2]

    w.sup.lifecycle.shutdown()
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
    w.sup.lifecycle.shutdown()

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
    w.sup.lifecycle.shutdown()
    assert w.pool.shut
    assert len(w.named("shutdown_redis_error")) == 1
    assert len(w.named("stopped")) == 1


def test_jobs_a_waiter_took_during_shutdown_are_put_back():
    w = World([], size=1, prefetch=0, waiter=True)
    w.tick()
    w.rq.processing.append(("default", job(3)))
    w.waiter.inbox.append(Reserved("default", job(3), 0))
    w.sup.lifecycle.shutdown()
    assert w.rq.ready == deque([("default", job(3))])


# -- Redis going away and coming back ---------------------------------------------------------

def test_redis_down_keeps_completions_and_retries_after_backoff():
    w = World([job(1), job(2)], size=2, prefetch=0)
    w.tick()
    # Given Redis goes away while two jobs finish
    w.rq.down = True
    w.pool.finish_all()

    # When the loop tries to acknowledge them (and reserve more: one call), nothing raises
    before = len(w.rq.calls)
    w.tick()
    assert w.rq.calls[before:] == ["exchange"]
    assert len(w.sup.pending) == 2
    (down,) = w.named("redis_down")
    assert down["during"] == "exchange" and "Connection refused" in down["error"]
    attempts = w.rq.calls.count("exchange")

    # Within the backoff nothing is tried again, and nothing is reported twice
    calls = len(w.rq.calls)
    w.tick(0.01)
    assert len(w.rq.calls) == calls
    w.tick(0.1)   # past the first backoff: tried, fails again
    assert w.rq.calls.count("exchange") == attempts + 1
    assert len(w.named("redis_down")) == 1
    assert len(w.sup.pending) == 2
    assert w.named("redis_up") == []

    # When Redis is back, after the (doubled) backoff, both are acknowledged at once
    w.rq.down = False
    w.tick(1.0)
    assert [sorted(c.raw for c in batch) for batch in w.rq.complete_calls] == [[job(1), job(2)]]
    assert w.rq.exchange_calls[-1] == (2, 2)    # with the reserve for the two idle children
    assert not w.sup.pending
    # and the outage is said over once Redis has answered for UP_AFTER (outage.py)
    assert w.named("redis_up") == [] and w.duties.redis_down
    (up,) = w.outage_over()
    assert up["failures"] == 2 and up["duration"] > 0
    assert w.duties.redis_down is False


def test_redis_flapping_is_one_outage_said_once_each_way():
    # Given Redis that fails, answers, fails again... as calls to a failing-over cluster do
    w = World([job(i) for i in range(20)], size=2, prefetch=1)
    w.tick()
    for _ in range(6):
        w.rq.down = True
        w.tick(0.6)   # (the housekeeping calls Redis every half second)
        w.rq.down = False
        w.tick(0.6)
    since, last_back = w.duties.outage.since, w.duties.outage.back_at
    # Then one redis_down, no redis_up while it flaps, and the work went on between flaps
    assert len(w.named("redis_down")) == 1 and w.named("redis_up") == []
    assert w.rq.calls.count("processing_contents") == 6   # a reconcile after each failure
    # When it has answered for UP_AFTER: one redis_up, how long and how many failures
    (up,) = w.outage_over()
    assert up == {"duration": round(last_back - since, 3), "failures": 6}
    assert not w.duties.redis_down
    # and a later failure is a new outage
    w.rq.down = True
    w.tick(1.0)
    assert len(w.named("redis_down")) == 2


def test_an_outage_lasts_while_the_reconcile_cannot_reach_every_node():
    # Given a Redis Cluster node away: the exchange (other nodes) succeeds, and the
    # reconcile, which reads every queue's processing list, fails
    w = World([job(1), job(2)], size=1, prefetch=0)
    w.tick()
    w.rq.down = True
    w.tick(0.5)
    w.rq.down = False
    w.rq.away = {"processing_contents"}
    w.ticks(w.clock.t + 3 * UP_AFTER, 0.25)
    # Then the outage goes on (one redis_down, no redis_up), and the retries back off
    assert len(w.named("redis_down")) == 1 and w.named("redis_up") == []
    assert w.rq.calls.count("processing_contents") <= 3 * UP_AFTER / BACKOFF_MAX + 6
    # When the node is back, the reconcile goes through, and after UP_AFTER it is over
    w.rq.away = set()
    w.tick(BACKOFF_MAX)
    assert w.duties.outage.back_at == w.clock.t
    (up,) = w.outage_over()
    assert up["failures"] >= 3


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
    assert w.named("redis_down")[0]["during"] == "exchange"
    assert not w.pool.sent
    w.rq.down = False
    w.tick(1.0)
    assert w.sent_raws() == [job(1)]
    assert w.outage_over() == [{"duration": 1.0, "failures": 1}]


def test_redis_down_while_draining_keeps_the_backlog_until_it_is_back():
    w = World([job(1), job(2)], size=1, prefetch=1)
    w.tick()
    w.rq.down = True
    w.sup.lifecycle.handle_signal(signal.SIGTERM, w.clock.t)
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


def test_a_job_from_the_waiter_rearms_it_rather_than_waiting_on_a_reserve():
    # (a reserve round trip there would hold the job's answer up: W3's latency)
    w = World([], size=2, prefetch=0, waiter=True)
    w.tick()
    calls = len(w.rq.exchange_calls)
    w.waiter.armed = False                      # its BLMOVE got one, and disarmed itself
    w.rq.processing.append(("default", job(5)))
    w.waiter.inbox.append(Reserved("default", job(5), 0))
    w.tick()
    assert w.sent_raws() == [job(5)]
    assert len(w.rq.exchange_calls) == calls    # no reserve now...
    assert w.waiter.armed                       # ...the waiter asks, from its thread
    # and the answer goes with a reserve, as ever
    w.finish_running(TINY)
    assert w.rq.exchange_calls[-1][0] == 1 and len(w.rq.exchange_calls) == calls + 1


def test_the_waiter_is_not_rearmed_while_the_lease_is_lost_or_redis_is_down():
    for cause in ("lease", "redis"):
        w = World([], size=2, prefetch=0, waiter=True)
        w.tick()
        w.waiter.armed = False
        if cause == "lease":
            w.duties.leased = False
            w.duties.name_lost = True    # (so the tick does not simply re-register)
        else:
            w.duties.retry_at = w.clock.t + 1.0   # waiting out a backoff
        w.rq.processing.append(("default", job(5)))
        w.waiter.inbox.append(Reserved("default", job(5), 0))
        w.tick()
        assert not w.waiter.armed, cause


def test_with_several_queues_a_job_from_a_waiter_is_followed_by_a_reserve_in_priority():
    # (one waiter per queue would take from each in turn: low-priority work could take
    # the processes while high-priority jobs wait)
    w = World([("high", job(i)) for i in range(10, 20)], size=4, prefetch=0, waiter=True,
              queues=("high", "low"))
    w.rq.ready.clear()                          # empty at first: the waiters are armed
    w.tick()
    assert w.waiter.armed
    w.waiter.armed = False
    w.rq.ready.extend(("high", job(i)) for i in range(10, 20))
    w.rq.processing.append(("low", job(5)))     # a low job came through its waiter
    w.waiter.inbox.append(Reserved("low", job(5), 0))
    w.tick()
    assert w.rq.reserve_calls                   # the rest is reserved, high first
    assert [s.queue for s in w.pool.sent] == ["low", "high", "high", "high"]


def test_jobs_trickling_in_one_by_one_are_spread_over_idle_children():
    w = World([job(100)], size=2, prefetch=2, waiter=True)
    w.tick()
    w.finish_running(TINY)                      # tiny jobs so far: batches of up to 64
    assert w.sup.batch_size() == MAX_BATCH and not w.pool.busy()
    for i in range(2):
        w.rq.processing.append(("default", job(i)))
        w.waiter.inbox.append(Reserved("default", job(i), 0))
        w.tick()
    a, b = w.pool.children
    assert (len(a.tokens), len(b.tokens)) == (1, 1)


def test_a_poison_pill_from_the_waiter_is_not_run():
    w = World([], size=1, prefetch=0, waiter=True, max_crashes=2)
    w.tick()
    w.waiter.inbox.append(Reserved("default", job(5), 3))
    w.tick()
    assert (w.pool.sent[0].kind, w.pool.sent[0].fail["type"]) == (FAIL, p.E_WORKER_CRASHED)


def test_waiter_is_disarmed_on_sigterm_and_its_jobs_go_back():
    w = World([job(1)], size=1, prefetch=0, waiter=True)
    w.tick()
    w.sup.lifecycle.handle_signal(signal.SIGTERM, w.clock.t)
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
    assert w.outage_over() == [{"duration": 1.0, "failures": 1}]


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
    w.sup.lifecycle.handle_signal(signal.SIGTERM, w.clock.t)
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
    w.sup.lifecycle.handle_signal(signal.SIGTERM, w.clock.t)
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
    assert w.duties.outage.back_at == w.clock.t
    w.tick()                                 # and the renewal first thing after
    assert w.lease.renewals == 1
    assert w.sup.wait_timeout(w.clock.t) > 0


# -- batches: how many jobs a child holds -----------------------------------------------------

def test_batch_size_is_one_until_a_duration_is_known_then_grows_for_short_jobs():
    w = World(jobs(*range(200)), size=1, prefetch=0)
    w.tick()
    # nothing known yet: one at a time
    assert w.sup.batch_size() == 1
    assert [b.raws for b in w.pool.batches] == [jobs(0)]
    assert w.rq.exchange_calls == [(0, 1)]

    # When a job reports a short run time (0.49 ms)
    w.finish_running(SHORT)

    # Then batches are worth about BATCH_SECONDS of work: 10 jobs, reserved in the same
    # round trip that acknowledged the finished one, and sent as ONE message, in order
    assert w.sup.avg_duration == SHORT
    assert w.sup.batch_size() == int(BATCH_SECONDS / SHORT) == 10
    assert w.rq.exchange_calls[-1] == (1, 10)
    (_, batch) = w.pool.batches
    assert batch.raws == jobs(*range(1, 11)) and batch.held == 0
    assert [s.kind for s in batch.entries] == [JOB] * 10

    # When jobs get even shorter, the batch grows to MAX_BATCH and no further
    w.pool.finish_everything(TINY)
    w.tick()
    assert w.sup.batch_size() == MAX_BATCH
    assert len(w.pool.batches[-1].tokens) == MAX_BATCH
    assert w.pool.batches[-1].raws == jobs(*range(11, 11 + MAX_BATCH))
    assert w.rq.exchange_calls[-1] == (10, MAX_BATCH)


def test_the_batch_size_follows_a_moving_average_of_durations():
    w = World(jobs(*range(50)), size=1, prefetch=0)
    w.tick()
    w.finish_running(SHORT)
    assert w.sup.batch_size() == 10
    w.pool.finish(w.tokens()[0], duration=4 * SHORT)
    w.tick()
    # 0.8 * SHORT + 0.2 * 4 * SHORT
    assert w.sup.avg_duration == pytest.approx(1.6 * SHORT)
    assert w.sup.batch_size() == int(BATCH_SECONDS / (1.6 * SHORT)) == 6


def test_long_jobs_go_one_at_a_time():
    w = World(jobs(*range(30)), size=2, prefetch=1)
    w.tick()
    for d in (0.5, LONG, 0.25, 2.0, 0.5):
        w.finish_running(d)
        assert w.sup.batch_size() == 1
    assert {len(b.tokens) for b in w.pool.batches} == {1}
    assert all(b.held == 0 for b in w.pool.batches)      # never queued behind a running job
    # each reserve only asks for the idle children and the prefetch allowance (1 job)
    assert max(w.rq.reserve_calls) <= 2 + 1


def test_the_batch_shrinks_back_to_one_when_jobs_get_long():
    w = World(jobs(*range(200)), size=1, prefetch=0)
    w.tick()
    w.finish_running(TINY)
    assert w.sup.batch_size() == MAX_BATCH
    w.pool.finish(w.tokens()[0], duration=LONG)
    w.tick()
    # one long job is enough: 0.8 * 1 us + 0.2 * 1 s
    assert w.sup.batch_size() == 1
    # and the child, still holding most of its batch, gets nothing more
    assert len(w.pool.batches) == 2
    assert w.sup.want() == w.expected_want() <= 0


def test_a_child_is_topped_up_only_when_it_has_room_for_half_a_batch():
    w = World(jobs(*range(100)), size=1, prefetch=1)
    w.tick()                                # k=1: job 0 runs, job 1 is held
    (c,) = w.pool.children
    w.finish_running(SHORT)                 # k=10
    # the idle child got the held job at once, then its batch was topped up to 10 with
    # what the same tick reserved (9 >= 5 free places)
    assert [b.raws for b in w.pool.batches] == [jobs(0), jobs(1), jobs(*range(2, 11))]
    assert [b.held for b in w.pool.batches] == [0, 0, 1]
    assert len(c.tokens) == 10

    # While it has fewer than 5 free places, it gets nothing more (messages stay large)
    for left in (9, 8, 7, 6):
        w.finish_running(SHORT)
        assert len(c.tokens) == left and len(w.pool.batches) == 3
        assert w.sup.wait_timeout(w.clock.t) > 0

    # With 5 free places it is topped up, before it runs dry, with 5 held jobs in order
    w.finish_running(SHORT)
    assert len(w.pool.batches) == 4
    top = w.pool.batches[-1]
    assert (top.held, len(top.tokens)) == (5, 5)
    assert top.raws == jobs(*range(11, 16))
    assert len(c.tokens) == 10
    # everything was sent in queue order, each job once
    assert w.sent_raws() == jobs(*range(16))


def test_want_counts_no_more_room_than_a_child_has_left_under_max_jobs_per_child():
    w = World(jobs(*range(100)), size=1, prefetch=0, max_jobs_per_child=3)
    w.tick()
    w.finish_running(SHORT)                 # k = 10, but it may run only 2 more
    (c,) = w.pool.children
    assert c.jobs_done + len(c.tokens) == 3
    # nothing more is reserved for it: the jobs would only wait in the backlog
    assert len(w.sup.backlog) == 0
    assert w.sup.want() == w.expected_want() == 0


def test_max_jobs_per_child_caps_a_batch():
    w = World(jobs(*range(100)), size=1, prefetch=3, max_jobs_per_child=5)
    w.tick()
    pid = w.pool.children[0].pid
    w.finish_running(SHORT)                 # k=10, but 4 jobs left in its allowance
    w.pool.finish_everything(SHORT)
    w.tick()
    w.pool.finish_everything(SHORT)
    w.tick()

    # Then it never held more than its allowance: 1 + 3 (all that was held) + 1
    mine = w.pool.batches_to(pid)
    assert [len(b.tokens) for b in mine] == [1, 3, 1]
    assert all(b.done + b.held + len(b.tokens) <= 5 for b in mine)
    assert sum(len(b.tokens) for b in mine) == 5
    # and was retired after its 5th job, holding nothing
    assert w.pool.retired == [(pid, [])]
    (retired,) = w.named("child_retired")
    assert "--max-jobs-per-child 5" in retired["reason"]

    # its successor gets a batch of min(10, 5), the next jobs in order
    w.tick()
    w.pool.boot()
    w.tick()
    (succ,) = w.pool.children
    assert succ.pid != pid
    (first,) = w.pool.batches_to(succ.pid)
    assert first.raws == jobs(*range(5, 10))
    assert w.named("child_retired") == [retired]


MEDIUM = 0.008  # answered one by one (over FLUSH_SECONDS), double-buffered (k = 2)


def test_under_a_backlog_acknowledgements_of_medium_jobs_wait_to_share_a_round_trip():
    w = World(jobs(*range(50)), size=2, prefetch=1)
    w.tick()
    w.finish_running(MEDIUM)                   # learn the duration: now k = 2 per child
    a, b = w.pool.children
    assert (len(a.tokens), len(b.tokens)) == (2, 2)
    calls = len(w.rq.exchange_calls)

    # When A finishes, with its next job in hand (and B with its own)
    w.pool.finish(a.token, duration=MEDIUM)
    w.tick(0.001)
    # Then nothing is sent yet, but A got its next job from what is held, and the
    # loop will wake by the deadline (at most one job time, at most ACK_DELAY)
    assert len(w.rq.exchange_calls) == calls and len(w.sup.pending) == 1
    assert len(a.tokens) == 2
    due = w.sup.ack_due
    assert w.clock.t < due <= w.clock.t + min(ACK_DELAY, MEDIUM)
    assert w.sup.wait_timeout(w.clock.t) == pytest.approx(due - w.clock.t)

    # When B finishes before the deadline, its acknowledgement joins A's
    w.pool.finish(b.token, duration=MEDIUM)
    w.tick(0.001)
    assert len(w.rq.exchange_calls) == calls and len(w.sup.pending) == 2

    # When the deadline comes: both go in one round trip (with the reserve)
    w.clock.t = due
    w.tick()
    assert len(w.rq.exchange_calls) == calls + 1 and w.rq.exchange_calls[-1][0] == 2
    assert not w.sup.pending and w.sup.ack_due == 0.0


def test_a_child_with_nothing_behind_its_job_gets_its_acknowledgement_sent_at_once():
    w = World(jobs(0, 1), size=2, prefetch=0)   # two jobs: no backlog behind them
    w.tick()
    a, b = w.pool.children
    w.pool.finish(a.token, duration=MEDIUM)
    w.tick()
    assert w.rq.exchange_calls[-1][0] == 1 and not w.sup.pending


def test_short_jobs_are_acknowledged_at_once_their_answers_already_come_together():
    w = World(jobs(*range(200)), size=2, prefetch=1)
    w.tick()
    w.finish_running(SHORT)
    a, _ = w.pool.children
    assert len(a.tokens) > 2
    w.pool.finish(a.token, duration=SHORT)
    w.tick()
    assert w.rq.exchange_calls[-1][0] == 1 and not w.sup.pending


def test_draining_acknowledges_at_once():
    w = World(jobs(*range(50)), size=2, prefetch=1)
    w.tick()
    w.finish_running(MEDIUM)
    a, _ = w.pool.children
    w.pool.finish(a.token, duration=MEDIUM)
    w.tick()
    assert len(w.sup.pending) == 1
    w.sup.lifecycle.begin_drain(w.clock.t, "SIGTERM")
    w.tick()
    assert not w.sup.pending


def test_want_is_room_in_accepting_batches_plus_prefetch_batches_less_backlog():
    w = World(jobs(*range(200)), size=2, prefetch=1, max_memory_per_child=512 * 2**20)
    w.tick()                                 # k=1: 2 idle + 1 prefetch
    assert w.rq.exchange_calls == [(0, 3)]
    a, b = w.pool.children
    w.pool.finish(a.token, duration=SHORT)
    w.tick()
    # k=10: A got the held job; then room 9 + 9, plus 1 batch of prefetch, less 0 held
    assert w.rq.exchange_calls[-1] == (1, 28)
    assert (len(a.tokens), len(b.tokens), len(w.sup.backlog)) == (10, 10, 10)
    assert w.sup.want() == w.expected_want() == 0

    # When B is to be retired (too much memory) while it still holds 9 jobs
    b_held = list(b.tokens)[1:]
    w.pool.rss_of = {b.pid: 600 * 2**20}
    w.pool.finish(a.token, duration=SHORT)
    w.pool.finish(b.token, duration=SHORT)
    w.tick()
    assert b.retiring and len(b.tokens) == 9 and w.pool.retired == [(b.pid, list(b.tokens))]
    b_batches = len(w.pool.batches_to(b.pid))
    # Then its room no longer counts: A's 1 free place + 10 prefetch - 10 held
    assert w.rq.exchange_calls[-1] == (2, 1)
    assert w.sup.want() == w.expected_want() == 0

    # When its successor has booted, the successor's room counts (and is filled)
    w.pool.boot()
    w.tick()
    succ = w.pool.children[-1]
    assert succ.pid not in (a.pid, b.pid)
    assert len(succ.tokens) == 10
    assert w.rq.exchange_calls[-1] == (0, 10)          # 1 (A) + 0 (C) + 10 - 1
    assert w.sup.want() == w.expected_want()
    # the retiring child works through its batch, gets nothing more, and then goes
    for _ in range(9):
        w.pool.finish(b.token, duration=SHORT)
        w.tick()
        assert w.sup.want() == w.expected_want()
    assert len(w.pool.batches_to(b.pid)) == b_batches
    w.tick()
    assert b not in w.pool.children
    assert w.named("child_died") == [] and w.pool.retired == [(b.pid, b_held)]


def test_exchange_is_one_call_per_tick_with_completions_and_the_reserve():
    w = World(jobs(*range(10)), size=2, prefetch=0)
    w.tick()
    w.pool.finish_all()
    before = len(w.rq.calls)
    w.tick()
    # one round trip: both results, and a reserve for both idle children
    assert w.rq.calls[before:] == ["exchange"]
    assert w.rq.exchange_calls[-1] == (2, 2)
    assert sorted(c.raw for c in w.rq.completed) == jobs(0, 1)
    assert w.sent_raws() == jobs(0, 1, 2, 3)
    assert "complete" not in w.rq.calls and "reserve" not in w.rq.calls

    # nothing finished and no room: no call at all
    before = len(w.rq.calls)
    w.tick()
    assert w.rq.calls[before:] == []


def test_completions_go_even_when_the_lease_is_not_held():
    w = World(jobs(1, 2, 3), size=2, prefetch=0)
    w.tick()
    t1, t2 = w.tokens()
    # Given our lease was lost, and claiming the name again fails for now
    w.rq.epoch = None
    w.lease.refuse = redis.ConnectionError("gone")
    w.pool.finish(t1)
    w.tick()
    assert w.rq.exchange_calls[-1] == (1, 1)      # the reserve found the lease lost
    assert not w.duties.leased
    assert [c.raw for c in w.rq.completed] == jobs(1)

    # When the other job finishes, it is acknowledged without reserving anything
    w.pool.finish(t2)
    w.tick(1.0)
    assert w.rq.exchange_calls[-1] == (1, 0)
    assert [c.raw for c in w.rq.completed] == jobs(1, 2)
    assert not w.sup.pending
    # and then the name is claimed again
    assert w.duties.leased and w.named("reregistered") == [{"epoch": "epoch-2"}]


# -- batches: a job that runs long among short ones ----------------------------------------------

def short_world(**settings) -> World:
    """A worker that has seen only short jobs (batches of 10), idle, with its waiter."""
    w = World([job(0)], waiter=True, **settings)
    w.tick()
    w.finish_running(SHORT)
    assert w.sup.batch_size() == 10 and not w.sup.backlog and not w.rq.ready
    return w


def test_jobs_a_child_gives_back_behind_a_long_job_go_back_to_their_queue_for_other_hosts():
    # Given one process, --prefetch 0, on a worker that has seen only short jobs, which
    # runs a job that will turn out long, and five short jobs that arrived after it and
    # were handed to the same (busy) process, the only one
    w = short_world(size=1, prefetch=0)
    (c,) = w.pool.children
    w.rq.push(("default", job(100, task="tests.slow")))
    w.tick()
    (long_token,) = c.tokens
    short = jobs(*range(1, 6))
    w.rq.push(*[("default", raw) for raw in short])
    w.tick()
    assert len(c.tokens) == 6 and w.pool.batches[-1].raws == short
    sent = len(w.pool.batches)
    reserves = len(w.rq.reserve_calls)
    # When the process, its job running past the give-back time, gives them back
    w.pool.give_back(c.pid)
    w.tick()
    # Then none waits here for it: with no other process free and no prefetch allowed,
    # they go back to the head of their queue, in their order, for another host to take
    assert w.rq.requeue_calls[-1] == [("default", raw) for raw in short]
    assert list(w.rq.ready) == [("default", raw) for raw in short]
    assert not w.sup.backlog and w.sup.stats["requeued"] == 5
    # and this host takes none back while its long job runs: nothing is reserved, the
    # waiter is not left armed, the busy process is handed nothing
    assert w.sup.want() == 0 and len(w.rq.reserve_calls) == reserves
    assert not w.waiter.armed and len(w.pool.batches) == sent
    assert list(c.tokens) == [long_token]
    # (a waiter already inside BLMOVE may still bring one back: it goes back again)
    w.waiter.inbox.append(Reserved("default", w.rq.ready.popleft()[1], 0))
    w.rq.processing.append(("default", short[0]))
    w.tick()
    assert w.rq.requeue_calls[-1] == [("default", short[0])]
    assert w.rq.ready[0] == ("default", short[0]) and not w.sup.backlog
    # When the long job ends, the process takes work again, the short jobs first
    w.pool.finish(long_token, duration=LONG)
    w.tick()
    assert w.pool.batches[-1].pid == c.pid and w.pool.batches[-1].raws == [short[0]]
    assert not c.stalled and not w.sup.gave_back


def test_jobs_given_back_go_to_an_idle_process_rather_than_to_redis():
    # Given two processes, one running a job that turns out long with short jobs behind it
    w = short_world(size=2, prefetch=0)
    w.rq.push(("default", job(100, task="tests.slow")))
    w.tick()
    busy = next(c for c in w.pool.children if c.tokens)
    idle = next(c for c in w.pool.children if c is not busy)
    short = jobs(*range(1, 4))
    # (handed to the busy one, as if the idle one had been busy a moment before)
    w.sup.backlog.extend(w.sup.admit(Reserved("default", raw, 0)) for raw in short)
    w.rq.processing += [("default", raw) for raw in short]
    idle.retiring = True
    w.sup.dispatch()
    idle.retiring = False
    assert w.pool.batches[-1].pid == busy.pid and w.pool.batches[-1].raws == short
    # When it gives them back
    w.pool.give_back(busy.pid)
    w.tick()
    # Then the idle process runs them, in order; nothing went back to Redis
    assert w.pool.batches[-1].pid == idle.pid and w.pool.batches[-1].raws == short
    assert w.rq.requeue_calls == [] and not w.sup.backlog


def test_jobs_given_back_stay_on_the_host_within_the_prefetch_allowance():
    # Given --prefetch 1 (one batch, 10 short jobs, may wait on the host)
    w = short_world(size=1, prefetch=1)
    (c,) = w.pool.children
    w.rq.push(("default", job(100, task="tests.slow")), *[("default", j) for j in jobs(*range(1, 16))])
    w.tick()
    w.tick()
    held = len(c.tokens) - 1 + len(w.sup.backlog)
    assert held >= 11
    # When the process with the long job gives back what it holds
    w.pool.give_back(c.pid)
    w.tick()
    # Then the host keeps one batch (the first in line), and the rest goes back
    assert [w_.raw for w_ in w.sup.backlog] == jobs(*range(1, 11))
    assert w.rq.requeue_calls[-1] == [("default", j) for j in jobs(*range(11, 1 + held))]


def test_the_give_back_time_is_sent_with_each_batch():
    # RETURN_AFTER_SECONDS for short jobs; a few jobs' worth for jobs of 20-100 ms, which
    # are held two at a time and must not each give back the next
    w = short_world(size=1, prefetch=0)
    w.rq.push(*[("default", j) for j in jobs(*range(1, 40))])
    w.tick()
    assert w.pool.batches[-1].return_after == RETURN_AFTER_SECONDS
    for _ in range(12):
        w.pool.finish_everything(0.05)
        w.tick()
    assert w.sup.batch_size() == 2
    assert w.pool.batches[-1].return_after == pytest.approx(4 * w.sup.avg_duration)


# -- batches: a child dying in the middle of one ----------------------------------------------

def batched_world(**settings) -> World:
    """One child holding a batch of jobs 1..10 (job 0 ran alone, and was short)."""
    w = World(jobs(*range(100)), size=1, prefetch=0, **settings)
    w.tick()
    w.finish_running(SHORT)
    (c,) = w.pool.children
    assert [w.pool.msg_of(t).raw for t in c.tokens] == jobs(*range(1, 11))
    return w


def test_a_child_dying_mid_batch_blames_only_the_running_job():
    w = batched_world(max_crashes=3)
    w.finish_running(SHORT)                     # job 1 done; job 11 reserved (1 free place)
    assert w.backlog() == [("default", job(11))]
    (c,) = w.pool.children
    running = c.token
    assert w.pool.msg_of(running).raw == job(2)

    # When the child dies running job 2, with jobs 3..10 not started
    w.pool.die(running, exitcode=-signal.SIGSEGV)
    w.tick()

    # Then exactly job 2 is handled as a crash: back to the head of its queue, counted
    assert w.rq.crashed_calls == [("default", job(2))]
    assert w.rq.ready[0] == ("default", job(2)) and w.rq.crashes[job(2)] == 1
    assert w.sup.stats["crashed"] == 1
    (crashed,) = w.named("job_crashed")
    assert crashed["crashes"] == 1
    (died,) = w.named("child_died")
    assert died["had_job"] is True
    # and the never-started rest are first in line again, in their order, uncounted
    assert w.backlog() == [("default", j) for j in jobs(*range(3, 11), 11)]
    assert all(x.crashes == 0 and x.fail is None for x in w.sup.backlog)
    assert all(w.rq.crashes[j] == 0 for j in jobs(*range(3, 11)))
    assert not w.sup.inflight
    assert w.sup.held() == Counter(w.rq.processing)
    assert w.sup.wait_timeout(w.clock.t) > 0      # waiting for the replacement to boot

    # When the replacement has booted, they are dispatched again as they were
    w.pool.boot()
    w.tick()
    (succ,) = w.pool.children
    first = w.pool.batches_to(succ.pid)[0]
    assert first.raws == jobs(*range(3, 11), 11)
    assert all((s.kind, s.crashes) == (JOB, 0) for s in first.entries)
    # and job 2, reserved again, says it crashed once
    assert [(x.raw, x.crashes) for x in w.sup.backlog] == [(job(2), 1)]


def test_a_child_dying_mid_batch_over_max_crashes_settles_the_running_job_first():
    w = batched_world(max_crashes=0)
    (c,) = w.pool.children
    running = c.token
    assert w.pool.msg_of(running).raw == job(1)

    w.pool.die(running)
    w.tick()

    # Then job 1 is a poison pill: settled first, never back in its queue; the rest
    # follow it, in order, uncounted
    assert w.rq.crashed_calls in ([], [("default", job(1))])
    assert ("default", job(1)) not in w.rq.ready and ("default", job(1)) in w.rq.processing
    pill, *rest = w.sup.backlog
    assert (pill.raw, pill.fail["error_type"], pill.fail["dead"]) == (job(1), p.E_WORKER_CRASHED, True)
    assert "1 times" in pill.fail["message"]
    assert [(x.raw, x.crashes, x.fail) for x in rest] == [(j, 0, None) for j in jobs(*range(2, 11))]

    # and the replacement's first batch settles it before running the rest
    w.pool.boot()
    w.tick()
    (succ,) = w.pool.children
    first = w.pool.batches_to(succ.pid)[0]
    assert [(s.kind, s.raw) for s in first.entries] == \
        [(FAIL, job(1))] + [(JOB, j) for j in jobs(*range(2, 11))]
    w.pool.finish(succ.token)
    w.tick()
    (c1,) = [x for x in w.rq.completed if x.raw == job(1)]
    assert c1.dead is not None and c1.retry is None


def test_a_child_killed_for_a_timeout_mid_batch_blames_only_the_timed_out_job():
    w = batched_world(timeout=5.0, max_crashes=0)
    (c,) = w.pool.children
    pid, running = c.pid, c.token
    w.tick(5.0)
    assert w.pool.signals == [(pid, signal.SIGTERM)]
    w.pool.die(running, exitcode=-signal.SIGTERM)
    w.tick(0.01)
    assert w.rq.crashed_calls == [] and w.sup.stats["crashed"] == 0
    first, *rest = w.sup.backlog
    assert (first.raw, first.fail["error_type"], first.fail["retry"]) == (job(1), "TimeoutError", True)
    assert [(x.raw, x.fail) for x in rest] == [(j, None) for j in jobs(*range(2, 11))]
    assert w.sup.stats["timed_out"] == 1


def test_a_child_dying_mid_batch_while_draining_puts_the_rest_back_in_their_queue():
    w = World(jobs(*range(100)), size=2, prefetch=0)
    w.tick()
    w.finish_running(SHORT)
    a, b = w.pool.children
    assert len(a.tokens) == len(b.tokens) == 10
    a_jobs = [w.pool.msg_of(t).raw for t in a.tokens]
    w.sup.lifecycle.handle_signal(signal.SIGTERM, w.clock.t)
    sent = len(w.pool.sent)

    w.pool.die(a.token)
    w.tick()

    # the running job is counted as a crash; the rest go back to the head of their
    # queue, oldest first, and not to the other child (the crashed job, put back at
    # the head first, ends up right behind them)
    assert w.rq.crashed_calls == [("default", a_jobs[0])]
    assert w.rq.requeue_calls[-1] == [("default", j) for j in a_jobs[1:]]
    assert list(w.rq.ready)[:10] == [("default", j) for j in a_jobs[1:] + a_jobs[:1]]
    assert w.rq.crashes[a_jobs[0]] == 1 and not any(w.rq.crashes[j] for j in a_jobs[1:])
    assert len(w.pool.sent) == sent and not w.sup.backlog
    assert w.sup.state == DRAINING
    assert w.sup.wait_timeout(w.clock.t) > 0


def test_jobs_a_dead_child_never_started_are_not_run_twice():
    w = batched_world(max_crashes=5)
    (c,) = w.pool.children
    w.pool.die(c.token)
    w.replace_dead()
    w.pool.finish_everything(SHORT)
    w.tick()
    w.pool.finish_everything(SHORT)
    w.tick()
    done = Counter(x.raw for x in w.rq.completed)
    assert max(done.values()) == 1
    assert set(jobs(*range(2, 11))) <= set(done)


# -- batches: timeouts count from when a job starts -------------------------------------------

def test_the_next_job_of_a_batch_gets_its_deadline_when_the_previous_one_finishes():
    w = World(jobs(*range(50)), size=1, prefetch=0, timeout=10.0, lease=60.0)
    w.tick()
    w.finish_running(SHORT)
    (c,) = w.pool.children
    head, second, *_ = c.tokens
    # only the running job's timeout is counting
    assert w.sup.inflight[head].deadline == pytest.approx(T0 + 10.0)
    assert all(w.sup.inflight[t].deadline == math.inf for t in list(c.tokens)[1:])
    assert w.sup.wait_timeout(w.clock.t) > 0

    # When the first job finishes after 8 s, the second starts then
    w.tick(8.0)
    w.pool.finish(head, duration=SHORT)
    w.tick()
    assert w.sup.inflight[second].started == pytest.approx(T0 + 8.0)
    assert w.sup.inflight[second].deadline == pytest.approx(T0 + 18.0)
    assert all(w.sup.inflight[t].deadline == math.inf for t in list(c.tokens)[1:])

    # It is not signalled for the time it waited in the batch, only for its own 10 s
    w.tick(9.9)
    assert w.pool.signals == []
    w.tick(0.1)
    assert w.pool.signals == [(c.pid, signal.SIGTERM)]
    (t,) = w.named("job_timeout")
    assert t["timeout"] == 10.0


def test_a_job_with_its_own_timeout_in_a_batch_counts_it_from_its_start():
    raws = [job(0), job(1), job(2, task="tests.slow"), *jobs(*range(3, 20))]
    w = World(raws, size=1, prefetch=0, timeout=10.0, lease=120.0)
    w.tick()
    w.finish_running(SHORT)
    (c,) = w.pool.children
    head, slow_token = list(c.tokens)[:2]
    assert w.pool.msg_of(slow_token).raw == job(2, task="tests.slow")
    w.tick(3.0)
    # job 1 finishes; tests.slow starts, and says its timeout is 60 s (Started)
    w.pool.finish(head, duration=SHORT)
    assert isinstance(w.pool.events[-1], Started) and w.pool.events[-1].token == slow_token
    w.tick()
    assert w.sup.inflight[slow_token].deadline == pytest.approx(T0 + 3.0 + 60.0)
    w.tick(59.9)
    assert w.pool.signals == []
    w.tick(0.1)
    assert [sig for _, sig in w.pool.signals] == [signal.SIGTERM]
    assert w.named("job_timeout")[0]["timeout"] == 60.0


def test_a_failure_to_settle_in_a_batch_gets_no_deadline():
    w = batched_world(timeout=5.0, max_crashes=0)
    (c,) = w.pool.children
    w.pool.die(c.token)
    w.replace_dead()
    (succ,) = w.pool.children
    head = succ.token
    assert w.pool.msg_of(head).kind == FAIL
    assert w.sup.inflight[head].deadline == math.inf
    w.pool.finish(head, duration=SHORT)
    w.tick()
    # the job after it starts now, with the default timeout
    assert w.sup.inflight[succ.token].deadline == pytest.approx(w.clock.t + 5.0)


# -- batches: never a busy loop ---------------------------------------------------------------

def test_no_busy_loop_with_batches_in_flight():
    w = World(jobs(*range(300)), size=2, prefetch=1, timeout=30.0, lease=60.0,
              max_memory_per_child=2**30)
    w.tick()
    assert w.sup.wait_timeout(w.clock.t) > 0
    w.finish_running(TINY)
    assert all(len(c.tokens) == MAX_BATCH for c in w.pool.children)
    # held jobs and unstarted batches are no reason to wake up
    assert w.sup.backlog
    assert w.sup.wait_timeout(w.clock.t) > 0
    # a child retiring with a batch, another dead mid-batch, its replacement not booted
    a, b = w.pool.children
    w.pool.rss_of = {a.pid: 2**31}
    w.pool.finish(a.token, duration=TINY)
    w.pool.die(b.token)
    w.tick()
    assert a.retiring and a.tokens
    assert not w.pool.accepting()
    assert w.sup.wait_timeout(w.clock.t) > 0
    w.tick(0.3)
    assert w.sup.wait_timeout(w.clock.t) > 0


def check_books(w: World) -> None:
    """What must hold after every tick of a RUNNING supervisor with Redis up."""
    now = w.clock.t
    # nothing is due right after a tick: the loop sleeps
    assert w.sup.wait_timeout(now) > 0
    # every job a child holds is in flight, and nothing else is
    held_by_children = [t for c in w.pool.children for t in c.tokens]
    assert sorted(held_by_children) == sorted(w.sup.inflight)
    for c in w.pool.children:
        # only the running job's timeout counts
        for t in list(c.tokens)[1:]:
            assert w.sup.inflight[t].deadline == math.inf == w.sup.inflight[t].kill_at
        if w.cfg.max_jobs_per_child:
            assert c.jobs_done + len(c.tokens) <= w.cfg.max_jobs_per_child
    # what we hold is exactly what Redis says we hold
    assert w.sup.held() == Counter(w.rq.processing)
    if w.sup.pending:  # acknowledgements wait for company only under a backlog, briefly
        now = w.clock.t
        assert now < w.sup.ack_due <= now + ACK_DELAY
        assert 0 < w.sup.wait_timeout(now) <= w.sup.ack_due - now
        assert all(len(c.tokens) >= 2 for c in w.pool.accepting())


DURATIONS = [TINY] * 2 + [SHORT] * 6 + [0.002] * 3 + [LONG]


@pytest.mark.parametrize("seed", range(12))
def test_a_random_run_keeps_the_books_and_every_job_finishes_once(seed):
    rnd = random.Random(seed)
    raws = [job(i) if i % 7 else job(i, task="tests.slow") for i in range(120)]
    w = World(raws, size=3, prefetch=rnd.choice([0, 1, 2]), timeout=5.0, lease=600.0,
              max_crashes=2, max_jobs_per_child=rnd.choice([0, 7]))
    seen_signals = 0
    w.tick()
    for _ in range(400):
        r = rnd.random()
        busy = list(w.pool.busy())
        if busy and r < 0.55:
            w.pool.finish(rnd.choice(busy), duration=rnd.choice(DURATIONS))
        elif busy and r < 0.6:
            w.pool.die(rnd.choice(busy), exitcode=rnd.choice([KILLED, -signal.SIGSEGV, 1]))
        elif r < 0.7:
            w.pool.boot()
        before = len(w.rq.calls)
        w.tick(rnd.choice([0.0, 0.0, 0.001, 0.01, 0.2, 1.0, 6.0]))
        # one round trip for completions and reserve; complete() only when draining
        assert w.rq.calls[before:].count("exchange") <= 1
        assert "complete" not in w.rq.calls
        check_books(w)
        # a child signalled for a timeout dies of it before it answers anything else
        for pid, sig in w.pool.signals[seen_signals:]:
            w.pool.die(None, exitcode=-sig, pid=pid)
        seen_signals = len(w.pool.signals)
    assert all(len(b.tokens) <= MAX_BATCH for b in w.pool.batches)

    # Then, left to work, everything is done, each job acknowledged exactly once
    for _ in range(200):
        if not (w.rq.ready or w.rq.processing or w.sup.inflight or w.sup.backlog):
            break
        w.pool.boot()
        w.pool.finish_everything(SHORT)
        w.tick(0.01)
        check_books(w)
    done = Counter(c.raw for c in w.rq.completed)
    assert done == Counter(raws)
    assert w.sup.state == RUNNING


# -- known bugs -------------------------------------------------------------------------------

def test_a_batch_behind_a_job_that_finished_as_it_was_signalled_is_not_blamed():
    w = batched_world(timeout=5.0, max_crashes=0)
    (c,) = w.pool.children
    pid, timed_out, nxt = c.pid, c.tokens[0], c.tokens[1]
    w.tick(5.0)
    assert w.pool.signals == [(pid, signal.SIGTERM)]
    # job 1 finished just as the signal was sent: its Done is read first
    w.pool.finish(timed_out, duration=5.0)
    w.tick(0.01)
    assert len(w.rq.completed) == 2
    # the SIGTERM then ends the process, which had gone on to job 2 of its batch
    w.pool.die(nxt, exitcode=-signal.SIGTERM)
    w.tick(0.01)

    # Then job 2 did nothing wrong: it is not counted as a crash, let alone dead-lettered;
    # jobs 2..10 are first in line again, as they were
    assert w.rq.crashed_calls == []
    assert w.sup.stats["crashed"] == 0
    assert [(x.raw, x.crashes, x.fail) for x in w.sup.backlog][:9] == \
        [(j, 0, None) for j in jobs(*range(2, 11))]


def test_settling_a_failure_says_nothing_about_how_long_jobs_take():
    pill = job(0, reply_to=R)
    w = World([pill, *jobs(*range(1, 300))], size=1, prefetch=1, max_crashes=0)
    w.rq.crashes[pill] = 1          # its host died running it: a poison pill
    w.tick()
    (first,) = w.pool.batches
    assert first.entries[0].kind == FAIL
    # settling it takes a few microseconds (runner.fail: no task runs)
    w.pool.finish(first.tokens[0], duration=2.0 ** -17)
    w.tick()

    # Then nothing is known yet about the jobs themselves: still one at a time
    assert w.sup.batch_size() == 1
    assert all(len(b.tokens) == 1 for b in w.pool.batches)
    assert max(w.rq.reserve_calls) <= 2


# -- the heartbeat (systemd's watchdog, status and metrics feed on it) ------------------------

def test_the_loop_emits_a_heartbeat_every_second_even_while_redis_is_down():
    from redpool.duties import HEARTBEAT_EVERY
    w = World(jobs(*range(10)), size=2, prefetch=0)
    w.tick()
    w.events.clear()
    w.rq.down = True
    start = w.clock.t
    # the loop's sleep never overshoots the next heartbeat, whatever Redis's backoff says
    for _ in range(40):
        w.tick(min(0.25, w.sup.wait_timeout(w.clock.t)))
        assert w.sup.wait_timeout(w.clock.t) <= HEARTBEAT_EVERY + 1e-9
    beats = w.named("heartbeat")
    assert len(beats) == int((w.clock.t - start) / HEARTBEAT_EVERY)
    last = beats[-1]
    assert last["state"] == RUNNING and last["redis_down"] is True
    assert (last["inflight"], last["concurrency"], last["children"]) == (2, 2, 2)
    assert last["drain_left"] is None and last["succeeded"] == 0

    # While draining it says how much of the grace period is left
    w.sup.lifecycle.begin_drain(w.clock.t, "SIGTERM")
    w.tick(HEARTBEAT_EVERY)
    assert w.named("heartbeat")[-1]["state"] == DRAINING
    assert w.named("heartbeat")[-1]["drain_left"] == pytest.approx(w.cfg.grace - HEARTBEAT_EVERY)


# -- signals for running pools: SIGTTIN / SIGTTOU resize, SIGHUP reloads -----------------------

def test_sigttin_and_sigttou_resize_the_pool_never_below_one():
    w = World(jobs(*range(10)), size=2)
    w.tick()
    w.sup.lifecycle.handle_signal(signal.SIGTTIN, w.clock.t)
    assert w.pool.size == 3 and w.named("resized")[-1]["concurrency"] == 3
    w.tick()
    assert len(w.pool.children) == 3          # reconcile spawned the new one
    for _ in range(2):
        w.sup.lifecycle.handle_signal(signal.SIGTTOU, w.clock.t)
    assert w.pool.size == 1 and w.named("resized")[-1]["concurrency"] == 1
    w.sup.lifecycle.handle_signal(signal.SIGTTOU, w.clock.t)
    assert w.pool.size == 1
    assert w.named("signal_ignored")[-1] == {"signal": "SIGTTOU",
                                             "reason": "the pool is at one child"}


def test_a_long_job_held_while_a_new_child_boots_goes_to_it_not_behind_a_busy_one():
    # Given two children busy with long jobs and a third being added (SIGTTIN)
    w = World(jobs(1, 2), size=2, prefetch=0)
    w.tick()
    w.sup.lifecycle.handle_signal(signal.SIGTTIN, w.clock.t)
    w.tick()
    (new,) = [c for c in w.pool.children if not c.ready]
    # When a third job arrives before the new child has booted
    w.rq.push(("default", job(3)))
    w.tick()
    # Then no busy child is handed it to hold (jobs of unknown length go one at a time)
    assert all(len(c.tokens) == 1 for c in w.pool.children if c.ready)
    # and once the new child says it is ready, it runs the job, and says so in the log
    w.pool.boot()
    w.pool.events.append(Ready(new.pid, 0))
    w.tick()
    assert [s.raw for s in w.pool.sent if s.pid == new.pid] == [job(3)]
    assert w.named("child_ready") == [{"pid": new.pid, "generation": 0}]


def test_resize_and_reload_signals_are_ignored_while_draining():
    w = World(jobs(*range(10)), size=2)
    w.tick()
    w.sup.lifecycle.handle_signal(signal.SIGTERM, w.clock.t)
    for sig in (signal.SIGTTIN, signal.SIGHUP):
        w.sup.lifecycle.handle_signal(sig, w.clock.t)
    assert w.pool.size == 2 and w.pool.generation == 0 and not w.sup.reloading
    assert [e["signal"] for e in w.named("signal_ignored")] == ["SIGTTIN", "SIGHUP"]


def test_sighup_reloads_a_new_generation_and_says_when_it_has_taken_over():
    w = World(jobs(*range(40)), size=2)
    w.tick()
    old = list(w.pool.children)
    w.sup.lifecycle.handle_signal(signal.SIGHUP, w.clock.t)
    assert w.named("reloading") == [{"generation": 1, "children": 2}]
    w.tick()
    new = [c for c in w.pool.children if c not in old]
    assert len(new) == 2 and all(c.generation == 1 and not c.ready for c in new)
    assert not any(c.retiring for c in old) and w.named("reloaded") == []
    # the successors boot: the old ones are retired (they finish what they hold)
    w.pool.boot()
    w.tick()
    assert all(c.retiring for c in old)
    w.finish_running()
    while any(c in w.pool.children for c in old):
        w.pool.finish_all()
        w.tick()
    assert w.named("reloaded") == [{"generation": 1}]
    assert not w.sup.reloading


def test_a_reload_whose_code_does_not_import_is_given_up_and_the_old_children_stay():
    w = World(jobs(*range(40)), size=2)
    w.tick()
    old = list(w.pool.children)
    w.sup.lifecycle.handle_signal(signal.SIGHUP, w.clock.t)
    w.tick()
    (failing, _) = [c for c in w.pool.children if c not in old]
    w.pool.events.append(BootFailed(failing.pid, "SyntaxError: invalid syntax", generation=1))
    w.tick()
    assert w.named("reload_failed")[0]["message"] == "SyntaxError: invalid syntax"
    assert w.pool.aborted and not w.sup.reloading
    assert w.named("child_boot_failed") == [] and w.named("reloaded") == []
    assert all(c in w.pool.children and not c.retiring for c in old)


def test_a_boot_failure_of_an_older_child_does_not_give_a_reload_up():
    # (a replacement spawned before the SIGHUP, still importing the old broken code,
    # fails after it: that says nothing of the code the reload is loading)
    w = World(jobs(*range(40)), size=2)
    w.tick()
    w.sup.lifecycle.handle_signal(signal.SIGHUP, w.clock.t)
    w.tick()
    w.pool.events.append(BootFailed(4242, "SyntaxError: the old one", generation=0))
    w.tick()
    assert w.named("reload_failed") == [] and w.sup.reloading
    assert w.named("child_boot_failed")[0]["message"] == "SyntaxError: the old one"


class _Proc:
    def __init__(self, pid):
        self.pid = pid


class _Conn:
    closed = False

    def close(self):
        self.closed = True


def test_abort_reload_stops_the_new_children_and_keeps_the_old_ones(monkeypatch):
    from redpool import pool as pool_mod
    from redpool.pool import Child, ProcessPool
    killed = []   # (the pids are made up: nothing is signalled for real)
    monkeypatch.setattr(pool_mod, "kill_group", lambda pid, sig: killed.append((pid, sig)))
    pool = ProcessPool(3, [], "w", 1024)
    old = [Child(_Proc(1), _Conn(), ready=True), Child(_Proc(2), _Conn(), ready=True)]
    gone = Child(_Proc(3), _Conn(), ready=True)      # old, retired and exiting already
    gone.retiring = gone.stopping = True
    pool.children = [*old, gone]
    pool.reload()
    booted = Child(_Proc(4), _Conn(), ready=True, generation=1)
    booting = Child(_Proc(5), _Conn(), ready=False, generation=1)
    pool.children += [booted, booting]
    old[1].retiring = True                            # retired for its successor, busy
    old[1].tokens.append(7)

    pool.abort_reload()

    assert all(c.generation == pool.generation for c in pool.children)
    assert not any(c.retiring for c in old)           # the old ones serve on
    assert booting.stopping and killed == [(5, signal.SIGKILL)]   # stopped while booting
    assert booted.retiring and booted.stopping         # booted: retired (it held nothing)
    assert not pool.reloading



def test_job_timeout_names_the_job_even_one_without_an_id_of_its_own():
    raw = p.encode_job({"task": "tests.add", "args": [1, 2], "attempt": 3})
    w = World([raw], size=1, prefetch=0, timeout=2.0, max_retries=5)
    w.tick()
    w.tick(2.0)
    (timeout,) = w.named("job_timeout")
    assert (timeout["id"], timeout["task"], timeout["attempt"]) == (None, "tests.add", 3)


def test_a_child_that_dies_by_itself_after_its_timeout_answered_is_stopped_not_died():
    # A job answers just as it is stopped for its timeout: the death that follows was
    # asked for; an unrelated death stays an error
    w = World([job(1), job(2, task="tests.slow")], size=2, prefetch=0, timeout=5.0)
    w.tick()
    t1 = next(s.token for s in w.pool.sent if s.raw == job(1))
    w.tick(5.0)
    assert len(w.pool.signals) == 1               # job 1 only: tests.slow has 60 s
    doomed = w.pool.busy()[t1]
    w.pool.finish(t1)
    w.tick()
    w.pool.die(None, exitcode=-signal.SIGTERM, pid=doomed.pid)
    w.tick()
    (stopped,) = w.named("child_stopped")
    assert stopped["had_job"] is False and "answered" in stopped["reason"]
    other = next(c for c in w.pool.children if c.tokens)
    w.pool.die(other.token, exitcode=-signal.SIGSEGV)
    w.tick()
    (died,) = w.named("child_died")
    assert died["had_job"] is True and "segmentation" in died["description"]


# -- job_started: for whoever listens at debug, and free for everyone else --------------------------

def test_job_started_names_each_job_as_a_process_starts_it_when_the_log_is_at_debug():
    w = World([job(1), job(2), job(3, task="tests.boom")], size=2, prefetch=0,
              log_level="debug")
    w.tick()
    started = w.named("job_started")
    assert [(e["id"], e["task"], e["queue"], e["attempt"]) for e in started] == [
        ("job-1", "tests.add", "default", 1), ("job-2", "tests.add", "default", 1)]
    assert {e["pid"] for e in started} == {c.pid for c in w.pool.children}
    w.finish_running()
    w.tick()
    assert [e["id"] for e in w.named("job_started")] == ["job-1", "job-2", "job-3"]
    # and within a batch, each job as the one before it is answered
    w = World([job(n) for n in range(1, 6)], size=1, prefetch=0, log_level="debug")
    w.pool.duration = SHORT
    w.tick()
    w.finish_running()        # one answer teaches the supervisor that jobs are short
    w.pool.finish_everything()
    w.tick()
    assert [e["id"] for e in w.named("job_started")] == [f"job-{n}" for n in range(1, 6)]


def test_a_failure_being_settled_is_not_a_start():
    w = World([job(1)], size=1, prefetch=0, log_level="debug", max_crashes=0)
    w.tick()
    w.pool.die(w.tokens()[0])
    w.replace_dead()
    assert w.pool.sent[-1].kind == FAIL
    assert [e["id"] for e in w.named("job_started")] == ["job-1"]


def test_below_debug_the_loop_never_decodes_a_job_to_announce_it(monkeypatch):
    import redpool.supervisor as sup_mod

    def decoded(raw):
        raise AssertionError("a job was decoded for job_started although nobody listens")

    monkeypatch.setattr(sup_mod, "job_names", decoded)
    w = World([job(n) for n in range(1, 8)], size=2, prefetch=1)   # log level: info
    for _ in range(8):
        w.tick()
        w.pool.finish_all()
    w.tick()
    assert len(w.rq.completed) == 7 and w.named("job_started") == []


# -- Redis losing its data (restarted without persistence) -----------------------------------------

def test_startup_claims_the_dataset_marker_and_warns_once_of_a_server_that_keeps_nothing():
    w = World(start=False)
    w.rq.kept = (False, "127.0.0.1:6379")
    w.sup.startup()
    assert w.rq.markers == {"dataset": b"token-run-1"} and w.duties.markers == w.rq.markers
    (warning,) = w.named("redis_not_persistent")
    assert warning["servers"] == "127.0.0.1:6379" and "appendonly yes" in warning["note"]
    w.ticks(T0 + 10.0, 0.5)
    assert len(w.named("redis_not_persistent")) == 1
    # a server that keeps its data says nothing; one that cannot be asked, at debug
    assert World().named("redis_not_persistent") == []
    w = World(start=False)
    w.rq.kept = (None, "CONFIG GET is not tried as ACL user 'worker'")
    w.sup.startup()
    assert w.named("redis_not_persistent") == []
    assert w.named("redis_persistence_unknown") == [
        {"reason": "CONFIG GET is not tried as ACL user 'worker'"}]


def lost_world() -> World:
    """Running job 1, job 2 finished but not acknowledged, job 3 held; then Redis comes
    back from a restart without its data."""
    w = World([job(1), job(2), job(3)], size=2, prefetch=1)
    w.tick()
    assert len(w.sup.inflight) == 2 and w.backlog() == [("default", job(3))]
    t2 = next(s.token for s in w.pool.sent if s.raw == job(2))
    w.pool.finish(t2)
    w.rq.down = True
    w.tick()                                   # the completion fails: Redis is down
    assert len(w.sup.pending) == 1
    w.rq.lose_data()
    w.rq.down = False
    return w


def test_a_server_back_without_its_data_is_said_once_and_the_held_jobs_are_restored():
    from redpool.logs import _LEVELS

    w = lost_world()
    w.tick(1.0)

    # Then one error event says what happened, and what this supervisor held
    (lost,) = w.named("redis_data_lost")
    assert _LEVELS["redis_data_lost"] == "error"
    # (job 3 went to the child that finished job 2 meanwhile)
    assert (lost["held"], lost["running"], lost["reserved"], lost["unacknowledged"],
            lost["restored"]) == (3, 2, 0, 1, 3)
    assert "restarted without its data" in lost["cause"] and "cannot be known" in lost["note"]
    # and it is not taken for a lost lease or for jobs that ran elsewhere
    assert not w.named("lease_lost") and not w.named("results_dropped")
    # The jobs are ours again in Redis, under a new registration
    assert w.rq.restore_calls == [Counter({("default", job(1)): 1, ("default", job(2)): 1,
                                           ("default", job(3)): 1})]
    assert w.duties.leased and w.rq.epoch == w.lease.epoch == "epoch-2"
    assert w.rq.markers == w.duties.markers == {"dataset": b"token-run-2"}
    # and every one of them is answered: the finished one, the running one, the held one
    w.tick()
    w.pool.finish_everything()
    w.tick()
    w.pool.finish_everything()
    w.tick()
    # (job 2's first completion found nothing: it was sent again once restored)
    assert sorted({c.raw for c in w.rq.completed if c.envelope}) == sorted(jobs(1, 2, 3))
    assert w.rq.processing == [] and not w.named("results_dropped")
    assert len(w.named("redis_data_lost")) == 1


def test_a_restart_found_by_a_completion_resends_it_rather_than_dropping_it():
    # Given Redis restarted empty between two calls, unseen (no error on our side)
    w = World([job(1)], size=1, prefetch=0)
    w.tick()
    w.rq.lose_data()
    w.pool.finish_all()
    w.tick()
    # Then the completion finds its job gone: the dataset marker says why
    (lost,) = w.named("redis_data_lost")
    assert lost["during"] == "complete" and lost["unacknowledged"] == 1
    assert not w.named("results_dropped") and not w.named("lease_lost")
    w.tick()
    assert [c.raw for c in w.rq.completed if c.raw == job(1)] == [job(1), job(1)]
    assert w.rq.processing == []


def test_an_idle_supervisor_finds_it_instead_of_a_lost_lease():
    w = World([], size=1, lease=9.0)
    w.tick()
    w.rq.lose_data()
    w.tick(3.0)
    (lost,) = w.named("redis_data_lost")
    assert lost["during"] == "reserve"      # (the renewal would, had the loop not)
    assert lost["held"] == 0 and lost["restored"] == 0
    assert not w.named("lease_lost") and w.duties.leased


def test_a_supervisor_that_registered_anew_still_knows_a_restart_another_one_found():
    # Given another supervisor found the loss first and set a new marker
    w = World([job(1)], size=1, prefetch=0, lease=9.0)
    w.tick()
    w.rq.lose_data()
    w.rq.markers = {"dataset": b"set-by-another-supervisor"}
    w.tick(3.0)
    assert w.named("redis_data_lost")[0]["running"] == 1
    assert w.rq.processing == [("default", job(1))]
    assert w.duties.markers == {"dataset": b"set-by-another-supervisor"}


def test_a_renewal_finding_the_loss_says_so_instead_of_a_lost_lease():
    w = World([job(1)], size=1, prefetch=0, lease=9.0)
    w.tick()                       # busy: the loop does not reserve, the renewal finds it
    w.rq.lose_data()
    w.tick(3.0)
    (lost,) = w.named("redis_data_lost")
    assert lost["during"] == "renew" and lost["running"] == 1 and lost["restored"] == 1
    assert not w.named("lease_lost") and w.duties.leased


def test_a_reaper_taking_our_jobs_is_still_a_lost_lease_not_a_loss_of_data():
    w = World([job(1)], size=1, prefetch=0, lease=9.0)
    w.tick()
    w.rq.epoch = None
    reap(w.rq)
    w.tick(3.0)
    w.pool.finish_all()
    w.tick()
    assert w.named("lease_lost") and w.named("results_dropped")
    assert not w.named("redis_data_lost") and w.rq.restore_calls == []


def test_a_loss_found_while_draining_puts_the_held_jobs_back_in_their_queues():
    w = World([job(1), job(2)], size=1, prefetch=1)
    w.tick()
    w.rq.lose_data()
    w.sup.lifecycle.handle_signal(signal.SIGTERM, w.clock.t)   # requeue finds nothing: lost?
    assert w.named("redis_data_lost")[0]["during"] == "requeue"
    w.tick()
    assert w.rq.ready == deque([("default", job(2))])   # back in its queue after all
    w.pool.finish_all()
    w.tick()
    assert w.sup.state == STOPPED and [c.raw for c in w.rq.completed] == [job(1)]
    assert w.rq.processing == [] and not w.named("results_dropped")


def test_a_child_dying_after_the_loss_runs_its_job_again_here():
    w = World([job(1)], size=1, prefetch=0, max_crashes=3)
    w.tick()
    w.rq.lose_data()
    w.pool.die(w.tokens()[0])
    w.tick()
    assert w.named("redis_data_lost")[0]["during"] == "crashed"
    assert w.rq.processing == [("default", job(1))]
    assert [(x.raw, x.crashes) for x in w.sup.backlog] == [(job(1), 1)]


def test_handling_a_loss_cut_short_by_redis_failing_again_is_finished_and_said_once():
    w = lost_world()
    real_register, fails = w.lease.register, [3]

    def register(info, lease, **kw):      # Redis fails again as we re-register
        if fails[0]:
            fails[0] -= 1
            raise redis.ConnectionError("down again")
        return real_register(info, lease, **kw)

    w.lease.register = register
    w.tick(1.0)
    assert w.named("redis_data_lost") == [] and w.duties.data_lost_during is not None
    assert not w.named("results_dropped") and not w.named("lease_lost")
    w.ticks(w.clock.t + 5.0, 0.5)
    (lost,) = w.named("redis_data_lost")
    assert (lost["held"], lost["restored"]) == (3, 3)   # (restored the first time round)
    # running ones ours again in Redis; the finished one sent again, and written
    assert sorted(raw for _, raw in w.rq.processing) == sorted(jobs(1, 3))
    assert w.rq.complete_calls[-1][0].raw == job(2) and job(2) not in w.rq.missed
    assert w.rq.restore_calls[0] == Counter({("default", j): 1 for j in jobs(1, 2, 3)})
    assert all(c == Counter() for c in w.rq.restore_calls[1:])
    assert not w.named("results_dropped") and not w.named("lease_lost")


def test_a_job_answered_in_the_same_batch_as_lost_ones_is_answered_once():
    # Given job 1 running, the waiter armed
    w = World([job(1)], size=2, prefetch=0, waiter=True)
    w.tick()
    assert len(w.sup.inflight) == 1
    # When Redis goes away (the loop backs off) and comes back empty ...
    w.rq.down = True
    w.tick(0.01)
    w.rq.lose_data()
    w.rq.down = False
    # ... job 1 finishes, and the waiter (its own connection, not in backoff) takes job
    # 5, pushed to the new server, which the free child runs at once
    w.pool.finish_all()
    w.rq.processing.append(("default", job(5)))
    w.waiter.inbox.append(Reserved("default", job(5), 0))
    w.tick(0.0)
    w.pool.finish(next(s.token for s in w.pool.sent if s.raw == job(5)))
    w.tick(0.0)
    assert {c.raw for c in w.sup.pending} == {job(1), job(5)}
    # Then one exchange carries both; job 1 is found lost and restored, and only job 1
    # is sent again: job 5's answer was written with that exchange, once
    for _ in range(6):
        w.tick(0.5)
    assert len(w.named("redis_data_lost")) == 1
    assert sum(1 for batch in w.rq.complete_calls for c in batch if c.raw == job(5)) == 1
    assert sum(1 for batch in w.rq.complete_calls for c in batch if c.raw == job(1)) == 2
    assert not w.rq.processing


def test_a_sigkill_we_sent_is_not_blamed_on_the_out_of_memory_killer():
    assert "out-of-memory killer" in describe_exit(-signal.SIGKILL)
    ours = describe_exit(-signal.SIGKILL, stopped=True)
    assert "out-of-memory" not in ours and "had not stopped at SIGTERM" in ours
    assert describe_exit(-signal.SIGTERM, stopped=True) == "was killed by SIGTERM (signal 15)"


# -- containment: what a child says of one job cannot stop the loop ----------------------------

def sendable(completions) -> None:
    """Pack the completion script call exactly as RedisQueue sends it (no server needed):
    what redis-py cannot encode, or Redis would refuse, fails here as it would there."""
    from redpool.queue import RedisQueue
    rq = RedisQueue(redis.Redis(), p.Keys(), WORKER, ["default"])
    keys, args = rq._complete_args(list(completions))
    redis.Connection().pack_command("EVALSHA", "0" * 40, len(keys), *keys, *args)


def forge_done(w: World, token: int, msg: bytes | None = None, **meta) -> None:
    """The child running ``token`` answers with ``meta`` changed, as a child that does
    not check its strings would (json.dumps lets an unpaired surrogate through,
    escaped), or with ``msg`` itself."""
    import json
    from redpool.child import DONE_HEADER, MSG_DONE
    c = w.pool.busy()[token]
    if msg is None:
        s = w.pool.msg_of(token)
        out = w.pool.runner.run(s.queue, s.raw, s.crashes)
        out.meta.update({"t": token, "duration": LONG, **meta})
        m = json.dumps(out.meta).encode()
        env, dead, retry = out.envelope or b"", out.dead or b"", out.retry or b""
        msg = MSG_DONE + DONE_HEADER.pack(len(m), len(env), len(dead), len(retry)) + m + env + dead + retry
    c.tokens.popleft()
    c.jobs_done += 1
    w.pool.events.append(Done(token, msg, c.pid))


@pytest.mark.parametrize("meta, msg", [
    ({"reply_to": "r\ud800"}, None),          # a key no UTF-8 client can write
    ({"result_id": "job-\udc80"}, None),
    ({"reply_to": ""}, None),
    ({"ttl": "86400"}, None),                 # Redis would refuse: every try of the batch
    ({"ttl": 2 ** 40}, None),
    ({"retry_delay": math.nan}, None),
    ({"status": "exploded"}, None),
    ({"duration": -1}, None),
    ({}, b"D" + b"\xff" * 40),               # not an answer at all
    ({}, b"D"),
], ids=["reply_to_surrogate", "result_id_surrogate", "reply_to_empty", "ttl_string", "ttl_huge",
        "retry_delay_nan", "status", "duration", "garbage", "truncated"])
def test_an_answer_no_script_could_carry_fails_only_its_job(meta, msg):
    # Given job 1 (a reply_to of its own) running, job 2 waiting
    w = World([job(1, reply_to="redpool:reply:r"), job(2)], size=1, prefetch=1)
    w.tick()
    # When its child's answer cannot become a completion
    forge_done(w, w.tokens()[0], msg, **meta)
    w.tick()
    # Then one error event; job 1 is failed and dead-lettered by the supervisor, its
    # producer answered on its own reply_to (the raw job's), and the loop goes on
    (event,) = w.named("internal_error")
    assert (event["id"], event["during"], event["queue"]) == ("job-1", "job_done", "default")
    assert "bug in redpool" in event["note"]
    w.pool.finish_all()
    w.tick()
    first, second = w.rq.completed
    assert (first.raw, first.reply_to, first.result_id) == (
        job(1, reply_to="redpool:reply:r"), "redpool:reply:r", "job-1")
    env = env_of(first)
    assert env["error"]["type"] == p.E_INVALID_JOB and env["started_at"] is not None
    assert "the worker could not handle this job's outcome" in env["error"]["message"]
    assert p.loads(first.dead)["reason"] == env["error"]["message"]
    assert second.raw == job(2) and env_of(second)["result"] == 3
    sendable(w.rq.completed)
    assert (w.sup.stats["failed"], w.sup.stats["dead"], w.sup.stats["succeeded"]) == (1, 1, 1)


from corpus import CASES  # noqa: E402


@pytest.mark.parametrize("case", CASES, ids=str)
def test_a_hostile_job_whose_settling_child_died_is_failed_by_the_supervisor(case):
    # Given a hostile job whose process died (max-crashes 0: it is settled at once), and
    # whose settling process died too: the supervisor decodes it itself
    # (the corpus's reply lists are an application's own, which the operator allowed)
    w = World([case.raw], size=1, prefetch=0, max_crashes=0, reply_to=["hostile:*"])
    w.tick()
    w.pool.die(w.tokens()[0])
    w.replace_dead()
    assert w.pool.sent[-1].kind == FAIL
    w.pool.die(w.tokens()[0])
    w.tick()
    # Then it is answered where it can be, dead-lettered, and every byte can be sent
    (c,) = w.rq.completed
    assert (c.reply_to, c.result_id) == (case.answered_on, case.result_id)
    assert (c.envelope is None) == (case.answered_on is None and case.result_id is None)
    if c.envelope is not None:
        assert env_of(c)["error"]["type"] == p.E_WORKER_CRASHED
    assert p.loads(c.dead)["id"] == case.result_id
    sendable([c])
    # and the events that name it (a timeout, job_started) can be written
    from redpool.outcomes import job_names
    names = job_names(case.raw)
    assert names["id"] == case.result_id and p.dumps(names)


def test_while_a_namespace_key_is_of_the_wrong_type_the_loop_sleeps_until_the_next_look():
    # Given a supervisor that has run a while (its reap and promote times passed), then a
    # namespace-wide key found of the wrong type: reserving, reaping and promoting pause
    w = World([job(1)], size=1)
    w.tick()
    w.pool.finish_all()
    w.ticks(until=30.0, step=1.0)
    w.rq.unusable.paused = True
    w.duties.recheck_at = w.clock.t + 5.0
    w.tick(1.0)
    # Then the loop does not spin on the duties that wait: it sleeps until the next look
    # at the broken keys, or the next renewal, whichever comes first (found in review: 0)
    assert w.sup.wait_timeout(w.clock.t) > 0.5
