"""`redpool status` and `redpool inspect`: what a deployment is doing, from any machine
that can reach its Redis, with nothing but --redis-url and --namespace.

Reading is done by deployment.py (queues, supervisors, dead letters) and locate.py (one
job); this module turns what they read into text for people or JSON for programs.
The Redis URL is only ever shown redacted, and text that comes from Redis (names,
hosts, queue names) is stripped of control characters before it reaches a terminal.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from datetime import datetime, timezone
from typing import Any, TextIO

import redis

from .connection import check_cluster, explain, is_cluster_url
from .deployment import Observer, Snapshot, dead_label
from .errors import EXIT_OK, ConfigError, RedisUnavailable, RedpoolError
from .locate import Sighting, locate
from .protocol import DEFAULT_NAMESPACE, DEFAULT_RESULT_TTL, ID_RE, Keys
from .queue import connect
from .urls import chosen_url, redact_url

HEARTBEAT_NOTE = ("heartbeat age: time since the supervisor last renewed its lease (it "
                  "renews every lease/3, 5 s by default); past its lease it is dead")
UNUSABLE_NOTE = ("keys of the wrong type (another program wrote to them): DEL each, or "
                 "RENAME it away to keep its data; workers look again every few seconds and "
                 "carry on by themselves")
CLEAR, HOME, CLEAR_LINE, CLEAR_BELOW = "\x1b[2J", "\x1b[H", "\x1b[K", "\x1b[J"


# -- connecting -----------------------------------------------------------------------------

def open_redis(args: argparse.Namespace) -> tuple[redis.Redis, Keys, str]:
    """(client, keys, URL) from --redis-url / --namespace or their variables.  A URL
    that does not parse is a ConfigError naming it without its password (connect()),
    and so is one whose form does not match the server: a Redis Cluster node reached
    by redis:// would otherwise answer with MOVED errors.  Redis being unreachable is
    left to the reads, which say so (and which --watch retries); but a Redis Cluster
    client learns the slot map when it is made, so with no node answering connect()
    raises RedisUnavailable here (--watch: see Connecting)."""
    keys, url = target(args)
    return connected(url), keys, url


def target(args: argparse.Namespace) -> tuple[Keys, str]:
    url = chosen_url(args.redis_url)
    try:
        keys = Keys(args.namespace or os.environ.get("REDPOOL_NAMESPACE") or DEFAULT_NAMESPACE,
                    cluster=is_cluster_url(url))
    except ValueError as e:
        raise ConfigError(f"--namespace: {e}") from None
    try:
        for q in getattr(args, "queue", None) or []:  # status --queue
            keys.check_queue(q)
    except ValueError as e:
        raise ConfigError(f"--queue: {e}") from None
    return keys, url


def connected(url: str) -> redis.Redis:
    r = connect(url)
    with contextlib.suppress(RedisUnavailable):
        check_cluster(r, url)
    return r


class Connecting:
    """The Observer of `status --watch`, made once Redis answers.  On one server the
    client connects at its first read, and a watch started while Redis is away waits
    for it; a Redis Cluster client must reach a node to be made at all.  Until one
    answers, each read raises redis.ConnectionError (the watch shows it and retries)."""

    def __init__(self, url: str, keys: Keys, queues: list[str] | None) -> None:
        self.url, self.keys, self.queues = url, keys, queues
        self.r: redis.Redis | None = None
        self.observer: Observer | None = None

    def read(self) -> Snapshot:
        if self.observer is None:
            try:
                self.r = connected(self.url)
            except RedisUnavailable as e:
                raise redis.ConnectionError(str(e)) from None
            self.observer = Observer(self.r, self.keys, queues=self.queues)
        return self.observer.read()

    def close(self) -> None:
        if self.r is not None:
            self.r.close()


@contextlib.contextmanager
def redis_errors(url: str):
    """Redis failures as redpool errors that say what to fix (exit code 4), worded as
    the worker words them (connection.explain: TLS, Sentinel, credentials, ACL)."""
    where = redact_url(url)
    try:
        yield
    except (redis.ConnectionError, redis.TimeoutError) as e:
        raise RedisUnavailable(explain(e, url)) from None
    except redis.ResponseError as e:
        raise RedpoolError(f"Redis at {where} refused a command: {e}") from None


# -- formatting -----------------------------------------------------------------------------

def clean(v: Any) -> str:
    """A table cell: '-' for unknown, and no control characters (terminal escapes)."""
    return "-" if v is None else "".join(c if c.isprintable() else "?" for c in str(v))


def duration(seconds: float | None) -> str:
    """0.4s, 12s, 2m05s, 3h02m, 2d04h; 'unknown' when not known."""
    if seconds is None:
        return "unknown"
    s = max(0.0, seconds)
    if s < 10:
        return f"{s:.1f}s"
    s = int(s)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def utc(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def table(head: list[str], rows: list[list[Any]], right: set[int]) -> str:
    """Columns padded to their widest cell; numeric columns (``right``) right-aligned."""
    cells = [head] + [[clean(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(head))]
    return "\n".join("  ".join(c.rjust(w) if i in right else c.ljust(w)
                               for i, (c, w) in enumerate(zip(row, widths))).rstrip()
                     for row in cells)


def plural(n: int, one: str, many: str | None = None) -> str:
    return f"{n} {one if n == 1 else many or one + 's'}"


def render_status(snap: Snapshot, keys: Keys, where: str) -> str:
    out = [f"redpool status: namespace {clean(keys.ns)} on {where}, {utc(snap.time)}", ""]
    if snap.queues:
        out.append(table(
            ["QUEUE", "WAITING", "OLDEST", "SCHEDULED", "NEXT DUE", "DEAD"],
            [[q.name, "unusable" if keys.queue(q.name) in q.unusable else q.depth,
              duration(q.oldest_age) if q.depth else "-",
              "unusable" if keys.scheduled(q.name) in q.unusable else q.scheduled,
              ("overdue" if q.next_due_in < 0 else "in " + duration(q.next_due_in))
              if q.next_due_in is not None else "-", q.dead] for q in snap.queues],
            right={1, 2, 3, 5}))
    else:
        out.append("no queues (no queue lists or scheduled sets, and no supervisor)")
    out.append("")
    live = [s for s in snap.supervisors if s.alive]
    if snap.supervisors:
        out.append(table(
            ["SUPERVISOR", "HOST", "PID", "QUEUES", "STATE", "CONC", "IN-FLIGHT", "DONE",
             "FAILED", "JOBS/S", "UPTIME", "HEARTBEAT AGE"],
            [[s.name, s.host, s.pid, ",".join(s.queues) or None, s.state if s.alive else "expired",
              s.concurrency, s.inflight, s.succeeded, s.failed,
              None if s.rate_1m is None else f"{s.rate_1m:.1f}",
              duration(s.uptime) if s.uptime is not None else None,
              duration(s.heartbeat_age) + ("" if s.alive else " (lease expired, not yet reaped)")]
             for s in snap.supervisors],
            right={2, 5, 6, 7, 8, 9, 10}))
    else:
        out.append("no supervisors registered")
    out += ["", f"throughput: {snap.throughput:.1f} jobs/s over the last minute "
                f"({plural(len(live), 'live supervisor')})"]
    dead = f"dead letters: {snap.dead_total} in {clean(dead_label(keys))}"
    if snap.dead_scanned < snap.dead_total:
        dead += f" (counted per queue among the newest {snap.dead_scanned})"
    out.append(dead)
    if snap.supervisors:
        out.append(HEARTBEAT_NOTE)
    if snap.unusable:
        out += ["", UNUSABLE_NOTE]
        out += [f"  {clean(u['key'])} holds a {clean(u['type'])}, not a {clean(u['expected'])}: "
                f"{clean(u['effect'])} (seen by {clean(', '.join(u['seen_by']))})"
                for u in snap.unusable]
    return "\n".join(out)


def status_json(snap: Snapshot, keys: Keys, where: str) -> str:
    return json.dumps({"namespace": keys.ns, "redis": where, **snap.to_dict()})


# -- redpool status -------------------------------------------------------------------------

def run_status(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    if args.watch is not None and args.watch <= 0:
        raise ConfigError(f"--watch: give a number of seconds above 0, got {args.watch:g}")
    render = status_json if args.json else render_status
    if args.watch is not None:
        keys, url = target(args)
        where = redact_url(url)
        observer = Connecting(url, keys, args.queue)
        try:
            return watch(observer, lambda snap: render(snap, keys, where), args.watch, out,
                         where, json_lines=args.json)
        finally:
            observer.close()
    r, keys, url = open_redis(args)
    try:
        with redis_errors(url):
            print(render(Observer(r, keys, queues=args.queue).read(), keys, redact_url(url)),
                  file=out)
        return EXIT_OK
    finally:
        r.close()


def watch(observer: Observer, render, interval: float, out: TextIO, where: str, *,
          json_lines: bool = False, iterations: int | None = None) -> int:
    """Redraw every ``interval`` seconds until Ctrl-C: in place on a terminal (cursor
    home, each line cleared to its end, the rest of the screen cleared: no flicker),
    as successive blocks otherwise, one JSON line per refresh with --json.  Redis going
    away is shown and retried; it does not end the watch."""
    tty = out.isatty() and not json_lines
    if tty:
        out.write(HOME + CLEAR)
    n = 0
    try:
        while iterations is None or n < iterations:
            n += 1
            try:
                text = render(observer.read())
            except redis.RedisError as e:
                if json_lines:
                    text = json.dumps({"error": f"cannot read from Redis at {where}: {e}"})
                else:
                    text = f"redpool: cannot read from Redis at {where}: {e}; retrying"
            if tty:
                lines = [f"every {interval:g}s, Ctrl-C to stop", "", *text.split("\n")]
                out.write(HOME + "".join(line + CLEAR_LINE + "\n" for line in lines) + CLEAR_BELOW)
            else:
                out.write(text + ("\n" if json_lines else "\n\n"))
            out.flush()
            if iterations is None or n < iterations:
                time.sleep(interval)
    except KeyboardInterrupt:
        pass
    return EXIT_OK


# -- redpool inspect ------------------------------------------------------------------------

def describe(s: Sighting) -> str:
    d = s.detail
    q = clean(d.get("queue"))
    if s.state == "scheduled":
        when = (f"due in {duration(d['due_in'])}" if d["due_in"] >= 0 else
                f"overdue by {duration(-d['due_in'])} (a supervisor listening to {q!r} "
                "promotes it within half a second)")
        return f"scheduled for queue {q!r}: {when}, at {utc(d['due_at'])}"
    if s.state == "queued":
        ahead = plural(d["ahead"], "job") + " ahead of it" if d["ahead"] else "next to be taken"
        return f"queued in {q!r}: {ahead}, {d['length']} waiting in all"
    if s.state == "running":
        where = (f"supervisor {clean(d['supervisor'])!r} on host {clean(d['host'])} "
                 f"(pid {clean(d['pid'])})")
        if not d["supervisor_alive"]:
            return (f"held by {where}, whose lease has expired: it goes back to the head "
                    f"of {q!r} when a live supervisor reaps it")
        return f"running (or reserved to run next) on {where}, from queue {q!r}"
    if s.state == "finishing":
        return (f"finished ({clean(d['status'])}) on supervisor {clean(d['supervisor'])!r}, "
                f"from queue {q!r}: its result is being written (it waits in {clean(s.key)})")
    if s.state == "dead":
        body = s.body or {}
        return (f"dead-lettered from queue {q!r}, at position {d['position']} of "
                f"{clean(s.key)} (0 is the newest): {clean(body.get('error_type'))}: "
                f"{clean(body.get('reason'))}")
    expires = "" if d.get("expires_in") is None else f", expires in {duration(d['expires_in'])}"
    line = f"{s.state}: its result envelope is at {clean(s.key)}{expires}"
    err = s.body.get("error") if isinstance(s.body.get("error"), dict) else None
    if err:
        line += f"\n  {clean(err.get('type'))}: {clean(err.get('message'))}"
    return line


def not_found_message(job_id: str, keys: Keys) -> str:
    return (f"redpool: no job {job_id!r} in namespace {keys.ns!r}: not scheduled, queued, "
            "held by a supervisor, finished or dead-lettered.  Results expire after the "
            f"job's result_ttl ({DEFAULT_RESULT_TTL} s, one day, unless the producer set "
            "another; 0 keeps none), and a job pushed without an id gets one its producer "
            "cannot know.  Check --namespace (REDPOOL_NAMESPACE) too.")


def run_inspect(args: argparse.Namespace, out: TextIO = sys.stdout,
                err: TextIO = sys.stderr) -> int:
    if not ID_RE.match(args.job_id):
        raise ConfigError(f"{args.job_id!r} is not a job id: ids are 1-128 letters, digits "
                          "and . _ : -")
    r, keys, url = open_redis(args)
    try:
        with redis_errors(url):
            found = locate(r, keys, args.job_id)
    finally:
        r.close()
    if args.json:
        print(json.dumps({"id": args.job_id, "found": bool(found),
                          "places": [s.to_dict() for s in found]}), file=out)
    else:
        waiting = [s for s in found if s.state in ("scheduled", "queued", "running",
                                                   "finishing")]
        if len(waiting) > 1 or (waiting and len(found) > len(waiting)):
            print(f"job {args.job_id} is in {len(found)} places (its id was reused, or it "
                  "moved on while we looked)", file=out)
        for s in found:
            print(f"job {args.job_id}: {describe(s)}", file=out)
            body = json.dumps(s.body, indent=2, ensure_ascii=False)
            print("\n".join(clean(line) for line in body.split("\n")), file=out)
    if not found:
        print(not_found_message(args.job_id, keys), file=err)
        return 1
    return EXIT_OK
