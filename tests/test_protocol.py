"""The wire format: golden files, every bad-input class, and code/schema agreement.

Pure unit tests: no Redis server.  The golden files in tests/golden/ are the contract as
bytes; a change that makes one of these tests fail is a change of the wire format and
must be reflected in docs/protocol.md and src/redpool/schema/ (and maybe a new 'v').
"""

from __future__ import annotations

import base64
import json
import math
import random
import re
from importlib.resources import files
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from jsonschema import ValidationError

from redpool import protocol as p

GOLDEN = Path(__file__).parent / "golden"
DOCS = Path(__file__).parent.parent / "docs" / "protocol.md"
WORKER = "web-1"
T0 = 1732492800.5


# -- helpers ----------------------------------------------------------------------------------

def _ecma_pattern(validator, pattern, instance, schema):
    # The schemas' dialect is ECMA-262, where '$' (no m flag) is the very end of the input;
    # Python's '$' also matches before a final "\n".  Check patterns as other languages will.
    if pattern.endswith("$"):
        pattern = pattern[:-1] + r"\Z"
    if validator.is_type(instance, "string") and not re.search(pattern, instance):
        yield ValidationError(f"{instance!r} does not match {pattern!r}")


_Validator = jsonschema.validators.extend(jsonschema.Draft202012Validator, {"pattern": _ecma_pattern})


def _schema(name: str):
    schema = json.loads((files("redpool") / "schema" / f"{name}.schema.json").read_text("utf-8"))
    jsonschema.Draft202012Validator.check_schema(schema)
    return _Validator(schema)


JOB, ENVELOPE, DEAD = _schema("job"), _schema("envelope"), _schema("dead")


def _not_json(value: str):
    raise ValueError(f"{value} is not JSON")


def strict_json(raw: bytes) -> Any:
    """RFC 8259 JSON, as every other language reads it: no NaN, Infinity or 1e400."""
    def finite(s: str) -> float:
        f = float(s)
        return f if math.isfinite(f) else _not_json(s)
    return json.loads(raw.decode("utf-8"), parse_constant=_not_json, parse_float=finite)


def golden(name: str) -> bytes:
    return (GOLDEN / name).read_bytes()


BAD = json.loads(golden("bad_jobs.json"))["cases"]


def raw_of(case: dict) -> bytes:
    return base64.b64decode(case["raw_b64"]) if "raw_b64" in case else case["raw"].encode("utf-8")


def decode_bad(case: dict) -> p.InvalidJob:
    with pytest.raises(p.InvalidJob) as info:
        p.decode_job(raw_of(case), max_payload=case.get("max_payload", p.DEFAULT_MAX_PAYLOAD))
    return info.value


# -- good jobs --------------------------------------------------------------------------------

def test_full_job_decodes_every_field_and_keeps_unknown_ones():
    job = p.decode_job(golden("job_full.json"))
    assert (job.task, job.id, job.id_assigned) == ("examples.tasks.add", "order-42:resize.v2", False)
    assert job.args == [2, 3]
    assert job.kwargs == {"scale": 1.5, "labels": ["a", "ü"], "nested": {"deep": [None, True, False]}}
    assert (job.reply_to, job.result_ttl, job.enqueued_at, job.v) == ("myapp:replies", 3600, 1732492800.25, 1)
    assert job.extra == {"trace_id": "4bf92f3577b34da6", "x-future": {"priority": 7}}
    # Nothing is lost: the job re-encodes to exactly what the producer sent.
    assert job.to_dict() == json.loads(golden("job_full.json"))


def test_minimal_job_gets_defaults_and_an_assigned_id():
    job = p.decode_job(golden("job_minimal.json"))
    assert (job.args, job.kwargs, job.reply_to, job.enqueued_at, job.extra) == ([], {}, None, None, {})
    assert (job.result_ttl, job.v) == (86400, 1) == (p.DEFAULT_RESULT_TTL, p.VERSION)
    assert job.id_assigned and p.ID_RE.match(job.id)
    assert p.decode_job(golden("job_minimal.json")).id != job.id  # a fresh id each time
    assert "id" not in job.to_dict()  # an assigned id is not the producer's


