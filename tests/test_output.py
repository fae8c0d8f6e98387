"""What redpool prints, and how: the console and JSON renderers (golden lines), stdlib
logging through the same renderer, one message per fatal error, no traceback when the
reader of a pipe goes away, a missing task module in one line, and the draining hint."""

from __future__ import annotations

import calendar
import io
import json
import logging
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
import warnings

import pytest
import structlog

from helpers import ROOT, lpush_jobs, wait_for
from redpool import cli, logs
from redpool.console import ConsoleRenderer, duration
from redpool.errors import EXIT_BOOT, EXIT_BROKEN_PIPE, EXIT_NAME_IN_USE, EXIT_REDIS, EXIT_USAGE

# 2026-12-07 12:04:05.123 UTC: the time of every golden line (rendered with TZ=UTC)
T = calendar.timegm((2026, 12, 7, 12, 4, 5)) + 0.123
NOWHERE = "redis://127.0.0.1:1/0"   # nothing listens on port 1


@pytest.fixture
def utc(monkeypatch):
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


@pytest.fixture
def restore_logging():
    """Tests here reconfigure structlog and the root logger: put them back after."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    config = structlog.get_config()
    yield
    structlog.configure(**config)
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.captureWarnings(False)
    os.environ.pop(logs.CHILD_ENV, None)


def console(event_dict: dict, clock: bool = True) -> str:
    return ConsoleRenderer(clock=clock, colors=False)(None, "info", dict(event_dict))


JOB = {"event": "job_finished", "level": "info", "timestamp": T, "queue": "default",
       "id": "job-1", "task": "myapp.tasks.resize", "status": "succeeded", "error_type": None,
       "result_id": "job-1", "ttl": 86400, "reply_to": None, "attempt": 1,
       "duration": 0.0123, "dead": False}


# -- the console renderer: golden lines ----------------------------------------------------------

def test_console_job_lines_drop_the_noise_and_say_the_error(utc):
    assert console(JOB) == ("12:04:05.123 info    job_finished   task=myapp.tasks.resize "
                            "id=job-1 queue=default status=succeeded duration=12ms")
    failed = {**JOB, "level": "warning", "id": "job-2", "result_id": "job-2", "status": "failed",
              "error_type": "ValueError", "error": "width must be positive", "attempt": 3,
              "duration": 1.5, "ttl": 3600, "reply_to": "myapp:replies", "dead": True}
    assert console(failed) == (
        '12:04:05.123 warning job_finished   task=myapp.tasks.resize id=job-2 queue=default '
        'status=failed duration=1.50s attempt=3 error="ValueError: width must be positive" '
        'ttl=3600 reply_to=myapp:replies dead=true')
    retrying = {**JOB, "status": "retrying", "error_type": "TimeoutError", "attempt": 2,
                "error": "the job ran past its timeout of 5 s", "retry_delay": 2.5,
                "duration": 5.2}
    assert console(retrying) == (
        '12:04:05.123 info    job_finished   task=myapp.tasks.resize id=job-1 queue=default '
        'status=retrying duration=5.20s attempt=2 '
        'error="TimeoutError: the job ran past its timeout of 5 s" retry_delay=2.50s')
    # an error type alone (no message) still says what failed
    assert console({**JOB, "status": "failed", "error_type": "UnknownTask"}).endswith(
        "duration=12ms error=UnknownTask")


def test_console_start_and_times_read_as_local_clock_times(utc):
    started = {"event": "started", "level": "info", "timestamp": T, "name": "w1", "host": "web-1",
               "pid": 4242, "version": "0.1.0", "queues": ["high", "default"], "concurrency": 2,
               "started_at": T, "inflight": 0, "succeeded": 0, "failed": 0, "retried": 0,
               "dead": 0, "state": "running", "heartbeat_at": T, "lease": 15.0, "rate_1m": 0.0}
    assert console(started) == ("12:04:05.123 info    started        name=w1 host=web-1 "
                                "pid=4242 queues=high,default concurrency=2 lease=15s")
    # any float time field: a clock time on the line's day, with its date otherwise
    line = console({"event": "job_started", "level": "debug", "timestamp": T, "id": "j",
                    "enqueued_at": T - 3600.5, "started_at": T, "scheduled_at": T - 86400 * 2})
    assert line == ("12:04:05.123 debug   job_started    id=j enqueued_at=11:04:04.623 "
                    "started_at=12:04:05.123 scheduled_at=2026-12-05T12:04:05.123")


def test_console_draining_is_one_sentence(utc, restore_logging):
    out = io.StringIO()
    logs.configure("info", "console", stream=out, daemon=True)
    on_event = logs.event_logger()
    structlog.contextvars.bind_contextvars(timestamp=T)
    try:
        on_event("draining", {"signal": "SIGINT", "running": 3, "grace": 30.0})
        on_event("draining", {"signal": "SIGTERM", "running": 1, "grace": 8})
    finally:
        structlog.contextvars.clear_contextvars()
    assert out.getvalue().splitlines() == [
        "12:04:05.123 info    draining: 3 jobs running get up to 30 s to finish; press Ctrl-C "
        "again to stop now (unfinished jobs go back to their queues)",
        "12:04:05.123 info    draining: 1 job running gets up to 8 s to finish; send SIGTERM "
        "again to stop now (unfinished jobs go back to their queues)"]


def test_console_fatal_is_one_line_for_a_worker_and_a_command(utc):
    fatal = {"event": "fatal", "level": "error", "timestamp": T, "exit_code": 4,
             "error": "cannot reach Redis at redis://localhost:6379/0: Connection refused"}
    assert console(fatal) == ("12:04:05.123 error   fatal: cannot reach Redis at "
                              "redis://localhost:6379/0: Connection refused")
    assert console(fatal, clock=False) == ("redpool: cannot reach Redis at "
                                           "redis://localhost:6379/0: Connection refused")
    warned = {"event": "result_unreadable", "level": "warning", "timestamp": T, "key": "k"}
    assert console(warned, clock=False) == "redpool: warning: result_unreadable key=k"


def test_console_tracebacks_go_on_their_own_lines(utc):
    # a fatal error that carries a traceback (a task module that raised on import)
    error = ("task module 'app.tasks' raised while being imported in a pool process "
             "(working directory /srv):\nTraceback (most recent call last):\n"
             '  File "/srv/app/tasks.py", line 3, in <module>\n    import numpy\n'
             "ModuleNotFoundError: No module named 'numpy'")
    assert console({"event": "fatal", "level": "error", "timestamp": T, "error": error,
                    "exit_code": 3}).splitlines() == [
        "12:04:05.123 error   fatal: task module 'app.tasks' raised while being imported in a "
        "pool process (working directory /srv):",
        "Traceback (most recent call last):",
        '  File "/srv/app/tasks.py", line 3, in <module>',
        "    import numpy",
        "ModuleNotFoundError: No module named 'numpy'"]
    # a field holding a traceback: its first line stays, the rest goes below
    line = console({"event": "child_boot_failed", "level": "error", "timestamp": T, "pid": 7,
                    "retry_in": 2.0, "message": error})
    assert line.splitlines()[0] == (
        "12:04:05.123 error   child_boot_failed pid=7 retry_in=2s message=\"task module "
        "'app.tasks' raised while being imported in a pool process (working directory /srv):\"")
    assert line.splitlines()[1:] == error.splitlines()[1:]
    # exc_info: structlog's exception formatter, on several lines
    try:
        raise RuntimeError("the hook broke")
    except RuntimeError as e:
        text = console({"event": "hook_failed", "level": "error", "timestamp": T,
                        "hook_event": "started", "exc_info": e})
    lines = text.splitlines()
    assert lines[0] == "12:04:05.123 error   hook_failed    hook_event=started"
    assert lines[1] == "Traceback (most recent call last):"
    assert lines[-1] == "RuntimeError: the hook broke" and len(lines) >= 4


def test_console_values_are_quoted_only_when_needed(utc):
    line = console({"event": "odd", "level": "info", "timestamp": T, "a": "plain", "b": "two words",
                    "c": 'say "hi"', "d": {"x": 1}, "e": [], "f": 0.1 + 0.2, "g": None,
                    "h": False, "i": True, "j": "tab\there"})
    assert line == ('12:04:05.123 info    odd            a=plain b="two words" c="say \\"hi\\"" '
                    'd={"x":1} e=[] f=0.3 i=true j="tab here"')


@pytest.mark.parametrize("seconds, shown", [
    (0, "0s"), (0.00031, "0.31ms"), (0.0123, "12ms"), (0.999, "999ms"), (1.5, "1.50s"), (12.34, "12.3s"),
    (30, "30s"), (15.0, "15s"), (245, "4m05s"), (3600, "1h00m"), (5400, "1h30m"),
    # at each unit's edge, the rounding moves to the next unit
    (0.0009996, "1ms"), (0.9996, "1.00s"), (9.996, "10.0s"), (59.96, "1m00s"), (3599.6, "1h00m")])
def test_durations(seconds, shown):
    assert duration(seconds) == shown


# -- JSON: every field, names unchanged --------------------------------------------------------

def test_json_lines_keep_every_field_of_a_job(restore_logging):
    out = io.StringIO()
    logs.configure("info", "json", stream=out, daemon=True)
    fields = {k: v for k, v in JOB.items() if k not in ("event", "level", "timestamp")}
    fields.update(status="failed", error_type="ValueError", error="width must be positive",
                  duration=0.01234567891, t=17)
    logs.event_logger()("job_finished", dict(fields))
    (line,) = out.getvalue().splitlines()
    got = json.loads(line)
    want = {**fields, "duration": 0.012346, "event": "job_finished", "level": "warning"}
    want.pop("t")  # the pool's internal token is not the job's
    assert {k: v for k, v in got.items() if k != "timestamp"} == want
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+Z", got["timestamp"])
    # and the draining hint is a field there, next to the numbers it says in words
    out.truncate(0), out.seek(0)
    logs.event_logger()("draining", {"signal": "SIGTERM", "running": 2, "grace": 30})
    got = json.loads(out.getvalue())
    assert got["running"] == 2 and got["grace"] == 30 and got["signal"] == "SIGTERM"
    assert "send SIGTERM again to stop now" in got["message"]


# -- stdlib logging through the same renderer --------------------------------------------------

def test_a_stdlib_record_is_one_json_line(restore_logging):
    out = io.StringIO()
    logs.configure("info", "json", stream=out)
    logging.getLogger("some.library").error("could not %s: %s", "connect", "refused")
    try:
        1 / 0
    except ZeroDivisionError:
        logging.getLogger("some.library").exception("it broke")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        logging.captureWarnings(True)
        warnings.warn("old API", DeprecationWarning)
    logging.getLogger("some.library").info("below the level? no: info is on")
    logging.getLogger("some.library").debug("below the level")
    lines = [json.loads(x) for x in out.getvalue().splitlines()]   # each line one object
    assert [(x["event"], x["level"], x["logger"]) for x in lines[:2]] == [
        ("could not connect: refused", "error", "some.library"),
        ("it broke", "error", "some.library")]
    assert "ZeroDivisionError: division by zero" in lines[1]["exception"]
    assert lines[2]["logger"] == "py.warnings" and "old API" in lines[2]["event"]
    assert lines[3]["event"] == "below the level? no: info is on" and len(lines) == 4
    assert all("timestamp" in x for x in lines)


def test_a_stdlib_record_in_console_format(restore_logging):
    out = io.StringIO()
    logs.configure("info", "console", stream=out, daemon=True)
    logging.getLogger("some.library").warning("disk %s full", "/var")
    assert re.fullmatch(r"\d\d:\d\d:\d\d\.\d{3} warning disk /var full +logger=some\.library\n",
                        out.getvalue())


def _redis_record(logger, created: float, msg: str = "Topology refresh failed, keeping the "
                                                       "current one: refused"):
    record = logger.makeRecord(logger.name, logging.ERROR, "/redis/cluster.py", 3873, msg,
                               (), None)
    record.created = created
    logger.handle(record)


def test_redis_py_repeats_are_rate_limited_and_quiet_during_an_outage(restore_logging):
    out = io.StringIO()
    logs.configure("info", "json", stream=out, daemon=True)
    redis_log = logging.getLogger("redis.cluster")
    # Given redis-py logging the same failure once a second, for two minutes
    for i in range(120):
        _redis_record(redis_log, 1000.0 + i)
    lines = [json.loads(x) for x in out.getvalue().splitlines()]
    # Then one line a minute, the next saying how many were left out meanwhile
    assert [x.get("left_out") for x in lines] == [None, 59]
    assert all(x["level"] == "error" and x["logger"] == "redis.cluster" for x in lines)
    # When the daemon has reported the outage itself (redis_down), redis-py's own
    # messages are debug: not shown at info, until redis_up
    out.truncate(0), out.seek(0)
    on_event = logs.event_logger()
    on_event("redis_down", {"error": "refused", "during": "exchange"})
    _redis_record(redis_log, 5000.0, "another failure")
    assert [json.loads(x)["event"] for x in out.getvalue().splitlines()] == ["redis_down"]
    on_event("redis_up", {})
    _redis_record(redis_log, 5001.0, "after the outage")
    assert [json.loads(x)["event"] for x in out.getvalue().splitlines()] == [
        "redis_down", "redis_up", "after the outage"]
    # other libraries are not rate-limited: an application's lines are its own
    out.truncate(0), out.seek(0)
    for _ in range(3):
        logging.getLogger("myapp").warning("same line")
    assert len(out.getvalue().splitlines()) == 3


def test_redis_py_in_a_real_cluster_outage_says_it_once_as_json(restore_logging):
    """redis-py's own 'Topology refresh failed' (logged at ERROR on each refresh while no
    node answers) comes out as one JSON line, not as bare text every second."""
    import inspect

    import redis.cluster

    from redpool.connection import connect
    from redpool.server import EmbeddedCluster

    if "Topology refresh failed" not in inspect.getsource(redis.cluster):
        pytest.skip(f"redis-py {redis.__version__} does not log failed topology refreshes "
                    "(8.2 does); the rate limit itself is tested with made-up records above")
    out = io.StringIO()
    logs.configure("info", "json", stream=out)
    emitted: list[logging.LogRecord] = []   # what redis-py logs, shown or not

    class Count(logging.Handler):
        def emit(self, record):
            if "Topology refresh failed" in record.getMessage():
                emitted.append(record)

    counter = Count()
    logging.getLogger("redis").addHandler(counter)
    try:
        with EmbeddedCluster(3) as c:
            rc = connect(c.url.replace("redis://", "redis+cluster://"), socket_timeout=1,
                         socket_connect_timeout=0.5)
            rc.set("x", 1)
            for n in c.nodes:
                n.stop()

            def refreshes_failed(n: int) -> bool:
                try:
                    rc.get("x")
                except Exception:
                    pass
                return len(emitted) >= n

            # redis-py says it again and again (each refresh it retries)
            wait_for(lambda: refreshes_failed(3), timeout=60, interval=0.2,
                     what="three refresh failures logged by redis-py")
            rc.close()
    finally:
        logging.getLogger("redis").removeHandler(counter)
    lines = [json.loads(x) for x in out.getvalue().splitlines()]   # all JSON
    topology = [x for x in lines if "Topology refresh failed" in x["event"]]
    assert len(topology) == 1 and topology[0]["logger"].startswith("redis")


# -- subprocess helpers --------------------------------------------------------------------------

def _env(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env.pop("PYTHONUNBUFFERED", None)   # buffered, as a person's shell runs it
    env.pop("REDPOOL_REDIS_URL", None)
    env.pop(logs.CHILD_ENV, None)
    env.update(extra or {})
    return env


def run(*args: str, env: dict | None = None, cwd=ROOT, timeout: float = 120):
    return subprocess.run([sys.executable, "-m", "redpool", *args], cwd=cwd, env=_env(env),
                          capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def run_on_a_terminal(*args: str, env: dict | None = None, timeout: float = 120,
                      steps=()) -> tuple[int, str]:
    """Run with stdin, stdout and stderr on a pseudo-terminal; (exit code, what it showed).
    ``steps``: (until, then) pairs, in order: ``then(proc)`` runs once ``until(text)``
    is true of what the terminal has shown."""
    steps = list(steps)
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "redpool", *args], cwd=ROOT, env=_env(env),
                            stdin=slave, stdout=slave, stderr=slave, start_new_session=True)
    os.close(slave)
    seen = b""
    deadline = time.monotonic() + timeout
    try:
        while True:
            assert time.monotonic() < deadline, f"terminal showed: {seen[-3000:]!r}"
            if select.select([master], [], [], 0.2)[0]:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: every writer closed the terminal
                    chunk = b""
                seen += chunk
                if not chunk and proc.poll() is not None:
                    break
            elif proc.poll() is not None:
                break
            if steps and steps[0][0](seen.decode(errors="replace")):
                steps.pop(0)[1](proc)
        return proc.wait(30), seen.decode(errors="replace").replace("\r\n", "\n")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        os.close(master)


def run_reader_gone(*args: str, read_lines: int = 0, both: bool = False, env=None,
                    then=None, timeout: float = 120, read_until: bytes | None = None,
                    started=None) -> tuple[int, str, bytes]:
    """Run with stdout into a real pipe whose reader goes away: before the command
    writes anything (``read_lines=0``, as ``| head -0``), or after reading that many
    lines (as ``| head -1``), or until a line holding ``read_until`` came.  ``both``: stderr goes into the pipe too (``2>&1``).
    ``then()`` runs once the reader is gone.  Returns (exit code, stderr, what the
    reader read)."""
    rfd, wfd = os.pipe()
    if not read_lines and read_until is None:
        os.close(rfd)
    proc = subprocess.Popen([sys.executable, "-m", "redpool", *args], cwd=ROOT, env=_env(env),
                            stdin=subprocess.DEVNULL, stdout=wfd,
                            stderr=wfd if both else subprocess.PIPE, start_new_session=True)
    os.close(wfd)
    if started is not None:
        started(proc.pid)
    got = b""
    try:
        if read_lines or read_until is not None:
            deadline = time.monotonic() + timeout
            while (read_until not in got if read_until is not None
                   else got.count(b"\n") < read_lines):
                assert time.monotonic() < deadline, f"read only {got[-500:]!r}"
                if select.select([rfd], [], [], 0.2)[0]:
                    chunk = os.read(rfd, 4096)
                    if not chunk:
                        break
                    got += chunk
            os.close(rfd)   # the reader goes away, as head does
        if then is not None:
            then()
        _, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode, (err or b"").decode(errors="replace"), got


def assert_quiet_141(code: int, err: str, args=()) -> None:
    for noise in ("Traceback", "BrokenPipe", "Exception ignored", "Broken pipe"):
        assert noise not in err, (args, err)
    assert code == EXIT_BROKEN_PIPE, (args, code, err)


# -- 1. a reader that goes away ------------------------------------------------------------------

def test_commands_without_redis_end_quietly_when_their_reader_goes_away():
    for args in (["acl", "producer"], ["acl", "worker"], ["--version"], ["--help"],
                 ["status", "--help"], ["dead", "list", "--help"]):
        code, err, _ = run_reader_gone(*args)
        assert_quiet_141(code, err, args)


def test_status_inspect_dead_and_enqueue_end_quietly_when_their_reader_goes_away(
        r, keys, redis_url, namespace):
    at = ["--redis-url", redis_url, "--namespace", namespace]
    # Given a queue, a job too large for a pipe's buffer, and many dead letters
    big = "x" * 300_000
    lpush_jobs(r, keys, [{"task": "t.add", "id": "big-one", "args": [big, 1]}])
    dead = [json.dumps({"job": json.dumps({"task": "t.nope", "id": f"d{i}", "args": ["y" * 200]}),
                        "queue": "default", "reason": "unknown task", "error_type": "UnknownTask",
                        "failed_at": 1.7e9, "worker": "w", "id": f"d{i}"}) for i in range(2000)]
    r.lpush(keys.dead, *dead)
    # When the reader reads one line and leaves while the command still writes
    for args in (["inspect", "big-one"], ["dead", "list", "--json", "--limit", "0"],
                 ["status", "--watch", "0.2"], ["status", "--watch", "0.2", "--json"]):
        code, err, got = run_reader_gone(*args, *at, read_lines=1)
        assert got, args
        assert_quiet_141(code, err, args)
    # or is gone before it writes
    for args in (["status"], ["status", "--json"], ["inspect", "big-one", "--json"],
                 ["dead", "list"],
                 ["enqueue", "t.add", "1", "2"], ["dead", "requeue", "d1"],
                 ["dead", "purge", "--all"]):
        code, err, _ = run_reader_gone(*args, *at)
        assert_quiet_141(code, err, args)


def test_enqueue_wait_ends_quietly_when_its_reader_goes_away(daemons, redis_url, namespace):
    daemons().wait_started()
    code, err, _ = run_reader_gone("enqueue", "t.add", "2", "3", "--wait", "--redis-url",
                                   redis_url, "--namespace", namespace)
    assert_quiet_141(code, err)


def test_demo_and_dev_end_quietly_when_their_reader_goes_away():
    code, err, _ = run_reader_gone("demo", "--jobs", "1")
    assert_quiet_141(code, err)
    # dev announces its private server on stderr: that reader gone too (2>&1 | head -0)
    code, err, _ = run_reader_gone("dev", "tests.taskmods.jobs", "--concurrency", "1", both=True)
    assert code == EXIT_BROKEN_PIPE


def test_a_worker_whose_log_reader_goes_away_carries_on_and_drains_on_ctrl_c(
        r, keys, redis_url, namespace):
    # Given `redpool worker ... 2>&1 | tee log`, its reader gone once the worker started
    # (a warning may come before `started`: the test server keeps nothing on disk)
    ledger = f"{namespace}:ledger"
    state = {}

    def then() -> None:
        # When jobs come (their log lines find no reader), and Ctrl-C arrives while a
        # long one runs (the first line of the drain finds no reader either)
        lpush_jobs(r, keys, [{"task": "t.add", "id": "after", "args": [1, 2]},
                             {"task": "t.sleep", "id": "long", "args": [2.0, "done"]}])
        wait_for(lambda: r.exists(keys.result("after")), what="a job after the reader left")
        wait_for(lambda: b"long:start" in b" ".join(r.lrange(ledger, 0, -1)),
                 what="the long job running")
        state["pid"] = next(int(e.decode().rsplit(":", 1)[1])
                            for e in r.lrange(ledger, 0, -1) if e.startswith(b"long:start"))
        os.kill(supervisor[0], signal.SIGINT)

    supervisor = []
    code, err, got = run_reader_gone(
        "worker", "tests.taskmods.jobs", "--redis-url", redis_url, "--namespace", namespace,
        "--concurrency", "1", "--grace", "60", "--log-format", "json", "--name", "headless",
        read_until=b'"started"', both=True, then=then, started=supervisor.append,
        env={"REDPOOL_LEDGER_URL": redis_url, "REDPOOL_LEDGER": ledger})
    # Then it served on with its log silenced, and the one Ctrl-C drained it: the long
    # job finished within its grace (not cut short, not run twice), exit 0
    assert b'"starting"' in got and code == 0, err
    assert json.loads(r.get(keys.result("long")))["result"] == "done"
    assert [e for e in r.lrange(ledger, 0, -1) if e.startswith(b"long:")] == \
        [f"long:start:{state['pid']}".encode(), f"long:end:{state['pid']}".encode()]
    assert not r.smembers(keys.supervisors)


# -- 2. one message per fatal error, in the log's format ------------------------------------------

def one_fatal(res, exit_code: int) -> dict:
    """stderr holds exactly one error: a worker's, one JSON object (stderr is not a
    terminal); a one-shot command's, one ``redpool: ...`` line."""
    assert res.returncode == exit_code, res.stderr
    if not res.stderr.startswith("{"):
        (line,) = res.stderr.splitlines()
        assert line.startswith("redpool: ") and line.count("redpool: ") == 1, res.stderr
        return {"event": "fatal", "exit_code": exit_code, "error": line[len("redpool: "):]}
    lines = res.stderr.splitlines()
    objects = [json.loads(x) for x in lines]   # every line is JSON
    errors = [x for x in objects if x["level"] == "error"]
    assert len(errors) == 1 and errors[0]["event"] == "fatal", res.stderr
    assert errors[0]["exit_code"] == exit_code
    assert "redpool: " not in res.stderr   # not said a second time, in another format
    return errors[0]


