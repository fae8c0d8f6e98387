"""runner.Runner and runner.Policy without processes: one job in, one Outcome out.

What a pool child decides for a job: which delivery policy applies (job field, then
task option, then the worker's default), whether a failure is retried and after how
long (exponential backoff with full jitter), and what is written when it is not.
"""

from __future__ import annotations

import json
import math
import re
import sys
import time
from dataclasses import replace

import pytest

from redpool import protocol as p
from redpool.child import decode_done, encode_done
from redpool.registry import Registry, current_job
from redpool.runner import Outcome, Policy, Runner

WORKER = "unit-runner"
REPLY = "redpool:reply:r"  # a reply list every worker answers on
DEFAULTS = Policy(max_retries=1, retry_backoff=2.0, retry_backoff_max=10.0, timeout=30.0,
                  dead_letter=False)

registry = Registry()


@registry.task(name="tests.add")
def add(a, b):
    return a + b


@registry.task(name="tests.flaky")
def flaky():
    raise RuntimeError("flaky")


@registry.task(name="tests.careful", max_retries=3, timeout=7.5, retry_backoff=0.5,
               retry_backoff_max=3.0, dead_letter=True)
def careful():
    raise ValueError("careful")


@registry.task(name="tests.never_again", max_retries=0)
def never_again():
    raise RuntimeError("never again")


@registry.task(name="tests.who")
def who():
    info = current_job()
    return {"id": info.id, "task": info.task, "queue": info.queue, "attempt": info.attempt,
            "worker": info.worker, "crashes": info.crashes}


@registry.task(name="tests.unserialisable")
def unserialisable():
    return {"a set": {1, 2}}


@registry.task(name="tests.flaky_args")
def flaky_args(*args):
    raise RuntimeError("flaky")


@registry.task(name="tests.exits")
def exits():
    sys.exit(3)


def raw_job(task: str, *, id: str | None = "job-1", attempt: int = 1, args=(), **fields) -> bytes:
    job = p.make_job(task, list(args), id=id or "x", now=1700000000.0, **fields)
    if id is None:
        del job["id"]
    if attempt != 1:
        job["attempt"] = attempt
    return p.encode_job(job)


@pytest.fixture
def runner() -> Runner:
    return Runner(registry, WORKER, p.DEFAULT_MAX_PAYLOAD, defaults=DEFAULTS)


def env_of(out: Outcome) -> dict:
    return p.loads(out.envelope)


# -- the policy -------------------------------------------------------------------------------

def test_defaults_apply_when_neither_job_nor_task_says(runner):
    _, _, policy = runner.prepare(raw_job("tests.flaky"))
    assert policy == DEFAULTS


def test_task_options_override_the_defaults(runner):
    _, _, policy = runner.prepare(raw_job("tests.careful"))
    assert policy == Policy(max_retries=3, retry_backoff=0.5, retry_backoff_max=3.0,
                            timeout=7.5, dead_letter=True)


def test_job_fields_override_task_options(runner):
    raw = raw_job("tests.careful", max_retries=5, timeout=2.0, retry_backoff=4.0,
                  retry_backoff_max=60.0, dead_letter=False)
    _, _, policy = runner.prepare(raw)
    assert policy == Policy(max_retries=5, retry_backoff=4.0, retry_backoff_max=60.0,
                            timeout=2.0, dead_letter=False)


def test_falsy_values_still_override(runner):
    # a job's max_retries 0 / dead_letter false beats the task's 3 / true, and a task's
    # max_retries 0 beats the worker's default 1: "not set" is None, not falsy
    _, _, policy = runner.prepare(raw_job("tests.careful", max_retries=0, dead_letter=False))
    assert (policy.max_retries, policy.dead_letter, policy.timeout) == (0, False, 7.5)
    _, _, policy = runner.prepare(raw_job("tests.never_again"))
    assert policy.max_retries == 0 and policy.timeout == DEFAULTS.timeout


def test_fields_are_resolved_one_by_one(runner):
    # the job sets one field; the others still come from the task, then the defaults
    _, _, policy = runner.prepare(raw_job("tests.careful", timeout=1.0))
    assert policy == Policy(max_retries=3, retry_backoff=0.5, retry_backoff_max=3.0,
                            timeout=1.0, dead_letter=True)
    _, _, policy = runner.prepare(raw_job("tests.flaky", retry_backoff=9.0))
    assert policy == Policy(max_retries=1, retry_backoff=9.0, retry_backoff_max=10.0,
                            timeout=30.0, dead_letter=False)


def test_on_start_gets_the_effective_timeout(runner):
    seen = []
    runner.run("q", raw_job("tests.add", args=[1, 2]), on_start=seen.append)
    runner.run("q", raw_job("tests.careful"), on_start=seen.append)
    runner.run("q", raw_job("tests.careful", timeout=2.0), on_start=seen.append)
    assert seen == [30.0, 7.5, 2.0]


@pytest.mark.parametrize("reply_to", ["redpool:queue:default", "redpool:queue:{default}",
                                      "{redpool}:supervisors", "redpool:dead"])
def test_a_reply_to_naming_one_of_our_own_keys_fails_the_job(runner, reply_to):
    out = runner.run("q", raw_job("tests.add", args=(1, 2), reply_to=reply_to))
    assert out.meta["error_type"] == p.E_INVALID_JOB
    assert "one of redpool's own keys" in env_of(out)["error"]["message"]
    assert out.meta["reply_to"] is None and out.dead is not None  # result key and dead letter


@pytest.mark.parametrize("reply_to", ["myapp:replies", "otherns:queue:default", "{myapp}:r",
                                      "redpoolx:reply:1"])
def test_a_reply_to_outside_the_allowed_keys_fails_the_job_answered_by_its_result_key(
        runner, reply_to):
    # Given a job naming another application's list (or another namespace's queue)
    out = runner.run("q", raw_job("tests.add", args=(1, 2), reply_to=reply_to))
    # Then it is refused without running, with a reason naming the key, what is
    # allowed and how to allow more
    env = env_of(out)
    assert env["error"]["type"] == p.E_INVALID_JOB and env["started_at"] is None
    message = env["error"]["message"]
    assert f"'reply_to' {reply_to!r} is not a key this worker answers on" in message
    assert "allowed: redpool:reply:*)" in message and "--reply-to '" in message
    # answered through its result key only (the supervisor pushes nothing), dead-lettered
    assert out.meta["result_id"] == "job-1" and out.meta["reply_to"] is None
    assert p.loads(out.dead)["reason"] == message


def test_the_refusal_suggests_a_pattern_for_the_key_family():
    r = Runner(registry, WORKER, p.DEFAULT_MAX_PAYLOAD, defaults=Policy(reply_patterns=("a:*",)))
    message = env_of(r.run("q", raw_job("tests.add", args=(1, 2), reply_to="myapp:replies:42"))
                     )["error"]["message"]
    assert "(allowed: redpool:reply:*, a:*)" in message
    assert "start the workers with --reply-to 'myapp:replies:*'" in message


