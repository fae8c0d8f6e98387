"""Hypothesis strategies of hostile job documents, one per class of issue 12, so that
the classes that hold today are tested as they are and each one waiting for a fix is a
test of its own (test_corpus.py).

A document is built as a JSON object of fields (``task`` and this case's ``id`` and
``reply_to``, then fields drawn for the class), written by our own serializer so that
it can hold what json.dumps will not write: NaN, 1e400, a lone surrogate as a
``\\ud800`` escape, nesting deeper than any Python parser reads, duplicate keys.  Each
strategy draws a function of the checker (for the case's label and namespace) that
returns the Case: the raw bytes and what must become of them (invariants.expect).
"""

from __future__ import annotations

import json
import math

from hypothesis import strategies as st

from hostile.invariants import ABSENT, Case, ID_RE, expect

KNOWN = ("task", "id", "args", "kwargs", "reply_to", "result_ttl", "enqueued_at", "v",
         "attempt", "max_retries", "retry_backoff", "retry_backoff_max", "timeout",
         "dead_letter")
#: tests/taskmods/hostile_tasks.py: takes nothing, echoes anything, raises, takes one argument
TASKS = ("h.ok", "h.echo", "h.boom", "h.one")
MAX_INT = 2**31 - 1


class Raw:
    """JSON text written as it is (NaN, 1e400, a 5000-deep array...)."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return f"Raw({self.text[:40]!r}{'...' if len(self.text) > 40 else ''})"


def dump(v, ascii_only: bool) -> str:
    if isinstance(v, Raw):
        return v.text
    if isinstance(v, Members):
        return "{" + ",".join(dump(k, ascii_only) + ":" + dump(x, ascii_only)
                              for k, x in v.pairs) + "}"
    if isinstance(v, dict):
        return dump(Members(list(v.items())), ascii_only)
    if isinstance(v, list):
        return "[" + ",".join(dump(x, ascii_only) for x in v) + "]"
    if isinstance(v, float) and not math.isfinite(v):
        return {math.inf: "Infinity", -math.inf: "-Infinity"}.get(v, "NaN")
    return json.dumps(v, ensure_ascii=ascii_only)


class Members:
    """An object's members in order, duplicates allowed."""

    def __init__(self, pairs: list) -> None:
        self.pairs = pairs


class Doc:
    """What a strategy draws: makes the Case for a checker; shows what was drawn."""

    def __init__(self, build, text: str) -> None:
        self.build, self.text = build, text

    def __call__(self, chk) -> Case:
        return self.build(chk)

    def __repr__(self) -> str:
        return self.text


# -- values ----------------------------------------------------------------------------------

#: every code point UTF-8 can hold: controls, non-BMP, private use; no lone surrogate
TEXT = st.text(st.characters(codec="utf-8"), max_size=12)
#: a string with at least one lone surrogate (JSON can write it as an escape)
SURROGATE_TEXT = st.builds(lambda a, s, b: a + s + b, TEXT,
                           st.characters(categories=["Cs"]), TEXT)
#: integers of every size Python's JSON reads (it refuses more than 4300 digits)
INTS = st.integers() | st.builds(lambda n, sign, low: sign * (10**n + low), st.integers(19, 4000),
                                 st.sampled_from([1, -1]), st.integers())
NUMBERS = INTS | st.floats(allow_nan=False, allow_infinity=False)
NON_FINITE = st.sampled_from([math.nan, math.inf, -math.inf]) | st.sampled_from(
    [Raw("1e400"), Raw("-1e400"), Raw("1E+999"), Raw("NaN"), Raw("-Infinity")])


def json_values(strings=TEXT, numbers=NUMBERS, leaves: int = 10):
    scalars = st.none() | st.booleans() | numbers | strings
    return st.recursive(scalars, lambda ch: st.lists(ch, max_size=4)
                        | st.dictionaries(strings, ch, max_size=4), max_leaves=leaves)


def valid(field: str, v) -> bool:
    """Would the worker accept ``v`` as ``field`` (docs/protocol.md, The job)?"""
    is_int = type(v) is int
    is_num = is_int or (type(v) is float and math.isfinite(v))
    return {
        "task": isinstance(v, str) and v != "",
        "id": isinstance(v, str) and ID_RE.fullmatch(v) is not None,
        "args": isinstance(v, list), "kwargs": isinstance(v, dict),
        "reply_to": isinstance(v, str) and v != "",
        "result_ttl": is_int and 0 <= v <= MAX_INT,
        "enqueued_at": is_num, "v": is_int and v >= 1,
        "attempt": is_int and v >= 1, "max_retries": is_int and v >= 0,
        "dead_letter": type(v) is bool,
    }.get(field, is_num and 0 < v <= MAX_INT)   # the durations