def test_each_error_path_is_one_message_in_the_commands_format(redis_url, tmp_path):
    # the worker's: JSON lines off a terminal (journald, log shippers); a one-shot
    # command's: one plain line, terminal or not (what a person or a script reads)
    cases = [
        (["worker"], EXIT_USAGE, "name the modules"),
        (["worker", "tests.taskmods.jobs", "--concurrency", "lots"], EXIT_USAGE, "--concurrency"),
        (["worker", "tests.taskmods.jobs", "--redis-url", "foo://x"], EXIT_USAGE,
         "does not start with a scheme redpool knows"),
        (["worker", "tests.taskmods.jobs", "--redis-url", NOWHERE], EXIT_REDIS,
         "cannot reach Redis"),
        (["status", "--redis-url", NOWHERE], EXIT_REDIS, "cannot reach Redis"),
        (["status", "--watch", "0"], EXIT_USAGE, "--watch"),
        (["inspect", "some-id", "--redis-url", NOWHERE], EXIT_REDIS, "cannot reach Redis"),
        (["dead", "list", "--redis-url", "foo://x"], EXIT_USAGE, "scheme redpool knows"),
        (["dead", "purge"], EXIT_USAGE, "purge"),
        (["enqueue", "t.add", "--redis-url", NOWHERE], EXIT_REDIS, "cannot reach Redis"),
        (["enqueue", "t.add", "--kwargs", "[1]"], EXIT_USAGE, "--kwargs"),
    ]
    for args, exit_code, says in cases:
        res = run(*args)
        assert says in one_fatal(res, exit_code)["error"], (args, res.stderr)
        assert res.stderr.startswith("{") == (args[0] == "worker"), res.stderr
    # the worker's format is its --log-format / REDPOOL_LOG_FORMAT, terminal or not
    res = run("worker", "--log-format", "console")
    assert res.returncode == EXIT_USAGE
    assert re.fullmatch(r"\d\d:\d\d:\d\d\.\d{3} error   fatal: name the modules[^\n]*\n",
                        res.stderr)
    res = run("worker", env={"REDPOOL_LOG_FORMAT": "console"})
    assert res.stderr.count("\n") == 1 and "fatal: name the modules" in res.stderr


