"""`redpool dev`: a worker on a private server that keeps its port and its data between
runs, and (``--reload``) restarts the pool's processes when task files change.

**Where the state lives: ``.redpool/dev/`` in the working directory.**  The working
directory is already what makes a project for redpool (task modules are imported
relative to it, as with ``python -m``), so the state sits next to the code it belongs
to: one per project, found and removed with it (``rm -rf .redpool``), and visible to
whoever wonders where the jobs went.  A ``.gitignore`` holding ``*`` is written into
``.redpool/`` (as pytest does for its cache), so nothing there reaches git without
anyone editing theirs.  The alternative, ``$XDG_STATE_HOME/redpool/<hash of the
path>``, keeps the tree clean but loses the state when the project moves, and
leaves directories nobody knows of behind deleted projects.

``.redpool/dev/`` holds ``state.json`` (the port), ``lock`` (flock: one `redpool dev`
per project at a time) and ``data/`` (the server's directory: AOF, its log).  The
server runs with AOF (``appendfsync everysec``: a dev machine needs no fsync per
write; a clean stop writes everything); the port is the last run's if it is free, so
an ``export REDPOOL_REDIS_URL=...`` done in another terminal stays valid.  A first
run picks a port in 20000-29999 derived from the project's path (below the kernels'
ephemeral ranges, so an outgoing connection cannot take it between runs; two
projects rarely meet).  ``--fresh`` empties the data and keeps the port.

``--reload`` watches the working directory (or ``--reload-dir``) with watchfiles
(inotify / FSEvents through the Rust notify crate, grouped into one batch per burst of
saves: its debounce) and sends this process SIGHUP for each batch: the daemon's own
graceful reload, so new pool processes import the code afresh while the old ones
finish their jobs.  One log line names what changed.  Task code that does not import
at start-up does not end `redpool dev --reload`: it says so and waits for the next
change to try again.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import socket
import threading
import time
import zlib
from pathlib import Path
from typing import Callable, Iterator

from .errors import BootError, ConfigError

PORTS = range(20000, 30000)
STEP_MS = 100           # quiet time that ends a burst of changes
STOP_JOIN = 2.0         # seconds to wait for the watcher thread at exit
READY_POLL_MS = 200     # the watcher says it is up within this long of starting
READY_WAIT = 5.0        # seconds to wait for that before the first run (not forever)
IGNORED_DIRS = (".redpool", "venv", "site-packages", "build", "dist", ".eggs", ".nox",
                ".ruff_cache")


class DevState:
    """``<root>/.redpool/dev``: the port of the last run, a lock, the server's data."""

    def __init__(self, root: Path) -> None:
        self.top = root / ".redpool"
        self.dir = self.top / "dev"
        self.data = self.dir / "data"
        self.file = self.dir / "state.json"
        self._lock: int | None = None

    def open(self) -> None:
        """Create the directory and take the project's lock, or say who holds it."""
        try:
            self.data.mkdir(parents=True, exist_ok=True)
            ignore = self.top / ".gitignore"
            if not ignore.exists():
                ignore.write_text("# written by `redpool dev`: its private server's data\n*\n")
            fd = os.open(self.dir / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise ConfigError(f"cannot keep `redpool dev`'s state in {self.dir}: "
                              f"{e.strerror or e}; run it from a directory you can write to, "
                              "or pass --redis-url to use a server of yours") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise ConfigError(f"another `redpool dev` is running in {self.dir.parent.parent} "
                              f"(its server: {self.url(self.port()) or 'starting'}): stop it "
                              "first, or run a second worker on its server with `redpool worker "
                              "MODULE --redis-url URL`") from None
        self._lock = fd

    def close(self) -> None:
        if self._lock is not None:
            os.close(self._lock)  # releases the flock
            self._lock = None

    def port(self) -> int | None:
        try:
            port = json.loads(self.file.read_text()).get("port")
        except (OSError, ValueError, AttributeError):
            return None
        return port if isinstance(port, int) and 0 < port < 65536 else None

    def remember(self, port: int) -> None:
        tmp = self.file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"port": port, "url": self.url(port)}) + "\n")
        tmp.replace(self.file)

    def has_data(self) -> bool:
        return any(self.data.glob("appendonly*"))

    def wipe(self) -> None:
        shutil.rmtree(self.data, ignore_errors=True)
        self.data.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def url(port: int | None) -> str | None:
        return None if port is None else f"redis://127.0.0.1:{port}/0"


def listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1.0).close()
        return True
    except OSError:
        return False


def stop_our_orphan(port: int, data: Path) -> bool:
    """Stop the server on ``port`` if it is ours: one left by a `redpool dev` killed
    where the kernel could not take its server along (no PR_SET_PDEATHSIG off Linux).
    Its directory tells; its AOF is written out as it stops."""
    import redis

    try:
        with redis.Redis(host="127.0.0.1", port=port, socket_timeout=2.0) as r:
            if r.config_get("dir").get("dir") != str(data.resolve()):
                return False
            r.shutdown()
    except redis.RedisError:
        return False
    deadline = time.monotonic() + 10
    while listening(port) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not listening(port)


def first_port(root: Path) -> int:
    """A free port in PORTS, starting at one derived from the project's path."""
    start = zlib.crc32(str(root.resolve()).encode()) % len(PORTS)
    for i in range(len(PORTS)):
        port = PORTS[(start + i) % len(PORTS)]
        if not listening(port):
            return port
    raise ConfigError(f"no free port in {PORTS.start}-{PORTS.stop - 1}: pass --port PORT")


