"""Process titles: how they read, that they change only when their text does, and what
ps shows for a real supervisor and a real child running a slow job (the titles that
docs/deploy.md's `ps` example shows)."""

from __future__ import annotations

import json
import subprocess

import pytest

from helpers import envelope, lpush_jobs, wait_for
from redpool.titles import ChildTitle, SupervisorTitle, elapsed, supervisor_title


def cmdline(pid: int) -> str:
    """What ps shows: the title (setproctitle pads the old argv area with NULs/spaces)."""
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().replace(b"\0", b" ").decode(errors="replace").strip()


def child_pids(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-ww", "-o", "pid=,args=", "--ppid", str(pid)],
                         capture_output=True, text=True).stdout
    return [int(line.split()[0]) for line in out.splitlines() if "redpool: child" in line]


# -- how titles read ----------------------------------------------------------------------------

def test_supervisor_title_says_what_it_serves_and_how_busy_it_is():
    beat = dict(state="running", inflight=3, concurrency=4, succeeded=120, failed=0,
                redis_down=False)
    assert supervisor_title("web-1", ["high", "default"], beat) == \
        "redpool: supervisor web-1 [high,default] 3/4 busy, 120 done"
    # jobs queued inside children beyond one each are not "busy" processes
    beat.update(inflight=9, failed=2, state="draining", redis_down=True)
    assert supervisor_title("web-1", ["default"], beat) == ("redpool: supervisor web-1 "
                                                           "[default] 4/4 busy, 120 done, 2 failed "
                                                           "(draining) (Redis unreachable)")


def test_supervisor_title_changes_only_when_its_text_does():
    shown = []
    sub = SupervisorTitle("w", ["q"], set_title=shown.append)
    beat = dict(state="running", inflight=0, concurrency=2, succeeded=0, failed=0)
    sub("started", beat)
    sub("heartbeat", beat)
    sub("job_finished", {"queue": "q", "task": "t", "status": "succeeded"})
    sub("heartbeat", dict(beat, inflight=1))
    assert shown == ["redpool: supervisor w [q] 0/2 busy, 0 done",
                     "redpool: supervisor w [q] 1/2 busy, 0 done"]


def test_child_title_names_only_registered_tasks_and_how_long_they_ran():
    clock = [100.0]
    shown = []
    t = ChildTitle("web-1", {"myapp.resize": object()}, set_title=shown.append,
                   clock=lambda: clock[0])
    t.refresh()
    t.since, t.raw = 88.0, b'{"task":"myapp.resize","args":[1]}'
    t.refresh()
    clock[0] = 188.5
    t.refresh()
    t.refresh()  # unchanged: not set again
    t.since, t.raw = 188.0, b'{"task":"\\u001b]0;pwned\\u0007","id":"x"}'  # not registered
    t.refresh()
    t.raw = b"not json"
    t.refresh()  # same text: not set again
    t.raw = None
    t.refresh()
    assert shown == ["redpool: child web-1 idle",
                     "redpool: child web-1 running myapp.resize for 12s",
                     "redpool: child web-1 running myapp.resize for 1m40s",
                     "redpool: child web-1 running an invalid job for 0s",
                     "redpool: child web-1 idle"]
    assert [elapsed(s) for s in (0, 59.9, 60, 3599, 3600, 7322)] == \
        ["0s", "59s", "1m00s", "59m59s", "1h00m", "2h02m"]


def test_child_title_reads_a_job_once_however_often_it_refreshes():
    parsed = []
    t = ChildTitle("w", {"t.x": object()}, set_title=lambda s: None, clock=lambda: 5.0)
    real = t.task_of
    t.task_of = lambda raw: parsed.append(raw) or real(raw)
    t.since, t.raw = 1.0, b'{"task":"t.x"}'
    for _ in range(5):
        t.refresh()
    t.raw = b'{"task":"t.x","id":"2"}'
    t.refresh()
    assert parsed == [b'{"task":"t.x"}', b'{"task":"t.x","id":"2"}']


# -- a real daemon ------------------------------------------------------------------------------

@pytest.mark.daemon
def test_ps_shows_what_the_supervisor_and_its_child_are_doing(r, keys, daemons):
    d = daemons("--concurrency", "1").wait_started()
    # Given an idle worker: the title replaced the command line (and its --redis-url)
    wait_for(lambda: cmdline(d.pid) == "redpool: supervisor w1 [default] 0/1 busy, 0 done",
             what=f"the supervisor's title (is {cmdline(d.pid)!r})")
    assert "--redis-url" not in cmdline(d.pid)
    (child,) = wait_for(lambda: child_pids(d.pid), what="a titled child")
    wait_for(lambda: cmdline(child) == "redpool: child w1 idle", what="the idle child title")

    # When a slow job runs
    lpush_jobs(r, keys, [{"task": "t.sleep", "id": "slow", "args": [4]}])
    # Then the child says which task and for how long, counting up once a second
    wait_for(lambda: cmdline(child).startswith("redpool: child w1 running t.sleep for "),
             what=f"the child's running title (is {cmdline(child)!r})")
    wait_for(lambda: cmdline(child) in ("redpool: child w1 running t.sleep for 2s",
                                        "redpool: child w1 running t.sleep for 3s"),
             what=f"the running time to count up (is {cmdline(child)!r})")
    wait_for(lambda: cmdline(d.pid) == "redpool: supervisor w1 [default] 1/1 busy, 0 done",
             what=f"the busy supervisor title (is {cmdline(d.pid)!r})")

    # and when it is done, both say so
    wait_for(lambda: envelope(r, keys, "slow"), what="the result")
    wait_for(lambda: cmdline(child) == "redpool: child w1 idle", what="the child idle again")
    wait_for(lambda: cmdline(d.pid) == "redpool: supervisor w1 [default] 0/1 busy, 1 done",
             what=f"the supervisor title after the job (is {cmdline(d.pid)!r})")
    assert json.loads(r.get(keys.result("slow")))["status"] == "succeeded"
