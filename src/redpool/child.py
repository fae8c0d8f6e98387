"""What runs inside a pool process.

A child boots (imports the task modules, runs the init hooks), says it is ready,
then loops: read a job's raw bytes from its pipe, decode and validate them, run the
task, encode the envelope, send the outcome back.  All protocol work happens here,
so the supervisor only moves bytes.  Everything a job can get wrong becomes an
outcome; nothing a job does can end this loop except killing the process.
"""

from __future__ import annotations

import ctypes
import importlib
import os
import signal
import struct
import sys
import threading
import time
import traceback

from . import protocol as p
from .registry import JobInfo, Registry, Task, _current, default_registry

# supervisor -> child
MSG_JOB = b"J"      # J + !IH(token, len(queue)) + queue + raw job
# child -> supervisor
MSG_READY = b"R"    # R
MSG_BOOT_ERROR = b"E"  # E + utf-8 message
MSG_DONE = b"D"     # D + !III(len(meta), len(envelope), len(dead)) + meta + envelope + dead

JOB_HEADER = struct.Struct("!IH")
DONE_HEADER = struct.Struct("!III")

PR_SET_PDEATHSIG = 1


def encode_job_msg(token: int, queue: str, raw: bytes) -> bytes:
    q = queue.encode()
    return MSG_JOB + JOB_HEADER.pack(token, len(q)) + q + raw


def decode_done(msg: bytes) -> tuple[dict, bytes | None, bytes | None]:
    lm, le, ld = DONE_HEADER.unpack_from(msg, 1)
    o = 1 + DONE_HEADER.size
    meta = p.loads(msg[o:o + lm])
    env = msg[o + lm:o + lm + le] or None
    dead = msg[o + lm + le:o + lm + le + ld] or None
    return meta, env, dead


def main(conn, modules: list[str], parent_pid: int, worker: str, max_payload: int,
         sys_path: list[str], namespace: str = p.DEFAULT_NAMESPACE) -> None:
    """Entry point of a pool child (multiprocessing spawn target)."""
    _die_with_parent(parent_pid)
    # Ctrl-C in a terminal reaches the whole process group: the supervisor decides
    # what to do with running jobs, not the children.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    sys.path[:0] = [x for x in sys_path if x not in sys.path]
    registry = default_registry
    try:
        for mod in modules:
            importlib.import_module(mod)
        for hook in registry.child_init:
            hook()
    except BaseException:
        conn.send_bytes(MSG_BOOT_ERROR + traceback.format_exc().encode("utf-8", "replace"))
        os._exit(3)
    conn.send_bytes(MSG_READY)
    runner = Runner(registry, worker, max_payload, namespace)
    while True:
        try:
            msg = conn.recv_bytes()
        except (EOFError, OSError):
            os._exit(0)  # the supervisor is gone or closed our pipe: nothing left to do
        if msg[:1] != MSG_JOB:
            continue
        token, qlen = JOB_HEADER.unpack_from(msg, 1)
        o = 1 + JOB_HEADER.size
        queue = msg[o:o + qlen].decode()
        conn.send_bytes(runner.run(token, queue, msg[o + qlen:]))