@pytest.mark.parametrize("reply_to", ["redpool:reply:c1", "myapp:replies:7", "{myapp}:r",
                                      "legacy-replies"])
def test_a_reply_to_under_reply_or_matching_an_operator_pattern_is_fine(reply_to):
    policy = Policy(reply_patterns=("myapp:replies:*", "{myapp}:?", "legacy-replies"))
    r = Runner(registry, WORKER, p.DEFAULT_MAX_PAYLOAD, defaults=policy)
    out = r.run("q", raw_job("tests.add", args=(1, 2), reply_to=reply_to))
    assert out.meta["error_type"] is None and out.meta["reply_to"] == reply_to


def test_no_pattern_opens_the_namespace():
    # a pattern wide enough to match them (the operator's choice) still leaves our
    # own keys refused, one by one
    r = Runner(registry, WORKER, p.DEFAULT_MAX_PAYLOAD, defaults=Policy(reply_patterns=("*",)))
    assert r.run("q", raw_job("tests.add", args=(1, 2), reply_to="any:list")).meta["error_type"] is None
    out = r.run("q", raw_job("tests.add", args=(1, 2), reply_to="redpool:queue:default"))
    assert out.meta["error_type"] == p.E_INVALID_JOB and out.meta["reply_to"] is None


def test_a_bad_job_is_not_answered_on_a_reply_to_that_is_not_allowed(runner):
    # Given a job refused before its reply_to is looked at (it has no task), whose
    # reply_to is another app's list
    out = runner.run("q", b'{"id":"j","reply_to":"myapp:replies"}')
    # Then it says what was wrong with it, on its result key only
    assert "no 'task' field" in env_of(out)["error"]["message"]
    assert out.meta["reply_to"] is None and out.meta["result_id"] == "j"


def test_a_stopped_job_is_not_answered_on_a_reply_to_this_worker_does_not_allow(runner):
    # Given a job another worker (one allowing its reply_to) ran, stopped here
    raw = raw_job("tests.add", args=[1, 2], reply_to="myapp:replies")
    out = runner.fail("q", raw, 4, p.E_WORKER_CRASHED, "died 4 times", retry=False, dead=True)
    # Then the verdict stands, answered through its result key only
    assert env_of(out)["error"]["type"] == p.E_WORKER_CRASHED
    assert out.meta["reply_to"] is None and out.meta["result_id"] == "job-1"


def test_on_start_is_not_called_for_a_job_that_cannot_run(runner):
    seen = []
    out = runner.run("q", raw_job("no.such.task"), on_start=seen.append)
    assert seen == [] and out.meta["error_type"] == p.E_UNKNOWN_TASK


# -- success ----------------------------------------------------------------------------------

def test_a_succeeding_task_answers_with_its_result(runner):
    out = runner.run("q", raw_job("tests.add", args=[2, 3], reply_to=REPLY))
    env = env_of(out)
    assert (env["status"], env["result"], env["id"], env["queue"], env["worker"]) == \
        (p.SUCCEEDED, 5, "job-1", "q", WORKER)
    assert env["attempts"] == 1
    assert out.dead is None and out.retry is None
    assert out.meta["status"] == p.SUCCEEDED and out.meta["result_id"] == "job-1"
    assert out.meta["reply_to"] == REPLY


def test_current_job_shows_the_running_job(runner):
    out = runner.run("emails", raw_job("tests.who", attempt=3), crashes=2)
    assert env_of(out)["result"] == {"id": "job-1", "task": "tests.who", "queue": "emails",
                                     "attempt": 3, "worker": WORKER, "crashes": 2}
    assert current_job() is None   # and only while it runs


def test_envelope_attempts_count_retries_and_crashes(runner):
    out = runner.run("q", raw_job("tests.add", args=[1, 1], attempt=2), crashes=3)
    assert env_of(out)["attempts"] == 5
    out = runner.run("q", raw_job("tests.never_again", attempt=1), crashes=1)
    assert env_of(out)["attempts"] == 2


def test_a_refused_job_counts_its_attempts_as_any_other(runner):
    # attempt 2 of a job whose task a reload took away between attempts (UnknownTask),
    # once crashed on that attempt: handed to a pool process three times in all
    out = runner.run("q", raw_job("tests.removed", attempt=2), crashes=1)
    env = env_of(out)
    assert env["error"]["type"] == p.E_UNKNOWN_TASK and env["attempts"] == 3
    # arguments that no longer bind (InvalidJob), on a retry
    out = runner.run("q", raw_job("tests.add", attempt=4, args=[1]))
    assert env_of(out)["error"]["type"] == p.E_INVALID_JOB and env_of(out)["attempts"] == 4
    # a bad field on a retry: the attempt number still reads
    bad = p.encode_job({"task": "tests.add", "id": "job-1", "args": [1, 2], "attempt": 3,
                        "result_ttl": -1})
    assert env_of(runner.run("q", bad))["attempts"] == 3
    # a first attempt, or one whose attempt field is itself wrong: 1 plus its crashes
    assert env_of(runner.run("q", raw_job("tests.removed")))["attempts"] == 1
    bad = p.encode_job({"task": "tests.add", "id": "job-1", "attempt": 0})
    assert env_of(runner.run("q", bad, crashes=2))["attempts"] == 3
    # a stopped job failed for its supervisor after its task went away
    out = runner.fail("q", raw_job("tests.removed", attempt=2), 1, "TimeoutError", "late",
                      retry=True, dead=False, started_at=1700000000.0)
    assert env_of(out)["attempts"] == 3


def test_an_unserialisable_result_is_dead_lettered_without_retry(runner):
    # retries are left (max_retries 1 by default), but running it again cannot help
    out = runner.run("q", raw_job("tests.unserialisable"))
    assert out.retry is None
    assert out.meta["status"] == p.FAILED
    assert out.meta["error_type"] == p.E_UNSERIALIZABLE_RESULT
    env = env_of(out)
    assert env["error"]["type"] == p.E_UNSERIALIZABLE_RESULT
    assert "not JSON-serialisable" in env["error"]["message"]
    dead = p.loads(out.dead)
    assert dead["error_type"] == p.E_UNSERIALIZABLE_RESULT and dead["id"] == "job-1"
    assert "not JSON-serialisable" in dead["reason"]


# -- retries ----------------------------------------------------------------------------------

