"""Dead-letter administration: list, requeue and purge entries of the dead-letter list.

On one server there is one list, ``<ns>:dead``; on Redis Cluster each queue has its own,
``<ns>:dead:{<queue>}``, found with SCAN (or named by --queue).  Every command works
list by list (deployment.dead_lists), so the two are one code path: a requeue script
touches one dead list and its queue's list, one slot on Redis Cluster.  Listing merges
the lists newest first by ``failed_at`` (each list keeping its own order); the position
shown is the entry's place in its own list (0 = its newest), which with its queue
tells where it is.

Workers keep LPUSHing (and LTRIMming) the list while an operator works on it, so
nothing here rewrites the list as a whole (DEL + RPUSH would lose their pushes): an
entry leaves only by LREM of its exact bytes, and a requeue removes the entry and
pushes its job in one script (lua/dead_requeue.lua), so two operators running at once
cannot requeue one entry twice.  The list is read in chunks (LRANGE); an entry pushed
meanwhile shifts the rest right, so the same bytes may be read twice: each distinct
byte string counts once (identical copies are one entry here; LREM removes them all).

Entries are untrusted input: anything that is not a JSON object is "unreadable", and
no command crashes on it.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import contextlib
import hashlib
import heapq
import json
import math
import os
import shutil
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from types import SimpleNamespace
from typing import Any, Callable, Iterator, TextIO

import redis

from . import progress
from .connection import check_cluster, explain, is_cluster_url
from .config import parse_duration  # noqa: F401  (dead.parse_duration, as before)
from .deployment import dead_label, dead_lists
from .errors import EXIT_OK, ConfigError, RedisUnavailable, RedpoolError
from .keytypes import culprit, wrong_type
from .protocol import DEFAULT_NAMESPACE, Keys
from .queue import connect, load_script
from .urls import chosen_url

CHUNK = 1000     # entries per LRANGE
BATCH = 100      # entries per dead_requeue run or LREM pipeline: the server never stalls
UNREADABLE = "<unreadable entry>"
REQUEUE_NEEDS = "name the job ids to requeue, or pass --all (not both)"
PURGE_NEEDS = "pass either --older-than DURATION or --all: a bare purge never empties the list"


@dataclass(frozen=True, slots=True)
class Entry:
    pos: int                        # position from the left (0 = newest) when it was read
    raw: bytes                      # the exact bytes in the list
    data: dict[str, Any] | None     # None: unreadable (not a JSON object)
    key: str = ""                   # the dead-letter list it is in

    @classmethod
    def parse(cls, pos: int, raw: bytes, key: str = "") -> "Entry":
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError too
            data = None
        return cls(pos, raw, data if isinstance(data, dict) else None, key)

    def text(self, name: str) -> str | None:
        v = None if self.data is None else self.data.get(name)
        return v if isinstance(v, str) else None

    id = property(lambda self: self.text("id"))
    queue = property(lambda self: self.text("queue"))

    @property
    def failed_at(self) -> float | None:
        v = None if self.data is None else self.data.get("failed_at")
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        return float(v) if ok else None

    def describe(self, keys: Keys) -> str:
        where = f" of {self.key}" if keys.cluster else ""  # one server: one list
        return f"the dead letter at position {self.pos}{where} (job {self.id or 'without id'})"


def fresh(job: bytes) -> bytes:
    """A requeued job starts over: a job that failed its last retry would otherwise come
    back with no retries left.  Only the worker-set ``attempt`` field is dropped; a job
    that is not a JSON object is requeued byte for byte."""
    try:
        obj = json.loads(job)
    except ValueError:
        return job
    if not isinstance(obj, dict) or "attempt" not in obj:
        return job
    del obj["attempt"]
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def raw_job(e: Entry) -> bytes:
    """The job's bytes exactly as first pushed; ValueError says why there are none."""
    if not e.queue or any(c.isspace() for c in e.queue):
        raise ValueError(f"its queue {e.queue!r} is not a queue name")
    size = None if e.data is None else e.data.get("job_size")
    if size is not None:
        raise ValueError(f"it keeps only the beginning of its job of {size} bytes (over the "
                         "worker's --max-payload): send a smaller job, with a reference to "
                         "large data, instead")
    job, b64 = e.text("job"), e.text("job_b64")
    try:
        if job is not None:
            return job.encode("utf-8")
        if b64 is not None:
            return base64.b64decode(b64, validate=True)
    except UnicodeEncodeError:  # a lone surrogate, written as a \ud800 escape
        raise ValueError("its 'job' is not valid Unicode text") from None
    except binascii.Error:
        raise ValueError("its 'job_b64' is not valid base64") from None
    raise ValueError("it holds no raw job (neither 'job' nor 'job_b64')")


