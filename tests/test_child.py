"""A pool child, spawned for real by pool.ProcessPool: no Redis, no supervisor loop.

The test plays the supervisor: it hands the child batches (child.encode_batch), reads
its events with pool.poll, and signals it by pid.  What is checked here is the child's
side of two contracts: jobs it holds and has not started go back when the one it runs
runs long (never both given back and run), and a SIGTERM counts only when the
supervisor asked for it.
"""

from __future__ import annotations

import json
import os
import signal
from collections import Counter
from multiprocessing.connection import wait

import pytest

from helpers import wait_for
from redpool import protocol as p
from redpool.child import MSG_DONE_MANY, decode_done, encode_batch, job_entry, split_many
from redpool.pool import Died, Done, ProcessPool, Returned

pytestmark = pytest.mark.daemon   # real processes


@pytest.fixture
def spawn():
    pools: list[ProcessPool] = []

    def start(*modules: str, **kw) -> "Feeder":
        pool = ProcessPool(1, list(modules or ["tests.taskmods.jobs"]), "unit-child", 1 << 20,
                           **kw)
        pools.append(pool)
        pool.start()
        return Feeder(pool)

    yield start
    for pool in pools:
        pool.kill_all()


class Feeder:
    """The supervisor's part: tokens, batches, events."""

    def __init__(self, pool: ProcessPool) -> None:
        self.pool = pool
        (self.child,) = pool.children
        self.next_token = 0
        self.events: list = []

    def send(self, *raws: bytes, return_after: float = 0.02) -> list[int]:
        tokens = []
        for _ in raws:
            self.next_token += 1
            tokens.append(self.next_token)
        entries = [job_entry(t, "q", raw) for t, raw in zip(tokens, raws)]
        self.pool.send(self.child, tokens, encode_batch(entries, return_after))
        return tokens

    def collect(self, cond, what: str, timeout: float = 30.0):
        """Read events until ``cond(self)`` holds."""
        def step():
            ready = wait(self.pool.waitables(), timeout=0.2)
            self.events += self.pool.poll(ready)
            return cond(self)
        return wait_for(step, timeout, interval=0, what=what)

    def done(self) -> dict[int, dict]:
        """token -> the answer's meta, for every job answered."""
        out = {}
        for ev in self.events:
            if isinstance(ev, Done):
                meta = decode_done(ev.msg)[0]
                assert meta["t"] == ev.token   # the pool's bookkeeping kept in step
                out[ev.token] = meta
        return out

    def returned(self) -> list[int]:
        return [t for ev in self.events if isinstance(ev, Returned) for t in ev.tokens]

    def died(self) -> list[Died]:
        return [ev for ev in self.events if isinstance(ev, Died)]


def add(n: int) -> bytes:
    return p.encode_job(p.make_job("t.add", [n, 1], id=f"add-{n}"))


def nap(n: int, seconds: float) -> bytes:
    return p.encode_job(p.make_job("t.nap", [seconds], id=f"nap-{n}"))


def hold(path, tag: str = "held") -> bytes:
    return p.encode_job(p.make_job("t.hold", [str(path), tag], id=f"hold-{tag}"))


def started(path) -> bool:
    return os.path.exists(f"{path}.started")


# -- giving back what waits behind a long job ---------------------------------------------------

def test_jobs_behind_a_long_job_are_given_back_while_it_runs(spawn, tmp_path):
    f = spawn()
    release = tmp_path / "release"
    # Given a job of no fixed length followed in its batch by a short one, and a second
    # batch sent to the busy process behind it (still in its pipe)
    long, behind = f.send(hold(release), add(1))
    in_pipe = f.send(add(2), add(3))
    f.collect(lambda f: started(release), "the long job to start")
    # Then, while it runs, everything it holds and has not started comes back, in order
    f.collect(lambda f: len(f.returned()) == 3, "the jobs behind it to be given back")
    assert f.returned() == [behind, *in_pipe]
    assert list(f.child.tokens) == [long] and not f.done()
    # When it ends, it is answered, and the process takes the next batch (a supervisor
    # sends it none before: a batch arriving while it runs long would come back too)
    release.touch()
    f.collect(lambda f: long in f.done(), "the long job's answer")
    nxt = f.send(add(4))
    f.collect(lambda f: nxt[0] in f.done(), "the next batch")
    # And none of the jobs it gave back ran
    assert set(f.done()) == {long, *nxt}
    assert f.done()[long]["status"] == p.SUCCEEDED


