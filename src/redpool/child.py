"""What runs inside a pool process.

A child boots (imports the task modules, runs the init hooks), says it is ready,
then loops: read a job's raw bytes from its pipe, decode and validate them, run the
task, encode the envelope, send the outcome back.  All protocol work happens here,
so the supervisor only moves bytes.  Everything a job can get wrong becomes an
outcome; nothing a job does can end this loop except killing the process.
"""

from __future__ import annotations

import importlib
import logging
import math
import os
import signal
import struct
import sys
import threading
import time

from . import boot, logs
from . import protocol as p
from .leftovers import Leftovers
from .lifeline import StopWhenAsked, die_with_parent
from .poller import readable
from .registry import default_registry
from .runner import Outcome, Policy, Runner
from .signals import unblock
from .titles import ChildTitle

# supervisor -> child: a batch of jobs, run in order, each answered with its own D
MSG_BATCH = b"B"       # B + !Hd(count, return_after) + entries
#   entry: !cIIHHI(kind, token, crashes, len(queue), len(error), len(raw)) + queue + error + raw
#   kind J: run the job; kind F: fail it (error: JSON {type, message, retry, dead,
#   started_at, ran}: when the stopped run started, unix seconds or null, and how long it ran)
# child -> supervisor
MSG_READY = b"R"       # R
MSG_BOOT_ERROR = b"E"  # E + utf-8 message
MSG_STARTED = b"S"     # S + !Id(token, timeout): the job's timeout differs from the default
MSG_DONE = b"D"        # D + !IIII(len(meta), len(envelope), len(dead), len(retry)) + parts
MSG_DONE_MANY = b"M"   # M + !H(count) + (!I(len) + a D message) * count
MSG_RETURNED = b"U"    # U + !H(count) + !I(token) * count: not started, given back

# A batch is sized from the jobs seen so far; if it turns out to take much longer
# (the jobs changed: a long one among short ones), the child gives back every job it
# holds and has not started (the rest of the batch, and batches waiting in its pipe),
# so that none waits behind a long job for a process that is free, here or on another
# host.  It looks between jobs, and from a helper thread while a job runs.  The
# supervisor sends the threshold with each batch: this, or a few times the average
# job if that is longer, so that jobs of 20-100 ms keep their next one at hand.
RETURN_AFTER_SECONDS = 0.02
# While no job runs, the helper thread looks only this often, rather than be woken for
# each job that comes: on a worker whose jobs come one by one, a wake-up per job cost
# each ~90 us of CPU (GIL and lock handed back and forth), and a look every 20 ms still
# ~15 us.  A job that starts meanwhile and runs long is seen at the next look: what it
# holds goes back within about this, not RETURN_AFTER_SECONDS.
IDLE_LOOK_SECONDS = 0.1

# Answers to short jobs are sent together, at the end of a batch or once the oldest
# has waited this long: one pipe message (and one supervisor wake-up) for many jobs.
FLUSH_SECONDS = 0.002

BATCH_HEADER = struct.Struct("!H")
BATCH = struct.Struct("!Hd")
ENTRY = struct.Struct("!cIIHHI")
STARTED = struct.Struct("!Id")
LENGTH = struct.Struct("!I")
DONE_HEADER = struct.Struct("!IIII")

def job_entry(token: int, queue: str, raw: bytes, crashes: int = 0) -> bytes:
    q = queue.encode()
    return ENTRY.pack(b"J", token, crashes, len(q), 0, len(raw)) + q + raw


def fail_entry(token: int, queue: str, raw: bytes, crashes: int, error_type: str,
               message: str, *, retry: bool, dead: bool, started_at: float | None = None,
               ran: float | None = None) -> bytes:
    q = queue.encode()
    err = p.dumps({"type": error_type, "message": message, "retry": retry, "dead": dead,
                   "started_at": started_at, "ran": ran})
    return ENTRY.pack(b"F", token, crashes, len(q), len(err), len(raw)) + q + err + raw


def encode_batch(entries: list[bytes], return_after: float = RETURN_AFTER_SECONDS) -> bytes:
    """``return_after``: seconds after which the jobs not started go back (see above)."""
    return MSG_BATCH + BATCH.pack(len(entries), return_after) + b"".join(entries)


def return_after_of(msg: bytes) -> float:
    return BATCH.unpack_from(msg, 1)[1]