def test_a_name_in_use_is_one_json_message(daemons, redis_url, namespace):
    daemons(name="taken").wait_started()
    res = run("worker", "tests.taskmods.jobs", "--redis-url", redis_url, "--namespace",
              namespace, "--name", "taken")
    assert "taken" in one_fatal(res, EXIT_NAME_IN_USE)["error"]


def test_an_unexpected_error_is_one_message_with_its_traceback(monkeypatch, capsys,
                                                               restore_logging):
    from redpool import acl

    def broken(*a, **kw):
        raise RuntimeError("a bug")

    monkeypatch.setattr(acl, "setuser", broken)
    assert cli.main(["acl", "producer"]) == 1
    err = capsys.readouterr().err
    head, *traceback = err.rstrip("\n").splitlines()
    assert head.startswith("redpool: unexpected error: RuntimeError: a bug") \
        and "please report" in head and err.count("redpool: ") == 1, err
    assert traceback[0] == "Traceback (most recent call last):"
    assert any(", in broken" in x for x in traceback) and traceback[-1] == "RuntimeError: a bug"


def test_on_a_terminal_an_error_is_one_readable_line():
    # a one-shot command reads like any command-line tool
    code, shown = run_on_a_terminal("status", "--redis-url", NOWHERE, env={"NO_COLOR": "1"})
    assert code == EXIT_REDIS
    assert shown.count("\n") == 1 and shown.startswith("redpool: cannot reach Redis at "), shown
    # the worker's line starts with the time, as its other lines do
    code, shown = run_on_a_terminal("worker", "tests.taskmods.jobs", "--redis-url", NOWHERE,
                                    env={"NO_COLOR": "1"})
    assert code == EXIT_REDIS
    assert re.fullmatch(r"\d\d:\d\d:\d\d\.\d{3} error   fatal: cannot reach Redis at [^\n]*"
                        r"is it running[^\n]*\n", shown), shown


