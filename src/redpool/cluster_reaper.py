"""Redis Cluster: the reaper, queue by queue and shard by shard.

A supervisor whose lease expired is reaped queue by queue: reap_queue.lua in each
queue's slot (it finds that queue's fence expired too) puts its jobs back, then the
answers its outbox for that queue holds are written, and its name is forgotten last
(forget.lua).  What a node away must not do to that:

* **Stop the shards that answer.**  The dead supervisor's queues are found by SCAN node
  by node; a node that is away (refused, timed out, its breaker open: breaker.py) is
  passed over, as is a queue whose node fails meanwhile.  The jobs on the other shards
  are put back now; the rest by a later round, once their node is back.  (One SCAN
  over every primary failed as a whole: the healthy shards' jobs waited for the node.)
* **Push a reply twice.**  An outbox entry has two parts, written into their own slots:
  the result key and the reply.  With a node away one may go through and not the
  other.  An entry written whole is removed from the outbox; one written in part is
  replaced there by what is left of it (narrow.lua: the written part emptied).  The
  progress lives in Redis, not in this process: the next round may be another
  supervisor's reaper (the lock goes to whoever asks first), and it must not write
  the reply again.  With durable results (durable.py) an entry stays whole until a
  replica has every part of it, which needs them all written again (the same bytes, or
  a probe key for a reply already pushed): then, as for ClusterQueue, what went through
  is remembered in this process (``_progress``), as before.
* **Forget too soon.**  The name goes only after a round in which every primary
  answered, every queue found was reaped and its outbox emptied, and a fresh look
  found nothing left (a key moving between nodes can escape one SCAN, and a forgotten
  name is never reaped).
"""

from __future__ import annotations

import json

import redis

from .breaker import attach
from .lease import Reaper
from .nodes import rerun_unknown, send_by_node, write_answers
from .protocol import Keys
from .queue import load_script


class ClusterReaper(Reaper):
    """Reaper, queue by queue, on the shards that answer (see the module's text)."""

    def __init__(self, r, keys: Keys, name: str, durable=None) -> None:
        super().__init__(r, keys, name)
        self.durable, self._progress = durable, {}  # (as ClusterQueue's)
        self._reap_queue = load_script(r, "reap_queue")
        self._forget = load_script(r, "forget")
        self._narrow = load_script(r, "narrow")
        self.breaker = attach(r)
        self._forgotten: set[str] = set()

    def run(self, lock_seconds: float = 1.0, wrongtype=None) -> dict[str, int]:
        """As Reaper.run, leaving out a dead supervisor of which this round neither
        moved a job nor forgot the name (its fence alive, its shard away): ``reaped``
        is said when something happened, not once a second while a node is away."""
        self._forgotten.clear()
        return {n: jobs for n, jobs in super().run(lock_seconds, wrongtype).items()
                if jobs or n in self._forgotten}

    def reap(self, dead: str) -> int:
        """Put back what ``dead`` left on the shards that answer; deliver its outboxes
        there; forget it once nothing of it is left anywhere.  Returns the jobs put
        back.  A key of the wrong type is raised once the other queues are done."""
        k = self.keys
        queues, done = self._queues_of(dead)
        moved, refused = 0, None
        for q in queues:
            try:
                n = int(self._reap_queue(keys=[k.fence(dead, q), k.processing(dead, q),
                                               k.queue(q), k.crashes_of(q)]))
                if n < 0:  # its fence for this queue is alive: not dead there (yet)
                    done = False
                    continue
                moved += n
                box = k.outbox(dead, q)
                done = self.deliver(box, self.r.lrange(box, 0, -1)) and done
            except redis.ResponseError as e:  # a key of the wrong type: that queue waits
                refused, done = refused or e, False
            except (redis.ConnectionError, redis.TimeoutError):  # its node went: later
                done = False
        if done:
            left, whole = self._queues_of(dead)
            if whole and not left and \
                    self._forget(keys=[k.supervisor(dead), k.supervisors], args=[dead]):
                self._forgotten.add(dead)
        if refused is not None:
            raise refused  # (Reaper.run reports it, once the others are reaped)
        return moved

    def deliver(self, box: str, entries: list[bytes]) -> bool:
        """Write the answers of outbox ``box``'s ``entries``: those written whole are
        removed from it (by value: a deliverer racing us cannot drop one it has not
        written), those written in part narrowed to what is left.  True if all were
        written (the outbox holds none of them any more).  Raises a Redis error of the
        outbox's own node."""
        if not entries:
            return True
        written = write_answers(self.r, self.keys, entries, self._progress, self.durable)
        durable = self.durable is not None and self.durable.on
        commands, narrowed = [], []
        for raw in entries:
            done = written.failed.get(raw)
            if done is None or done and not durable:
                self._progress.pop(raw, None)
            if done is None:
                commands.append((box, ("LREM", box, 1, raw)))
            elif done and not durable:  # some part went through: narrowed in Redis
                args = [raw, _narrowed(raw, done)]
                narrowed.append((len(commands), args))
                commands.append((box, ("EVALSHA", self._narrow.sha, 1, box, *args)))
            elif done:
                self._progress[raw] = done
        replies = send_by_node(self.r, commands)
        for i, args in narrowed:
            replies[i] = rerun_unknown(self._narrow, [box], args, replies[i])
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        return not written.failed

    def _queues_of(self, dead: str) -> tuple[list[str], bool]:
        """The queues of which ``dead`` left a processing list or an outbox, by SCAN of
        each primary that answers, and whether every primary did."""
        k = self.keys
        found: set[str] = set()
        whole = True
        for node in self.r.get_primaries():
            if self.breaker.is_open(node.name):
                whole = False
                continue
            client = node.redis_connection
            try:
                found |= {k.queue_of_processing(dead, key.decode()) for key in
                          client.scan_iter(match=k.processing_pattern(dead), count=1000)}
                found |= {k.queue_of_outbox(dead, key.decode()) for key in
                          client.scan_iter(match=k.outbox_pattern(dead), count=1000)}
            except (redis.ConnectionError, redis.TimeoutError) as e:
                self.breaker.trip(node.name, e, client.connection_pool)
                whole = False
        return sorted(found), whole


def _narrowed(raw: bytes, done: set[int]) -> str:
    """An outbox entry without the parts ``done`` (0: the result key, 1: the reply)."""
    result_key, ttl, reply_to, env = json.loads(raw)
    return json.dumps(["" if 0 in done else result_key, ttl,
                       "" if 1 in done else reply_to, env])
