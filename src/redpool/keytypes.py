"""Keys of the wrong type: one of redpool's keys holding what redpool does not keep there
(another program ran ``SET redpool:queue:lo x``), and Redis errors told apart.

A key of the wrong type is not Redis being down.  Redis answers every command on every
other key; only what needs that key cannot go on, and it cannot go on until a person
removes what is in the way: redpool never deletes data it did not write.  So:

* **What it stops.**  A key of one queue (its list, its scheduled set, our processing
  list; on Redis Cluster also its dead-letter list, crash counts, lease fence and
  outbox) stops that queue: it is no longer reserved from, promoted or waited on, and
  the other queues are served as before.  A namespace-wide key the guarantees rest on
  (our lease, the set of supervisors, the crash counts and the dataset marker on one
  server) stops reserving on every queue: fencing, reaping, poison-pill counting or
  telling a data loss apart would fail silently otherwise.  The dead-letter list of one
  server stops only the jobs to dead-letter: their completions are held back (their
  jobs stay in our processing list) until it is fixed.  The reaper's lock (a key of
  another type, or one without a TTL) stops only reaping.
* **Said once, with what to do**, when found (``queue_unusable`` / ``key_unusable``),
  and once when it is usable again (``queue_usable`` / ``key_usable``).  Shown by
  `redpool status` (the supervisor writes its list into its lease's info).
* **Retried now and then**: every RECHECK_EVERY seconds, one TYPE per unusable key in
  one round trip; never every tick.  Fixed (deleted, renamed away, or holding the right
  type again): served again, without a restart.
* **Found without a write.**  Redis does not roll a script back: an error after a write
  keeps that write, and a job half moved is lost or doubled.  So every script finds a
  key of the wrong type before it writes (a TYPE, or a first command that checks both
  keys of a move, as LMOVE does), and either passes over what needs it, reporting the
  key, or refuses as a whole with an error naming it (``WRONGTYPE redpool key <key>
  holds a <type>, not a <type>``, lua/_check.lua).  A bare WRONGTYPE from Redis (BLMOVE
  in a waiter, a producer's command) names no key: the supervisor then asks the type of
  every key it uses (``probe``), in one round trip.

Errors are classified (``classify``): only a failure to reach Redis is an outage
(``redis_down``); WRONGTYPE is a key's; any other error reply (OOM, MISCONF, NOPERM, a
script's error) is Redis refusing a command, said once (``redis_error``) and retried with
the same capped backoff, never a crash.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Callable

import redis

from .errors import WrongType
from .protocol import Keys

#: Seconds between two looks at the keys found of the wrong type (and the most a
#: WRONGTYPE that names no key waits for the probe that finds it).
RECHECK_EVERY = 5.0

#: What redpool keeps in each kind of key (the Redis type), and what for.
EXPECTED = {"queue": "list", "scheduled": "zset", "processing": "list", "dead": "list",
            "crashes": "hash", "lease": "hash", "supervisors": "set", "reaper": "string",
            "dataset": "string", "fence": "hash", "outbox": "list"}
ROLE = {"queue": "the queue's waiting jobs", "scheduled": "the queue's delayed jobs and retries",
        "processing": "the jobs a supervisor holds", "dead": "dead-letter entries",
        "crashes": "crash counts of jobs", "lease": "a supervisor's lease",
        "supervisors": "the names of the supervisors", "reaper": "the reaper's lock",
        "dataset": "the dataset marker", "fence": "a supervisor's lease fence for the queue",
        "outbox": "answers being written"}
#: Namespace-wide kinds that stop reserving on every queue (see the module docstring).
PAUSING = {"lease", "supervisors", "crashes", "dataset"}

_OURS = re.compile(r"^WRONGTYPE redpool key (?P<key>.*) holds a (?P<type>\w+), not a \w+$", re.S)

_DOWN = (redis.ConnectionError, redis.TimeoutError, redis.exceptions.ClusterDownError,
         redis.exceptions.ReadOnlyError)


def classify(e: BaseException) -> str:
    """"down": Redis cannot be reached (or is loading, failing over, read-only: a
    replica); "moving": a Redis Cluster slot is moving between nodes (TRYAGAIN while its
    keys are split, a redirection left unresolved, or redis-py's retries of those
    running out: redirects.py); "wrongtype": a key holds another type; "refused": any
    other error reply."""
    if isinstance(e, _DOWN):
        return "down"
    if isinstance(e, (redis.exceptions.TryAgainError, redis.exceptions.AskError)) or (
            type(e) is redis.exceptions.ClusterError and "TTL exhausted" in str(e)):
        return "moving"
    if isinstance(e, redis.ResponseError) and str(e).startswith("WRONGTYPE"):
        return "wrongtype"
    if isinstance(e, redis.RedisError) and not isinstance(e, redis.ResponseError):
        return "down"   # (client-side: a lost connection's odd forms, a cluster map)
    return "refused"


def culprit(e: BaseException) -> tuple[str, str] | None:
    """(key, its type) from a script's refusal (lua/_check.lua); None for Redis's own
    WRONGTYPE, which names no key."""
    m = _OURS.match(str(e))
    return (m["key"], m["type"]) if m else None


def wrong_type(r, keys: Keys, key: str, consequence: str, role: str | None = None) -> WrongType:
    """The error a command-line user or a producer gets when Redis refused a command with
    WRONGTYPE: which key, what it holds (if TYPE may be asked: a producer's ACL user may
    not), what redpool keeps there, what to do."""
    try:
        found = r.type(key)
        found = found.decode() if isinstance(found, bytes) else str(found)
    except redis.RedisError:
        found = None
    kind = keys.kind_of(key)[0]
    return WrongType(key, found, EXPECTED.get(kind, "list"), role or ROLE.get(kind, "its data"),
                     consequence)


def pairs(flat) -> list[tuple[str, str]]:
    """A script's report {key, type, key, type, ...} as (key, type) pairs."""
    text = [x.decode("utf-8", "replace") if isinstance(x, bytes) else str(x) for x in flat or ()]
    return list(zip(text[0::2], text[1::2]))


