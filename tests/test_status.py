"""`redpool status` and `redpool inspect` against a real daemon and a real server: the
numbers they show, their JSON, --watch on a real terminal, and that no password leaks."""

from __future__ import annotations

import io
import json
import os
import pty
import select
import signal
import socket
import subprocess
import sys
import time

import pytest

from helpers import ROOT, envelope, lpush_jobs, wait_for
from redpool import cli, status
from redpool.deployment import Observer

pytestmark = pytest.mark.daemon


def run(*argv: str) -> tuple[int, str]:
    """Run `redpool status|inspect ...` in this process: (exit code, stdout)."""
    args = cli.build_parser().parse_args(list(argv))
    out, err = io.StringIO(), io.StringIO()
    if argv[0] == "status":
        code = status.run_status(args, out)
    else:
        code = status.run_inspect(args, out, err)
    return code, out.getvalue() + err.getvalue()


def redpool(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("REDPOOL_REDIS_URL", None)
    return subprocess.run([sys.executable, "-m", "redpool", *argv], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def status_json(redis_url: str, namespace: str) -> dict:
    code, out = run("status", "--json", "--redis-url", redis_url, "--namespace", namespace)
    assert code == 0
    return json.loads(out)


def inspect_json(redis_url: str, namespace: str, job_id: str) -> tuple[int, dict]:
    code, out = run("inspect", job_id, "--json", "--redis-url", redis_url, "--namespace",
                    namespace)
    return code, json.loads(out.splitlines()[0])


# -- status -----------------------------------------------------------------------------------

def test_status_shows_the_numbers_of_a_running_daemon(r, keys, redis_url, namespace, daemons):
    ns = namespace
    d = daemons("--concurrency", "1", "--lease", "3", "--queue", "default", "--queue", "other")
    d.wait_started()
    # Given jobs that succeeded (3), failed (a task raising, an unknown task: 2, the
    # second also dead-lettered), none waiting yet
    lpush_jobs(r, keys, [{"task": "t.add", "id": f"a{i}", "args": [i, 1]} for i in range(3)]
               + [{"task": "t.boom", "id": "b0"}, {"task": "no.such.task", "id": "u0"}])
    wait_for(lambda: all(envelope(r, keys, i) for i in ["a0", "a1", "a2", "b0", "u0"]),
             what="five results")
    # and jobs nobody listens to, pushed 120 s ago, two scheduled for later, a dead letter
    # of a queue that no longer exists, and one slow job running
    now = time.time()
    lpush_jobs(r, keys, [{"task": "t.add", "id": f"p{i}", "args": [1, 2],
                          "enqueued_at": now - 120 + i} for i in range(4)], queue="parked")
    r.zadd(keys.scheduled("default"), {json.dumps({"task": "t.add", "id": f"s{i}"}): now + 600 + i
                                       for i in range(2)})
    r.lpush(keys.dead, json.dumps({"v": 1, "id": "g0", "queue": "gone", "reason": "x",
                                   "error_type": "InvalidJob", "worker": "w0",
                                   "failed_at": now, "job": "{}"}))
    lpush_jobs(r, keys, [{"task": "t.sleep", "id": "slow", "args": [60]}])

    # When status is asked (the lease, hence the info, is renewed every second here)
    snap = wait_for(lambda: (s := status_json(redis_url, ns))["supervisors"][0]["inflight"] == 1
                    and s["supervisors"][0]["succeeded"] == 3 and s, timeout=30,
                    what="status to show the slow job in flight")

    # Then each queue shows its depth, oldest age, scheduled and dead counts
    queues = {q["name"]: q for q in snap["queues"]}
    assert set(queues) == {"default", "other", "parked", "gone"}
    assert queues["parked"]["depth"] == 4 and 119 <= queues["parked"]["oldest_age"] < 200
    assert queues["default"]["depth"] == 0 and queues["default"]["oldest_age"] is None
    assert queues["default"]["scheduled"] == 2 and 500 < queues["default"]["next_due_in"] <= 600
    assert queues["default"]["dead"] == 1 and queues["gone"]["dead"] == 1
    assert queues["other"] == {"name": "other", "depth": 0, "oldest_age": None, "scheduled": 0,
                               "next_due_in": None, "dead": 0, "unusable": {}}
    assert snap["dead"] == {"total": 2, "scanned": 2, "unknown_queue": 0}
    assert snap["unusable"] == []   # (keys of the wrong type: tests/test_wrongtype.py)
    # and the supervisor its identity, counts, uptime and heartbeat
    (sup,) = snap["supervisors"]
    assert (sup["name"], sup["alive"], sup["host"], sup["pid"]) == ("w1", True,
                                                                   socket.gethostname(), d.pid)
    assert sup["queues"] == ["default", "other"] and sup["state"] == "running"
    assert (sup["concurrency"], sup["inflight"], sup["succeeded"], sup["failed"]) == (1, 1, 3, 2)
    assert 0 < sup["uptime"] < 120 and 0 <= sup["heartbeat_age"] <= 3
    assert sup["rate_1m"] > 0 and snap["throughput_1m"] == pytest.approx(sup["rate_1m"], abs=1e-3)
    assert snap["redis"] == redis_url and snap["namespace"] == ns

    # and the text form says the same for people
    code, text = run("status", "--redis-url", redis_url, "--namespace", ns)
    assert code == 0
    rows = {line.split()[0]: line.split() for line in text.splitlines() if line.strip()}
    assert rows["parked"][1] == "4" and rows["parked"][2].startswith("2m")
    assert rows["default"][1:4] == ["0", "-", "2"] and rows["default"][-1] == "1"
    assert rows["w1"][:5] == ["w1", socket.gethostname(), str(d.pid), "default,other", "running"]
    assert rows["w1"][5:9] == ["1", "1", "3", "2"]
    assert "heartbeat age" in text and "throughput:" in text and "dead letters: 2" in text

    # and --queue shows just that queue, without scanning
    code, out = run("status", "--json", "--queue", "parked", "--redis-url", redis_url,
                    "--namespace", ns)
    assert [q["name"] for q in json.loads(out)["queues"]] == ["parked"]


def test_status_shows_a_supervisor_whose_lease_expired(r, keys, redis_url, namespace):
    # Given a registered name whose lease key is gone (it died; no reaper has run yet)
    r.sadd(keys.supervisors, "ghost")
    r.hset(keys.supervisor("live"), mapping={"epoch": "e", "info": json.dumps(
        {"name": "live", "host": "h1", "pid": 7, "queues": ["q"], "concurrency": 2,
         "lease": 15.0, "started_at": time.time() - 100, "rate_1m": 2.5})})
    r.pexpire(keys.supervisor("live"), 12_000)  # renewed 3 s ago
    r.sadd(keys.supervisors, "live")
    snap = status_json(redis_url, namespace)
    sups = {s["name"]: s for s in snap["supervisors"]}
    assert sups["ghost"]["alive"] is False and sups["ghost"]["heartbeat_age"] is None
    assert sups["live"]["alive"] is True and 2.5 <= sups["live"]["heartbeat_age"] <= 4
    assert 99 <= sups["live"]["uptime"] < 110
    assert snap["throughput_1m"] == 2.5  # the expired one counts for nothing
    assert [q["name"] for q in snap["queues"]] == ["q"]
    _, text = run("status", "--redis-url", redis_url, "--namespace", namespace)
    assert "lease expired" in text and "expired" in text.split("ghost", 1)[1].split("\n")[0]


def test_watch_redraws_in_place_on_a_terminal_until_ctrl_c(r, keys, redis_url, namespace):
    # Given `redpool status --watch 0.3` writing to a real terminal
    master, slave = pty.openpty()
    env = dict(os.environ, COLUMNS="200")
    env.pop("REDPOOL_REDIS_URL", None)
    proc = subprocess.Popen([sys.executable, "-m", "redpool", "status", "--watch", "0.3",
                             "--redis-url", redis_url, "--namespace", namespace],
                            cwd=ROOT, env=env, stdin=slave, stdout=slave, stderr=slave,
                            start_new_session=True)
    os.close(slave)
    seen = b""

    def read_until(pred, timeout=30.0):
        nonlocal seen
        deadline = time.monotonic() + timeout
        while not pred(seen):
            assert time.monotonic() < deadline, f"terminal showed: {seen[-2000:]!r}"
            if select.select([master], [], [], 0.5)[0]:
                seen += os.read(master, 65536)

    try:
        lpush_jobs(r, keys, [{"task": "t.add", "id": "w0"}], queue="watched")
        read_until(lambda s: b"watched" in s)
        # When the queue grows while it watches
        lpush_jobs(r, keys, [{"task": "t.add", "id": f"w{i}"} for i in range(1, 7)],
                   queue="watched")
        mark = len(seen)
        read_until(lambda s: any(line.split()[:2] == [b"watched", b"7"]
                                 for line in s[mark:].replace(b"\x1b[K", b"").splitlines()))
        # Then each frame went to the top of the screen (no scrolling), cleared as it drew
        assert seen.count(b"\x1b[H") >= 2 and b"\x1b[K" in seen and b"\x1b[J" in seen
        assert b"Ctrl-C to stop" in seen
        # and Ctrl-C ends it cleanly
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        os.close(master)


def test_watch_without_a_terminal_prints_json_lines_and_survives_redis_errors(r, keys):
    lpush_jobs(r, keys, [{"task": "t.add"}], queue="jq")

    class Flaky(Observer):
        calls = 0

        def read(self):
            self.calls += 1
            if self.calls == 2:
                import redis
                raise redis.ConnectionError("connection refused, on purpose")
            return super().read()

    out = io.StringIO()
    obs = Flaky(r, keys)
    code = status.watch(obs, lambda s: status.status_json(s, keys, "redis://x"), 0.01, out,
                        "redis://x", json_lines=True, iterations=3)
    lines = [json.loads(x) for x in out.getvalue().splitlines()]
    assert code == 0 and len(lines) == 3
    assert lines[0]["queues"][0]["name"] == "jq" and lines[0]["queues"][0]["depth"] == 1
    assert "connection refused" in lines[1]["error"]
    assert lines[2]["queues"][0]["depth"] == 1


def test_observer_rescans_for_queues_only_every_so_often(r, keys):
    now = [0.0]
    obs = Observer(r, keys, rescan_every=30.0, clock=lambda: now[0])
    lpush_jobs(r, keys, [{"task": "t.add"}], queue="first")
    assert [q.name for q in obs.read().queues] == ["first"]
    lpush_jobs(r, keys, [{"task": "t.add"}], queue="second")
    now[0] = 10.0
    assert [q.name for q in obs.read().queues] == ["first"]  # not scanned again yet
    now[0] = 31.0
    assert [q.name for q in obs.read().queues] == ["first", "second"]


def test_no_password_in_status_or_inspect_output(tmp_path):
    import redis

    from redpool.server import EmbeddedServer

    with EmbeddedServer(extra_args=["--requirepass", "s3cret-pw"]) as srv:
        url = f"redis://:s3cret-pw@127.0.0.1:{srv.port}/0"
        rr = redis.Redis.from_url(url)
        rr.lpush("redpool:queue:default", json.dumps({"task": "t.add", "id": "pw1"}))
        res = redpool("status", "--redis-url", url)
        assert res.returncode == 0, res.stderr
        assert "redis://:***@127.0.0.1" in res.stdout
        res_json = redpool("status", "--json", "--redis-url", url)
        assert json.loads(res_json.stdout)["redis"].startswith("redis://:***@")
        res2 = redpool("inspect", "pw1", "--redis-url", url)
        assert res2.returncode == 0 and "queued in 'default'" in res2.stdout
        bad = redpool("status", "--redis-url", f"redis://:wrong-pw@127.0.0.1:{srv.port}/0")
        assert bad.returncode == 4 and "refused our credentials" in bad.stderr
        for res in (res, res_json, res2, bad):
            assert "s3cret-pw" not in res.stdout + res.stderr
            assert "wrong-pw" not in res.stdout + res.stderr
        rr.close()


def test_status_and_inspect_say_what_is_wrong():
    res = redpool("status", "--redis-url", "redis://user:pw-x@127.0.0.1:1/0")
    assert res.returncode == 4 and "cannot reach Redis" in res.stderr and "pw-x" not in res.stderr
    res = redpool("status", "--watch", "0")
    assert res.returncode == 2 and "--watch" in res.stderr
    res = redpool("inspect", "not a job id")
    assert res.returncode == 2 and "is not a job id" in res.stderr


# -- inspect ----------------------------------------------------------------------------------

def test_inspect_finds_a_job_in_each_state(r, keys, redis_url, namespace, daemons):
    ns = namespace
    d = daemons("--concurrency", "1").wait_started()
    # Given a job succeeded, one failed, one dead-lettered without a result key (result_ttl 0)
    lpush_jobs(r, keys, [{"task": "t.add", "id": "ok", "args": [2, 3]},
                         {"task": "t.boom", "id": "ko", "args": ["no luck"]},
                         {"task": "no.such", "id": "dd", "result_ttl": 0}])
    wait_for(lambda: envelope(r, keys, "ok") and envelope(r, keys, "ko") and r.llen(keys.dead),
             what="results")
    # and one running, one scheduled in an hour, and two queued in a long queue nobody
    # serves: 2501 jobs, more than two LRANGE chunks
    lpush_jobs(r, keys, [{"task": "t.sleep", "id": "run", "args": [60]}])
    r.zadd(keys.scheduled("default"),
           {json.dumps({"task": "t.add", "id": "sch"}): time.time() + 3600})
    pipe = r.pipeline()
    pipe.lpush(keys.queue("long"), json.dumps({"task": "t.add", "id": "first"}))
    for i in range(1200):
        pipe.lpush(keys.queue("long"), json.dumps({"task": "t.add", "id": f"f{i}"}))
    pipe.lpush(keys.queue("long"), json.dumps({"task": "t.add", "id": "mid"}))
    for i in range(1299):
        pipe.lpush(keys.queue("long"), json.dumps({"task": "t.add", "id": f"g{i}"}))
    pipe.execute()
    wait_for(lambda: r.llen(keys.processing("w1", "default")) == 1, what="the slow job taken")

    # When each is inspected, Then each is found where it is
    code, found = inspect_json(redis_url, ns, "first")
    assert code == 0 and found["found"] is True
    (place,) = found["places"]
    assert (place["state"], place["queue"], place["ahead"], place["length"]) == \
        ("queued", "long", 0, 2501)
    assert place["body"] == {"task": "t.add", "id": "first"} and place["key"] == keys.queue("long")
    (place,) = inspect_json(redis_url, ns, "mid")[1]["places"]
    assert (place["state"], place["ahead"]) == ("queued", 1201)

    (place,) = inspect_json(redis_url, ns, "sch")[1]["places"]
    assert place["state"] == "scheduled" and place["queue"] == "default"
    assert 3500 < place["due_in"] <= 3600

    (place,) = inspect_json(redis_url, ns, "run")[1]["places"]
    assert place["state"] == "running" and place["key"] == keys.processing("w1", "default")
    assert (place["supervisor"], place["host"], place["pid"], place["supervisor_alive"]) == \
        ("w1", socket.gethostname(), d.pid, True)
    assert place["body"]["task"] == "t.sleep"

    (place,) = inspect_json(redis_url, ns, "ok")[1]["places"]
    assert place["state"] == "succeeded" and place["body"]["result"] == 5
    assert 86000 < place["expires_in"] <= 86400

    (place,) = inspect_json(redis_url, ns, "ko")[1]["places"]
    assert place["state"] == "failed" and place["body"]["error"]["type"] == "ValueError"

    (place,) = inspect_json(redis_url, ns, "dd")[1]["places"]
    assert place["state"] == "dead" and place["body"]["error_type"] == "UnknownTask"
    assert place["position"] == 0 and place["queue"] == "default"

    code, found = inspect_json(redis_url, ns, "never-was")
    assert code == 1 and found == {"id": "never-was", "found": False, "places": []}

    # and the text form says it in words, with the JSON below
    code, text = run("inspect", "mid", "--redis-url", redis_url, "--namespace", ns)
    assert code == 0
    assert "queued in 'long': 1201 jobs ahead of it, 2501 waiting in all" in text
    assert json.loads(text.split("\n", 1)[1]) == {"task": "t.add", "id": "mid"}
    _, text = run("inspect", "run", "--redis-url", redis_url, "--namespace", ns)
    assert f"on supervisor 'w1' on host {socket.gethostname()} (pid {d.pid})" in text
    _, text = run("inspect", "ko", "--redis-url", redis_url, "--namespace", ns)
    assert "failed: its result envelope is at" in text and "ValueError: no luck" in text
    _, text = run("inspect", "dd", "--redis-url", redis_url, "--namespace", ns)
    assert "dead-lettered from queue 'default'" in text and "UnknownTask" in text

    # and the command itself exits 1 for an unknown job, saying why that may be
    res = redpool("inspect", "never-was", "--redis-url", redis_url, "--namespace", ns)
    assert res.returncode == 1 and res.stdout == ""
    assert "no job 'never-was'" in res.stderr and "result_ttl" in res.stderr


def test_inspect_matches_ids_by_parsing_not_by_substring(r, keys, redis_url, namespace):
    # Given a job whose id is written with JSON escapes, and one that only mentions the id
    r.lpush(keys.queue("q"), b'{"task":"t.add","id":"\\u0061bc"}')
    r.lpush(keys.queue("q"), json.dumps({"task": "t.add", "id": "other", "args": ["abc"]}))
    # Then only the first is that job
    code, found = inspect_json(redis_url, namespace, "abc")
    assert code == 0
    assert [(p["state"], p["body"]["id"], p["ahead"]) for p in found["places"]] == \
        [("queued", "abc", 0)]


def test_inspect_finds_a_job_held_by_a_dead_supervisor(r, keys, redis_url, namespace):
    # Given a supervisor that died holding a job (its lease and info are gone, its name is
    # still registered: no reaper has run)
    r.sadd(keys.supervisors, "gone-1")
    r.lpush(keys.processing("gone-1", "emails:high"), json.dumps({"task": "t.add", "id": "held"}))
    code, found = inspect_json(redis_url, namespace, "held")
    (place,) = found["places"]
    assert code == 0 and place["state"] == "running"
    assert (place["supervisor"], place["queue"], place["supervisor_alive"]) == \
        ("gone-1", "emails:high", False)
    _, text = run("inspect", "held", "--redis-url", redis_url, "--namespace", namespace)
    assert "lease has expired" in text and "when a live supervisor reaps it" in text
