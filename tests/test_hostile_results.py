"""What a task returns or raises cannot crash, wedge or bloat a worker: the real daemon.

Whatever the task does (tests/taskmods/hostile.py), its job ends in one envelope of the
documented type, retries run as configured, no pool process dies, and the supervisor
never holds more than --max-result-size of one job's answer.
"""

from __future__ import annotations

import json

import pytest

from helpers import envelope, wait_for
from redpool import protocol as p

pytestmark = pytest.mark.daemon

HOSTILE = ("tests.taskmods.hostile",)
# the reply list every job here names: outside the namespace, so the operator allows it
# (--reply-to), as for any application's own list


def job(task: str, id: str, *args, **fields) -> dict:
    return {"task": task, "id": id, "args": list(args), "reply_to": "hostile-r", **fields}


def vm_hwm(pid: int) -> int:
    """The peak resident memory of a process so far, in bytes (Linux)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc/<pid>/status")


def test_every_hostile_result_or_exception_ends_in_one_envelope_and_no_crash(r, keys, daemons):
    from tests.taskmods import hostile

    # Given jobs whose tasks return or raise what cannot simply be written
    jobs = [job("h.surrogate_raise", "s-raise", max_retries=1, retry_backoff=0.05),
            job("h.surrogate_result", "s-result"),
            job("h.long_error", "long", 1_000_000)]
    jobs += [job("h.returns", f"r-{kind}", kind, max_retries=2) for kind in hostile.RESULTS]
    jobs += [job("h.raises", f"x-{kind}", kind) for kind in hostile.RAISES]
    # and a producer's 3 MB job, over the default --max-payload of 1 MiB
    jobs.append(job("h.add", "huge", "x" * 3_000_000, "y"))
    for j in jobs:
        r.lpush(keys.queue("default"), json.dumps(j))
    # When a worker has answered them all (not --burst: it may stop with a retry due)
    d = daemons("--concurrency", "2", "--reply-to", "hostile-r", modules=HOSTILE)
    try:
        wait_for(lambda: r.llen("hostile-r") >= len(jobs) or d.proc.poll() is not None,
                 timeout=120, what="every job answered")
        assert d.proc.poll() is None, d.log()
        assert r.zcard(keys.scheduled("default")) == 0 and r.llen(keys.queue("default")) == 0
        events = d.events()
        # Then no pool process died, no job crashed one
        assert not [e for e in events if e.get("event") in ("child_died", "job_crashed")], d.log()
        # and each job has exactly one answer, of the documented type
        answers = [json.loads(x) for x in r.lrange("hostile-r", 0, -1)]
        assert sorted(a["id"] for a in answers) == sorted(j["id"] for j in jobs)
        by_id = {a["id"]: a for a in answers}
        assert all(envelope(r, keys, i) == a for i, a in by_id.items())

        raised = by_id["s-raise"]   # the task's own error, after its retry
        assert (raised["status"], raised["attempts"]) == (p.FAILED, 2)
        assert raised["error"]["type"] == "ValueError"
        assert raised["error"]["message"] == "bad \ufffd text"
        assert raised["warnings"] == [
            "error: 2 unpaired UTF-16 surrogates replaced by U+FFFD (not valid Unicode)"]
        assert by_id["s-result"]["result"] == {"text": "a\ufffdb", "key\ufffd": 1,
                                               "pair": "\U0001F600"}
        assert len(by_id["long"]["error"]["message"]) <= p.MAX_ERROR_TEXT
        for kind in hostile.RESULTS:   # not retried though retries are left
            a = by_id[f"r-{kind}"]
            assert (a["error"]["type"], a["attempts"]) == (p.E_UNSERIALIZABLE_RESULT, 1), a
        types = {kind: by_id[f"x-{kind}"]["error"]["type"] for kind in hostile.RAISES}
        assert types == {
            "unprintable": "tests.taskmods.hostile.Unprintable",
            "exiting_str": "tests.taskmods.hostile.ExitingStr",
            "nowhere": "<unknown>.Nowhere",
            "fatal": "tests.taskmods.hostile.Fatal",
            "loud_del": "tests.taskmods.hostile.LoudDel",
            "bad_notes": "tests.taskmods.hostile.BadNotes",
            "anonymous": p.E_UNPRINTABLE_ERROR,
        }
        assert by_id["huge"]["error"]["type"] == p.E_PAYLOAD_TOO_LARGE
        # the dead letters: the unserialisable results, and the huge job's first 64 KiB only
        dead = {e["id"]: e for e in map(json.loads, r.lrange(keys.dead, 0, -1))}
        assert set(dead) == {f"r-{kind}" for kind in hostile.RESULTS} | {"huge"}
        assert dead["huge"]["job_size"] > 3_000_000
        assert len(json.dumps(dead["huge"])) < p.DEAD_JOB_KEPT + 2000
        assert r.llen(keys.processing("w1", "default")) == 0
    finally:
        r.delete("hostile-r")


def test_a_result_over_max_result_size_fails_and_the_supervisor_stays_small(r, keys, daemons):
    # Given a worker whose results may be 1 MiB at most
    d = daemons("--concurrency", "1", "--reply-to", "hostile-r", "--max-result-size", "1M", modules=HOSTILE).wait_started()
    try:
        r.lpush(keys.queue("default"), json.dumps(job("h.add", "warm", 1, 2)))
        assert r.brpop("hostile-r", timeout=60) is not None, d.log()
        before = vm_hwm(d.pid)
        # When a task returns 20 MB of control characters (120 MB as JSON: \u0001 each)
        size = 20_000_000
        r.lpush(keys.queue("default"), json.dumps(job("h.big", "big", size, "\x01")))
        got = r.brpop("hostile-r", timeout=120)
        assert got is not None, d.log()
        # Then its job fails with ResultTooLarge, saying what to do, dead-lettered
        env = json.loads(got[1])
        assert env["error"]["type"] == p.E_RESULT_TOO_LARGE, env
        assert "over the limit of 1048576 (--max-result-size)" in env["error"]["message"]
        assert "return a reference" in env["error"]["message"]
        assert [json.loads(e)["error_type"] for e in r.lrange(keys.dead, 0, -1)] == \
            [p.E_RESULT_TOO_LARGE]
        assert r.llen(keys.processing("w1", "default")) == 0
        # and the worker carries on: the next job runs, by the same process
        r.lpush(keys.queue("default"), json.dumps(job("h.add", "next", 2, 3)))
        nxt = r.brpop("hostile-r", timeout=60)
        assert nxt is not None and json.loads(nxt[1])["result"] == 5, d.log()
        assert d.proc.poll() is None
        assert not [e for e in d.events() if e.get("event") == "child_died"], d.log()
        # and the supervisor never held the result: its peak memory grew by less than it
        grown = vm_hwm(d.pid) - before
        assert grown < size, f"the supervisor's peak memory grew by {grown} bytes"
    finally:
        r.delete("hostile-r")
