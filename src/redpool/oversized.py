"""Jobs far over --max-payload: refused by the supervisor without ever being read whole.

A producer may push a job of hundreds of megabytes.  Read whole (reserved, piped to a
pool process, parsed there, then sent back to Redis to be removed by value) it cost the
supervisor about ten times its size.  Instead reserve.lua returns a job longer than
``limit()`` as {length, its first DEAD_JOB_KEPT bytes, sha1, its last DEAD_JOB_KEPT
bytes} while the job itself moves into our processing list as any other (so a crash at
any point leaves it there, whole, for the reaper or our next start to put back).  The
supervisor answers it from those bytes alone: PayloadTooLarge to its producer (id and
reply_to are read from the head and the tail: ``known_fields``), and a dead-letter entry
holding the head and ``job_size``; its completion names it by ``"<sha1> <length>"``, and
complete.lua finds and removes it by hash, in Redis.  Its bytes never reach Python.

The waiters' BLMOVE returns whole elements: ``blmove`` reads its reply from the socket
itself, keeping the head and tail of such a job and hashing the rest as it streams past;
on Redis Cluster nodes.send_by_node reads it with the same ``read_bulk`` (only a BLMOVE
redirected while its slot moves is read whole by redis-py, and block_reserve drops it to
the same at once: docs/design.md).
"""

from __future__ import annotations

import base64
import hashlib
import re
import socket
import time

import redis

from . import protocol as p
from .completion import Completion
from .strictjson import _LENIENT as _DECODER   # (NaN passes, a huge integer is null)


class Oversized(bytes):
    """The head of a job too large to read: what stands for it in the supervisor.  Its
    ``size`` is the whole job's length, ``sha`` the SHA-1 of the whole job (hex)."""

    size: int
    sha: str
    tail: bytes   # its last DEAD_JOB_KEPT bytes (where a producer may write reply_to)

    # Two jobs may share a head: one known by its head is told apart from another by its
    # hash and length (a Counter of what the supervisor holds keeps both: Supervisor.held).
    # Against plain bytes it compares as its head does (its hash differs from theirs,
    # so as a key it is never taken for a whole job).
    def __eq__(self, other):
        if other.__class__ is not Oversized:
            return NotImplemented
        return (self.sha, self.size) == (other.sha, other.size)

    def __ne__(self, other):
        if other.__class__ is not Oversized:
            return NotImplemented
        return (self.sha, self.size) != (other.sha, other.size)

    def __hash__(self) -> int:
        return hash((self.sha, self.size))

    @property
    def name(self) -> str:
        """How a completion names it (lua/_by_hash.lua)."""
        return f"{self.sha} {self.size}"


def limit(max_payload: int) -> int:
    """The length over which a job is returned as its head: one no worker would run
    (even a retry of a job at the limit grows by at most RETRY_SLACK), and longer than
    the head itself."""
    return max(max_payload + p.RETRY_SLACK, p.DEAD_JOB_KEPT)


def from_reply(reply: list) -> Oversized:
    """reserve.lua's {length, head, sha1, tail} of a job over the limit."""
    job = Oversized(reply[1])
    job.size = int(reply[0])
    job.sha = reply[2].decode() if isinstance(reply[2], bytes) else str(reply[2])
    job.tail = reply[3]
    return job


def read_list(script, key: str, over: int) -> list:
    """The elements of the list ``key`` through lua/processing.lua: each whole, or as
    its Oversized head when longer than ``over`` (0: none is)."""
    return [from_reply(e) if isinstance(e, list) else e
            for e in script(keys=[key], args=[over, p.DEAD_JOB_KEPT])]


def from_raw(raw: bytes, head: int = p.DEAD_JOB_KEPT) -> Oversized:
    """The same, of a job a waiter's BLMOVE brought whole (it is dropped at once)."""
    job = Oversized(raw[:head])
    job.size = len(raw)
    job.sha = hashlib.sha1(raw).hexdigest()
    job.tail = raw[-head:]
    return job