#: values a field takes when it is right; retries kept few and fast, so that every job is
#: answered within the test (--retry-backoff 0.01 --retry-backoff-max 0.05 otherwise)
VALID = {
    "result_ttl": st.integers(0, MAX_INT), "enqueued_at": NUMBERS, "v": st.just(1),
    "attempt": st.integers(1, 3), "max_retries": st.integers(0, 2),
    "retry_backoff": st.floats(0.001, 0.02), "retry_backoff_max": st.floats(0.001, 0.05),
    "timeout": st.floats(5.0, MAX_INT), "dead_letter": st.booleans(),
}


def wrong(field: str, values=None):
    """A value the worker must refuse for ``field`` (a valid one drawn by chance, say
    a max_retries of a million, would make the test wait for a million retries)."""
    return (json_values() if values is None else values).filter(lambda v: not valid(field, v))


# -- documents -------------------------------------------------------------------------------

@st.composite
def fields(draw, values=None, strings=TEXT, tasks=None, forced=None):
    """The fields of a job besides its id and reply_to: a task, its arguments, some
    known fields, unknown fields, and members repeated before their last (the one every
    parser we know keeps).  Seven documents in ten are right but for their values (the
    task takes the arguments, the known fields are valid), so that most reach the task
    and its answer; the others have wrong fields.  ``tasks``: the task's strategy;
    ``forced``: fields always set, name -> strategy."""
    values = json_values(strings) if values is None else values
    fits = draw(st.integers(0, 9)) < 7
    if tasks is None:
        tasks = st.sampled_from(TASKS) if fits else (
            st.sampled_from(TASKS) | strings | wrong("task", values))
    out: dict = {"task": draw(tasks)}
    if not fits:
        out["args"] = draw(st.lists(values, max_size=3) | wrong("args", values))
        if draw(st.booleans()):
            out["kwargs"] = draw(st.dictionaries(strings, values, max_size=3)
                                 | wrong("kwargs", values))
    elif out["task"] == "h.one":
        out["args"] = [draw(values)]
    elif out["task"] != "h.ok":
        out["args"] = draw(st.lists(values, max_size=3))
        if draw(st.booleans()):
            out["kwargs"] = draw(st.dictionaries(strings, values, max_size=3))
    for name in draw(st.lists(st.sampled_from(KNOWN[5:]), max_size=3, unique=True)):
        out[name] = draw(VALID[name] if fits else (VALID[name] | wrong(name, values))
                         if name in VALID else wrong(name, values))
    for name, strategy in (forced or {}).items():
        out[name] = draw(strategy)
    extra = draw(st.dictionaries(strings.filter(lambda k: k not in KNOWN), values, max_size=2))
    out.update(extra)
    dups = draw(st.lists(st.tuples(st.sampled_from(["task", "args", "kwargs", *extra]), values),
                         max_size=2))
    return out, dups


#: the case's own id and reply list mostly (an answer to look for), else left out or wrong
CHANNELS = st.tuples(st.sampled_from(["ok", "ok", "ok", "absent", "wrong"]),
                     st.sampled_from(["ok", "ok", "ok", "absent", "wrong"]))


@st.composite
def documents(draw, values=None, strings=TEXT, channels=CHANNELS, ascii_only=None,
              tasks=None, forced=None):
    """One document, drawn as a Doc.  ``channels``: a strategy of how its (id,
    reply_to) are: "ok" (the case's own), "absent", "wrong" (a value the worker must
    refuse), or for reply_to a function of the case's reply list; ``values``,
    ``strings``, ``tasks``, ``forced``: see fields()."""
    body, dups = draw(fields(values, strings, tasks, forced))
    how = draw(channels)
    wrong_id = draw(wrong("id", json_values(strings) if values is None else values))
    wrong_rt = draw(wrong("reply_to", json_values(strings) if values is None else values))
    ascii_only = draw(st.booleans()) if ascii_only is None else ascii_only

    def build(chk) -> Case:
        label = chk.label()
        doc = {"id": {"ok": label, "absent": ABSENT, "wrong": wrong_id}[how[0]],
               "reply_to": {"ok": chk.reply(label), "absent": ABSENT,
                            "wrong": wrong_rt}.get(how[1], how[1])}
        if callable(doc["reply_to"]):
            doc["reply_to"] = doc["reply_to"](chk.reply(label))
        doc = {k: v for k, v in doc.items() if v is not ABSENT}
        pairs = list(doc.items()) + list(dups) + list(body.items())
        doc.update(body)
        raw = dump(Members(pairs), ascii_only).encode("utf-8")
        return expect(doc, chk.ns, label, raw)
    return Doc(build, f"doc(id, reply_to: {how}, {body!r:.300}, duplicates {dups!r:.100}, "
                      f"ascii {ascii_only})")


# -- documents that are not a readable object ------------------------------------------------

