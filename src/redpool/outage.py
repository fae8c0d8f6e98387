"""What counts as one Redis outage, seen from one supervisor.

An outage starts with the first call that fails to reach Redis (any node of a cluster,
the primary behind Sentinel, the one server): ``redis_down``, once.  It ends only when
Redis has answered for UP_AFTER seconds without a single call failing to reach it, and
the reconcile that follows every failure (it touches every queue's node) has gone
through: ``redis_up``, once, with ``duration``, from the first failure to the first
call after the last one, and the number of ``failures`` it took in between.

Why a quiet period rather than the first success: on a Redis Cluster with one primary
away, calls to the other nodes succeed while those to the missing one fail, and after a
failover each client learns the new slot map on its own first failure (the loop's, each
waiter's).  Ending the outage at the first success logged a ``redis_down``/``redis_up``
pair per flap: five to seven per failover, once sixty in five seconds.  Tracking each
node apart would not help the reader either: the daemon works or it does not, and the
error of ``redis_down`` names the node.  So a flap inside an outage is part of it.

UP_AFTER is longer than the longest wait between two tries of anything that reaches
Redis (the loop's backoff, BACKOFF_MAX, and a waiter's, 5 s): a part that is still
failing says so again before the outage is declared over.  The work itself does not
wait for ``redis_up``: every call goes on as soon as Redis answers; only the two log
lines (and the ``redis_down`` flag of the heartbeat, the metrics' ``redpool_redis_up``)
keep to this rule.
"""

from __future__ import annotations

UP_AFTER = 6.0   # seconds without a failure to reach Redis that end an outage


class Outage:
    """One outage in progress.  ``back_at``: when Redis answered again and the reconcile
    went through (None while something still fails)."""

    def __init__(self, now: float) -> None:
        self.since = now
        self.failures = 0
        self.back_at: float | None = None

    def failed(self) -> None:
        """Another call failed to reach Redis: a reconcile is owed again, and the quiet
        period starts afresh."""
        self.failures += 1
        self.back_at = None

    def over(self, now: float) -> bool:
        return self.back_at is not None and now - self.back_at >= UP_AFTER

    def summary(self) -> dict:
        return {"duration": round((self.back_at or self.since) - self.since, 3),
                "failures": self.failures}