def test_a_raising_task_with_retries_left_is_retried(runner):
    raw = raw_job("tests.flaky", reply_to=REPLY, result_ttl=60, kwargs={})
    out = runner.run("q", raw)

    assert out.meta["status"] == "retrying"
    assert out.meta["error_type"] == "RuntimeError"
    assert (out.meta["id"], out.meta["result_id"], out.meta["reply_to"], out.meta["ttl"]) == \
        ("job-1", "job-1", REPLY, 60)
    # nothing is answered yet, nothing dead-lettered: only the next attempt
    assert out.envelope is None and out.dead is None
    nxt = p.loads(out.retry)
    original = p.loads(raw)
    assert nxt == {**original, "attempt": 2}
    assert 0 <= out.meta["retry_delay"] <= min(DEFAULTS.retry_backoff_max, DEFAULTS.retry_backoff)


def test_a_worker_assigned_id_is_kept_across_attempts(runner):
    out = runner.run("q", raw_job("tests.careful", id=None))
    assert out.meta["status"] == "retrying"
    assigned = out.meta["id"]
    assert out.meta["result_id"] is None    # the producer cannot know it
    nxt = p.decode_job(out.retry)
    assert nxt.id == assigned and nxt.attempt == 2

    again = runner.run("q", out.retry)
    assert again.meta["id"] == assigned
    assert p.decode_job(again.retry).id == assigned and p.decode_job(again.retry).attempt == 3


def test_retry_delay_is_full_jitter_below_the_exponential_bound(runner):
    # careful: base 0.5, cap 3.0.  Attempt 3 may wait up to 0.5 * 2**2 = 2.0 s
    raw = raw_job("tests.careful", attempt=3)
    delays = [runner.run("q", raw).meta["retry_delay"] for _ in range(400)]
    assert all(0.0 <= d <= 2.0 for d in delays)
    # full jitter: spread over the whole range, not a constant or a narrow band
    assert min(delays) < 0.2 and max(delays) > 1.8
    assert len(set(delays)) > 350
    assert 0.8 < sum(delays) / len(delays) < 1.2


@pytest.mark.parametrize("attempt, bound", [(1, 0.5), (2, 1.0), (3, 2.0), (4, 3.0), (9, 3.0)])
def test_the_backoff_bound_doubles_per_attempt_up_to_the_cap(attempt, bound):
    policy = Policy(retry_backoff=0.5, retry_backoff_max=3.0)
    delays = [policy.backoff(attempt) for _ in range(500)]
    assert all(0.0 <= d <= bound for d in delays)
    assert max(delays) > bound * 0.9 and min(delays) < bound * 0.1


def test_the_last_attempt_fails_with_the_error(runner):
    # max_retries 1 (the default): attempt 2 is the last
    out = runner.run("q", raw_job("tests.flaky", attempt=2, reply_to=REPLY))
    assert out.retry is None
    assert out.meta["status"] == p.FAILED
    env = env_of(out)
    assert env["status"] == p.FAILED and env["attempts"] == 2
    assert env["error"]["type"] == "RuntimeError" and env["error"]["message"] == "flaky"
    assert "raise RuntimeError(\"flaky\")" in env["error"]["traceback"]
    assert out.dead is None   # dead_letter is off


def test_the_last_attempt_is_dead_lettered_when_the_task_says_so(runner):
    out = runner.run("q", raw_job("tests.careful", attempt=4))
    assert out.retry is None and env_of(out)["error"]["type"] == "ValueError"
    dead = p.loads(out.dead)
    assert dead["reason"] == "failed after 4 attempt(s): ValueError: careful"
    assert dead["error_type"] == "ValueError" and dead["id"] == "job-1"
    assert p.loads(dead["job"])["attempt"] == 4


def test_the_last_attempt_is_dead_lettered_when_the_job_says_so(runner):
    out = runner.run("q", raw_job("tests.flaky", attempt=2, dead_letter=True))
    assert p.loads(out.dead)["reason"] == "failed after 2 attempt(s): RuntimeError: flaky"
    out = runner.run("q", raw_job("tests.careful", attempt=4, dead_letter=False))
    assert out.dead is None


def test_a_task_calling_sys_exit_fails_its_job(runner):
    out = runner.run("q", raw_job("tests.exits", max_retries=0))
    assert env_of(out)["error"]["type"] == "SystemExit"


# -- fail(): jobs the supervisor had to stop --------------------------------------------------

def test_a_timeout_is_retried_per_policy(runner):
    raw = raw_job("tests.add", args=[1, 2])
    out = runner.fail("q", raw, 0, "TimeoutError", "ran past its timeout of 30 s",
                      retry=True, dead=False)
    assert out.meta["status"] == "retrying" and out.meta["error_type"] == "TimeoutError"
    assert p.decode_job(out.retry).attempt == 2
    assert 0 <= out.meta["retry_delay"] <= DEFAULTS.retry_backoff

    last = runner.fail("q", out.retry, 0,
                       "TimeoutError", "ran past its timeout of 30 s", retry=True, dead=False)
    assert last.retry is None and last.dead is None
    env = env_of(last)
    assert env["error"] == {"type": "TimeoutError", "message": "ran past its timeout of 30 s",
                            "traceback": None}
    assert env["attempts"] == 2


def test_a_poison_pill_is_dead_lettered_with_the_message_as_reason(runner):
    # retries are left, but a job that kills its process is not run again
    raw = raw_job("tests.careful", reply_to=REPLY)
    why = "the pool process died running it 4 times (--max-crashes 3)"
    out = runner.fail("q", raw, 4, p.E_WORKER_CRASHED, why, retry=False, dead=True)
    assert out.retry is None
    assert out.meta["status"] == p.FAILED and out.meta["error_type"] == p.E_WORKER_CRASHED
    dead = p.loads(out.dead)
    assert dead["reason"] == why and dead["error_type"] == p.E_WORKER_CRASHED
    env = env_of(out)
    assert env["error"]["type"] == p.E_WORKER_CRASHED and env["error"]["message"] == why
    assert env["attempts"] == 1 + 4


def test_fail_of_a_job_that_cannot_be_read_dead_letters_it(runner):
    out = runner.fail("q", b"\xff not json", 1, "TimeoutError", "x", retry=True, dead=False)
    assert out.retry is None and out.dead is not None
    assert p.loads(out.dead)["error_type"] == p.E_INVALID_JOB


# -- what goes over the pipe ------------------------------------------------------------------

def test_outcomes_round_trip_through_the_done_message(runner):
    out = runner.run("q", raw_job("tests.flaky"))
    meta, env, dead, retry = decode_done(encode_done(77, out))
    assert meta["t"] == 77 and meta["status"] == "retrying"
    assert meta["retry_delay"] == out.meta["retry_delay"]
    assert (env, dead, retry) == (None, None, out.retry)

    out = runner.run("q", raw_job("tests.careful", attempt=4))
    meta, env, dead, retry = decode_done(encode_done(78, out))
    assert (env, dead, retry) == (out.envelope, out.dead, None)


# -- unknown tasks: what the producer probably meant ----------------------------------------------