def scan(r: redis.Redis, key: str, chunk: int = CHUNK) -> Iterator[Entry]:
    """Every entry of the list ``key``, newest first, each distinct byte string once
    (see the module doc)."""
    seen: set[bytes] = set()
    start = 0
    while True:
        batch = r.lrange(key, start, start + chunk - 1)
        for i, raw in enumerate(batch):
            digest = hashlib.blake2b(raw, digest_size=16).digest()
            if digest not in seen:
                seen.add(digest)
                yield Entry.parse(start + i, raw, key)
        if len(batch) < chunk:
            return
        start += chunk


def newest_first(lists: list[list[Entry]]) -> list[Entry]:
    """Entries of several lists (each newest first) merged by ``failed_at``, newest
    first; an entry without one counts as failing when the entry before it did."""
    def dated(entries: list[Entry]) -> Iterator[tuple[float, Entry]]:
        t = math.inf
        for e in entries:
            t = e.failed_at if e.failed_at is not None else t
            yield -t, e
    return [e for _, e in heapq.merge(*map(dated, lists), key=lambda pair: pair[0])]


def list_entries(r: redis.Redis, keys: Keys, *, limit: int = 20,
                 queue: str | None = None) -> tuple[list[Entry], int, int]:
    """(the newest ``limit`` entries (0: all), of ``queue`` if given; how many entries
    match; how many the list(s) hold)."""
    found: list[list[Entry]] = []
    total = matching = 0
    for key in dead_lists(r, keys, queue):
        if queue is None:
            pipe = r.pipeline(transaction=True)
            pipe.llen(key)
            pipe.lrange(key, 0, limit - 1 if limit else -1)
            n, raws = pipe.execute()
            entries = [Entry.parse(i, raw, key) for i, raw in enumerate(raws)]
            matching += n
        else:
            n = r.llen(key)
            entries = [e for e in scan(r, key) if e.queue == queue]
            matching += len(entries)
        total += n
        found.append(entries)
    return newest_first(found)[:limit or None], matching, total


@dataclass
class RequeueReport:
    requested: list[str]                                    # ids asked for ([] with --all)
    pushed: Counter = field(default_factory=Counter)        # {queue: jobs pushed}
    done: list[Entry] = field(default_factory=list)         # entries requeued
    skipped: list[tuple[Entry, str]] = field(default_factory=list)  # no raw job, and why
    gone: list[Entry] = field(default_factory=list)         # removed by someone else meanwhile
    unreadable: int = 0                                     # (--all) not JSON objects

    @property
    def missing(self) -> list[str]:
        """Requested ids this call did not requeue: not found, no raw job, or gone."""
        done = {e.id for e in self.done}
        return [i for i in self.requested if i not in done]


def _no_progress(total: int) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext(SimpleNamespace(update=lambda n=1: None))


def requeue(r: redis.Redis, keys: Keys, ids: list[str] | tuple[str, ...] = (), *,
            all: bool = False, queue: str | None = None,
            progress: Callable[[int], Any] = _no_progress) -> RequeueReport:
    """Put the raw job of each matching entry on the left end (tail) of its queue.
    ``progress(total)``: a context manager giving a bar to ``update(n)`` as entries go."""
    if bool(ids) == bool(all):
        raise ConfigError(REQUEUE_NEEDS)
    report = RequeueReport(requested=list(dict.fromkeys(ids)))
    wanted = set(ids)
    script = load_script(r, "dead_requeue")
    found: list[tuple[str, list[tuple[Entry, bytes]]]] = []
    for key in dead_lists(r, keys, queue):
        todo: list[tuple[Entry, bytes]] = []
        for e in scan(r, key):
            if e.data is None:
                report.unreadable += int(all and queue is None)
            elif (queue is None or e.queue == queue) and (all or e.id in wanted):
                try:
                    job = fresh(raw_job(e))
                    if keys.dead_of(e.queue) != key:  # Redis Cluster: one slot per script
                        raise ValueError(f"its queue {e.queue!r} is not the queue of {key}")
                    todo.append((e, job))
                except ValueError as why:
                    report.skipped.append((e, str(why)))
        todo.reverse()  # oldest first: pushed first, so taken first
        found.append((key, todo))
    with progress(sum(len(todo) for _, todo in found)) as bar:
        for key, todo in found:
            for i in range(0, len(todo), BATCH):
                batch = todo[i:i + BATCH]
                counts = script(keys=[key, *(keys.queue(e.queue) for e, _ in batch)],
                                args=[x for e, job in batch for x in (e.raw, job)])
                for (e, _), n in zip(batch, counts):
                    (report.done if n else report.gone).append(e)
                    report.pushed[e.queue] += int(n)
                bar.update(len(batch))
    return report


