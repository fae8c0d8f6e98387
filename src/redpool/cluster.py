"""Redis Cluster: the supervisor's Redis side when every queue lives in its own slot.

On one server each change is one script over whatever keys it needs.  On Redis Cluster a
script may touch one slot only, so the key layout gives every key of one queue that
queue's hash tag (keys.py, ``Keys(cluster=True)``), and what spans slots is done
differently, keeping the same guarantees:

* **Fencing per queue.**  reserve.lua checks our lease epoch, which lives in the lease
  hash, in another slot.  So registration also writes the epoch into a per-queue fence,
  ``<ns>:lease:<sup>:{q}``, with the lease's TTL, renewed with the lease (fence.lua);
  reserve.lua checks the fence instead.  A lost fence is a lost lease.
* **Completion in two steps.**  The result key and the reply list hash to slots of their
  own.  complete_cluster.lua, in the queue's slot, removes each job from our processing
  list and -- only if it was there -- puts its answer on our outbox for that queue, all
  in one step; then ``deliver()`` writes the answers and removes them from the outbox.  A
  job thus never leaves Redis without its answer, and a fenced job writes none.  If we
  die between the steps, our next start (``recover``), a reconcile (``settle``) or the
  reaper delivers the outbox: a result key is written again (the same bytes), and a
  reply may arrive twice (the envelope's id tells; the Python client drops the second).
* **Priority across queues.**  reserve.lua runs per queue, in priority order, until the
  batch is full: one round trip per queue visited (one, while the first has work).
* **The reaper, per queue.**  A supervisor whose lease expired is reaped queue by queue
  (reap_queue.lua, which finds the fence expired too), its outboxes delivered, and its
  name forgotten last (forget.lua), so a round cut short is finished by the next.

The standalone path (queue.py, lease.py) is untouched by any of this, and keeps its one
round trip per loop iteration; here an iteration costs one round trip per queue touched,
plus one per queue whose answers are delivered.
"""

from __future__ import annotations

import json
from collections import defaultdict
from typing import Iterable

import redis

from .lease import Lease, Reaper
from .protocol import Keys
from .queue import MAX_RESERVE, REPLY_TTL_WHEN_NO_RESULT, Completion, RedisQueue, Reserved, load_script


class ClusterQueue(RedisQueue):
    """RedisQueue for Redis Cluster: same interface, the two-step completion."""

    def __init__(self, r, keys: Keys, name: str, queues: list[str], *,
                 dead_max: int = 10_000) -> None:
        super().__init__(r, keys, name, queues, dead_max=dead_max)
        self._complete_q = load_script(r, "complete_cluster")
        self._queue_keys = {q: [keys.fence(name, q), keys.crashes_of(q), keys.queue(q),
                                keys.processing(name, q)] for q in self.queues}

    def exchange(self, done: list[Completion], n: int, epoch: str
                 ) -> tuple[int, int, list[Reserved] | None]:
        """As RedisQueue.exchange, in a round trip per queue.  ``done`` is acknowledged
        queue by queue, and each queue's completions leave ``done`` as they are
        acknowledged: on a Redis error midway, ``done`` holds only the rest."""
        missing = skipped = 0
        for q, items in _by_queue(done).items():
            m, entries = self._complete_q(keys=self._complete_keys(q),
                                          args=self._complete_args(items))
            done[:] = [c for c in done if c.queue != q]
            missing += int(m)
            skipped += deliver(self.r, self.keys, self.keys.outbox(self.name, q), entries)
        got: list[Reserved] = []
        counted = False
        for q in self.queues:
            if n <= 0:
                break
            flat = self._reserve(keys=self._queue_keys[q], args=[min(n, MAX_RESERVE), epoch])
            if not flat[0]:
                # Jobs taken from earlier queues in this call are in our processing lists:
                # the re-registration that follows reconciles them back to their queues.
                return missing, skipped, None
            counted = counted or bool(flat[1])
            got += [Reserved(q, flat[i + 1], int(flat[i + 2])) for i in range(2, len(flat), 3)]
            n -= (len(flat) - 2) // 3
        if got or n > 0:
            self.crashes_exist = counted
        return missing, skipped, got

    def complete(self, items: Iterable[Completion]) -> tuple[int, int]:
        """As RedisQueue.complete; a list passed in keeps what was not acknowledged."""
        items = items if isinstance(items, list) else list(items)
        return self.exchange(items, 0, "")[:2] if items else (0, 0)

    def _complete_keys(self, q: str) -> list[str]:
        k = self.keys
        return [self._proc_key(q), k.outbox(self.name, q), k.dead_of(q), k.crashes_of(q),
                k.scheduled(q)]

    def _complete_args(self, items: list[Completion]) -> list:
        args: list = [self.dead_max]
        for c in items:
            answer = b""
            if c.envelope is not None and (c.result_id or c.reply_to):
                answer = json.dumps([self.keys.result(c.result_id) if c.result_id else "",
                                     c.ttl, c.reply_to or "", c.envelope.decode()])
            args += [c.raw, answer, c.dead or b"", c.retry or b"", int(c.retry_delay * 1000)]
        return args

    def requeue(self, items: list[tuple[str, bytes]]) -> int:
        """RedisQueue.requeue, one script per queue (each keeps its jobs' order)."""
        return sum(super(ClusterQueue, self).requeue([(q, raw) for raw in raws])
                   for q, raws in _grouped(items).items())

    def promote(self, limit: int = 1000) -> tuple[int, float | None]:
        moved, until = 0, None
        for q in self.queues:
            m, ms = self._promote(keys=[self.keys.scheduled(q), self.keys.queue(q)], args=[limit])
            moved += int(m)
            if int(ms) >= 0 and (until is None or int(ms) / 1000 < until):
                until = int(ms) / 1000
        return moved, until

    def settle(self) -> int:
        """Deliver what our outboxes hold (answers accepted before a lost reply or a
        crash); returns how many."""
        count = 0
        for key in list(self.r.scan_iter(match=self.keys.outbox_pattern(self.name), count=1000)):
            entries = self.r.lrange(key, 0, -1)
            deliver(self.r, self.keys, key.decode(), entries)
            count += len(entries)
        return count

    def recover(self, *, crashed: bool) -> dict[str, int]:
        self.settle()
        return super().recover(crashed=crashed)

    def close(self) -> None:
        pass  # no hot-path connection of our own: RedisCluster holds one pool per node


