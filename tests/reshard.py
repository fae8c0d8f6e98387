"""Moving one slot of a private Redis Cluster, as `valkey-cli --cluster reshard` does, in
steps a test can stop between: open (the target IMPORTING, the source MIGRATING), move
the slot's keys in batches (MIGRATE ... KEYS), close (CLUSTER SETSLOT NODE on the target,
then the source, then the others).  Left open, the slot is a reshard interrupted half way.
"""

from __future__ import annotations

import redis

from redpool.server import EmbeddedCluster, EmbeddedServer


def node_id(node: EmbeddedServer) -> str:
    with redis.Redis(port=node.port, socket_timeout=5) as r:
        return r.execute_command("CLUSTER", "MYID").decode()


def owner(cluster: EmbeddedCluster, slot: int) -> EmbeddedServer:
    """The primary that serves ``slot`` now (not at start: see EmbeddedCluster.node_of)."""
    with redis.Redis(port=cluster.nodes[0].port, socket_timeout=5) as r:
        for start, end, primary, *_ in r.execute_command("CLUSTER", "SLOTS"):
            if start <= slot <= end:
                return next(n for n in cluster.nodes if n.port == int(primary[1]))
    raise AssertionError(f"slot {slot} is not served")


class SlotMove:
    """``SlotMove(cluster, slot, target).open(); .move(5); ...; .close()``."""

    def __init__(self, cluster: EmbeddedCluster, slot: int, target: EmbeddedServer) -> None:
        self.cluster, self.slot = cluster, slot
        self.source, self.target = owner(cluster, slot), target
        assert self.source is not target, "the slot is there already"
        self.src = redis.Redis(port=self.source.port, socket_timeout=10)
        self.dst = redis.Redis(port=target.port, socket_timeout=10)
        self.moved = 0  # keys moved so far

    def open(self) -> "SlotMove":
        self.dst.execute_command("CLUSTER", "SETSLOT", self.slot, "IMPORTING", node_id(self.source))
        self.src.execute_command("CLUSTER", "SETSLOT", self.slot, "MIGRATING", node_id(self.target))
        return self

    def left(self) -> int:
        """Keys of the slot still on the source."""
        return int(self.src.execute_command("CLUSTER", "COUNTKEYSINSLOT", self.slot))

    def move(self, batch: int = 5, limit: int | None = None) -> int:
        """Move the slot's keys, ``batch`` per MIGRATE, at most ``limit`` (all: None).
        Returns how many moved."""
        done = 0
        while limit is None or done < limit:
            n = batch if limit is None else min(batch, limit - done)
            keys = self.src.execute_command("CLUSTER", "GETKEYSINSLOT", self.slot, n)
            if not keys:
                break
            self.src.execute_command("MIGRATE", "127.0.0.1", self.target.port, "", 0, 5000,
                                     "KEYS", *keys)  # (a key gone meanwhile: NOKEY, fine)
            done += len(keys)
        self.moved += done
        return done

    def close(self) -> None:
        """The slot is the target's: every key moved first, then SETSLOT NODE on the
        target, the source and the other primaries (the order valkey-cli uses)."""
        self.move()
        me = node_id(self.target)
        others = [n for n in self.cluster.nodes if n not in (self.source, self.target)]
        for node in (self.target, self.source, *others):
            with redis.Redis(port=node.port, socket_timeout=5) as r:
                r.execute_command("CLUSTER", "SETSLOT", self.slot, "NODE", me)
        self.src.close()
        self.dst.close()
