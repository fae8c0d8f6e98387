"""Process titles, so that ps and top say what each redpool process is doing:

    redpool: supervisor web-1 [high,default] 3/4 busy, 120 done, 2 failed
    redpool: child web-1 running myapp.tasks.resize for 12s
    redpool: child web-1 idle

Every command retitles itself as its first act (``hide_command_line``, from cli.main):
``redpool status --watch --redis-url redis://:***@db:6379/0``, the command line with the
Redis URL redacted, so that a password given there does not stay in ps and
/proc/<pid>/cmdline for as long as the command runs.  setproctitle writes over the
memory the kernel shows as the command line (the original arguments), so nothing of
them is left to read.  What it cannot hide is the moment before: Python starting up and
importing redpool; hence the warning a password on the command line gets.

The supervisor's title follows its heartbeat event (every second): a Hooks subscriber,
like the log and the metrics, so the loop knows nothing of titles.

A child's title is set by a thread of its own, once a second and only when the text
changed.  A child runs up to tens of thousands of jobs a second, so its loop does no
more per job than record what it runs and since when (two attribute stores, about
20 ns); the thread reads the task name out of the raw job, at most once a second, and
shows it only if it is a registered task: a title never holds text a producer chose.
"""

from __future__ import annotations

import json
import re
import threading
import time
from typing import Callable, Mapping

from setproctitle import setproctitle

from .urls import redact_url

INTERVAL = 1.0  # seconds between a child's title updates
URL_FLAG = "--redis-url"
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")   # an argument that is a URL itself


def command_title(argv: list[str]) -> str:
    """``redpool ARGS``, each Redis URL in them redacted (urls.redact_url)."""
    shown, url_next = ["redpool"], False
    for arg in argv:
        flag, eq, value = arg.partition("=")
        if url_next or _URL.match(arg):
            arg = redact_url(arg)
        elif eq and flag == URL_FLAG:
            arg = f"{flag}={redact_url(value)}"
        url_next = arg == URL_FLAG
        shown.append(arg)
    return " ".join(shown)


def hide_command_line(argv: list[str], set_title: Callable[[str], None] = setproctitle) -> None:
    """Retitle this process: its command line, without the secrets in it."""
    set_title(command_title(argv))


def password_warning(command: str) -> str:
    """The one warning a password on the command line gets: what it costs, what instead."""
    instead = ("--redis-url-file FILE" if command == "demo" else
               "REDPOOL_REDIS_URL, or in a file: --redis-url-file FILE (REDPOOL_REDIS_URL_FILE)")
    return (f"the password in {URL_FLAG} can be read by every user of this host (ps, "
            "/proc/PID/cmdline) until redpool has hidden it, and stays in your shell's "
            f"history: pass the URL in {instead}")


def elapsed(seconds: float) -> str:
    """12s, 3m05s, 1h02m."""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def supervisor_title(name: str, queues: list[str], f: Mapping) -> str:
    """The title for a heartbeat's (or the started event's) fields.  "Busy" counts
    processes with work (the heartbeat says; the started event has only the jobs in
    flight, of which each process runs one)."""
    concurrency = f.get("concurrency") or 0
    busy = f["busy"] if "busy" in f else min(f.get("inflight") or 0, concurrency)
    text = (f"redpool: supervisor {name} [{','.join(queues)}] {busy}/{concurrency} busy, "
            f"{f.get('succeeded') or 0} done")
    if f.get("failed"):
        text += f", {f['failed']} failed"
    if f.get("state") == "draining":
        text += " (draining)"
    if f.get("redis_down"):
        text += " (Redis unreachable)"
    return text


class SupervisorTitle:
    """Hooks subscriber: retitles the supervisor on each heartbeat, when the text changed."""

    def __init__(self, name: str, queues: list[str],
                 set_title: Callable[[str], None] = setproctitle) -> None:
        self.name = name
        self.queues = list(queues)
        self.set_title = set_title
        self.shown: str | None = None

    def __call__(self, event: str, fields: dict) -> None:
        if event not in ("heartbeat", "started"):
            return  # the hot events (job_finished) cost one comparison
        text = supervisor_title(self.name, self.queues, fields)
        if text != self.shown:
            self.set_title(text)
            self.shown = text


def supervisor_titles(name: str, queues: list[str]) -> SupervisorTitle:
    """The subscriber, having titled the supervisor "starting" already: the command line
    (and a --redis-url on it) is hidden from now on, not from the first heartbeat."""
    sub = SupervisorTitle(name, queues)
    sub.set_title(f"redpool: supervisor {name} [{','.join(queues)}] starting")
    return sub


class ChildTitle:
    """What a pool child shows.  The child's loop sets ``since`` then ``raw`` before
    each job (in that order: a reader that sees a job's raw bytes sees its start time)
    and ``raw = None`` when its batch is done; a daemon thread does everything else."""

    def __init__(self, worker: str, tasks: Mapping[str, object],
                 set_title: Callable[[str], None] = setproctitle,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.raw: bytes | None = None   # the job running now; None: idle
        self.since = 0.0                # when it started (clock)
        self.worker = worker
        self.tasks = tasks              # the registry's names: the only task names shown
        self.set_title = set_title
        self.clock = clock
        self.shown: str | None = None
        self._raw: bytes | None = None  # the job _task was read from
        self._task = ""

    def task_of(self, raw: bytes) -> str:
        try:
            job = json.loads(raw)
        except (ValueError, RecursionError):
            return "an invalid job"
        task = job.get("task") if isinstance(job, dict) else None
        return task if isinstance(task, str) and task in self.tasks else "an invalid job"

    def text(self) -> str:
        raw = self.raw
        since = self.since
        if raw is None:
            return f"redpool: child {self.worker} idle"
        if raw is not self._raw:
            self._raw, self._task = raw, self.task_of(raw)
        ran = elapsed(self.clock() - since)
        return f"redpool: child {self.worker} running {self._task} for {ran}"

    def refresh(self) -> None:
        text = self.text()
        if text != self.shown:
            self.set_title(text)
            self.shown = text

    def start(self, interval: float = INTERVAL) -> "ChildTitle":
        self.refresh()

        def run() -> None:
            while True:
                time.sleep(interval)
                self.refresh()

        threading.Thread(target=run, name="redpool-title", daemon=True).start()
        return self