@dataclass
class Bad:
    key: str
    type: str                # what it holds
    kind: str                # queue, scheduled, processing, dead, ... (EXPECTED); "" unknown
    queue: str | None        # the queue it stops, or None
    ours: bool               # a key of one of our queues (its queue is not served)
    since: float = field(default_factory=time.time)

    @property
    def expected(self) -> str:
        return EXPECTED.get(self.kind, "other")

    @property
    def effect(self) -> str:
        if self.ours:
            return f"queue {self.queue!r} is not served"
        if self.kind in PAUSING:
            return "no queue is served: the supervisor holds off reserving"
        if self.kind == "dead":
            return ("jobs to dead-letter are held back, in their processing lists, until it "
                    "is fixed")
        if self.kind == "reaper":
            return "dead supervisors are not reaped"
        return "what needs it waits"

    @property
    def fix(self) -> str:
        role = ROLE.get(self.kind, "its own data")
        return (f"{self.key} holds a {self.type} where redpool keeps a {self.expected} "
                f"({role}): another program wrote to it.  DEL it, or RENAME it away to keep "
                f"its data; redpool uses it as a {self.expected}, looks again every "
                f"{RECHECK_EVERY:g} s and carries on by itself")

    def to_dict(self) -> dict:
        return {"key": self.key, "type": self.type, "expected": self.expected,
                "queue": self.queue, "effect": self.effect}


def bad_key(keys: Keys, key: str, type_: str) -> Bad:
    """A key found of the wrong type by someone who does not serve its queue (`redpool
    status`): what it is, and what it stops for the workers that do."""
    kind, queue = keys.kind_of(key)
    return Bad(key, type_, kind, queue, queue is not None and kind != "dataset")


