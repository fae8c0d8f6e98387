"""Redis health as the supervisor judges it: outages, refusals, keys of the wrong type.

A mixin of Duties (duties.py), kept apart so that each file stays one readable
responsibility.  Errors are told apart (keytypes.classify), because they call for
different things:

* **Redis cannot be reached** (connection refused or lost, a timeout, a server loading
  its data, a replica read-only after a failover, a cluster down): an outage.  Said once
  (``redis_down``), retried with a backoff capped at BACKOFF_MAX, a reconcile as soon as
  it answers again (a reply lost with the connection may hide a script that ran), and
  said over (``redis_up``) only once it has answered for a while: outage.py says why.
* **A key of the wrong type** (WRONGTYPE): not an outage.  Redis answers every command on
  every other key; that key is said once (``queue_unusable`` / ``key_unusable``) and
  passed over, looked at every RECHECK_EVERY seconds, and served again once fixed
  (keytypes.py).
* **Any other error reply** (OOM, MISCONF, NOPERM, a script's error): Redis refusing a
  command.  Said once per place (``redis_error``), retried with the backoff (a duty
  refused while the rest is served waits alone, up to REFUSED_MAX, so that it neither
  spins nor slows the jobs), a reconcile once it passes (a script may have stopped half
  way), and ``redis_error_cleared`` when it goes through.  Never a crash.
"""

from __future__ import annotations

import redis

from .errors import NameInUse
from .keytypes import RECHECK_EVERY, classify, culprit
from .outage import Outage

BACKOFF_MAX = 2.0    # Redis retry backoff cap: back within ~2 s of Redis returning
MOVING_MIN, MOVING_MAX = 0.01, 0.25  # backoff while a Cluster slot is moving (TRYAGAIN)
MOVING_QUIET = 2.0   # no TRYAGAIN for this long (and a call through): the slot has moved
REFUSED_MAX = 30.0   # backoff cap of duties Redis refuses (while the rest is served)
QUIET = 60.0         # a refusal not seen again for this long is over (see redis_ok)
#: Where a success of its own is reported to redis_ok (others clear after QUIET).
OWN_SUCCESS = ("duties", "exchange", "complete", "types")


