"""Property tests (Hypothesis): arbitrary JSON-ish documents, and arbitrary bytes, through
protocol.decode_job, protocol.salvage and Runner.run.  Nothing raises but InvalidJob,
and every Outcome is bytes that any JSON parser reads (UTF-8, no NaN or Infinity),
which a pool child can send.  The hand-picked cases are tests/corpus.py."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from redpool import protocol as p
from redpool.child import decode_done, encode_done
from redpool.registry import Registry
from redpool.runner import Outcome, Policy, Runner

SETTINGS = settings(max_examples=250, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

registry = Registry()


@registry.task(name="t.add")
def add(a, b):
    return a + b


@registry.task(name="t.boom")
def boom(*args, **kwargs):
    raise RuntimeError("boom")


@registry.task(name="t.echo")
def echo(*args, **kwargs):
    return [args, kwargs]   # may hold what JSON cannot: UnserializableResult


RUNNER = Runner(registry, "prop-worker", 4096, defaults=Policy(max_retries=2))

# -- documents -------------------------------------------------------------------------------

BIG = "@@1e400@@"    # after encoding, becomes a number no double holds
any_char = st.characters(exclude_categories=())          # unpaired surrogates included
surrogate = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF, exclude_categories=())
text = (st.text(any_char, max_size=12)
        | st.sampled_from(["t.add", "t.boom", "t.echo", "t.nope", "", "job-1", "r:1",
                           "redpool:queue:default", "redpool:reply:x", BIG])
        | st.builds(lambda a, s, b: a + s + b, st.sampled_from(["t.add", "r:", ""]), surrogate,
                    st.sampled_from(["", "x"])))
numbers = (st.integers(-10, 10) | st.integers() | st.integers(-2**80, 2**80)
           | st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from([p.MAX_ATTEMPT, 2**31]))
scalars = st.none() | st.booleans() | numbers | text
json_ish = st.recursive(scalars, lambda kids: st.lists(kids, max_size=4)
                        | st.dictionaries(text, kids, max_size=4), max_leaves=16)
FIELDS = ("task", "id", "args", "kwargs", "reply_to", "result_ttl", "enqueued_at", "v",
          "attempt", "max_retries", "retry_backoff", "retry_backoff_max", "timeout",
          "dead_letter")
plausible = {"task": st.sampled_from(["t.add", "t.boom", "t.echo"]),
             "args": st.lists(json_ish, max_size=3), "kwargs": st.dictionaries(text, json_ish, max_size=2),
             "max_retries": st.integers(0, 3), "attempt": st.integers(1, 4),
             "id": st.sampled_from(["job-1", "a:b.c_d-9"]), "reply_to": st.sampled_from(["r:1", "x"])}
docs = st.fixed_dictionaries(
    {"task": plausible["task"] | json_ish},
    optional={**{f: json_ish for f in FIELDS[1:]},
              **{f: s | json_ish for f, s in plausible.items() if f != "task"},
              "extra": json_ish})


@st.composite
def raw_jobs(draw) -> bytes:
    """A document as a producer in any language might write it: escaped or raw UTF-8
    (a lone surrogate then makes it invalid UTF-8), with NaN/Infinity literals,
    numbers no double holds, nesting near and past the limits; sometimes cut or
    corrupted."""
    doc = draw(docs)
    depth = draw(st.sampled_from([0, 0, 0, 0, 0, 0, 98, 99, 100, 1200]))
    if depth:
        nested: object = draw(json_ish)
        for _ in range(depth):
            nested = [nested]
        doc[draw(st.sampled_from(["args", "deep"]))] = nested
    text = json.dumps(doc, ensure_ascii=draw(st.booleans()), allow_nan=True)
    raw = text.replace(json.dumps(BIG), "1e400").encode("utf-8", "surrogatepass")
    cut = draw(st.sampled_from([None, None, None, "truncate", "byte"]))
    if cut == "truncate":
        raw = raw[:draw(st.integers(0, len(raw)))]
    elif cut == "byte":
        i = draw(st.integers(0, len(raw)))
        raw = raw[:i] + bytes([draw(st.integers(0, 255))]) + raw[i:]
    return raw


raws = raw_jobs() | st.binary(max_size=200)


# -- what must hold --------------------------------------------------------------------------

def _no_constant(name):
    raise AssertionError(f"{name} is not JSON")


def strict(data: bytes):
    """As any other language reads JSON: UTF-8, no NaN or Infinity."""
    return json.loads(data.decode("utf-8"), parse_constant=_no_constant)


def whole(s) -> bool:
    return s is None or p.unpaired_surrogate(s) is None


def check_outcome(out: Outcome) -> None:
    for part in (out.envelope, out.dead, out.retry):
        if part is not None:
            strict(part)
    if out.retry is not None:
        assert isinstance(p.decode_job(out.retry), p.Job)   # the next attempt reads back
    meta = decode_done(encode_done(1, out))[0]              # what a child sends
    assert whole(meta["reply_to"]) and whole(meta["id"]) and whole(meta["task"])


@SETTINGS
@given(raws)
def test_decode_job_raises_nothing_but_invalid_job(raw):
    try:
        job = p.decode_job(raw, max_payload=4096)
    except p.InvalidJob as e:
        assert e.reason and whole(e.reply_to) and whole(e.job_id) and whole(e.task)
        assert e.attempt <= p.MAX_ATTEMPT
        return
    assert whole(job.reply_to) and whole(job.task) and job.attempt <= p.MAX_ATTEMPT
    assert p.decode_job(job.retry()).args == job.args  # a retry carries it exactly


@SETTINGS
@given(raws)
def test_salvage_never_raises_and_vouches_only_for_whole_strings(raw):
    got = p.salvage(raw)
    assert isinstance(got, (p.Job, p.InvalidJob))
    if isinstance(got, p.InvalidJob):
        assert whole(got.reply_to) and whole(got.job_id) and whole(got.task)
        env = p.failed_envelope_for(got, queue="q", worker="w")
        if env is not None:
            strict(p.dumps(env))


def _echoes_surrogates(raw: bytes) -> bool:
    """Does this job hand a task a string UTF-8 cannot hold, which it may echo into its
    result?  (Encoding such a result is protocol.dumps's part: see below.)"""
    return "t.echo" in raw.decode("utf-8", "replace")


@SETTINGS
@given(raws)
def test_a_runner_turns_any_job_into_an_outcome_any_language_reads(raw):
    out = RUNNER.run("q", raw)
    check_outcome(out)
    if out.meta["status"] == p.FAILED and out.meta["error_type"] in (p.E_INVALID_JOB,
                                                                     p.E_UNKNOWN_TASK):
        strict(out.dead)   # a refusal is always dead-lettered
    out = RUNNER.fail("q", raw, 1, p.E_WORKER_CRASHED, "it crashed", retry=True, dead=True,
                      started_at=1.0, ran=0.5)
    check_outcome(out)


def _dumps_takes_surrogates() -> bool:
    try:
        p.dumps("\ud800")
    except UnicodeEncodeError:
        return False
    return True


@pytest.mark.skipif(not _dumps_takes_surrogates(),
                    reason="needs protocol.dumps to write what UTF-8 cannot hold (h-encode)")
@SETTINGS
@given(raws)
def test_a_task_echoing_a_string_utf8_cannot_hold_still_yields_readable_outcomes(raw):
    reg = Registry()

    @reg.task(name="t.boom")
    def loud(*args, **kwargs):
        raise RuntimeError(f"boom: {args} {kwargs}")

    reg.tasks["t.echo"] = registry.tasks["t.echo"]
    check_outcome(Runner(reg, "prop-worker", 4096, defaults=Policy(max_retries=2)).run("q", raw))