class KeyMap:
    """Every key a supervisor uses, by name: what kind it is, of which queue."""

    def __init__(self, keys: Keys, name: str, queues: list[str]) -> None:
        self.keys = keys
        self.name = name
        self.queues = list(queues)
        k = keys
        m: dict[str, tuple[str, str | None]] = {}
        for q in queues:
            m[k.queue(q)], m[k.scheduled(q)] = ("queue", q), ("scheduled", q)
            m[k.processing(name, q)] = ("processing", q)
            if k.cluster:
                m[k.dead_of(q)], m[k.crashes_of(q)] = ("dead", q), ("crashes", q)
                m[k.fence(name, q)], m[k.outbox(name, q)] = ("fence", q), ("outbox", q)
                m[k.dataset_of(q)] = ("dataset", None)
        m[k.supervisor(name)], m[k.supervisors] = ("lease", None), ("supervisors", None)
        m[k.reaper], m[k.dataset] = ("reaper", None), ("dataset", None)
        if not k.cluster:
            m[k.crashes], m[k.dead] = ("crashes", None), ("dead", None)
        self.known = m

    def describe(self, key: str) -> tuple[str, str | None, bool]:
        """(kind, queue, one of our queues' own keys?) of any key."""
        if key in self.known:
            kind, q = self.known[key]
            return kind, q, q is not None
        kind, q = self.keys.kind_of(key)
        return kind, q, False

    def expected(self) -> dict[str, str]:
        """{key: the type it must hold} of every key we use (the probe's list)."""
        return {key: EXPECTED[kind] for key, (kind, _) in self.known.items()}


class Unusable:
    """The keys found of the wrong type, and what they stop.  ``emit`` (the supervisor's
    hooks) says each once when found and once when fixed; ``changed`` is called when the
    set changes (the queue rebuilds the key lists of its scripts)."""

    def __init__(self, keymap: KeyMap, *, changed: Callable[[], None] | None = None) -> None:
        self.map = keymap
        self.changed = changed
        self.emit: Callable[..., None] | None = None
        self.bad: dict[str, Bad] = {}
        self.queues: frozenset[str] = frozenset()   # our queues not served (read by waiters)
        self.paused = False                         # a namespace-wide key stops reserving
        self.reaping = True                         # (False: the reaper's lock is unusable)

    def __bool__(self) -> bool:
        return bool(self.bad)

    def __contains__(self, key: str) -> bool:
        return key in self.bad

    def add(self, key: str, type_: str, *, update: bool = True) -> Bad | None:
        """``key`` holds ``type_``; returns the new entry (None: known already, or it holds
        what it should after all)."""
        kind, queue, ours = self.map.describe(key)
        if key in self.bad or type_ in ("none", EXPECTED.get(kind)):
            return None
        bad = self.bad[key] = Bad(key, type_, kind, queue, ours)
        if update:
            self._update()
        if self.emit is not None:
            if ours:
                self.emit("queue_unusable", queue=queue, key=key, type=type_,
                          expected=bad.expected, note=bad.fix)
            else:
                self.emit("key_unusable", key=key, type=type_, expected=bad.expected,
                          queue=queue, effect=bad.effect, note=bad.fix)
        return bad

    def found(self, reported) -> None:
        """Add every (key, type) a script reported (then look at what they stop)."""
        if [self.add(key, type_, update=False) for key, type_ in reported if key not in self.bad]:
            self._update()

    def clear(self, key: str) -> Bad | None:
        bad = self.bad.pop(key, None)
        if bad is None:
            return None
        self._update()
        if self.emit is not None:
            if bad.ours:
                still = sorted(b.key for b in self.bad.values() if b.queue == bad.queue and b.ours)
                self.emit("queue_usable", queue=bad.queue, key=key,
                          served=not still, note="served again" if not still else
                          f"still unusable: {', '.join(still)}")
            else:
                self.emit("key_usable", key=key, queue=bad.queue)
        return bad

    def _update(self) -> None:
        self.queues = frozenset(b.queue for b in self.bad.values() if b.ours)
        self.paused = any(b.kind in PAUSING and b.queue is None and not b.ours
                          and b.key in self.map.known for b in self.bad.values())
        self.reaping = not any(b.kind == "reaper" for b in self.bad.values())
        if self.changed is not None:
            self.changed()

    def to_info(self) -> list[dict]:
        """For the lease's info (`redpool status`)."""
        return [b.to_dict() for b in self.bad.values()]


