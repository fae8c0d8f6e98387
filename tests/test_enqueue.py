"""`redpool enqueue`: one job or many, its options, --wait, and the warning when no worker
serves the queue (real commands against the session's server, real daemons)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

from helpers import ROOT, Daemon
from redpool import enqueue, protocol
from redpool.errors import ConfigError
from terminal import on_a_terminal


def redpool(redis_url, namespace, *args: str, input: str | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("REDPOOL_")}
    return subprocess.run([sys.executable, "-m", "redpool", "enqueue", *args, "--redis-url",
                           redis_url, "--namespace", namespace], cwd=ROOT, env=env, input=input,
                          capture_output=True, text=True, timeout=timeout)


def queued(r, keys, queue: str = "default") -> list[dict]:
    """The jobs waiting in ``queue``, oldest (next to run) first."""
    return [json.loads(raw) for raw in reversed(r.lrange(keys.queue(queue), 0, -1))]


def lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


# -- one job ---------------------------------------------------------------------------------

def test_without_wait_the_job_names_no_reply_list_and_only_its_id_is_printed(
        redis_url, namespace, r, keys):
    res = redpool(redis_url, namespace, "t.add", "2", "3", "--id", "solo-1")
    assert res.returncode == 0, res.stderr
    assert res.stdout == "solo-1\n"
    [job] = queued(r, keys)
    # a reply_to here left a reply list in Redis for a day that nobody would ever read
    assert "reply_to" not in job
    assert (job["task"], job["args"], job["id"]) == ("t.add", [2, 3], "solo-1")


def test_job_options_are_written_into_the_job(redis_url, namespace, r, keys):
    res = redpool(redis_url, namespace, "t.add", "1", '"x"', "--kwargs", '{"b": 2}',
                  "--queue", "q1", "--max-retries", "4", "--retry-backoff", "0.5",
                  "--retry-backoff-max", "9", "--job-timeout", "30", "--dead-letter",
                  "--result-ttl", "120")
    assert res.returncode == 0, res.stderr
    [job] = queued(r, keys, "q1")
    assert job["id"] == res.stdout.strip()
    assert (job["args"], job["kwargs"]) == ([1, "x"], {"b": 2})
    assert {k: job[k] for k in ("max_retries", "retry_backoff", "retry_backoff_max", "timeout",
                                "dead_letter", "result_ttl")} == {
        "max_retries": 4, "retry_backoff": 0.5, "retry_backoff_max": 9.0, "timeout": 30.0,
        "dead_letter": True, "result_ttl": 120}
    res = redpool(redis_url, namespace, "t.add", "--queue", "q1", "--no-dead-letter")
    assert res.returncode == 0 and queued(r, keys, "q1")[-1]["dead_letter"] is False


def test_delay_and_at_schedule_the_job_on_the_servers_clock(redis_url, namespace, r, keys):
    res = redpool(redis_url, namespace, "t.add", "--id", "later", "--delay", "15m")
    assert res.returncode == 0, res.stderr
    (raw, due), = r.zrange(keys.scheduled("default"), 0, -1, withscores=True)
    sec, usec = r.time()
    assert json.loads(raw)["id"] == "later"
    assert 15 * 60 - 30 < due - (sec + usec / 1e6) <= 15 * 60
    assert r.llen(keys.queue("default")) == 0

    res = redpool(redis_url, namespace, "t.add", "--id", "at", "--at", "2030-01-02T03:04:05Z")
    assert res.returncode == 0, res.stderr
    scores = {json.loads(m)["id"]: s for m, s in r.zrange(keys.scheduled("default"), 0, -1,
                                                          withscores=True)}
    assert scores["at"] == 1893553445.0

    res = redpool(redis_url, namespace, "t.add", "--delay", "1m", "--at", "2030-01-01")
    assert res.returncode == 2 and "--delay or --at" in res.stderr


def test_the_old_timeout_flag_is_refused_naming_both_new_ones(redis_url, namespace, r, keys):
    res = redpool(redis_url, namespace, "t.add", "1", "2", "--wait", "--timeout", "30")
    assert res.returncode == 2
    assert "--wait-timeout" in res.stderr and "--job-timeout" in res.stderr
    assert len(lines(res.stderr)) == 1, res.stderr
    assert r.llen(keys.queue("default")) == 0


@pytest.mark.parametrize("flags, says", [
    (["--job-timeout", "0"], "--job-timeout"),
    (["--max-retries", "-1"], "--max-retries"),
    (["--delay", "soon"], "--delay"),
    (["--at", "tomorrow"], "--at"),
    (["--id", "no spaces"], "--id"),
    (["--kwargs", "[1]"], "--kwargs"),
    (["--result-ttl", "99999999999"], "--result-ttl"),
])
def test_bad_options_name_their_flag_and_queue_nothing(redis_url, namespace, r, keys, flags, says):
    res = redpool(redis_url, namespace, "t.add", *flags)
    assert res.returncode == 2 and says in res.stderr, res.stderr
    assert not r.exists(keys.queue("default"), keys.scheduled("default"))


@pytest.mark.daemon
def test_wait_prints_the_id_first_then_the_envelope_and_leaves_nothing_behind(
        redis_url, namespace, r, keys, tmp_path):
    d = Daemon(redis_url, namespace, "--concurrency", "1").start(tmp_path).wait_started()
    try:
        res = redpool(redis_url, namespace, "t.add", '"a"', "b", "--id", "w-1", "--wait",
                      "--wait-timeout", "60")
        assert res.returncode == 0, res.stderr
        first, rest = res.stdout.split("\n", 1)
        assert first == "w-1"
        env = json.loads(rest)
        assert env["id"] == "w-1" and env["result"] == "ab"  # "b" is not JSON: a string
        assert "warning" not in res.stderr                   # a live worker serves default

        res = redpool(redis_url, namespace, "t.boom", "--kwargs", '{"msg": "nope"}',
                      "--wait-timeout", "60")                 # implies --wait
        assert res.returncode == 1
        job_id, rest = res.stdout.split("\n", 1)
        env = json.loads(rest)
        assert env["id"] == job_id and env["status"] == "failed"
        assert env["error"]["message"] == "nope" and "Traceback" in env["error"]["traceback"]

        # --wait read the result keys: no reply list was ever made
        assert list(r.scan_iter(match=f"{namespace}:reply:*")) == []
        # with --result-ttl 0 there is no result key to read: a reply list, deleted after
        res = redpool(redis_url, namespace, "t.add", "1", "2", "--result-ttl", "0", "--wait")
        assert res.returncode == 0 and json.loads(res.stdout.split("\n", 1)[1])["result"] == 3
        assert list(r.scan_iter(match=f"{namespace}:reply:*")) == []
    finally:
        d.kill()


def test_wait_gives_up_after_the_wait_timeout_and_says_where_to_look(redis_url, namespace):
    res = redpool(redis_url, namespace, "t.add", "1", "2", "--id", "never", "--wait-timeout",
                  "0.5")
    assert res.returncode == 1
    assert res.stdout == "never\n"
    assert "no result for job never within 0.5 s" in res.stderr
    assert "redpool inspect never" in res.stderr


# -- is anyone listening? --------------------------------------------------------------------

def test_warns_when_no_worker_runs_in_the_namespace(redis_url, namespace):
    res = redpool(redis_url, namespace, "t.add", "1", "2")
    assert res.returncode == 0
    [warning] = lines(res.stderr)
    assert warning.startswith("redpool: warning: no worker is running in namespace")
    assert repr(namespace) in warning and "redpool worker MODULE --queue default" in warning


@pytest.mark.daemon
def test_warns_when_the_live_workers_serve_other_queues_only(redis_url, namespace, tmp_path):
    d = Daemon(redis_url, namespace, "--concurrency", "1", "--queue", "high",
               "--queue", "default").start(tmp_path).wait_started()
    try:
        res = redpool(redis_url, namespace, "t.add", "1", "2", "--queue", "emails")
        assert res.returncode == 0
        [warning] = lines(res.stderr)
        assert "no live worker takes jobs from queue 'emails'" in warning
        assert "default, high" in warning and "--queue emails" in warning
        res = redpool(redis_url, namespace, "t.add", "1", "2", "--queue", "high")
        assert res.returncode == 0 and res.stderr == ""
    finally:
        d.kill()


# -- many jobs -------------------------------------------------------------------------------

def test_from_a_file_queues_every_line_in_order_and_prints_their_ids(
        redis_url, namespace, r, keys, tmp_path):
    src = tmp_path / "jobs.jsonl"
    src.write_text('[1, 2]\n\n{"args": [3], "kwargs": {"b": 4}, "id": "own-id", "timeout": 9}\n'
                   '{"kwargs": {"a": 5}, "max_retries": 0}\n')
    res = redpool(redis_url, namespace, "t.add", "--from", str(src), "--max-retries", "2",
                  "--kwargs", '{"b": 1}')
    assert res.returncode == 0, res.stderr
    jobs = queued(r, keys)
    assert lines(res.stdout) == [j["id"] for j in jobs]
    assert jobs[1]["id"] == "own-id"
    assert [(j["args"], j["kwargs"]) for j in jobs] == [([1, 2], {"b": 1}), ([3], {"b": 4}),
                                                       ([], {"a": 5, "b": 1})]
    assert [j["max_retries"] for j in jobs] == [2, 2, 0]    # the line's own field wins
    assert jobs[1]["timeout"] == 9 and "timeout" not in jobs[0]
    assert not any("reply_to" in j for j in jobs)
    assert lines(res.stderr)[0] == "enqueued 3 jobs of t.add onto queue 'default'"


def test_from_standard_input_with_a_delay(redis_url, namespace, r, keys):
    res = redpool(redis_url, namespace, "t.add", "--from", "-", "--delay", "1h",
                  input="".join(f"[{i}, {i}]\n" for i in range(1200)))
    assert res.returncode == 0, res.stderr
    assert len(lines(res.stdout)) == 1200
    assert r.zcard(keys.scheduled("default")) == 1200
    assert "enqueued 1200 jobs of t.add onto queue 'default', due in 3600 s" in res.stderr
    assert "\r" not in res.stderr and "%|" not in res.stderr   # no bar off a terminal


@pytest.mark.parametrize("text, says", [
    ('[1]\n{"args": "x"}\n', "line 2: 'args' must be an array"),
    ('[1]\n{"tiemout": 3}\n', "line 2: unknown field 'tiemout' (did you mean 'timeout'?)"),
    ('[1]\n[1]\n{"timeout": -3}\n', "line 3: 'timeout' must be"),
    ("[1]\nnot json\n", "line 2: not JSON"),
    ("[NaN]\n", "line 1: cannot be sent as JSON"),
    ('"just a string"\n', "line 1: expected an array of arguments or an object"),
])
def test_from_a_bad_line_names_it_and_queues_nothing(redis_url, namespace, r, keys, text, says):
    res = redpool(redis_url, namespace, "t.add", "--from", "-", input=text)
    assert res.returncode == 2
    assert f"standard input, {says}" in res.stderr, res.stderr
    assert r.llen(keys.queue("default")) == 0


def test_from_refuses_what_cannot_apply_to_many_jobs(redis_url, namespace, tmp_path):
    src = tmp_path / "j.jsonl"
    src.write_text("[1]\n")
    for flags, says in [(["1"], "give no ARG"), (["--id", "x"], "its own \"id\""),
                        (["--wait"], "--wait waits for one job")]:
        res = redpool(redis_url, namespace, "t.add", *flags, "--from", str(src))
        assert res.returncode == 2 and says in res.stderr, res.stderr
    res = redpool(redis_url, namespace, "t.add", "--from", str(tmp_path / "missing.jsonl"))
    assert res.returncode == 2 and "cannot read" in res.stderr


def test_from_shows_a_progress_bar_on_a_terminal(redis_url, namespace, r, keys, tmp_path):
    src = tmp_path / "many.jsonl"
    src.write_text("".join(f"[{i}]\n" for i in range(2000)))
    env = {k: v for k, v in os.environ.items() if not k.startswith("REDPOOL_")}
    code, out, drawn = on_a_terminal(
        [sys.executable, "-m", "redpool", "enqueue", "t.add", "--from", str(src),
         "--redis-url", redis_url, "--namespace", namespace], env=env, cwd=ROOT)
    assert code == 0, drawn
    assert len(lines(out)) == 2000 and r.llen(keys.queue("default")) == 2000
    assert "enqueue:" in drawn and "/2000" in drawn         # tqdm's bar: "0/2000", ...
    assert "enqueued 2000 jobs of t.add onto queue 'default'" in drawn


# -- units -----------------------------------------------------------------------------------

def test_parse_lines_merges_shared_options_under_each_lines_own():
    options = {"kwargs": {"x": 1}, "result_ttl": None, "max_retries": 3, "retry_backoff": None,
               "retry_backoff_max": None, "timeout": None, "dead_letter": None}
    calls = enqueue.parse_lines(['[1]\n', '{"args": [2], "kwargs": {"x": 2}, "id": "a"}\n'],
                                "f", "t.add", options)
    assert calls == [([1], {"x": 1}, {}), ([2], {"x": 2}, {"id": "a"})]
    with pytest.raises(ConfigError, match="f, line 1: 'id'"):
        enqueue.parse_lines(['{"id": "bad id"}'], "f", "t.add", options)


def test_at_accepts_iso_times_and_unix_seconds():
    assert enqueue.parse_at("2030-01-02T03:04:05Z").timestamp() == 1893553445
    assert enqueue.parse_at("1893553445").timestamp() == 1893553445
    with pytest.raises(ValueError):
        enqueue.parse_at("1e300")
    assert protocol.POLICY_FIELDS == tuple(f for f in enqueue.LINE_FIELDS
                                          if f in protocol.POLICY_FIELDS)


def test_client_enqueue_with_reply_to_false_names_no_reply_list(redis_url, namespace, r, keys):
    from redpool import Client

    with Client(redis_url, namespace=namespace) as client:
        res = client.enqueue("t.add", 1, 2, reply_to=False, id="nr")
        assert "reply_to" not in json.loads(r.lindex(keys.queue("default"), 0))
        # its result is read from the result key
        r.set(keys.result("nr"), json.dumps({"id": "nr", "status": "succeeded", "result": 3}))
        assert res.get(timeout=10) == 3
        with pytest.raises(ValueError, match="callbacks"):
            client.enqueue("t.add", reply_to=False, callback=print)


def test_client_enqueue_many_with_own_fields_per_job_and_progress(redis_url, namespace, r, keys):
    from redpool import Client

    pushed = []
    with Client(redis_url, namespace=namespace) as client:
        results = client.enqueue_many(
            "t.add", [(i, i) for i in range(1200)], reply_to=False, max_retries=1,
            options_list=[{"id": "first", "max_retries": 5}] + [None] * 1199,
            on_pushed=pushed.append, delay=60)
    assert results[0].id == "first" and len({res.id for res in results}) == 1200
    assert pushed == [500, 500, 200]
    jobs = [json.loads(m) for m in r.zrange(keys.scheduled("default"), 0, -1)]
    assert {j["id"]: j["max_retries"] for j in jobs}["first"] == 5
    assert sum(j["max_retries"] == 1 for j in jobs) == 1199
    assert not any("reply_to" in j for j in jobs)


def test_on_redis_cluster_the_job_lands_in_its_queues_slot_and_leases_are_read(
        cluster_url, cluster_namespace, cluster_keys, rc):
    res = redpool(cluster_url, cluster_namespace, "t.add", "1", "2", "--queue", "b",
                  "--id", "c-1", "--job-timeout", "5")
    assert res.returncode == 0, res.stderr
    assert res.stdout == "c-1\n"
    assert "no worker is running in namespace" in res.stderr
    [job] = [json.loads(raw) for raw in rc.lrange(cluster_keys.queue("b"), 0, -1)]
    assert job["id"] == "c-1" and job["timeout"] == 5.0 and "reply_to" not in job


def test_a_redis_error_after_the_push_is_no_reason_to_say_the_job_was_not_queued():
    # The job is pushed; then the look at who serves its queue meets a dead connection.
    # That look is advice: it must not turn into "cannot reach Redis" (exit 4), which a
    # script would take as "not queued" and push the job again
    import redis as redispy

    from redpool.enqueue import unserved
    from redpool.keys import Keys

    class Gone:
        def __getattr__(self, name):
            def call(*a, **kw):
                raise redispy.ConnectionError("Connection reset by peer")
            return call

    client = SimpleNamespace(redis=Gone(), keys=Keys("redpool"), namespace="redpool",
                             url="redis://localhost:6379/0")
    assert unserved(client, "default") is None
