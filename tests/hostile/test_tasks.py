"""Misbehaving tasks (tests/taskmods/hostile_tasks.py), each run on one long-lived daemon and
followed by every invariant of invariants.py: whatever a task does to its own process,
its job is answered once with a reason, the pool is whole again, and the next job runs.

The daemon runs with --max-crashes 0, so a task that kills its process is failed with
WorkerCrashed at its first crash (the poison-pill path itself is test_faults.py's).
"""

from __future__ import annotations


import pytest

from hostile.invariants import Case, Checker, waiting

pytestmark = pytest.mark.daemon

WORKER_ARGS = ("--max-crashes", "0")


def job(chk, task: str, *args, label: str | None = None, **fields) -> Case:
    """A job of ``task``; keyword arguments are job fields (timeout=1)."""
    return chk.case({"task": task, "args": list(args), **fields}, label)


def failed(error_type: str | None = None, **fields):
    """The cases of a test whose one job must fail (with ``error_type``)."""
    def cases(task, *args):
        def build(chk):
            c = job(chk, task, *args, **fields)
            c.status, c.error_type = "failed", error_type
            return [c]
        return build
    return cases


# name -> (cases of one test, the task may kill its own process)
TASKS = {
    "raises an exception that cannot be printed": (
        failed("tests.taskmods.hostile_tasks.Unprintable")("h.raise_unprintable"), False),
    "raises with a lone surrogate in its message": (failed("ValueError")("h.raise_surrogate"),
                                                    False),
    "raises MemoryError": (failed("MemoryError")("h.memory_error"), False),
    "recurses without end": (failed("RecursionError")("h.recurse"), False),
    "calls sys.exit": (failed("SystemExit")("h.sys_exit"), False),
    "returns objects JSON cannot hold": (failed()("h.return_object"), False),
    "returns NaN and Infinity": (failed()("h.return_nan"), False),
    "returns lone surrogates": (lambda chk: [job(chk, "h.return_surrogate")], False),
    "returns 10 MB": (lambda chk: [job(chk, "h.return_huge", 10)], False),
    "calls os._exit": (failed("WorkerCrashed")("h.os_exit"), True),
    "SIGKILLs itself": (failed("WorkerCrashed")("h.sigkill_self"), True),
    "segfaults": (failed("WorkerCrashed")("h.segfault"), True),
    "spins past its timeout": (failed("TimeoutError", timeout=1)("h.spin"), False),
    "ignores and blocks SIGTERM, then spins past its timeout": (
        failed("TimeoutError", timeout=1)("h.ignore_sigterm_and_spin"), False),
    "changes signal handlers, then others run in its process": (
        lambda chk: [job(chk, "h.change_signals")] + [job(chk, "h.ok") for _ in range(6)]
        + [job(chk, "h.spin", timeout=1)] + [job(chk, "h.ok") for _ in range(6)], False),
    "writes 10 MB to stderr": (lambda chk: [job(chk, "h.stderr_flood", 10)], False),
    "closes stdout, then others print": (
        lambda chk: [job(chk, "h.close_stdout")] + [job(chk, "h.print") for _ in range(6)], False),
    "forks and dies, its fork living on": (failed("WorkerCrashed")("h.fork_and_die"), True),
    "forks, and both return": (lambda chk: [job(chk, "h.fork_and_return")]
                               + [job(chk, "h.ok") for _ in range(6)], False),
    "closes every fd it did not open": (lambda chk: [job(chk, "h.closerange")]
                                        + [job(chk, "h.ok") for _ in range(6)], True),
    "raises an exception class named with a lone surrogate": (
        failed()("h.raise_surrogate_class"), False),
    "leaves a recursion limit of 60 behind": (
        lambda chk: [job(chk, "h.low_recursion_limit")]
        + [job(chk, "h.echo", [[[[1]]]]) for _ in range(6)], False),
    "leaves a SIGALRM timer behind": (
        lambda chk: [job(chk, "h.leave_alarm", 1)] + [job(chk, "h.nap", 0.5) for _ in range(8)],
        False),
    "signals its supervisor with SIGTERM": (
        lambda chk: [job(chk, "h.signal_parent", "SIGTERM")], False),
    "signals its supervisor with SIGHUP (a reload)": (
        lambda chk: [job(chk, "h.signal_parent", "SIGHUP")], False),
}


# Known failures, each marked waiting("§n", why, None); none today.
XFAIL: dict = {}


@pytest.mark.parametrize("name", [pytest.param(n, marks=XFAIL.get(n, ())) for n in TASKS])
def test_task(worker, name):
    cases_of, crashes = TASKS[name]
    worker.run(cases_of, crashes=crashes)


def test_pipe_both_ways_full(hostile_daemons, r, keys):
    """Large jobs reserved ahead (prefetch) and large answers: the supervisor writing a
    batch to a child while that child writes an answer back must not block both."""
    d = hostile_daemons("--concurrency", "1", "--prefetch", "8")
    # up to 1 + 8 + 1 jobs of 0.9 MB held, and their answers: 18 MB, twice over
    chk = Checker(r, keys, [d], concurrency=1, allowance=40 * 1024 * 1024)
    big = "y" * (900 * 1024)
    chk.run([job(chk, "h.echo", big, i) for i in range(12)])


def test_result_over_max_result_size(hostile_daemons, r, keys):
    d = hostile_daemons("--concurrency", "2", "--max-result-size", "1048576")
    chk = Checker(r, keys, [d], concurrency=2)
    c = job(chk, "h.return_huge", 4)
    c.status, c.error_type = "failed", "ResultTooLarge"
    chk.run([c, job(chk, "h.return_huge", 0)])
