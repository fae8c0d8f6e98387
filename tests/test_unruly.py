"""Nothing a task does to its own process, descriptors or children may block the
supervisor or hide a pool process's death (tests/taskmods/unruly.py).

The real daemon for what the supervisor does (its loop must not block: a second
queue's jobs are answered meanwhile, the lease is never lost), real spawned pool
processes (pool.ProcessPool, the test playing the supervisor) for the pipe itself and
for the fallback where there is no pidfd.  The processes a task leaves behind are
watched through a pidfd of their own (their pid may be reused once they are gone) and
killed in teardown whatever happened.
"""

from __future__ import annotations

import json
import os
import signal
from multiprocessing.connection import wait

import pytest

from helpers import envelope, lpush_jobs, wait_for
from redpool import procwatch
from redpool import protocol as p
from redpool.child import decode_done, encode_batch, job_entry
from redpool.poller import readable
from redpool.pool import Died, Done, ProcessPool

pytestmark = [pytest.mark.daemon,
              pytest.mark.skipif(not hasattr(os, "pidfd_open"), reason="watches through pidfds")]

MODULES = ("tests.taskmods.jobs", "tests.taskmods.unruly")


class LeftBehind:
    """A process a task started, known by the pid it wrote to ``path``."""

    def __init__(self, path) -> None:
        self.path = path
        self.fd: int | None = None

    def wait_written(self, timeout: float = 60.0) -> "LeftBehind":
        wait_for(lambda: os.path.exists(self.path), timeout, what=f"{self.path} written")
        try:
            self.fd = os.pidfd_open(int(open(self.path).read()))
        except ProcessLookupError:
            self.fd = -1   # gone already
        return self

    def alive(self) -> bool:
        return self.fd is not None and self.fd >= 0 and not readable(self.fd)

    def kill(self) -> None:
        if self.alive():
            signal.pidfd_send_signal(self.fd, signal.SIGKILL)


@pytest.fixture
def left_behind(tmp_path):
    made: list[LeftBehind] = []

    def make(name: str) -> LeftBehind:
        lb = LeftBehind(str(tmp_path / f"{name}.pid"))
        made.append(lb)
        return lb

    yield make
    for lb in made:
        if lb.fd is None and os.path.exists(lb.path):
            lb.wait_written()
        lb.kill()


def named(d, event: str) -> list[dict]:
    return [e for e in d.events() if e.get("event") == event]


def answered(r, keys, job_id: str, timeout: float = 60.0) -> dict:
    return wait_for(lambda: envelope(r, keys, job_id), timeout, what=f"an answer to {job_id}")


# -- the daemon ------------------------------------------------------------------------------

def test_a_task_closing_its_inherited_descriptors_blocks_nothing(r, keys, daemons, left_behind):
    d = daemons("--concurrency", "2", "--queue", "default", "--queue", "other",
                "--max-crashes", "0", modules=MODULES).wait_started()
    # Given a task that closes every descriptor it inherited (as daemonising code does),
    # and then works on for ten minutes
    victim = left_behind("victim")
    lpush_jobs(r, keys, [{"task": "u.closerange", "id": "closer", "args": [victim.path]}])
    victim.wait_written()
    # Then the supervisor carries on: another queue's jobs are answered meanwhile
    lpush_jobs(r, keys, [{"task": "t.add", "id": f"o{i}", "args": [i, 1]} for i in range(3)],
               "other")
    for i in range(3):
        assert answered(r, keys, f"o{i}")["result"] == i + 1
    # And the process that cut itself off is killed, its job answered as its crash
    env = answered(r, keys, "closer")
    assert env["error"]["type"] == p.E_WORKER_CRASHED
    assert "closed its pipe to the supervisor" in env["error"]["message"]
    wait_for(lambda: not victim.alive(), what="the cut-off process to be gone")
    assert not named(d, "lease_lost") and d.proc.poll() is None


def test_a_task_that_forks_and_dies_is_answered_before_its_fork_exits(r, keys, daemons,
                                                                       left_behind):
    d = daemons("--concurrency", "1", "--max-crashes", "0", modules=MODULES).wait_started()
    # Given a task that forks a copy holding every descriptor for ten minutes, then dies
    fork = left_behind("fork")
    lpush_jobs(r, keys, [{"task": "u.fork_then_die", "id": "forked", "args": [fork.path]}])
    fork.wait_written()
    # Then its process's death is seen at once: the job is answered as a crash
    env = answered(r, keys, "forked")
    assert env["error"]["type"] == p.E_WORKER_CRASHED
    assert "exited with code 5" in env["error"]["message"]
    # And the copy it left in its process group is gone with it
    wait_for(lambda: not fork.alive(), what="the forked copy to be killed")
    lpush_jobs(r, keys, [{"task": "t.add", "id": "after", "args": [1, 2]}])
    assert answered(r, keys, "after")["result"] == 3
    assert d.proc.poll() is None


