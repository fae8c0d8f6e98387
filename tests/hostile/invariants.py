"""The invariants of issue 12 ("no job, task or producer can crash, wedge or misuse a
worker"), checked against real daemons after every hostile case:

1. every job is answered exactly once, with a reason: its result key and/or exactly one
   envelope on its reply list; a job with no usable id or reply_to has a dead-letter
   entry (its exact bytes) instead; a failed answer has an ``error.type`` and a
   non-empty ``error.message``, a dead-letter entry an ``error_type`` and a ``reason``;
   a refused job (InvalidJob, UnknownTask, PayloadTooLarge) is dead-lettered too; every
   answer and dead-letter entry is valid by the protocol's JSON Schemas;
2. every supervisor is alive, and its pool is back to its configured concurrency;
3. nothing is left behind: no processing list holds a job, no crash count is left;
4. a plain job pushed afterwards runs;
5. supervisor memory stays bounded (see RSS_ALLOWANCE);
6. unless the case is a task that kills its own process, no pool process died
   (``child_died``), and no supervisor logged trouble with Redis.

Nothing here measures time: every wait has a generous deadline and fails only when it
runs out (the machine is busy).
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import time
import uuid
from dataclasses import dataclass, field

import pytest

from helpers import Daemon, wait_for
from test_protocol import DEAD, ENVELOPE

#: The answer of each of these also leaves a dead-letter entry (docs/protocol.md).
REFUSALS = frozenset({"InvalidJob", "UnknownTask", "PayloadTooLarge"})
#: Events a supervisor logs when something went wrong that a hostile job must not cause.
CRASH_EVENTS = frozenset({"child_died", "job_crashed"})
TROUBLE_EVENTS = frozenset({"redis_down", "results_dropped", "lease_lost", "child_boot_failed",
                            "shutdown_redis_error", "reregistered", "stopped"})
ABSENT = object()   # a field left out of a document
ID_RE = re.compile(r"[A-Za-z0-9._:-]{1,128}")

#: How long a case may take to be answered.  Generous: a busy 2-core machine, and a
#: poison pill is run --max-crashes + 1 times (each a ~0.1 s process spawn) first.
ANSWER_DEADLINE = 60.0

#: A supervisor's memory bound, over its peak resident size (VmHWM) once started.  It
#: holds at most (concurrency + prefetch + one per queue) raw jobs, each at most
#: --max-payload (1 MiB): 2 + 2 + 1 here, 5 MiB, and as much again of their answers
#: (bounded by --max-result-size once issue 12 §2 is fixed), plus what Python's
#: allocator keeps of the largest buffers it saw.  32 MiB is that three times over; a
#: supervisor that keeps what it saw of hostile documents, or copies a 10 MB result
#: several times (today: +50 MB), goes past it.
RSS_ALLOWANCE = 32 * 1024 * 1024


def waiting(section: str, what: str, branch: str | None):
    """A strict xfail: the case fails until ``branch`` is merged (then it XPASSes and
    the marker goes).  ``branch`` None: a class no branch fixes yet."""
    fix = f"fixed on branch {branch}" if branch else "found by the hostile suite, no fix yet"
    return pytest.mark.xfail(strict=True, reason=f"issue 12 {section}: {what}; {fix}")


#: How many jobs are queued (KEYS: lists), scheduled (KEYS: sorted sets) or held (the
#: lists matching ARGV[1]); a key of another type (test_keys.py makes some) holds none.
IN_FLIGHT = """
local n = 0
for _, k in ipairs(KEYS) do
  local t = redis.call('TYPE', k)['ok']
  if t == 'list' then n = n + redis.call('LLEN', k)
  elseif t == 'zset' then n = n + redis.call('ZCARD', k) end
end
local cursor = '0'
repeat
  local page = redis.call('SCAN', cursor, 'MATCH', ARGV[1], 'COUNT', 1000)
  cursor = page[1]
  for _, k in ipairs(page[2]) do
    if redis.call('TYPE', k)['ok'] == 'list' then n = n + redis.call('LLEN', k) end
  end
