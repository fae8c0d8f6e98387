"""Signals for a running pool, sent to the real daemon: SIGTTIN / SIGTTOU add or remove
a child, SIGHUP replaces every child by one that imports the task code afresh.  No job
is dropped or run twice by any of them."""

from __future__ import annotations

import signal
import textwrap
from collections import Counter

import pytest

from helpers import envelope, lpush_jobs, wait_for

pytestmark = pytest.mark.daemon


def named(d, event: str) -> list[dict]:
    return [e for e in d.events() if e.get("event") == event]


def ledger_counts(r, ledger: str) -> Counter:
    return Counter(x.decode().rsplit(":", 1)[0] for x in r.lrange(ledger, 0, -1))


def test_sigttin_adds_a_child_and_sigttou_removes_one_after_its_job(r, keys, daemons):
    ledger = keys.ns + ":ledger"
    d = daemons("--concurrency", "2", "--prefetch", "0", ledger=ledger).wait_started()
    assert len(d.children()) == 2

    # SIGTTIN: a third child, and it takes work (three jobs run at the same time).  The
    # jobs go in once it has booted (child_ready): one pushed before would wait for the
    # first free process, and on a busy machine that can be one of the two busy ones
    d.signal(signal.SIGTTIN)
    wait_for(lambda: named(d, "resized"), what="the resized event")
    assert named(d, "resized")[-1]["concurrency"] == 3
    wait_for(lambda: named(d, "child_ready"), timeout=60, what="the third child to boot")
    assert len(d.children()) == 3
    lpush_jobs(r, keys, [{"task": "t.sleep", "id": f"s{i}", "args": [2.0]} for i in range(3)])
    # (each job writes its own start: s2's can come before s1's)
    wait_for(lambda: all(ledger_counts(r, ledger).get(f"s{i}:start") for i in range(3)),
             what="three jobs running")
    running = {x.decode().rsplit(":", 1)[1] for x in r.lrange(ledger, 0, -1)
               if x.decode().split(":")[1] == "start"}
    assert len(running) == 3  # three different processes

    # SIGTTOU twice while they run: children go, but only after their job.  (One at a
    # time: POSIX merges a signal sent again before the first was delivered.)
    for size in (2, 1):
        d.signal(signal.SIGTTOU)
        wait_for(lambda: named(d, "resized")[-1]["concurrency"] == size, what="a resize event")
    assert len(d.children()) == 3  # nobody is killed mid-job
    wait_for(lambda: all(envelope(r, keys, f"s{i}") for i in range(3)), timeout=30,
             what="the three jobs to finish")
    assert all(envelope(r, keys, f"s{i}")["status"] == "succeeded" for i in range(3))
    wait_for(lambda: len(d.children()) == 1, what="the pool to shrink to one child")

    # Never below one
    d.signal(signal.SIGTTOU)
    wait_for(lambda: named(d, "signal_ignored"), what="the ignored signal")
    assert named(d, "signal_ignored")[-1]["signal"] == "SIGTTOU"
    lpush_jobs(r, keys, [{"task": "t.add", "id": "after", "args": [2, 3]}])
    wait_for(lambda: envelope(r, keys, "after"), what="a job on the one child")
    assert envelope(r, keys, "after")["result"] == 5
    assert len(d.children()) == 1
    counts = ledger_counts(r, ledger)
    assert all(counts[f"s{i}:start"] == 1 and counts[f"s{i}:end"] == 1 for i in range(3))
    assert d.proc.poll() is None and not named(d, "child_died")


VERSION_MODULE = '''
import time
from redpool import task

VERSION = {version}


@task(name="reload.version")
def version():
    return VERSION


@task(name="reload.slow")
def slow(seconds):
    time.sleep(seconds)
    return VERSION
'''


def write_module(path, version) -> None:
    path.write_text(textwrap.dedent(VERSION_MODULE.format(version=version)))


def test_sighup_reloads_the_code_while_running_jobs_finish_on_the_old(r, keys, daemons, tmp_path):
    mod = tmp_path / "reloadme.py"
    write_module(mod, 1)
    d = daemons("--concurrency", "2", "--prefetch", "0", modules=("reloadme",),
                env={"PYTHONPATH": str(tmp_path)}).wait_started()
    old = set(d.children())
    lpush_jobs(r, keys, [{"task": "reload.slow", "id": f"old{i}", "args": [2.0]}
                         for i in range(2)])
    wait_for(lambda: r.llen(keys.queue("default")) == 0, what="both slow jobs taken")

    # The code changes on disk; SIGHUP while both children run a job
    write_module(mod, 2)
    d.signal(signal.SIGHUP)
    wait_for(lambda: named(d, "reloaded"), timeout=60, what="the reload to complete")
    # (`reloaded` says the new generation took over; the old processes, their pipes
    # closed, may take a moment more to exit on a busy machine)
    wait_for(lambda: len(set(d.children())) == 2 and not set(d.children()) & old,
             what="the old processes to exit")

    # The jobs that were running finished on the old code, nothing was lost or rerun
    for i in range(2):
        env = envelope(r, keys, f"old{i}")
        assert env["status"] == "succeeded" and env["result"] == 1 and env["attempts"] == 1
    # New jobs run the new code
    lpush_jobs(r, keys, [{"task": "reload.version", "id": f"new{i}"} for i in range(4)])
    wait_for(lambda: all(envelope(r, keys, f"new{i}") for i in range(4)), what="new jobs")
    assert {envelope(r, keys, f"new{i}")["result"] for i in range(4)} == {2}
    assert not named(d, "child_died") and d.proc.poll() is None


def test_a_sighup_with_broken_code_keeps_the_old_children_serving(r, keys, daemons, tmp_path):
    mod = tmp_path / "reloadme.py"
    write_module(mod, 1)
    d = daemons("--concurrency", "2", modules=("reloadme",),
                env={"PYTHONPATH": str(tmp_path)}).wait_started()
    old = set(d.children())
    mod.write_text("def broken(:\n")
    d.signal(signal.SIGHUP)
    wait_for(lambda: named(d, "reload_failed"), timeout=60, what="the reload to be given up")
    assert "SyntaxError" in named(d, "reload_failed")[0]["message"]
    wait_for(lambda: set(d.children()) == old, what="only the old children left")
    lpush_jobs(r, keys, [{"task": "reload.version", "id": "still"}])
    wait_for(lambda: envelope(r, keys, "still"), what="a job after the failed reload")
    assert envelope(r, keys, "still")["result"] == 1
    assert d.proc.poll() is None
