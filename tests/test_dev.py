"""`redpool dev`: its private server keeps its port and its data between runs, and
--reload restarts the pool when task files change (real dev processes, real servers)."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import redis

from helpers import ROOT, wait_for
from redpool.server import EmbeddedServer, free_port

pytestmark = pytest.mark.daemon

JOBS = "tests.taskmods.jobs"


def dev_env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("REDPOOL_")}
    # the project is a temporary directory; the test tasks live in the repository
    env.update(PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    return env


class Dev:
    """`redpool dev ARGS` run in ``project``; killed (its whole group) at teardown."""

    def __init__(self, project: Path, *args: str, env: dict | None = None) -> None:
        self.project, self.args, self.env = project, args, {**dev_env(), **(env or {})}
        self.log_path = project / f"dev-{len(list(project.glob('dev-*.log')))}.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Dev":
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "redpool", "dev", *self.args, "--concurrency", "1",
                 "--log-format", "json"], cwd=self.project, env=self.env, stdout=log,
                stderr=log, stdin=subprocess.DEVNULL, start_new_session=True)
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def events(self, name: str) -> list[dict]:
        out = []
        for line in self.log().splitlines():
            try:
                e = json.loads(line)
            except ValueError:
                continue
            if e.get("event") == name:
                out.append(e)
        return out

    def url(self) -> str:
        def printed():
            assert self.proc.poll() is None, self.log()
            m = re.search(r"REDPOOL_REDIS_URL=(redis://\S+)", self.log())
            return m and m.group(1)
        return wait_for(printed, timeout=60, what="the printed URL")

    def wait_started(self) -> "Dev":
        wait_for(lambda: self.events("started") or self.proc.poll() is not None, timeout=90,
                 what="the dev worker's start")
        assert self.proc.poll() is None, self.log()
        return self

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(60)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


@pytest.fixture
def project(tmp_path):
    started: list[Dev] = []
    proj = tmp_path / "proj"
    proj.mkdir()

    def dev(*args: str, env: dict | None = None) -> Dev:
        d = Dev(proj, *args, env=env)
        started.append(d)
        return d.start()

    yield SimpleNamespace(path=proj, dev=dev)
    for d in started:
        d.kill()


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1].split("/")[0])


def closed(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return False
    except OSError:
        return True


def add_job(job_id: str, a: int = 2, b: int = 3) -> bytes:
    return json.dumps({"task": "t.add", "id": job_id, "args": [a, b]}).encode()


def test_the_url_and_the_data_outlive_a_run_and_fresh_starts_empty(project):
    # Given a first run, and a job pushed to a queue it does not serve
    first = project.dev(JOBS).wait_started()
    url = first.url()
    with redis.Redis.from_url(url) as r:
        r.lpush("redpool:queue:parked", add_job("kept-1"))
    # a second `redpool dev` in the same project is refused, saying why
    twin = subprocess.run([sys.executable, "-m", "redpool", "dev", JOBS], cwd=project.path,
                          env=dev_env(), capture_output=True, text=True, timeout=60)
    assert twin.returncode == 2 and "another `redpool dev` is running" in twin.stderr
    assert first.stop() == 0
    assert wait_for(lambda: closed(port_of(url)), what="the dev server to stop")
    assert "*" in (project.path / ".redpool" / ".gitignore").read_text()

    # When the next run starts (in a terminal where the URL was exported: it still
    # means this project's server): the same URL, and the job is still there to be run
    second = project.dev(JOBS, "--queue", "parked", env={"REDPOOL_REDIS_URL": url})
    second.wait_started()
    assert second.url() == url
    assert "with the last run's data" in second.log()
    with redis.Redis.from_url(url) as r:
        env = wait_for(lambda: r.get("redpool:result:kept-1"), timeout=60, what="kept-1's result")
        assert json.loads(env)["result"] == 5
    assert second.stop() == 0

    # --fresh: the same URL, nothing of before
    third = project.dev(JOBS, "--fresh").wait_started()
    assert third.url() == url
    assert "its data is kept in .redpool/dev between runs" in third.log()
    with redis.Redis.from_url(url) as r:
        assert r.exists("redpool:result:kept-1", "redpool:queue:parked") == 0
    assert third.stop() == 0


def test_a_port_taken_by_another_program_is_said_clearly(project):
    state = project.path / ".redpool" / "dev"
    state.mkdir(parents=True)
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        (state / "state.json").write_text(json.dumps({"port": port}))
        res = subprocess.run([sys.executable, "-m", "redpool", "dev", JOBS], cwd=project.path,
                             env=dev_env(), capture_output=True, text=True, timeout=60)
    assert res.returncode == 2
    assert f"port {port}, where this project's dev server listens, is taken by another " \
           "program" in res.stderr
    assert "--port PORT" in res.stderr


def test_a_server_of_ours_left_running_is_stopped_and_its_data_kept(project):
    # A `redpool dev` killed where the kernel does not take its server along (macOS)
    # leaves the server running on the project's port, with the project's data.
    data = project.path / ".redpool" / "dev" / "data"
    data.mkdir(parents=True)
    port = free_port()
    (data.parent / "state.json").write_text(json.dumps({"port": port}))
    orphan = EmbeddedServer(port=port, appendonly=True, dir=str(data)).start()
    try:
        with redis.Redis(port=port) as r:
            r.lpush("redpool:queue:parked", add_job("orphaned", 4, 5))
        dev = project.dev(JOBS, "--queue", "parked").wait_started()
        assert port_of(dev.url()) == port
        assert orphan.proc.wait(30) is not None                # stopped by the new run
        with redis.Redis(port=port) as r:
            env = wait_for(lambda: r.get("redpool:result:orphaned"), timeout=60, what="result")
            assert json.loads(env)["result"] == 9
        assert dev.stop() == 0
    finally:
        orphan.stop()


TASK = '''from redpool import task


@task(name="d.version")
def version():
    return {version}
'''


def test_reload_restarts_the_pool_when_a_task_file_changes(project):
    # Given task code that does not even import yet: --reload waits for a fix
    tasks = project.path / "devtasks.py"
    tasks.write_text("from redpool import task\n\ndef broken(:\n")
    dev = project.dev("devtasks", "--reload")
    wait_for(lambda: dev.events("boot_failed"), timeout=90, what="boot_failed")
    assert dev.proc.poll() is None
    tasks.write_text(TASK.format(version=1))
    dev.wait_started()

    with redis.Redis.from_url(dev.url(), socket_timeout=300) as r:  # (BRPOP waits 60 s)
        def run_version(job_id: str):
            r.lpush("redpool:queue:default", json.dumps(
                {"task": "d.version", "id": job_id, "reply_to": f"redpool:reply:{job_id}"}))
            _, env = r.brpop([f"redpool:reply:{job_id}"], timeout=60)
            return json.loads(env)["result"]

        assert run_version("v1") == 1
        # When the file changes (the same size, within the same second: no stale .pyc)
        tasks.write_text(TASK.format(version=2))
        # Then the new code answers (old processes may finish a job first: ask again)
        tries = iter(range(1000))
        wait_for(lambda: run_version(f"v2-{next(tries)}") == 2, timeout=90,
                 what="the new code to answer")
        # and one line said which file changed
        changed = [e for e in dev.events("files_changed") if e.get("action") != "starting again"]
        assert changed and changed[-1]["files"] == ["devtasks.py"]
        assert dev.events("reloaded")
    assert dev.stop() == 0


def test_a_change_saved_before_anyone_waits_for_it_is_not_missed(tmp_path):
    # A fix saved while the broken version was still failing to boot (before `dev`
    # began to wait for a change) must start the next run: one watcher spans the
    # session and keeps what changed since the run began
    import threading

    from redpool.dev import Watcher

    class Log:
        def info(self, *a, **kw):
            pass

    (tmp_path / "devtasks.py").write_text("x = 1\n")
    with Watcher([str(tmp_path)], Log()) as watcher:
        watcher.forget()                              # a run begins
        (tmp_path / "devtasks.py").write_text("x = 2\n")   # saved during that run
        got = []
        waiting = threading.Thread(target=lambda: got.append(watcher.wait()), daemon=True)
        waiting.start()                               # only now does anyone wait
        waiting.join(30)
        assert len(got) == 1 and any(f.endswith("devtasks.py") for f in got[0]), got