def purge(r: redis.Redis, keys: Keys, *, older_than: float | None = None, all: bool = False,
          queue: str | None = None, now: float | None = None,
          progress: Callable[[int], Any] = _no_progress) -> int:
    """Remove the entries that failed more than ``older_than`` seconds ago, or ``all``
    (of ``queue`` only, if given).  Returns how many were removed.  ``progress``: as
    for requeue()."""
    if (older_than is None) == (not all):
        raise ConfigError(PURGE_NEEDS)
    cutoff = None if older_than is None else (time.time() if now is None else now) - older_than

    def doomed(e: Entry) -> bool:
        if queue is not None and e.queue != queue:
            return False
        return cutoff is None or (e.failed_at is not None and e.failed_at < cutoff)

    found = [(key, [e.raw for e in scan(r, key) if doomed(e)])
             for key in dead_lists(r, keys, queue)]
    removed = 0
    with progress(sum(len(raws) for _, raws in found)) as bar:
        for key, raws in found:
            for i in range(0, len(raws), BATCH):
                pipe = r.pipeline(transaction=False)
                for raw in raws[i:i + BATCH]:
                    pipe.lrem(key, 0, raw)
                removed += sum(pipe.execute())
                bar.update(len(raws[i:i + BATCH]))
    return removed


# -- the `redpool dead` command ---------------------------------------------------------------