@pytest.mark.parametrize("name", ["job_minimal.json", "job_full.json", "job_walkthrough.json"])
def test_golden_jobs_round_trip_and_validate(name):
    raw = golden(name)
    assert not list(JOB.iter_errors(strict_json(raw)))
    job = p.decode_job(raw)
    again = p.decode_job(p.encode_job(job.to_dict()))
    if job.id_assigned:
        again.id = job.id
        again.id_assigned = True
    assert again == job


def test_explicit_defaults_mean_the_same_as_absent_fields():
    explicit = p.decode_job(b'{"task":"t","id":"j","args":[],"kwargs":{},"result_ttl":86400,"v":1}')
    implicit = p.decode_job(b'{"task":"t","id":"j"}')
    assert explicit == implicit


def test_make_job_builds_what_a_worker_accepts():
    job = p.make_job("examples.tasks.add", (2, 3), {"k": "v"}, id="job-9", reply_to="r",
                     result_ttl=0, now=T0)
    assert job == {"v": 1, "id": "job-9", "task": "examples.tasks.add", "args": [2, 3],
                   "kwargs": {"k": "v"}, "enqueued_at": T0, "reply_to": "r", "result_ttl": 0}
    assert not list(JOB.iter_errors(job))
    assert p.decode_job(p.encode_job(job)).to_dict() == job
    with pytest.raises(p.InvalidJob, match="'result_ttl'"):
        p.make_job("t", result_ttl=-5)


# -- bad jobs ---------------------------------------------------------------------------------

@pytest.mark.parametrize("case", BAD, ids=[c["name"] for c in BAD])
def test_bad_job_is_refused_with_a_human_reason(case):
    err = decode_bad(case)
    assert err.error_type == case["error_type"]
    assert case["reason"] in err.reason and str(err) == err.reason
    assert "Traceback" not in err.reason and len(err.reason) > 20
    want = {"job_id": None, "reply_to": None, "result_ttl": 86400, "task": None, "enqueued_at": None}
    want.update(case.get("salvage", {}))
    assert {k: getattr(err, k) for k in want} == want


@pytest.mark.parametrize("case", BAD, ids=[c["name"] for c in BAD])
def test_bad_job_gets_a_failed_envelope_exactly_when_it_can_be_answered(case):
    err = decode_bad(case)
    env = p.failed_envelope_for(err, queue="default", worker=WORKER, started_at=T0)
    if err.job_id is None and err.reply_to is None:
        assert env is None
        return
    assert env["status"] == "failed" and env["error"] == p.error_dict(err.error_type, err.reason)
    assert env["id"] == (err.job_id or env["id"]) and p.ID_RE.match(env["id"])
    assert (env["task"], env["enqueued_at"], env["started_at"]) == (err.task, err.enqueued_at, T0)
    assert not list(ENVELOPE.iter_errors(env))
    assert json.loads(p.dumps(env)) == env  # writable: no NaN sneaks in from the bad job


@pytest.mark.parametrize("raw", [
    b"[" * 100_000,
    b'{"task":"t","id":"j","args":' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    b'{"task":"t","kwargs":' + b'{"a":' * 50_000 + b"1" + b"}" * 50_001,
], ids=["bare_array", "deep_args", "deep_kwargs"])
def test_deeply_nested_json_is_refused_not_crashed(raw):
    with pytest.raises(p.InvalidJob, match="nested too deeply") as info:
        p.decode_job(raw)
    assert info.value.error_type == p.E_INVALID_JOB
    # Over the size limit the salvage attempt meets the same nesting and must survive it
    # (and finds the id beside the deep field, to answer the producer).
    with pytest.raises(p.InvalidJob) as info:
        p.decode_job(raw, max_payload=100)
    assert info.value.error_type == p.E_PAYLOAD_TOO_LARGE
    assert info.value.job_id == (b'"id":"j"' in raw and "j" or None)


def test_payload_limit_is_inclusive():
    raw = b'{"task":"t"}'
    assert p.decode_job(raw, max_payload=len(raw)).task == "t"
    with pytest.raises(p.InvalidJob) as info:
        p.decode_job(raw, max_payload=len(raw) - 1)
    assert info.value.error_type == p.E_PAYLOAD_TOO_LARGE


