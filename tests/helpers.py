"""Run the real daemon as a subprocess, and wait on conditions with deadlines."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


def wait_for(cond, timeout: float = 20.0, interval: float = 0.02, what: str = "condition"):
    """Return cond()'s first truthy value, or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


class Daemon:
    """``python -m redpool worker`` in its own session; always killed in teardown."""

    def __init__(self, redis_url: str, namespace: str, *args: str, name: str = "w1",
                 modules: tuple[str, ...] = ("tests.taskmods.jobs",), ledger: str | None = None,
                 env: dict | None = None) -> None:
        self.cmd = [sys.executable, "-m", "redpool", "worker", *modules,
                    "--redis-url", redis_url, "--namespace", namespace, "--name", name,
                    "--log-format", "json", *args]
        self.env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.env.pop("REDPOOL_REDIS_URL", None)
        if ledger:
            self.env.update(REDPOOL_LEDGER_URL=redis_url, REDPOOL_LEDGER=ledger)
        self.env.update(env or {})
        self.proc: subprocess.Popen | None = None
        self.log_path = None

    def start(self, tmp_path: Path | None = None) -> "Daemon":
        import tempfile
        fd, path = tempfile.mkstemp(prefix="redpool-daemon-", suffix=".log",
                                    dir=tmp_path)
        self.log_path = path
        self.proc = subprocess.Popen(self.cmd, cwd=ROOT, env=self.env, stdout=fd, stderr=fd,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        os.close(fd)
        return self

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return Path(self.log_path).read_text(errors="replace") if self.log_path else ""

    def events(self) -> list[dict]:
        out = []
        for line in self.log().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
        return out

    def wait_started(self, timeout: float = 60.0) -> "Daemon":
        wait_for(lambda: any(e.get("event") == "started" for e in self.events())
                 or self.proc.poll() is not None, timeout, what="daemon start")
        assert self.proc.poll() is None, f"daemon exited {self.proc.returncode}:\n{self.log()}"
        return self

    def children(self) -> list[int]:
        """Pids of the pool processes (direct children of the supervisor)."""
        out = subprocess.run(["ps", "-ww", "-o", "pid=,args=", "--ppid", str(self.pid)],
                             capture_output=True, text=True).stdout
        # every direct child but multiprocessing's resource tracker (titles may be set:
        # do not rely on the command line saying spawn_main)
        return [int(line.split()[0]) for line in out.splitlines()
                if line.strip() and "resource_tracker" not in line]

    def signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def wait(self, timeout: float = 60.0) -> int:
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc is not None:
            kill_group(self.proc)


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL a process started in its own session, and everything in its group."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        pass


def lpush_jobs(r, keys, jobs: list[dict], queue: str = "default") -> None:
    """Enqueue raw JSON exactly as a producer in another language would."""
    for job in jobs:
        r.lpush(keys.queue(queue), json.dumps(job))


def envelope(r, keys, job_id: str):
    raw = r.get(keys.result(job_id))
    return json.loads(raw) if raw else None