def test_an_unknown_task_suggests_the_closest_registered_name():
    reg = Registry()
    for name in ("myapp.tasks.send", "myapp.tasks.sendmail", "myapp.tasks.resize",
                 "myapp.billing.charge"):
        reg.task(name=name)(lambda: None)
    r = Runner(reg, WORKER, p.DEFAULT_MAX_PAYLOAD)
    out = r.run("default", raw_job("myapp.tasks.sned", reply_to=REPLY))
    env = env_of(out)
    assert env["error"]["type"] == p.E_UNKNOWN_TASK
    assert env["error"]["message"].startswith(
        "unknown task 'myapp.tasks.sned' (did you mean 'myapp.tasks.send'?; registered: "
        "myapp.billing.charge, myapp.tasks.resize, myapp.tasks.send, myapp.tasks.sendmail)")
    assert p.loads(out.dead)["reason"] == env["error"]["message"]


@pytest.mark.parametrize("name, meant", [
    ("myapp.tasks.sned", ["myapp.tasks.send"]),              # a typo
    ("myapp.task.send", ["myapp.tasks.send"]),               # in the module part
    ("send", ["myapp.tasks.send"]),                          # without its module
    ("myapp.tasks.charge", ["myapp.billing.charge"]),        # in another module
    ("t.ad", ["t.add"]),
    ("no.such.thing", []),                                   # nothing close: no guess
    ("myapp.tasks.report", []),                              # a prefix in common is not enough
])
def test_suggestions_are_the_names_meant_not_every_name_alike(name, meant):
    from redpool.runner import suggest

    names = ("myapp.billing.charge", "myapp.tasks.resize", "myapp.tasks.send",
             "myapp.tasks.sendmail", "t.add", "t.pid")
    assert suggest(name, names) == meant


def test_several_equally_close_names_are_all_suggested():
    from redpool.runner import suggest

    assert suggest("app.a.run", ("app.b.run", "app.c.run", "app.other")) == ["app.b.run", "app.c.run"]
    r = Runner(Registry(), WORKER, p.DEFAULT_MAX_PAYLOAD)
    msg = env_of(r.run("default", raw_job("x.y", reply_to=REPLY)))["error"]["message"]
    assert msg.startswith("unknown task 'x.y' (registered: none); check the name")


# -- what the job_finished event says (the outcome's meta) ------------------------------------------

def test_the_meta_of_a_failure_carries_its_message_cut_for_a_log_line(runner):
    assert "error" not in runner.run("q", raw_job("tests.add", args=[1, 2])).meta
    retrying = runner.run("q", raw_job("tests.flaky"))
    assert retrying.meta["status"] == "retrying" and retrying.meta["error"] == "flaky"
    failed = runner.run("q", raw_job("tests.flaky", attempt=2))
    assert failed.meta["status"] == p.FAILED and failed.meta["error"] == "flaky"
    bad = runner.run("q", raw_job("tests.add", args=[1]))
    assert bad.meta["error_type"] == p.E_INVALID_JOB and "do not match" in bad.meta["error"]
    long = runner.fail("q", raw_job("tests.add", args=[1, 2], max_retries=0), 0, "TimeoutError",
                       "x" * 5000, retry=True, dead=False)
    assert len(long.meta["error"]) == 300 and long.meta["error"].endswith("…")
    assert env_of(long)["error"]["message"] == "x" * 5000   # the envelope keeps it whole


# -- started_at: when the task started, null exactly when it never did ---------------------------

@registry.task(name="tests.sleepy")
def sleepy():
    return "rested"


def test_started_at_is_when_the_task_started_for_every_job_that_ran(runner):
    import time as _t

    from test_protocol import ENVELOPE

    for raw, status, kind in [
            (raw_job("tests.sleepy", reply_to=REPLY), p.SUCCEEDED, None),
            (raw_job("tests.flaky", attempt=2, reply_to=REPLY), p.FAILED, "RuntimeError"),
            (raw_job("tests.unserialisable", reply_to=REPLY), p.FAILED, p.E_UNSERIALIZABLE_RESULT),
            (raw_job("tests.exits", max_retries=0), p.FAILED, "SystemExit")]:
        before = _t.time()
        out = runner.run("q", raw)
        after = _t.time()
        env = env_of(out)
        ENVELOPE.validate(env)
        assert env["status"] == status and (env.get("error") or {}).get("type") == kind
        assert before <= env["started_at"] <= env["finished_at"] <= after, env


@pytest.mark.parametrize("raw, kind", [
    (raw_job("tests.add", args=[1], reply_to=REPLY), p.E_INVALID_JOB),        # arguments
    (raw_job("tests.nope", reply_to=REPLY), p.E_UNKNOWN_TASK),
    (raw_job("tests.add", args=["x" * 2000, "y"], reply_to=REPLY), p.E_PAYLOAD_TOO_LARGE),
    (b'{"task":"tests.add","id":"j","reply_to":"redpool:reply:r","v":99}', p.E_INVALID_JOB),  # too new
    (b'{"id":"j","reply_to":"redpool:reply:r"}', p.E_INVALID_JOB),                          # no task
])
def test_started_at_is_null_for_a_job_that_never_ran(raw, kind):
    from test_protocol import ENVELOPE

    runner = Runner(registry, WORKER, 1024, defaults=DEFAULTS)
    env = env_of(runner.run("q", raw))
    ENVELOPE.validate(env)
    assert env["error"]["type"] == kind and env["started_at"] is None


def test_a_job_stopped_by_the_supervisor_says_when_its_run_started_and_how_long_it_ran(runner):
    from test_protocol import ENVELOPE

    # a timeout, on the last attempt: the start of the attempt that timed out
    out = runner.fail("q", raw_job("tests.add", args=[1, 2], attempt=2, reply_to=REPLY), 0,
                      p.E_TIMEOUT, "ran past its timeout of 30 s", retry=True, dead=False,
                      started_at=1700000123.5, ran=30.25)
    env = env_of(out)
    ENVELOPE.validate(env)
    assert env["started_at"] == 1700000123.5 and env["error"]["type"] == p.E_TIMEOUT
    assert out.meta["duration"] == 30.25      # the event's duration is the run's, not ~0
    # retried: no envelope, but the event's duration is the run's all the same
    out = runner.fail("q", raw_job("tests.add", args=[1, 2]), 0, p.E_TIMEOUT, "late",
                      retry=True, dead=False, started_at=1700000123.5, ran=30.25)
    assert out.meta["status"] == "retrying" and out.meta["duration"] == 30.25
    # a poison pill: the start of its last crashed run
    out = runner.fail("q", raw_job("tests.add", args=[1, 2], reply_to=REPLY), 4,
                      p.E_WORKER_CRASHED, "died 4 times", retry=False, dead=True,
                      started_at=1700000000.25)
    env = env_of(out)
    ENVELOPE.validate(env)
    assert env["started_at"] == 1700000000.25 and env["attempts"] == 5