# -- 4. a task module that does not exist, or raises -------------------------------------------

def test_a_missing_task_module_is_one_line_that_says_where_it_was_looked_for(redis_url,
                                                                            namespace, tmp_path):
    # Given a project directory holding mytasks.py, and a worker asked for "mytask"
    (tmp_path / "mytasks.py").write_text("from redpool import task\n")
    res = run("worker", "mytask", "--redis-url", redis_url, "--namespace", namespace,
              "--concurrency", "1", cwd=tmp_path)
    error = one_fatal(res, EXIT_BOOT)["error"]
    assert "\n" not in error and "<frozen" not in res.stderr and "Traceback" not in res.stderr
    assert error.startswith("task module 'mytask' not found: no module 'mytask' in the "
                            f"working directory {tmp_path} or elsewhere on sys.path [")
    assert f"'{tmp_path}'" in error  # sys.path, as the pool process searched it
    assert "did you mean 'mytasks'?" in error and "PYTHONPATH" in error
    # a module within a package that exists
    res = run("worker", "tests.taskmods.jbos", "--redis-url", redis_url, "--namespace",
              namespace, "--concurrency", "1")
    error = one_fatal(res, EXIT_BOOT)["error"]
    assert error == ("task module 'tests.taskmods.jbos' not found: package 'tests.taskmods' "
                     f"({ROOT / 'tests' / 'taskmods'}) has no module 'jbos'; did you mean "
                     "'tests.taskmods.jobs'?")
    # a file path where a module name belongs
    res = run("worker", "tests/taskmods/jobs.py", "--redis-url", redis_url, "--namespace",
              namespace, "--concurrency", "1")
    assert "a module name is needed: 'tests.taskmods.jobs'" in one_fatal(res, EXIT_BOOT)["error"]