def decode_batch(msg: bytes):
    """Yield (kind, token, crashes, queue, error or None, raw) for each entry."""
    (count, _) = BATCH.unpack_from(msg, 1)
    o = 1 + BATCH.size
    for _ in range(count):
        kind, token, crashes, lq, le, lr = ENTRY.unpack_from(msg, o)
        o += ENTRY.size
        queue = msg[o:o + lq].decode()
        o += lq
        error = p.loads(msg[o:o + le]) if le else None
        o += le
        yield kind, token, crashes, queue, error, msg[o:o + lr]
        o += lr


def encode_done(token: int, out: Outcome) -> bytes:
    out.meta["t"] = token
    try:
        meta = p.dumps(out.meta)
    except Exception:  # (a bug of ours: the Runner builds meta of plain values; but a job
        # whose answer cannot be sent would wait for ever)
        meta = p.dumps({str(k): _plain(v) for k, v in out.meta.items()})
    env, dead, retry = out.envelope or b"", out.dead or b"", out.retry or b""
    return (MSG_DONE + DONE_HEADER.pack(len(meta), len(env), len(dead), len(retry))
            + meta + env + dead + retry)


def _plain(v):
    if v is None or type(v) in (str, int, bool):
        return v
    if type(v) is float:
        return v if math.isfinite(v) else 0.0
    return repr(v)


def encode_many(dones: list[bytes]) -> bytes:
    if len(dones) == 1:
        return dones[0]
    return MSG_DONE_MANY + BATCH_HEADER.pack(len(dones)) + b"".join(
        LENGTH.pack(len(d)) + d for d in dones)


#: Parts of an answer up to this size are copied out as bytes; a larger one (a big
#: result) stays a view into the message, which goes to Redis as it is (redis-py writes
#: a memoryview without copying it): the supervisor holds one copy of it, not three.
VIEW_OVER = 65536


def split_many(msg: bytes):
    """The D messages of an M message: views into it, not copies (an answer may be
    megabytes)."""
    (count,) = BATCH_HEADER.unpack_from(msg, 1)
    o = 1 + BATCH_HEADER.size
    view = memoryview(msg)
    for _ in range(count):
        (n,) = LENGTH.unpack_from(msg, o)
        o += LENGTH.size
        yield view[o:o + n] if n > VIEW_OVER else msg[o:o + n]
        o += n


def decode_returned(msg: bytes) -> list[int]:
    (count,) = BATCH_HEADER.unpack_from(msg, 1)
    o = 1 + BATCH_HEADER.size
    return [LENGTH.unpack_from(msg, o + LENGTH.size * i)[0] for i in range(count)]


def decode_done(msg, views: bool = False) -> tuple[dict, bytes | None, bytes | None, bytes | None]:
    """(meta, envelope, dead-letter entry, retry) of a D message (bytes, a bytearray or
    a view): each part bytes, or None if empty; ``views``: a part over VIEW_OVER is a
    memoryview into ``msg`` instead (the supervisor's way: no copy)."""
    lm, le, ld, lr = DONE_HEADER.unpack_from(msg, 1)
    o = 1 + DONE_HEADER.size
    if msg.__class__ is bytes and (not views or len(msg) <= VIEW_OVER):  # (the usual: small)
        meta = p.loads(msg[o:o + lm])
        o += lm
        return (meta, msg[o:o + le] or None, msg[o + le:o + le + ld] or None,
                msg[o + le + ld:o + le + ld + lr] or None)
    view = memoryview(msg)
    meta = p.loads(bytes(view[o:o + lm]))
    o += lm
    parts = []
    for n in (le, ld, lr):
        parts.append(None if not n else view[o:o + n] if views and n > VIEW_OVER
                     else bytes(view[o:o + n]))
        o += n
    env, dead, retry = parts
    return meta, env, dead, retry


