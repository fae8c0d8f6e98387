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
from .topology import unreachable_as_connection_error
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
        # Answers delivered but still in their outbox, per queue: removed in the next
        # round trip to that queue's node (by its next completion script, or with the
        # promotion every PROMOTE_EVERY), not in one of their own.
        self._delivered: dict[str, list[bytes]] = defaultdict(list)

    def exchange(self, done: list[Completion], n: int, epoch: str
                 ) -> tuple[int, int, list[Reserved] | None]:
        """As RedisQueue.exchange.  One pipeline carries every queue's completion
        script and the first queue's reservation (a round trip: one node, or a few in
        parallel); then the answers are delivered (another); then, while the batch is
        not full, one round trip per further queue, in priority order.  ``done`` keeps
        only what was not acknowledged when a Redis error interrupts."""
        groups = _by_queue(done)
        calls = [(self._complete_q, self._complete_keys(q),
                  self._complete_args(items, self._delivered.get(q, ())))
                 for q, items in groups.items()]
        if n > 0:
            calls.append((self._reserve, self._queue_keys[self.queues[0]],
                          [min(n, MAX_RESERVE), epoch]))
        replies = self._scripts(calls, [])
        acknowledged = {q for q, reply in zip(groups, replies) if not isinstance(reply, Exception)}
        done[:] = [c for c in done if c.queue not in acknowledged]
        for q in acknowledged:  # the script removed them from the outbox
            self._delivered.pop(q, None)
        _raise_first(replies)  # answers already in an outbox are delivered by settle()
        missing = sum(int(m) for m, _ in replies[:len(groups)])
        skipped = self._deliver({q: e for q, (_, e) in zip(groups, replies)})
        if n <= 0:
            return missing, skipped, []
        got: list[Reserved] = []
        counted = False
        flat = replies[-1]
        for q in self.queues:
            if q != self.queues[0]:
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
        self.crashes_exist = counted
        return missing, skipped, got

    def _scripts(self, calls: list, trim: list[str]) -> list:
        """Run scripts in one cluster pipeline, after removing the delivered answers of
        the queues ``trim`` from their outboxes (the same node, so in that order).  As
        RedisQueue._evalsha_pipeline: a script a node does not know (restarted, SCRIPT
        FLUSH) answers NOSCRIPT without running, and only that one is loaded and sent
        again.  Errors are returned in place of their replies (_raise_first): the
        calls that went through must count as done."""
        commands = []
        trimmed = [q for q in trim if self._delivered.get(q)]
        for q in trimmed:
            box = self.keys.outbox(self.name, q)
            commands += [(box, ("LREM", box, 1, raw)) for raw in self._delivered[q]]
        skip = len(commands)
        commands += [(keys[0], ("EVALSHA", script.sha, len(keys), *keys, *args))
                     for script, keys, args in calls]
        out = send_by_node(self.r, commands)
        if not any(isinstance(x, Exception) for x in out[:skip]):
            for q in trimmed:  # else they are removed next time (LREM of a gone one: a no-op)
                del self._delivered[q]
        replies = out[skip:]
        for i, (reply, (script, keys, args)) in enumerate(zip(replies, calls)):
            if isinstance(reply, redis.exceptions.NoScriptError):
                try:
                    replies[i] = script(keys=keys, args=args)
                except redis.RedisError as e:
                    replies[i] = e
        return replies

    def _deliver(self, outboxes: dict[str, list[bytes]]) -> int:
        """Write the answers the completion scripts returned; their removal from the
        outboxes waits for the next round trip to each queue's node."""
        skipped = write_answers(self.r, self.keys, [e for es in outboxes.values() for e in es])
        for q, entries in outboxes.items():
            self._delivered[q].extend(entries)
        return skipped

    def complete(self, items: Iterable[Completion]) -> tuple[int, int]:
        """As RedisQueue.complete; a list passed in is emptied once acknowledged."""
        items = items if isinstance(items, list) else list(items)
        return self.exchange(items, 0, "")[:2] if items else (0, 0)

    def _complete_keys(self, q: str) -> list[str]:
        k = self.keys
        return [self._proc_key(q), k.outbox(self.name, q), k.dead_of(q), k.crashes_of(q),
                k.scheduled(q)]

    def _complete_args(self, items: list[Completion], delivered=()) -> list:
        args: list = [self.dead_max, len(delivered), *delivered]
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
        """Every queue's promote.lua in one pipeline; delivered answers are removed from
        their outboxes on the way (so they wait there at most PROMOTE_EVERY)."""
        replies = _raise_first(self._scripts(
            [(self._promote, [self.keys.scheduled(q), self.keys.queue(q)], [limit])
             for q in self.queues], list(self._delivered)))
        due = [int(ms) / 1000 for _, ms in replies if int(ms) >= 0]
        return sum(int(m) for m, _ in replies), min(due) if due else None

    def settle(self) -> int:
        """Deliver what our outboxes hold (answers accepted before a lost reply or a
        crash); returns how many."""
        self._scripts([], list(self._delivered))
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
    """Write the answers of an outbox's ``entries`` and remove them from it (by value:
    two deliverers racing cannot drop an entry the other has not written).  Returns
    the replies skipped (write_answers)."""
    if not entries:
        return 0
    skipped = write_answers(r, keys, entries)
    pipe = r.pipeline(transaction=False)
    for raw in entries:
        pipe.lrem(outbox, 1, raw)
    pipe.execute()
    return skipped