def deliver(r, keys: Keys, outbox: str, entries: list[bytes]) -> int:
    """Write the answers of an outbox's ``entries`` (result keys, reply lists) into their
    own slots, then remove those entries from the outbox.  Returns the replies skipped:
    a reply_to that is one of our own keys (it could be a queue), holds another type,
    or that our ACL user may not write.  Any other error propagates and leaves the
    entries in the outbox, to be delivered again."""
    if not entries:
        return 0
    own, replies = (f"{keys.ns}:", f"{{{keys.ns}}}:"), keys.reply("")
    pipe = r.pipeline(transaction=False)
    pushes: set[int] = set()  # where in the pipeline each reply's LPUSH is (EXPIRE next)
    skipped = 0
    for raw in entries:
        result_key, ttl, reply_to, env = json.loads(raw)
        if result_key and ttl > 0:
            pipe.set(result_key, env, ex=ttl)
        if reply_to and reply_to.startswith(own) and not reply_to.startswith(replies):
            skipped += 1
        elif reply_to:
            pushes.add(len(pipe))
            pipe.lpush(reply_to, env)
            pipe.expire(reply_to, ttl if ttl > 0 else REPLY_TTL_WHEN_NO_RESULT)
    out = pipe.execute(raise_on_error=False) if len(pipe) else []
    for i, reply in enumerate(out):
        if not isinstance(reply, Exception):
            continue
        if not isinstance(reply, redis.ResponseError) or not ({i, i - 1} & pushes):
            raise reply  # not the reply's fault (WRONGTYPE, NOPERM): deliver again later
        skipped += i in pushes
    pipe = r.pipeline(transaction=False)
    for raw in entries:
        pipe.lrem(outbox, 1, raw)
    pipe.execute()
    return skipped


class ClusterLease(Lease):
    """Lease plus a fence per queue in that queue's slot (fence.lua)."""

    def __init__(self, r, keys: Keys, name: str, queues: list[str]) -> None:
        super().__init__(r, keys, name)
        self.queues = list(queues)
        self._fence = load_script(r, "fence")

    def register(self, info: dict, lease: float, **kwargs) -> None:
        super().register(info, lease, **kwargs)
        self._fences("set", lease)

    def renew(self, info: dict, lease: float) -> bool:
        """The lease, then each fence.  A fence found lost while the lease held (it
        outlived a shard's absence, or the TTLs drifted) is set again: with our lease
        alive all along, no reaper can have taken that queue's jobs."""
        if not super().renew(info, lease):
            return False
        for q, ok in zip(self.queues, self._fences("renew", lease)):
            if not ok:
                self._fence(keys=[self.keys.fence(self.name, q)],
                            args=["set", self.epoch, int(lease * 1000)])
        return True

    def unregister(self) -> None:
        self._fences("drop", 0)
        super().unregister()

    def _fences(self, op: str, lease: float) -> list[bool]:
        return [bool(self._fence(keys=[self.keys.fence(self.name, q)],
                                 args=[op, self.epoch, int(lease * 1000)]))
                for q in self.queues]


class ClusterReaper(Reaper):
    """Reaper, queue by queue: reap_queue.lua in each queue's slot, then forget.lua."""

    def __init__(self, r, keys: Keys, name: str) -> None:
        super().__init__(r, keys, name)
        self._reap_queue = load_script(r, "reap_queue")
        self._forget = load_script(r, "forget")

    def reap(self, dead: str) -> int:
        k = self.keys
        queues = {k.queue_of_processing(dead, key.decode())
                  for key in self.r.scan_iter(match=k.processing_pattern(dead), count=1000)}
        boxes = {k.queue_of_outbox(dead, key.decode())
                 for key in self.r.scan_iter(match=k.outbox_pattern(dead), count=1000)}
        moved, done = 0, True
        for q in sorted(queues | boxes):
            n = int(self._reap_queue(keys=[k.fence(dead, q), k.processing(dead, q), k.queue(q),
                                           k.crashes_of(q)]))
            if n < 0:  # its fence for this queue is alive: not dead there (yet)
                done = False
                continue
            moved += n
            box = k.outbox(dead, q)
            deliver(self.r, k, box, self.r.lrange(box, 0, -1))
        if done:
            self._forget(keys=[k.supervisor(dead), k.supervisors], args=[dead])
        return moved


def _by_queue(done: list[Completion]) -> dict[str, list[Completion]]:
    groups: dict[str, list[Completion]] = defaultdict(list)
    for c in done:
        groups[c.queue].append(c)
    return groups


def _grouped(items: list[tuple[str, bytes]]) -> dict[str, list[bytes]]:
    groups: dict[str, list[bytes]] = defaultdict(list)
    for q, raw in items:
        groups[q].append(raw)
    return groups