def main(conn, modules: list[str], parent_pid: int, worker: str, max_payload: int,
         sys_path: list[str], namespace: str = p.DEFAULT_NAMESPACE,
         defaults: dict | None = None, progress=None, asked=None,
         max_result_size: int = p.DEFAULT_MAX_RESULT_SIZE) -> None:
    """Entry point of a pool child (multiprocessing spawn target).  ``progress``: the
    shared word we write the running job's token into; ``asked``: the one the supervisor
    sets before it sends us SIGTERM; ``max_result_size``: --max-result-size (a larger
    result never leaves this process: the job fails with ResultTooLarge)."""
    # Signals for the worker are the supervisor's to act on, not ours: it decides what
    # happens to running jobs (they finish within --grace).  honcho and foreman send
    # SIGTERM to the worker's process group: a child leaves it, so that signal reaches
    # the supervisor alone (we still die with it: die_with_parent).  Heroku's dyno
    # manager sends SIGTERM to every process by pid: that one we ignore, unless the
    # supervisor asked (StopWhenAsked).  Ctrl-C in a terminal reaches the foreground
    # group only: ignored too, should we be in it after all.
    try:
        os.setpgid(0, 0)
    except OSError:
        pass  # already a group leader (cannot happen for a spawned child)
    keep_to_ourselves()
    forked: list = []   # not empty in a copy a task forked (a flag: no syscall per job)
    os.register_at_fork(after_in_child=lambda: forked.append(True))
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    stop = StopWhenAsked(asked)
    unblock()   # the signals the supervisor blocks (signals.py): ours again, handled above
    die_with_parent(parent_pid, stop)
    sys.path[:0] = [x for x in sys_path if x not in sys.path]
    registry = default_registry
    mod = hook = None
    try:
        for mod in modules:
            importlib.import_module(mod)
        mod = None
        for hook in registry.child_init:
            hook()
    except BaseException as e:
        # one line for a module that is not there; the traceback for one that raised
        name = getattr(hook, "__qualname__", None) and f"{hook.__module__}.{hook.__qualname__}"
        message = boot.describe(e, mod, name)
        conn.send_bytes(MSG_BOOT_ERROR + message.encode("utf-8", "replace"))
        os._exit(3)
    stop.adopt()  # a handler the task modules or hooks installed
    logs.configure_child()  # task code's logging in the worker's format, unless it has its own
    conn.send_bytes(MSG_READY)
    policy = Policy(**(defaults or {}))
    runner = Runner(registry, worker, max_payload, namespace, policy, max_result_size)
    mailbox = Mailbox(conn)
    leftovers = Leftovers()   # what a job changes in this process, put back after it
    # ps shows what we run: a thread retitles us once a second from the two attributes
    # set per job below (negligible per job; see titles.py)
    title = ChildTitle(worker, registry.tasks).start()
    while True:
        entry = mailbox.receive()
        while entry is not None:
            kind, token, crashes, queue, err, raw = entry
            # The supervisor reads this shared word when we die: the crash is pinned on
            # exactly the job that was running, never on the rest of the batch.
            if progress is not None:
                progress.value = token
            t0 = time.perf_counter()
            title.since = t0
            title.raw = raw
            if kind == b"J":
                def started(timeout: float, token=token) -> None:
                    if timeout != policy.timeout:
                        mailbox.send(MSG_STARTED + STARTED.pack(token, timeout))

                out = runner.run(queue, raw, crashes, on_start=started)
                if forked:
                    forked_copy_returned()
                try:
                    leftovers.reset()
                except Exception:  # (never expected) the job's answer must still go
                    logging.getLogger("redpool").exception(
                        "could not put back what a job left behind (a bug in redpool)")
            else:
                out = runner.fail(queue, raw, crashes, err["type"], err["message"],
                                  retry=err["retry"], dead=err["dead"],
                                  started_at=err.get("started_at"), ran=err.get("ran"))
            entry = mailbox.next(encode_done(token, out), t0)
        if progress is not None:
            progress.value = 0
        title.raw = None
        stop.adopt()  # (a job may have installed one)


def keep_to_ourselves() -> None:
    """What we inherited from multiprocessing (our pipe, the write end of its sentinel,
    the resource tracker's pipe, the shared memory of our two words) stays ours: no
    program a task runs (``os.system``, ``subprocess`` with ``close_fds=False``)
    inherits it.  A fork keeps every descriptor anyway: the supervisor relies on none
    of these to learn of our death (procwatch.py)."""
    try:
        fds = [int(fd) for fd in os.listdir("/dev/fd")]
    except (OSError, ValueError):
        return
    for fd in fds:
        if fd > 2:
            try:
                os.set_inheritable(fd, False)
            except OSError:
                pass  # the listing's own descriptor, closed by now