def test_salvage_never_raises():
    assert isinstance(p.salvage(golden("job_full.json")), p.Job)
    for case in BAD:
        got = p.salvage(raw_of(case))
        assert isinstance(got, p.InvalidJob) or case["error_type"] == p.E_PAYLOAD_TOO_LARGE
    big = p.salvage(b'{"task":"t","args":["' + b"x" * (2 * p.DEFAULT_MAX_PAYLOAD) + b'"]}')
    assert isinstance(big, p.Job)  # salvage reads past the limit to find the producer


def test_failed_envelope_for_with_only_reply_to_gets_an_id():
    err = p.InvalidJob("job has no 'task' field", reply_to="myapp:replies")
    env = p.failed_envelope_for(err, queue="q", worker=WORKER)
    assert p.ID_RE.match(env["id"]) and env["task"] is None and env["started_at"] is None
    assert not list(ENVELOPE.iter_errors(env))
    assert p.failed_envelope_for(p.InvalidJob("x"), queue="q", worker=WORKER) is None


# -- JSON output ------------------------------------------------------------------------------

@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, {"a": [1, math.nan]}])
def test_dumps_refuses_non_json_numbers(value):
    with pytest.raises(ValueError):
        p.dumps(value)


def test_dumps_is_compact_utf8():
    assert p.dumps({"a": [1, "ü"], "b": None}) == '{"a":[1,"ü"],"b":null}'.encode("utf-8")


@pytest.mark.parametrize("text", ["\ud800", "a\udfffb", "\udc00\ud800", "x" * 1000 + "\ud8ff"])
def test_dumps_never_raises_on_strings_it_writes_u_fffd_for_unpaired_surrogates(text):
    for obj in (text, [text, {"k": text}], {text: 1}):
        raw = p.dumps(obj)
        decoded = strict_json(raw)   # valid UTF-8, valid JSON
        assert "\ufffd" in json.dumps(decoded, ensure_ascii=False)
        assert not re.search("[\ud800-\udfff]", json.dumps(decoded, ensure_ascii=False))


def test_dumps_joins_a_surrogate_pair_into_its_character():
    # a str may hold a well-formed pair as two code points: it means one character
    assert p.dumps(["\ud83d\ude00", "\ud800"]) == '["\U0001F600","\ufffd"]'.encode()


def test_dumps_says_in_warnings_which_field_of_an_object_had_unpaired_surrogates():
    env = p.envelope(id="j", task="t.\ud800", queue="q", status=p.SUCCEEDED, worker=WORKER,
                     result={"a\udc00": ["\ud800", "\ud801"]}, started_at=T0, finished_at=T0)
    got = strict_json(p.dumps(env))
    assert got["task"] == "t.\ufffd" and got["result"] == {"a\ufffd": ["\ufffd", "\ufffd"]}
    assert got["warnings"] == [
        "task: 1 unpaired UTF-16 surrogate replaced by U+FFFD (not valid Unicode)",
        "result: 3 unpaired UTF-16 surrogates replaced by U+FFFD (not valid Unicode)"]
    assert list(got) == [*env, "warnings"]   # the fields in their order, warnings last
    assert not list(ENVELOPE.iter_errors(got))
    # warnings already there are kept, ours added
    env["warnings"] = ["error message cut from 9 to 8 characters"]
    assert strict_json(p.dumps(env))["warnings"][0] == env["warnings"][0]
    assert len(strict_json(p.dumps(env))["warnings"]) == 3
    # and an object without surrogates is written as ever, without warnings
    del env["warnings"]
    assert "warnings" not in strict_json(p.dumps(dict(env, task="t", result=1)))