@contextlib.contextmanager
def dev_server(root: Path, *, fresh: bool = False, port: int | None = None,
               announce: Callable[[str], None] = print) -> Iterator[str]:
    """Yield the URL of the project's private server: started on the last run's port
    with the last run's data (unless ``fresh``), stopped (AOF written) on the way out."""
    from .server import EmbeddedServer

    state = DevState(root)
    state.open()
    try:
        port = port or state.port()
        if port and listening(port) and not stop_our_orphan(port, state.data):
            raise ConfigError(
                f"port {port}, where this project's dev server listens, is taken by another "
                "program: stop it, or pass --port PORT to choose another (producers then need "
                "the new REDPOOL_REDIS_URL)")
        if fresh:
            state.wipe()
        kept = state.has_data()
        srv = EmbeddedServer(port=port or first_port(root), appendonly=True,
                             appendfsync="everysec", dir=str(state.data))
        with srv:
            state.remember(srv.port)
            where = os.path.relpath(state.dir)
            announce(f"redpool: dev server at {srv.url} "
                     + (f"with the last run's data ({_keys(srv.url)}, kept in {where}; --fresh "
                        "starts empty)" if kept else f"(its data is kept in {where} between runs)"))
            announce(f"redpool: producers in other terminals: export REDPOOL_REDIS_URL={srv.url}")
            yield srv.url
    finally:
        state.close()


def _keys(url: str) -> str:
    import redis

    with redis.Redis.from_url(url, socket_timeout=5.0) as r:
        n = r.dbsize()
    return f"{n} key{'' if n == 1 else 's'}"


def is_ours(url: str | None, root: Path) -> bool:
    """``url`` is the one this project's dev server had (an export done in this
    terminal, say): it means 'the private server', which is not running yet."""
    return bool(url) and url == DevState.url(DevState(root).port())


# -- --reload -------------------------------------------------------------------------------

def _task_files():
    try:
        from watchfiles import DefaultFilter, PythonFilter
    except ImportError:
        raise ConfigError("`redpool dev --reload` needs the watchfiles package: "
                          "pip install 'redpool[dev]'") from None

    class TaskFiles(PythonFilter):
        ignore_dirs = (*DefaultFilter.ignore_dirs, *IGNORED_DIRS)

    return TaskFiles()


def check_dirs(dirs: list[str]) -> list[str]:
    for d in dirs:
        if not os.path.isdir(d):
            raise ConfigError(f"--reload-dir {d!r} is not a directory")
    _task_files()  # watchfiles missing: said now, before anything starts
    return [os.path.abspath(d) for d in dirs]


def _changed(changes) -> list[str]:
    files = sorted({os.path.relpath(path) for _, path in changes})
    return files if len(files) <= 5 else [*files[:5], f"and {len(files) - 5} more"]


class Watcher:
    """One watcher for the whole dev session, so that no change is missed between two
    runs of the worker: a fix saved while a broken version was failing to boot is
    seen, and the next run starts at once.  While the worker runs (``forwarding()``)
    each batch of changed Python files also sends this process SIGHUP: the daemon's
    graceful reload (its handler is installed before forwarding starts and stays until
    it ends, so no SIGHUP meets the default action)."""

    def __init__(self, dirs: list[str], log) -> None:
        self.dirs, self.log = dirs, log
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._cv = threading.Condition()
        self._pending: list[str] = []
        self._forwarding = False
        self._thread = threading.Thread(target=self._watch, name="redpool-reload", daemon=True)

    def _watch(self) -> None:
        from watchfiles import watch

        # yield_on_timeout: an empty batch says the watcher is up (ready)
        for changes in watch(*self.dirs, watch_filter=_task_files(), step=STEP_MS,
                             stop_event=self._stop, raise_interrupt=False,
                             ignore_permission_denied=True, yield_on_timeout=True,
                             rust_timeout=READY_POLL_MS):
            self._ready.set()
            if not changes:
                continue
            files = _changed(changes)
            with self._cv:
                self._pending += files
                self._cv.notify_all()
                forward = self._forwarding
            if forward:
                self.log.info("files_changed", files=files, action="reloading the pool")
                os.kill(os.getpid(), signal.SIGHUP)

    def __enter__(self) -> "Watcher":
        self._thread.start()
        self._ready.wait(READY_WAIT)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(STOP_JOIN)

    @contextlib.contextmanager
    def forwarding(self):
        """While the worker runs: changes reload its pool."""
        with self._cv:
            self._forwarding = True
        try:
            yield self
        finally:
            with self._cv:
                self._forwarding = False

    def forget(self) -> None:
        """A run starts now: what changed before is in the code it loads."""
        with self._cv:
            self._pending.clear()

    def wait(self) -> list[str]:
        """The files changed since the last forget(), once there are any (Ctrl-C:
        KeyboardInterrupt)."""
        with self._cv:
            while not self._pending:
                self._cv.wait(0.5)   # (a timeout: Ctrl-C is seen between waits)
            files, self._pending = self._pending, []
            return files


def run(cfg, run_worker: Callable[..., int], reload_dirs: list[str] | None, log) -> int:
    """Run the worker; with ``reload_dirs``, task code that does not import at start-up
    is waited out (the next change tries again) instead of ending the command."""
    if not reload_dirs:
        return run_worker(cfg)
    # Python trusts a cached .pyc whose source has the same mtime (in seconds) and size:
    # an edit within the second of the last import ("return 1" -> "return 2") would
    # reload the old code.  Pool processes of a reloading dev worker write no cache.
    os.environ["PYTHONDONTWRITEBYTECODE"] = "1"
    with Watcher(reload_dirs, log) as watcher:
        while True:
            watcher.forget()
            try:
                return run_worker(cfg, watch=watcher.forwarding)
            except BootError as e:
                log.error("boot_failed", error=str(e),
                          action="fix the task code: the next change to a .py file tries again")
            log.info("files_changed", files=watcher.wait(), action="starting again")
