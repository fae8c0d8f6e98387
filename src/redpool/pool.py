"""The process side only: spawn, feed, collect, reap, kill.  Never touches Redis.

Each child has its own duplex pipe and runs one job at a time, so the supervisor
always knows which job a child holds: when a child dies, exactly that job fails and
nothing else is disturbed (multiprocessing.Pool's shared task queue loses track of a
dead worker's task and hangs forever, CPython gh-66587).  Children are spawned: a fresh
interpreter imports the task modules itself, and inherits nothing by fork.

Nothing here waits on a child: pipes are non-blocking (channel.py), a death is learnt
from the process itself (a pidfd, procwatch.py) and a child is reaped only once it
has exited.  Only the stopping paths (terminate, close, kill_all) wait, with a deadline.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import signal
import socket
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.connection import Connection

from . import child as child_mod
from .channel import Channel
from .errors import BootError
from .poolevents import BootFailed, Died, Done, Ready, Returned, Started
from .procwatch import (CHECK_SECONDS, CUT_OFF_SECONDS, describe_exit, exited, kill_group,
                        open_pidfd, wait_exited)
from .signals import reblock

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


@dataclass(eq=False)
class Child:
    proc: multiprocessing.process.BaseProcess
    chan: Channel                   # our end of its pipe
    pidfd: int | None = None        # the process itself: readable once it has exited
    watch: int | None = None        # what tells its death: the pidfd, else the sentinel
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
    lost_at: float = 0.0            # when its end of the pipe closed, it still alive
    cut_off: bool = False           # killed for living on without its pipe
    signalled_us: bool = False      # one of its tasks signalled the supervisor (said once)
    last_work: object = None        # the job it finished last (outcomes.job_done)

    @property
    def pid(self) -> int:
        return self.proc.pid or 0

    @property
    def reaped(self) -> bool:
        """Its exit status was collected: its pid, and its group's id, may be anyone's
        now.  (multiprocessing sets returncode when it reaps, and only then.)"""
        popen = getattr(self.proc, "_popen", None)
        return popen is not None and popen.returncode is not None

    @property
    def token(self) -> int | None:  # the job it runs now
        return self.tokens[0] if self.tokens else None


def _retire_order(c: Child) -> tuple:
    """Which child to retire first: the one holding the least work."""
    return (len(c.tokens), c.jobs_done)


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
    look_at: float = math.inf   # no pidfd: when to look at exit statuses next
    gone: dict = field(default_factory=dict)   # pid -> Child reaped since forget_gone()

    def __post_init__(self) -> None:
        self.ctx = multiprocessing.get_context("spawn")
        self._sys_path = [os.getcwd(), *sys.path]

    # -- lifecycle ---------------------------------------------------------------------------

    def spawn(self) -> Child:
        # (what multiprocessing.Pipe(duplex=True) makes; our end is a Channel)
        ours, theirs = socket.socketpair()
        child_conn = Connection(theirs.detach())
        progress, asked = self.ctx.RawValue("L", 0), self.ctx.RawValue("B", 0)
        proc = self.ctx.Process(
            target=child_mod.main, name="redpool-child", daemon=True,
            args=(child_conn, self.modules, os.getpid(), self.worker, self.max_payload,
                  self._sys_path, self.namespace, self.defaults, progress, asked,
                  self.max_result_size))
        try:
            proc.start()
        except BaseException:
            ours.close()
            raise
        finally:
            child_conn.close()
            reblock()
        # ours alone to reap: multiprocessing reaps its exited children at every start()
        # (and active_children()); one reaped behind our back could not be told from a
        # stranger that got its pid (kill() below)
        multiprocessing.process._children.discard(proc)
        pidfd = open_pidfd(proc.pid)
        c = Child(proc, Channel(ours.detach()), pidfd, proc.sentinel if pidfd is None else pidfd,
                  progress=progress, asked=asked, generation=self.generation)
        if pidfd is None:
            self.look_at = min(self.look_at, time.monotonic() + CHECK_SECONDS)
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
            ready = multiprocessing.connection.wait(
                self.waitables(), timeout=max(0.0, min(left, self.check_at - time.monotonic())))
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
                c.chan.close()
                self.kill(c, signal.SIGKILL)
            elif c.ready:
                self.retire(c)
            c.generation = self.generation

    # -- feeding -----------------------------------------------------------------------------

    def accepting(self) -> list[Child]:
        """Children that may be handed jobs (booted, not being retired)."""
        return [c for c in self.children
                if c.ready and not c.retiring and not c.stopping and not c.lost_at]

    def busy(self) -> list[Child]:
        return [c for c in self.children if c.tokens]

    def send(self, c: Child, tokens: list[int], msg: bytes) -> None:
        """Hand a child a batch of jobs (child.encode_batch); it runs them in order.
        Never blocks: what its pipe does not take now goes when it is writable."""
        c.tokens.extend(tokens)
        c.chan.send(msg)   # if it died under us, poll() reports the death with these tokens

    def writing(self) -> list[Channel]:
        """Pipes with something still to write: the loop polls them for POLLOUT too."""
        return [c.chan for c in self.children if c.chan.out]

    def retire(self, c: Child) -> None:
        """Replace a child (too many jobs, too much memory) once it has finished what
        it holds: it exits when its pipe closes; reconcile() starts its successor."""
        c.retiring = True
        if not c.tokens:
            c.stopping = True
            c.chan.close()

    @classmethod
    def signal(cls, c: Child, sig: int) -> None:
        """Signal a child and whatever its tasks started in its process group."""
        if sig == signal.SIGTERM and c.asked is not None:
            c.asked.value = 1  # first: a child ignores a SIGTERM we did not ask for
        cls.kill(c, sig)

    @staticmethod
    def kill(c: Child, sig: int) -> None:
        """kill_group, unless ``c`` was reaped: its pid may be another process's now."""
        if not c.reaped:
            kill_group(c.pid, sig)

    def owner(self, pids, pgid: int | None) -> Child | None:
        """The pool process ``pids`` (a process and its parents) or ``pgid`` (its group)
        name, alive or reaped since forget_gone(): a signal's sender is one of ours."""
        ours = {c.pid: c for c in self.children} | self.gone
        for pid in (*pids, pgid):
            if pid in ours:
                return ours[pid]
        return None

    def forget_gone(self) -> None:
        self.gone.clear()

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
            if not c.chan.closed:  # a retired child's pipe is closed; its pidfd remains
                out.append(c.chan)
            if c.watch is not None:
                out.append(c.watch)
        return out

    # -- collecting --------------------------------------------------------------------------

    def poll(self, ready: list) -> list:
        """Turn ready pipes and pidfds into events, and write what waits to be written.
        Every message a child sent before it died is read before its death is reported."""
        ready_ids = {id(x) for x in ready if not isinstance(x, int)}
        ready_fds = {x for x in ready if isinstance(x, int)}
        now = time.monotonic()
        look = self.look_at <= now   # no pidfd: look at every exit status now
        if look:
            self.look_at = now + CHECK_SECONDS
        events: list = []
        for c in list(self.children):
            if c.chan.out:
                c.chan.flush()
            fired = c.watch is not None and c.watch in ready_fds
            if c.pidfd is not None:
                dead = fired
            else:
                dead = (fired or look) and exited(c.pid, None)
                if fired and not dead:
                    c.watch = None  # a task closed the sentinel's write end: look instead
            if not (dead or id(c.chan) in ready_ids or c.chan.eof):
                continue
            for msg in c.chan.receive(drain=dead):
                self._read(c, msg, events)
            if dead:
                self._reaped(c, events)
            elif c.chan.eof and not c.lost_at:
                # Its end of the pipe closed: it is exiting, or a task closed its
                # descriptors and it can never answer again (see check_at)
                c.lost_at = now
                c.chan.close()
            elif c.lost_at and not c.cut_off and now >= c.lost_at + CUT_OFF_SECONDS:
                c.cut_off = True   # killed; its death comes through the pidfd as any
                self.kill(c, signal.SIGKILL)
        if look and all(c.pidfd is not None for c in self.children):
            self.look_at = math.inf
        return events

    @property
    def check_at(self) -> float:
        """When poll() must run even if nothing is ready: to look at exit statuses (no
        pidfd), or to kill a child still alive CUT_OFF_SECONDS after its pipe closed."""
        t = self.look_at
        for c in self.children:
            if c.lost_at and not c.cut_off:
                t = min(t, c.lost_at + CUT_OFF_SECONDS)
        return t

    def _reaped(self, c: Child, events: list) -> None:
        """``c`` has exited: what it left in its group dies with it (before it is reaped,
        while its pid, and so its group's id, are still its own), then its event."""
        self.kill(c, signal.SIGKILL)
        exitcode = c.proc.exitcode   # reaps it (no wait: it has exited)
        self.gone[c.pid] = c
        self.children.remove(c)
        c.chan.close()
        if c.pidfd is not None:
            os.close(c.pidfd)
        if c.stopping and not c.tokens and (exitcode == 0 or not c.ready):
            return  # retired on request, or a reload's child we stopped booting
        if c.boot_error is not None or not c.ready:
            # a replacement that cannot import the task modules is retried with
            # backoff, not in a loop; one killed while booting, after a short pause
            if c.boot_error is not None:
                self.respawn_backoff = min(30.0, max(1.0, self.respawn_backoff * 2))
            else:
                self.respawn_backoff = 0.5
            self.next_spawn_at = time.monotonic() + self.respawn_backoff
            why = c.boot_error or describe_exit(exitcode, cut_off=c.cut_off)
            events.append(BootFailed(c.pid, why, import_error=c.boot_error is not None,
                                     generation=c.generation))
            return
        running = c.progress.value if c.progress is not None else None
        if running not in c.tokens:  # between jobs, or no shared word
            running = c.tokens[0] if c.tokens and c.progress is None else None
        why = describe_exit(exitcode, c.doomed, c.cut_off)
        events.append(Died(list(c.tokens), c.pid, exitcode, why, running, c.doomed))

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
        """SIGTERM every child (and its group), then SIGKILL what is left after ``grace``."""
        for c in self.children:
            self.signal(c, signal.SIGTERM)
        wait_exited([(c.pid, c.pidfd) for c in self.children], time.monotonic() + grace)
        self.kill_all()

    def close(self, timeout: float = 2.0) -> None:
        """Let idle children exit on their own (EOF on their pipe), then kill stragglers."""
        for c in self.children:
            c.chan.close()  # idempotent
        wait_exited([(c.pid, c.pidfd) for c in self.children], time.monotonic() + timeout)
        self.kill_all()

    def kill_all(self) -> None:
        """SIGKILL every child and its group; reap those that are gone within 5 s."""
        for c in self.children:
            self.kill(c, signal.SIGKILL)
        wait_exited([(c.pid, c.pidfd) for c in self.children], time.monotonic() + 5.0)
        for c in self.children:
            if exited(c.pid, c.pidfd):
                c.proc.exitcode  # reaps it
                self.gone[c.pid] = c
            c.chan.close()
            if c.pidfd is not None:
                os.close(c.pidfd)
        self.children.clear()