class RedisHealth:
    """Mixin of Duties: needs its cfg, rq, hooks, sup, reconcile(), check_dataset(),
    report_dropped(), restore_held(), begin(), lease, and the state Duties.__init__ sets
    for it (retry_at, _backoff, outage, refusals, duties_at, _duty_backoff, probe_at,
    recheck_at, fixed, next_renew, reap_not_before, reconcile_pending, leased, begun, markers,
    name_lost)."""

    @property
    def redis_down(self) -> bool:
        """An outage is in progress (outage.py): from redis_down to redis_up."""
        return self.outage is not None

    def redis_ready(self, now: float) -> bool:
        return now >= self.retry_at

    def redis_failed(self, e: BaseException, now: float, during: str) -> None:
        """A Redis call failed.  Only a failure to reach Redis is an outage (redis_down,
        a reconcile when it is back).  A key of the wrong type is that key's: our
        scripts name it, and one that does not (Redis's own WRONGTYPE) is found by
        asking every key's type.  Any other error reply (OOM, MISCONF, NOPERM, a script's
        error) is Redis refusing a command: said once per place, a reconcile once it
        passes (a script may have stopped half way), and retried with the backoff; a
        duty refused while the rest is served waits alone, up to REFUSED_MAX."""
        kind = classify(e)
        if kind == "moving":
            self.slot_moving(e, now, during)
            return
        if kind == "refused" and during == "duties":
            self._duty_backoff = min(REFUSED_MAX, max(1.0, self._duty_backoff * 2))
            self.duties_at = now + self._duty_backoff
        else:
            self._backoff = min(BACKOFF_MAX, max(0.05, self._backoff * 2))
            self.retry_at = now + self._backoff
        if kind == "down":
            if self.outage is None:
                self.outage = Outage(now)
                self.hooks.emit("redis_down", error=str(e), during=during)
            self.outage.failed()
        elif kind == "wrongtype":
            named = culprit(e)
            if named is not None:
                self.rq.unusable.add(*named)
            elif self.probe_at is None:  # (at most one probe per RECHECK_EVERY)
                self.probe_at = max(now, self.recheck_at - RECHECK_EVERY + 1.0)
        elif during in self.refusals and self.refusals[during][0] == str(e):
            self.refusals[during] = (str(e), now)  # (said already)
        else:
            self.refusals[during] = (str(e), now)
            self.rq.suspect = True
            self.hooks.emit("redis_error", error=str(e), during=during,
                            note="Redis refused a command (this is not an outage: Redis "
                                 "answers); redpool retries with backoff, and says "
                                 "redis_error_cleared once it goes through")

    def redis_ok(self, now: float, during: str | None = None) -> None:
        if self.refusals:
            # cleared where it went through; a refusal of a call that reports no success
            # of its own (a waiter's, a crash count's), once a minute has passed without it
            for where in [w for w, (_, at) in self.refusals.items()
                          if w == during or (w not in OWN_SUCCESS and now - at > QUIET)]:
                del self.refusals[where]
                self.hooks.emit("redis_error_cleared", during=where)
        if during == "duties":
            self._duty_backoff = 0.0
        if during in OWN_SUCCESS:
            self._moving_backoff = 0.0
            if self.moving_since is not None and now - self.moving_last > MOVING_QUIET:
                self.hooks.emit("slot_moved", waited=round(self.moving_last - self.moving_since, 3))
                self.moving_since = None
        o = self.outage
        if o is not None and o.back_at is None:
            self.back(now, o)
            return
        self._backoff = 0.0
        if o is not None and o.over(now):
            self.outage = None
            self.hooks.emit("redis_up", **o.summary())

    def back(self, now: float, o: Outage) -> None:
        """Redis answers again after a failure to reach it: renew first, then make our
        processing lists hold what we hold (a reply lost with the connection may hide a
        script that ran).  The outage goes on until that has gone through and nothing
        failed for UP_AFTER (outage.py)."""
        self.next_renew = now  # renew first thing; others need a moment to renew theirs
        self.reap_not_before = now + self.cfg.lease / 3 + BACKOFF_MAX + 1.0
        try:
            if not self.check_dataset(now, "outage"):  # (a server back empty: first of all)
                self.report_dropped(now)
            self.reconcile()
        except redis.RedisError as e:
            # (the backoff goes on growing: a reconcile that keeps failing while other
            # calls succeed -- a Redis Cluster node away -- must not spin)
            self.redis_failed(e, now, "reconcile")
            if classify(e) in ("refused", "wrongtype"):
                o.back_at = now  # (said, and retried on its own; a slot moving: again)
            return
        o.back_at = now
        self._backoff = 0.0

    def slot_moving(self, e: BaseException, now: float, during: str) -> None:
        """A Redis Cluster slot of ours is moving between nodes and its keys are split
        for now (TRYAGAIN: the command did not run; redirects.py).  Not an outage and
        not a refusal: no reconcile, and short growing sleeps (MOVING_MIN..MOVING_MAX)
        rather than the outage's backoff, so that the queue is served again within a
        moment of its keys being on one node.  Said once (``slot_moving``), and
        ``slot_moved`` once calls go through and none met it for MOVING_QUIET."""
        self._moving_backoff = min(MOVING_MAX, max(MOVING_MIN, self._moving_backoff * 2))
        if during == "duties":
            self.duties_at = now + self._moving_backoff
        else:
            self.retry_at = now + self._moving_backoff
        self.moving_last = now
        if self.moving_since is None:
            self.moving_since = now
            self.hooks.emit("slot_moving", error=str(e), during=during,
                            note="a Redis Cluster reshard is moving a queue's slot: its "
                                 "scripts wait until the slot is assigned to one node "
                                 "(docs/deploy.md, \"Resharding\")")

    # -- keys of the wrong type (keytypes.py) -------------------------------------------------

    def check_types(self, now: float, probe: bool = False) -> None:
        """Ask the type of the keys found of the wrong type (every RECHECK_EVERY s while
        there are any) and, with ``probe``, of every key we use: one round trip.  What
        holds another type is said and passed over; what is fixed is served again."""
        u = self.rq.unusable
        self.probe_at = None
        self.recheck_at = now + RECHECK_EVERY
        keys = list(dict.fromkeys([*u.bad, *(self.rq.probe_keys() if probe else ())]))
        errors: list = []
        types = self.rq.key_types(keys, errors=errors)
        self.types_answered(errors, now)
        for key, type_ in types.items():
            bad = u.bad.get(key)
            if bad is None:
                u.add(key, type_)
            elif bad.restoring:
                continue   # (apply_fixes has it)
            elif type_ in ("none", bad.expected) and bad.kind == "processing" and bad.ours:
                bad.restoring = True   # cleared once our jobs are back in it (apply_fixes)
                self.fixed.append(bad)
            elif type_ in ("none", bad.expected):
                self.fixed.append(u.clear(key))
        self.apply_fixes()

    def types_answered(self, errors: list, now: float) -> None:
        """Say, once, that Redis refused TYPE (an ACL user without ``+type``): keys of
        the wrong type are then neither found nor seen fixed.  A node away (an outage,
        said elsewhere) or a slot moving only leaves its keys for the next look."""
        refused = [e for e in errors if classify(e) == "refused"]
        if not refused:
            if "types" in self.refusals and not errors:
                del self.refusals["types"]
                self.hooks.emit("redis_error_cleared", during="types")
            return
        e = refused[0]
        said = self.refusals.get("types")
        self.refusals["types"] = (str(e), now)
        if said is not None and said[0] == str(e):
            return
        grant = " grant the worker's ACL user +type (`redpool acl worker` prints its rules);" \
            if isinstance(e, redis.exceptions.NoPermissionError) or "NOPERM" in str(e) else ""
        self.hooks.emit("redis_error", error=str(e), during="types",
                        note=f"Redis refused TYPE, which finds keys another program wrote "
                             f"another type into and sees them fixed:{grant} until it "
                             f"answers, such keys are not looked at")

    def apply_fixes(self) -> None:
        """Keys of the wrong type were fixed (deleted, renamed away).  Completions they
        held back go again (RedisQueue._keys_changed); our processing list, if it was
        one, first gets back the jobs we hold (the other program's write destroyed them
        in Redis, not here), and only then are the completions it held back released
        (before, they would find their jobs gone, and their answers be dropped); jobs a
        refused requeue left in our lists go back to their queues (a reconcile); a lease
        key, our name again.  A Redis error leaves the rest for the next tick."""
        while self.fixed:
            bad = self.fixed[0]
            if bad.kind == "processing" and bad.ours:
                self.restore_held((), queues={bad.queue})
                self.rq.unusable.clear(bad.key)   # (releases what it held back)
            if bad.kind == "dataset" and self.begun:
                self.markers = self.rq.claim_markers()
            if bad.kind in ("queue", "processing", "scheduled") or bad.ours:
                self.reconcile_pending = True
            if bad.kind in ("lease", "supervisors"):
                self.leased = False   # (re-registers, then reconciles)
            self.fixed.pop(0)

    def rescue_overwritten(self) -> int:
        """At an orderly stop: the jobs we hold of a processing list another program
        overwrote exist nowhere else now (Redis replaced them).  Those that finished are
        answered (their completions were held back), not run again; the others go back
        to the head of their queue, unless that is of the wrong type too (and so do
        finished ones that cannot be answered: a dead-letter list or scheduled set of
        the wrong type too, or Redis Cluster).  Returns how many went back."""
        u = self.rq.unusable
        lost = {b.queue for b in u.bad.values() if b.kind == "processing" and b.ours}
        lost -= {b.queue for b in u.bad.values() if b.kind == "queue"}
        if not lost or self.sup is None:
            return 0
        try:   # (first: what finished leaves what we hold)
            self.rq.answer_orphans(lost)
        except redis.RedisError:
            pass   # not answered: they go back with the others, to run again
        held = [(q, raw) for (q, raw), n in self.sup.held().items() if q in lost
                for _ in range(n)]
        return self.rq.rescue(held) if held else 0

    def begin_late(self, now: float) -> None:
        """begin(), once the key that deferred it at start is fixed."""
        try:
            self.begin(now)
        except NameInUse as e:
            self.name_lost = True
            self.hooks.emit("name_taken", error=str(e))
            self.sup.lifecycle.stop_now()
            return
        self.hooks.emit("reregistered", epoch=self.lease.epoch)
