"""Hostile jobs, hand-picked: bytes a producer can LPUSH that once stopped a supervisor
(an unpaired surrogate in task or reply_to), killed the pool process four times over
(NaN, 1e400 or a huge attempt in a job with retries), or vanished without an answer
(too deep, not UTF-8).  Used at every level: protocol and runner (test_protocol,
test_runner), the loop with fakes (test_supervisor_unit), real daemons
(test_hostile_jobs).

Each case is refused with ``error_type`` and a reason containing ``reason``; it is
answered on ``reply_to`` when that is usable (``answered_on``), under its result key
when it has a valid ``id`` (``result_id``), and dead-lettered in every case.  The
tasks named are those of tests/taskmods/jobs.py; the unit tests register their own.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Case:
    name: str
    raw: bytes
    reason: str
    answered_on: str | None      # the reply list that gets the failed envelope
    result_id: str | None        # the id whose result key gets it
    error_type: str = "InvalidJob"

    def __str__(self) -> str:
        return self.name


def _deep(levels: int) -> bytes:
    return b"[" * levels + b"]" * levels


def _case(name: str, fields: bytes, reason: str, *, reply: bool = True, id: bool = True,
          answered: bool | None = None, **kw) -> Case:
    """A job of ``fields`` (raw JSON object members), with an id and a reply_to of its
    own (``hostile:<name>``) unless told otherwise."""
    head = b""
    if id:
        head += b'"id":"h-' + name.encode() + b'",'
    if reply:
        head += b'"reply_to":"hostile:' + name.encode() + b'",'
    reply_to = f"hostile:{name}" if (reply if answered is None else answered) else None
    return Case(name, b"{" + head + fields + b"}", reason, reply_to, f"h-{name}" if id else None,
                **kw)


CASES = [
    # -- an unpaired UTF-16 surrogate: valid JSON, no UTF-8 string -------------------------------
    _case("surrogate_in_task", rb'"task":"t.add\ud800","args":[1,2]',
          "'task' is not valid Unicode: \"t.add\\ud800\" holds an unpaired UTF-16 surrogate"),
    _case("low_surrogate_task", rb'"task":"\udfff"', "'task' is not valid Unicode"),
    _case("surrogate_task_no_reply", rb'"task":"t.\ud83d"', "'task' is not valid Unicode",
          reply=False),
    _case("surrogate_in_reply_to", rb'"task":"t.add","args":[1,2],"reply_to":"hostile:\ud800"',
          "'reply_to' is not valid Unicode", reply=False),
    _case("surrogate_reply_to_no_id", rb'"task":"t.add","reply_to":"hostile:\udc00x"',
          "'reply_to' is not valid Unicode", reply=False, id=False),
    _case("surrogates_everywhere", rb'"task":"\ud800","reply_to":"\udbff","k\ud800":"\udc00"',
          "'task' is not valid Unicode", reply=False),
    # -- non-finite numbers, in a job with retries on --------------------------------------------
    _case("nan_in_args", rb'"task":"t.boom","max_retries":2,"args":[NaN]',
          "args[0] is NaN, which is not JSON"),
    _case("infinity_in_kwargs", rb'"task":"t.boom","max_retries":2,"kwargs":{"msg":Infinity}',
          "kwargs.msg is Infinity, which is not JSON"),
    _case("overflow_in_args", rb'"task":"t.boom","max_retries":2,"args":[1e400]',
          "args[0] is 1e400, beyond what a double holds"),
    _case("overflow_in_unknown_field", rb'"task":"t.add","args":[1,2],"max_retries":1,'
          rb'"meta":{"w":[0,-1E+999]}', "meta.w[1] is -1E+999, beyond what a double holds"),
    _case("overflow_without_exponent", b'"task":"t.boom","max_retries":1,"args":[' + b"9" * 320
          + b'.0]', "args[0] is 999999999999...999999.0, beyond what a double holds"),
    _case("nan_in_enqueued_at", rb'"task":"t.add","args":[1,2],"enqueued_at":NaN',
          "enqueued_at is NaN"),
    _case("huge_attempt", rb'"task":"t.boom","max_retries":10000,"retry_backoff":1.5,'
          rb'"attempt":1000000', "'attempt' must be a whole number >= 1 and <= 10001"),
    _case("huge_max_retries", rb'"task":"t.boom","max_retries":100000000000000000000',
          "'max_retries' must be a whole number >= 0 and <= 10000"),
    _case("integer_of_5000_digits", b'"task":"t.add","args":[1,' + b"7" * 5000 + b"]",
          "more than 4300 digits"),
    # -- nesting ---------------------------------------------------------------------------------
    _case("nested_101_levels", b'"task":"t.add","args":' + _deep(100),
          "nested too deeply: 101 levels, over the limit of 100"),
    _case("nested_990_levels", b'"task":"t.boom","max_retries":2,"args":[' + _deep(989) + b"]",
          "nested too deeply: 991 levels"),
    _case("nested_100000_levels", b'"task":"t.add","kwargs":' + b'{"a":' * 100_000 + b"1"
          + b"}" * 100_000, "nested too deeply: 100001 levels"),
    Case("nested_before_the_reply_to", b'{"task":"t.add","x":' + _deep(5000)
         + b',"id":"h-nested_before_the_reply_to","reply_to":"hostile:nested_before_the_reply_to"}',
         "nested too deeply: 5001 levels", "hostile:nested_before_the_reply_to",
         "h-nested_before_the_reply_to"),
    # -- not UTF-8 -------------------------------------------------------------------------------
    _case("not_utf8_in_args", b'"task":"t.add","args":["\xff",1]', "job is not UTF-8 text"),
    _case("utf8_encoded_surrogate", b'"task":"t.add\xed\xa0\x80","args":[1,2]',
          "job is not UTF-8 text"),
    _case("not_utf8_in_reply_to", b'"task":"t.add","args":[1,2],"reply_to":"hostile:\xc3"',
          "job is not UTF-8 text", reply=False),
    _case("not_utf8_and_too_deep", b'"task":"t.\xfe","args":' + _deep(2000),
          "job is not UTF-8 text"),
]

#: A job every case is followed by: the worker must still run it.
def follow_up(n: int) -> bytes:
    return b'{"task":"t.add","id":"after-%d","args":[%d,1]}' % (n, n)