def test_a_stopped_job_whose_task_is_gone_since_keeps_its_verdict(runner):
    # It ran, then a reload took its task away before the failure was settled: it is
    # still the timeout that failed it, and it still started
    out = runner.fail("q", raw_job("tests.removed", reply_to=REPLY), 0, p.E_TIMEOUT,
                      "ran past its timeout of 30 s", retry=False, dead=False,
                      started_at=1700000123.5, ran=31.0)
    env = env_of(out)
    assert env["error"]["type"] == p.E_TIMEOUT and env["started_at"] == 1700000123.5
    assert out.dead is None


def test_a_refused_job_that_ran_before_never_says_it_never_started(runner):
    # started_at null tells a producer "no run ever started: safe to send again".  A
    # retry refused after a reload took its task away, or a job refused after crashed
    # runs, did run: it says when, at the latest (its refusal)
    before = time.time()
    for out in (runner.run("q", raw_job("tests.removed", attempt=2)),
                runner.run("q", raw_job("tests.add", args=[1]), crashes=1),
                runner.run("q", p.encode_job({"task": "tests.add", "id": "job-1",
                                              "attempt": 3, "result_ttl": -1}))):
        env = env_of(out)
        assert env["status"] == p.FAILED and env["attempts"] > 1
        assert before <= env["started_at"] <= env["finished_at"]
    # a first attempt refused: never ran
    assert env_of(runner.run("q", raw_job("tests.removed")))["started_at"] is None


# -- whatever a task returns or raises: one outcome, never the process's death -----------------
# (the hostile values themselves live in tests/taskmods/hostile.py, which the real-process
# tests run too)

from taskmods import hostile  # noqa: E402

hostile_registry = Registry()
for _name in ("surrogate_raise", "surrogate_result", "returns", "raises", "big", "long_error",
              "surrogate_class"):
    hostile_registry.task(name=f"h.{_name}")(getattr(hostile, _name))


@hostile_registry.task(name="h.coroutine")
async def coroutine():
    return 1


@pytest.fixture
def hrunner() -> Runner:
    return Runner(hostile_registry, WORKER, p.DEFAULT_MAX_PAYLOAD, defaults=DEFAULTS,
                  max_result_size=64 * 1024)


def valid_envelope(out: Outcome) -> dict:
    """The envelope as any reader sees it: UTF-8, strict JSON, the schema's shape."""
    from test_protocol import ENVELOPE, strict_json

    env = strict_json(out.envelope)   # (decodes UTF-8 strictly, refuses NaN)
    ENVELOPE.validate(env)
    # and it crosses the pipe to the supervisor
    assert decode_done(encode_done(1, out))[1] == out.envelope
    return env


def test_a_lone_surrogate_in_an_exception_message_fails_the_job_with_its_own_error(hrunner):
    # Given a task raising ValueError("bad \ud800 text"), on its last attempt
    out = hrunner.run("q", raw_job("h.surrogate_raise", attempt=2, dead_letter=True))
    # Then one failed envelope, with the task's own error, the surrogate replaced
    env = valid_envelope(out)
    assert env["error"]["type"] == "ValueError" and env["error"]["message"] == "bad \ufffd text"
    assert env["warnings"] == [
        "error: 2 unpaired UTF-16 surrogates replaced by U+FFFD (not valid Unicode)"]
    dead = p.loads(out.dead)
    assert dead["reason"] == "failed after 2 attempt(s): ValueError: bad \ufffd text"
    assert dead["warnings"] == [
        "reason: 1 unpaired UTF-16 surrogate replaced by U+FFFD (not valid Unicode)"]
    assert out.meta["error"] == "bad \ud800 text"   # (replaced when the meta is written)
    meta = decode_done(encode_done(1, out))[0]
    assert meta["error"] == "bad \ufffd text" and meta["error_type"] == "ValueError"


def test_a_lone_surrogate_in_an_exception_message_is_retried_as_configured(hrunner):
    out = hrunner.run("q", raw_job("h.surrogate_raise"))   # max_retries 1: attempt 1 of 2
    meta, env, _, retry = decode_done(encode_done(1, out))  # (what the child sends)
    assert meta["status"] == "retrying" and meta["error"] == "bad \ufffd text" and env is None
    assert p.decode_job(retry).attempt == 2


def test_lone_surrogates_in_a_result_are_replaced_and_said(hrunner):
    out = hrunner.run("q", raw_job("h.surrogate_result"))
    env = valid_envelope(out)
    assert env["status"] == p.SUCCEEDED
    # a lone one, in a value and in a key, is replaced; a well-formed pair is joined
    assert env["result"] == {"text": "a\ufffdb", "key\ufffd": 1, "pair": "\U0001F600"}
    assert env["warnings"] == [
        "result: 2 unpaired UTF-16 surrogates replaced by U+FFFD (not valid Unicode)"]


@pytest.mark.parametrize("kind, says", [
    ("set", "Object of type set is not JSON serializable"),
    ("bad_repr", "Object of type BadRepr is not JSON serializable"),
    ("nan", "NaN or an infinity"),
    ("inf", "NaN or an infinity"),
    ("deep", "nested too deeply"),
    ("tuple_key", "keys must be str, int, float, bool or None, not tuple"),
    ("generator", "a generator: return a list"),
    ("bad_items", "SystemExit was raised encoding it: items() exits"),
])
def test_every_result_json_cannot_hold_fails_once_unserialisable(hrunner, kind, says):
    # retries are left (max_retries 1), but running it again cannot help
    out = hrunner.run("q", raw_job("h.returns", args=[kind]))
    env = valid_envelope(out)
    assert env["error"]["type"] == p.E_UNSERIALIZABLE_RESULT and out.retry is None
    assert says in env["error"]["message"], env["error"]["message"]
    assert p.loads(out.dead)["error_type"] == p.E_UNSERIALIZABLE_RESULT


def test_an_async_task_is_told_it_returned_a_coroutine(hrunner):
    env = valid_envelope(hrunner.run("q", raw_job("h.coroutine")))
    assert "a coroutine: tasks are plain functions" in env["error"]["message"]