def test_dumps_refuses_more_than_its_limit_before_encoding_what_it_can():
    assert p.dumps("x" * 10, limit=12) == b'"' + b"x" * 10 + b'"'
    with pytest.raises(p.TooLarge) as e:
        p.dumps("x" * 11, limit=12)
    assert (e.value.size, e.value.limit, e.value.exact) == (13, 12, True)
    with pytest.raises(p.TooLarge) as e:   # 13 characters: over before the UTF-8 copy
        p.dumps("é" * 11, limit=12)
    assert (e.value.size, e.value.exact) == (13, False)
    with pytest.raises(p.TooLarge) as e:   # 8 characters, 14 bytes
        p.dumps("é" * 6, limit=12)
    assert (e.value.size, e.value.exact) == (14, True)


def test_golden_envelopes_are_byte_exact():
    ok = p.envelope(id="job-1", task="examples.tasks.add", queue="default", status=p.SUCCEEDED,
                    worker=WORKER, attempts=1, result=5, started_at=T0, finished_at=1732492800.503)
    assert p.dumps(ok) + b"\n" == golden("envelope_succeeded.json")
    tb = json.loads(golden("envelope_failed.json"))["error"]["traceback"]  # the layout is the point
    failed = p.envelope(id="job-2", task="examples.tasks.add", queue="default", status=p.FAILED,
                        worker=WORKER, attempts=2, enqueued_at=1732492799.75, started_at=T0,
                        finished_at=1732492800.503,
                        error=p.error_dict("TypeError", "unsupported operand type(s) for +: 'int' and 'str'", tb))
    assert p.dumps(failed) + b"\n" == golden("envelope_failed.json")


def test_golden_dead_entry_is_byte_exact():
    raw = b'{"id":"job-3","args":[1]}'
    err = p.salvage(raw)
    entry = p.dead_entry(raw, queue="default", reason=err.reason, error_type=err.error_type,
                         worker=WORKER, job_id=err.job_id, now=T0)
    assert p.dumps(entry) + b"\n" == golden("dead_entry.json")


def test_dead_entry_of_a_job_over_max_payload_keeps_only_its_beginning():
    # Given a producer's 1 MB job, over a --max-payload of 1000 bytes
    raw = b'{"task":"t","id":"big","args":["' + "é".encode() * 500_000 + b'"]}'
    entry = p.dead_entry(raw, queue="q", reason="too big", error_type=p.E_PAYLOAD_TOO_LARGE,
                         worker=WORKER, job_id="big", now=T0, max_job=1000)
    # Then the entry keeps its first 64 KiB (a character cut in two is left out), and says so
    assert entry["job_size"] == len(raw)
    assert raw.startswith(entry["job"].encode()) and p.DEAD_JOB_KEPT - 3 < len(entry["job"].encode()) <= p.DEAD_JOB_KEPT
    assert entry["warnings"] == [f"job: only its first {p.DEAD_JOB_KEPT} of {len(raw)} bytes "
                                 "are kept (it is over --max-payload)"]
    assert len(p.dumps(entry)) < p.DEAD_JOB_KEPT + 1000
    assert not list(DEAD.iter_errors(entry))
    # not UTF-8: its first bytes in base64
    entry = p.dead_entry(b"\xff" * 100_000, queue="q", reason="r", error_type=p.E_INVALID_JOB,
                         worker=WORKER, max_job=1000)
    assert base64.b64decode(entry["job_b64"]) == b"\xff" * p.DEAD_JOB_KEPT
    # a job within the limit (or no limit given) is kept whole, as ever
    for max_job in (None, len(raw)):
        entry = p.dead_entry(raw, queue="q", reason="r", error_type="X", worker=WORKER,
                             max_job=max_job)
        assert entry["job"].encode() == raw and "job_size" not in entry and "warnings" not in entry


def test_dead_entry_keeps_non_utf8_jobs_as_base64():
    raw = b'{"task":"\xff\xfe"}'
    entry = p.dead_entry(raw, queue="q", reason="job is not UTF-8 text", error_type=p.E_INVALID_JOB,
                         worker=WORKER, now=T0)
    assert "job" not in entry and base64.b64decode(entry["job_b64"]) == raw
    assert entry["id"] is None
    assert not list(DEAD.iter_errors(entry))


# -- keys -------------------------------------------------------------------------------------