def test_a_background_command_hides_no_death_and_ends_with_its_process(
        r, keys, daemons, left_behind):
    d = daemons("--concurrency", "1", "--max-crashes", "0", modules=MODULES).wait_started()
    # Given a task that runs os.system("sleep 600 &") and then raises
    bg = left_behind("background")
    lpush_jobs(r, keys, [{"task": "u.background_then_raise", "id": "bg", "args": [bg.path]}])
    env = answered(r, keys, "bg")
    assert env["status"] == p.FAILED and env["error"]["type"] == "RuntimeError"
    bg.wait_written()
    assert bg.alive()   # its pool process lives on, and so does what it started
    # When that process dies: its death is seen at once, though `sleep` lives on
    lpush_jobs(r, keys, [{"task": "t.die", "id": "die"}])
    env = answered(r, keys, "die")
    assert env["error"]["type"] == p.E_WORKER_CRASHED
    assert "out-of-memory killer" in env["error"]["message"]   # a SIGKILL nobody here sent
    # And the command it left in its process group is gone with it
    wait_for(lambda: not bg.alive(), what="the background command to be killed")
    assert d.proc.poll() is None


def test_a_task_that_forks_and_overruns_its_timeout_is_answered(r, keys, daemons, left_behind):
    d = daemons("--concurrency", "1", modules=MODULES).wait_started()
    fork = left_behind("fork")
    lpush_jobs(r, keys, [{"task": "u.fork_then_hang", "id": "slow", "args": [fork.path],
                          "timeout": 1, "max_retries": 0}])
    fork.wait_written()
    env = answered(r, keys, "slow")
    assert env["error"]["type"] == "TimeoutError"
    # The timeout stopped the process group: the fork too, not only the pool process
    wait_for(lambda: not fork.alive(), what="the forked copy to be stopped")
    assert named(d, "child_stopped") and not named(d, "child_died")


def test_a_daemon_a_task_detaches_is_left_alone_and_hides_nothing(r, keys, daemons,
                                                                   left_behind):
    d = daemons("--concurrency", "1", "--max-crashes", "0", modules=MODULES).wait_started()
    # Given a task that double-forks a daemon (setsid: a session of its own) that keeps
    # the descriptors it inherited
    daemon = left_behind("daemon")
    lpush_jobs(r, keys, [{"task": "u.daemon", "id": "daemonise", "args": [daemon.path]}])
    assert answered(r, keys, "daemonise")["result"] == "started a daemon"
    daemon.wait_written()
    # When the pool process dies: its death is seen at once, the daemon holds nothing up
    lpush_jobs(r, keys, [{"task": "t.die", "id": "die"}])
    assert answered(r, keys, "die")["error"]["type"] == p.E_WORKER_CRASHED
    lpush_jobs(r, keys, [{"task": "t.add", "id": "after", "args": [2, 2]}])
    assert answered(r, keys, "after")["result"] == 4
    # And the daemon left the process group on purpose: it is not ours to stop
    assert daemon.alive() and d.proc.poll() is None


def test_a_forked_copy_returning_from_a_task_answers_nothing(r, keys, daemons, left_behind):
    d = daemons("--concurrency", "1", modules=MODULES).wait_started()
    (pool_pid,) = d.children()
    # Given a task that forks and forgets os._exit() in the copy: both return from it
    copy = left_behind("copy")
    lpush_jobs(r, keys, [{"task": "u.fork_and_return", "id": "fork", "args": [copy.path]},
                         *[{"task": "t.add", "id": f"n{i}", "args": [i, i]} for i in range(5)]])
    # Then the job is answered by the pool process, once, and the copy ends there
    assert answered(r, keys, "fork")["result"] == pool_pid
    copy.wait_written()
    wait_for(lambda: not copy.alive(), what="the forked copy to exit")
    for i in range(5):
        assert answered(r, keys, f"n{i}")["result"] == 2 * i
    assert d.children() == [pool_pid] and d.proc.poll() is None
    assert len(named(d, "job_finished")) == 6


