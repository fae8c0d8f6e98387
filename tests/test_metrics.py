"""Prometheus metrics: the subscriber fed events by hand, the scrape-time queue collector
against a real server (and a dead one), and a real daemon scraped over HTTP."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import redis
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from helpers import ROOT, envelope, lpush_jobs, wait_for
from redpool import __version__, cli, config
from redpool.errors import ConfigError
from redpool.metrics import INVALID_TASK, Metrics, serve_metrics


def samples(text: str) -> dict[tuple, float]:
    """{(sample name, sorted label items): value} of an exposition text."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(found: dict, metric: str, /, **labels) -> float | None:
    return found.get((metric, tuple(sorted(labels.items()))))


def scrape(m: Metrics) -> dict:
    return samples(generate_latest(m.registry).decode())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def finished(queue="default", task="t.add", status="succeeded", error_type=None, duration=0.01,
             dead=False) -> dict:
    return dict(queue=queue, id="x", task=task, status=status, error_type=error_type,
                result_id="x", ttl=60, reply_to=None, attempt=1, duration=duration, dead=dead)


# -- the subscriber, fed by hand ----------------------------------------------------------------

def test_events_become_counters_histograms_and_gauges(r, keys):
    m = Metrics("w9", ["default"], keys, lambda: r)
    for _ in range(3):
        m.on_event("job_finished", finished(duration=0.02))
    m.on_event("job_finished", finished(task="t.boom", status="retrying", error_type="ValueError",
                                        duration=0.2))
    m.on_event("job_finished", finished(task="t.boom", status="failed", error_type="ValueError",
                                        duration=3.0, dead=True))
    m.on_event("job_finished", finished(task="t.sleep", status="failed", error_type="TimeoutError",
                                        duration=42.0))
    # jobs that never ran are counted under one label, whatever task they named
    for i in range(5):
        m.on_event("job_finished", finished(task=f"random-{i}", status="failed",
                                            error_type="UnknownTask", dead=True))
    m.on_event("job_finished", finished(task=None, status="failed", error_type="InvalidJob"))
    m.on_event("heartbeat", dict(state="draining", inflight=3, held=2, unacknowledged=1,
                                 concurrency=4, children=4, redis_down=True, succeeded=3))
    for ev, fields in [("child_died", {"pid": 1}), ("child_died", {"pid": 2}),
                       ("child_retired", {"pid": 3, "reason": "x"}), ("redis_down", {}),
                       ("reaped", {"supervisor": "w2", "jobs": 7}),
                       ("job_timeout", {"queue": "default"}), ("child_stopped", {"pid": 4}),
                       ("promoted", {"jobs": 3}), ("an_event_of_the_future", {})]:
        m.on_event(ev, fields)

    got = scrape(m)
    jobs = "redpool_jobs_total"
    assert value(got, jobs, queue="default", task="t.add", outcome="succeeded") == 3
    assert value(got, jobs, queue="default", task="t.boom", outcome="retrying") == 1
    assert value(got, jobs, queue="default", task="t.boom", outcome="failed") == 1
    assert value(got, jobs, queue="default", task=INVALID_TASK, outcome="failed") == 6
    assert not any("random-" in str(k) for k in got)  # no label from a producer's whim
    hist = "redpool_job_duration_seconds"
    assert value(got, hist + "_count", task="t.add") == 3
    assert value(got, hist + "_sum", task="t.add") == pytest.approx(0.06)
    assert value(got, hist + "_bucket", task="t.add", le="0.01") == 0
    assert value(got, hist + "_bucket", task="t.add", le="0.025") == 3
    assert value(got, hist + "_count", task="t.boom") == 2
    # a timed-out attempt is timed by how long it ran until its process was stopped
    assert value(got, hist + "_count", task="t.sleep") == 1
    assert value(got, hist + "_bucket", task="t.sleep", le="30.0") == 0
    assert value(got, hist + "_count", task=INVALID_TASK) is None
    assert value(got, "redpool_dead_lettered_total", queue="default") == 6
    assert value(got, "redpool_job_timeouts_total", queue="default") == 1
    assert value(got, "redpool_child_restarts_total", reason="died") == 2
    assert value(got, "redpool_child_restarts_total", reason="stopped") == 1
    assert value(got, "redpool_child_restarts_total", reason="retired") == 1
    assert value(got, "redpool_redis_outages_total") == 1
    assert value(got, "redpool_reaped_supervisors_total") == 1
    assert value(got, "redpool_reaped_jobs_total") == 7
    assert value(got, "redpool_inflight_jobs") == 3 and value(got, "redpool_held_jobs") == 2
    assert value(got, "redpool_unacknowledged_jobs") == 1
    assert value(got, "redpool_concurrency") == 4 and value(got, "redpool_children") == 4
    assert value(got, "redpool_redis_up") == 0 and value(got, "redpool_draining") == 1
    assert abs(value(got, "redpool_heartbeat_timestamp_seconds") - time.time()) < 60
    assert value(got, "redpool_info", name="w9", version=__version__) == 1