def test_key_names():
    k = p.Keys()
    assert [k.queue("default"), k.result("job-1"), k.dead, k.processing("web-1", "default"),
            k.supervisor("web-1"), k.supervisors, k.reply("c1")] == [
        "redpool:queue:default", "redpool:result:job-1", "redpool:dead",
        "redpool:processing:web-1:default", "redpool:supervisor:web-1", "redpool:supervisors",
        "redpool:reply:c1"]
    assert p.Keys("myapp:v2").queue("q") == "myapp:v2:queue:q"


@pytest.mark.parametrize("queue", ["default", "emails:high", "a:b:c", "x*y", ""])
def test_processing_key_round_trip(queue):
    k = p.Keys("ns:1")
    assert k.queue_of_processing("web-1", k.processing("web-1", queue)) == queue


def test_queue_of_processing_refuses_another_supervisors_list():
    k = p.Keys()
    with pytest.raises(ValueError, match="not a processing key"):
        k.queue_of_processing("web-1", k.processing("web-10", "default"))


def test_processing_pattern_escapes_glob_characters():
    k = p.Keys("app[1]")
    assert k.processing_pattern("w*?\\") == r"app\[1\]:processing:w\*\?\\:*"
    fakeredis = pytest.importorskip("fakeredis")
    r = fakeredis.FakeRedis()
    mine = [k.processing("w[1]", q) for q in ("a", "b:c")]
    others = [k.processing("w1", "a"), p.Keys("app1").processing("w[1]", "a"),
              k.processing("w[1]x", "a")]
    for key in mine + others:
        r.rpush(key, b"job")
    assert sorted(r.keys(k.processing_pattern("w[1]"))) == sorted(x.encode() for x in mine)


@pytest.mark.parametrize("ns", ["", "my app", "tab\there", "nl\n"])
def test_namespace_must_be_non_empty_without_spaces(ns):
    with pytest.raises(ValueError, match="invalid namespace"):
        p.Keys(ns)


def test_supervisor_names_have_no_colon_or_trailing_newline():
    assert p.NAME_RE.match("web-1.example_com")
    assert not any(p.NAME_RE.match(n) for n in ["web:1", "web-1\n", "", "x" * 129])


# -- code and schema agree --------------------------------------------------------------------

@pytest.mark.parametrize("case", [c for c in BAD if "raw" in c], ids=lambda c: c["name"])
def test_schema_rejects_what_the_worker_rejects(case):
    try:
        obj = strict_json(raw_of(case))
    except (ValueError, RecursionError):
        return  # not JSON as other languages read it: the schema never sees it
    if not isinstance(obj, dict):
        assert not JOB.is_valid(obj)
    elif case.get("schema") == "accepts":
        assert case["why"] and JOB.is_valid(obj)  # the known, documented gaps
    else:
        assert not JOB.is_valid(obj), f"schema accepts {case['raw']}"


_VALID = {
    "id": ["j", "x" * 128, "ABCxyz019._:-", "order-42:resize.v2"],
    "args": [[], [1, "two", None, [3.5]], [{"a": {}}]],
    "kwargs": [{}, {"a": 1, "nested": {"b": [True, False]}}, {"ü": "ü"}],
    "reply_to": ["r", "myapp:replies", "reply list with spaces"],
    "result_ttl": [0, 1, 86400, p.MAX_RESULT_TTL],
    "enqueued_at": [0, T0, 1732492800, -1.25],
    "v": [1],
    "max_retries": [0, 3, p.MAX_RETRIES],
    "attempt": [1, 2, p.MAX_ATTEMPT],
    "trace_id": ["abc", None, 7],  # an unknown field: kept and ignored
}

_INVALID = {
    "task": ["", 1, None, [], {}], "id": ["", "x" * 129, "a b", "a/b", "é", "j\n", 1, None],
    "args": [{}, "a", 1, None], "kwargs": [[], "a", 1, None], "reply_to": ["", 1, None, []],
    "result_ttl": [-1, 1.5, "1", True, None, 2**31, 10**20], "enqueued_at": ["1", True, None, []],
    "v": [0, -1, 1.5, "1", True, None],
    "max_retries": [-1, p.MAX_RETRIES + 1, 10**30], "attempt": [0, p.MAX_ATTEMPT + 1, 2**64],
}


