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
  in one step; then the answers are written (nodes.write_answers), and removed from the
  outbox by the next round trip to that node.  A job thus never leaves Redis without
  its answer, and a fenced job writes none.  Answers still in an outbox when we die, or
  when a write fails, are delivered again by our next start (``recover``), a reconcile
  (``settle``), the housekeeping (``promote``) or the reaper: a result key gets the same
  bytes again, and a reply may arrive twice (the envelope's id tells; the Python client
  drops the second).
* **Priority across queues.**  reserve.lua runs per queue, in priority order, until the
  batch is full: the first queue's with the completions, then one round trip per
  further queue visited.
* **One node down is not the whole cluster down.**  Commands go per node
  (nodes.send_by_node), and a node's failure fails only its own queues: completions for
  them wait here, the others go on.
* **One node that hangs is not all nodes slow.**  Its first timeout opens its breaker
  (breaker.py): its commands are not sent until a probe finds it answering, so the
  others' queues keep their speed; a reconcile waits for it (``partial``).
* **The reaper, per queue** (cluster_reaper.py).  A supervisor whose lease expired is
  reaped queue by queue, on the shards that answer, its outboxes delivered once each,
  and its name forgotten last, once every shard was seen.

The standalone path (queue.py, lease.py) is untouched by any of this, and keeps its one
round trip per loop iteration; here an iteration costs two (completions with the first
queue's reservation, then the answers), plus one per further queue it reserves from.
"""
from __future__ import annotations

import json
from collections import defaultdict
from typing import Iterable

import redis

from .breaker import NodeOpen, attach
from .durable import OUTBOX_PAGE as PAGE
from .cluster_reaper import ClusterReaper  # noqa: F401  (it lived here: imported from here)
from .lease import Lease
from .nodes import lost_reply, rerun_unknown, send_by_node, write_answers
from .protocol import Keys
from .keytypes import pairs
from .oversized import Oversized
from .queue import Completion, RedisQueue, Reserved, crash_info, load_script


class ClusterQueue(RedisQueue):
    """RedisQueue for Redis Cluster: same interface, the two-step completion."""

    def __init__(self, r, keys: Keys, name: str, queues: list[str], *,
                 dead_max: int = 10_000, durable=None) -> None:
        super().__init__(r, keys, name, queues, dead_max=dead_max)
        self.durable = durable  # durable.Durable: answers leave outboxes once replicated
        self._complete_q = load_script(r, "complete_cluster")
        self._queue_keys = {q: [keys.fence(name, q), keys.crashes_of(q), keys.queue(q),
                                keys.processing(name, q)] for q in self.queues}
        # Answers delivered but still in their outbox, per queue: removed in the next
        # round trip to that queue's node (by its next completion script, or with the
        # periodic housekeeping), not in one of their own.
        self._delivered: dict[str, list[bytes]] = defaultdict(list)
        # Completions whose node could not be reached, sent again with the next call.
        self._unsent: list[Completion] = []
        # Queues whose answers could not all be written: the housekeeping tries again,
        # skipping the parts of an answer that went through (_progress).
        self._undelivered: set[str] = set()
        self._progress: dict[bytes, set[int]] = {}
        self._paged: dict[str, int] = {}  # queue -> where the housekeeping reads on (PAGE)
        self.breaker = attach(r)  # nodes that hang (breaker.py), shared with the lease

    def exchange(self, done: list[Completion], n: int, epoch: str
                 ) -> tuple[int, int, list[Reserved] | None]:
        """As RedisQueue.exchange, in a pipeline per step: every queue's completion
        script and the first queue's reservation (one round trip, the nodes in
        parallel), the answers (another), then, while the batch is not full, one per
        further queue in priority order.

        One node that cannot be reached must not hold up the others' queues, nor make
        us hoard what they gave.  So ``done`` is always taken over (emptied):
        completions whose node failed stay here and go again with the next call or the
        housekeeping (promote(), settle()); answers that could not be written stay in
        their outbox; a queue whose reservation fails is passed over this time.  The
        first error is raised only when no queue could be reserved from (or, for a
        bare acknowledgement, when one failed), so that the supervisor backs off (and
        reconciles afterwards) without losing track of any job -- unless every error
        is a hung node's NodeOpen (breaker.py): nothing went out, and nothing is due
        before it answers a probe."""
        items, self._unsent = self._unsent + done, []
        done.clear()
        items, hold = self._sendable(items)  # (those a key of the wrong type holds back
        self._settled(hold)                  # wait; taken over, as the rest)
        groups = _by_queue(items)
        calls = [(self._complete_q, self._complete_keys(q),
                  self._complete_args(batch, self._delivered.get(q, ())))
                 for q, batch in groups.items()]
        queues = self._active  # (as the keys were given: a report below may change it)
        if n > 0 and queues:
            calls.append((self._reserve, self._queue_keys[queues[0]],
                          self._reserve_args(n, epoch)))
        try:
            replies = self._scripts(calls, [])
        except BaseException:
            self._unsent[:0] = items  # whether they ran or not: sent again (at worst, missing)
            raise
        errors: list[Exception] = []
        missing, answers = 0, {}
        if any(lost_reply(x) for x in replies):
            self.suspect = True  # a script may have run with its reply lost
        for (q, batch), reply in zip(groups.items(), replies):
            if isinstance(reply, Exception):
                errors.append(reply)
                self._unsent += batch
            else:
                self._delivered.pop(q, None)  # the script removed them from the outbox
                missing += self._unwritten(batch, reply)  # (see RedisQueue.missed)
                answers[q] = reply[1]
        skipped = self._deliver(answers, errors)
        got: list[Reserved] = []
        answered = False  # some queue's reservation went through (empty or not)
        fenced_out = self.passed_over = 0  # (passed over: not seen empty, for --burst)
        if n > 0 and queues:
            counted, flat = False, replies[-1]
            for q in queues:
                if n <= 0:
                    break
                if q != queues[0]:  # (send_by_node: a slot moving is followed)
                    flat = self._scripts([(self._reserve, self._queue_keys[q],
                                           self._reserve_args(n, epoch))], [])[0]
                    if lost_reply(flat):  # (see RedisQueue.suspect)
                        self.suspect = True
                if isinstance(flat, Exception):
                    errors.append(flat)
                    self.passed_over += 1
                    continue
                if not flat[0]:  # that queue's fence is not ours (see ClusterLease)
                    fenced_out += 1
                    continue
                answered = True
                counted = counted or bool(flat[1])
                first = 2
                if flat[0] == 2:  # keys of the wrong type: nothing of that queue moved
                    first = 3
                    self.unusable.found(pairs(flat[2]))
                got += [Reserved(q, flat[i + 1], c) if (c := flat[i + 2]).__class__ is int
                        else Reserved(q, flat[i + 1], *crash_info(c))
                        for i in range(first, len(flat), 3)]
                n -= (len(flat) - first) // 3
            if not errors:
                self.crashes_exist = counted
        if errors and not answered and not all(isinstance(e, NodeOpen) for e in errors):
            raise errors[0]  # (what a hung node holds up waits, said by the breaker: no
            # outage, whose backoff would hold up the duties -- renewal, probes -- too)
        if fenced_out and not answered:
            # Every queue asked says our lease is lost (a frozen host: all fences expired
            # together); one fence alone is set again by the next renewal.
            return missing, skipped, None
        return missing, skipped, got

    def _node(self, q: str):
        """The node of queue ``q``'s slot, as our slot map says (None: none)."""
        try:
            return self.r.get_node_from_key(self.keys.queue(q))
        except Exception:  # (a slot the map does not cover: redis-py raises its own)
            return None

    def read_markers(self) -> dict[str, bytes | None]:
        """As Markers.read_markers, without the markers of a node that hangs: not
        known, which check_dataset takes as unchanged (a node that restarts without
        its data answers, and is read)."""
        keys = self.dataset_keys()
        out = {}
        for k, reply in zip(keys, send_by_node(self.r, [(k, ("GET", k)) for k in keys])):
            if not isinstance(reply, NodeOpen):
                out[k] = _raise_first([reply])[0]
        return out

    @property
    def partial(self) -> bool:
        return bool(self.breaker.open_nodes)

    def node_hangs(self, queue: str, error: BaseException | None = None) -> bool:
        """For the waiter: its BLMOVE timing out opens the breaker of the node it went
        to (send_by_node names it), and may still run when the node wakes (a reconcile
        then, ``suspect``).  Unless our slot map has moved the queue since (a
        failover): then the waiter, connecting anew, learns it too."""
        node = self._node(queue)
        if isinstance(error, redis.TimeoutError):
            if node is not None and getattr(error, "node", None) == node.name:
                self.breaker.trip(node.name, error, node.redis_connection.connection_pool)
            self.suspect = True
        return node is not None and self.breaker.is_open(node.name)

    def _scripts(self, calls: list, trim: list[str]) -> list:
        """Run scripts by EVALSHA in one round trip (send_by_node), after removing the
        delivered answers of the queues ``trim`` from their outboxes (the same node, so
        in that order).  As RedisQueue._evalsha_pipeline: a script a node does not know
        (restarted, SCRIPT FLUSH) answers NOSCRIPT without running, and only that one
        is loaded and sent again.  Errors come back in place of their replies."""
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
        return [rerun_unknown(script, keys, args, reply)
                for reply, (script, keys, args) in zip(out[skip:], calls)]

    def _deliver(self, outboxes: dict[str, list[bytes]], errors: list[Exception]) -> int:
        """Write the answers the completion scripts returned; their removal from the
        outboxes waits for the next round trip to each queue's node.  An answer not
        fully written stays in its outbox (the housekeeping tries again; what of it
        went through is remembered, so a reply is not pushed twice) and its error
        joins ``errors``."""
        written = write_answers(self.r, self.keys, [e for es in outboxes.values() for e in es],
                                self._progress, self.durable)
        for q, entries in outboxes.items():
            for e in entries:
                if e in written.failed:
                    self._undelivered.add(q)
                else:
                    self._progress.pop(e, None)
                    self._delivered[q].append(e)
        self._progress.update(written.failed)
        if written.error is not None:
            errors.append(written.error)
        return written.skipped

    @property
    def unsent(self) -> int:
        return len(self._unsent) + len(self._released)

    def _blmove(self, conn, queue: str, timeout: float) -> bytes | None:
        """BLMOVE through send_by_node: a slot moving is followed (ASK) or said at once
        (TRYAGAIN), not retried 16 times by redis-py between the two nodes (redirects.py);
        its reply read as on one server (``over``: a job over the limit never held whole)."""
        src, dst = self.keys.queue(queue), self._proc_key(queue)
        return _raise_first(send_by_node(conn, [(src, ("BLMOVE", src, dst, "RIGHT", "LEFT",
                                                        timeout))], self.head_over))[0]

    def _each(self, commands: list[tuple[str, tuple]]) -> list:
        """As RedisQueue._each, per node (send_by_node): one round trip."""
        return _raise_first(send_by_node(self.r, commands))

    def _ask(self, commands: list[tuple[str, tuple]]) -> list:
        return send_by_node(self.r, commands)

    def nodes(self) -> list:
        return [n.redis_connection for n in self.r.get_primaries()]

    def complete(self, items: Iterable[Completion]) -> tuple[int, int]:
        """As RedisQueue.complete; the items are taken over (see exchange)."""
        items = items if isinstance(items, list) else list(items)
        return self.exchange(items, 0, "")[:2] if items or self.unsent else (0, 0)

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
                                     c.ttl, c.reply_to or "", str(c.envelope, "utf-8")])
            big = c.raw.__class__ is Oversized  # named by hash (lua/_by_hash.lua)
            args += [c.raw.name if big else c.raw, answer, c.dead or b"", c.retry or b"",
                     -1 if big else int(c.retry_delay * 1000)]
        return args

    def requeue(self, items: list[tuple[str, bytes]]) -> int:
        """RedisQueue.requeue, one script per queue (each keeps its jobs' order).  A
        queue whose node fails keeps its jobs in our processing list, and we ask for a
        reconcile (``suspect``), which puts them back once the node answers: the caller
        may forget them either way, and nothing runs twice.  Raises only if every queue
        failed (then nothing moved, and the caller keeps them)."""
        moved, errors, groups = 0, [], _by_queue(items)
        for q, pairs in groups.items():
            if (node := self._node(q)) is not None and self.breaker.is_open(node.name):
                errors.append(self.breaker.skip(node.name))
                continue
            try:
                moved += super().requeue(pairs)
            except redis.RedisError as e:
                errors.append(e)
        if errors and len(errors) == len(groups):
            raise errors[0]
        if errors:
            self.suspect = True
        return moved

    def promote(self, limit: int = 1000) -> tuple[int, float | None]:
        """Every queue's promote.lua in one round trip, and the housekeeping that rides
        on it (every PROMOTE_EVERY): delivered answers are removed from their outboxes
        on the way, and completions or answers a failed node held up go again.  While
        a node hangs, its breaker is tended (breaker.py: the slot map learned anew)."""
        self.breaker.tend(self.r, self.unusable.emit)  # (emit: the hooks', set by Duties)
        if self.durable is not None:
            self.durable.tell(self.unusable.emit)  # (a node that refuses WAIT, said once)
        try:  # best effort: what a node away holds up waits for the next round
            if self._unsent:
                self.complete([])
            for q in list(self._undelivered):
                node = self._node(q)
                if node is None or self.breaker.is_open(node.name):
                    continue  # (its outbox's node hangs: later)
                # a page a tick, not the whole outbox: one that grew costs no more per tick
                at = self._paged.pop(q, 0)
                entries = self.r.lrange(self.keys.outbox(self.name, q), at, at + PAGE - 1)
                self._undelivered.discard(q)  # (those not confirmed bring it back)
                trimmed = set(self._delivered[q])  # (removed below, by _scripts)
                fresh = [e for e in entries if e not in trimmed]
                self._deliver({q: fresh}, [])
                if len(entries) == PAGE:  # more: read on past those that stay
                    self._undelivered.add(q)
                    self._paged[q] = at + sum(e in self._progress for e in fresh)
        except redis.RedisError:
            pass
        replies = self._scripts(
            [(self._promote, [self.keys.scheduled(q), self.keys.queue(q)], [limit])
             for q in self._active], list(self._delivered))
        if replies and all(isinstance(x, Exception) for x in replies):
            _raise_first(replies)
        replies = [x for x in replies if not isinstance(x, Exception)]  # a node away: later
        for _, _, broken in replies:
            self.unusable.found(pairs(broken))
        due = [int(ms) / 1000 for _, ms, _ in replies if int(ms) >= 0]
        return sum(int(m) for m, _, _ in replies), min(due) if due else None

    def settle(self) -> int:
        """Before a reconcile: send the completions a failed node held up, then write
        what our outboxes hold (answers accepted before a lost reply or a crash, or
        left by a failed write; parts already written are not written again).  Returns
        how many answers.  Raises if a node is still away: a reconcile must not take
        finished jobs for strays, and it needs every node's lists anyway."""
        if self._unsent:
            self.complete([])
            if self._unsent:
                raise redis.ConnectionError("completions wait for a Redis Cluster node")
        errors: list[Exception] = []
        count = 0
        self._undelivered.clear()  # (what is still not written or confirmed comes back)
        for key in list(self.r.scan_iter(match=self.keys.outbox_pattern(self.name), count=1000)):
            q = self.keys.queue_of_outbox(self.name, key.decode())
            entries = [e for e in self.r.lrange(key, 0, -1) if e not in self._delivered[q]]
            self._deliver({q: entries}, errors)
            count += len(entries)
        _raise_first(errors)
        return count

    def recover(self, *, crashed: bool) -> dict[str, int]:
        """At start and at an orderly stop: settle, and trim what was delivered (so a
        restart does not deliver it again), then put back what our lists hold."""
        self.settle()
        _raise_first(self._scripts([], list(self._delivered)))
        return super().recover(crashed=crashed)

    def close(self) -> None:
        pass  # no hot-path connection of our own: RedisCluster holds one pool per node


