"""Each worker setting declared once: flag, environment variable, default, help.

The command line is built from this table, so a flag and its REDPOOL_* variable can
never drift apart.  Precedence: flag, then environment, then default.
"""

from __future__ import annotations

import argparse
import os
import math
import re
import socket
from dataclasses import dataclass, field
from typing import Any, Callable

from .cliparser import suggestion
from .errors import ConfigError
from .protocol import (DEFAULT_MAX_PAYLOAD, DEFAULT_MAX_RESULT_SIZE, DEFAULT_NAMESPACE,
                       MAX_RETRIES, NAME_RE)
from .replies import ReplyRule, check_pattern, check_patterns
from .urls import DEFAULT_URL, FILE_ENV, URL_ENV, chosen_url


def usable_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def default_name() -> str:
    """Stable across restarts on one host, so a restarted supervisor finds the jobs
    its killed predecessor left in its processing lists."""
    host = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname()) or "host"
    return host[:128]


def _bool(v: str) -> bool:
    low = v.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"expected true/false, got {v!r}")


def split_list(v: str) -> list[str]:
    """The items of a repeatable setting's environment variable: comma or space separated."""
    return [x for x in re.split(r"[,\s]+", v) if x]


def _positive(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    return _at_least(kind, 0, strict=True)


def _at_least(kind: Callable[[str], Any], low: float, strict: bool = False,
              high: float | None = None) -> Callable[[str], Any]:
    """A number parser that refuses NaN, infinity and values below ``low`` (or above
    ``high``)."""
    def parse(v: str) -> Any:
        x = kind(v)
        if not math.isfinite(x) or x < low or (strict and x == low) \
                or (high is not None and x > high):
            raise ValueError(f"must be a number {'greater than' if strict else 'of at least'} "
                             f"{low:g}{'' if high is None else f' and at most {high:g}'}, got {v}")
        return x
    parse.__name__ = kind.__name__
    return parse


_SIZE_UNITS = {"": 1, "b": 1, "k": 1024, "kb": 1024, "kib": 1024, "m": 1024 ** 2, "mb": 1024 ** 2,
               "mib": 1024 ** 2, "g": 1024 ** 3, "gb": 1024 ** 3, "gib": 1024 ** 3}


def _size(v: str) -> int:
    """Bytes: 1048576, 512M, 1.5G (binary units); 0 means no limit."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", v)
    if not m or m.group(2).lower() not in _SIZE_UNITS:
        raise ValueError(f"expected a size like 536870912, 512M or 2G, got {v!r}")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])


#: The largest --max-result-size: Redis refuses a string over 512 MB, and on Redis
#: Cluster the envelope travels escaped to ASCII (cluster.py), up to three times longer.
MAX_RESULT_SIZE_CEILING = 128 * 1024 ** 2


def _result_size(v: str) -> int:
    n = _size(v)
    if not 1024 <= n <= MAX_RESULT_SIZE_CEILING:
        raise ValueError(f"must be from 1K to 128M (Redis refuses strings over 512 MB), got {v}")
    return n


_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)([smhd]?)", re.IGNORECASE)
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """Seconds in ``30s``, ``15m``, ``12h``, ``7d`` or a plain number of seconds."""
    m = _DURATION.fullmatch(text.strip())
    if not m:
        raise ConfigError(f"invalid duration {text!r}: use seconds (3600) or a number "
                          "with a unit: 30s, 15m, 12h, 7d")
    return float(m.group(1)) * _UNITS[m.group(2).lower()]


def _choice(*options: str) -> Callable[[str], str]:
    def parse(v: str) -> str:
        if v.lower() not in options:
            raise ValueError(f"expected {', '.join(options[:-1])} or {options[-1]}, got {v!r}"
                             + suggestion(v.lower(), options))
        return v.lower()
    return parse


def _key_part(what: str) -> Callable[[str], str]:
    def parse(v: str) -> str:
        if not v or any(c.isspace() for c in v):
            raise ValueError(f"invalid {what} {v!r}: must be non-empty, without spaces")
        return v
    return parse


def _name(v: str) -> str:
    if not NAME_RE.match(v):
        raise ValueError(f"{v!r}: use 1-128 of letters, digits and . _ - (no ':')")
    return v


@dataclass(frozen=True)
class Setting:
    dest: str
    flag: str
    env: str
    default: Any
    help: str
    parse: Callable[[str], Any] = str
    repeat: bool = False     # --queue a --queue b; env: comma or space separated
    switch: bool = False     # a flag without value


SETTINGS: tuple[Setting, ...] = (
    Setting("redis_url", "--redis-url", "REDPOOL_REDIS_URL", DEFAULT_URL,
            "Redis URL: redis://, rediss:// (TLS), unix://, redis+sentinel://host:26379,"
            "host2:26379/service[/db], or redis+cluster://host:port[,host:port...] for Redis "
            "Cluster (rediss+... with TLS); user and password allowed (on the command line, "
            "a password is seen in ps until redpool hides it, and kept in shell history: "
            "prefer the variable or --redis-url-file)"),
    Setting("redis_url_file", "--redis-url-file", "REDPOOL_REDIS_URL_FILE", None,
            "file holding the Redis URL on one line, so that its password is neither on "
            "the command line nor in the environment (systemd: LoadCredential=)"),
    Setting("redis_ca", "--redis-ca", "REDPOOL_REDIS_CA", None,
            "CA bundle (PEM) to trust for the server's TLS certificate (rediss:// URLs; "
            "default: the system's)"),
    Setting("redis_cert", "--redis-cert", "REDPOOL_REDIS_CERT", None,
            "client certificate (PEM), for servers that require one (tls-auth-clients)"),
    Setting("redis_key", "--redis-key", "REDPOOL_REDIS_KEY", None,
            "private key (PEM) of --redis-cert, unless that file holds it too"),
    Setting("queues", "--queue", "REDPOOL_QUEUE", ["default"],
            "queue to take jobs from; repeat for several, highest priority first",
            _key_part("queue name"), repeat=True),
    Setting("concurrency", "--concurrency", "REDPOOL_CONCURRENCY", None,
            "pool processes (default: the usable cores)", _positive(int)),
    Setting("namespace", "--namespace", "REDPOOL_NAMESPACE", DEFAULT_NAMESPACE,
            "prefix of every Redis key", _key_part("namespace")),
    Setting("reply_to", "--reply-to", "REDPOOL_REPLY_TO", [],
            "key pattern (Redis glob, as in ACL rules) of reply_to lists this worker answers "
            "on besides its namespace's reply lists, e.g. 'myapp:replies:*'; repeat for "
            "several; grant them in the worker's ACL too", check_pattern, repeat=True),
    Setting("grace", "--grace", "REDPOOL_GRACE", 30.0,
            "seconds running jobs may take to finish on SIGTERM before they are requeued",
            _at_least(float, 0)),
    Setting("burst", "--burst", "REDPOOL_BURST", False,
            "exit once the queues are empty and nothing is running", _bool, switch=True),
    Setting("name", "--name", "REDPOOL_NAME", None,
            "this supervisor's name, unique in the cluster (default: the host name)", _name),
    Setting("prefetch", "--prefetch", "REDPOOL_PREFETCH", None,
            "jobs reserved ahead of free processes (default: the concurrency)",
            _at_least(int, 0)),
    Setting("max_payload", "--max-payload", "REDPOOL_MAX_PAYLOAD", DEFAULT_MAX_PAYLOAD,
            "largest job accepted, in bytes; larger ones are dead-lettered", _positive(int)),
    Setting("max_result_size", "--max-result-size", "REDPOOL_MAX_RESULT_SIZE",
            DEFAULT_MAX_RESULT_SIZE,
            "largest result envelope written, in bytes (or 16M, 64M; at most 128M); the job "
            "of a larger one fails with ResultTooLarge and is dead-lettered", _result_size),
    Setting("dead_max", "--dead-max", "REDPOOL_DEAD_MAX", 10_000,
            "length cap of the dead-letter list (oldest entries are dropped)", _positive(int)),
    Setting("lease", "--lease", "REDPOOL_LEASE", 15.0,
            "heartbeat lease in seconds: how long this supervisor counts as alive "
            "without renewing it (at least 1)", _at_least(float, 1)),
    Setting("timeout", "--timeout", "REDPOOL_TIMEOUT", 3600.0,
            "hard time limit of a job in seconds, unless the job or task sets one; its process "
            "is stopped and the job fails with TimeoutError (0: no limit)", _at_least(float, 0)),
    Setting("max_retries", "--max-retries", "REDPOOL_MAX_RETRIES", 0,
            f"retries of a job whose task raises, unless the job or task sets them (at most "
            f"{MAX_RETRIES})", _at_least(int, 0, high=MAX_RETRIES)),
    Setting("retry_backoff", "--retry-backoff", "REDPOOL_RETRY_BACKOFF", 1.0,
            "base of the exponential retry backoff, seconds (full jitter)",
            _at_least(float, 0, strict=True)),
    Setting("retry_backoff_max", "--retry-backoff-max", "REDPOOL_RETRY_BACKOFF_MAX", 300.0,
            "cap of the retry backoff, seconds", _at_least(float, 0, strict=True)),
    Setting("max_crashes", "--max-crashes", "REDPOOL_MAX_CRASHES", 3,
            "a job whose host or process dies running it more often than this is "
            "dead-lettered as a poison pill", _at_least(int, 0)),
    Setting("max_jobs_per_child", "--max-jobs-per-child", "REDPOOL_MAX_JOBS_PER_CHILD", 0,
            "replace a pool process after this many jobs (0: never)", _at_least(int, 0)),
    Setting("max_memory_per_child", "--max-memory-per-child", "REDPOOL_MAX_MEMORY_PER_CHILD", 0,
            "replace a pool process, after its current job, once its resident memory is "
            "above this (bytes, or 512M, 2G; 0: never)", _size),
    Setting("durable_results", "--durable-results", "REDPOOL_DURABLE_RESULTS", "auto",
            "Redis Cluster: a job's answer leaves its outbox only once a replica of the node "
            "it was written to has it (WAIT), so that a failover of that node cannot lose it; "
            "auto: on when the primaries have replicas", _choice("auto", "on", "off")),
    Setting("log_level", "--log-level", "REDPOOL_LOG_LEVEL", "info",
            "debug, info (shows every job), warning, error",
            _choice("debug", "info", "warning", "error")),
    Setting("log_format", "--log-format", "REDPOOL_LOG_FORMAT", "auto",
            "json, console, or auto (console on a terminal, JSON lines otherwise)",
            _choice("auto", "json", "console")),
    Setting("metrics_port", "--metrics-port", "REDPOOL_METRICS_PORT", 0,
            "serve Prometheus metrics at http://ADDR:PORT/metrics (0: off)", _at_least(int, 0)),
    Setting("metrics_addr", "--metrics-addr", "REDPOOL_METRICS_ADDR", "127.0.0.1",
            "address the metrics server listens on (0.0.0.0 or :: for every interface, "
            "as a container needs)", _key_part("address")),
)


_URL_DESTS = ("redis_url", "redis_url_file")


@dataclass
class WorkerConfig:
    modules: list[str] = field(default_factory=list)
    redis_url: str = DEFAULT_URL
    redis_url_file: str | None = None   # where redis_url was read from, if from a file
    redis_ca: str | None = None
    redis_cert: str | None = None
    redis_key: str | None = None
    queues: list[str] = field(default_factory=lambda: ["default"])
    concurrency: int = 1
    namespace: str = DEFAULT_NAMESPACE
    reply_to: list[str] = field(default_factory=list)   # patterns, beyond <ns>:reply:*
    grace: float = 30.0
    burst: bool = False
    name: str = ""
    prefetch: int = 1
    max_payload: int = DEFAULT_MAX_PAYLOAD
    max_result_size: int = DEFAULT_MAX_RESULT_SIZE
    dead_max: int = 10_000
    lease: float = 15.0
    timeout: float = 3600.0
    max_retries: int = 0
    retry_backoff: float = 1.0
    retry_backoff_max: float = 300.0
    max_crashes: int = 3
    max_jobs_per_child: int = 0
    max_memory_per_child: int = 0
    durable_results: str = "auto"       # Redis Cluster only (durable.py)
    log_level: str = "info"
    log_format: str = "auto"
    metrics_port: int = 0               # 0: no metrics server
    metrics_addr: str = "127.0.0.1"

    def child_defaults(self) -> dict:
        """The delivery policy pool children apply unless a job or task says otherwise."""
        return {"max_retries": self.max_retries, "retry_backoff": self.retry_backoff,
                "retry_backoff_max": self.retry_backoff_max, "timeout": self.timeout,
                "reply_patterns": tuple(self.reply_to)}

    def reply_rule(self) -> ReplyRule:
        """The keys this worker may push answers onto (replies.py)."""
        return ReplyRule(self.namespace, self.reply_to)


def add_worker_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("modules", nargs="*", metavar="MODULE",
                        help="modules that define the tasks (env REDPOOL_MODULES)")
    for s in SETTINGS:
        help_text = f"{s.help} [env {s.env}]"
        if s.switch:
            parser.add_argument(s.flag, dest=s.dest, action="store_const", const=True,
                                default=None, help=help_text)
        elif s.repeat:
            parser.add_argument(s.flag, dest=s.dest, action="append", default=None,
                                help=help_text)
        else:
            parser.add_argument(s.flag, dest=s.dest, default=None, help=help_text)


def resolve(args: argparse.Namespace, env: dict[str, str] | None = None) -> WorkerConfig:
    """Flags win over the environment, which wins over defaults."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for s in SETTINGS:
        if s.dest in _URL_DESTS:
            continue  # below: a URL, or a file that holds it
        raw = getattr(args, s.dest, None)
        source = s.flag
        if raw is None and env.get(s.env) not in (None, ""):
            raw, source = env[s.env], s.env
        sources[s.dest] = source
        if raw is None:
            values[s.dest] = s.default
            continue
        try:
            if s.repeat:
                items = raw if isinstance(raw, list) else split_list(raw)
                values[s.dest] = [s.parse(x) for x in items]
            elif s.switch and raw is True:
                values[s.dest] = True
            else:
                values[s.dest] = s.parse(raw)
        except ValueError as e:
            raise ConfigError(f"{source}: {e}") from None
    flag, file = getattr(args, "redis_url", None), getattr(args, "redis_url_file", None)
    values["redis_url"] = chosen_url(flag, file, env)
    values["redis_url_file"] = None if flag else file or (None if env.get(URL_ENV)
                                                          else env.get(FILE_ENV) or None)
    modules = list(args.modules or []) or split_list(env.get("REDPOOL_MODULES", ""))
    cfg = WorkerConfig(modules=modules, **values)
    cfg.concurrency = cfg.concurrency or usable_cores()
    cfg.prefetch = cfg.concurrency if cfg.prefetch is None else cfg.prefetch
    cfg.name = cfg.name or default_name()
    if not cfg.queues:
        raise ConfigError(f"{sources['queues']}: at least one queue is needed")
    if len(set(cfg.queues)) != len(cfg.queues):
        raise ConfigError(f"{sources['queues']}: a queue is listed twice: {cfg.queues}")
    try:
        check_patterns(cfg.namespace, cfg.reply_to)
    except ValueError as e:
        raise ConfigError(f"{sources['reply_to']}: {e}") from None
    return cfg