def head_fields(head: bytes) -> dict:
    """What identifies the producer of a job of which only ``head`` (its first bytes)
    is known: the top-level members that are whole within it, read leniently one by
    one, as protocol._salvaged reads a whole job (id, reply_to, result_ttl, task,
    enqueued_at, attempt: protocol._usable).  Stops at the first member cut off or not
    JSON; never raises."""
    text = head.decode("utf-8", "surrogateescape")
    obj: dict = {}
    try:
        i = _WS.match(text, 1 if text.startswith("\ufeff") else 0).end()
        if text[i:i + 1] != "{":
            return {}
        i += 1
        while True:
            i = _WS.match(text, i).end()
            if text[i:i + 1] != '"':
                break
            key, i = _DECODER.raw_decode(text, i)
            i = _WS.match(text, i).end()
            if text[i:i + 1] != ":":
                break
            value, i = _DECODER.raw_decode(text, _WS.match(text, i + 1).end())
            obj[key] = value   # (the last of duplicates, as a whole job is read)
            i = _WS.match(text, i).end()
            if text[i:i + 1] != ",":
                break
            i += 1
    except (ValueError, RecursionError):   # cut off there, or not JSON
        pass
    return obj


#: The most places of the tail tried as the start of its top-level members.
TAIL_TRIES = 64


def tail_members(tail: bytes) -> dict:
    """The top-level members at the end of a job of which ``tail`` is the last bytes
    (redpool's own producers write reply_to after args).  Each comma followed by a
    quote (whitespace between) may start a member; read from that quote as an object,
    the top-level members are those whose object ends where the job does (a nested
    object ends at its own brace, with more after it).  Tried from the right, at most
    TAIL_TRIES places, until one is not top-level: the members after the last nested
    value.  Best effort, as salvage is: a job that is not JSON may mislead it, and then
    only as its own producer could (the reply rule still applies)."""
    text = tail.decode("utf-8", "surrogateescape").rstrip(" \t\r\n")
    found: dict = {}
    for m in list(_MEMBER.finditer(text))[:-TAIL_TRIES - 1:-1]:
        start = m.end() - 1   # (the quote)
        try:
            obj, end = _DECODER.raw_decode("{" + text[start:])
        except (ValueError, RecursionError):
            break
        if not isinstance(obj, dict) or end != len(text) - start + 1:
            break
        found = obj
    return found


_MEMBER = re.compile(r',[ \t\r\n]*"')


def known_fields(job: Oversized) -> dict:
    """What identifies the producer of ``job``: the members read from its head, then
    those of its tail (a later member wins, as when a whole job is read)."""
    return p._usable({**head_fields(job), **tail_members(getattr(job, "tail", b""))})


_WS = re.compile(r"[ \t\r\n]*")


def refusal(job: Oversized, queue: str, crashes: int, cfg, *, answer: bool = True):
    """The completion of a job over the limit: PayloadTooLarge to its producer, when
    its head names a usable id or reply_to, and its dead-letter entry (the head, with
    ``job_size``).  It never ran (started_at null), unless a crash says a run of it
    did start (a worker of another --max-payload ran it).  ``answer`` False: the
    dead-letter entry alone (what the head names cannot be written to).
    Returns the job_finished event's fields and the completion."""
    found = known_fields(job)
    reason = (f"payload is {job.size} bytes, over the limit of {cfg.max_payload} "
              "(--max-payload): store large data elsewhere and pass a reference")
    bad = p.InvalidJob(reason, p.E_PAYLOAD_TOO_LARGE, **(found if answer else {}))
    if bad.reply_to is not None and not cfg.reply_rule().allows(bad.reply_to):
        bad.reply_to = None  # as a pool process would have refused it (runner.py)
    ran = crashes > 0 or bad.attempt > 1
    env = p.failed_envelope_for(bad, queue=queue, worker=cfg.name, crashes=crashes,
                                started_at=time.time() if ran else None)
    entry = p.dead_entry(b"", queue=queue, reason=reason, error_type=p.E_PAYLOAD_TOO_LARGE,
                         worker=cfg.name, job_id=bad.job_id)
    del entry["job"]
    entry.update(_kept(bytes(job)), job_size=job.size)
    entry["warnings"] = [f"job: only its first {len(job)} of {job.size} bytes are kept "
                         "(it is over --max-payload)"]
    meta = {"id": bad.job_id, "task": bad.task, "status": p.FAILED,
            "error_type": p.E_PAYLOAD_TOO_LARGE,
            "result_id": bad.job_id if bad.result_ttl > 0 else None, "ttl": bad.result_ttl,
            "reply_to": bad.reply_to, "duration": 0.0, "error": reason}
    return meta, Completion(queue, job, meta["result_id"] if env else None, bad.result_ttl,
                            bad.reply_to if env else None, p.dumps(env) if env else None,
                            p.dumps(entry))