def test_a_task_module_that_raises_keeps_its_traceback_once(redis_url, namespace, tmp_path):
    # Given a module that exists but imports something that does not
    (tmp_path / "needsdep.py").write_text("import os\n\nimport not_installed_anywhere_xyz\n")
    res = run("worker", "needsdep", "--redis-url", redis_url, "--namespace", namespace,
              "--concurrency", "1", cwd=tmp_path)
    error = one_fatal(res, EXIT_BOOT)["error"]
    headline, _, tb = error.partition("\n")
    assert headline == ("task module 'needsdep' raised while being imported in a pool process "
                        f"(working directory {tmp_path}):")
    assert tb.startswith("Traceback (most recent call last):\n")
    assert f'File "{tmp_path / "needsdep.py"}", line 3, in <module>' in tb
    assert tb.endswith("ModuleNotFoundError: No module named 'not_installed_anywhere_xyz'")
    assert "importlib" not in tb and "child.py" not in tb and res.stderr.count("Traceback") == 1
    # On a terminal: the same, once, the traceback on its own lines
    code, shown = run_on_a_terminal("worker", "tests.taskmods.broken", "--redis-url", redis_url,
                                    "--namespace", namespace, "--concurrency", "1",
                                    env={"NO_COLOR": "1"})
    assert code == EXIT_BOOT and shown.count("Traceback") == 1 and "<frozen" not in shown
    lines = shown.splitlines()
    i = next(i for i, x in enumerate(lines) if " fatal: " in x)
    assert lines[i].endswith("fatal: task module 'tests.taskmods.broken' raised while being "
                             f"imported in a pool process (working directory {ROOT}):")
    assert lines[i + 1] == "Traceback (most recent call last):"
    assert lines[-1] == ("ImportError: this module is broken on purpose "
                         "(tests.taskmods.broken)")