def _valid_jobs(n: int = 300):
    rng = random.Random(20241125)
    for _ in range(n):
        job = {"task": rng.choice(["t", "examples.tasks.add", "a.b.c_d"])}
        for key, values in _VALID.items():
            if rng.random() < 0.5:
                job[key] = rng.choice(values)
        yield job


def test_generated_valid_jobs_are_accepted_by_both():
    for job in _valid_jobs():
        assert JOB.is_valid(job), job
        decoded = p.decode_job(p.encode_job(job))
        expected = {"args": [], "kwargs": {}, "v": 1, **job}
        if expected.get("result_ttl") == p.DEFAULT_RESULT_TTL:
            del expected["result_ttl"]  # to_dict() leaves the default out
        if expected.get("attempt") == 1:
            del expected["attempt"]  # (the same)
        assert decoded.to_dict() == expected
        assert decoded.id_assigned == ("id" not in job)


def test_generated_invalid_jobs_are_rejected_by_both():
    for job in _valid_jobs(60):
        for key, values in _INVALID.items():
            for value in values:
                bad = dict(job, **{key: value})
                assert not JOB.is_valid(bad), bad
                with pytest.raises(p.InvalidJob):
                    p.decode_job(p.encode_job(bad))


@pytest.mark.parametrize("name", ["envelope_succeeded.json", "envelope_failed.json"])
def test_golden_envelopes_validate(name):
    assert not list(ENVELOPE.iter_errors(strict_json(golden(name))))


@pytest.mark.parametrize("result", [None, 0, "", [], {}, 5, "ü", [1, {"a": None}], False])
def test_built_envelopes_validate(result):
    ok = p.envelope(id="j", task="t", queue="q", status=p.SUCCEEDED, worker=WORKER, result=result)
    failed = p.envelope(id="j", task=None, queue="q", status=p.FAILED, worker=WORKER, attempts=3,
                        error=p.error_dict(p.E_WORKER_CRASHED, "child exited with SIGKILL"))
    for env in (ok, failed, p.envelope(id="j", task="t", queue="q", status=p.FAILED, worker=WORKER)):
        assert not list(ENVELOPE.iter_errors(strict_json(p.dumps(env))))


@pytest.mark.parametrize("change", [
    {"status": "done"}, {"attempts": 0}, {"id": "a b"}, {"finished_at": None}, {"queue": None},
    {"error": {"type": "X", "message": "m", "traceback": None}},  # succeeded with an error
    {"status": "failed"},  # failed without an error, with a result
    {"v": 0},
])
def test_schema_rejects_malformed_envelopes(change):
    env = json.loads(golden("envelope_succeeded.json"))
    env.update(change)
    assert not ENVELOPE.is_valid(env)
    env = json.loads(golden("envelope_succeeded.json"))
    del env["result"]
    assert not ENVELOPE.is_valid(env)


def test_schemas_describe_warnings_and_job_size():
    env = json.loads(golden("envelope_succeeded.json"))
    assert ENVELOPE.is_valid(dict(env, warnings=["result: 1 unpaired UTF-16 surrogate ..."]))
    assert not ENVELOPE.is_valid(dict(env, warnings=[1]))
    assert not ENVELOPE.is_valid(dict(env, warnings="x"))
    entry = json.loads(golden("dead_entry.json"))
    assert DEAD.is_valid(dict(entry, job_size=10_000_000, warnings=["job: only ..."]))
    assert not DEAD.is_valid(dict(entry, job_size="big"))
    for schema in ("envelope", "dead"):   # every error type of ours is named
        text = (files("redpool") / "schema" / f"{schema}.schema.json").read_text("utf-8")
        for name in (p.E_RESULT_TOO_LARGE, p.E_UNPRINTABLE_ERROR, p.E_WORKER_ERROR):
            assert name in text


def test_dead_entries_validate_and_need_exactly_one_job_field():
    entry = json.loads(golden("dead_entry.json"))
    assert not list(DEAD.iter_errors(entry))
    assert not DEAD.is_valid(dict(entry, job_b64="eA=="))
    del entry["job"]
    assert not DEAD.is_valid(entry)
    assert DEAD.is_valid(dict(entry, job_b64="eA=="))


