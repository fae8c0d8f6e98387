"""A pool child, spawned for real by pool.ProcessPool: no Redis, no supervisor loop.

The test plays the supervisor: it hands the child batches (child.encode_batch), reads
its events with pool.poll, and signals it by pid.  What is checked here is the child's
side of the contract that a SIGTERM counts only when the supervisor asked for it.
"""

from __future__ import annotations

import os
import signal
from multiprocessing.connection import wait

import pytest

from helpers import wait_for
from redpool import protocol as p
from redpool.child import decode_done, encode_batch, job_entry
from redpool.pool import Died, Done, ProcessPool

pytestmark = pytest.mark.daemon   # real processes


@pytest.fixture
def spawn():
    pools: list[ProcessPool] = []

    def start(*modules: str) -> "Feeder":
        pool = ProcessPool(1, list(modules or ["tests.taskmods.jobs"]), "unit-child", 1 << 20)
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

    def send(self, *raws: bytes) -> list[int]:
        tokens = []
        for _ in raws:
            self.next_token += 1
            tokens.append(self.next_token)
        entries = [job_entry(t, "q", raw) for t, raw in zip(tokens, raws)]
        self.pool.send(self.child, tokens, encode_batch(entries))
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

    def died(self) -> list[Died]:
        return [ev for ev in self.events if isinstance(ev, Died)]


def add(n: int) -> bytes:
    return p.encode_job(p.make_job("t.add", [n, 1], id=f"add-{n}"))


def hold(path, tag: str = "held") -> bytes:
    return p.encode_job(p.make_job("t.hold", [str(path), tag], id=f"hold-{tag}"))


def started(path) -> bool:
    return os.path.exists(f"{path}.started")


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
    release = tmp_path / "release"
    (long,) = f.send(hold(release))
    f.collect(lambda f: started(release), "the long job to start")
    # When the supervisor stops it (a job past its timeout, the grace over)
    f.pool.signal(f.child, signal.SIGTERM)
    # Then it dies of SIGTERM, as a process with SIGTERM at its default did, with the job
    (died,) = f.collect(lambda f: f.died(), "the process to die")
    assert died.exitcode == -signal.SIGTERM and died.running == long
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
