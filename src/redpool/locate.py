"""Where a job is now, by its id: what `redpool inspect JOB_ID` shows.

A job moves while we look: scheduled -> queued -> held by a supervisor (its processing
list) -> result envelope (and perhaps a dead letter).  The places are searched in that
order, so a job that moves on during the search is found in its next place instead of
being missed (a failed attempt going back to a scheduled set is the one move against
the flow: the search is a view, not a lock).  Every place is searched, so a job whose
id a producer reused is shown everywhere it is.

On Redis Cluster a job has one more place, between running and finished: its
supervisor's outbox for the queue (``<ns>:outbox:<sup>:{<queue>}``), where a finished
job's answer waits while the supervisor writes its result key and reply (a second
step; see cluster.py).  It is shown as ``finishing``, with the ``status`` its result
envelope says (succeeded or failed) and that envelope as its body.  Dead letters are
searched in every queue's own list there.

Lists and sorted sets are read CHUNK elements at a time.  An element is parsed only
when its bytes could hold the id (they contain it, or a \\u escape that could spell
it), so a queue of a million small jobs costs a thousand round trips and almost no
parsing; a match is always confirmed by parsing, never by the substring alone.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Iterator

import redis

from . import dead
from .deployment import CHUNK, SCAN_COUNT, SupervisorState, dead_lists, discover_queues, \
    parse_object, read_supervisors, server_time
from .protocol import Keys


@dataclass
class Sighting:
    state: str                      # scheduled, queued, running, finishing (Redis Cluster),
                                    # succeeded, failed, dead
    key: str                        # where it was found
    body: Any                       # the job, envelope or dead-letter entry, parsed
    detail: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"state": self.state, "key": self.key, **self.detail, "body": self.body}


def _could_hold(raw: bytes, needle: bytes) -> bool:
    return needle in raw or b"\\u" in raw


def _with_id(raw: bytes, job_id: str, needle: bytes, parse=parse_object) -> dict | None:
    if not _could_hold(raw, needle):
        return None
    obj = parse(raw)
    return obj if obj is not None and obj.get("id") == job_id else None


def _outbox_envelope(raw: bytes) -> dict | None:
    """The result envelope in an outbox entry, a JSON array [result key, ttl, reply_to,
    envelope text] (cluster.py); None for anything else."""
    try:
        return parse_object(json.loads(raw)[3])
    except (ValueError, RecursionError, TypeError, LookupError):
        return None


def _list_matches(r: redis.Redis, key: str, job_id: str,
                  parse=parse_object) -> Iterator[tuple[int, int, dict]]:
    """(index from the left, list length then, job) for each element with this id.  The
    length is read with each chunk (MULTI), so the index and length agree.  Pushes at the
    left while we read shift elements right: one may be seen twice, none is skipped."""
    needle = job_id.encode()
    start = 0
    while True:
        pipe = r.pipeline(transaction=True)
        pipe.llen(key)
        pipe.lrange(key, start, start + CHUNK - 1)
        length, batch = pipe.execute()
        for i, raw in enumerate(batch):
            job = _with_id(raw, job_id, needle, parse)
            if job is not None:
                yield start + i, length, job
        if len(batch) < CHUNK:
            return
        start += CHUNK


def _scheduled(r: redis.Redis, keys: Keys, queue: str, job_id: str, now: float):
    key = keys.scheduled(queue)
    needle = job_id.encode()
    start = 0
    while True:
        batch = r.zrange(key, start, start + CHUNK - 1, withscores=True)
        for raw, due in batch:
            job = _with_id(raw, job_id, needle)
            if job is not None:
                yield Sighting("scheduled", key, job, {"queue": queue, "due_at": due,
                                                       "due_in": due - now})
        if len(batch) < CHUNK:
            return
        start += CHUNK


def _lists_of(r: redis.Redis, s: SupervisorState, name, pattern, queue_of):
    """(queue, key) of each list of a registered supervisor (its processing lists, or
    its outboxes): named from the queues in its lease's info, or, when the lease has
    expired with its info (the supervisor died and is not yet reaped), found with SCAN."""
    if s.queues:
        return [(q, name(s.name, q)) for q in s.queues]
    found = []
    for raw in r.scan_iter(match=pattern(s.name), count=SCAN_COUNT):
        key = raw.decode("utf-8", "replace")
        found.append((queue_of(s.name, key), key))
    return found


def _holder(s: SupervisorState, queue: str) -> dict:
    return {"queue": queue, "supervisor": s.name, "host": s.host, "pid": s.pid,
            "supervisor_alive": s.alive}


def locate(r: redis.Redis, keys: Keys, job_id: str) -> list[Sighting]:
    """Every place the job with this id is, in the order a job moves through them."""
    now = server_time(r)
    supervisors = {s.name: s for s in read_supervisors(r, keys, now)}
    queues = sorted(discover_queues(r, keys) | {q for s in supervisors.values() for q in s.queues})
    found: list[Sighting] = []
    for q in queues:
        found += _scheduled(r, keys, q, job_id, now)
    for q in queues:
        for i, length, job in _list_matches(r, keys.queue(q), job_id):
            found.append(Sighting("queued", keys.queue(q), job,
                                  {"queue": q, "ahead": length - 1 - i, "length": length}))
    for s in supervisors.values():
        lists = _lists_of(r, s, keys.processing, keys.processing_pattern, keys.queue_of_processing)
        for q, key in lists:
            for _i, _length, job in _list_matches(r, key, job_id):
                found.append(Sighting("running", key, job, _holder(s, q)))
    for s in supervisors.values() if keys.cluster else ():
        for q, key in _lists_of(r, s, keys.outbox, keys.outbox_pattern, keys.queue_of_outbox):
            for _i, _length, env in _list_matches(r, key, job_id, _outbox_envelope):
                found.append(Sighting("finishing", key, env,
                                      {**_holder(s, q), "status": env.get("status")}))
    pipe = r.pipeline(transaction=True)
    pipe.get(keys.result(job_id))
    pipe.ttl(keys.result(job_id))
    raw, ttl = pipe.execute()
    env = parse_object(raw)
    if env is not None:
        status = env.get("status") if env.get("status") in ("succeeded", "failed") else "finished"
        found.append(Sighting(status, keys.result(job_id), env,
                              {"queue": env.get("queue"), "expires_in": ttl if ttl >= 0 else None}))
    for key in dead_lists(r, keys):
        for e in dead.scan(r, key, CHUNK):
            if e.id == job_id:
                found.append(Sighting("dead", key, e.data, {"queue": e.queue, "position": e.pos}))
    return found