# -- the docs show the same bytes -------------------------------------------------------------

def test_docs_show_the_golden_walkthrough():
    text = DOCS.read_text("utf-8")
    assert golden("job_walkthrough.json").decode().strip() in text
    assert golden("envelope_succeeded.json").decode().strip() in text
    for name in (p.E_INVALID_JOB, p.E_UNKNOWN_TASK, p.E_PAYLOAD_TOO_LARGE,
                 p.E_UNSERIALIZABLE_RESULT, p.E_RESULT_TOO_LARGE, p.E_WORKER_CRASHED,
                 p.E_UNPRINTABLE_ERROR, p.E_WORKER_ERROR):
        assert f"`{name}`" in text


# -- hostile jobs (tests/corpus.py): refused with a reason, answered when they can be ---------

from corpus import CASES  # noqa: E402  (a test module of its own would split the contract)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_a_hostile_job_is_refused_with_a_reason_and_what_answers_it(case):
    with pytest.raises(p.InvalidJob) as info:
        p.decode_job(case.raw)
    err = info.value
    assert (err.error_type, err.reply_to, err.job_id) == \
        (case.error_type, case.answered_on, case.result_id)
    assert case.reason in err.reason
    # what is salvaged can be written: the envelope and the dead-letter entry are JSON
    # every language reads, and the strings that name keys are whole characters
    for s in (err.reply_to, err.job_id, err.task):
        assert s is None or p.unpaired_surrogate(s) is None
    env = p.failed_envelope_for(err, queue="q", worker=WORKER)
    assert (env is None) == (case.answered_on is None and case.result_id is None)
    if env is not None:
        ENVELOPE.validate(strict_json(p.dumps(env)))
    dead = p.dead_entry(case.raw, queue="q", reason=err.reason, error_type=err.error_type,
                        worker=WORKER, job_id=err.job_id)
    DEAD.validate(strict_json(p.dumps(dead)))
    assert isinstance(p.salvage(case.raw), p.InvalidJob)


def test_nesting_is_allowed_up_to_the_limit_and_counted_from_the_job_object():
    at_limit = b'{"task":"t","args":' + b"[" * 99 + b"]" * 99 + b"}"
    assert p.decode_job(at_limit).task == "t"        # 1 (the object) + 99
    with pytest.raises(p.InvalidJob, match="101 levels, over the limit of 100"):
        p.decode_job(b'{"task":"t","args":' + b"[" * 100 + b"]" * 100 + b"}")
    # brackets inside strings are text, not nesting (with or without escaped quotes)
    text = '"' + "[{" * 200 + '\\"' + "]" * 50 + '"'
    assert p.decode_job(b'{"task":"t","args":[' + text.encode() + b"]}").args[0].startswith("[{")
    # many brackets, little depth: measured exactly, and accepted
    flat = b'{"task":"t","args":[' + b",".join([b"[1,{}]"] * 5000) + b"]}"
    assert len(p.decode_job(flat).args) == 5000


def test_the_largest_and_smallest_doubles_are_numbers_not_refusals():
    job = p.decode_job(b'{"task":"t","args":[1.7976931348623157e308,-1e308,1e-400,5e-324,-0.0],'
                       b'"enqueued_at":1e9}')
    assert job.args[:2] == [1.7976931348623157e308, -1e308] and job.args[2] == 0.0
    assert p.decode_job(b'{"task":"t","args":[' + b"9" * 300 + b']}').args == [int("9" * 300)]


def test_a_surrogate_pair_is_a_character_and_only_an_unpaired_half_is_refused():
    job = p.decode_job(b'{"task":"t","reply_to":"r:\\ud83d\\ude00","args":["\\ud800"]}')
    assert job.reply_to == "r:\U0001F600"
    assert job.args == ["\ud800"]  # a task may take any string JSON can carry
    assert p.unpaired_surrogate("ok \U0001F600") is None and p.unpaired_surrogate("a\udc00") == 1


