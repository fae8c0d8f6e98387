"""What one job leaves behind, or how oddly it is written, never costs another job or a
pool process: the real daemon (issue 12; src/redpool/leftovers.py).

A task that leaves an alarm pending, SIGPIPE at its default or the recursion limit low,
a task raising a class whose name holds unpaired surrogates, and a producer's job that
starts with a UTF-8 byte-order mark: each job gets its own answer, no process dies.
"""

from __future__ import annotations

import json

import pytest

from helpers import wait_for
from redpool import protocol as p

pytestmark = pytest.mark.daemon

HOSTILE = ("tests.taskmods.hostile",)
REPLY = "leftovers-r"


def job(task: str, id: str, *args, **fields) -> bytes:
    return json.dumps({"task": task, "id": id, "args": list(args), "reply_to": REPLY,
                       **fields}).encode()


def test_what_a_job_leaves_behind_or_how_it_is_written_costs_no_other_job(r, keys, daemons):
    # Given jobs that leave state behind, each followed by one that outlives the alarm
    jobs = []
    for kind in ("alarm", "alarm_handler", "sigpipe", "recursion", "close_stdout"):
        jobs += [job("h.leave", f"leave-{kind}", kind),
                 job("h.after", f"after-{kind}", 1.5 if "alarm" in kind else 0.0)]
    # a task raising a class named with lone surrogates, and a BOM-prefixed job
    jobs.append(job("h.surrogate_class", "odd-class", max_retries=1, retry_backoff=0.05))
    jobs.append(b"\xef\xbb\xbf" + job("h.add", "bom", 2, 3))
    for raw in jobs:
        r.lpush(keys.queue("default"), raw)
    # When one pool process (which gives up on a job after one crash) has run them all
    d = daemons("--concurrency", "1", "--max-crashes", "1", "--reply-to", REPLY,
                modules=HOSTILE)
    try:
        wait_for(lambda: r.llen(REPLY) >= len(jobs) or d.proc.poll() is not None,
                 timeout=120, what="every job answered")
        assert d.proc.poll() is None, d.log()
        # Then no process died, and each job has its own answer
        assert not [e for e in d.events() if e.get("event") in ("child_died", "job_crashed")], \
            d.log()
        by_id = {a["id"]: a for a in map(json.loads, r.lrange(REPLY, 0, -1))}
        assert len(by_id) == len(jobs)
        assert {i: a["status"] for i, a in by_id.items() if i.startswith(("leave", "after"))} \
            == {i: p.SUCCEEDED for i in by_id if i.startswith(("leave", "after"))}
        odd = by_id["odd-class"]   # failed once per attempt, its type readable
        assert (odd["status"], odd["attempts"]) == (p.FAILED, 2)
        assert odd["error"]["type"] == "mod\ufffdule.Bad\ufffdName"
        assert by_id["bom"]["result"] == 5
    finally:
        r.delete(REPLY)
