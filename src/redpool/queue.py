"""The Redis side of a supervisor's jobs, and only that.

reserve / complete / requeue / crashed / recover / promote.  Every multi-key change
is one Lua script (src/redpool/lua/*.lua; each header lists the keys it touches), so
a job is always in exactly one list and leaves Redis only with its result.  The
supervisor's lease and the reaper are in lease.py.
"""

from __future__ import annotations

import functools
import hashlib
import re
import time
from dataclasses import dataclass
from importlib import resources
from typing import Iterable

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from . import dataset
from .completion import Completion
from .oversized import Oversized, blmove, from_raw, from_reply, read_list
from .keys import crash_started
from .keytypes import Holding, KeyMap, Unusable, culprit, pairs
from .protocol import DEAD_JOB_KEPT, Keys
from .suspicion import Suspicion

#: TTL of a reply list when the job asked for no result key (result_ttl 0): the
#: producer waiting on it must still get its answer.
REPLY_TTL_WHEN_NO_RESULT = 86400
#: The most jobs one reserve call moves (Lua's unpack() has a stack limit).
MAX_RESERVE = 1000
#: Seconds of idleness after which the hot path's connection is checked before use.
IDLE_CHECK = 1.0


_INCLUDE = re.compile(r"^--#include (\w+)$", re.MULTILINE)


@functools.cache
def script_source(name: str) -> str:
    """The text of src/redpool/lua/<name>.lua (read once), with each line
    ``--#include other`` replaced by lua/other.lua: Redis scripts cannot load code, so
    a piece several scripts share is pasted in here rather than copied by hand."""
    text = resources.files("redpool").joinpath("lua", f"{name}.lua").read_text()
    return _INCLUDE.sub(lambda m: script_source(m.group(1)).rstrip("\n"), text)


def load_script(r: redis.Redis, name: str):
    return r.register_script(script_source(name))


def connect(url: str, *, blocking_timeout: float = 0.0, **kwargs) -> redis.Redis:
    """A redis-py client for the supervisor.

    Its socket timeout is above any blocking call it makes, so no call can hang
    forever on a dead or frozen server.  It never retries by itself: a script whose
    reply was lost may have run, and retrying it blindly (redis-py's default) could
    reserve jobs twice; the supervisor retries with backoff and then reconciles its
    processing lists with what it holds.

    Any URL form of connection.py works (TLS, Sentinel); ``kwargs`` may carry the TLS
    files (``ca``, ``cert``, ``key``).  With Sentinel the same policy holds: after a
    failover the next connection goes to the new primary, and nothing is retried
    blindly on the way."""
    from .connection import connect as connect_url

    return connect_url(
        url, decode_responses=False, retry=Retry(NoBackoff(), 0),
        socket_timeout=blocking_timeout + 5.0, socket_connect_timeout=5.0,
        health_check_interval=30, **kwargs)


@dataclass(slots=True)
class Reserved:
    queue: str
    raw: bytes                  # or an Oversized head: a job over the limit (oversized.py)
    crashes: int = 0            # earlier deliveries of it that ended in a crash
    crashed_at: float | None = None   # when the last of those started (unix seconds)

    def __post_init__(self) -> None:
        if self.raw.__class__ is list:  # reserve.lua's {length, head, sha1}
            self.raw = from_reply(self.raw)


def crash_info(reply) -> tuple[int, float | None]:
    """(crashes, crashed_at) from reserve.lua's per-job count: a number, or for a job
    that crashed before {count, start time or ""}."""
    if isinstance(reply, list):
        return int(reply[0]), float(reply[1]) if reply[1] else None
    return int(reply), None