def test_queue_metrics_are_read_from_redis_at_scrape_time(r, keys, redis_url):
    m = Metrics("w9", ["default", "empty"], keys, lambda: redis.Redis.from_url(redis_url))
    now = time.time()
    lpush_jobs(r, keys, [{"task": "t.add", "enqueued_at": now - 40 + i} for i in range(3)])
    r.zadd(keys.scheduled("default"), {"a": now + 100, "b": now + 200})
    r.lpush(keys.dead, "{}", "{}")
    got = scrape(m)
    assert value(got, "redpool_queue_depth", queue="default") == 3
    assert 39 <= value(got, "redpool_queue_oldest_job_age_seconds", queue="default") < 60
    assert value(got, "redpool_scheduled_jobs", queue="default") == 2
    assert value(got, "redpool_queue_depth", queue="empty") == 0
    assert value(got, "redpool_queue_oldest_job_age_seconds", queue="empty") is None
    assert value(got, "redpool_dead_letters") == 2
    assert value(got, "redpool_queue_metrics_ok") == 1
    # read again at the next scrape, not cached
    r.rpop(keys.queue("default"))
    got = scrape(m)
    assert value(got, "redpool_queue_depth", queue="default") == 2
    assert 38 <= value(got, "redpool_queue_oldest_job_age_seconds", queue="default") < 59


def test_a_redis_error_at_scrape_time_leaves_out_only_the_queue_metrics(keys):
    # Given a collector whose Redis is not there (nothing listens on port 1)
    m = Metrics("w9", ["default"], keys, lambda: redis.Redis(
        host="127.0.0.1", port=1, socket_connect_timeout=1, socket_timeout=1))
    m.on_event("job_finished", finished())
    m.on_event("heartbeat", dict(state="running", inflight=1, held=0, unacknowledged=0,
                                 concurrency=2, children=2, redis_down=False))
    # When Prometheus scrapes, Then the scrape works and says the queue part failed
    text = generate_latest(m.registry).decode()
    got = samples(text)
    assert value(got, "redpool_jobs_total", queue="default", task="t.add", outcome="succeeded") == 1
    assert value(got, "redpool_inflight_jobs") == 1
    assert value(got, "redpool_queue_metrics_ok") == 0
    assert "redpool_queue_depth{" not in text


# -- configuration ------------------------------------------------------------------------------

def test_metrics_flags_default_off_on_loopback_and_read_the_environment():
    parse = lambda *a: cli.build_parser().parse_args(["worker", *a])  # noqa: E731
    cfg = config.resolve(parse(), {})
    assert (cfg.metrics_port, cfg.metrics_addr) == (0, "127.0.0.1")
    cfg = config.resolve(parse(), {"REDPOOL_METRICS_PORT": "9100", "REDPOOL_METRICS_ADDR": "::"})
    assert (cfg.metrics_port, cfg.metrics_addr) == (9100, "::")
    cfg = config.resolve(parse("--metrics-port", "9200", "--metrics-addr", "0.0.0.0"),
                         {"REDPOOL_METRICS_PORT": "9100"})
    assert (cfg.metrics_port, cfg.metrics_addr) == (9200, "0.0.0.0")
    with pytest.raises(ConfigError, match="REDPOOL_METRICS_PORT"):
        config.resolve(parse(), {"REDPOOL_METRICS_PORT": "-1"})
    with pytest.raises(ConfigError, match="not a TCP port"):
        serve_metrics(70000, "127.0.0.1", "w", ["default"], None, None)


def test_serve_metrics_serves_http_and_refuses_a_port_in_use(r, keys):
    port = free_port()
    on_event = serve_metrics(port, "127.0.0.1", "w9", ["default"], keys, lambda: r)
    on_event("job_finished", finished())
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    assert value(samples(body), "redpool_jobs_total", queue="default", task="t.add",
                 outcome="succeeded") == 1
    with pytest.raises(ConfigError, match=f"--metrics-port {port}: cannot listen") as e:
        serve_metrics(port, "127.0.0.1", "w9", ["default"], keys, lambda: r)
    assert e.value.exit_code == 2