@pytest.mark.parametrize("char, size", [
    ("x", r"its envelope is 70\d{3} bytes of JSON"),
    ("\x01", r"its envelope is 420\d{3} bytes of JSON"),         # \u0001: 6 bytes each
    ("\u00e9", r"its envelope is at least 70\d{3} bytes of JSON"),  # found before encoding
])
def test_a_result_over_max_result_size_fails_once_too_large(hrunner, char, size):
    # Given a limit of 64 KiB and a task returning 70000 characters
    out = hrunner.run("q", raw_job("h.big", args=[70000, char], reply_to="redpool:reply:r"))
    env = valid_envelope(out)
    # Then it fails with ResultTooLarge, dead-lettered, not retried though retries are left
    assert env["error"]["type"] == p.E_RESULT_TOO_LARGE and out.retry is None
    message = env["error"]["message"]
    assert re.search(size, message) and "over the limit of 65536 (--max-result-size)" in message
    assert "store large data elsewhere" in message and "return a reference" in message
    assert p.loads(out.dead)["error_type"] == p.E_RESULT_TOO_LARGE
    assert len(out.envelope) < 2000 and len(out.dead) < 2000   # what the supervisor gets
    # and one just under the limit is written
    under = hrunner.run("q", raw_job("h.big", args=[64 * 1024 - 400]))
    assert valid_envelope(under)["status"] == p.SUCCEEDED and len(under.envelope) <= 64 * 1024


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # (loud_del)
@pytest.mark.parametrize("kind, error_type, message", [
    ("unprintable", "taskmods.hostile.Unprintable",
     "<the exception's message could not be read: str() raised RuntimeError>"),
    ("exiting_str", "taskmods.hostile.ExitingStr",
     "<the exception's message could not be read: str() raised SystemExit>"),
    ("nowhere", "<unknown>.Nowhere", "boom"),
    ("fatal", "taskmods.hostile.Fatal", "boom"),
    ("loud_del", "taskmods.hostile.LoudDel", "boom"),
    ("bad_notes", "taskmods.hostile.BadNotes", "boom"),
    ("anonymous", p.E_UNPRINTABLE_ERROR, "boom"),
])
def test_every_exception_a_task_raises_fails_its_job_by_its_own_type(hrunner, kind, error_type,
                                                                     message):
    # last attempt: the envelope; with retries left it is retried (the task's own error)
    out = hrunner.run("q", raw_job("h.raises", args=[kind], attempt=2))
    env = valid_envelope(out)
    assert (env["error"]["type"], env["error"]["message"]) == (error_type, message)
    assert isinstance(env["error"]["traceback"], str)
    again = hrunner.run("q", raw_job("h.raises", args=[kind]))
    assert again.meta["status"] == "retrying" and again.meta["error_type"] == error_type


def test_a_traceback_that_cannot_be_formatted_is_said_so(hrunner):
    out = hrunner.run("q", raw_job("h.raises", args=["bad_notes"], attempt=2))
    assert valid_envelope(out)["error"]["traceback"] == (
        "<the traceback of taskmods.hostile.BadNotes could not be formatted: "
        "RuntimeError was raised formatting it>")


def test_error_types_of_classes_with_odd_names_are_still_strings():
    from redpool.runner import MAX_TYPE, error_type_of

    class Long(Exception):
        pass
    Long.__qualname__ = "L" * 10_000

    class Modular(Exception):
        pass
    Modular.__module__ = 42

    assert error_type_of(hostile.Anonymous()) == p.E_UNPRINTABLE_ERROR
    assert len(error_type_of(Long())) == MAX_TYPE
    assert error_type_of(Modular()) == "<unknown>.test_error_types_of_classes_with_odd_names_are_still_strings.<locals>.Modular"


def test_error_message_and_traceback_are_cut_so_a_failed_envelope_stays_small(hrunner):
    out = hrunner.run("q", raw_job("h.long_error", args=[1_000_000], attempt=2,
                                   dead_letter=True))
    env = valid_envelope(out)
    message, tb = env["error"]["message"], env["error"]["traceback"]
    assert len(message) <= p.MAX_ERROR_TEXT and len(tb) <= p.MAX_ERROR_TEXT
    assert message.startswith("eee") and message.endswith("eee") and "characters cut" in message
    assert tb.startswith("Traceback") and tb.rstrip().endswith("eee")
    said, tb_said = env["warnings"]
    assert said == (f"error message cut from 1000000 to {len(message)} characters (over the "
                    f"worker's limit of {p.MAX_ERROR_TEXT} for error text)")
    assert re.fullmatch(rf"traceback cut from 1000\d{{3}} to {len(tb)} characters .*", tb_said)
    assert len(out.envelope) < 3 * p.MAX_ERROR_TEXT and len(out.dead) < 2 * p.MAX_ERROR_TEXT
    assert p.loads(out.dead)["warnings"] == env["warnings"][:1]


def test_a_huge_attempt_number_backs_off_at_the_cap_rather_than_overflow(runner):
    assert 0 <= Policy(retry_backoff=2.0, retry_backoff_max=10.0).backoff(5000) <= 10.0
    out = runner.run("q", raw_job("tests.flaky", attempt=5000, max_retries=10_000))
    assert out.meta["status"] == "retrying" and 0 <= out.meta["retry_delay"] <= 10.0


@pytest.mark.parametrize("args", [b'["\\ud800"]', b'[1, "\\udc00x"]'])
def test_a_retry_is_the_same_job_even_when_it_holds_what_strict_json_refuses(runner, args):
    # json.loads reads a lone surrogate's escape; the retry writes it as read (NaN and
    # Infinity, which json.loads also reads, are refused before: strictjson.py)
    raw = b'{"task":"tests.flaky_args","id":"j","args":' + args + b'}'
    out = runner.run("q", raw)
    assert out.meta["status"] == "retrying"
    same = json.dumps(p.loads(out.retry)["args"])   # (NaN != NaN: compare as written)
    assert same == json.dumps(p.loads(raw)["args"]), out.retry
    assert p.decode_job(out.retry).attempt == 2


def test_a_fault_of_ours_fails_the_job_as_worker_error_not_the_process(runner, monkeypatch):
    # Given a bug in redpool: something on the way to the envelope raises
    def broken(*a, **kw):
        raise KeyError("a bug")
    monkeypatch.setattr(Runner, "_base", broken)
    out = runner.run("q", raw_job("tests.add", args=[1, 2], reply_to="redpool:reply:r"))
    # Then the job fails, answered and dead-lettered, instead of killing the child
    monkeypatch.undo()
    env = valid_envelope(out)
    assert env["error"]["type"] == p.E_WORKER_ERROR and out.retry is None
    assert "KeyError: 'a bug'" in env["error"]["message"] and "bug in redpool" in env["error"]["message"]
    assert "raise KeyError" in env["error"]["traceback"]
    assert env["started_at"] is not None and env["id"] == "job-1"   # it may have run
    assert (out.meta["reply_to"], out.meta["result_id"]) == ("redpool:reply:r", "job-1")
    assert p.loads(out.dead)["error_type"] == p.E_WORKER_ERROR


def test_when_even_failing_it_fails_the_job_is_still_dead_lettered(runner, monkeypatch):
    def broken(*a, **kw):
        raise MemoryError()
    monkeypatch.setattr(p, "envelope", broken)
    monkeypatch.setattr(p, "failed_envelope_for", broken)
    out = runner.fail("q", raw_job("tests.add", args=[1, 2]), 0, p.E_TIMEOUT, "late",
                      retry=False, dead=False)
    monkeypatch.undo()
    assert out.envelope is None and p.loads(out.dead)["error_type"] == p.E_WORKER_ERROR
    meta = decode_done(encode_done(5, out))[0]
    assert meta["status"] == p.FAILED and meta["error_type"] == p.E_WORKER_ERROR


