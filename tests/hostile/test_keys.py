"""Redis keys of the wrong type (issue 12 §3): a producer, an operator or another
application makes one of the keys a worker writes hold another type (WRONGTYPE for
every command of the type the worker expects).  Whatever the key, every job is still
answered, the supervisor stays alive and serves the next job, and a key that is not
the worker's own to overwrite is left as it was.
"""

from __future__ import annotations

import pytest

from helpers import wait_for
import helpers
from hostile.invariants import Checker

pytestmark = pytest.mark.daemon

WORKER_ARGS = ("--retry-backoff", "0.01", "--retry-backoff-max", "0.05")


def job(chk, task: str, *args, **fields):
    return chk.case({"task": task, "args": list(args), **fields})


def a_string(r, key) -> None:
    r.set(key, "another application's value")


def a_hash(r, key) -> None:
    r.hset(key, "field", "another application's value")


def a_list(r, key) -> None:
    r.rpush(key, "another application's item")


def check(chk: Checker, key: bytes | str, make, cases, *, untouched: bool = True,
          crashes: bool = False) -> None:
    """Make ``key`` the wrong type, push ``cases``; each must be answered and a plain
    job must run with the key still wrong; then (the key deleted) every invariant."""
    make(chk.r, key)
    before = chk.r.dump(key)
    try:
        chk.push(cases)
        chk.wait_answered(cases, crashes=crashes)
        chk.probe()
        if untouched:
            assert chk.r.dump(key) == before, f"{key!r} was changed"
    finally:
        chk.r.delete(key)
    chk.check_workers(crashes=crashes)
    chk.check_answers(cases)


def check_held(chk: Checker, key: bytes | str, make, cases, *, event: str,
               held: tuple = (), crashes: bool = False) -> None:
    """A key of one queue's own (its schedule, a processing list, the dead-letter list),
    or a namespace-wide one that pauses reserving (the crash counts), made the wrong
    type: what needs it waits (docs/deploy.md, "Keys of the wrong type"), said once by
    ``event``, the supervisor alive, the key left as it was, and the ``held`` cases (jobs
    the supervisor holds when it finds the key: they finish and are answered) answered
    meanwhile; once the key is fixed (deleted), every job is answered and every
    invariant holds.  What else is served before the fix is not asked: it depends on
    when the key is found (a waiter already blocked in BLMOVE may bring one more job)."""
    make(chk.r, key)
    before = chk.r.dump(key)
    try:
        chk.push(cases)
        helpers.wait_for(lambda: any(e.get("event") == event for log in chk.logs
                                     for e in log.since()[0])
                         or any(d.proc.poll() is not None for d in chk.daemons),
                         timeout=60, what=event)
        assert all(d.proc.poll() is None for d in chk.daemons), chk.diagnosis()
        if held:
            chk.wait_answered(list(held), crashes=crashes)
        assert chk.r.dump(key) == before, f"{key!r} was changed"
    finally:
        chk.r.delete(key)
    chk.wait_answered(cases, crashes=crashes)
    chk.check_workers(crashes=crashes)
    chk.probe()
    chk.check_answers(cases)


def test_dead_letter_list_is_a_string(worker):
    with worker.checker() as chk:
        check_held(chk, chk.keys.dead, a_string,
                   [job(chk, "h.nope"), job(chk, "h.ok", 1), job(chk, "h.ok")],
                   event="key_unusable")


def test_crash_counts_are_a_string(worker):
    """The crash counts pause reserving on every queue once found (by counting the
    crash): the job that crashed, held, is still run to its poison-pill answer; the
    plain job runs once the key is fixed if it was not reserved before."""
    with worker.checker() as chk:
        pill = job(chk, "h.sigkill_self")
        check_held(chk, chk.keys.crashes, a_string, [pill, job(chk, "h.ok")],
                   event="key_unusable", held=(pill,), crashes=True)


def test_scheduled_set_is_a_hash(worker):
    with worker.checker() as chk:
        check_held(chk, chk.keys.scheduled("default"), a_hash,
                   [job(chk, "h.boom", max_retries=1), job(chk, "h.ok")],
                   event="queue_unusable")


def test_processing_list_is_a_string(worker):
    with worker.checker() as chk:
        check_held(chk, chk.keys.processing("hostile", "default"), a_string,
                   [job(chk, "h.ok"), job(chk, "h.echo", 1)], event="queue_unusable")


def test_a_queue_is_a_string(hostile_daemons, r, keys):
    d = hostile_daemons("--concurrency", "2", "--queue", "other", "--queue", "default")
    chk = Checker(r, keys, [d], concurrency=2)
    check(chk, keys.queue("other"), a_string, [job(chk, "h.ok"), job(chk, "h.echo", 1)])


def test_reply_to_is_a_hash(worker):
    """The reply is skipped (replies_skipped), the result key still written."""
    with worker.checker() as chk:
        c = job(chk, "h.ok")
        key, c.reply_to = c.reply_to, None
        check(chk, key, a_hash, [c, job(chk, "h.ok")])


def test_result_key_is_a_list(worker):
    """The result key is the worker's own: SET replaces whatever held it."""
    with worker.checker() as chk:
        c = job(chk, "h.ok")
        key, c.reply_to = chk.keys.result(c.id), None
        a_list(chk.r, key)
        chk.push([c])
        wait_for(lambda: chk.r.type(key) == b"string", what="the result key written")
        chk.check_workers()
        chk.probe()
        chk.check_answers([c])