def test_stopping_the_worker_stops_what_its_tasks_left_running(r, keys, daemons, left_behind):
    d = daemons("--concurrency", "2", "--grace", "1", modules=MODULES).wait_started()
    # Given a command a finished job left in the background, and a job that forked
    bg, fork = left_behind("background"), left_behind("fork")
    lpush_jobs(r, keys, [{"task": "u.background_then_raise", "id": "bg", "args": [bg.path]},
                         {"task": "u.fork_then_hang", "id": "hang", "args": [fork.path]}])
    answered(r, keys, "bg")
    bg.wait_written(), fork.wait_written()
    # When the worker stops (the grace runs out for the running job)
    d.signal(signal.SIGTERM)
    assert d.wait(60) == 0, d.log()
    # Then neither outlives it
    wait_for(lambda: not bg.alive() and not fork.alive(), what="what the tasks left to stop")
    assert json.loads(r.lindex(keys.queue("default"), 0))["id"] == "hang"   # back in line


# -- a pool process, the test playing the supervisor ----------------------------------------

@pytest.fixture(params=["pidfd", "fallback"])
def pool(request, monkeypatch):
    """One real pool process; ``fallback``: as where there is no pidfd."""
    if request.param == "fallback":
        monkeypatch.setattr(procwatch, "pidfd_open", None)
    pools: list[ProcessPool] = []

    def start(**kw) -> ProcessPool:
        pl = ProcessPool(1, list(MODULES), "unit-child", 64 << 20, **kw)
        pools.append(pl)
        pl.start()
        assert (pl.children[0].pidfd is None) == (request.param == "fallback")
        return pl

    yield start
    for pl in pools:
        pl.kill_all()


def run(pl: ProcessPool, task: str, *args, token: int = 1, return_after: float = 60.0,
        **kwargs) -> list[int]:
    raw = json.dumps({"task": task, "args": list(args), "kwargs": kwargs}).encode()
    pl.send(pl.children[0], [token], encode_batch([job_entry(token, "q", raw)], return_after))
    return [token]


def collect(pl: ProcessPool, events: list, cond, what: str, timeout: float = 60.0):
    def step():
        ready = wait(pl.waitables(), timeout=0.1)
        events.extend(pl.poll(ready))
        return cond()
    return wait_for(step, timeout, interval=0, what=what)


def test_a_fork_holding_the_pipe_hides_no_death(pool, left_behind):
    pl, events = pool(), []
    fork = left_behind("fork")
    run(pl, "u.fork_then_die", fork.path)
    fork.wait_written()
    collect(pl, events, lambda: any(isinstance(e, Died) for e in events), "the death")
    (died,) = events
    assert died.running == 1 and died.exitcode == 5
    wait_for(lambda: not fork.alive(), what="the fork to be killed with its process")


def test_a_process_that_closes_its_pipe_is_killed_without_blocking(pool, left_behind):
    pl, events = pool(), []
    victim = left_behind("victim")
    run(pl, "u.closerange", victim.path)
    victim.wait_written()
    collect(pl, events, lambda: any(isinstance(e, Died) for e in events), "the death")
    (died,) = events
    assert died.running == 1 and died.exitcode == -signal.SIGKILL
    assert "closed its pipe" in died.description and not victim.alive()


@pytest.mark.timeout(90)   # without a pipe that never blocks, both wedge for ever
def test_a_big_batch_to_a_process_busy_writing_a_big_answer_wedges_neither(pool):
    pl, events = pool(), []
    (c,) = pl.children
    # Given a process writing an answer far bigger than its pipe holds
    first = run(pl, "u.big", 4 << 20, token=1)
    wait_for(lambda: readable(c.chan.fileno()), what="the big answer to start coming")
    # When it is handed a batch far bigger than its pipe holds, meanwhile
    second = run(pl, "u.big", 10, pad="y" * (900 << 10), token=2)
    # Then both answers come
    collect(pl, events, lambda: len([e for e in events if isinstance(e, Done)]) == 2,
            "both answers")
    done = {e.token: decode_done(e.msg) for e in events}
    assert set(done) == {*first, *second}
    assert all(meta["status"] == p.SUCCEEDED for meta, *_ in done.values())
    assert len(json.loads(done[1][1])["result"]) == 4 << 20


def test_programs_a_task_runs_inherit_none_of_the_pool_process_descriptors(pool):
    pl, events = pool(), []
    run(pl, "u.inherited")
    collect(pl, events, lambda: events, "the answer")
    (done,) = events
    meta, env, *_ = decode_done(done.msg)
    assert meta["status"] == p.SUCCEEDED, env
    assert json.loads(env)["result"] == []