class Holding:
    """Mixin of RedisQueue (queue.py): what keys of the wrong type change on the Redis
    side.  Needs its r, keys, name, queues, _proc, _proc_key(), missed, _each(),
    processing_lists(), unusable; sets _active (the queues served), _reserve_keys and
    _promote_keys, and keeps _held (completions that need a key of the wrong type; their
    jobs stay in our processing lists) and _released (the same, once it is fixed)."""

    def _keys_changed(self) -> None:
        """The unusable keys changed: the scripts' key lists follow (the queues served
        only), and completions no key holds back any more go again."""
        k, bad = self.keys, self.unusable.queues
        self._active = [q for q in self.queues if q not in bad]
        if not k.cluster:  # (cluster.ClusterQueue reserves and promotes queue by queue)
            self._reserve_keys = [k.supervisor(self.name), k.crashes] + \
                [x for q in self._active for x in (k.queue(q), self._proc[q])]
        self._promote_keys = [x for q in self._active for x in (k.scheduled(q), k.queue(q))]
        if self._held:
            self._released += [c for c in self._held if not self.blocked(c)]
            self._held = [c for c in self._held if self.blocked(c)]

    def blocked(self, c) -> bool:
        """Does completion ``c`` need a key of the wrong type?"""
        bad, k, q = self.unusable.bad, self.keys, c.queue
        return (self._proc_key(q) in bad or (c.dead is not None and k.dead_of(q) in bad)
                or (c.retry is not None and k.scheduled(q) in bad)
                or (k.cluster and c.envelope is not None and k.outbox(self.name, q) in bad))

    def _sendable(self, done: list) -> tuple[list, list]:
        """(what to send: completions released and those of ``done`` that need no key of
        the wrong type; those of ``done`` that do).  Nothing changes until _settled()."""
        if not self.unusable:
            return self._released + list(done), []
        return (self._released + [c for c in done if not self.blocked(c)],
                [c for c in done if self.blocked(c)])

    def _settled(self, hold: list) -> None:
        """The completions went out: the released ones were sent, ``hold`` waits."""
        self._released = []
        self._held += hold

    def _unwritten(self, sent: list, reply) -> int:
        """A completion script's reply {missing, skipped|pushed, broken, positions...}:
        jobs no longer ours join ``missed``, those held back by a key of the wrong type
        wait (their jobs are still in our processing list).  Returns how many missing."""
        for i in map(int, reply[3:]):
            if i > 0:
                self.missed.append(sent[i - 1])
            else:
                self._held.append(sent[-i - 1])
        self.unusable.found(pairs(reply[2]))
        return int(reply[0])

    def holding(self) -> list[tuple[str, bytes]]:
        """(queue, raw) of the jobs whose completions wait here: still ours (reconcile)."""
        return [(c.queue, c.raw) for c in self._held + self._released]

    def rescue(self, items: list[tuple[str, bytes]]) -> int:
        """Push (queue, raw) jobs back to the head of their queues: jobs whose processing
        list another program overwrote, which exist nowhere else now (requeue(),
        Duties.rescue_overwritten)."""
        if not items:
            return 0
        by_queue: dict[str, list[bytes]] = {}
        for q, raw in items:
            by_queue.setdefault(self.keys.queue(q), []).append(raw)
        self._each([(k, ("RPUSH", k, *reversed(raws))) for k, raws in by_queue.items()])
        return len(items)

    def _ask(self, commands: list[tuple[str, tuple]]) -> list:
        """As RedisQueue._each, with each error in place of its reply (cluster.py's
        goes per node)."""
        pipe = self.r.pipeline(transaction=False)
        for _, cmd in commands:
            pipe.execute_command(*cmd)
        return pipe.execute(raise_on_error=False)

    def key_types(self, keys: list[str]) -> dict[str, str]:
        """The type of each key, in one round trip (per node on Redis Cluster); a key
        whose node could not be asked is left out."""
        out = self._ask([(key, ("TYPE", key)) for key in keys])
        return {key: t.decode() if isinstance(t, bytes) else str(t)
                for key, t in zip(keys, out) if not isinstance(t, Exception)}

    def probe_keys(self) -> list[str]:
        """Every key a WRONGTYPE that names none may be about: those we use, and our
        processing lists of queues we no longer serve (SCAN)."""
        keys = list(self.unusable.map.expected())
        return keys + [k for k in self.processing_lists().values() if k not in keys]