# -- 3 and 5. task code's logging, and a worker's console on a terminal --------------------------

def test_task_code_logging_comes_out_in_the_workers_format(daemons, r, keys):
    d = daemons("--concurrency", "1", modules=("tests.taskmods.jobs", "tests.taskmods.chatty"))
    d.wait_started()
    lpush_jobs(r, keys, [{"task": "chatty.say", "id": "c1", "args": ["hello"]}])
    said = wait_for(lambda: [e for e in d.events() if e.get("event") == "task says hello"],
                    what="the task's log line")
    assert said[0]["logger"] == "tests.taskmods.chatty" and said[0]["level"] == "warning"
    assert "task says" not in "".join(x for x in d.log().splitlines()
                                      if not x.startswith("{"))   # never as bare text


def test_task_code_with_logging_of_its_own_is_left_alone(daemons, r, keys):
    d = daemons("--concurrency", "1", modules=("tests.taskmods.own_logging",)).wait_started()
    lpush_jobs(r, keys, [{"task": "own.say", "id": "o1", "args": ["hi"]}])
    wait_for(lambda: "OWN INFO own says hi" in d.log(), what="the module's own format")


def test_task_code_with_structlog_of_its_own_is_left_alone(daemons, r, keys):
    # a worker at --log-level warning would drop the task's info line, and JSON would
    # replace its key=value format, if the child reconfigured structlog over it
    d = daemons("--concurrency", "1", "--log-level", "warning",
                modules=("tests.taskmods.own_structlog",))
    lpush_jobs(r, keys, [{"task": "own.structlog", "id": "o1", "args": ["hi"]}])
    wait_for(lambda: r.exists(keys.result("o1")), timeout=60, what="the job's result")
    wait_for(lambda: "event='own_structlog_says' text='hi'" in d.log(),
             what="the module's own structlog line")