class RedisQueue(Holding, dataset.Markers):
    """One supervisor's view of Redis: its name, its queues, its processing lists."""

    def __init__(self, r: redis.Redis, keys: Keys, name: str, queues: list[str], *,
                 dead_max: int = 10_000) -> None:
        self.r = r
        self.keys = keys
        self.name = name
        self.queues = list(queues)
        self.dead_max = dead_max
        #: A job longer than this is reserved as its head (oversized.py); 0: never.  Set
        #: by the caller that knows --max-payload (oversized.limit()).
        self.head_over = 0
        self._proc = {q: keys.processing(name, q) for q in self.queues}
        self.crashes_exist = True  # until a reserve says otherwise
        self._own_prefix = f"{keys.ns}:"
        self._reply_prefix = keys.reply("")
        #: Keys of the wrong type and what they stop (keytypes.py): see Holding for
        #: _active (the queues served), _held and _released (completions held back).
        self.unusable = Unusable(KeyMap(keys, name, self.queues), changed=self._keys_changed)
        self._held: list[Completion] = []
        self._released: list[Completion] = []
        self._keys_changed()
        self._reserve = load_script(r, "reserve")
        self._complete = load_script(r, "complete")
        self._requeue = load_script(r, "requeue")
        self._requeue_all = load_script(r, "requeue_all")
        self._processing = load_script(r, "processing")
        self._crashed = load_script(r, "crashed")
        self._promote = load_script(r, "promote")
        self._hot = None  # the connection of _evalsha_pipeline
        self._hot_used = 0.0
        #: Completions that found their job missing from our processing list (the
        #: script says which of a batch), so nothing was written for them: kept for the
        #: supervisor to look into (fenced by a reaper: dropped; or lost with the
        #: server's data: sent again), which takes them.
        self.missed: list[Completion] = []

    # -- the hot path ------------------------------------------------------------------------

    def reserve(self, n: int, epoch: str) -> list[Reserved] | None:
        """Move up to n jobs, highest-priority queue first, into our processing lists.
        None: our lease (``epoch``) is lost, nothing was taken."""
        return self.exchange([], n, epoch)[2]

    def exchange(self, done: list[Completion], n: int, epoch: str
                 ) -> tuple[int, int, list[Reserved] | None]:
        """Acknowledge ``done`` and reserve up to ``n`` more in ONE round trip (the two
        scripts, pipelined).  Returns (missing, skipped) as complete() does, and the
        reserved jobs (None: our lease is lost, nothing was taken)."""
        hold = None  # (the plain path: no key of the wrong type, nothing held back)
        if self.unusable.bad or self._released:
            done, hold = self._sendable(done)
        if not done and n <= 0:
            if hold is not None:
                self._settled(hold)
            return 0, 0, []
        calls = []
        if done:
            calls.append((self._complete, *self._complete_args(done)))
        if n > 0:
            calls.append((self._reserve, self._reserve_keys, self._reserve_args(n, epoch)))
        qs = self._active  # (as the keys were given: a report below may change it)
        replies = self._evalsha_pipeline(calls)
        if hold is not None:
            self._settled(hold)
        missing = skipped = 0
        if done:
            reply = replies.pop(0)
            missing, skipped = int(reply[0]), int(reply[1])
            if len(reply) > 3:  # jobs no longer ours, or held back (only those: the
                missing = self._unwritten(done, reply)  # others of the batch were written)
        got: list[Reserved] | None = []
        if n > 0:
            flat = replies[0]
            got = None
            if flat[0]:
                first = 2
                if flat[0] == 2:  # keys of the wrong type: their queues were passed over
                    first = 3
                    self.unusable.found(pairs(flat[2]))
                self.crashes_exist = bool(flat[1])
                # (the hot path: a count is nearly always a plain 0)
                got = [Reserved(qs[flat[i] - 1], flat[i + 1], c) if (c := flat[i + 2]).__class__
                       is int else Reserved(qs[flat[i] - 1], flat[i + 1], *crash_info(c))
                       for i in range(first, len(flat), 3)]
        return missing, skipped, got

    def _reserve_args(self, n: int, epoch: str) -> list:
        """reserve.lua's arguments (cluster.py's too)."""
        if not self.head_over:
            return [min(n, MAX_RESERVE), epoch]
        return [min(n, MAX_RESERVE), epoch, self.head_over, DEAD_JOB_KEPT]

    def block_reserve(self, conn: redis.Redis, queue: str, timeout: float) -> Reserved | None:
        """Wait in Redis (no polling) for one job on ``queue``; moved atomically."""
        raw = self._blmove(conn, queue, timeout)
        if raw is not None and self.head_over and len(raw) > self.head_over \
                and raw.__class__ is not Oversized:
            raw = from_raw(raw)   # (held as its head only, as reserve.lua returns it)
        if raw is None:
            return None
        # reserve.lua reads the crash count in the same script; BLMOVE cannot, so ask
        # afterwards -- but only when some job has a count (as of our last reserve), to
        # keep the idle pick-up at one round trip.  A count missed here is not lost: it
        # lives in Redis, and crashed.lua judges poison pills by it.
        if not self.crashes_exist:
            return Reserved(queue, raw, 0)
        sha = raw.sha if raw.__class__ is Oversized else hashlib.sha1(raw).hexdigest()
        try:
            crashes = int(conn.hget(self.keys.crashes_of(queue), sha) or 0)
            if not crashes:
                return Reserved(queue, raw, 0)
            started = conn.hget(self.keys.crashes_of(queue), crash_started(sha))  # (rare)
        except redis.ResponseError:  # crash counts of the wrong type: the job is ours
            return Reserved(queue, raw, 0)  # all the same (reserve.lua reports the key)
        return Reserved(queue, raw, crashes, float(started) if started else None)

    def _blmove(self, conn: redis.Redis, queue: str, timeout: float) -> bytes | None:
        if self.head_over:  # (its reply read by us: a job over the limit is never held whole)
            return blmove(conn, self.keys.queue(queue), self._proc_key(queue), timeout,
                          self.head_over)
        return conn.blmove(self.keys.queue(queue), self._proc_key(queue), timeout, "RIGHT", "LEFT")

    def complete(self, items: Iterable[Completion]) -> tuple[int, int]:
        """Acknowledge a batch in one round trip.  Returns (jobs no longer ours, whose
        results were therefore not written; replies skipped because the reply_to key
        holds something other than a list)."""
        items = list(items)
        if not items and not self._released:
            return 0, 0
        return self.exchange(items, 0, "")[:2]

    def _evalsha_pipeline(self, calls: list) -> list:
        """Run scripts by EVALSHA in one pipeline: one round trip.  (redis-py's own
        pipelining of Script objects first asks SCRIPT EXISTS: a second round trip on
        every call.)  The commands of a pipeline run independently: a script the server
        does not know (restarted, SCRIPT FLUSH) answers NOSCRIPT without running, while
        the others may well have run -- so only the NOSCRIPT ones are loaded and sent
        again, never the whole pipeline (that could reserve jobs twice).

        This is the hot path (one call per loop iteration), so it writes the packed
        commands on a connection of its own and reads the replies straight back: a
        redis-py Pipeline object costs more than twice the CPU per call (measured 145
        against 62 us), which at 10 ms jobs is time taken from the jobs themselves."""
        conn = self._hot
        if conn is None:
            conn = self._hot = self.r.connection_pool.get_connection()
        elif time.monotonic() - self._hot_used > IDLE_CHECK:
            # Kept out of the pool, it misses the check the pool makes before lending a
            # connection: after an idle spell the server (its `timeout`) or a proxy may
            # have closed it.  Then it reads as readable (EOF): start afresh, rather than
            # fail the call and take it for a Redis outage.
            try:
                if conn.can_read():
                    conn.disconnect()
            except (redis.ConnectionError, OSError):
                conn.disconnect()
        self._hot_used = time.monotonic()
        replies: list = []
        try:
            conn.send_packed_command(conn.pack_commands(
                [("EVALSHA", script.sha, len(keys), *keys, *args) for script, keys, args in calls]))
            for _ in calls:
                try:
                    replies.append(conn.read_response())
                except redis.ResponseError as e:  # read in full: the connection stays in step
                    replies.append(e)
        except BaseException:
            conn.disconnect()  # a reply may be half read: start afresh on the next call
            raise
        for i, (reply, (script, keys, args)) in enumerate(zip(replies, calls)):
            if isinstance(reply, redis.exceptions.NoScriptError):
                self.r.script_load(script.script)
                replies[i] = self.r.evalsha(script.sha, len(keys), *keys, *args)
            elif isinstance(reply, Exception):
                raise reply
        return replies

    def close(self) -> None:
        """Give back the hot path's connection."""
        conn, self._hot = self._hot, None
        if conn is not None:
            self.r.connection_pool.release(conn)

    def _complete_args(self, items: list[Completion]) -> tuple[list, list]:
        keys: list[str] = [self.keys.dead, self.keys.crashes]
        args: list = [self.dead_max, REPLY_TTL_WHEN_NO_RESULT, self._own_prefix, self._reply_prefix]
        for c in items:
            keys += [self._proc_key(c.queue),
                     self.keys.result(c.result_id) if c.result_id and c.envelope else "",
                     self.keys.scheduled(c.queue) if c.retry else ""]
            big = c.raw.__class__ is Oversized  # named by hash (lua/_by_hash.lua)
            args += [c.raw.name if big else c.raw, c.ttl, c.envelope or b"", c.dead or b"",
                     c.retry or b"", -1 if big else int(c.retry_delay * 1000),
                     c.reply_to if c.reply_to and c.envelope else ""]
        return keys, args

    def requeue(self, items: list[tuple[str, bytes]]) -> int:
        """Put reserved-but-unstarted jobs (oldest first) back at the head of their queues."""
        if not items:
            return 0
        keys: list[str] = []
        for q, _ in items:
            keys += [self._proc_key(q), self.keys.queue(q)]
        named = " ".join(str(j) for j, (_, raw) in enumerate(items, 1)
                         if raw.__class__ is Oversized)  # (found by hash: _by_hash.lua)
        moved, broken = self._requeue(keys=keys, args=[named] + [
            raw.name if raw.__class__ is Oversized else raw for _, raw in items])
        if broken:  # a job whose queue holds another type stays in our list; one whose
            self.unusable.found(pairs(broken))  # list was overwritten exists only here
            moved += self.rescue([(q, raw) for q, raw in items if self._proc_key(q) in
                                  self.unusable and self.keys.queue(q) not in self.unusable
                                  and raw.__class__ is not Oversized])  # (not ours whole)
        return int(moved)

    def crashed(self, queue: str, raw: bytes, max_crashes: int = 2 ** 31,
                started_at: float | None = None) -> int:
        """The child running ``raw`` died: one crash more on its count, and back to
        the head of its queue -- unless the count is now over ``max_crashes``: then it
        stays in our processing list, to be dead-lettered.  ``started_at`` (unix
        seconds, default now) is when the run that crashed started, kept with the count.
        Returns the new count (0: it was no longer ours)."""
        self.crashes_exist = True
        started = f"{time.time() if started_at is None else started_at:.6f}"
        return int(self._crashed(keys=[self._proc_key(queue), self.keys.queue(queue),
                                       self.keys.crashes_of(queue)],
                                 args=[raw, max_crashes, started]))

    def promote(self, limit: int = 1000) -> tuple[int, float | None]:
        """Move due scheduled jobs onto their queues.  Returns (moved, seconds until
        the next one is due, or None if none is scheduled)."""
        moved, ms, broken = self._promote(keys=self._promote_keys, args=[limit])
        self.unusable.found(pairs(broken))
        return int(moved), (None if int(ms) < 0 else int(ms) / 1000)

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

    def recover(self, *, crashed: bool) -> dict[str, int]:
        """Put every job left in our processing lists back at the head of its queue.
        ``crashed``: they were left by a run that died (each one's crash count goes
        up), not put back by an orderly shutdown."""
        moved: dict[str, int] = {}
        for q, key in self.processing_lists().items():
            try:
                n = int(self._requeue_all(keys=[key, self.keys.queue(q), self.keys.crashes_of(q)],
                                          args=["1" if crashed else "0"]))
            except redis.ResponseError as e:
                if culprit(e) is None:
                    raise
                self.unusable.add(*culprit(e))  # that list stays as it is; the others go
                continue
            if n:
                moved[q] = n
        return moved

    @property
    def unsent(self) -> int:
        """Acknowledgements taken over, not yet sent: the supervisor does not stop while
        there are any (keytypes.Holding; cluster.ClusterQueue: a node away's too)."""
        return len(self._released)

    #: A call's reply was lost while other calls went through, so no outage is seen: a
    #: script may have reserved jobs nobody heard of.  The duties reconcile and reset it.
    suspect = Suspicion()  # (raised from any thread, never lost: suspicion.py)
    #: Some Redis Cluster node hangs (breaker.py): a reconcile, which needs every node,
    #: waits until it answers.  Never on one server.
    partial = False
    #: Queues the last exchange could not reserve from (a node away): not seen empty.
    passed_over = 0

    def node_hangs(self, queue: str, error: BaseException | None = None) -> bool:
        """Does ``queue``'s node hang (``error``, the waiter's timeout, may say so
        now)?  The waiter then leaves the queue alone.  Only on Redis Cluster
        (cluster.py)."""
        return False

    def settle(self) -> int:
        """Finish acknowledgements a lost reply or a crash left half done; returns how
        many.  Nothing to do on one server, where one script acknowledges a job whole
        (cluster.py has the two-step kind)."""
        return 0

    # -- the server itself: did it keep its data? (dataset.Markers) ----------------------

    def _each(self, commands: list[tuple[str, tuple]]) -> list:
        """(routing key, command) pairs in one round trip; the first error raised."""
        out = self._ask(commands)
        for reply in out:
            if isinstance(reply, Exception):
                raise reply
        return out

    def nodes(self) -> list[redis.Redis]:
        """A client per primary (one here; every primary on Redis Cluster)."""
        return [self.r]

    def processing_contents(self) -> dict[str, list[bytes]]:
        """What Redis says we hold, per queue (to reconcile after a lost reply), a job
        over ``head_over`` as its Oversized head (lua/processing.lua): never read whole."""
        return {q: read_list(self._processing, k, self.head_over)
                for q, k in self.processing_lists().items() if k not in self.unusable}
