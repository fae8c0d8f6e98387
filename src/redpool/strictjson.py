"""The JSON a worker takes from a producer: RFC 8259 text, within limits.

Part of the contract (docs/protocol.md, "JSON rules"): protocol.py reads every job
through here, and this module imports nothing from redpool.

Python's json module reads more than JSON, and its parser recurses, so three kinds of
valid-looking input would otherwise reach the worker and break it later, far from
their cause (a retry re-encodes the job with allow_nan=False and kills its process; a
message about a field 990 levels deep overflows the stack):

* ``NaN``, ``Infinity`` and ``-Infinity`` are not JSON; ``1e400`` is, but overflows a
  double to infinity.  Both are refused where the parser meets them, as Go's
  encoding/json refuses them (a syntax error; "cannot unmarshal number 1e400 into
  float64"), and the message names where: ``args[0] is 1e400``.  The hooks are one
  prebuilt decoder: ``parse_constant`` costs nothing unless such a literal appears,
  ``parse_float`` one Python call per number with a fraction or an exponent (about
  65 ns; measured in docs/design.md, "Reading a job").
* Nesting deeper than MAX_DEPTH is refused before parsing.  The count of ``[`` and
  ``{`` bounds the depth and costs two byte scans; only a job with more brackets than
  the limit is measured exactly, with no recursion.
* An unpaired UTF-16 surrogate (``"\\ud800"``) is valid JSON that no UTF-8 text can hold;
  ``unpaired_surrogate`` finds one in a string that must become a Redis key.
"""

from __future__ import annotations

import json
import re
import sys
from typing import Any

#: The deepest a job may nest, counting the job object itself as level 1: Ruby's JSON
#: default (max_nesting 100, for parsing and generating alike), so that every job a
#: worker accepts can be read back by any mainstream parser, and far below the ~1000
#: levels at which Python's recursive parser and encoder give up.
MAX_DEPTH = 100


