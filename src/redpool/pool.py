"""The process side only: spawn, feed, collect, reap, kill.  Never touches Redis.

Each child has its own duplex pipe and runs one job at a time, so the supervisor
always knows which job a child holds: when a child dies, exactly that job fails and
nothing else is disturbed (multiprocessing.Pool's shared task queue loses track of a
dead worker's task and hangs forever, CPython gh-66587).  Children are spawned: a fresh
interpreter imports the task modules itself, and inherits nothing by fork.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.connection import Connection

from . import child as child_mod
from .errors import BootError
from .poller import readable

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


@dataclass(eq=False)
class Child:
    proc: multiprocessing.process.BaseProcess
    conn: Connection
    ready: bool = False
    tokens: deque = field(default_factory=deque)  # jobs handed to it, the running one first
    jobs_done: int = 0
    retiring: bool = False          # gets no more jobs; retired once it has none
    stopping: bool = False          # its pipe is closed: it exits
    boot_error: str | None = None
    progress: object = None         # shared word: the token of the job it is running
    asked: object = None            # shared word: set before we send it SIGTERM (see signal())
    doomed: bool = False            # we sent it a signal: its death is not a crash
    stalled: bool = False           # gave back its other jobs while a long one runs
    generation: int = 0             # SIGHUP starts a new one: fresh imports of the code

    @property
    def pid(self) -> int:
        return self.proc.pid or 0

    @property
    def token(self) -> int | None:  # the job it runs now
        return self.tokens[0] if self.tokens else None


# Events the supervisor receives from poll().
@dataclass
class Done:
    token: int
    msg: bytes
    pid: int


@dataclass
class Died:
    tokens: list[int]       # every job it held and had not answered, in order
    pid: int
    exitcode: int | None
    description: str
    running: int | None = None   # the one it was running when it died, if any
    doomed: bool = False         # we killed it (a timeout): no job of it crashed it

    @property
    def token(self) -> int | None:
        return self.running


@dataclass
class BootFailed:
    pid: int
    message: str
    import_error: bool = True   # False: it died (was killed) before it could say why
    generation: int = 0         # of the child (a reload's, or an older one's)


@dataclass
class Ready:
    pid: int
    generation: int = 0


@dataclass
class Returned:
    """A child gave back the jobs it held and had not started (its batch ran long)."""
    pid: int
    tokens: list[int]


@dataclass
class Started:
    """The job's own timeout (its field or task option differs from the default)."""
    token: int
    timeout: float


def _retire_order(c: Child) -> tuple:
    """Which child to retire first: the one holding the least work."""
    return (len(c.tokens), c.jobs_done)


def describe_exit(exitcode: int | None, stopped: bool = False) -> str:
    """Say honestly how a child ended (gunicorn's reap_workers does the same); a SIGKILL
    of one we ``stopped`` (a timeout) is ours, not the out-of-memory killer's."""
    if exitcode is None:
        return "vanished (exit status unknown)"
    if exitcode < 0:
        sig = -exitcode
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = f"signal {sig}"
        text = f"was killed by {name} (signal {sig})"
        if sig == signal.SIGKILL and stopped:
            text += " after it had not stopped at SIGTERM"
        elif sig == signal.SIGKILL:
            text += "; if nobody sent it, the kernel's out-of-memory killer probably did"
        elif sig == signal.SIGSEGV:
            text += " (a segmentation fault, usually in a C extension)"
        return text
    return f"exited with code {exitcode}"