def test_answers_to_short_jobs_go_together_yet_never_wait_behind_a_long_job(spawn, tmp_path):
    f = spawn()
    # Given a batch of 50 tiny jobs: their answers come in a few messages, not 50
    f.send(*[add(n) for n in range(50)])
    messages, answered = 0, 0
    while answered < 50:
        assert wait([f.child.chan], timeout=30), "no answer within 30 s"
        for msg in f.child.chan.receive():
            messages += 1
            answered += sum(1 for _ in split_many(msg)) if msg[:1] == MSG_DONE_MANY else 1
    assert messages < 25, messages
    f.child.tokens.clear()   # (answered, though read here rather than by the pool)
    # Given a short job followed by a long one in the same batch: the short one's answer
    # comes while the long one runs
    release = tmp_path / "release"
    short, long = f.send(add(99), hold(release))
    f.collect(lambda f: short in f.done(), "the short job's answer")
    assert started(release) and long not in f.done()
    release.touch()
    f.collect(lambda f: long in f.done(), "the long job's answer")


def test_a_job_is_either_run_or_given_back_never_both(spawn):
    # Jobs of about the give-back time, handed out again as soon as they come back, as a
    # supervisor does: the main thread (between jobs) and the helper thread (during one)
    # race to give back; every job must be answered or returned, exactly once in all
    f = spawn()
    jobs = [nap(n, 0.0005) for n in range(200)]
    todo = list(jobs)
    raw_of: dict[int, bytes] = {}
    answered: Counter = Counter()
    rounds = 0
    while todo and rounds < 1000:
        rounds += 1
        for i in range(0, len(todo), 10):
            batch = todo[i:i + 10]
            raw_of.update(zip(f.send(*batch, return_after=0.0005), batch))
        seen = len(f.events)
        f.collect(lambda f: not f.child.tokens, "the process to answer or give back all")
        new = f.events[seen:]
        back = [t for ev in new if isinstance(ev, Returned) for t in ev.tokens]
        answered.update(raw_of[ev.token] for ev in new if isinstance(ev, Done))
        todo = [raw_of[t] for t in back]
    assert not todo
    assert sorted(answered) == sorted(jobs)
    assert set(answered.values()) == {1}       # each ran once
    assert f.returned()                        # (and some were given back on the way)


# -- SIGTERM: the supervisor's, or anyone else's ------------------------------------------------

def test_a_sigterm_the_supervisor_did_not_send_is_ignored(spawn, tmp_path):
    f = spawn()
    pid = f.child.pid
    # an idle process
    os.kill(pid, signal.SIGTERM)
    (t,) = f.send(add(1))
    f.collect(lambda f: t in f.done(), "a job after SIGTERM")
    # a process running a job (as Heroku signals every process of a dyno)
    release = tmp_path / "release"
    (long,) = f.send(hold(release))
    f.collect(lambda f: started(release), "the long job to start")
    os.kill(pid, signal.SIGTERM)
    os.kill(pid, signal.SIGTERM)
    release.touch()
    f.collect(lambda f: long in f.done(), "the long job's answer")
    assert f.done()[long]["status"] == p.SUCCEEDED
    assert f.child.proc.is_alive() and not f.died()


def test_a_sigterm_the_supervisor_sent_stops_the_process_as_before(spawn, tmp_path):
    f = spawn()
    # When the supervisor stops it while it runs a job (a job past its timeout, the
    # grace over), it dies of SIGTERM, as a process with SIGTERM at its default did
    died = stopped_while_running(f, tmp_path)
    assert "SIGTERM" in died.description