def run(args: argparse.Namespace, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    url = chosen_url(args.redis_url)
    try:
        keys = Keys(args.namespace or os.environ.get("REDPOOL_NAMESPACE") or DEFAULT_NAMESPACE,
                    cluster=is_cluster_url(url))
    except ValueError as e:
        raise ConfigError(f"--namespace: {e}") from None
    try:
        keys.check_queue(args.queue or "")
    except ValueError as e:
        raise ConfigError(f"--queue: {e}") from None
    # Refuse bad input before connecting.
    older_than = parse_duration(args.older_than) if getattr(args, "older_than", None) else None
    if args.action == "list" and args.limit < 0:
        raise ConfigError("--limit must be 0 (all) or more")
    if args.action == "requeue" and bool(args.ids) == bool(args.all):
        raise ConfigError(REQUEUE_NEEDS)
    if args.action == "purge" and (older_than is None) == (not args.all):
        raise ConfigError(PURGE_NEEDS)
    r = connect(url)  # a URL that does not parse: ConfigError, without its password
    try:
        r.ping()
        check_cluster(r, url)  # a Redis Cluster node reached by redis://, or the reverse
        if args.action == "list":
            return _list(r, keys, args, out, err)
        if args.action == "requeue":
            return _requeue(r, keys, args, out, err)
        n = purge(r, keys, older_than=older_than, all=args.all, queue=args.queue,
                  progress=lambda total: progress.bar(total, "purge", "entry", err))
        print(f"purged {_plural(n, 'entry', 'entries')}", file=out)
        return EXIT_OK
    except (redis.ConnectionError, redis.TimeoutError) as e:
        raise RedisUnavailable(explain(e, url)) from None  # worded as the worker words it
    except redis.ResponseError as e:
        if str(e).startswith("WRONGTYPE"):  # another program wrote to a key of ours
            key = (culprit(e) or (dead_label(keys, args.queue),))[0]
            raise wrong_type(r, keys, key, "nothing was changed") from None
        raise RedpoolError(f"Redis refused a command on {dead_label(keys, args.queue)}: "
                           f"{e}") from None
    finally:
        r.close()


def _plural(n: int, one: str, many: str | None = None) -> str:
    return f"{n} {one if n == 1 else many or one + 's'}"


def _list(r, keys: Keys, args, out: TextIO, err: TextIO) -> int:
    shown, matching, total = list_entries(r, keys, limit=args.limit, queue=args.queue)
    where = dead_label(keys, args.queue)
    if args.queue:
        summary = (f"{len(shown)} shown of {_plural(matching, 'dead letter')} from queue "
                   f"{args.queue!r} ({total} in {where}), newest first")
    else:
        summary = (f"{len(shown)} shown of {_plural(total, 'dead letter')} in {where}, "
                   "newest first")
    if args.json:  # stdout holds JSON lines only; the rest goes to stderr
        for e in shown:
            if e.data is not None:
                print(_json_line(e), file=out)
        if bad := sum(e.data is None for e in shown):
            print(f"redpool: left out {_plural(bad, 'unreadable entry', 'unreadable entries')}"
                  " (not JSON objects)", file=err)
        print(summary, file=err)
    elif not shown:
        print("no dead letters" + (f" from queue {args.queue!r} ({total} in {where})"
                                   if args.queue else ""), file=out)
    else:
        print(format_table(shown), summary, sep="\n", file=out)
    return EXIT_OK


def _json_line(e: Entry) -> str:
    """The entry as stored, unless that is not one line of UTF-8 (pretty-printed, UTF-16)."""
    try:
        text = e.raw.decode("utf-8")
        if "\n" not in text and "\r" not in text:
            return text
    except UnicodeDecodeError:
        pass
    return json.dumps(e.data, ensure_ascii=False, separators=(",", ":"))


def _iso(ts: float | None) -> str:
    try:
        return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (TypeError, ValueError, OverflowError, OSError):
        return "?"


def _cell(v: Any, width: int) -> str:
    s = "".join(c if c.isprintable() else " " for c in ("-" if v is None else str(v)))
    return s if len(s) <= width else s[:max(width - 3, 0)] + "..."


def format_table(entries: list[Entry], width: int | None = None) -> str:
    """One line per entry, fitted to the terminal (100 columns when there is none)."""
    width = width or max(shutil.get_terminal_size((100, 24)).columns, 60)
    head = ["#", "failed_at (UTC)", "queue", "id", "error_type", "reason"]
    caps = [10, 20, 24, 36, 24, width]
    rows = [[_cell(v, cap) for v, cap in zip(
        [e.pos, UNREADABLE, "", "", "", ""] if e.data is None else
        [e.pos, _iso(e.failed_at), e.queue, e.id, e.data.get("error_type"),
         e.data.get("reason")], caps)] for e in entries]
    widths = [max(len(row[i]) for row in [head, *rows]) for i in range(5)]
    rest = max(width - sum(widths) - 2 * len(widths), 10)
    return "\n".join("  ".join([row[0].rjust(widths[0])]
                               + [c.ljust(w) for c, w in zip(row[1:5], widths[1:])]
                               + [_cell(row[5], rest)]).rstrip() for row in [head, *rows])


def _requeue(r, keys: Keys, args, out: TextIO, err: TextIO) -> int:
    report = requeue(r, keys, args.ids, all=args.all, queue=args.queue,
                     progress=lambda total: progress.bar(total, "requeue", "job", err))
    for e, why in report.skipped:
        print(f"redpool: cannot requeue {e.describe(keys)}: {why}", file=err)
    for e in report.gone:
        print(f"redpool: {e.describe(keys)} was removed meanwhile (requeued or purged by "
              "someone else)", file=err)
    if report.unreadable:
        bad = _plural(report.unreadable, "unreadable entry", "unreadable entries")
        print(f"redpool: skipped {bad} (not JSON objects)", file=err)
    found = {e.id for e in report.done + report.gone} | {e.id for e, _ in report.skipped}
    for jid in report.requested:
        if jid not in found:
            print(f"redpool: no dead letter with id {jid!r}"
                  + (f" from queue {args.queue!r}" if args.queue else ""), file=err)
    n = sum(report.pushed.values())
    per_queue = ", ".join(f"{q}: {k}" for q, k in sorted(report.pushed.items()) if k)
    print(f"requeued {_plural(n, 'job')}" + (f" ({per_queue})" if per_queue else ""), file=out)
    return 1 if report.missing else EXIT_OK