def forked_copy_returned() -> None:
    """A task forked and its copy returned from the task, as the task itself: it must
    not answer the job again, nor take jobs from our pipe.  It ends here, quietly (a
    forked process should end with os._exit)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    os._exit(0)


class Mailbox:
    """Our end of the pipe, shared by the main thread (which runs jobs) and a helper
    thread, under one lock that orders every message we send.

    Answers of short jobs go together: at the end of a batch, or once the oldest has
    waited FLUSH_SECONDS (so an answer never waits for a long job that follows it in the
    batch).  The answer to a job that itself took FLUSH_SECONDS or more goes at once.

    Jobs not started yet (the rest of the batch, and batches still in the pipe) go back
    to the supervisor once the batch has run past its ``return_after``: between jobs
    (the main thread), and while a job runs (the helper thread, which looks again every
    ``return_after`` for batches sent meanwhile).  Taking the next job and giving back
    the rest happen under the lock: a job is either started or given back, never both."""

    def __init__(self, conn) -> None:
        self.conn = conn
        self.buf: list[bytes] = []
        self.first = 0.0
        self.batch: list = []
        self.pos = 0                   # the next entry of the batch to start
        self.batch_start = 0.0
        self.return_after = RETURN_AFTER_SECONDS
        self.running = 0.0             # when the running job started; 0: none runs
        self.last_start = 0.0          # when the last job started (running or not)
        self.eof = False               # the supervisor closed the pipe
        self.helper_idle = False       # the helper waits with no deadline: wake it
        self.cv = threading.Condition(threading.Lock())
        threading.Thread(target=self._helper, name="redpool-mailbox", daemon=True).start()

    # -- the main thread ---------------------------------------------------------------------

    def receive(self):
        """Wait for the next batch and start its first job (exit when the pipe closes)."""
        try:
            msg = self.conn.recv_bytes()   # only we read, while no job runs
        except (EOFError, OSError):
            os._exit(0)  # the supervisor is gone or closed our pipe: nothing left to do
        if msg[:1] != MSG_BATCH:
            return None
        with self.cv:
            self.batch = list(decode_batch(msg))
            self.pos = 0
            self.return_after = return_after_of(msg)
            self.batch_start = time.perf_counter()
            return self._take(self.batch_start) if self.batch else None

    def next(self, done: bytes, since: float):
        """Answer the job that ran (``done``, started at ``since``) and start the next
        one of the batch, if it is still ours; None when there is none."""
        with self.cv:
            now = time.perf_counter()
            self.buf.append(done)
            if self.pos and self.pos < len(self.batch) \
                    and now - self.batch_start > self.return_after:
                self._give_back()
            if self.pos >= len(self.batch):
                self.running = 0.0
                self._flush()   # the last of a batch goes at once: no thread to wake
                return None
            if len(self.buf) == 1:
                self.first = now
            if now - since >= FLUSH_SECONDS or now - self.first >= FLUSH_SECONDS:
                self._flush()
            elif len(self.buf) == 1:
                self.cv.notify()   # for the helper to send it, should the batch take long
            return self._take(now)

    def send(self, msg: bytes) -> None:
        with self.cv:
            self._flush()  # answers stay in order with this message
            self.conn.send_bytes(msg)

    def _take(self, now: float):
        entry = self.batch[self.pos]
        self.pos += 1
        self.running = self.last_start = now
        if self.helper_idle:
            self.helper_idle = False
            self.cv.notify()
        return entry

    # -- under the lock, either thread -------------------------------------------------------

    def _flush(self) -> None:
        if self.buf:
            self.conn.send_bytes(encode_many(self.buf))
            self.buf.clear()

    def _give_back(self) -> None:
        """Every job we hold and have not started goes back: the rest of the batch, and
        the batches waiting in the pipe (the main thread reads it only while no job
        runs, and a job runs now)."""
        tokens = [e[1] for e in self.batch[self.pos:]]
        self.pos = len(self.batch)
        while not self.eof and readable(self.conn.fileno()):
            try:
                msg = self.conn.recv_bytes()
            except EOFError:
                self.eof = True   # (the main thread finds out after its job)
                break
            if msg[:1] == MSG_BATCH:
                tokens += [e[1] for e in decode_batch(msg)]
        if tokens:
            self._flush()  # answers stay before the jobs given back
            self.conn.send_bytes(MSG_RETURNED + BATCH_HEADER.pack(len(tokens))
                                 + b"".join(LENGTH.pack(t) for t in tokens))

    # -- the helper thread -------------------------------------------------------------------

    def _helper(self) -> None:
        seen = look_at = 0.0
        with self.cv:
            while True:
                now = time.perf_counter()
                wait = None
                try:
                    if self.buf:
                        wait = self.first + FLUSH_SECONDS - now
                        if wait <= 0:
                            self._flush()
                            continue
                    if self.running:
                        if self.running != seen:   # another job since we last looked
                            seen, look_at = self.running, self.running + self.return_after
                        if now >= look_at:
                            # this job has run long: nothing of ours waits behind it
                            self._give_back()
                            look_at = now + self.return_after  # batches may come meanwhile
                    else:
                        # no job now, but one may come soon: stay on a timer (see
                        # IDLE_LOOK_SECONDS) so that it need not wake us
                        look_at = self.last_start + IDLE_LOOK_SECONDS
                    if now < look_at:
                        wait = look_at - now if wait is None else min(wait, look_at - now)
                except OSError:
                    return  # the pipe is gone: the main thread finds out too
                self.helper_idle = wait is None
                self.cv.wait(wait)