class Runner:
    def __init__(self, registry: Registry, worker: str, max_payload: int,
                 namespace: str = p.DEFAULT_NAMESPACE) -> None:
        self.registry = registry
        self.worker = worker
        self.max_payload = max_payload
        self.own_prefix = f"{namespace}:"
        self.reply_prefix = p.Keys(namespace).reply("")

    def run(self, token: int, queue: str, raw: bytes) -> bytes:
        started = time.time()
        t0 = time.perf_counter()
        try:
            job = p.decode_job(raw, self.max_payload)
            t = self._check(job)
        except p.InvalidJob as bad:
            return self._invalid(token, queue, raw, bad, started, t0)

        base = dict(id=job.id, task=job.task, queue=queue, worker=self.worker,
                    enqueued_at=job.enqueued_at, started_at=started)
        ctx_token = _current.set(JobInfo(job.id, job.task, queue, 1, self.worker))
        try:
            result = t.fn(*job.args, **job.kwargs)
        except BaseException as e:  # a task calling sys.exit() fails its job, not the child
            env = p.envelope(status=p.FAILED, error=p.error_dict(
                _type_name(e), str(e), traceback.format_exc()), **base)
            return self._done(token, job, p.FAILED, _type_name(e), env, None, t0)
        finally:
            _current.reset(ctx_token)
        try:
            env_bytes = p.dumps(p.envelope(status=p.SUCCEEDED, result=result, **base))
        except (TypeError, ValueError, RecursionError) as e:
            reason = (f"result of task {job.task!r} is not JSON-serialisable ({e}); "
                      "return only dicts, lists, strings, numbers, booleans and None")
            env = p.envelope(status=p.FAILED, error=p.error_dict(p.E_UNSERIALIZABLE_RESULT, reason), **base)
            dead = p.dead_entry(raw, queue=queue, reason=reason, error_type=p.E_UNSERIALIZABLE_RESULT,
                                worker=self.worker, job_id=job.id)
            return self._done(token, job, p.FAILED, p.E_UNSERIALIZABLE_RESULT, env, dead, t0)
        return self._pack(token, job.id, job.task, p.SUCCEEDED, None, _result_id(job),
                          job.result_ttl, job.reply_to, env_bytes, None, t0)

    def _check(self, job: p.Job) -> Task:
        """The registered task for ``job``, or InvalidJob saying what to fix."""
        known = dict(job_id=None if job.id_assigned else job.id, result_ttl=job.result_ttl,
                     task=job.task, enqueued_at=job.enqueued_at)
        rt = job.reply_to
        if self._own_key(rt):
            raise p.InvalidJob(f"'reply_to' {rt!r} is one of redpool's own keys: use a key "
                               f"outside the {self.own_prefix!r} namespace, or "
                               f"{self.reply_prefix}<anything>", reply_to=rt, **known)
        t = self.registry.get(job.task)
        if t is None:
            names = self.registry.names()
            shown = ", ".join(names[:20]) + (f" and {len(names) - 20} more" if len(names) > 20 else "")
            raise p.InvalidJob(f"unknown task {job.task!r} (registered: {shown or 'none'}); check "
                               "the name, or start the worker with the module that defines it",
                               p.E_UNKNOWN_TASK, reply_to=rt, **known)
        why = t.check_arguments(job.args, job.kwargs)
        if why:
            raise p.InvalidJob(why, reply_to=rt, **known)
        return t

    def _own_key(self, key: str | None) -> bool:
        """A reply pushed onto one of our own keys (a queue!) would corrupt it."""
        return bool(key) and key.startswith(self.own_prefix) and not key.startswith(self.reply_prefix)

    def _done(self, token, job: p.Job, status, err_type, env: dict, dead: dict | None, t0) -> bytes:
        return self._pack(token, job.id, job.task, status, err_type, _result_id(job), job.result_ttl,
                          job.reply_to, p.dumps(env), p.dumps(dead) if dead else None, t0)

    def _invalid(self, token, queue, raw, bad: p.InvalidJob, started, t0) -> bytes:
        if self._own_key(bad.reply_to):
            bad.reply_to = None  # answered through the result key only
        env = p.failed_envelope_for(bad, queue=queue, worker=self.worker, started_at=started)
        dead = p.dead_entry(raw, queue=queue, reason=bad.reason, error_type=bad.error_type,
                            worker=self.worker, job_id=bad.job_id)
        rid = bad.job_id if bad.result_ttl > 0 else None
        return self._pack(token, bad.job_id, bad.task, p.FAILED, bad.error_type, rid, bad.result_ttl,
                          bad.reply_to, p.dumps(env) if env else None, p.dumps(dead), t0)

    @staticmethod
    def _pack(token, job_id, task, status, err_type, result_id, ttl, reply_to,
              env: bytes | None, dead: bytes | None, t0) -> bytes:
        meta = p.dumps({"t": token, "id": job_id, "task": task, "status": status,
                        "error_type": err_type, "result_id": result_id, "ttl": ttl,
                        "reply_to": reply_to, "duration": time.perf_counter() - t0})
        env = env or b""
        dead = dead or b""
        return MSG_DONE + DONE_HEADER.pack(len(meta), len(env), len(dead)) + meta + env + dead


def _result_id(job: p.Job) -> str | None:
    """The result key is only worth writing when the producer knows the id."""
    return None if job.id_assigned or job.result_ttl <= 0 else job.id


def _type_name(e: BaseException) -> str:
    t = type(e)
    return t.__qualname__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"


def _die_with_parent(parent_pid: int) -> None:
    """Exit when the supervisor dies, even by SIGKILL: no orphans running on.

    Linux: the kernel sends us SIGKILL when our parent exits (PR_SET_PDEATHSIG).
    Elsewhere, and as a backstop, a thread watches our parent pid."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(0)

    def watch() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent_pid:
                os._exit(0)

    threading.Thread(target=watch, name="redpool-parent-watch", daemon=True).start()