def write_answers(r, keys: Keys, entries: list[bytes]) -> int:
    """Write outbox entries' answers (result keys, reply lists) into their own slots,
    one pipeline per node (send_by_node).  Returns the replies skipped: a reply_to that
    is one of our own keys (it could be a queue), holds another type, or that our ACL
    user may not write.  Any other error propagates: the entries stay in their outbox,
    to be delivered again."""
    own, replies = (f"{keys.ns}:", f"{{{keys.ns}}}:"), keys.reply("")
    commands: list[tuple] = []
    pushes: set[int] = set()  # where each reply's LPUSH is (its EXPIRE next)
    skipped = 0
    for raw in entries:
        result_key, ttl, reply_to, env = json.loads(raw)
        if result_key and ttl > 0:
            commands.append((result_key, ("SET", result_key, env, "EX", ttl)))
        if reply_to and reply_to.startswith(own) and not reply_to.startswith(replies):
            skipped += 1
        elif reply_to:
            pushes.add(len(commands))
            commands += [(reply_to, ("LPUSH", reply_to, env)),
                         (reply_to, ("EXPIRE", reply_to, ttl if ttl > 0 else
                                     REPLY_TTL_WHEN_NO_RESULT))]
    for i, reply in enumerate(send_by_node(r, commands)):
        if not isinstance(reply, Exception):
            continue
        if not isinstance(reply, redis.ResponseError) or not ({i, i - 1} & pushes):
            raise reply  # not the reply's fault (WRONGTYPE, NOPERM): deliver again later
        skipped += i in pushes
    return skipped


def send_by_node(r, commands: list[tuple[str, tuple]]) -> list:
    """Commands, each given as (the key that routes it, the command), all of whose keys
    share that key's slot: packed and sent per node on one of its connections, every
    node's writes before any read.  One round trip however many nodes, and none of a
    ClusterPipeline's per-command cost: ~30 us of CPU each, more than the rest of a
    tiny job's handling, and for EVALSHA a COMMAND GETKEYS round trip to the server to
    find the keys (measured: 4,900 -> 12,600 jobs/s for the supervisor's side alone).
    Replies in order, a ResponseError in place of its reply.  A command redirected
    (MOVED, ASK: slots moving) or refused with TRYAGAIN goes again through the client,
    which follows the cluster and refreshes its map."""
    if not commands:
        return []
    by_node: dict = defaultdict(list)
    with unreachable_as_connection_error():
        for i, (key, _) in enumerate(commands):
            by_node[r.get_node_from_key(key).name].append(i)
    replies: list = [None] * len(commands)
    held = []
    try:
        for name, idx in by_node.items():
            conn = r.get_node(node_name=name).redis_connection.connection_pool.get_connection()
            held.append((conn, name, idx))
            conn.send_packed_command(conn.pack_commands([commands[i][1] for i in idx]))
        for conn, _, idx in held:
            for i in idx:
                try:
                    replies[i] = conn.read_response()
                except redis.ResponseError as e:  # read in full: the connection stays in step
                    replies[i] = e
    except BaseException:
        for conn, _, _ in held:
            conn.disconnect()  # a reply may be half read
        raise
    finally:
        for conn, name, _ in held:
            r.get_node(node_name=name).redis_connection.connection_pool.release(conn)
    for i, reply in enumerate(replies):
        if isinstance(reply, (redis.exceptions.AskError, redis.exceptions.TryAgainError)):
            try:  # (MovedError is an AskError)
                replies[i] = r.execute_command(*commands[i][1])
            except redis.ResponseError as e:
                replies[i] = e
    return replies


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


def _raise_first(replies: list) -> list:
    for reply in replies:
        if isinstance(reply, Exception):
            raise reply
    return replies


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