def test_tracebacks_on_a_terminal_never_show_local_variables():
    # rich's formatter (structlog's default when rich is installed) prints every frame's
    # locals, a --redis-url with its password among them
    def boom(redis_url="redis://:S3cret@redis.internal:6379/0"):
        raise KeyError(redis_url[:7])

    try:
        boom()
    except KeyError as e:
        err = e
    for colors in (False, True):
        text = ConsoleRenderer(colors=colors)(None, "error", {"event": "fatal", "error": "x",
                                                             "exc_info": err})
        assert "Traceback" in text and "in boom" in text and "S3cret" not in text


def test_a_worker_on_a_terminal_prints_lines_for_people(redis_url, namespace, r, keys):
    ledger = f"{namespace}:ledger"

    def enqueue(proc) -> None:
        lpush_jobs(r, keys, [{"task": "t.add", "id": "ok-1", "args": [2, 3]},
                             {"task": "t.boom", "id": "bad-1", "args": ["bad input"]},
                             {"task": "t.sleep", "id": "slow-1", "args": [60]}])

    def interrupt(proc) -> None:
        wait_for(lambda: b"slow-1:start" in b" ".join(r.lrange(ledger, 0, -1)),
                 what="the slow job running")
        os.kill(proc.pid, signal.SIGINT)

    code, text = run_on_a_terminal(
        "worker", "tests.taskmods.jobs", "--redis-url", redis_url, "--namespace", namespace,
        "--concurrency", "2", "--grace", "60", "--name", "tty1",
        env={"NO_COLOR": "1", "REDPOOL_LEDGER_URL": redis_url, "REDPOOL_LEDGER": ledger},
        steps=[(lambda t: " started " in t, enqueue),
               (lambda t: "id=ok-1" in t and "id=bad-1" in t, interrupt),
               (lambda t: "draining:" in t, lambda proc: os.kill(proc.pid, signal.SIGINT))])
    assert code == 0, text
    lines = text.splitlines()
    clock = r"\d\d:\d\d:\d\d\.\d{3} "
    assert all(re.match(clock, x) for x in lines), text   # times for people, no JSON
    started = next(x for x in lines if " started " in x)
    assert re.fullmatch(clock + r"info    started        name=tty1 host=\S+ pid=\d+ "
                        r"queues=default concurrency=2 lease=15s", started)
    jobs = [x for x in lines if " job_finished " in x]
    ok = next(x for x in jobs if "id=ok-1" in x)
    assert re.fullmatch(clock + r"info    job_finished   task=t\.add id=ok-1 queue=default "
                        r"status=succeeded duration=[\d.]+ms", ok)
    bad = next(x for x in jobs if "id=bad-1" in x)
    assert re.match(clock + r"warning job_finished   task=t\.boom id=bad-1 queue=default "
                    r"status=failed duration=[\d.]+ms error=\"?ValueError", bad), bad
    for noise in ("result_id", "ttl=", "attempt=", "dead=", "None", "False"):
        assert noise not in "".join(jobs)
    said = [x for x in lines if "draining" in x]
    assert said == [said[0]] and said[0].endswith(
        "info    draining: 1 job running gets up to 60 s to finish; press Ctrl-C again to "
        "stop now (unfinished jobs go back to their queues)")
    assert any(" stop_now " in x for x in lines) and " stopped " in lines[-1]
    assert "Traceback" not in text
    assert r.llen(keys.queue("default")) == 1   # the slow job went back