def test_a_task_modules_own_sigterm_handler_is_called_for_the_supervisors_stops_only(
        spawn, tmp_path):
    # Given task code that installed a SIGTERM handler of its own (it raises into the task)
    f = spawn("tests.taskmods.jobs", "tests.taskmods.own_sigterm")
    first, second = tmp_path / "first", tmp_path / "second"
    (a,) = f.send(hold(first, "a"))
    f.collect(lambda f: started(first), "the first job to start")
    # When a SIGTERM arrives that the supervisor did not send: the handler is not called
    os.kill(f.child.pid, signal.SIGTERM)
    first.touch()
    f.collect(lambda f: a in f.done(), "the first job's answer")
    assert f.done()[a]["status"] == p.SUCCEEDED
    # When the supervisor sends one: the task's handler is, and decides (here: the task
    # raises, and the process lives on)
    (b,) = f.send(hold(second, "b"))
    f.collect(lambda f: started(second), "the second job to start")
    f.pool.signal(f.child, signal.SIGTERM)
    f.collect(lambda f: b in f.done(), "the second job's answer")
    assert f.done()[b]["error_type"] == "tests.taskmods.own_sigterm.Stopped"
    assert f.child.proc.is_alive() and not f.died()


@pytest.mark.parametrize("how", ["chain", "resend"])
def test_a_task_handler_that_passes_sigterm_on_ends_the_process_once(
        spawn, tmp_path, monkeypatch, how):
    # Given task code whose SIGTERM handler hands the signal on to the one it found
    # (ours), by calling it or by restoring it and signalling again
    calls = tmp_path / "calls"
    monkeypatch.setenv("REDPOOL_SIGTERM_LOG", str(calls))
    f = spawn("tests.taskmods.jobs", "tests.taskmods.chained_sigterm")
    (t,) = f.send(p.encode_job(p.make_job("sig.install", [how], id="install")))
    f.collect(lambda f: t in f.done(), "the handler installed")
    # When the supervisor stops the process, the task's handler runs once, and the
    # process dies of SIGTERM, as it would have without us (not a handler calling
    # itself until the recursion limit)
    stopped_while_running(f, tmp_path)
    assert calls.read_text() == "x"


def stopped_while_running(f, tmp_path) -> Died:
    """The supervisor sends SIGTERM while a long job runs: the process must die of it,
    holding that job."""
    release = tmp_path / "release"
    (long,) = f.send(hold(release))
    f.collect(lambda f: started(release), "the long job to start")
    f.pool.signal(f.child, signal.SIGTERM)
    (died,) = f.collect(lambda f: f.died(), "the process to die")
    assert died.exitcode == -signal.SIGTERM and died.running == long
    return died


def test_the_supervisors_sigterm_ends_a_job_inside_c_code_at_once(spawn, tmp_path):
    # Given a job inside C code (a Python handler runs only between bytecodes)
    f = spawn("tests.taskmods.jobs", "tests.taskmods.chained_sigterm")
    where = tmp_path / "c"
    (t,) = f.send(p.encode_job(p.make_job("sig.c_bound", [str(where)], id="c")))
    f.collect(lambda f: started(where), "the job to start")
    # When the supervisor stops the process: it dies of SIGTERM, not of the SIGKILL a
    # supervisor sends 2 s later (here nobody sends one, and the hash would run for
    # hours: without a stop that does not wait for a bytecode, this waits in vain)
    f.pool.signal(f.child, signal.SIGTERM)
    (died,) = f.collect(lambda f: f.died(), "the process to die", timeout=60)
    assert died.exitcode == -signal.SIGTERM and died.running == t


# -- whatever a task returns or raises ----------------------------------------------------------