@dataclass
class ProcessPool:
    size: int
    modules: list[str]
    worker: str
    max_payload: int
    namespace: str = "redpool"
    defaults: dict = field(default_factory=dict)   # runner.Policy fields for the children
    max_result_size: int = child_mod.p.DEFAULT_MAX_RESULT_SIZE   # --max-result-size
    children: list[Child] = field(default_factory=list)
    respawn_backoff: float = 0.0
    next_spawn_at: float = 0.0
    generation: int = 0   # the children to have; older ones are replaced (a reload)

    def __post_init__(self) -> None:
        self.ctx = multiprocessing.get_context("spawn")
        self._sys_path = [os.getcwd(), *sys.path]

    # -- lifecycle ---------------------------------------------------------------------------

    def spawn(self) -> Child:
        parent_conn, child_conn = self.ctx.Pipe(duplex=True)
        progress, asked = self.ctx.RawValue("L", 0), self.ctx.RawValue("B", 0)
        proc = self.ctx.Process(
            target=child_mod.main, name="redpool-child", daemon=True,
            args=(child_conn, self.modules, os.getpid(), self.worker, self.max_payload,
                  self._sys_path, self.namespace, self.defaults, progress, asked,
                  self.max_result_size))
        proc.start()
        child_conn.close()
        c = Child(proc, parent_conn, progress=progress, asked=asked, generation=self.generation)
        self.children.append(c)
        return c

    def start(self, timeout: float = 120.0) -> None:
        """Boot ``size`` children and wait until every one is ready.  A child that
        cannot import the task modules stops the start-up: BootError, never a
        respawn loop."""
        for _ in range(self.size):
            self.spawn()
        deadline = time.monotonic() + timeout
        deaths = 0
        while not all(c.ready for c in self.children) or len(self.children) < self.size:
            left = deadline - time.monotonic()
            if left <= 0:
                self.kill_all()
                raise BootError(f"pool children did not boot within {timeout:.0f} s")
            ready = multiprocessing.connection.wait(self.waitables(), timeout=left)
            for ev in self.poll(ready):
                if isinstance(ev, BootFailed) and ev.import_error:
                    self.kill_all()
                    raise BootError(ev.message)  # the child's own words (boot.py)
                if isinstance(ev, BootFailed):
                    # killed while booting (by an operator, or the OOM killer): that says
                    # nothing about the code; try again, a few times
                    deaths += 1
                    if deaths > 3 * self.size:
                        self.kill_all()
                        raise BootError(f"pool children keep dying while booting; the last "
                                        f"one {ev.message}")
                    self.spawn()

    def reconcile(self, now: float) -> list[Child]:
        """Bring the pool to ``size`` live children of the current generation: replace
        the dead and the retiring, let retiring children that are done go, and retire
        the surplus (after a resize down, or old children once a reload's successors
        are ready).  Returns the children spawned."""
        if len(self.children) == self.size and all(
                c.generation == self.generation and not c.retiring for c in self.children):
            return []  # the usual case, on every loop iteration: nothing to do
        for c in self.children:
            if c.retiring and not c.tokens and not c.stopping:
                self.retire(c)
        spawned = []
        live = [c for c in self.children if not c.stopping and not c.retiring]
        current = [c for c in live if c.generation == self.generation]
        if len(current) < self.size and now >= self.next_spawn_at:
            for _ in range(self.size - len(current)):
                spawned.append(self.spawn())
        # Old children work on until successors are ready: one goes per ready successor.
        old = [c for c in live if c.generation != self.generation]
        ready = [c for c in current if c.ready]
        surplus = sorted(old, key=_retire_order)[:max(0, len(old) + len(ready) - self.size)]
        # Too many of the current generation (resized down): ready ones go, idle first;
        # a booting one would only die mid-import, so it waits for its turn.
        surplus += sorted(ready, key=_retire_order)[:max(0, len(current) - self.size)]
        for c in surplus:
            self.retire(c)
        return spawned

    def resize(self, size: int) -> None:
        """Run ``size`` children from now on (at least 1).  Added ones are spawned and
        surplus ones retired by reconcile(); a retired child finishes what it holds."""
        self.size = max(1, size)

    def reload(self) -> None:
        """Replace every child by a fresh one that imports the task modules anew.  The
        old ones keep working until their successors are ready, then finish what
        they hold and exit: no job is dropped or run twice."""
        self.generation += 1
        self.next_spawn_at = 0.0
        self.respawn_backoff = 0.0

    @property
    def reloading(self) -> bool:
        """Children of an older generation are still at work."""
        return any(c.generation != self.generation and not c.stopping for c in self.children)

    def abort_reload(self) -> None:
        """The new code does not import: the new children go (those still booting at
        once, those that booted after what they hold), the old ones carry on as the
        current generation.  Old ones already leaving are replaced as any child is
        (importing what is on disk now: if that fails too, with the usual backoff)."""
        for c in self.children:
            if c.generation != self.generation:
                c.retiring = c.retiring and c.stopping    # not retired after all
            elif not c.ready and not c.stopping:
                c.stopping = True
                c.conn.close()
                if c.proc.is_alive():
                    c.proc.kill()
            elif c.ready:
                self.retire(c)
            c.generation = self.generation

    # -- feeding -----------------------------------------------------------------------------

    def accepting(self) -> list[Child]:
        """Children that may be handed jobs (booted, not being retired)."""
        return [c for c in self.children if c.ready and not c.retiring and not c.stopping]

    def busy(self) -> list[Child]:
        return [c for c in self.children if c.tokens]

    def send(self, c: Child, tokens: list[int], msg: bytes) -> None:
        """Hand a child a batch of jobs (child.encode_batch); it runs them in order."""
        c.tokens.extend(tokens)
        try:
            c.conn.send_bytes(msg)
        except OSError:
            pass  # it died under us; poll() reports the death with these tokens

    def retire(self, c: Child) -> None:
        """Replace a child (too many jobs, too much memory) once it has finished what
        it holds: it exits when its pipe closes; reconcile() starts its successor."""
        c.retiring = True
        if not c.tokens:
            c.stopping = True
            c.conn.close()

    @staticmethod
    def signal(c: Child, sig: int) -> None:
        if sig == signal.SIGTERM and c.asked is not None:
            c.asked.value = 1  # first: a child ignores a SIGTERM we did not ask for
        try:
            os.kill(c.pid, sig)
        except ProcessLookupError:
            pass

    @staticmethod
    def rss(c: Child) -> int | None:
        """Resident set size of a child in bytes (Linux /proc), or None if unknown."""
        try:
            with open(f"/proc/{c.pid}/statm", "rb") as f:
                return int(f.read().split()[1]) * PAGE_SIZE
        except (OSError, ValueError, IndexError):
            return None

    def waitables(self) -> list:
        out: list = []
        for c in self.children:
            if not c.conn.closed:  # a retired child's pipe is closed; its sentinel remains
                out.append(c.conn)
            out.append(c.proc.sentinel)
        return out

    # -- collecting --------------------------------------------------------------------------

    def poll(self, ready: list) -> list:
        """Turn ready pipes and process sentinels into events.  Every message a child
        sent before it died is read before its death is reported."""
        ready_conns = {id(x) for x in ready if not isinstance(x, int)}
        ready_fds = {x for x in ready if isinstance(x, int)}
        events: list = []
        for c in list(self.children):
            dead = c.proc.sentinel in ready_fds
            if not dead and id(c.conn) not in ready_conns:
                continue
            try:
                while not c.conn.closed and readable(c.conn.fileno()):
                    self._read(c, c.conn.recv_bytes(), events)
            except (EOFError, OSError):
                dead = True
            if dead:
                c.proc.join(timeout=5)
                self.children.remove(c)
                c.conn.close()
                if c.stopping and not c.tokens and (c.proc.exitcode == 0 or not c.ready):
                    continue  # retired on request, or a reload's child we stopped booting
                if c.boot_error is not None or not c.ready:
                    # a replacement that cannot import the task modules is retried with
                    # backoff, not in a loop; one killed while booting, after a short pause
                    if c.boot_error is not None:
                        self.respawn_backoff = min(30.0, max(1.0, self.respawn_backoff * 2))
                    else:
                        self.respawn_backoff = 0.5
                    self.next_spawn_at = time.monotonic() + self.respawn_backoff
                    events.append(BootFailed(c.pid, c.boot_error or describe_exit(c.proc.exitcode),
                                             import_error=c.boot_error is not None,
                                             generation=c.generation))
                else:
                    running = c.progress.value if c.progress is not None else None
                    if running not in c.tokens:  # between jobs, or no shared word
                        running = c.tokens[0] if c.tokens and c.progress is None else None
                    why = describe_exit(c.proc.exitcode, c.doomed)
                    events.append(Died(list(c.tokens), c.pid, c.proc.exitcode, why, running,
                                       c.doomed))
        return events

    def _read(self, c: Child, msg: bytes, events: list) -> None:
        kind = msg[:1]
        if kind == child_mod.MSG_DONE_MANY:
            for one in child_mod.split_many(msg):
                self._read(c, one, events)
        elif kind == child_mod.MSG_DONE:
            token = c.tokens.popleft() if c.tokens else -1
            c.jobs_done += 1
            events.append(Done(token, msg, c.pid))
        elif kind == child_mod.MSG_RETURNED:
            tokens = child_mod.decode_returned(msg)
            for t in tokens:
                c.tokens.remove(t)
            events.append(Returned(c.pid, tokens))
        elif kind == child_mod.MSG_STARTED:
            token, timeout = child_mod.STARTED.unpack_from(msg, 1)
            events.append(Started(token, timeout))
        elif kind == child_mod.MSG_READY:
            c.ready = True
            self.respawn_backoff = 0.0
            events.append(Ready(c.pid, c.generation))
        elif kind == child_mod.MSG_BOOT_ERROR:
            c.boot_error = msg[1:].decode("utf-8", "replace")

    # -- stopping ----------------------------------------------------------------------------

    def terminate(self, grace: float = 2.0) -> None:
        """SIGTERM every child, then SIGKILL those still alive after ``grace``."""
        for c in self.children:
            if c.proc.is_alive():
                self.signal(c, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for c in self.children:
            c.proc.join(max(0.0, deadline - time.monotonic()))
        self.kill_all()

    def close(self, timeout: float = 2.0) -> None:
        """Let idle children exit on their own (EOF on their pipe), then kill stragglers."""
        for c in self.children:
            c.conn.close()  # idempotent
        deadline = time.monotonic() + timeout
        for c in self.children:
            c.proc.join(max(0.0, deadline - time.monotonic()))
        self.kill_all()

    def kill_all(self) -> None:
        for c in self.children:
            if c.proc.is_alive():
                c.proc.kill()
        for c in self.children:
            c.proc.join(5)
            if not c.conn.closed:
                c.conn.close()
        self.children.clear()
