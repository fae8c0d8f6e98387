"""Fixtures of the hostile suite: real daemons that load tests/taskmods/hostile_tasks.py.

``worker``: one long-lived daemon per test module (2 pool processes, the module's
``WORKER_ARGS``), in a namespace of the module's own; a case that fails gets the next
one a fresh daemon in a fresh namespace (Worker).  ``hostile_daemons``: more
daemons for one test, in the test's own namespace (tests/conftest.py's ``daemons``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import uuid
from pathlib import Path

import pytest
import redis

from helpers import Daemon
from redpool.protocol import Keys

from hostile.invariants import Checker, vm_kib

MODULES = ("tests.taskmods.hostile_tasks",)
CONCURRENCY = 2


def started(d: Daemon) -> Daemon:
    d.wait_started()
    d.baseline_kib = vm_kib(d.pid)["VmHWM"]   # its peak so far: start-up's
    return d


def release_forks(where: Path) -> None:
    """Let go of what the fork tasks left behind (see tests/taskmods/hostile_tasks.py)."""
    for pidfile in where.glob("*.pid"):
        pidfile.with_suffix(".release").touch()
        try:
            os.kill(int(pidfile.read_text() or 0), signal.SIGKILL)
        except (ValueError, ProcessLookupError, PermissionError):
            pass


class Worker:
    """The module's daemon.  A case that fails taints it (it may have left a job behind,
    or a pool in a state the next case would trip over): the next case gets a fresh
    daemon in a fresh namespace, so that one failure is reported once."""

    def __init__(self, redis_url: str, args: tuple[str, ...], where: Path) -> None:
        self.redis_url, self.args, self.where = redis_url, args, where
        self.keys = Keys(f"t{uuid.uuid4().hex[:10]}")
        self.d: Daemon | None = None
        self.r = redis.Redis.from_url(redis_url)

    def ensure(self) -> Daemon:
        if self.d is None or self.d.proc.poll() is not None:
            if self.d is not None:
                self.taint()
            self.d = started(Daemon(self.redis_url, self.keys.ns, "--concurrency",
                                    str(CONCURRENCY), *self.args, name="hostile",
                                    modules=MODULES, env={"HOSTILE_DIR": str(self.where)})
                             .start(self.where))
        return self.d

    @contextlib.contextmanager
    def checker(self):
        """A Checker of the module's daemon; the daemon is tainted if the block fails."""
        try:
            d = self.ensure()   # (first: it may start a daemon in a new namespace)
            yield Checker(self.r, self.keys, [d], concurrency=CONCURRENCY)
        except BaseException:
            self.taint()
            raise

    def run(self, cases_of, *, crashes: bool = False):
        """``cases_of(checker)``: the cases to push; checks every invariant after them."""
        with self.checker() as chk:
            cases = cases_of(chk)
            chk.run(cases, crashes=crashes)
            chk.forget(cases)
            return cases

    def taint(self) -> None:
        self.stop()
        self.keys = Keys(f"t{uuid.uuid4().hex[:10]}")

    def stop(self) -> None:
        if self.d is not None:
            self.d.kill()
            self.d = None
        release_forks(self.where)
        keys = list(self.r.scan_iter(match=f"{self.keys.ns}:*", count=1000))
        if keys:
            self.r.delete(*keys)

    def close(self) -> None:
        self.stop()
        self.r.close()


@pytest.fixture(scope="module")
def worker(redis_url, request, tmp_path_factory):
    w = Worker(redis_url, tuple(getattr(request.module, "WORKER_ARGS", ())),
               tmp_path_factory.mktemp("hostile"))
    w.ensure()
    yield w
    w.close()


@pytest.fixture
def hostile_daemons(daemons, tmp_path):
    """``hostile_daemons(*flags, name=...)``: started daemons of the hostile tasks."""
    def start(*args: str, **kw) -> Daemon:
        env = {"HOSTILE_DIR": str(tmp_path), **kw.pop("env", {})}
        return started(daemons(*args, modules=MODULES, env=env, **kw))

    yield start
    release_forks(tmp_path)
