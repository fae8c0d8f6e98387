"""The repository's Procfile, run by a real Procfile runner (honcho) as a platform
would: configured by REDPOOL_* variables only, fed by redpool.Client, stopped by
SIGTERM to the runner."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from helpers import ROOT, wait_for
from redpool import Client

pytestmark = pytest.mark.daemon

PROCFILE = ROOT / "Procfile"
BIN = Path(sys.executable).parent


def honcho_command() -> list[str]:
    exe = BIN / "honcho"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "honcho"]


def alive(pid: int) -> bool:
    """Running (a zombie, or a pid reused by another program, does not count)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of a process group."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] != "Z" and int(fields[2]) == pgid:
                out.append(int(d.name))
    return out


class Honcho:
    """`honcho start` on the repo's Procfile, in its own session, output to a file."""

    def __init__(self, env: dict, log: Path) -> None:
        self.log_path = log
        self.env = env
        self.proc: subprocess.Popen | None = None

    def start(self, empty_env_file: Path) -> "Honcho":
        with open(self.log_path, "wb") as out:
            # -e: an empty environment file, so a developer's .env cannot leak in
            self.proc = subprocess.Popen(
                [*honcho_command(), "start", "-f", str(PROCFILE), "-d", str(ROOT),
                 "-e", str(empty_env_file), "--no-colour"],
                cwd=ROOT, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True)
        return self

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def worker_pid(self) -> int | None:
        m = re.search(r"worker\.1 started \(pid=(\d+)\)", self.output())
        return int(m.group(1)) if m else None

    def events(self) -> list[dict]:
        """The worker's JSON log lines (honcho prefixes each with time and name)."""
        out = []
        for line in self.output().splitlines():
            _, sep, rest = line.partition(" worker.1 | ")
            if sep:
                try:
                    out.append(json.loads(rest))
                except ValueError:
                    pass
        return out

    def event(self, name: str) -> dict | None:
        return next((e for e in self.events() if e.get("event") == name), None)

    def kill(self) -> None:
        """Teardown: whatever the test did, nothing it started survives."""
        for pgid in (self.worker_pid(), self.proc.pid if self.proc else None):
            if pgid:
                try:
                    os.killpg(pgid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
        if self.proc is not None:
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                pass


@pytest.fixture
def procfile_env(redis_url, namespace):
    """The environment a platform would give the Procfile's processes."""
    tag = uuid.uuid4().hex[:8]
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("REDPOOL_") and k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC")}
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", PYTHONUNBUFFERED="1",
               REDPOOL_REDIS_URL=redis_url, REDPOOL_NAMESPACE=namespace,
               REDPOOL_QUEUE=f"procfile-{tag}", REDPOOL_NAME=f"procfile-{tag}",
               REDPOOL_CONCURRENCY="2", REDPOOL_GRACE="10")
    return env


@pytest.fixture
def honcho(procfile_env, tmp_path):
    started: list[Honcho] = []

    def start() -> Honcho:
        empty = tmp_path / "empty.env"
        empty.write_text("")
        h = Honcho(procfile_env, tmp_path / f"honcho-{len(started)}.log").start(empty)
        started.append(h)
        wait_for(lambda: h.event("started") or h.proc.poll() is not None, 60,
                 what="the Procfile's worker to start")
        assert h.proc.poll() is None, h.output()
        return h

    yield start
    for h in started:
        h.kill()


def test_the_procfile_has_a_worker_running_the_example_tasks():
    procs = dict(line.split(":", 1) for line in PROCFILE.read_text().splitlines()
                 if line.strip() and not line.startswith("#"))
    assert procs["worker"].split() == ["redpool", "worker", "examples.tasks"]


def test_the_procfile_worker_answers_and_stops_cleanly_on_sigterm(honcho, procfile_env,
                                                                 redis_url, namespace, r):
    # Given the Procfile running under honcho, configured by the environment alone
    h = honcho()
    queue, name = procfile_env["REDPOOL_QUEUE"], procfile_env["REDPOOL_NAME"]
    started = h.event("started")
    assert started["name"] == name and started["queues"] == [queue]
    assert started["concurrency"] == 2
    # (honcho runs the line with `sh -c`: the shell is the process it knows of, the
    # supervisor its child, unless the shell execs it)
    shell, sup = h.worker_pid(), started["pid"]
    children = wait_for(lambda: [int(p) for p in subprocess.run(
        ["pgrep", "-P", str(sup)], capture_output=True, text=True).stdout.split()], 10,
        what="the pool processes")
    # When a producer enqueues jobs with redpool.Client
    with Client(redis_url, namespace=namespace) as client:
        squares = [client.enqueue("examples.tasks.square", i, queue=queue) for i in range(10)]
        who = client.enqueue("examples.whoami", queue=queue)
        # Then they are answered by this worker
        assert [res.get(timeout=30) for res in squares] == [i * i for i in range(10)]
        assert who.get(timeout=30)["worker"] == name
        assert who.get(timeout=30)["pid"] in children

    # When the platform stops it: SIGTERM to the runner, which passes it on
    h.proc.send_signal(signal.SIGTERM)
    rc = h.proc.wait(30)
    out = h.output()
    # Then honcho reports the signal (143 = 128 + SIGTERM), once the worker is done:
    # it drained, and its last word is that it stopped, every job counted
    assert rc == 143, out
    draining = h.event("draining")
    assert draining is not None and draining["signal"] == "SIGTERM", out
    assert h.events()[-1]["event"] == "stopped", out
    assert h.events()[-1]["succeeded"] == 11 and h.events()[-1]["failed"] == 0, out
    # (the status honcho prints is the shell's: dash, killed by the same SIGTERM, says
    # -15; a shell that execs the command would pass on the supervisor's 0)
    assert re.search(r"worker\.1 stopped \(rc=(0|-15)\)", out), out
    # And nothing is left: no supervisor, no pool process, nothing in its group
    # (they are exiting as honcho sees its output end: allow them a moment to finish)
    wait_for(lambda: not any(alive(p) for p in (shell, sup, *children)), 10,
             what="the worker's processes to be gone")
    wait_for(lambda: group_members(shell) == [], 10, what="an empty process group")
    # nor anything held in Redis under its name
    assert r.llen(f"{namespace}:processing:{name}:{queue}") == 0
    assert r.llen(f"{namespace}:queue:{queue}") == 0


def test_a_job_running_at_sigterm_finishes_within_the_grace(honcho, procfile_env, redis_url,
                                                            namespace, r):
    # Given a job that runs for 1.5 s (well within the grace)
    procfile_env["REDPOOL_LOG_LEVEL"] = "debug"   # for job_started
    h = honcho()
    queue = procfile_env["REDPOOL_QUEUE"]
    with Client(redis_url, namespace=namespace) as client:
        res = client.enqueue("examples.tasks.sleep", 1.5, queue=queue)
        # (running, not only taken: a job the waiter took but the loop had not yet
        # handed out goes back to its queue at SIGTERM, rightly)
        wait_for(lambda: h.event("job_started"), 20, what="the job to start")
        # When the platform stops the worker while the job runs
        h.proc.send_signal(signal.SIGTERM)
        assert h.proc.wait(30) == 143
        # Then the job finished, and no pool process died on the way
        assert res.get(timeout=5) == 1.5
    assert h.event("child_died") is None and h.event("job_crashed") is None, h.output()