@st.composite
def unreadable(draw):
    """Bytes no worker can answer: not UTF-8, not JSON, JSON but not an object, a
    truncated object.  Each case's label is in the bytes, so that each dead letter is
    told from the others."""
    kind = draw(st.sampled_from(["binary", "text", "not an object", "truncated"]))
    data = draw(st.binary(max_size=40))
    text = draw(TEXT)
    value = draw(json_values() | NON_FINITE)
    cut = draw(st.floats(0, 1, exclude_max=True))

    def build(chk) -> Case:
        label = chk.label()
        if kind == "binary":
            raw = b"\xff" + data + label.encode()
        elif kind == "text":
            raw = (text + " " + label).encode()
        elif kind == "not an object":
            raw = dump([label, value], False).encode()
        else:
            whole = dump({"id": label, "task": "h.ok", "reply_to": chk.reply(label),
                          "args": [value]}, False).encode()
            raw = whole[:len(label) + 8 + int(cut * (len(whole) - len(label) - 9))]
        return Case(raw, label, dead=True)
    return Doc(build, f"unreadable({kind}, {data!r}, {text!r}, {value!r}, {cut})")


#: What UTF-8 or a double cannot hold, mixed with the ordinary
ODD_STRINGS = SURROGATE_TEXT | TEXT
ODD_VALUES = json_values(ODD_STRINGS, NUMBERS | NON_FINITE)


def odd_values_in_jobs_not_retried():
    """Lone surrogates (as escapes), NaN, Infinity and 1e400 in arguments, argument
    names, unknown fields and known fields, of jobs whose task is not a lone surrogate
    and that are not retried (h.boom, the one task that raises, is left out)."""
    return documents(values=ODD_VALUES, strings=ODD_STRINGS, ascii_only=True,
                     tasks=st.sampled_from(["h.ok", "h.echo", "h.one"]) | TEXT
                     | wrong("task", ODD_VALUES))


# -- the classes waiting for a fix -----------------------------------------------------------

def surrogates_in_task_or_reply_to():
    """A lone surrogate in the task's name or in reply_to (after the case's own reply
    list's name: the key the producer waits on must stay untouched)."""
    return (documents(values=ODD_VALUES, ascii_only=True, tasks=SURROGATE_TEXT)
            | documents(values=ODD_VALUES, ascii_only=True, channels=st.tuples(
                st.just("ok"), st.just(lambda r: r + "\udc80"))))


def retried(values, strings=TEXT):
    """A job retried (its task raises, max_retries 1 or 2) carrying ``values``: the
    retry is the job written again."""
    return documents(values=values, strings=strings, ascii_only=True, tasks=st.just("h.boom"),
                     forced={"max_retries": st.integers(1, 2)})


def non_finite_numbers_in_retried_jobs():
    return retried(json_values(numbers=NUMBERS | NON_FINITE))


def surrogates_in_retried_jobs():
    return retried(json_values(ODD_STRINGS), ODD_STRINGS)


def deep_nesting():
    """A value nested deeper than Python's parser reads (about 1000 levels) somewhere
    after the id and reply_to; the job still has them, so it must be answered."""
    deep = st.integers(990, 100_000).map(lambda n: Raw("[" * n + "]" * n))
    return documents(values=json_values() | deep, channels=st.just(("ok", "ok")))


@st.composite
def not_utf8(draw):
    """A job whose id and reply_to are readable, with bytes that are not UTF-8 after
    them: it must be answered (its producer is waiting), not only dead-lettered."""
    bad = draw(st.sampled_from([b"\xff", b"\xc0\xaf", b"\xed\xa0\x80", b"\x80",
                                b"\xf5\x80\x80\x80"]))
    where = draw(st.sampled_from(["task", "args", "extra"]))

    def build(chk) -> Case:
        label = chk.label()
        head = b'{"id":"%s","reply_to":"%s",' % (label.encode(), chk.reply(label).encode())
        tail = {"task": b'"task":"h.ok%s"}' % bad, "args": b'"task":"h.echo","args":["%s"]}' % bad,
                "extra": b'"task":"h.ok","x":"%s"}' % bad}[where]
        return Case(head + tail, label, id=label, reply_to=chk.reply(label))
    return Doc(build, f"not_utf8({bad!r}, {where})")


def fixed(members: bytes, reply_suffix: bytes | None = None, **kw):
    """A document written by hand (for @example): ``members`` after this case's id and
    reply_to; ``reply_suffix``: written after the reply list's name (which is then
    not expected to be answered on); ``kw``: more of the Case's expectations."""
    def build(chk) -> Case:
        label = chk.label()
        reply = chk.reply(label).encode() + (reply_suffix or b"")
        raw = b'{"id":"%s","reply_to":"%s",%s}' % (label.encode(), reply, members)
        return Case(raw, label, id=label,
                    reply_to=None if reply_suffix else chk.reply(label), **kw)
    return Doc(build, f"fixed({members!r:.200}, reply_suffix={reply_suffix!r})")
