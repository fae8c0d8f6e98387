"""Which keys a worker answers on: the rule for a job's ``reply_to``, declared once.

A job names the list its answer is pushed onto, and the worker gives that list a TTL.
Left open, that lets any producer -- even one whose own ACL forbids a key -- have the
worker, whose ACL is wider, push onto another application's list or another
namespace's queue and set its TTL, so that the list later vanishes with what it held.
So the operator decides where answers may go: lists under ``<ns>:reply:`` always (the
Python client's, and the documentation's examples), plus the patterns the workers are
started with (``--reply-to``, REDPOOL_REPLY_TO).  A job whose ``reply_to`` is
elsewhere is refused (runner.py) and answered through its result key only.

The same patterns go into the worker's ACL (``redpool acl worker --reply-to ...``), so
they are Redis's glob, as ACL key patterns and SCAN MATCH read it: ``*``, ``?``,
``[abc]``, ``[a-z]``, ``[^0-9]``, and ``\\`` to take the next character literally.  They
are matched as Redis matches them, byte by byte on the key's UTF-8 encoding, so the
worker's check and the server's cannot disagree.  Forms Redis reads in surprising ways
(an unclosed ``[``, a ``-`` in a set that is not a range, a trailing ``\\``) are refused.

Keys of the namespace other than reply lists are never allowed, whatever the patterns:
a reply pushed onto a queue would corrupt it.  A pattern that can only name such keys
is refused at start-up (check_patterns); one that merely could (``red*``) is accepted,
and the namespace's keys stay refused one by one.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterable

from .keys import Keys, glob_escape

#: Characters an ACL rule cannot hold in a key pattern (a token, or a selector's bounds).
_NOT_IN_ACL = re.compile(r"[\s()]")


def check_pattern(pattern: str) -> str:
    """``pattern`` if Redis and this module read it alike; ValueError saying why not."""
    if not pattern or _NOT_IN_ACL.search(pattern):
        raise ValueError(f"invalid key pattern {pattern!r}: must be non-empty, without spaces "
                         "or parentheses (it goes into an ACL rule too)")
    _regex(pattern.encode("utf-8", "surrogatepass"))
    return pattern


def check_patterns(namespace: str, patterns: Iterable[str]) -> tuple[str, ...]:
    """``patterns`` checked: each well formed and not inside ``namespace`` (but under
    its ``reply:`` prefix, which is always allowed anyway).  ValueError saying why."""
    own = (f"{namespace}:", f"{{{namespace}}}:")
    replies = Keys(namespace).reply("")
    for p in patterns:
        check_pattern(p)
        fixed = literal_prefix(p)
        if fixed.startswith(own) and not fixed.startswith(replies):
            raise ValueError(
                f"reply pattern {p!r} names keys inside the namespace {namespace!r}, where "
                f"redpool keeps its queues and state: a reply pushed there could corrupt them; "
                f"reply lists in the namespace go under {replies!r}, which is always allowed")
    return tuple(patterns)


def literal_prefix(pattern: str) -> str:
    """What every key ``pattern`` matches starts with: its text up to the first
    wildcard, escapes undone."""
    out = []
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if c in "*?[":
            break
        if c == "\\" and i + 1 < len(pattern):
            i += 1
            c = pattern[i]
        out.append(c)
        i += 1
    return "".join(out)


class ReplyRule:
    """The keys one worker answers on: under ``<ns>:reply:``, or matching one of the
    operator's patterns and outside the namespace.  Built once per process; a check
    is a prefix test, plus one compiled regular expression for the other keys."""

    __slots__ = ("reply_prefix", "own", "patterns", "_match")

    def __init__(self, namespace: str, patterns: Iterable[str] = ()) -> None:
        self.patterns = check_patterns(namespace, patterns)
        self.reply_prefix = Keys(namespace).reply("")
        # our keys: <ns>:..., and on Redis Cluster the namespace-wide {<ns>}:... (refused
        # on one server too: a producer has no reason to name such a key)
        self.own = (f"{namespace}:", f"{{{namespace}}}:")
        self._match = None
        if self.patterns:
            either = b"|".join(_regex(p.encode("utf-8", "surrogatepass")) for p in self.patterns)
            self._match = re.compile(b"(?s:" + either + b")").fullmatch

    def allows(self, key: str) -> bool:
        if key.startswith(self.reply_prefix):
            return True
        if key.startswith(self.own) or self._match is None:
            return False
        return self._match(key.encode("utf-8", "surrogatepass")) is not None

    def ours(self, key: str) -> bool:
        """One of the namespace's own keys, not a reply list: never a place to push."""
        return key.startswith(self.own) and not key.startswith(self.reply_prefix)

    def refusal(self, key: str) -> str:
        """Why ``key`` may not be answered on, and what to do, for a human."""
        allowed = ", ".join([f"{self.reply_prefix}*", *self.patterns])
        if self.ours(key):
            return (f"'reply_to' {key!r} is one of redpool's own keys (a reply pushed there "
                    f"could corrupt a queue): use a key under {self.reply_prefix!r}")
        return (f"'reply_to' {key!r} is not a key this worker answers on (allowed: "
                f"{allowed}): use a key under {self.reply_prefix!r}, or start the workers with "
                f"--reply-to {shlex.quote(suggest(key))} (and grant it in their ACL: "
                f"redpool acl worker --reply-to ...)")