def test_a_retry_carries_the_job_exactly_even_a_string_utf8_cannot_encode():
    raw = b'{"task":"t","id":"j","args":["a\\ud800b",{"k":"\\udfff"}],"max_retries":2}'
    job = p.decode_job(raw)
    again = p.decode_job(job.retry())
    assert (again.args, again.attempt, again.id) == (job.args, 2, "j")
    assert p.decode_job(p.decode_job(b'{"task":"t","args":["\xc3\xbc"]}').retry()).args == ["ü"]


def test_salvage_reads_the_top_level_beside_a_field_nested_too_deeply():
    deep = b"[" * 50_000 + b"]" * 50_000
    raw = b'{"task":"t","a":' + deep + b',"id":"j","reply_to":"r","b":{"c":' + deep + b"}}"
    err = p.salvage(raw)
    assert (err.job_id, err.reply_to, err.task) == ("j", "r", "t")
    assert p.top_level(b'{"a":[[1]],"b":"[x]","c":{"d":{}}}') == b'{"a":null,"b":"[x]","c":null}'


def test_a_job_not_json_after_a_non_finite_number_is_said_to_be_not_json():
    # (found by tests/test_properties.py: the first parse stops at the number)
    with pytest.raises(p.InvalidJob, match="not valid JSON: Expecting property name"):
        p.decode_job(b'{"id":"job-1","x":[1e400],"task":[{1e400:null}]}')


@pytest.mark.parametrize("raw, top", [
    (b'{"a":[[[1]]],"id":"j"}', b'{"a":null,"id":"j"}'),          # runs of brackets
    (b'{"x":{"y":[]}}', b'{"x":null}'),
    (b'{"a":"]]}","b":[{"[":"}"}],"c":[]}', b'{"a":"]]}","b":null,"c":null}'),
    (b'{"a":' + b"[" * 10**6 + b"]" * 10**6 + b',"id":"j"}', b'{"a":null,"id":"j"}'),
    (b'{"id":"j","a":' + b"[" * 10**6, b'{"id":"j","a":null'),       # never closed
])
def test_top_level_nulls_what_is_nested_below_the_job_object(raw, top):
    from redpool.strictjson import top_level
    assert top_level(raw) == top


@pytest.mark.parametrize("shape", ["chain", "comb", "wide"])
def test_depth_is_exact_whatever_the_shape(shape):
    from redpool.strictjson import too_deep
    one = {"chain": lambda d: b"[" * d + b"]" * d,
           "comb": lambda d: b"[" + b",".join([b"[" * (d - 1) + b"]" * (d - 1)] * 3000) + b"]",
           "wide": lambda d: b"[" + b",".join([b"[" * (d - 1) + b"]" * (d - 1), b"[[1],{}]"] * 3000)
                              + b"]"}[shape]
    for depth in (99, 100, 101, 5000):
        raw = b'{"task":"t","args":' + one(depth) + b"}"
        assert too_deep(raw) == (depth + 1 if depth + 1 > p.MAX_DEPTH else 0), depth


def test_a_job_starting_with_a_utf8_byte_order_mark_is_read_without_it():
    # Given a valid job as .NET's Encoding.UTF8 writes it: a BOM first
    raw = p.encode_job(p.make_job("t.add", [1, 2], id="bom", reply_to="redpool:reply:r"))
    job = p.decode_job(b"\xef\xbb\xbf" + raw)
    # Then it reads as the job itself (RFC 8259 lets a reader ignore the mark)
    assert (job.id, job.task, job.args, job.reply_to) == ("bom", "t.add", [1, 2], "redpool:reply:r")
    # and a job refused for another reason is still salvaged, answered to its producer
    bad = p.salvage(b"\xef\xbb\xbf" + b'{"task": 1, "id": "b2", "reply_to": "redpool:reply:r"}')
    assert isinstance(bad, p.InvalidJob)
    assert (bad.job_id, bad.reply_to) == ("b2", "redpool:reply:r")
    # a mark anywhere else is not ignored
    with pytest.raises(p.InvalidJob):
        p.decode_job(raw + b"\xef\xbb\xbf")
