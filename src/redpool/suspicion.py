"""RedisQueue.suspect: "a reply was lost, reconcile", raised from any thread, lowered by
the loop once a reconcile went through -- without losing a raise that came meanwhile.

The loop used to reset a plain flag after reconcile(): a waiter thread that raised it
during the reconcile (its BLMOVE timed out on a node that hangs: the move may still run
when the node wakes) was forgotten, and the job it may have moved stayed unreported in
our processing list.  So each raise takes a number from a counter, the loop notes the
last one (``mark``) before it reconciles, and lowers (``lower``) only up to that: a
raise after the mark keeps the flag up for the next tick.  (``itertools.count`` hands
out its numbers atomically under CPython's GIL; a plain ``+= 1`` from two threads may
not.)
"""

from __future__ import annotations

import itertools

_raises = itertools.count(1)


class Suspicion:
    """A descriptor: ``obj.suspect = True`` raises it (``False`` does nothing: only
    ``lower`` lowers, knowing what it saw); reading it says whether a raise is newer
    than the last lowering."""

    def __get__(self, obj, owner=None):
        if obj is None:
            return self
        return getattr(obj, "_suspect_raised", 0) > getattr(obj, "_suspect_lowered", 0)

    def __set__(self, obj, value) -> None:
        if value:
            obj._suspect_raised = next(_raises)


def mark(rq) -> int:
    """The last raise of ``rq.suspect`` so far (taken before a reconcile)."""
    return getattr(rq, "_suspect_raised", 0)


def lower(rq, seen: int) -> None:
    """Lower ``rq.suspect`` up to the raise ``seen`` (mark's): a later one stays up.
    (A stand-in queue with a plain attribute is simply reset.)"""
    if isinstance(getattr(type(rq), "suspect", None), Suspicion):
        rq._suspect_lowered = max(seen, getattr(rq, "_suspect_lowered", 0))
    else:
        rq.suspect = False