# -- a real daemon ------------------------------------------------------------------------------

@pytest.mark.daemon
def test_a_daemon_serves_its_metrics_over_http(r, keys, daemons):
    port = free_port()
    ledger = keys.ns + ":ledger"
    d = daemons("--concurrency", "1", "--prefetch", "0", "--max-crashes", "0",
                "--metrics-port", str(port), ledger=ledger).wait_started()
    url = f"http://127.0.0.1:{port}/metrics"
    get = lambda: samples(urllib.request.urlopen(url, timeout=10).read().decode())  # noqa: E731

    # Given one slow job running and two waiting behind it, pushed 30 s ago
    lpush_jobs(r, keys, [{"task": "t.sleep", "id": "slow", "args": [3]}])
    wait_for(lambda: r.lrange(ledger, 0, -1), what="the slow job to start")
    now = time.time()
    lpush_jobs(r, keys, [{"task": "t.add", "id": f"w{i}", "args": [i, 1], "enqueued_at": now - 30}
                         for i in range(2)])
    # Then the queue's depth and age come from Redis, in-flight from the heartbeat
    got = wait_for(lambda: (g := get()) and value(g, "redpool_inflight_jobs") == 1
                   and value(g, "redpool_queue_depth", queue="default") == 2 and g,
                   what="metrics to show the slow job and the waiting ones")
    assert 29 <= value(got, "redpool_queue_oldest_job_age_seconds", queue="default") < 60

    # When jobs succeed, fail, name no task, and one kills its process (a poison pill at
    # its first crash, with --max-crashes 0)
    lpush_jobs(r, keys, [{"task": "t.boom", "id": f"b{i}"} for i in range(2)]
               + [{"task": "no.such", "id": "u0"}, {"task": "t.die", "id": "d0"},
                  {"task": "t.add", "id": "last", "args": [1, 1]}])
    wait_for(lambda: envelope(r, keys, "last"), timeout=60, what="the last job")

    # Then the scrape counts each
    got = wait_for(lambda: (g := get()) and value(g, "redpool_inflight_jobs") == 0 and g,
                   what="a heartbeat after the last job")
    jobs = "redpool_jobs_total"
    assert value(got, jobs, queue="default", task="t.add", outcome="succeeded") == 3
    assert value(got, jobs, queue="default", task="t.sleep", outcome="succeeded") == 1
    assert value(got, jobs, queue="default", task="t.boom", outcome="failed") == 2
    assert value(got, jobs, queue="default", task=INVALID_TASK, outcome="failed") == 1
    assert value(got, "redpool_job_duration_seconds_count", task="t.add") == 3
    assert value(got, "redpool_job_duration_seconds_bucket", task="t.sleep", le="2.5") == 0
    assert value(got, "redpool_job_duration_seconds_bucket", task="t.sleep", le="5.0") == 1
    assert value(got, jobs, queue="default", task="t.die", outcome="failed") == 1
    assert value(got, "redpool_job_duration_seconds_count", task="t.die") is None
    assert value(got, "redpool_child_restarts_total", reason="died") == 1
    assert value(got, "redpool_dead_lettered_total", queue="default") == 2
    assert value(got, "redpool_queue_depth", queue="default") == 0
    assert value(got, "redpool_dead_letters") == 2
    assert value(got, "redpool_redis_up") == 1 and value(got, "redpool_children") == 1
    assert value(got, "redpool_queue_metrics_ok") == 1
    assert value(got, "redpool_info", name="w1", version=__version__) == 1
    assert any(e.get("event") == "metrics_serving" for e in d.events())


@pytest.mark.daemon
def test_a_metrics_port_in_use_stops_the_worker_at_start(redis_url, namespace):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        env = dict(os.environ)
        env.pop("REDPOOL_REDIS_URL", None)
        res = subprocess.run([sys.executable, "-m", "redpool", "worker", "tests.taskmods.jobs",
                              "--redis-url", redis_url, "--namespace", namespace,
                              "--metrics-port", str(port), "--log-format", "json"],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 2, res.stderr
    assert f"--metrics-port {port}: cannot listen on 127.0.0.1:{port}" in res.stderr
    assert "Address already in use" in res.stderr
    fatal = [json.loads(x) for x in res.stderr.splitlines() if '"fatal"' in x]
    assert fatal and fatal[0]["exit_code"] == 2
