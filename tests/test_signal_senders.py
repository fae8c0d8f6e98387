"""Signals a task sends its supervisor are ignored; everyone else's are acted on.

A task (or a program it runs) may signal its worker: ``os.kill(os.getppid(), SIGTERM)``
would drain it, SIGHUP reload it, SIGTTOU shrink it, SIGUSR1 or SIGQUIT end it at once,
SIGTSTP stop it (signals.py).  The supervisor tells the sender apart and ignores those
of its own pool processes and what they started, said once per pool process
(``signal_from_pool``); the operator's (here: the test, another process) still work.
"""

from __future__ import annotations

import signal

import pytest

from helpers import envelope, lpush_jobs, wait_for

pytestmark = pytest.mark.daemon

MODULES = ("tests.taskmods.signalling",)
# Every signal the daemon acts on, and others whose default action ends or stops it
FROM_TASKS = ("SIGTERM", "SIGINT", "SIGHUP", "SIGTTIN", "SIGTTOU", "SIGQUIT", "SIGUSR1",
              "SIGUSR2", "SIGTSTP", "SIGALRM", "SIGRTMIN+3")


def named(d, event: str) -> list[dict]:
    return [e for e in d.events() if e.get("event") == event]


def test_signals_from_tasks_and_their_programs_are_ignored_and_said_once(r, keys, daemons):
    d = daemons("--concurrency", "2", modules=MODULES).wait_started()
    pool = sorted(d.children())
    jobs = [{"task": "sig.parent", "id": f"p-{name.replace('+', '.')}", "args": [name]}
            for name in FROM_TASKS]
    jobs += [{"task": "sig.program", "id": "group", "args": ["SIGTERM"]},
             {"task": "sig.program", "id": "session", "args": ["SIGTERM", True]},
             {"task": "sig.program", "id": "session-usr1", "args": ["SIGUSR1", True]}]
    lpush_jobs(r, keys, jobs)
    ids = [j["id"] for j in jobs]
    try:
        wait_for(lambda: d.proc.poll() is not None or all(envelope(r, keys, i) for i in ids),
                 timeout=60, what="every job's answer")
    except AssertionError as e:
        missing = [i for i in ids if not envelope(r, keys, i)]
        raise AssertionError(f"{e}; no answer to {missing}; the daemon logged:\n{d.log()}")
    assert d.proc.poll() is None, d.log()
    assert [envelope(r, keys, i)["status"] for i in ids] == ["succeeded"] * len(ids)

    said = named(d, "signal_from_pool")
    print("signal_from_pool:", said)
    assert said and len({e["pid"] for e in said}) == len(said)   # once per pool process
    assert {e["pid"] for e in said} <= set(pool)
    assert all(e["task"] in ("sig.parent", "sig.program") and e["signal"].startswith("SIG")
               for e in said)
    for event in ("draining", "reloading", "resized", "stop_now", "stopped"):
        assert not named(d, event), event
    assert sorted(d.children()) == pool   # no reload, no resize, nobody replaced

    # the operator's SIGTERM still drains it, and it exits 0
    d.signal(signal.SIGTERM)
    assert d.wait(60) == 0
    assert named(d, "draining")[0]["signal"] == "SIGTERM"


def test_the_operators_signals_the_worker_does_not_act_on_keep_their_default(daemons):
    d = daemons("--concurrency", "1", modules=MODULES).wait_started()
    d.signal(signal.SIGUSR1)
    assert d.wait(60) == -signal.SIGUSR1


def test_a_sender_is_looked_up_with_its_group_and_parents_up_to_us():
    import os
    import subprocess
    import sys

    from redpool.signals import sender, signame

    # a program that starts a program (in a session of its own) and waits for it
    inner = "import time; time.sleep(30)"
    outer = (f"import subprocess, sys; p = subprocess.Popen([sys.executable, '-c', {inner!r}], "
             "start_new_session=True); print(p.pid, flush=True); p.wait()")
    proc = subprocess.Popen([sys.executable, "-c", outer], stdout=subprocess.PIPE, text=True)
    try:
        grandchild = int(proc.stdout.readline())
        got = sender(grandchild)
        assert got.lineage == (grandchild, proc.pid)   # up to us, not including us
        assert got.pgid == grandchild != os.getpgid(proc.pid)
    finally:
        subprocess.run(["kill", str(grandchild)])
        proc.wait(30)
    assert sender(proc.pid) == (0, proc.pid, (proc.pid,), None)   # gone: its pid alone
    assert signame(signal.SIGRTMIN + 3) == "SIGRTMIN+3" and signame(signal.SIGHUP) == "SIGHUP"
