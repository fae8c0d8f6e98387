"""The commands a person types: demo, dev, enqueue (real processes, real servers)."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys

import pytest

from helpers import ROOT, Daemon, wait_for

pytestmark = pytest.mark.daemon


def redpool(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    e = dict(os.environ)
    e.pop("REDPOOL_REDIS_URL", None)
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "redpool", *args], cwd=ROOT, env=e,
                          capture_output=True, text=True, timeout=timeout)


def test_version_and_help():
    assert redpool("--version").stdout.startswith("redpool ")
    out = redpool("worker", "--help").stdout
    for flag in ["--redis-url", "--queue", "--concurrency", "--namespace", "--grace", "--burst",
                 "--name", "REDPOOL_CONCURRENCY"]:
        assert flag in out


def test_demo_runs_on_its_own_private_server_and_exits_0():
    res = redpool("demo", "--jobs", "6")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "started a private server at redis://127.0.0.1:" in res.stderr
    assert len(re.findall(r"job +\d+ slept", res.stdout)) == 6
    assert "faster than one process" in res.stdout
    assert "map: squares of 0..9 -> [0, 1, 4, 9, 16, 25, 36, 49, 64, 81]" in res.stdout


def test_dev_starts_a_private_server_prints_its_url_and_stops_it(tmp_path):
    import redis

    log = open(tmp_path / "dev.log", "w+")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("REDPOOL_REDIS_URL", None)
    proc = subprocess.Popen([sys.executable, "-m", "redpool", "dev", "tests.taskmods.jobs",
                             "--concurrency", "1", "--log-format", "json"], cwd=ROOT, env=env,
                            stdout=log, stderr=log, start_new_session=True)
    try:
        url = wait_for(lambda: (m := re.search(r"REDPOOL_REDIS_URL=(redis://\S+)",
                                               (tmp_path / "dev.log").read_text())) and m.group(1),
                       timeout=30, what="the printed URL")
        r = redis.Redis.from_url(url)
        wait_for(lambda: r.scard("redpool:supervisors"), timeout=60, what="worker start")
        r.lpush("redpool:queue:default", json.dumps({"task": "t.add", "id": "d1", "args": [2, 3],
                                                     "reply_to": "dev-r"}))
        item = r.brpop("dev-r", timeout=20)
        assert item and json.loads(item[1])["result"] == 5
        r.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        with pytest.raises(OSError):  # the private server is gone with it
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_enqueue_prints_the_id_and_wait_prints_the_envelope(redis_url, namespace, r, tmp_path):
    d = Daemon(redis_url, namespace, "--concurrency", "1").start(tmp_path).wait_started()
    try:
        common = ["--redis-url", redis_url, "--namespace", namespace]
        res = redpool("enqueue", "t.add", "2", "3", "--id", "cli-1", *common)
        assert res.returncode == 0 and res.stdout.strip() == "cli-1", res.stderr
        wait_for(lambda: r.get(f"{namespace}:result:cli-1"), what="result of cli-1")

        res = redpool("enqueue", "t.add", '"a"', "b", "--wait", "--timeout", "30", *common)
        assert res.returncode == 0, res.stderr
        assert json.loads(res.stdout)["result"] == "ab"  # "b" is not JSON: taken as a string

        res = redpool("enqueue", "t.boom", "--kwargs", '{"msg": "nope"}', "--wait", *common)
        assert res.returncode == 1
        env = json.loads(res.stdout)
        assert env["status"] == "failed" and env["error"]["type"] == "ValueError"
        assert env["error"]["message"] == "nope" and "Traceback" in env["error"]["traceback"]
    finally:
        d.kill()


def test_worker_without_modules_or_with_a_bad_url_says_what_to_do(redis_url):
    res = redpool("worker", "--redis-url", redis_url)
    assert res.returncode == 2 and "name the modules" in res.stderr
    res = redpool("worker", "tests.taskmods.jobs", "--redis-url",
                  "redis://user:s3cret@127.0.0.1:1/0")
    assert res.returncode == 4 and "cannot reach Redis" in res.stderr
    assert "s3cret" not in res.stderr + res.stdout
    res = redpool("worker", "tests.taskmods.jobs", "--concurrency", "0")
    assert res.returncode == 2 and "--concurrency" in res.stderr


def test_worker_with_password_and_unix_socket_urls_never_logs_the_password(tmp_path):
    import redis

    from redpool.server import EmbeddedServer

    sock = str(tmp_path / "redis.sock")
    with EmbeddedServer(extra_args=["--requirepass", "s3cret-pw", "--unixsocket", sock,
                                    "--unixsocketperm", "700"]) as srv:
        for url in [f"redis://:s3cret-pw@127.0.0.1:{srv.port}/0",
                    f"redis://default:s3cret-pw@127.0.0.1:{srv.port}/0",
                    f"unix://{sock}?db=0&password=s3cret-pw"]:
            r = redis.Redis.from_url(url)
            r.lpush("redpool:queue:default", json.dumps({"task": "t.add", "id": "pw", "args": [1, 2]}))
            res = redpool("worker", "tests.taskmods.jobs", "--redis-url", url, "--burst",
                          "--concurrency", "1", "--log-format", "json")
            assert res.returncode == 0, res.stderr
            assert json.loads(r.get("redpool:result:pw"))["result"] == 3
            assert "s3cret-pw" not in res.stderr + res.stdout
            starting = [json.loads(x) for x in res.stderr.splitlines() if '"starting"' in x][0]
            assert "***" in starting["redis"] or starting["redis"].startswith("unix://")
            r.close()
        # and a wrong password is refused with exit code 4, still without echoing it
        res = redpool("worker", "tests.taskmods.jobs", "--burst",
                      "--redis-url", f"redis://:wrong-pw@127.0.0.1:{srv.port}/0")
        assert res.returncode == 4 and "wrong-pw" not in res.stderr
