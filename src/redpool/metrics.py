"""Prometheus metrics at /metrics: a Hooks subscriber, plus queue depths read at scrape time.

What the supervisor does (jobs finished, children restarted, Redis outages) reaches
Prometheus the way it reaches the log: as events the loop emits to Hooks, which this
module counts.  The loop never mentions Prometheus, and without --metrics-port none of
this is even imported.  The registry is our own, not prometheus_client's global one,
so nothing another library registers shows up in it (and tests can make several).

What only Redis knows (how long a queue is, how old its oldest job) is read when
Prometheus scrapes, by a custom collector with its own connection: a number pushed
by the loop would be as old as the loop's last look, and would cost the loop a round
trip it does not need.  A Redis error at scrape time empties only those series
(``redpool_queue_metrics_ok`` says 0); every other metric is still served.

Labels are bounded: a queue is one this supervisor listens to, a task is a registered
name.  A job that never ran (invalid, unknown task, too large) is counted under the
task "(invalid)", since its task field is whatever its producer wrote; no label is
ever a job id.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import redis
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily

from . import __version__, logs
from . import protocol as p
from .deployment import read_queues
from .errors import ConfigError, RedisUnavailable

INVALID_TASK = "(invalid)"
# error types of jobs that never ran: their task name is not to be trusted as a label
NEVER_RAN = frozenset({p.E_INVALID_JOB, p.E_UNKNOWN_TASK, p.E_PAYLOAD_TOO_LARGE})
# error types settled by the supervisor after the fact: their duration is not the job's.
# (A timed-out attempt is timed: its duration is how long it ran until it was stopped.)
NOT_TIMED = NEVER_RAN | {p.E_WORKER_CRASHED}
# from a millisecond to an hour (the default --timeout)
DURATION_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                    30.0, 60.0, 300.0, 900.0, 3600.0)


class Metrics:
    """The worker's metrics in a registry of their own; ``on_event`` is the Hooks
    subscriber.  Per-job work is a dict lookup and an increment: label children are
    created once per (queue, task, outcome) and kept."""

    def __init__(self, name: str, queues: list[str], keys: p.Keys,
                 connect: Callable[[], redis.Redis]) -> None:
        self.registry = reg = CollectorRegistry()
        Gauge("redpool_info", "Always 1; labels say which supervisor and version this is",
              ["name", "version"], registry=reg).labels(name, __version__).set(1)
        self.jobs = Counter("redpool_jobs", "Jobs finished, by queue, task and outcome "
                            "(succeeded, failed, retrying: an attempt failed and was "
                            "scheduled again)", ["queue", "task", "outcome"], registry=reg)
        self.duration = Histogram("redpool_job_duration_seconds", "Time a job ran in its "
                                  "process (not counting timeouts and crashes)", ["task"],
                                  buckets=DURATION_BUCKETS, registry=reg)
        self.dead_lettered = Counter("redpool_dead_lettered", "Jobs this supervisor "
                                     "dead-lettered", ["queue"], registry=reg)
        self.timeouts = Counter("redpool_job_timeouts", "Jobs stopped at their timeout",
                                ["queue"], registry=reg)
        self.restarts = Counter("redpool_child_restarts", "Pool processes replaced, by "
                                "reason: died (crash, OOM kill), stopped (at a job's "
                                "timeout), retired (--max-jobs/--max-memory-per-child), "
                                "boot_failed",
                                ["reason"], registry=reg)
        self.outages = Counter("redpool_redis_outages", "Times Redis became unreachable "
                               "(one per outage, however many calls failed)", registry=reg)
        self.reaped = Counter("redpool_reaped_supervisors", "Dead supervisors whose jobs this "
                              "one put back", registry=reg)
        self.reaped_jobs = Counter("redpool_reaped_jobs", "Jobs put back from dead "
                                   "supervisors by this one", registry=reg)
        gauge = lambda n, h: Gauge(n, h, registry=reg)  # noqa: E731
        self.inflight = gauge("redpool_inflight_jobs", "Jobs handed to pool processes")
        self.held = gauge("redpool_held_jobs", "Jobs reserved from Redis, not yet handed out")
        self.unacked = gauge("redpool_unacknowledged_jobs", "Jobs finished, result not yet "
                             "written to Redis")
        self.concurrency = gauge("redpool_concurrency", "Pool processes wanted")
        self.children = gauge("redpool_children", "Pool processes alive")
        self.redis_up = gauge("redpool_redis_up", "1 while the supervisor reaches Redis")
        self.draining = gauge("redpool_draining", "1 while the supervisor drains (SIGTERM)")
        self.heartbeat = gauge("redpool_heartbeat_timestamp_seconds", "Unix time of the "
                               "loop's last heartbeat (every second)")
        reg.register(QueueCollector(keys, queues, connect))
        self._jobs: dict[tuple, Any] = {}
        self._durations: dict[str, Any] = {}
        self._handlers: dict[str, Callable[[dict], None]] = {
            "job_finished": self.job_finished, "heartbeat": self.on_heartbeat,
            "child_died": lambda f: self.restarts.labels("died").inc(),
            "child_stopped": lambda f: self.restarts.labels("stopped").inc(),
            "child_retired": lambda f: self.restarts.labels("retired").inc(),
            "child_boot_failed": lambda f: self.restarts.labels("boot_failed").inc(),
            "job_timeout": lambda f: self.timeouts.labels(f.get("queue", "")).inc(),
            "redis_down": lambda f: self.outages.inc(), "reaped": self.on_reaped,
        }

    def on_event(self, event: str, fields: dict) -> None:
        handler = self._handlers.get(event)
        if handler is not None:
            handler(fields)

    def job_finished(self, f: dict) -> None:
        error = f.get("error_type")
        task = f.get("task")
        if error in NEVER_RAN or not isinstance(task, str):
            task = INVALID_TASK
        key = (f["queue"], task, f["status"])
        counter = self._jobs.get(key)
        if counter is None:
            counter = self._jobs[key] = self.jobs.labels(*key)
        counter.inc()
        if error not in NOT_TIMED:
            hist = self._durations.get(task)
            if hist is None:
                hist = self._durations[task] = self.duration.labels(task)
            hist.observe(f.get("duration") or 0.0)
        if f.get("dead"):
            self.dead_lettered.labels(f["queue"]).inc()

    def on_heartbeat(self, f: dict) -> None:
        self.inflight.set(f.get("inflight", 0))
        self.held.set(f.get("held", 0))
        self.unacked.set(f.get("unacknowledged", 0))
        self.concurrency.set(f.get("concurrency", 0))
        self.children.set(f.get("children", 0))
        self.redis_up.set(0 if f.get("redis_down") else 1)
        self.draining.set(1 if f.get("state") == "draining" else 0)
        self.heartbeat.set(time.time())

    def on_reaped(self, f: dict) -> None:
        self.reaped.inc()
        self.reaped_jobs.inc(f.get("jobs", 0))


class QueueCollector:
    """Depth, oldest-job age and scheduled count of this supervisor's queues, and the
    length of the dead-letter list, read from Redis at each scrape in one round trip
    (see deployment.read_queues).  On Redis Cluster, where each queue has its own
    dead-letter list, the dead letters are those of this supervisor's queues (read
    with them; a TIME and one round trip per node).  Its connection is its own, made
    at the first scrape: the HTTP server's threads never share the loop's client."""

    def __init__(self, keys: p.Keys, queues: list[str],
                 connect: Callable[[], redis.Redis]) -> None:
        self.keys = keys
        self.queues = list(queues)
        self.connect = connect
        self._r: redis.Redis | None = None
        self._failing = False
        self._log = logs.get("redpool.metrics")

    @staticmethod
    def families() -> list[GaugeMetricFamily]:
        return [
            GaugeMetricFamily("redpool_queue_depth", "Jobs waiting in the queue", labels=["queue"]),
            GaugeMetricFamily("redpool_queue_oldest_job_age_seconds", "Age of the job taken "
                              "next, from its enqueued_at (absent when it has none or the "
                              "queue is empty)", labels=["queue"]),
            GaugeMetricFamily("redpool_scheduled_jobs", "Jobs in the queue's scheduled set "
                              "(delayed jobs, retries)", labels=["queue"]),
            GaugeMetricFamily("redpool_dead_letters", "Entries in the dead-letter list (on "
                              "Redis Cluster: in the dead-letter lists of this supervisor's "
                              "queues)"),
            GaugeMetricFamily("redpool_queue_metrics_ok", "1 if the queue metrics of this "
                              "scrape were read from Redis, 0 if Redis could not be read"),
        ]

    def describe(self) -> list[GaugeMetricFamily]:
        return self.families()  # names only: registering must not query Redis

    def collect(self) -> list[GaugeMetricFamily]:
        depth, age, scheduled, dead, ok = self.families()
        try:
            if self._r is None:
                self._r = self.connect()
            now, states = read_queues(self._r, self.keys, self.queues)
            dead_len = (sum(s.dead for s in states) if self.keys.cluster
                        else self._r.llen(self.keys.dead))
        except (redis.RedisError, RedisUnavailable, OSError) as e:
            if not self._failing:  # once per outage, like the loop's redis_down
                self._log.warning("metrics_redis_error", error=str(e),
                                  note="queue metrics are left out of scrapes until Redis answers")
            self._failing = True
            ok.add_metric([], 0)
            return [ok]
        self._failing = False
        for s in states:
            depth.add_metric([s.name], s.depth)
            if s.oldest_age is not None:
                age.add_metric([s.name], s.oldest_age)
            scheduled.add_metric([s.name], s.scheduled)
        dead.add_metric([], dead_len)
        ok.add_metric([], 1)
        return [depth, age, scheduled, dead, ok]


def serve_metrics(port: int, addr: str, name: str, queues: list[str], keys: p.Keys,
                  connect: Callable[[], redis.Redis]) -> Callable[[str, dict], None]:
    """Start the /metrics server (a daemon thread) and return the Hooks subscriber.
    A port that cannot be had is a configuration error: the worker does not start."""
    if not 0 < port < 65536:
        raise ConfigError(f"--metrics-port (REDPOOL_METRICS_PORT): {port} is not a TCP port "
                          "(1-65535)")
    metrics = Metrics(name, queues, keys, connect)
    try:
        start_http_server(port, addr, registry=metrics.registry)
    except OSError as e:
        raise ConfigError(f"--metrics-port {port}: cannot listen on {addr}:{port}: "
                          f"{e.strerror or e}; is another process (another worker?) using "
                          "it? Choose another port, or leave --metrics-port unset") from None
    host = f"[{addr}]" if ":" in addr else addr
    logs.get("redpool").info("metrics_serving", url=f"http://{host}:{port}/metrics")
    return metrics.on_event