until cursor == '0'
return n
"""


class DeadLetters(dict):
    """Dead-letter entries by the raw job they hold; ``raw in`` also finds a job of
    which an entry holds only the head (job_size: over --max-payload)."""

    def __init__(self) -> None:
        super().__init__()
        self.heads: list[tuple[int, bytes]] = []

    def __contains__(self, raw) -> bool:
        return super().__contains__(raw) or any(
            size == len(raw) and raw.startswith(head) for size, head in self.heads)


@dataclass
class Case:
    """One hostile job document and what must become of it.

    ``id``: a result key must hold its answer; ``reply_to``: exactly one envelope must
    arrive on that list; ``dead``: a dead-letter entry of exactly ``raw`` must appear.
    ``either``: the worker may not be able to read the job at all (a document no
    parser owes an answer, such as JSON past Python's limits): a dead letter then
    stands for the answer, but an answer, if any, must still be exactly one."""

    raw: bytes
    label: str
    id: str | None = None
    reply_to: str | None = None
    dead: bool = False
    either: bool = False
    status: str | None = None       # if set, the answer's status
    error_type: str | None = None   # if set, the failed answer's error.type
    answer: dict | None = field(default=None, repr=False)   # the envelope, once checked

    def short(self) -> str:
        r = repr(self.raw)
        return f"{self.label}: {r if len(r) <= 200 else r[:197] + '...'}"


def usable_reply_to(value, ns: str) -> bool:
    """A reply_to the worker can push onto: a non-empty string that is UTF-8 (no lone
    surrogate) and one of ours (``<ns>:reply:...``, allowed by every rule)."""
    if not isinstance(value, str) or not value.startswith(f"{ns}:reply:"):
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def expect(doc: dict, ns: str, label: str, raw: bytes, **kw) -> Case:
    """The Case of a JSON object ``doc`` (encoded as ``raw``), by docs/protocol.md's
    rules: a result key if its id is valid and result_ttl is not 0 (an invalid
    result_ttl is replaced by the default), a reply on a usable reply_to; with neither,
    a dead letter if the id or reply_to it has is refused.  (A job with neither that is
    otherwise valid runs, and nobody hears of it: nothing to check.)"""
    jid = doc.get("id")
    id_ok = isinstance(jid, str) and ID_RE.fullmatch(jid) is not None
    ttl = doc.get("result_ttl", 86400)
    if not (type(ttl) is int and 0 <= ttl <= 2**31 - 1):
        ttl = 86400
    rt = doc.get("reply_to")
    case = Case(raw, label, id=jid if id_ok and ttl > 0 else None,
                reply_to=rt if usable_reply_to(rt, ns) else None, **kw)
    if case.id is None and case.reply_to is None:
        case.dead = ("id" in doc and not id_ok) or ("reply_to" in doc
                                                     and not usable_reply_to(rt, ns))
    return case


def pool(d: Daemon) -> list[int]:
    """The live pool processes of a supervisor: its children, but multiprocessing's
    resource tracker and any that died and were not reaped yet (zombies)."""
    out = subprocess.run(["ps", "-ww", "-o", "pid=,stat=,args=", "--ppid", str(d.pid)],
                         capture_output=True, text=True).stdout
    return [int(line.split()[0]) for line in out.splitlines()
            if line.strip() and "resource_tracker" not in line and line.split()[1][0] != "Z"]


def vm_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak resident size) of ``pid``, in KiB, from /proc."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                name, value = line.split(":")
                out[name] = int(value.split()[0])
    return out


class Log:
    """A daemon's log since mark(), read a piece at a time (a task may flood it)."""

    def __init__(self, d: Daemon) -> None:
        self.d = d
        self.mark()

    def mark(self) -> None:
        self.pos = os.path.getsize(self.d.log_path)
        self.rest = b""
        self.events: list[dict] = []
        self.other: list[str] = []

    def since(self) -> tuple[list[dict], list[str]]:
        """(events, other lines) written since the last mark()."""
        with open(self.d.log_path, "rb") as f:
            f.seek(self.pos)
            data = f.read()
        self.pos += len(data)
        lines = (self.rest + data).split(b"\n")
        self.rest = lines.pop()
        for line in lines:
            if line.startswith(b"x" * 64):   # h.stderr_flood's
                continue
            text = line.decode("utf-8", "replace")
            try:
                e = json.loads(text)
            except ValueError:
                e = None
            if isinstance(e, dict):
                self.events.append(e)
            elif text.strip():
                self.other.append(text)
        return self.events, self.other


class Checker:
    """The invariants above, for one or more daemons serving one namespace.

    ``concurrency``: each daemon's pool size; ``baseline``: each daemon's peak resident size
    once started (memory is bounded relative to it)."""

    def __init__(self, r, keys, daemons: list[Daemon], *, concurrency: int,
                 queue: str = "default", allowance: int = RSS_ALLOWANCE) -> None:
        # (a daemon started by tests/hostile/conftest.py knows its size once started)
        self.r = r
        self.keys = keys
        self.ns = keys.ns
        self.daemons = list(daemons)
        self.concurrency = concurrency
        self.queue = queue
        self.queues = {queue}
        self.dead_letters = True   # False: refused jobs cannot be dead-lettered (test_keys.py)
        self.allowance = allowance
        self.logs = [Log(d) for d in self.daemons]
        self._in_flight = r.register_script(IN_FLIGHT)
        self.baseline = {d.pid: getattr(d, "baseline_kib", None) or vm_kib(d.pid)["VmHWM"]
                         for d in self.daemons}
        self.n = 0

    # -- building cases ----------------------------------------------------------------------

    def label(self, prefix: str = "c") -> str:
        self.n += 1
        return f"{prefix}{self.n}-{uuid.uuid4().hex[:8]}"

    def reply(self, label: str) -> str:
        return f"{self.ns}:reply:{label}"

    def case(self, doc: dict, label: str | None = None, **kw) -> Case:
        """A Case for ``doc`` with this checker's label, id and reply_to filled in where
        ``doc`` leaves them out (a field set to ABSENT is left out)."""
        label = label or self.label()
        doc = {"id": label, "reply_to": self.reply(label), **doc}
        doc = {k: v for k, v in doc.items() if v is not ABSENT}
        raw = json.dumps(doc).encode()
        return expect(doc, self.ns, label, raw, **kw)

    # -- running them ------------------------------------------------------------------------

    def push(self, cases: list[Case], queue: str | None = None) -> None:
        for log in self.logs:
            log.mark()
        self.queues.add(queue or self.queue)
        pipe = self.r.pipeline(transaction=False)
        for c in cases:
            pipe.lpush(self.keys.queue(queue or self.queue), c.raw)
        pipe.execute()

    def run(self, cases: list[Case], *, crashes: bool = False,
            queue: str | None = None) -> list[Case]:
        """Push ``cases`` and check every invariant; ``crashes``: the cases may kill
        their own process (so child_died is expected)."""
        self.push(cases, queue)
        self.verify(cases, crashes=crashes)
        return cases

    def verify(self, cases: list[Case], *, crashes: bool = False) -> None:
        self.wait_answered(cases, crashes=crashes)
        self.check_workers(crashes=crashes)
        self.probe()
        self.check_answers(cases)

    # -- the invariants ----------------------------------------------------------------------

    def dead_raws(self) -> "DeadLetters":
        out = DeadLetters()
        if self.r.type(self.keys.dead) not in (b"list", b"none"):
            return out   # (test_keys.py made it another type)
        for item in self.r.lrange(self.keys.dead, 0, -1):
            e = json.loads(item)
            raw = e["job"].encode("utf-8") if "job" in e else base64.b64decode(e["job_b64"])
            out[raw] = e
            if "job_size" in e:   # a job over --max-payload: its head only
                out.heads.append((e["job_size"], raw))
        return out

    def _answered(self, c: Case, dead: dict[bytes, dict]) -> bool:
        got = []
        if c.id is not None:
            got.append(self.r.exists(self.keys.result(c.id)))
        if c.reply_to is not None:
            got.append(self.r.llen(c.reply_to) > 0)
        if c.dead:
            got.append(c.raw in dead)
        if c.either:
            return any(got) or c.raw in dead
        return all(got)

    def idle(self) -> bool:
        """Nothing in flight: no job in a queue we pushed to, in a processing list, or
        scheduled.  A job leaves these only in the step that writes its answer, so a job
        unanswered once Redis is idle will never be answered.  One script, so that it
        sees one moment: a job moving from list to list in between looks at no time like
        none."""
        keys = [self.keys.queue(q) for q in self.queues]
        keys += [self.keys.scheduled(q) for q in self.queues]
        return self._in_flight(keys=keys, args=[f"{self.ns}:processing:*"]) == 0

    def wait_answered(self, cases: list[Case], *, crashes: bool = False,
                      timeout: float = ANSWER_DEADLINE) -> None:
        """Wait until every case is answered.  Fails at once (rather than at the
        deadline) when the answer can no longer come: a supervisor exited, a pool
        process died (unless ``crashes``), or Redis is idle."""
        todo = list(cases)
        deadline = time.monotonic() + timeout
        while True:
            idle = self.idle()   # before looking at the answers (see idle())
            dead = self.dead_raws()
            todo = [c for c in todo if not self._answered(c, dead)]
            if not todo:
                return
            why = None
            if time.monotonic() > deadline:
                why = f"within {timeout:g} s"
            elif idle:
                why = "and none is coming: no job is queued, held or scheduled"
            elif any(d.proc.poll() is not None for d in self.daemons):
                why = "and a supervisor exited"
            elif not crashes and any(e.get("event") in CRASH_EVENTS
                                     for log in self.logs for e in log.since()[0]):
                why = "and a pool process died"
            if why:
                raise AssertionError(f"{len(todo)} of {len(cases)} jobs not answered {why}:\n"
                                     + "\n".join(c.short() for c in todo[:10])
                                     + self.diagnosis())
            time.sleep(0.05)

    def check_workers(self, *, crashes: bool = False) -> None:
        """Every supervisor alive, pools back to size, nothing held, memory bounded,
        and no child died unless ``crashes``."""
        for d in self.daemons:
            wait_for(lambda: d.proc.poll() is not None or len(pool(d)) == self.concurrency,
                     timeout=60, what=f"{self.concurrency} pool processes under {d.pid} "
                                      f"(has {pool(d)})")
            assert d.proc.poll() is None, f"supervisor {d.pid} exited {d.proc.returncode}" \
                + self.diagnosis()
        wait_for(self.nothing_held, timeout=60, what="processing lists and crash counts to empty")
        for d in self.daemons:
            vm = vm_kib(d.pid)
            bound = self.baseline[d.pid] + self.allowance // 1024
            print(f"supervisor {d.pid}: peak {vm['VmHWM']} KiB resident, "
                  f"+{vm['VmHWM'] - self.baseline[d.pid]} KiB over its start")
            assert vm["VmHWM"] <= bound, (f"supervisor {d.pid} peaked at {vm['VmHWM']} KiB "
                                          f"resident, over {bound} KiB (started at "
                                          f"{self.baseline[d.pid]} KiB)")
        bad = []
        for log in self.logs:
            events, _ = log.since()
            bad += [e for e in events if e.get("event") in TROUBLE_EVENTS
                    or (not crashes and e.get("event") in CRASH_EVENTS)]
        assert not bad, "the supervisors logged:\n" + "\n".join(map(json.dumps, bad[:10]))

    def nothing_held(self) -> bool:
        held = [k for k in self.r.scan_iter(match=f"{self.ns}:processing:*", count=1000)
                if self.r.type(k) != b"list" or self.r.llen(k)]
        return not held and not self.r.exists(self.keys.crashes)

    def probe(self, timeout: float = ANSWER_DEADLINE) -> dict:
        """A plain job pushed now runs."""
        label = self.label("probe")
        self.r.lpush(self.keys.queue(self.queue),
                     json.dumps({"task": "h.ok", "id": label, "reply_to": self.reply(label)}))
        deadline = time.monotonic() + timeout
        item = None
        while item is None and time.monotonic() < deadline and all(
                d.proc.poll() is None for d in self.daemons):
            item = self.r.brpop(self.reply(label), timeout=1)  # (redis-py's socket timeout: 5 s)
        assert item is not None, "a plain job pushed after the hostile ones got no answer" \
            + self.diagnosis()
        env = json.loads(item[1])
        assert env["status"] == "succeeded" and env["result"] == "ok", env
        return env

    def check_answers(self, cases: list[Case]) -> None:
        dead = self.dead_raws()
        for e in dead.values():
            assert e.get("error_type") and e.get("reason"), f"dead letter without a reason: {e}"
            DEAD.validate(e)
        for c in cases:
            envs = []
            if c.reply_to is not None:
                items = self.r.lrange(c.reply_to, 0, -1)
                assert len(items) == 1, f"{c.short()}\n  got {len(items)} replies: {items[:3]}"
                envs.append(items[0])
            if c.id is not None:
                envs.append(self.r.get(self.keys.result(c.id)))
            if len(envs) == 2:
                assert envs[0] == envs[1], f"{c.short()}\n  result key and reply differ: {envs}"
            if not envs:
                if c.dead or c.either:
                    assert c.raw in dead, f"{c.short()}\n  neither answered nor dead-lettered"
                continue
            env = json.loads(envs[0])
            c.answer = env
            ENVELOPE.validate(env)
            assert env["status"] in ("succeeded", "failed"), f"{c.short()}\n  {env}"
            if c.id is not None:
                assert env["id"] == c.id, f"{c.short()}\n  answered as {env['id']!r}"
            if env["status"] == "failed":
                err = env.get("error") or {}
                assert isinstance(err.get("type"), str) and err["type"], f"{c.short()}\n  {env}"
                assert isinstance(err.get("message"), str) and err["message"].strip(), \
                    f"{c.short()}\n  failed with no message: {env}"
                if err["type"] in REFUSALS and self.dead_letters:
                    assert c.raw in dead, f"{c.short()}\n  refused ({err['type']}) but not " \
                                          "dead-lettered"
            if c.status is not None:
                assert env["status"] == c.status, f"{c.short()}\n  {env}"
            if c.error_type is not None:
                assert (env.get("error") or {}).get("type") == c.error_type, \
                    f"{c.short()}\n  expected {c.error_type}: {env}"

    def forget(self, cases: list[Case]) -> None:
        """Delete what ``cases`` left in Redis (answers, the dead list), so that a long
        run keeps the server small and each example reads only its own."""
        pipe = self.r.pipeline(transaction=False)
        for c in cases:
            if c.reply_to:
                pipe.delete(c.reply_to)
            if c.id:
                pipe.delete(self.keys.result(c.id))
        pipe.delete(self.keys.dead)
        pipe.execute()

    def diagnosis(self) -> str:
        out = []
        for d, log in zip(self.daemons, self.logs):
            events, other = log.since()
            alive = "alive" if d.proc.poll() is None else f"exited {d.proc.returncode}"
            out.append(f"\n--- supervisor {d.pid} ({alive}), pool {pool(d)}; since "
                       "the push it logged:")
            out += [json.dumps(e)[:300] for e in events
                    if e.get("event") not in ("heartbeat", "job_finished")][-15:]
            out += [line[:300] for line in other[-15:]]
        return "\n".join(out)
