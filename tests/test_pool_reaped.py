"""A pool process is never signalled once reaped: its pid, and its group's id, may be
another process's by then (pid reuse), and a timeout's SIGKILL would hit a stranger.

multiprocessing reaps every exited child it knows at each Process.start() (and in
active_children()): a dead pool process, not yet collected by the loop, was reaped
behind its back when a replacement was spawned, and then signalled (its leftovers'
SIGKILL before reaping, a timeout's).  Real processes; the signals sent are recorded."""

from __future__ import annotations

import os
import signal

import pytest

from helpers import wait_for
from redpool.pool import Died, ProcessPool
from redpool.procwatch import exited

pytestmark = pytest.mark.daemon   # real processes


def reaped(pid: int) -> bool:
    """Is ``pid`` no child of ours any more (its status collected)?"""
    try:
        os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        return False
    except ChildProcessError:
        return True


@pytest.fixture
def sent(monkeypatch):
    """(pid, signal, was it reaped then) of every kill() and killpg() from now on."""
    out: list[tuple[int, int, bool]] = []
    for name in ("kill", "killpg"):
        real = getattr(os, name)

        def wrapper(pid, sig, real=real):
            out.append((pid, sig, reaped(pid)))
            return real(pid, sig)
        monkeypatch.setattr(os, name, wrapper)
    return out


def test_a_dead_pool_process_is_not_reaped_behind_the_loops_back_nor_signalled_after(sent):
    pool = ProcessPool(2, ["tests.taskmods.jobs"], "unit-reaped", 1 << 20)
    pool.start()
    try:
        a = pool.children[0]
        a.doomed = True
        os.kill(a.pid, signal.SIGKILL)
        wait_for(lambda: exited(a.pid, a.pidfd), what="the pool process to exit")
        pool.spawn()                       # multiprocessing reaped exited children here
        pool.signal(a, signal.SIGTERM)     # (a timeout's, before the death is collected)
        events = []
        wait_for(lambda: events.extend(pool.poll([a.watch])) or events, what="its death")
        assert [type(e) for e in events] == [Died] and events[0].pid == a.pid
        assert reaped(a.pid) and a not in pool.children
        pool.signal(a, signal.SIGKILL)     # a late one, after the loop reaped it
        mine = [(sig, was_reaped) for pid, sig, was_reaped in sent if pid == a.pid]
        print("signals to the dead pool process:", mine)
        assert mine and not any(was_reaped for _, was_reaped in mine)
    finally:
        pool.kill_all()
