"""The commands a person types: demo and worker (dev: test_dev.py; enqueue: test_enqueue.py)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from helpers import ROOT

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
    # its server keeps what it acknowledges (AOF), so the worker has nothing to warn about
    assert '"level": "warning"' not in res.stderr and "warning" not in res.stderr.lower()


def test_the_demos_private_server_keeps_its_data_on_disk():
    import redis

    from redpool.cli import private_server

    with private_server(None, announce=False) as url, redis.Redis.from_url(url) as r:
        assert r.info("persistence")["aof_enabled"] == 1


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
