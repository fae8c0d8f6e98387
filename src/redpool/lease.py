"""Supervisor leases and the reaper: how the cluster notices a dead host.

Every supervisor holds a lease, ``<ns>:supervisor:<name>``: a hash {epoch, info}
with a TTL, renewed every lease/3 by a script that renews only if the epoch is
still ours.  Expiry is judged by the Redis server's clock, never a host's.

A supervisor whose lease expired is dead to the cluster: any live supervisor may
reap it (at most one at a time, under ``<ns>:reaper``), putting its processing
lists back at the head of their queues in one atomic step.  The dead one, if it
was only frozen or cut off, finds on its next renewal that its lease is lost, and
must re-register under a new epoch before it reserves anything again; results it
finishes for jobs that were taken back are not written (complete.lua removes a job
from the processing list before writing, and finds nothing).

The lease is per supervisor, not per job: a job that runs for an hour on a live
host is never handed to a second one.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid

import redis

from .errors import NameInUse
from .keytypes import culprit
from .protocol import Keys
from .queue import load_script


class Lease:
    def __init__(self, r: redis.Redis, keys: Keys, name: str) -> None:
        self.r = r
        self.keys = keys
        self.name = name
        self.key = keys.supervisor(name)
        self.epoch = ""
        self._register = load_script(r, "register")
        self._renew = load_script(r, "renew")
        self._unregister = load_script(r, "unregister")

    def register(self, info: dict, lease: float, *, sleep=time.sleep) -> None:
        """Claim our name under a new epoch; refuse if another live supervisor holds it.

        A lease left by a previous run on this host whose process is gone (kill -9,
        then a restart within the lease) is taken over.  One that carries our own pid
        is ambiguous (a restarted container is pid 1 again, but so is a twin container
        sharing the host name): we wait up to one lease for it to expire, and refuse
        if it is renewed meanwhile."""
        epoch = uuid.uuid4().hex
        payload = json.dumps(info)
        deadline = time.monotonic() + lease + 1.0
        # Our own previous epoch, if any, is ours to replace: a re-registration while the
        # old lease still stands (on Redis Cluster, a lost fence) must not wait it out.
        takeover = self.epoch
        while True:
            claimed, *holder = self._register(
                keys=[self.key, self.keys.supervisors],
                args=[epoch, payload, int(lease * 1000), self.name, takeover])
            if claimed:
                self.epoch = epoch
                return
            info_raw = holder[0] if holder else None
            held = _parse(info_raw)
            verdict = _holder_state(held)
            if verdict == "dead":
                takeover = self.r.hget(self.key, "epoch") or ""
                continue
            if verdict == "alive" or time.monotonic() > deadline:
                raise NameInUse(
                    f"another supervisor named {self.name!r} is alive (host {held.get('host')}, "
                    f"pid {held.get('pid')}): give each supervisor its own --name (REDPOOL_NAME)")
            sleep(0.2)  # unsure: wait for it to expire, or to be renewed by its owner

    def renew(self, info: dict, lease: float) -> bool:
        """Extend our lease.  False: it is lost (expired, perhaps reaped, or taken)."""
        return bool(self._renew(keys=[self.key, self.keys.supervisors],
                                args=[self.epoch, json.dumps(info), int(lease * 1000), self.name]))

    def unregister(self) -> None:
        """Give the name back, but only our own lease (not a successor's): one script."""
        self._unregister(keys=[self.key, self.keys.supervisors], args=[self.epoch, self.name])


class Reaper:
    """Finds supervisors whose lease expired and puts their jobs back."""

    def __init__(self, r: redis.Redis, keys: Keys, name: str) -> None:
        self.r = r
        self.keys = keys
        self.name = name
        self._reap = load_script(r, "reap")

    def run(self, lock_seconds: float = 1.0, wrongtype=None) -> dict[str, int]:
        """One round, unless another supervisor has reaped in the last ``lock_seconds``
        (the lock is left to expire: it also paces the rounds cluster-wide).  Returns
        {dead supervisor: jobs put back}.  Our own lease is not judged here: renewal
        tells us when it is lost.

        A key of the wrong type (keytypes.py) is handed to ``wrongtype(key, type)``: the
        lock (SET NX cannot tell "held" from "holds a list": its type is asked in the
        same round trip), or a dead supervisor's list, whose reap.lua refused before
        moving anything; the other dead supervisors are reaped all the same."""
        pipe = self.r.pipeline(transaction=False)
        pipe.set(self.keys.reaper, self.name, nx=True, px=int(lock_seconds * 1000))
        pipe.type(self.keys.reaper)
        locked, kind = pipe.execute()
        if not locked:
            kind = kind.decode() if isinstance(kind, bytes) else str(kind)
            if kind != "string" and wrongtype is not None:
                wrongtype(self.keys.reaper, kind)
            return {}
        # (names, and below the keys found, are read with surrogateescape and written
        # back as the same bytes: a key that is not UTF-8, which redpool never writes,
        # is not a reason for every supervisor's reaper to raise, once a second)
        names = sorted(n.decode("utf-8", "surrogateescape")
                       for n in self.r.smembers(self.keys.supervisors))
        names = [n for n in names if n != self.name]
        pipe = self.r.pipeline(transaction=False)
        for n in names:
            pipe.exists(_b(self.keys.supervisor(n)))
        dead = [n for n, alive in zip(names, pipe.execute()) if not alive]
        out = {}
        for n in dead:
            try:
                out[n] = self.reap(n)
            except redis.ResponseError as e:
                if culprit(e) is None or wrongtype is None:
                    raise
                wrongtype(*culprit(e))
        return out

    def reap(self, dead: str) -> int:
        keys = [_b(self.keys.supervisor(dead)), self.keys.supervisors, self.keys.crashes]
        pattern = _b(self.keys.processing_pattern(dead))
        for key in self.r.scan_iter(match=pattern, count=1000):
            k = key.decode("utf-8", "surrogateescape")
            keys += [key, _b(self.keys.queue(self.keys.queue_of_processing(dead, k)))]
        return max(0, int(self._reap(keys=keys, args=[_b(dead)])))


def _b(s: str) -> bytes:
    return s.encode("utf-8", "surrogateescape")


def _parse(raw: bytes | None) -> dict:
    try:
        v = json.loads(raw) if raw else {}
        return v if isinstance(v, dict) else {}
    except ValueError:
        return {}


def _holder_state(holder: dict) -> str:
    """"dead" if the lease's writer ran on this host and is gone, "unsure" if it
    carries our own pid, else "alive" (a live process here, or another host)."""
    if holder.get("host") != socket.gethostname():
        return "alive"
    pid = holder.get("pid")
    if not isinstance(pid, int):
        return "alive"
    if pid == os.getpid():
        return "unsure"
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return "dead"
    except PermissionError:
        return "alive"
    return "alive"