def _kept(head: bytes) -> dict:
    """The head as a dead-letter entry holds it: text when UTF-8 (a character the cut
    split in two is left out), else base64 (as encoding.job_fields does)."""
    try:
        return {"job": head.decode("utf-8")}
    except UnicodeDecodeError as e:
        if e.start >= len(head) - 3 and e.end == len(head):
            return {"job": head[:e.start].decode("utf-8")}
    return {"job_b64": base64.b64encode(head).decode("ascii")}


#: Bytes read from the socket at a time while a waiter reads a BLMOVE reply itself.
CHUNK = 65536


def blmove(conn, src: str, dst: str, timeout: float, over: int) -> bytes | Oversized | None:
    """BLMOVE src dst RIGHT LEFT, its reply read here rather than by redis-py, so that a
    job longer than ``over`` bytes is never held whole: its head is kept and the rest
    hashed as it streams past (the job itself moved, whole, into ``dst``, as ever).
    redis-py (hiredis) would buffer it, then copy it into a bytes object: twice its size,
    in a supervisor that refuses it anyway.  ``conn``: a client of one server (its
    connection pool lends the connection); any other reply is redis-py's error or None."""
    c = conn.connection_pool.get_connection()
    try:
        c.send_command("BLMOVE", src, dst, "RIGHT", "LEFT", timeout)
        out = read_bulk(c, over)
    except BaseException:
        c.disconnect()   # (a reply may be half read: start afresh)
        raise
    finally:
        conn.connection_pool.release(c)
    return out


def read_bulk(c, over: int) -> bytes | Oversized | None:
    """The reply of the command just sent on connection ``c`` (nothing else pending:
    bytes read past the reply would be lost), a bulk string or nil; an error reply is
    raised as redis-py raises it (MOVED, ASK, TRYAGAIN ... included), read in full."""
    sock = c._sock

    def recv(into) -> int:
        try:
            k = sock.recv_into(into)
        except socket.timeout:
            raise redis.TimeoutError("Timeout reading from the socket") from None
        except OSError as e:
            raise redis.ConnectionError(f"Error while reading from the socket: {e}") from None
        if not k:
            raise redis.ConnectionError("Connection closed by server.")
        return k

    chunk = bytearray(CHUNK)
    buf = b""
    while b"\r\n" not in buf:
        if len(buf) > CHUNK:
            raise redis.ConnectionError("Protocol error: no line in the reply")
        buf += chunk[:recv(chunk)]
    line, _, rest = buf.partition(b"\r\n")
    if line[:1] == b"-":
        raise c._parser.parse_error(line[1:].decode("utf-8", "replace"))
    if line in (b"$-1", b"_", b"*-1"):
        return None
    if line[:1] != b"$" or not line[1:].isdigit():
        raise redis.ConnectionError(f"Protocol error: unexpected reply {line[:20]!r}")
    n = int(line[1:])
    if n <= over:   # (an ordinary job: read into a buffer of its size)
        body = bytearray(n + 2)
        seen = len(rest)
        body[:seen] = rest
        with memoryview(body) as view:
            while seen < n + 2:
                seen += recv(view[seen:])
        del body[n:]
        return bytes(body)
    sha, head, tail, seen = hashlib.sha1(), bytearray(), bytearray(), 0
    keep = p.DEAD_JOB_KEPT   # (seen: bytes of body and CRLF)
    with memoryview(chunk) as view:
        while True:
            take = rest[:max(0, n - seen)]
            sha.update(take)
            if len(head) < keep:
                head += take[:keep - len(head)]
            tail += take
            if len(tail) > 2 * keep:
                del tail[:-keep]
            seen += len(rest)
            if seen >= n + 2:
                break
            rest = view[:recv(view[:min(CHUNK, n + 2 - seen)])]
    job = Oversized(bytes(head))
    job.size, job.sha, job.tail = n, sha.hexdigest(), bytes(tail[-keep:])
    return job
