"""`redpool enqueue`: one job from the command line, or many from JSON lines.

``redpool enqueue TASK ARG...`` prints the job's id; with ``--wait`` it then waits for
the result envelope and prints it too.  ``--from FILE`` (``-``: standard input) queues
one job per line, pipelined (Client.enqueue_many), and prints their ids in input
order; every line is checked before anything is pushed, so a bad line queues nothing.

Nothing is left in Redis for a result nobody waits for: without --wait the job names
no ``reply_to`` (Client ``reply_to=False``) and its answer is only its result key,
which expires with its ``result_ttl``.  --wait polls that key; only with
``--result-ttl 0`` (no result key) does the job name this command's reply list,
which Client.close() deletes.

Before pushing, the supervisors' leases (deployment.read_supervisors, what `redpool
status` shows) tell whether a live worker listens to the queue; if none does, one
warning line says so and what to do, and the job is queued all the same (a worker
may start later).  A producer's ACL user may not read leases: then nothing is said.

Module-level imports stay light: the command line's parser is built from this module
on every `redpool` start; the client and Redis are imported when the command runs.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from datetime import datetime, timezone
from typing import Any, TextIO

from .cliparser import Mistake, suggestion
from .config import parse_duration
from .errors import EXIT_OK, ConfigError, RedisUnavailable
from .protocol import MAX_RESULT_TTL, POLICY_FIELDS

#: What a line of --from may hold besides a bare array of arguments.
LINE_FIELDS = ("args", "kwargs", "id", "result_ttl", *POLICY_FIELDS)
#: The flag that sets each job field, to name it in an error about that field.
FLAG_OF = {"timeout": "--job-timeout", "max_retries": "--max-retries", "id": "--id",
           "retry_backoff": "--retry-backoff", "retry_backoff_max": "--retry-backoff-max",
           "dead_letter": "--dead-letter", "result_ttl": "--result-ttl", "kwargs": "--kwargs"}
EXAMPLES = """\
examples:
  redpool enqueue myapp.tasks.add 2 3                       # prints the job id
  redpool enqueue myapp.tasks.resize '"a.png"' 100 --queue high --wait
  redpool enqueue myapp.tasks.report --kwargs '{"day": "2026-12-07"}' --delay 15m
  redpool enqueue myapp.tasks.add --from jobs.jsonl         # lines: [2, 3] or
                                                            # {"args": [2, 3], "id": "add-1"}
