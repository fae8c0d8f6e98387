"""Redis Cluster: a slot moving between nodes (a reshard), as send_by_node meets it.

While a slot migrates, its source node (MIGRATING) serves a command only if every key
the command names exists there; if none does it answers ``ASK <slot> <target>``, and if
some do and some do not, ``TRYAGAIN``.  The target (IMPORTING) serves a command only
right after ``ASKING`` on the same connection, and one naming several keys only if all
of them exist there (else TRYAGAIN again).  Sent without ASKING it answers ``MOVED``
back to the source, which still owns the slot.  Once the slot is assigned to the
target (CLUSTER SETSLOT NODE), the source answers MOVED.

So: ASK is followed at once, ASKING then the command on the target's connection,
pipelined per node like the first try; MOVED patches the client's slot map and goes
to the new owner; TRYAGAIN is left as the reply, for the caller to wait a moment
(health.py: short, growing sleeps) and try again.  Not redis-py's own loop, which
retries a TRYAGAIN up to 16 times on the node that sent it -- the target, after an
ASK, but without ASKING, so that it ping-pongs MOVED/ASK between the two nodes and ends
with "TTL exhausted", an outage to us.

What stays physically impossible: a multi-key script of a queue whose keys are split
between the nodes, or which names a key that exists on neither (an empty processing
list, no crash counts yet), cannot run anywhere until the slot is assigned.  Our
scripts name such keys, so a queue's scripts get TRYAGAIN for as long as its slot is
open (MIGRATING/IMPORTING) and the queue waits; single-key commands (a producer's
LPUSH, the fences, the answers) follow ASK and go on.  docs/deploy.md, "Resharding".
"""

from __future__ import annotations

from collections import defaultdict
from typing import Callable

import redis
from redis.exceptions import AskError, MovedError

ROUNDS = 4  # redirections followed per command before its last one is the reply


def follow(r, commands: list[tuple[str, tuple]], replies: list,
           send: Callable[[object, list, dict, list], str]) -> str:
    """Follow the ASK and MOVED replies among ``replies`` (in place), sending again
    with ``send`` (nodes._round).  Returns the name of a node that could not be
    reached, or ""."""
    failed = ""
    for _ in range(ROUNDS):
        groups: dict = defaultdict(list)
        for i, reply in enumerate(replies):
            if not isinstance(reply, AskError):  # (MovedError is an AskError)
                continue
            if isinstance(reply, MovedError):
                r.nodes_manager.move_slot(reply)  # the slot's new owner, learned
                node = r.get_node_from_key(commands[i][0])
            else:
                node = r.get_node(*r.nodes_manager.remap_host_port(reply.host, reply.port))
            if node is None or node.redis_connection is None:  # a node we never met
                replies[i] = _through_client(r, commands[i][1])
                continue
            groups[(node.name, not isinstance(reply, MovedError))].append(i)
        if not groups:
            break
        failed = send(r, commands, groups, replies) or failed
    return failed


def _through_client(r, command: tuple):
    try:
        return r.execute_command(*command)
    except redis.RedisError as e:
        return e