def test_the_done_message_is_written_whatever_the_meta_holds():
    out = Outcome({"id": "j", "status": p.FAILED, "result_id": None, "ttl": 0, "reply_to": None,
                   "duration": math.nan, "odd": {1, 2}, "error": "x\ud800"})
    meta = decode_done(encode_done(3, out))[0]
    assert meta["duration"] == 0.0 and meta["odd"] == "{1, 2}" and meta["t"] == 3


# -- the property: any value, returned or raised, gives one valid envelope ---------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

PROP_LIMIT = 2048
prop_registry = Registry()
_now: dict = {}


@prop_registry.task(name="p.do")
def do():
    how, value = _now["do"]
    if how == "return":
        return value
    raise how(value)


# text with lone and paired surrogates among other characters
# (st.text() would leave surrogates out, whatever its alphabet)
texts = st.lists(st.one_of(st.characters(), st.characters(categories=["Cs"])),
                 max_size=12).map("".join)
keys = st.one_of(texts, texts, st.integers(), st.floats(allow_nan=False), st.booleans(),
                 st.none(), st.floats(), st.tuples(st.integers()))
# mostly what JSON holds, sometimes what it cannot
leaves = st.one_of(texts, texts, st.none(), st.booleans(), st.integers(),
                   st.floats(allow_nan=False, allow_infinity=False),
                   st.one_of(st.floats(), st.builds(hostile.BadRepr),
                             st.builds(lambda: (i for i in range(2))), st.builds(set),
                             st.builds(lambda: hostile.BadItems(a=1)), st.integers(10 ** 4400)))
values = st.one_of(
    st.recursive(leaves, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                 st.dictionaries(keys, inner, max_size=4),
                                                 st.tuples(inner, inner)), max_leaves=12),
    # nested far below or far above the recursion limit (near it, the stack depth of the
    # caller decides); built in the test, so that a failing example prints
    st.one_of(st.integers(0, 400), st.integers(2000, 3000)).map(lambda n: Nested(n)),
    st.integers(0, 3 * PROP_LIMIT).map(lambda n: "\x01" * n))


class Nested(int):
    """nested(n), to build: a list in a list ... n deep."""


RAISED = {ValueError: "ValueError", KeyboardInterrupt: "KeyboardInterrupt",
          SystemExit: "SystemExit", **{c: f"taskmods.hostile.{c.__qualname__}" for c in (
              hostile.Unprintable, hostile.ExitingStr, hostile.Fatal, hostile.BadNotes)},
          hostile.Nowhere: "<unknown>.Nowhere", hostile.Anonymous: p.E_UNPRINTABLE_ERROR}