# -- 6. draining: said once -----------------------------------------------------------------------

def test_draining_says_once_how_to_stop_at_once(daemons, r, keys, namespace):
    ledger = f"{namespace}:ledger"
    d = daemons("--concurrency", "2", "--grace", "60", "--log-level", "debug",
                ledger=ledger).wait_started()
    lpush_jobs(r, keys, [{"task": "t.sleep", "id": f"s{i}", "args": [60]} for i in range(2)])
    wait_for(lambda: len(r.lrange(ledger, 0, -1)) == 2, what="both jobs running")
    d.signal(signal.SIGINT)
    # Then, while heartbeats go on beating (each a line at debug), the hint is said once
    wait_for(lambda: len([e for e in d.events() if e.get("event") == "heartbeat"
                          and e.get("state") == "draining"]) >= 3, what="heartbeats")
    drains = [e for e in d.events() if e.get("event") == "draining"]
    assert len(drains) == 1 and drains[0]["running"] == 2 and drains[0]["signal"] == "SIGINT"
    assert drains[0]["message"] == ("2 jobs running get up to 60 s to finish; press Ctrl-C "
                                    "again to stop now (unfinished jobs go back to their queues)")
    assert d.log().count("Ctrl-C") == 1
    # And the second Ctrl-C does what it said
    d.signal(signal.SIGINT)
    assert d.wait(60) == 0
    assert any(e.get("event") == "stop_now" for e in d.events())
    assert r.llen(keys.queue("default")) == 2