def suggest(key: str) -> str:
    """A pattern an operator could allow for ``key``: its family when it looks like
    ``app:replies:<id>`` (``app:replies:*``), else the key and what may follow it."""
    head, sep, _ = key.rpartition(":")
    if sep and ":" in head:
        return glob_escape(head) + ":*"
    return glob_escape(key) + "*"


def _regex(pattern: bytes) -> bytes:
    """The regular expression (bytes) of a Redis glob (util.c, stringmatchlen)."""
    out: list[bytes] = []
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i:i + 1]
        if c == b"*":
            if not out or out[-1] != b".*":
                out.append(b".*")
        elif c == b"?":
            out.append(b".")
        elif c == b"\\":
            if i + 1 == n:
                raise ValueError(f"invalid key pattern {pattern.decode(errors='replace')!r}: "
                                 "it ends with a '\\' that escapes nothing")
            i += 1
            out.append(re.escape(pattern[i:i + 1]))
        elif c == b"[":
            i, part = _set(pattern, i + 1)
            out.append(part)
        else:
            out.append(re.escape(c))
        i += 1
    return b"".join(out)


def _set(pattern: bytes, i: int) -> tuple[int, bytes]:
    """``[...]`` from just after its ``[``: (the index of its ``]``, a regex class)."""
    shown = pattern.decode(errors="replace")
    negate = pattern[i:i + 1] == b"^"
    i += negate
    items: list[bytes] = []
    while True:
        if i >= len(pattern):
            raise ValueError(f"invalid key pattern {shown!r}: a '[' is not closed by ']'")
        c = pattern[i:i + 1]
        if c == b"]":
            break
        if c == b"-":  # not between two characters (a-z), which Redis reads its own ways
            raise ValueError(f"invalid key pattern {shown!r}: a '-' in a [set] must join two "
                             "characters, as in [a-z] (write \\- for the character '-')")
        if c == b"\\":
            if i + 1 >= len(pattern):
                raise ValueError(f"invalid key pattern {shown!r}: a '[' is not closed by ']'")
            i += 1
            items.append(re.escape(pattern[i:i + 1]))
        elif pattern[i + 1:i + 2] == b"-" and i + 2 < len(pattern) \
                and pattern[i + 2:i + 3] not in (b"]", b"\\"):
            lo, hi = sorted((pattern[i], pattern[i + 2]))  # Redis swaps a reversed range
            items.append(re.escape(bytes([lo])) + b"-" + re.escape(bytes([hi])))
            i += 2
        else:
            items.append(re.escape(c))
        i += 1
    if not items:  # Redis: "[]" matches nothing, "[^]" any one character
        return i, b"." if negate else b"(?!)"
    return i, b"[" + (b"^" if negate else b"") + b"".join(items) + b"]"