"""
OLD_TIMEOUT = ("--timeout is no longer an option of enqueue: use --wait-timeout SECONDS for "
               "how long --wait waits, or --job-timeout SECONDS for the job's time limit")


# -- the command line ----------------------------------------------------------------------

def _flag_type(parse, what: str):
    """An argparse type whose error says what was expected (not 'invalid float value')."""
    def convert(text: str):
        try:
            return parse(text)
        except (ValueError, ConfigError):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    return convert


def _number(kind, low: float, strict: bool = False):
    def parse(text: str):
        x = kind(text)
        if not math.isfinite(x) or x < low or (strict and x == low):
            raise ValueError(text)
        return x
    return parse


def parse_at(text: str) -> datetime:
    """An ISO 8601 time (without a zone: local time, as Client's ``at``) or unix seconds."""
    try:
        seconds = float(text)
    except ValueError:
        return datetime.fromisoformat(text.strip())
    try:
        return datetime.fromtimestamp(seconds, timezone.utc)
    except (OverflowError, OSError, ValueError):
        raise ValueError("out of range") from None


class _OldTimeout(argparse.Action):
    """--timeout used to be the wait: refuse it rather than let it mean something else."""

    def __call__(self, parser, namespace, values, option_string=None):
        raise Mistake(OLD_TIMEOUT)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("task", metavar="TASK", help="the registered task name, e.g. myapp.tasks.add")
    p.add_argument("args", nargs="*", default=[], metavar="ARG",
                   help="arguments as JSON values (2, 2.5, true, null, [1,2], '\"text\"'); "
                        "anything that is not JSON is taken as a string")
    p.add_argument("--kwargs", default=None, metavar="JSON",
                   help="keyword arguments as a JSON object, e.g. '{\"size\": 3}'")
    p.add_argument("--queue", default="default", help="the queue to put it on (default: default)")
    p.add_argument("--id", default=None, help="the job id (default: a new UUID); 1-128 of "
                                              "letters, digits and . _ : -")
    when = p.add_argument_group("when it runs (default: now)")
    when.add_argument("--delay", type=_flag_type(parse_duration, "a duration: 30s, 15m, 2h, 1d "
                      "or seconds"), metavar="DURATION",
                      help="run it this long from now (on the Redis server's clock): 30s, 15m, "
                           "2h, 1d, or seconds")
    when.add_argument("--at", type=_flag_type(parse_at, "an ISO 8601 time such as "
                      "2026-12-08T09:30:00Z, or unix seconds"), metavar="TIME",
                      help="run it at this time: ISO 8601 (2026-12-08T09:30:00Z; without a "
                           "zone, local time) or unix seconds")
    policy = p.add_argument_group("job options (default: the task's, else the worker's flags)")
    policy.add_argument("--max-retries", type=_flag_type(_number(int, 0), "a whole number >= 0"),
                        metavar="N", help="retries if the task raises or times out")
    policy.add_argument("--retry-backoff", type=_flag_type(_number(float, 0, True), "seconds > 0"),
                        metavar="SECONDS", help="base of the exponential backoff between retries")
    policy.add_argument("--retry-backoff-max", metavar="SECONDS",
                        type=_flag_type(_number(float, 0, True), "seconds > 0"),
                        help="cap of that backoff")
    policy.add_argument("--job-timeout", type=_flag_type(_number(float, 0, True), "seconds > 0"),
                        metavar="SECONDS", help="hard time limit of the job: its process is "
                                                "stopped and the attempt fails with TimeoutError")
    policy.add_argument("--dead-letter", action=argparse.BooleanOptionalAction, default=None,
                        help="dead-letter it if it fails for good (--no-dead-letter: do not)")
    policy.add_argument("--result-ttl", metavar="SECONDS",
                        type=_flag_type(_number(int, 0), "a whole number of seconds >= 0"),
                        help=f"keep the result this long (default 86400, at most {MAX_RESULT_TTL}; "
                             "0: keep none)")
    wait = p.add_argument_group("waiting for the result")
    wait.add_argument("--wait", action="store_true",
                      help="after the id, wait for the result and print its envelope; exit 1 if "
                           "the job failed or no result came in time")
    wait.add_argument("--wait-timeout", type=_flag_type(_number(float, 0, True), "seconds > 0"),
                      default=None, metavar="SECONDS",
                      help="how long --wait waits (default 60; implies --wait)")
    p.add_argument("--timeout", nargs="?", action=_OldTimeout, help=argparse.SUPPRESS)
    many = p.add_argument_group("many jobs")
    many.add_argument("--from", dest="source", metavar="FILE",
                      help="one job per line of FILE ('-': standard input), as JSON: an array of "
                           "arguments, or an object with any of args, kwargs, id, result_ttl, "
                           "max_retries, retry_backoff, retry_backoff_max, timeout, dead_letter "
                           "(the flags above apply to every line; a line's own fields win); "
                           "prints the ids, one per line")


# -- running it ----------------------------------------------------------------------------

def run(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> int:
    import redis

    from .client import Client
    from .connection import check, check_cluster, explain
    from .sendonce import MaybeQueued

    out, err = out or sys.stdout, err or sys.stderr
    args.wait = args.wait or args.wait_timeout is not None
    options = job_options(args)
    calls = read_calls(args, options) if args.source else None
    with Client(args.redis_url, namespace=args.namespace) as client:
        check(client.redis, client.url)
        check_cluster(client.redis, client.url)
        try:
            if calls is not None:
                return enqueue_lines(client, args, calls, options, out, err)
            return enqueue_one(client, args, options, out, err)
        except MaybeQueued as e:
            # not exit 4 ("cannot reach Redis"): a script would push them again (sendonce.py)
            print(f"redpool: {e}", file=err)
            return 1
        except (redis.ConnectionError, redis.TimeoutError) as e:
            raise RedisUnavailable(explain(e, client.url)) from None


def job_options(args: argparse.Namespace) -> dict[str, Any]:
    """The flags' job fields (None: not given, the task's or worker's default applies),
    after refusing combinations that cannot mean what the user wants."""
    if args.delay is not None and args.at is not None:
        raise ConfigError("give --delay or --at, not both")
    if args.source:
        if args.args:
            raise ConfigError("--from reads each job's arguments from its lines: give no ARG "
                              "after the task")
        if args.id:
            raise ConfigError("--id names one job: with --from, give each line its own \"id\"")
        if args.wait:
            raise ConfigError("--wait waits for one job; to queue many and collect their "
                              "results, use redpool.Pool(...).starmap from Python")
    return {"kwargs": _kwargs(args.kwargs), "result_ttl": args.result_ttl,
            "max_retries": args.max_retries, "retry_backoff": args.retry_backoff,
            "retry_backoff_max": args.retry_backoff_max, "timeout": args.job_timeout,
            "dead_letter": args.dead_letter}


def _kwargs(text: str | None) -> dict:
    if text is None:
        return {}
    try:
        kwargs = json.loads(text)
    except ValueError as e:
        raise ConfigError(f"--kwargs is not JSON: {e}") from None
    if not isinstance(kwargs, dict):
        raise ConfigError("--kwargs must be a JSON object, e.g. '{\"size\": 3}'")
    return kwargs


def _parse_arg(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def _flagged(message: str) -> str:
    """An error about job field 'x' names the flag that set it."""
    m = re.match(r"'(\w+)'", message)
    return f"{FLAG_OF[m.group(1)]}: {message}" if m and m.group(1) in FLAG_OF else message


def enqueue_one(client, args, options: dict, out: TextIO, err: TextIO) -> int:
    import redis

    fields = {k: v for k, v in options.items() if k != "kwargs"}
    # a result key is what --wait reads; only without one does the job need a reply list
    reply_to = None if args.wait and args.result_ttl == 0 else False
    try:
        res = client.enqueue(args.task, *map(_parse_arg, args.args), queue=args.queue,
                             kwargs=options["kwargs"], id=args.id, reply_to=reply_to,
                             delay=args.delay, at=args.at, **fields)
    except (ValueError, TypeError) as e:
        raise ConfigError(_flagged(str(e))) from None
    print(res.id, file=out, flush=True)
    warn_if_unserved(client, args.queue, err)
    if not args.wait:
        return EXIT_OK
    timeout = 60.0 if args.wait_timeout is None else args.wait_timeout
    try:
        res.wait(timeout)
    except (redis.ConnectionError, redis.TimeoutError) as e:
        # not exit 4 ("cannot reach Redis"): a script would take the job as not queued
        # and push it again
        print(f"redpool: job {res.id} is queued, but Redis went away while waiting for its "
              f"result ({e}); `redpool inspect {res.id}` shows where it is", file=err)
        return 1
    if not res.ready():
        print(f"redpool: no result for job {res.id} within {timeout:g} s (--wait-timeout); "
              f"`redpool inspect {res.id}` shows where it is", file=err)
        return 1
    print(json.dumps(res.envelope, indent=2), file=out)
    return EXIT_OK if res.successful() else 1


# -- many jobs -----------------------------------------------------------------------------

def read_calls(args: argparse.Namespace, options: dict) -> list[tuple[list, dict, dict]]:
    """(args, kwargs, own fields) of every line of --from, each checked as a worker
    would check its job; a ConfigError names the first bad line."""
    from . import progress

    name = "standard input" if args.source == "-" else args.source

    def read(f) -> list[tuple[list, dict, dict]]:
        # checking a million lines takes a while: a count on a terminal if it does
        with progress.bar(None, "reading", " lines", iterable=f, delay=1.0) as lines:
            return parse_lines(lines, name, args.task, options)
    try:
        if args.source == "-":
            if sys.stdin.isatty():
                print("redpool: reading jobs from standard input, one JSON line each "
                      "(Ctrl-D to end)", file=sys.stderr)
            return read(sys.stdin)
        with open(args.source, encoding="utf-8") as f:
            return read(f)
    except OSError as e:
        raise ConfigError(f"--from: cannot read {name}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"--from: {name} is not UTF-8 text ({e.reason})") from None


def parse_lines(lines, name: str, task: str, options: dict) -> list[tuple[list, dict, dict]]:
    from .protocol import InvalidJob, encode_job, make_job

    shared = {k: v for k, v in options.items() if k != "kwargs"}
    calls = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{name}, line {n}"
        try:
            item = json.loads(line)
        except (ValueError, RecursionError) as e:
            raise ConfigError(f"{where}: not JSON: {e}") from None
        if isinstance(item, list):
            item = {"args": item}
        if not isinstance(item, dict):
            raise ConfigError(f"{where}: expected an array of arguments or an object with "
                              f"{', '.join(LINE_FIELDS)}")
        unknown = sorted(set(item) - set(LINE_FIELDS))
        if unknown:
            raise ConfigError(f"{where}: unknown field {unknown[0]!r}"
                              + (suggestion(unknown[0], LINE_FIELDS) or
                                 f" (a line may have {', '.join(LINE_FIELDS)})"))
        call_args, kwargs = item.pop("args", []), item.pop("kwargs", {})
        if not isinstance(call_args, list) or not isinstance(kwargs, dict):
            raise ConfigError(f"{where}: 'args' must be an array and 'kwargs' an object")
        kwargs = {**options["kwargs"], **kwargs}
        try:
            encode_job(make_job(task, call_args, kwargs, **{**shared, **item}))
        except InvalidJob as e:
            raise ConfigError(f"{where}: {e}") from None
        except (TypeError, ValueError) as e:  # json.loads accepts NaN; no worker would
            raise ConfigError(f"{where}: cannot be sent as JSON: {e}") from None
        calls.append((call_args, kwargs, item))
    return calls


def enqueue_lines(client, args, calls: list, options: dict, out: TextIO, err: TextIO) -> int:
    from . import progress

    fields = {k: v for k, v in options.items() if k not in ("kwargs", "result_ttl")}
    pushed = 0

    def advance(n: int) -> None:
        nonlocal pushed
        pushed += n
        bar.update(n)

    try:
        with progress.bar(len(calls), "enqueue", "job", err) as bar:
            results = client.enqueue_many(
                args.task, [c[0] for c in calls], kwargs_list=[c[1] for c in calls],
                options_list=[c[2] for c in calls], queue=args.queue,
                result_ttl=args.result_ttl, reply_to=False, delay=args.delay, at=args.at,
                on_pushed=advance, **fields)
    except (ValueError, TypeError) as e:
        raise ConfigError(_flagged(str(e))) from None
    except Exception:
        if pushed:  # the batches before a failure are queued: say so before the error
            print(f"redpool: {pushed} of {len(calls)} jobs were queued before this error",
                  file=err)
        raise
    for res in results:
        print(res.id, file=out)
    print(f"enqueued {len(results)} job{'' if len(results) == 1 else 's'} of {args.task} "
          f"onto queue {args.queue!r}{_due(args)}", file=err)
    warn_if_unserved(client, args.queue, err)
    return EXIT_OK


def _due(args: argparse.Namespace) -> str:
    if args.delay is not None:
        return f", due in {args.delay:g} s"
    if args.at is not None:
        return f", due at {args.at.isoformat()}"
    return ""


# -- is anyone listening? ------------------------------------------------------------------

def warn_if_unserved(client, queue: str, err: TextIO) -> None:
    if warning := unserved(client, queue):
        print(warning, file=err, flush=True)


def unserved(client, queue: str) -> str | None:
    """A warning when no live supervisor listens to ``queue`` in this namespace, as
    their leases say; None when one does, or when we may not read the leases."""
    import redis

    from .deployment import read_supervisors, server_time
    from .urls import redact_url

    try:
        live = [s for s in read_supervisors(client.redis, client.keys, server_time(client.redis))
                if s.alive]
    except redis.RedisError:
        # NOPERM (a producer's ACL user cannot read leases), or Redis gone after the
        # push: the job is queued all the same, and an error here would say otherwise
        return None
    if any(queue in s.queues for s in live):
        return None
    start = f"start one with `redpool worker MODULE --queue {queue}`"
    if not live:
        return (f"redpool: warning: no worker is running in namespace {client.namespace!r} on "
                f"{redact_url(client.url)}: the job waits in queue {queue!r} until one "
                f"starts ({start}; check --namespace and --redis-url)")
    served = sorted({q for s in live for q in s.queues})
    return (f"redpool: warning: no live worker takes jobs from queue {queue!r} (the "
            f"{len(live)} running take: {', '.join(served)}): the job waits until one does "
            f"({start})")