def test_whatever_a_task_returns_or_raises_its_child_answers_and_lives_on(spawn):
    # Given a child with a result limit of 4 KiB, and jobs whose tasks return or raise
    # what cannot simply be written (tests/taskmods/hostile.py)
    from tests.taskmods import hostile

    f = spawn("tests.taskmods.hostile", max_result_size=4096)
    pid = f.child.pid
    expected = {"h.surrogate_raise": "ValueError", "h.surrogate_result": None}
    jobs = [p.make_job("h.surrogate_raise", id="s1"), p.make_job("h.surrogate_result", id="s2"),
            p.make_job("h.big", [5000], id="big"), p.make_job("h.long_error", [200_000], id="long")]
    jobs += [p.make_job("h.returns", [kind], id=f"r-{kind}") for kind in hostile.RESULTS]
    jobs += [p.make_job("h.raises", [kind], id=f"x-{kind}") for kind in hostile.RAISES]
    tokens = f.send(*(p.encode_job(j) for j in jobs), return_after=3600)  # none given back
    # When they have run
    f.collect(lambda f: len(f.done()) == len(jobs) or f.died(), "every job answered")
    # Then every one was answered by the same process, none crashed it
    assert f.died() == [] and f.child.pid == pid and f.child.proc.is_alive()
    types = {job["id"]: f.done()[t]["error_type"] for t, job in zip(tokens, jobs)}
    assert types["s1"] == "ValueError" and types["s2"] is None
    assert types["big"] == p.E_RESULT_TOO_LARGE and types["long"] == "RuntimeError"
    assert {types[f"r-{kind}"] for kind in hostile.RESULTS} == {p.E_UNSERIALIZABLE_RESULT}
    assert types["x-anonymous"] == p.E_UNPRINTABLE_ERROR
    assert types["x-nowhere"] == "<unknown>.Nowhere"
    assert types["x-fatal"] == "tests.taskmods.hostile.Fatal"
    # and the envelopes it sent are valid UTF-8 JSON, small but for the one result allowed
    for ev in f.events:
        if isinstance(ev, Done):
            env = decode_done(ev.msg)[1]
            assert env is not None and len(env) <= 4096 * 64
            json.loads(env.decode("utf-8"))


# -- what a job leaves behind (src/redpool/leftovers.py) ----------------------------------------

LEFT_BEHIND = ["alarm", "itimer", "alarm_handler", "sigpipe", "recursion", "chdir",
               "close_stdout", "close_stderr", "replace_stdout"]


def test_state_a_job_leaves_behind_never_fails_or_kills_a_later_job(spawn, tmp_path):
    # Given a child, and jobs that each leave state behind (a pending alarm, a low
    # recursion limit, another directory, stdout closed...), each followed by a job
    # that runs past the alarm, prints, encodes a nested result and reads its cwd
    f = spawn("tests.taskmods.hostile")
    pid = f.child.pid
    jobs = []
    for kind in LEFT_BEHIND:
        jobs.append(p.make_job("h.leave", [kind, str(tmp_path)], id=f"leave-{kind}"))
        wait = 1.5 if kind in ("alarm", "itimer", "alarm_handler") else 0.0
        jobs.append(p.make_job("h.after", [wait], id=f"after-{kind}"))
    tokens = f.send(*(p.encode_job(j) for j in jobs), return_after=3600)  # none given back
    # When they have run
    f.collect(lambda f: len(f.done()) == len(jobs) or f.died(), "every job answered",
              timeout=120)
    # Then the process lived through them all, and every job succeeded
    assert f.died() == [] and f.child.pid == pid and f.child.proc.is_alive()
    done = f.done()
    assert {j["id"]: done[t]["status"] for t, j in zip(tokens, jobs)} == {
        j["id"]: p.SUCCEEDED for j in jobs}
    # in the directory the process started in
    envelopes = [json.loads(decode_done(ev.msg)[1]) for ev in f.events if isinstance(ev, Done)]
    assert {e["result"]["cwd"] for e in envelopes if e["id"].startswith("after-")} == {os.getcwd()}