class ClusterLease(Lease):
    """Lease plus a fence per queue in that queue's slot (fence.lua).

    The lease decides: it is lost only when its own hash says so.  A fence whose node
    cannot be reached is passed over (its queue is not reserved from meanwhile: the
    fence is missing or stale there), and set again by the next renewal that reaches
    it; so one node away does not stop the queues of the others."""

    def __init__(self, r, keys: Keys, name: str, queues: list[str]) -> None:
        super().__init__(r, keys, name)
        self.queues = list(queues)
        self._fence = load_script(r, "fence")

    def register(self, info: dict, lease: float, **kwargs) -> None:
        super().register(info, lease, **kwargs)
        self._fences("set", lease, self.queues)

    def renew(self, info: dict, lease: float) -> bool:
        """The lease, then each fence.  A fence found lost while the lease held (it
        outlived a node's absence, or the TTLs drifted) is set again: with our lease
        alive all along, no reaper can have taken that queue's jobs."""
        if not super().renew(info, lease):
            return False
        renewed = self._fences("renew", lease, self.queues)
        self._fences("set", lease, [q for q, ok in zip(self.queues, renewed) if ok == 0])
        return True

    def unregister(self) -> None:
        self._fences("drop", 0, self.queues)
        super().unregister()

    def _fences(self, op: str, lease: float, queues: list[str]) -> list:
        """fence.lua for each queue, in one round trip: 1 done, 0 not ours, or the
        error of a node that could not be reached."""
        keys = [self.keys.fence(self.name, q) for q in queues]
        args = [op, self.epoch, int(lease * 1000)]
        out = send_by_node(self.r, [(k, ("EVALSHA", self._fence.sha, 1, k, *args)) for k in keys])
        return [rerun_unknown(self._fence, [k], args, reply) for k, reply in zip(keys, out)]


def _raise_first(replies: list) -> list:
    for reply in replies:
        if isinstance(reply, Exception):
            raise reply
    return replies


def _by_queue(items: list) -> dict[str, list]:
    """Completions, or (queue, raw) pairs, grouped by their queue (first seen first)."""
    groups: dict[str, list] = defaultdict(list)
    for item in items:
        groups[item.queue if isinstance(item, Completion) else item[0]].append(item)
    return groups
