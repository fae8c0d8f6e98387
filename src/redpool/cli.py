"""The `redpool` command: worker, dev, demo, enqueue."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from typing import Callable

from . import __version__, config, enqueue, logs, titles
from .cliparser import Parser
from .errors import EXIT_BROKEN_PIPE, EXIT_ERROR, EXIT_OK, ConfigError, RedpoolError
from .urls import holds_password


def main(argv: list[str] | None = None) -> int:
    """Run one command.  Whatever it prints, a reader that goes away (``| head -1``)
    ends it quietly with EXIT_BROKEN_PIPE, the status a shell reports for any writer
    SIGPIPE stopped (cat, grep, git): no traceback, and ``set -o pipefail`` sees
    redpool as it sees them.  Not 0 (the output was cut short: a script must not take
    it as delivered) and not 1 (redpool's "unexpected error")."""
    try:
        try:
            code = _run(argv)
        finally:
            # inside the try: a reader gone is seen here, not by the interpreter's
            # final flush (which would print "Exception ignored ... BrokenPipeError")
            if sys.stdout is not None:
                sys.stdout.flush()
    except BrokenPipeError:
        gone = [s for s in (sys.stdout, sys.stderr) if logs.reader_gone(s)]
        for stream in gone or [sys.stdout]:
            logs.silence(stream)
        return EXIT_BROKEN_PIPE
    return EXIT_BROKEN_PIPE if logs.lost() else code


def _run(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    if argv is None:  # our own command line (not a test's call): out of ps with its secrets
        titles.hide_command_line(sys.argv[1:])
    # Before anything can fail: an error is said once, in the format the command's
    # log uses (the worker's --log-format, else JSON unless stderr is a terminal).
    logs.configure(**_early_logging(args))
    if holds_password(getattr(args, "redis_url", None)):  # once, in the command's format
        logs.get("redpool").warning("password_on_command_line",
                                    message=titles.password_warning(args.command))
    try:
        if args.command not in ("worker", "dev") and hasattr(args, "redis_ca"):
            resolve_url(args)
        return args.run(args)
    except RedpoolError as e:
        logs.fatal(str(e), e.exit_code)
        return e.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        if logs.reader_gone(sys.stdout) or logs.reader_gone(sys.stderr):
            raise  # our reader left: main() ends quietly
        return _unexpected()  # a socket's, say: a bug to report like any other
    except Exception:
        return _unexpected()


def _unexpected() -> int:
    e = sys.exc_info()[1]
    logs.fatal(f"unexpected error: {type(e).__name__}: {e} (a bug: please report it with "
               "the traceback)", EXIT_ERROR, exc_info=True)
    return EXIT_ERROR


def _early_logging(args: argparse.Namespace) -> dict:
    """The worker's --log-level / --log-format (or environment) as far as they can be
    read before config.resolve() checks them.  The one-shot commands (status, inspect,
    dead, enqueue, acl, demo) speak to a person, or to a script that keeps data
    (stdout, --json) apart from messages (stderr): their messages are plain
    ``redpool: ...`` lines whatever stderr is, as every other line they print; JSON
    lines are the daemon's format, for journald and log shippers."""
    if args.command not in ("worker", "dev"):
        return {"level": "warning", "fmt": "console"}
    level = (args.log_level or os.environ.get("REDPOOL_LOG_LEVEL") or "info").lower()
    fmt = (args.log_format or os.environ.get("REDPOOL_LOG_FORMAT") or "auto").lower()
    return {"level": level if level in logs.LEVELS else "info",
            "fmt": fmt if fmt in logs.FORMATS else "auto", "daemon": True}


def port_number(text: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise argparse.ArgumentTypeError(f"expected a TCP port, 1-65535, got {text!r}")
    return int(text)


def redis_arguments(parser) -> None:
    """--redis-url, --redis-url-file and the TLS files for a command that connects to
    Redis (the worker has them from config.SETTINGS); main() folds them into
    ``args.redis_url`` (resolve_url)."""
    for s in config.SETTINGS:
        if s.dest.startswith("redis_"):
            parser.add_argument(s.flag, dest=s.dest, default=None, help=f"{s.help} [env {s.env}]")


def resolve_url(args: argparse.Namespace) -> None:
    """``args.redis_url``: the URL of --redis-url, --redis-url-file or their variables,
    with the TLS files of the flags (or of REDPOOL_REDIS_CA/_CERT/_KEY) as its options:
    the commands connect with the URL alone (connection.py)."""
    from .connection import tls_options, with_tls
    from .urls import chosen_url

    url = chosen_url(args.redis_url, args.redis_url_file)
    tls = tls_options(args.redis_ca, args.redis_cert, args.redis_key, url=url)
    args.redis_url, args.redis_url_file = with_tls(url, **tls) if tls else url, None


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="redpool", description="A multiprocessing.Pool that spans hosts, fed by Redis lists.")
    parser.add_argument("--version", action="version", version=f"redpool {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    w = sub.add_parser("worker", help="run a supervisor and its pool of processes")
    config.add_worker_arguments(w)
    w.set_defaults(run=cmd_worker)

    d = sub.add_parser("dev", help="run a worker for development: without a Redis URL, on "
                                   "this project's private server (its port and data kept in "
                                   ".redpool/dev between runs)")
    config.add_worker_arguments(d)
    dev = d.add_argument_group("redpool dev")
    dev.add_argument("--fresh", action="store_true",
                     help="start the private server empty (same port): drop the jobs, results "
                          "and dead letters of earlier runs")
    dev.add_argument("--port", type=port_number, default=None,
                     help="the private server's port (default: the last run's, else a free one "
                          "in 20000-29999); kept for the next runs")
    dev.add_argument("--reload", action="store_true",
                     help="restart the pool's processes when a .py file under the working "
                          "directory changes (graceful, as SIGHUP: running jobs finish)")
    dev.add_argument("--reload-dir", action="append", default=None, metavar="DIR",
                     help="with --reload: watch DIR instead of the working directory "
                          "(repeat for several)")
    d.set_defaults(run=cmd_dev)

    demo = sub.add_parser("demo", help="show what redpool does, on a private server")
    demo.add_argument("--redis-url", default=None, help="use this server instead of a private one")
    demo.add_argument("--redis-url-file", default=None, metavar="FILE",
                      help="the same, read from a file (its password stays out of ps)")
    demo.add_argument("--jobs", type=int, default=12, help="how many sleeping jobs (default 12)")
    demo.set_defaults(run=cmd_demo)

    e = sub.add_parser("enqueue", help="queue a job and print its id (--wait: and its result "
                                       "envelope); --from FILE queues one job per JSON line",
                       epilog=enqueue.EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    enqueue.add_arguments(e)
    where = e.add_argument_group("where (the worker's settings)")
    redis_arguments(where)
    where.add_argument("--namespace", default=None, help="[env REDPOOL_NAMESPACE]")
    e.set_defaults(run=cmd_enqueue)

    dead = sub.add_parser("dead", help="list, requeue or purge dead-letter entries")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--queue", default=None, help="only entries of jobs from this queue")
    redis_arguments(common)
    common.add_argument("--namespace", default=None, help="[env REDPOOL_NAMESPACE]")
    actions = dead.add_subparsers(dest="action", metavar="ACTION", required=True)
    dl = actions.add_parser("list", parents=[common], help="show entries, newest first")
    dl.add_argument("--limit", type=int, default=20, metavar="N",
                    help="show at most N (default 20; 0: all)")
    dl.add_argument("--json", action="store_true", help="print the entries as JSON lines")
    dr = actions.add_parser("requeue", parents=[common], help="push jobs back onto their "
                            "queues (as new work) and remove their entries")
    dr.add_argument("ids", nargs="*", metavar="ID", help="job ids of the entries to requeue")
    dr.add_argument("--all", action="store_true", help="every entry (of --queue, if given)")
    dp = actions.add_parser("purge", parents=[common], help="remove entries; needs "
                            "--older-than or --all")
    dp.add_argument("--older-than", metavar="DURATION", help="failed that long ago: 30s, 15m, "
                    "12h, 7d, or seconds")
    dp.add_argument("--all", action="store_true", help="every entry (of --queue, if given)")
    dead.set_defaults(run=cmd_dead)

    acl = sub.add_parser("acl", help="print the ACL SETUSER line of a least-privilege Redis "
                                     "user for producers or workers (docs/deploy.md)")
    acl.add_argument("role", choices=["producer", "worker"])
    acl.add_argument("--namespace", default=None, help="[env REDPOOL_NAMESPACE]")
    acl.add_argument("--user", default=None, help="the user name (default: redpool-ROLE)")
    acl.add_argument("--reply-to", "--reply-pattern", dest="reply_to", action="append",
                     metavar="PATTERN", help="a --reply-to pattern of the workers, e.g. "
                     "'myapp:replies:*'; repeat for several [env REDPOOL_REPLY_TO]")
    acl.set_defaults(run=cmd_acl)

    st = sub.add_parser("status", help="queues, supervisors and throughput, from any machine "
                                       "that can reach Redis")
    st.add_argument("--json", action="store_true", help="print one JSON object (with --watch: "
                                                        "one per line, per refresh)")
    st.add_argument("--watch", nargs="?", type=float, const=2.0, default=None, metavar="SECONDS",
                    help="refresh every SECONDS (default 2) until Ctrl-C")
    st.add_argument("--queue", action="append", default=None, metavar="QUEUE",
                    help="show only this queue (repeat for several); skips the SCAN that "
                         "finds queues no supervisor listens to")
    redis_arguments(st)
    st.add_argument("--namespace", default=None, help="[env REDPOOL_NAMESPACE]")
    st.set_defaults(run=cmd_status)

    ins = sub.add_parser("inspect", help="where a job is now (queued, scheduled, running, "
                                         "finishing, finished, dead) and its JSON; exit 1 "
                                         "if not found")
    ins.add_argument("job_id", metavar="JOB_ID")
    ins.add_argument("--json", action="store_true", help="print one JSON object")
    redis_arguments(ins)
    ins.add_argument("--namespace", default=None, help="[env REDPOOL_NAMESPACE]")
    ins.set_defaults(run=cmd_inspect)
    return parser


# -- worker ------------------------------------------------------------------------------------

def cmd_worker(args: argparse.Namespace) -> int:
    cfg = config.resolve(args)
    logs.configure(cfg.log_level, cfg.log_format, daemon=True)
    return run_worker(cfg)


def run_worker(cfg: config.WorkerConfig, *,
               watch: Callable[[], contextlib.AbstractContextManager] | None = None) -> int:
    """Run the daemon until it stops.  ``watch``: a context to hold while it runs, with
    its signal handlers in place (`redpool dev --reload` sends it SIGHUP)."""
    from .signals import SignalInbox

    # First of all: its signals are blocked in every thread started from now on
    # (metrics, waiters), so that one thread takes each with its sender (signals.py)
    inbox = SignalInbox()
    try:
        return _run_worker(cfg, inbox, watch)
    finally:
        inbox.close()


def _run_worker(cfg: config.WorkerConfig, inbox,
                watch: Callable[[], contextlib.AbstractContextManager] | None) -> int:
    from . import titles
    from .connection import check, check_cluster, is_cluster_url, with_tls
    from .duties import Duties
    from .hooks import Hooks
    from .lease import Lease, Reaper
    from .pool import ProcessPool
    from .protocol import Keys
    from .queue import RedisQueue, connect
    from .supervisor import Supervisor
    from .systemd import notify_systemd
    from .urls import redact_url
    from .waiter import Waiter
    from . import oversized

    if not cfg.modules:
        raise ConfigError("name the modules that define your tasks, e.g. "
                          "`redpool worker myapp.tasks` (or set REDPOOL_MODULES)")
    # Like `python -m`, task modules are found relative to the working directory.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    # The title first: from here on `ps` shows it, not our command line (and whatever
    # password a --redis-url on it carries)
    title = titles.supervisor_titles(cfg.name, cfg.queues)
    log = logs.get("redpool")
    where = redact_url(cfg.redis_url)
    # every connection below (supervisor, waiters, metrics) is made from this one URL
    url = with_tls(cfg.redis_url, ca=cfg.redis_ca, cert=cfg.redis_cert, key=cfg.redis_key)
    r = connect(url)
    check(r, url)
    check_cluster(r, url)
    cluster = is_cluster_url(url)
    log.info("starting", version=__version__, redis=where, queues=cfg.queues,
             concurrency=cfg.concurrency, name=cfg.name, namespace=cfg.namespace,
             modules=cfg.modules, burst=cfg.burst, cluster=cluster)
    try:
        keys = Keys(cfg.namespace, cluster=cluster)
        for q in cfg.queues:
            keys.check_queue(q)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if cluster:  # one slot per queue: the same guarantees, other scripts (cluster.py)
        from .cluster import ClusterLease, ClusterQueue, ClusterReaper
        from .durable import Durable
        durable = Durable(r, cfg.durable_results)
        durable.check()  # (a node that refuses WAIT: said by the loop, redis_error)
        log.info("durable_results", **durable.describe())
        rq = ClusterQueue(r, keys, cfg.name, cfg.queues, dead_max=cfg.dead_max, durable=durable)
        lease = ClusterLease(r, keys, cfg.name, cfg.queues)
        reaper = ClusterReaper(r, keys, cfg.name, durable)
    else:
        rq = RedisQueue(r, keys, cfg.name, cfg.queues, dead_max=cfg.dead_max)
        lease, reaper = Lease(r, keys, cfg.name), Reaper(r, keys, cfg.name)
    rq.head_over = oversized.limit(cfg.max_payload)  # (longer jobs: refused unread)
    pool = ProcessPool(cfg.concurrency, cfg.modules, cfg.name, cfg.max_payload, cfg.namespace,
                       cfg.child_defaults(), max_result_size=cfg.max_result_size)
    waiter = None if cfg.burst else Waiter(
        rq, lambda: connect(url, blocking_timeout=1.0, **({"known_from": r} if cluster else {})),
        timeout=1.0)
    hooks = Hooks()
    hooks.subscribe(logs.event_logger())
    notify_systemd(hooks)  # only when run by systemd (NOTIFY_SOCKET is set)
    # observers: the process title, and Prometheus metrics when asked for (a port in
    # use stops the start here, before any child is spawned)
    hooks.subscribe(title)
    if cfg.metrics_port:
        from .metrics import serve_metrics
        hooks.subscribe(serve_metrics(cfg.metrics_port, cfg.metrics_addr, cfg.name, cfg.queues,
                                      keys, lambda: connect(url)))
    duties = Duties(cfg, rq, lease, reaper, hooks)
    try:
        with watch() if watch else contextlib.nullcontext():
            Supervisor(cfg, rq, pool, duties, waiter=waiter, inbox=inbox, hooks=hooks).run()
    finally:
        rq.close()
        r.close()
    return EXIT_OK


@contextlib.contextmanager
def private_server(url: str | None, *, announce: bool = True):
    """Yield ``url``, or the URL of an embedded server started (and stopped) here, in a
    temporary directory.  It keeps what it acknowledges (AOF), as a production server
    must: the worker warns about a server that would lose its jobs on a restart."""
    if url:
        yield url
        return
    from .server import EmbeddedServer

    with EmbeddedServer(appendonly=True, appendfsync="everysec") as srv:
        if announce:
            print(f"redpool: started a private server at {srv.url}", file=sys.stderr, flush=True)
        yield srv.url


def dev_server(args: argparse.Namespace):
    """The server `redpool dev` runs on: the URL given (unless it is the one this
    project's private server had), else that private server (dev.py)."""
    from pathlib import Path

    from . import dev
    from .urls import given_url

    url = given_url(args.redis_url, args.redis_url_file)
    root = Path.cwd()
    if url and not dev.is_ours(url, root):
        if args.fresh or args.port:
            raise ConfigError("--fresh and --port are for the private server: they cannot go "
                              "with a Redis URL of yours (--redis-url or REDPOOL_REDIS_URL)")
        return contextlib.nullcontext(url)
    return dev.dev_server(root, fresh=args.fresh, port=args.port,
                          announce=lambda line: print(line, file=sys.stderr, flush=True))


def cmd_dev(args: argparse.Namespace) -> int:
    from . import dev

    if args.reload_dir and not args.reload:
        raise ConfigError("--reload-dir goes with --reload")
    reload_dirs = dev.check_dirs(args.reload_dir or [os.getcwd()]) if args.reload else None
    with dev_server(args) as url:
        args.redis_url, args.redis_url_file = url, None
        cfg = config.resolve(args)
        logs.configure(cfg.log_level, cfg.log_format, daemon=True)
        return dev.run(cfg, run_worker, reload_dirs, logs.get("redpool.dev"))


# -- producer commands -------------------------------------------------------------------------

def cmd_enqueue(args: argparse.Namespace) -> int:
    return enqueue.run(args)


def cmd_acl(args: argparse.Namespace) -> int:
    from . import acl
    from .protocol import DEFAULT_NAMESPACE

    namespace = args.namespace or os.environ.get("REDPOOL_NAMESPACE") or DEFAULT_NAMESPACE
    patterns = args.reply_to or config.split_list(os.environ.get("REDPOOL_REPLY_TO", ""))
    try:
        line = acl.setuser(args.role, args.user, namespace, patterns)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    print(line)
    user = args.user or acl.default_user(args.role)
    print(f"redpool: a new user has no password and cannot log in until it gets one: "
          f"ACL SETUSER {user} '>PASSWORD' (running the line again keeps it)", file=sys.stderr)
    return EXIT_OK


def cmd_dead(args: argparse.Namespace) -> int:
    from . import dead

    return dead.run(args)


def cmd_status(args: argparse.Namespace) -> int:
    from .status import run_status

    return run_status(args)


def cmd_inspect(args: argparse.Namespace) -> int:
    from .status import run_inspect

    return run_inspect(args)


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo
    from .urls import given_url

    # only the flags: a REDPOOL_REDIS_URL exported for other work is not for the demo
    with private_server(given_url(args.redis_url, args.redis_url_file, env={})) as url:
        return run_demo(url, jobs=args.jobs)
