"""The Redis side of a supervisor, and only that.

reserve / complete / requeue / recover / heartbeat.  Every multi-key change is one
Lua script (src/redpool/lua/*.lua; each header lists the keys it touches), so a
job is always in exactly one list and leaves Redis only with its result.
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass
from importlib import resources
from typing import Iterable

import redis

from .errors import NameInUse
from .protocol import Keys

#: TTL of a reply list when the job asked for no result key (result_ttl 0): the
#: producer waiting on it must still get its answer.
REPLY_TTL_WHEN_NO_RESULT = 86400


def load_script(r: redis.Redis, name: str):
    source = resources.files("redpool").joinpath("lua", f"{name}.lua").read_text()
    return r.register_script(source)


def connect(url: str, *, blocking_timeout: float = 0.0, **kwargs) -> redis.Redis:
    """A redis-py client whose socket timeout is above any blocking call it makes,
    so no call can hang forever on a dead or frozen server."""
    return redis.Redis.from_url(
        url, decode_responses=False,
        socket_timeout=blocking_timeout + 10.0, socket_connect_timeout=5.0,
        health_check_interval=30, **kwargs)


@dataclass(slots=True)
class Completion:
    """A finished job to acknowledge: what to write, and what to remove."""

    queue: str
    raw: bytes
    result_id: str | None       # None: no result key (no id of the producer's, or ttl 0)
    ttl: int
    reply_to: str | None
    envelope: bytes | None      # None: nobody to answer (no id, no reply_to)
    dead: bytes | None = None   # a dead-letter entry, when the job could not run


class RedisQueue:
    """One supervisor's view of Redis: its name, its queues, its processing lists."""

    def __init__(self, r: redis.Redis, keys: Keys, name: str, queues: list[str], *,
                 dead_max: int = 10_000) -> None:
        self.r = r
        self.keys = keys
        self.name = name
        self.queues = list(queues)
        self.dead_max = dead_max
        self._proc = {q: keys.processing(name, q) for q in self.queues}
        self._reserve_keys = [k for q in self.queues for k in (keys.queue(q), self._proc[q])]
        self._reserve = load_script(r, "reserve")
        self._complete = load_script(r, "complete")
        self._requeue = load_script(r, "requeue")
        self._requeue_all = load_script(r, "requeue_all")

    # -- the hot path ------------------------------------------------------------------------

    def reserve(self, n: int) -> list[tuple[str, bytes]]:
        """Move up to n jobs, highest-priority queue first, into our processing lists."""
        if n <= 0:
            return []
        flat = self._reserve(keys=self._reserve_keys, args=[n])
        return [(self.queues[int(flat[i]) - 1], flat[i + 1]) for i in range(0, len(flat), 2)]

    def block_reserve(self, conn: redis.Redis, queue: str, timeout: float) -> bytes | None:
        """Wait in Redis (no polling) for one job on ``queue``; moved atomically."""
        return conn.blmove(self.keys.queue(queue), self._proc_key(queue), timeout, "RIGHT", "LEFT")

    def complete(self, items: Iterable[Completion]) -> tuple[int, int]:
        """Acknowledge a batch in one round trip.  Returns (jobs no longer ours, whose
        results were therefore not written; replies skipped because the reply_to key
        holds something other than a list)."""
        keys: list[str] = [self.keys.dead]
        args: list = [self.dead_max, REPLY_TTL_WHEN_NO_RESULT, f"{self.keys.ns}:",
                      self.keys.reply("")]
        for c in items:
            keys += [self._proc_key(c.queue),
                     self.keys.result(c.result_id) if c.result_id and c.envelope else "",
                     c.reply_to if c.reply_to and c.envelope else ""]
            args += [c.raw, c.ttl, c.envelope or b"", c.dead or b""]
        if len(keys) == 1:
            return 0, 0
        missing, skipped = self._complete(keys=keys, args=args)
        return int(missing), int(skipped)

    def requeue(self, items: list[tuple[str, bytes]]) -> int:
        """Put reserved-but-unstarted jobs (oldest first) back at the head of their queues."""
        if not items:
            return 0
        keys: list[str] = []
        for q, _ in items:
            keys += [self._proc_key(q), self.keys.queue(q)]
        return int(self._requeue(keys=keys, args=[raw for _, raw in items]))

    def _proc_key(self, queue: str) -> str:
        key = self._proc.get(queue)
        return key if key is not None else self.keys.processing(self.name, queue)

    # -- start-up and shutdown ---------------------------------------------------------------

    def processing_lists(self) -> dict[str, str]:
        """Every processing list under our name (including queues we no longer listen
        on: a previous run may have had other --queue flags), as {queue: key}."""
        found = {q: k for q, k in self._proc.items()}
        for key in self.r.scan_iter(match=self.keys.processing_pattern(self.name), count=1000):
            k = key.decode()
            found[self.keys.queue_of_processing(self.name, k)] = k
        return found

    def recover(self) -> dict[str, int]:
        """Put every job left in our processing lists back at the head of its queue."""
        moved: dict[str, int] = {}
        for q, key in self.processing_lists().items():
            n = int(self._requeue_all(keys=[key, self.keys.queue(q)]))
            if n:
                moved[q] = n
        return moved

    def in_processing(self) -> int:
        return sum(self.r.llen(k) for k in self.processing_lists().values())

    # -- registration and heartbeat ----------------------------------------------------------

    def register(self, info: dict, lease: float, *, sleep=time.sleep) -> None:
        """Claim our name: refuse if another live supervisor holds it.

        A heartbeat left by a previous run on this host whose process is gone
        (kill -9, then a restart within the lease) is ours to take over.  One that
        carries our own pid is ambiguous (a restarted container is pid 1 again, but
        so is a twin container sharing the host name): we wait one lease for it to
        expire, and refuse if it is renewed meanwhile."""
        hb = self.keys.supervisor(self.name)
        payload = json.dumps(info)
        px = int(lease * 1000)
        deadline = time.monotonic() + lease + 1.0
        while not self.r.set(hb, payload, px=px, nx=True):
            holder_raw = self.r.get(hb)
            if holder_raw is None:
                continue  # it expired between our SET and GET
            holder = _parse(holder_raw)
            verdict = _holder_state(holder)
            if verdict == "dead":
                self.r.set(hb, payload, px=px)
                break
            if verdict == "alive" or time.monotonic() > deadline:
                raise NameInUse(
                    f"another supervisor named {self.name!r} is alive "
                    f"(host {holder.get('host')}, pid {holder.get('pid')}): give each "
                    "supervisor its own --name (REDPOOL_NAME)")
            sleep(0.2)  # "unsure": wait for it to expire, or to be renewed by its owner
        self.r.sadd(self.keys.supervisors, self.name)

    def heartbeat(self, info: dict, lease: float) -> None:
        pipe = self.r.pipeline(transaction=False)
        pipe.set(self.keys.supervisor(self.name), json.dumps(info), px=int(lease * 1000))
        pipe.sadd(self.keys.supervisors, self.name)
        pipe.execute()

    def unregister(self) -> None:
        pipe = self.r.pipeline(transaction=True)
        pipe.delete(self.keys.supervisor(self.name))
        pipe.srem(self.keys.supervisors, self.name)
        pipe.execute()


def _parse(raw: bytes | None) -> dict:
    try:
        v = json.loads(raw) if raw else {}
        return v if isinstance(v, dict) else {}
    except ValueError:
        return {}


def _holder_state(holder: dict) -> str:
    """"dead" if the heartbeat's writer ran on this host and is gone, "unsure" if it
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
