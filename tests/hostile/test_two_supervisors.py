"""Two supervisors on one queue: one bad job cannot stop both (issue 12).  A job that
kills the supervisor holding it goes back to its queue when that supervisor stops, or
to the reaper when it is killed, and would then kill the next one, and the next."""

from __future__ import annotations

import os
import signal

import pytest

from helpers import wait_for
from hostile.invariants import Case, Checker, waiting

pytestmark = pytest.mark.daemon

#: The bad job: a lone surrogate in its task's name (issue 12 §1)
BAD = rb'"task":"h.ok\ud800"'


def bad_job(chk: Checker) -> Case:
    label = chk.label("bad")
    raw = b'{"id":"%s","reply_to":"%s",%s}' % (label.encode(), chk.reply(label).encode(), BAD)
    return Case(raw, label, id=label, reply_to=chk.reply(label), status="failed")


def both_serve(chk: Checker, names: set[str]) -> None:
    """Jobs long enough to keep one process busy go to every supervisor in time."""
    seen: set[str] = set()

    def more() -> bool:
        cases = [chk.case({"task": "h.nap", "args": [0.3]}) for _ in range(4)]
        chk.push(cases)
        chk.wait_answered(cases)
        chk.check_answers(cases)
        seen.update(c.answer["worker"] for c in cases)
        return seen >= names

    wait_for(more, timeout=120, interval=0, what=f"jobs answered by each of {sorted(names)}")


def test_one_bad_job_cannot_stop_both(hostile_daemons, r, keys):
    a = hostile_daemons("--concurrency", "1", name="a")
    b = hostile_daemons("--concurrency", "1", name="b")
    chk = Checker(r, keys, [a, b], concurrency=1)
    chk.run([bad_job(chk)])
    both_serve(chk, {"a", "b"})


def test_the_bad_job_of_a_killed_supervisor_cannot_stop_the_one_that_reaps_it(
        hostile_daemons, r, keys, tmp_path):
    # Given a supervisor holding the bad job, reserved while its one process is busy
    a = hostile_daemons("--concurrency", "1", "--prefetch", "1", "--lease", "2", name="a")
    chk_a = Checker(r, keys, [a], concurrency=1)
    gate = str(tmp_path / "gate")
    busy = chk_a.case({"task": "h.hold", "args": [gate]})
    bad = bad_job(chk_a)
    chk_a.push([busy])
    wait_for(lambda: os.path.exists(gate + ".started"), what="the busy job to start on a")
    chk_a.push([bad])
    wait_for(lambda: bad.raw in r.lrange(keys.processing("a", "default"), 0, -1),
             what="the bad job to be held by a")
    # When it is killed, with its processes, and another supervisor reaps it
    b = hostile_daemons("--concurrency", "1", "--lease", "2", name="b")
    os.killpg(a.pid, signal.SIGKILL)
    a.wait(10)
    open(gate, "w").close()   # (the busy job runs again on b: let it end at once)
    chk = Checker(r, keys, [b], concurrency=1)
    wait_for(lambda: any(e.get("event") == "reaped" for e in b.events()), timeout=60,
             what="b to reap a")
    # Then b answers both, once, and lives on to serve the next job
    chk.verify([busy, bad])
    assert not r.sismember(keys.supervisors, "a")