def lone_surrogates(value) -> int:
    """How many surrogates of the strings in ``value`` (keys too) are not in a pair."""
    if isinstance(value, str):
        n, i = 0, 0
        while i < len(value):
            if "\ud800" <= value[i] <= "\udbff" and i + 1 < len(value) \
                    and "\udc00" <= value[i + 1] <= "\udfff":
                i += 2
                continue
            n += "\ud800" <= value[i] <= "\udfff"
            i += 1
        return n
    if isinstance(value, dict):
        return sum(lone_surrogates(k) + lone_surrogates(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return sum(map(lone_surrogates, value))
    return 0


def without_lone_surrogates(value):
    if isinstance(value, str):
        return re.sub("[\ud800-\udfff]", "\ufffd", value)  # (pairs: joined by json.loads)
    if isinstance(value, dict):
        return {without_lone_surrogates(k): without_lone_surrogates(v) for k, v in value.items()}
    if isinstance(value, list):
        return [without_lone_surrogates(v) for v in value]
    return value


PROPERTY = settings(max_examples=300, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def run_prop(how, value, attempt: int = 2) -> tuple[Outcome, dict]:
    """Run p.do, doing ``how`` with ``value``, on its last attempt (2, of max_retries 1)."""
    runner = Runner(prop_registry, WORKER, p.DEFAULT_MAX_PAYLOAD, defaults=DEFAULTS,
                    max_result_size=PROP_LIMIT)
    _now["do"] = (how, hostile.nested(value) if isinstance(value, Nested) else value)
    out = runner.run("q", raw_job("p.do", attempt=attempt))
    if out.envelope is None:
        return out, {}
    env = valid_envelope(out)
    meta = decode_done(encode_done(1, out))[0]
    assert meta["status"] == env["status"]
    assert meta["error_type"] == (env.get("error") or {}).get("type")
    return out, env


@PROPERTY
@given(value=values)
def test_any_value_a_task_returns_gives_one_valid_envelope_of_the_documented_type(value):
    out, env = run_prop("return", value)
    value = _now["do"][1]
    try:   # what json makes of it, surrogates aside (ensure_ascii escapes them)
        text = json.dumps(value, ensure_ascii=True, allow_nan=False)
    except BaseException:   # (SystemExit from a dict's items() too)
        assert env["error"]["type"] == p.E_UNSERIALIZABLE_RESULT and out.retry is None
        return
    if env["status"] == p.FAILED:
        assert env["error"]["type"] == p.E_RESULT_TOO_LARGE and len(text) > PROP_LIMIT - 1000
        assert out.retry is None
        return
    assert env["result"] == without_lone_surrogates(json.loads(text))
    n = lone_surrogates(value)
    if n:
        assert env["warnings"] == [f"result: {n} unpaired UTF-16 surrogate{'s' if n > 1 else ''} "
                                   "replaced by U+FFFD (not valid Unicode)"]
    else:
        assert "warnings" not in env


@PROPERTY
@given(value=values, how=st.sampled_from(list(RAISED)))
def test_any_exception_a_task_raises_fails_its_job_by_its_type_and_retries(value, how):
    # the task's own error, named as documented, whatever its message holds
    out, env = run_prop(how, value)
    assert env["error"]["type"] == RAISED[how] and isinstance(env["error"]["message"], str)
    assert env["status"] == p.FAILED and out.retry is None
    # with a retry left, retried as configured
    out, _ = run_prop(how, value, attempt=1)
    meta, _, _, retry = decode_done(encode_done(1, out))
    assert meta["status"] == "retrying" and meta["error_type"] == RAISED[how]
    assert p.decode_job(retry).attempt == 2


# -- hostile jobs (tests/corpus.py) through a runner: refused, never retried, never crashing --

from corpus import CASES  # noqa: E402

corpus_registry = Registry()


@corpus_registry.task(name="t.add")
def t_add(a, b):
    return a + b


@corpus_registry.task(name="t.boom", max_retries=3)
def t_boom(msg="boom"):
    raise ValueError("boom")


@pytest.mark.parametrize("case", CASES, ids=str)
def test_a_hostile_job_fails_once_with_its_reason_and_is_never_retried(case):
    # (the corpus's reply lists are an application's own, which the operator allowed)
    runner = Runner(corpus_registry, WORKER, p.DEFAULT_MAX_PAYLOAD,
                    defaults=replace(DEFAULTS, reply_patterns=("hostile:*",)))
    out = runner.run("q", case.raw)
    assert out.retry is None  # (a retry would re-encode what cannot be encoded)
    meta, env, dead, retry = decode_done(encode_done(7, out))  # what a child sends
    assert (meta["status"], meta["error_type"]) == (p.FAILED, case.error_type)
    assert case.reason in meta["error"]
    assert (meta["reply_to"], meta["result_id"]) == (case.answered_on, case.result_id)
    assert json.loads(dead.decode("utf-8"), parse_constant=_refuse)["reason"].startswith(
        meta["error"].rstrip("…"))
    if env is not None:
        e = json.loads(env.decode("utf-8"), parse_constant=_refuse)
        assert (e["error"]["type"], e["started_at"], e["attempts"]) == (case.error_type, None, 1)
    assert (env is None) == (case.answered_on is None and case.result_id is None)


def _refuse(name):
    raise AssertionError(f"{name} written: not JSON")


@pytest.mark.parametrize("attempt", [1, 2, 64, 1024, 1025, 1100, 1101, p.MAX_ATTEMPT, 10**30])
@pytest.mark.parametrize("base, cap", [(1.5, 300.0), (5e-324, 2147483647.0),
                                       (2147483647.0, 2147483647.0), (1, 300)])
def test_the_backoff_never_overflows_whatever_the_attempt(attempt, base, cap):
    d = Policy(retry_backoff=base, retry_backoff_max=cap).backoff(attempt)
    assert 0.0 <= d <= cap and d == d


def test_a_task_option_above_the_retry_ceiling_counts_as_the_ceiling():
    reg = Registry()

    @reg.task(name="t.forever", max_retries=10**9)
    def forever():
        raise RuntimeError("again")

    runner = Runner(reg, WORKER, p.DEFAULT_MAX_PAYLOAD, defaults=DEFAULTS)
    last = p.encode_job({"task": "t.forever", "id": "j", "attempt": p.MAX_ATTEMPT})
    assert runner.prepare(last)[2].max_retries == p.MAX_RETRIES
    out = runner.run("q", last)
    assert out.retry is None and out.meta["status"] == p.FAILED   # the last attempt
    out = runner.run("q", p.encode_job({"task": "t.forever", "id": "j",
                                        "attempt": p.MAX_RETRIES, "retry_backoff": 1.5}))
    assert p.decode_job(out.retry).attempt == p.MAX_ATTEMPT        # a retry it can read back


def test_a_retry_of_a_job_with_an_unpaired_surrogate_carries_it_unchanged(runner):
    raw = b'{"task":"tests.flaky","id":"j","args":[],"kwargs":{},"note":"\\ud800!"}'
    out = runner.run("q", raw)
    assert out.meta["status"] == "retrying"
    assert p.decode_job(out.retry).extra == {"note": "\ud800!"}
    encode_done(1, out)  # (a child can send it)


def test_a_job_nested_to_the_limit_runs_and_is_retried_intact(runner):
    args: list = []
    for _ in range(98):
        args = [args]   # 1 (the job) + 99 levels: the deepest a job may be
    def raw_with(deep):
        return p.encode_job({"task": "tests.flaky", "id": "j", "max_retries": 1, "args": [],
                             "kwargs": {}, "deep": deep})
    raw = raw_with(args)
    with pytest.raises(p.InvalidJob, match="101 levels"):
        p.decode_job(raw_with([args]))
    out = runner.run("q", raw)
    assert out.meta["status"] == "retrying"
    assert p.decode_job(out.retry).extra["deep"] == args


def test_an_exception_class_named_with_unpaired_surrogates_fails_its_job_readably(hrunner):
    # Given a task raising a class whose __qualname__ and __module__ hold lone surrogates
    out = hrunner.run("q", raw_job("h.surrogate_class", attempt=2, dead_letter=True))
    # Then its job fails once, the type readable (the surrogates replaced) everywhere
    readable = "mod\ufffdule.Bad\ufffdName"
    env = valid_envelope(out)
    assert env["error"]["type"] == readable and env["error"]["message"] == "odd class"
    assert out.meta["error_type"] == readable   # (the supervisor's events and completions)
    meta = decode_done(encode_done(1, out))[0]
    assert meta["error_type"] == readable and "warnings" not in meta
    dead = p.loads(out.dead)
    assert dead["error_type"] == readable and "warnings" not in dead
    assert dead["reason"] == f"failed after 2 attempt(s): {readable}: odd class"
    # and a retry says the same
    again = hrunner.run("q", raw_job("h.surrogate_class"))
    assert again.meta["status"] == "retrying" and again.meta["error_type"] == readable


# -- a retry near --max-payload ------------------------------------------------------------------

def test_a_job_near_max_payload_is_retried_though_its_retry_is_a_little_longer():
    # Given a job without an id, 1000 bytes with a limit of 1000: its retry carries the id
    # the worker assigned and the attempt number (~60 bytes more)
    runner = Runner(registry, WORKER, 1000, defaults=DEFAULTS)
    job = p.make_job("tests.flaky", [], now=1700000000.0, max_retries=3)
    del job["id"]
    job["pad"] = ""
    job["pad"] = "p" * (1000 - len(p.encode_job(job)))
    raw = p.encode_job(job)
    assert len(raw) == 1000
    out = runner.run("q", raw)
    assert out.meta["status"] == "retrying" and len(out.retry) > 1000
    # Then the retry is read back and runs again (it is not refused as PayloadTooLarge)
    again = runner.run("q", out.retry)
    assert again.meta["status"] == "retrying", again.meta
    assert p.decode_job(again.retry, 1000).attempt == 3
    # while a producer's job a little over the limit is still refused
    with pytest.raises(p.InvalidJob, match="over the limit of 1000"):
        p.decode_job(p.encode_job({**job, "pad": job["pad"] + "pp"}), 1000)


def test_a_retry_that_no_longer_fits_fails_now_and_says_why():
    # Given a job whose numbers Python writes longer (1e5 -> 100000.0), near the limit
    runner = Runner(registry, WORKER, 1000, defaults=DEFAULTS)
    raw = (b'{"task":"tests.flaky","id":"j","max_retries":3,"args":[],"kwargs":{},"n":['
           + b",".join([b"1e5"] * 200) + b"]}")
    assert len(raw) <= 1000
    out = runner.run("q", raw)
    # Then it is not retried into a certain refusal: it fails now, saying why
    assert out.meta["status"] == p.FAILED and out.retry is None
    message = p.loads(out.envelope)["error"]["message"]
    assert "not retried: its next attempt would be" in message and "--max-payload 1000" in message
