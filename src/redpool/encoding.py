"""How a worker writes JSON: dumps(), which strings never make fail, and a size limit.

Part of the contract: protocol.py re-exports dumps and TooLarge; like it, this module
imports nothing from redpool.

A Python ``str`` can hold what UTF-8 cannot encode: UTF-16 surrogates (U+D800 to
U+DFFF), which ``json.loads`` makes of a producer's ``"\\ud800"`` and the
``surrogateescape`` error handler makes of bytes that are not UTF-8.  A task may return
one or raise with one in its message.  ``dumps`` encodes the usual way first (on the
usual path that costs a ``try`` and a comparison) and only when that fails fixes the
text: a well-formed pair is joined into the character it stands for, which is what any
JSON reader would make of its two escapes; an unpaired one is replaced by U+FFFD, and
the object written says so in a ``warnings`` array.  The alternative of writing the
``\\ud800`` escape would be valid JSON syntax but not valid Unicode: JavaScript would
carry the lone surrogate on, Go would turn it into U+FFFD anyway, Python would fail
again on the next ``.encode()``.
"""

from __future__ import annotations

import base64
import json
import re
from typing import Any

# a pair first (joined), else a lone one (replaced)
_SURROGATE = re.compile("[\ud800-\udbff][\udc00-\udfff]|[\ud800-\udfff]")
_COMPACT = dict(separators=(",", ":"), ensure_ascii=False, allow_nan=False)


class TooLarge(Exception):
    """dumps(obj, limit): the JSON of obj is ``size`` bytes (at least), over ``limit``."""

    def __init__(self, size: int, limit: int, exact: bool = True) -> None:
        super().__init__(f"{'' if exact else 'at least '}{size} bytes, over {limit}")
        self.size, self.limit, self.exact = size, limit, exact


def dumps(obj: Any, limit: int | None = None) -> bytes:
    """Compact JSON, UTF-8, no NaN/Infinity (not JSON; other languages choke on them).
    Strings never make it raise: unpaired surrogates become U+FFFD, and a dict (an
    envelope, a dead-letter entry) says so in ``warnings`` (below).  Over ``limit``
    bytes: TooLarge, found before the UTF-8 copy is made when the text alone is over."""
    text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    if limit is not None and len(text) > limit:
        raise TooLarge(len(text), limit, exact=text.isascii())
    try:
        data = text.encode()
    except UnicodeEncodeError:
        data = encode_fixed(obj, text)
    if limit is not None and len(data) > limit:
        raise TooLarge(len(data), limit)
    return data


def fix(text: str) -> tuple[str, int]:
    """``text`` with every surrogate pair joined and every unpaired surrogate replaced
    by U+FFFD; and how many were replaced."""
    replaced = 0

    def one(m: re.Match) -> str:
        nonlocal replaced
        s = m.group()
        if len(s) == 2:
            return chr(0x10000 + ((ord(s[0]) - 0xD800) << 10) + (ord(s[1]) - 0xDC00))
        replaced += 1
        return "\ufffd"

    return _SURROGATE.sub(one, text), replaced


def surrogate_warning(where: str, n: int) -> str:
    return (f"{where}: {n} unpaired UTF-16 surrogate{'s' if n > 1 else ''} replaced by U+FFFD "
            "(not valid Unicode)")


def encode_fixed(obj: Any, text: str) -> bytes:
    """UTF-8 of ``text`` (``obj`` as compact JSON, which did not encode) with its
    surrogates fixed.  A dict (an envelope, a dead-letter entry) gets a ``warnings``
    array naming each of its fields that had unpaired ones (added to any it has)."""
    if not isinstance(obj, dict):
        return fix(text)[0].encode()
    items: list[str] = []
    warnings: list[str] = []
    had = obj.get("warnings")
    for key, value in obj.items():
        if key == "warnings" and isinstance(had, list):
            continue  # written last, with ours added
        item, n = fix(json.dumps({key: value}, **_COMPACT)[1:-1])
        items.append(item)
        if n:
            warnings.append(surrogate_warning(fix(str(key))[0], n))
    if isinstance(had, list):
        warnings = [fix(w)[0] if isinstance(w, str) else w for w in had] + warnings
    if warnings:
        items.append('"warnings":' + json.dumps(warnings, **_COMPACT))
    return ("{" + ",".join(items) + "}").encode()


def cut(text: str, limit: int, what: str) -> tuple[str, str | None]:
    """``text`` kept to ``limit`` characters: its beginning and its end (where a
    traceback names the exception), with a marker between saying how much is missing;
    and the warning that says so, or None when nothing was cut."""
    if len(text) <= limit:
        return text, None
    keep = max(0, limit - 64)   # (64: room for the marker)
    marker = f"\n[... {len(text) - keep} characters cut ...]\n"
    head = keep // 2
    out = text[:head] + marker + text[len(text) - (keep - head):]
    return out, (f"{what} cut from {len(text)} to {len(out)} characters (over the worker's "
                 f"limit of {limit} for error text)")


def job_fields(raw: bytes, max_job: int | None, keep: int) -> tuple[dict[str, Any], str | None]:
    """A raw job as a dead-letter entry holds it: ``job`` when it is UTF-8, else
    ``job_b64``.  Of a job over ``max_job`` bytes only the first ``keep`` (a producer may
    push hundreds of MB), with ``job_size``, and the warning that says so."""
    out: dict[str, Any] = {}
    warning = None
    cut = max_job is not None and len(raw) > max(max_job, keep)
    if cut:
        warning = f"job: only its first {keep} of {len(raw)} bytes are kept (it is over --max-payload)"
        out["job_size"] = len(raw)
        raw = raw[:keep]
    try:
        out["job"] = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        if cut and e.start >= len(raw) - 3 and e.end == len(raw):  # a character cut in two
            out["job"] = raw[:e.start].decode("utf-8")
        else:
            out["job_b64"] = base64.b64encode(raw).decode("ascii")
    return out, warning