class Refused(ValueError):
    """Text that is not a job a worker can take; ``reason`` says why, for a human."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _NonFinite(Exception):
    """Raised by the parser hooks (not a ValueError: the parser's own errors are)."""


def _constant(name: str) -> Any:
    raise _NonFinite(name)


def _float(text: str) -> float:
    f = float(text)
    if f - f != 0.0:  # inf - inf is nan: true exactly for an overflow
        raise _NonFinite(text)
    return f


_DECODER = json.JSONDecoder(parse_constant=_constant, parse_float=_float)


def loads(text: str, raw: bytes | None = None) -> Any:
    """``text`` parsed as a job's JSON; Refused saying why it is not one.  ``raw``: the
    bytes ``text`` came from, if the caller has them (the depth is measured on them)."""
    if raw is None:
        raw = text.encode("utf-8", "surrogatepass")
    # (too_deep's first test, inline: this is every job's path)
    if raw.count(b"[") + raw.count(b"{") > MAX_DEPTH and (depth := too_deep(raw)):
        raise Refused(f"job is nested too deeply: {depth} levels, over the limit of "
                      f"{MAX_DEPTH} (the job object is level 1): flatten the data, or store "
                      "it elsewhere and pass a reference")
    try:
        return _DECODER.decode(text)
    except _NonFinite:
        raise Refused(_non_finite(text)) from None
    except RecursionError:  # pragma: no cover - too_deep() refused it first
        raise Refused("job is not valid JSON: nested too deeply") from None
    except ValueError as e:
        raise Refused(_not_json(e)) from None


def _not_json(e: ValueError) -> str:
    if isinstance(e, json.JSONDecodeError):
        return f"job is not valid JSON: {e}"
    # (else an integer longer than Python converts: 4300 digits by default)
    return (f"job holds an integer of more than {sys.get_int_max_str_digits()} digits, "
            "more than a worker reads: send it as a string")


# -- depth ------------------------------------------------------------------------------------

# a string, or a run of opening or of closing brackets (a run is one step, however long)
_TOKEN = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[\[{]+|[\]}]+', re.DOTALL)
_RUN = re.compile(rb"\[+|\]+")
_ESCAPE = re.compile(rb"\\.", re.DOTALL)
_NOT_STRUCTURE = bytes(sorted(set(range(256)) - set(b'"[]{}')))
_FOLD = bytes.maketrans(b"{}", b"[]")  # an object nests as an array does


def too_deep(raw: bytes) -> int:
    """How deep ``raw`` nests, if that is more than MAX_DEPTH; else 0.  Brackets inside
    strings do not count.  Exact for JSON, an estimate for text that is not.

    All in C loops (bytes methods), no recursion, no Python step per byte: escapes
    dropped, then everything but quotes and brackets (braces read as brackets: only
    the depth counts); then the strings (in nearly every job none holds a bracket, so
    each is a bare pair of quotes); then, while there are many, the innermost pairs, a
    level per pass; then a step per run of brackets.  A long chain costs as little as
    a wide shallow tree."""
    if raw.count(b"[") + raw.count(b"{") <= MAX_DEPTH:
        return 0  # (every job of ordinary shape stops here)
    if b"\\" in raw:
        raw = _ESCAPE.sub(b"", raw)
    s = raw.translate(_FOLD, _NOT_STRUCTURE).replace(b'""', b"")
    if b'"' in s:  # a string holds brackets: keep what is outside the strings
        s = b"".join(s.split(b'"')[::2])
    levels = 0  # removed so far
    while levels < MAX_DEPTH and s.count(b"[]") * 200 > len(s) * (levels + 1):
        # many innermost pairs for the length (runs of one bracket are short: a step
        # per run would cost more than a pass), so remove them in one pass: a level (a
        # non-overlapping replace removes exactly the innermost pairs)
        s, levels = s.replace(b"[]", b""), levels + 1
    depth = levels + _deepest(s)  # (few runs left: a step each)
    return depth if depth > MAX_DEPTH else 0


def _deepest(s: bytes) -> int:
    """The greatest depth reached in ``s``, a sequence of brackets: a step per run."""
    depth = deepest = 0
    for m in _RUN.finditer(s):
        n = m.end() - m.start()
        if s[m.start()] == 0x5B:  # [
            depth += n
            deepest = max(deepest, depth)
        else:
            depth -= n
    return deepest


def lenient(text: str) -> Any:
    """``text`` parsed leniently, to salvage fields from a job being refused: NaN and
    infinities pass, an integer too long to convert is null."""
    return _LENIENT.decode(text)


def _int(text: str) -> int | None:
    return int(text) if len(text) <= sys.get_int_max_str_digits() else None


_LENIENT = json.JSONDecoder(parse_int=_int)


def top_level(raw: bytes) -> bytes:
    """``raw`` with every array or object nested in the top-level one replaced by
    ``null``: the fields of a job too deep to parse whole, for salvage."""
    out, depth, last = [], 0, 0
    for m in _TOKEN.finditer(raw):
        c, n = raw[m.start()], m.end() - m.start()
        if c in b"[{":
            if depth < 2 <= depth + n:  # level 2 begins in this run
                out.append(raw[last:m.start() + 1 - depth])
            depth += n
        elif c in b"]}":
            if depth - n < 2 <= depth:  # and ends in this one
                out.append(b"null")
                last = m.start() + depth - 1
            depth -= n
    out.append(raw[last:] if depth < 2 else b"null")
    return b"".join(out)


# -- non-finite numbers -----------------------------------------------------------------------

class _Mark:
    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text


def _mark_float(text: str) -> Any:
    f = float(text)
    return _Mark(text) if f - f != 0.0 else f


def _non_finite(text: str) -> str:
    """Where the first NaN, Infinity or overflowing number is, and what to send instead
    (a second parse, marking them: only for a job being refused)."""
    try:
        obj = json.JSONDecoder(parse_constant=_Mark, parse_float=_mark_float).decode(text)
    except ValueError as e:  # not JSON past the first such number: that is the news
        return _not_json(e)
    where, literal = _find_mark(obj)
    if literal in ("NaN", "Infinity", "-Infinity"):
        return (f"{where} is {literal}, which is not JSON (JSON has no NaN or infinity): "
                "send null, or the value as a string")
    shown = literal if len(literal) <= 24 else f"{literal[:12]}...{literal[-8:]}"
    return (f"{where} is {shown}, beyond what a double holds (about 1.8e308): send it as "
            "a string")


def _find_mark(obj: Any) -> tuple[str, str]:
    """(path, literal) of the first _Mark in document order, iteratively."""
    todo: list[tuple[str, Any]] = [("", obj)]
    while todo:
        path, v = todo.pop()
        if isinstance(v, _Mark):
            return path or "the job", v.text
        if isinstance(v, dict):
            todo.extend((_key_path(path, k), x) for k, x in reversed(v.items()))
        elif isinstance(v, list):
            todo.extend((f"{path}[{i}]", x) for i, x in reversed(list(enumerate(v))))
    return "a number", "NaN"  # (hidden by a repeated field name: say what we know)


_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def _key_path(path: str, key: str) -> str:
    if _IDENT.match(key):
        return f"{path}.{key}" if path else key
    return f"{path}[{json.dumps(key)}]"


# -- Unicode ----------------------------------------------------------------------------------

def unpaired_surrogate(s: str) -> int | None:
    """The index of the first unpaired UTF-16 surrogate in ``s``, or None.  JSON's
    ``"\\ud800"`` parses to one (a pair becomes the character it encodes); no UTF-8
    text, hence no Redis key written by a UTF-8 client, can hold it."""
    if s.isascii():
        return None
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as e:
        return e.start
    return None


def not_unicode(name: str, value: str, why: str) -> str:
    """The reason a field holding an unpaired surrogate is refused (``why``: and so?)."""
    i = unpaired_surrogate(value) or 0
    return (f"'{name}' is not valid Unicode: {json.dumps(value)[:60]} holds an unpaired "
            f"UTF-16 surrogate (\\u{ord(value[i]):04x} at character {i}; a string cut inside a "
            f"surrogate pair leaves one, e.g. by JavaScript's slice()), and {why}")


def dumps_exactly(obj: Any) -> bytes:
    """``obj`` (a decoded job) as compact UTF-8 JSON that reads back as the same: a
    string holding an unpaired surrogate, which UTF-8 cannot encode, is written
    escaped (``\\ud800``), as its producer wrote it."""
    text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    try:
        return text.encode()
    except UnicodeEncodeError:
        return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode()
