"""Redis Cluster resharding: a queue's slot moving between nodes (tests/reshard.py moves
one slot in steps, as `valkey-cli --cluster reshard` does) while a worker serves it.

What is checked: send_by_node follows ASK (ASKING, then the command on the importing
node's connection) and MOVED, and answers TRYAGAIN at once instead of spinning; what the
server refuses while a slot is open (a multi-key script naming a key that exists on
neither side); the loop takes TRYAGAIN for a slot moving, not an outage; and a real daemon
under a steady producer, its queue's slot moved away and back several times and once left
half way for a while, loses no job and runs none twice (the longest stall is printed).
"""

from __future__ import annotations

import threading
import time
from collections import Counter

import pytest
import redis

from helpers import Daemon, wait_for
from redpool.connection import connect
from redpool.keys import Keys
from redpool.nodes import send_by_node
from redpool.server import EmbeddedCluster
from reshard import SlotMove, owner

pytestmark = pytest.mark.daemon


@pytest.fixture(scope="module")
def two():
    """A private two-primary cluster: these tests leave slots moving, which the session's
    cluster (whose layout other tests rely on) must never see."""
    with EmbeddedCluster(2) as c:
        yield c


@pytest.fixture
def rc2(two):
    client = connect(two.url.replace("redis://", "redis+cluster://"), socket_timeout=5)
    yield client
    client.close()


def slot_of(tag: str) -> int:
    return redis.cluster.key_slot(tag.encode())


def opened(cluster, tag: str) -> SlotMove:
    """The slot of ``tag`` opened towards the other primary."""
    slot = slot_of(tag)
    target = next(n for n in cluster.nodes if n is not owner(cluster, slot))
    return SlotMove(cluster, slot, target).open()


# -- send_by_node ---------------------------------------------------------------------------------

def test_ask_is_followed_with_asking_on_the_importing_node(rc2, two, monkeypatch):
    # Given a slot MIGRATING, one key of it still on the source, one already moved
    rc2.set("{ask1}:stays", "s")  # (before: a key new in a slot MIGRATING goes to the target)
    rc2.set("{ask1}:moves", "m")
    move = opened(two, "ask1")
    move.src.execute_command("MIGRATE", "127.0.0.1", move.target.port, "{ask1}:moves", 0, 5000)
    other = next(f"{{o{i}}}" for i in range(100) if slot_of(f"o{i}") != move.slot)
    rc2.set(f"{other}:x", "o")
    # redis-py's own loop must not be what follows them
    monkeypatch.setattr(rc2, "execute_command", lambda *a, **kw: pytest.fail(f"sent {a}"))
    try:
        # When commands for both sides, a new key, and another slot go in one call
        replies = send_by_node(rc2, [
            ("{ask1}:stays", ("GET", "{ask1}:stays")),
            ("{ask1}:moves", ("GET", "{ask1}:moves")),            # ASK -> the target
            ("{ask1}:new", ("SET", "{ask1}:new", "n")),           # ASK: created there
            (f"{other}:x", ("GET", f"{other}:x")),
            ("{ask1}:moves", ("APPEND", "{ask1}:moves", "2")),    # ASK again, same node
        ])
        # Then each has its own reply, in order; the new key lives on the target
        assert replies == [b"s", b"m", b"OK", b"o", 2]
        assert move.left() == 1  # (stays)
        assert move.dst.execute_command("CLUSTER", "COUNTKEYSINSLOT", move.slot) == 2
    finally:
        monkeypatch.undo()
        move.close()
    # And once the slot is assigned, the stale map is corrected by MOVED, followed
    assert send_by_node(rc2, [("{ask1}:stays", ("GET", "{ask1}:stays")),
                              ("{ask1}:new", ("GET", "{ask1}:new"))]) == [b"s", b"n"]


def test_a_script_whose_keys_are_split_gets_tryagain_at_once(rc2, two, monkeypatch):
    rc2.set("{split1}:a", "1")
    rc2.set("{split1}:b", "2")
    move = opened(two, "split1")
    try:
        move.src.execute_command("MIGRATE", "127.0.0.1", move.target.port, "{split1}:b", 0, 5000)
        monkeypatch.setattr(rc2, "execute_command", lambda *a, **kw: pytest.fail(f"sent {a}"))
        script = "return redis.call('GET', KEYS[1]) .. redis.call('GET', KEYS[2])"
        eval_ = ("EVAL", script, 2, "{split1}:a", "{split1}:b")
        [reply] = send_by_node(rc2, [("{split1}:a", eval_)])
        assert isinstance(reply, redis.exceptions.TryAgainError), reply
        # both keys on the target now: the script runs there (ASK, ASKING)
        move.move()
        assert send_by_node(rc2, [("{split1}:a", eval_)]) == [b"12"]
    finally:
        monkeypatch.undo()
        move.close()


def test_a_script_naming_a_key_that_exists_nowhere_waits_for_the_slot_to_be_assigned(
        rc2, two):
    """The server's rule, which is why a queue waits for the whole reshard of its slot
    (docs/deploy.md, "Resharding"): a missing key may have been moved, so a script naming
    one gets TRYAGAIN on the source (some keys here) and on the target (not all there)."""
    rc2.set("{gone1}:here", "1")
    move = opened(two, "gone1")
    script = ("EVAL", "return redis.call('EXISTS', KEYS[1], KEYS[2])", 2,
              "{gone1}:here", "{gone1}:nowhere")
    try:
        [before] = send_by_node(rc2, [("{gone1}:here", script)])
        move.move()
        [after] = send_by_node(rc2, [("{gone1}:here", script)])
        assert isinstance(before, redis.exceptions.TryAgainError), before
        assert isinstance(after, redis.exceptions.TryAgainError), after
    finally:
        move.close()
    assert send_by_node(rc2, [("{gone1}:here", script)]) == [1]


def test_scripts_that_empty_a_key_while_their_slot_migrates_do_not_stop_half_way(rc2, two):
    """While a slot migrates, a key a script deletes (a list emptied) is "non local" to
    it afterwards: touching it again was an error half way, after writes -- a job moved
    into our list unreported (reserve.lua), a job removed without its answer
    (complete_cluster.lua, which emptied the outbox before pushing onto it)."""
    from redpool.cluster import ClusterLease, ClusterQueue
    from redpool.queue import Completion

    ck = Keys("half", cluster=True)
    lease = ClusterLease(rc2, ck, "sup", ["q"])
    lease.register({"host": "elsewhere", "pid": 1}, 60)
    rq = ClusterQueue(rc2, ck, "sup", ["q"])
    rc2.rpush(ck.queue("q"), b'{"id":"j3"}', b'{"id":"j2"}', b'{"id":"j1"}')  # j1 first
    j1, j2 = [g.raw for g in rq.exchange([], 2, lease.epoch)[2]]

    def done(raw: bytes, job_id: str) -> Completion:
        return Completion("q", raw, job_id, 60, None, b'{"id":"%s"}' % job_id.encode())
    assert rq.exchange([done(j1, "j1")], 0, "")[:2] == (0, 0)  # its answer: trimmed next
    # every key of the queue exists, so that the scripts run on the source
    rc2.lpush(ck.dead_of("q"), b"{}")
    rc2.hset(ck.crashes_of("q"), "some", 1)
    rc2.zadd(ck.scheduled("q"), {b'{"id":"later"}': time.time() + 3600})
    assert rc2.exists(ck.outbox("sup", "q"), ck.processing("sup", "q"), ck.queue("q")) == 3
    move = opened(two, "q")
    try:
        # When one job is left and more are asked for, it alone comes, no error
        [j3] = rq.exchange([], 5, lease.epoch)[2]
        assert j3.raw == b'{"id":"j3"}'
        # When the completions empty the processing list, then one more is not there
        missing, _, _ = rq.exchange([done(j2, "j2"), done(j3.raw, "j3"),
                                     done(b'{"id":"gone"}', "gone")], 0, "")
        assert missing == 1
        assert rc2.get(ck.result("j2")) and rc2.get(ck.result("j3"))
    finally:
        move.close()
    assert rc2.exists(ck.processing("sup", "q")) == 0


def test_delivered_answers_that_empty_the_outbox_while_its_slot_migrates_stop_there(rc2, two):
    """complete_cluster.lua trims the answers delivered earlier last; if they empty the
    outbox (one of them removed already, by a reaper racing us), the next LREM met a
    "non local" key: the script stopped with an error after its writes (the job gone
    from our list, its completion taken for failed and sent again)."""
    from redpool.cluster import ClusterLease, ClusterQueue
    from redpool.queue import Completion

    ck = Keys("trim", cluster=True)
    lease = ClusterLease(rc2, ck, "sup", ["q"])
    lease.register({"host": "elsewhere", "pid": 1}, 60)
    rq = ClusterQueue(rc2, ck, "sup", ["q"])
    rc2.rpush(ck.queue("q"), b'{"id":"j3"}', b'{"id":"j2"}', b'{"id":"j1"}', b'{"id":"j0"}')
    j1, j2, j3 = [g.raw for g in rq.exchange([], 3, lease.epoch)[2]]
    answered = [Completion("q", raw, i, 60, None, b'{"id":"%s"}' % i.encode())
                for raw, i in ((j1, "j1"), (j2, "j2"))]
    assert rq.exchange(answered, 0, "")[:2] == (0, 0)  # their answers: trimmed next time
    box = ck.outbox("sup", "q")
    first, second = rc2.lrange(box, 0, -1)
    assert rc2.lrem(box, 1, second) == 1  # (another deliverer took it out already)
    rc2.lpush(ck.dead_of("q"), b"{}")  # every key of the queue exists: the script runs
    rc2.hset(ck.crashes_of("q"), "some", 1)
    rc2.zadd(ck.scheduled("q"), {b'{"id":"later"}': time.time() + 3600})
    assert rc2.exists(box, ck.processing("sup", "q"), ck.queue("q")) == 3
    move = opened(two, "q")
    try:
        # When a completion without an answer goes with the trims, which empty the outbox
        assert rq.exchange([Completion("q", j3, None, 0, None, None)], 0, "")[:2] == (0, 0)
    finally:
        move.close()
    # Then the script went through: the job is acknowledged, nothing is sent again
    assert rq.unsent == 0 and not rc2.exists(box)
    assert rc2.llen(ck.processing("sup", "q")) == 0 and rc2.llen(ck.queue("q")) == 1


def test_a_cluster_waiter_reads_its_blmove_itself_and_follows_ask_and_moved(
        rc2, two, monkeypatch):
    """ClusterQueue._blmove: send_by_node with ``over``.  On the queue's node the reply
    is read by oversized.read_bulk (a job over the limit never whole: not from_raw's
    drop after the fact); WRONGTYPE is raised with the connection still in step; ASK
    and MOVED are followed as for any command (their reply read by redis-py, dropped to
    its head at once), never by redis-py's own loop."""
    import hashlib

    import redpool.nodes
    import redpool.queue
    from redpool.cluster import ClusterQueue
    from redpool.oversized import Oversized, from_raw
    from redpool.redirects import follow

    ck = Keys("bw", cluster=True)
    rq = ClusterQueue(rc2, ck, "sup", ["w"])
    rq.head_over, rq.crashes_exist = 100_000, False   # (no HGET of crash counts after it)
    feed = connect(two.url.replace("redis://", "redis+cluster://"), socket_timeout=5)
    proc = ck.processing("sup", "w")

    def job(i: int, size: int) -> bytes:
        return b'{"id":"%d","a":"' % i + b"z" * size + b'"}'

    def bigs() -> list[bytes]:
        return [x for x in feed.lrange(proc, 0, -1) if len(x) > rq.head_over]

    seen: list[str] = []   # the errors the first round (read by read_bulk) answered

    def spy(r, commands, replies, send):
        seen.extend(type(x).__name__ for x in replies if isinstance(x, Exception))
        return follow(r, commands, replies, send)
    monkeypatch.setattr(redpool.nodes, "follow", spy)
    monkeypatch.setattr(rc2, "execute_command", lambda *a, **kw: pytest.fail(f"sent {a}"))
    # Given the queue's node answering as ever
    monkeypatch.setattr(redpool.queue, "from_raw", lambda raw: pytest.fail("read whole"))
    assert rq.block_reserve(rc2, "w", 0.1) is None                       # nil
    small, big = job(0, 10), job(1, 3_000_000)
    feed.lpush(ck.queue("w"), small, big)   # (small first: BLMOVE takes the right)
    assert rq.block_reserve(rc2, "w", 1.0).raw == small
    got = rq.block_reserve(rc2, "w", 1.0).raw
    assert isinstance(got, Oversized) and got.size == len(big) and big.startswith(got)
    assert got.sha == hashlib.sha1(big).hexdigest() and big.endswith(got.tail)
    assert bigs() == [big]                                               # moved whole
    feed.set(ck.queue("w"), "not a list")
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        rq.block_reserve(rc2, "w", 0.1)
    feed.delete(ck.queue("w"))
    assert rq.block_reserve(rc2, "w", 0.1) is None                       # still in step
    assert seen == ["ResponseError"]                                     # (WRONGTYPE)
    monkeypatch.setattr(redpool.queue, "from_raw", from_raw)
    # When its slot migrates with every key already on the target: ASK, followed
    feed.lpush(ck.queue("w"), job(2, 3_000_000))
    move = opened(two, "w")
    try:
        move.move()
        got = rq.block_reserve(rc2, "w", 1.0).raw
        assert isinstance(got, Oversized) and got.startswith(b'{"id":"2"')
        assert seen[1:] == ["AskError"]
    finally:
        move.close()
    # And once the slot is the target's (our map stale): MOVED, followed
    feed.lpush(ck.queue("w"), job(3, 3_000_000))
    got = rq.block_reserve(rc2, "w", 1.0).raw
    assert isinstance(got, Oversized) and got.startswith(b'{"id":"3"')
    assert seen[2:] == ["MovedError"]
    assert len(bigs()) == 3 and move.dst.llen(proc) == 4              # all whole, there
    assert rq.block_reserve(rc2, "w", 0.1) is None
    monkeypatch.undo()
    feed.close()


def test_tryagain_is_a_slot_moving_not_an_outage():
    from redpool.health import MOVING_MAX
    from redpool.keytypes import classify

    tryagain = redis.exceptions.TryAgainError("Multiple keys request during rehashing of slot")
    assert classify(tryagain) == "moving"
    assert classify(redis.exceptions.ClusterError("TTL exhausted.")) == "moving"
    assert classify(redis.exceptions.AskError("3 127.0.0.1:7000")) == "moving"
    assert classify(redis.exceptions.ClusterDownError("CLUSTERDOWN")) == "down"

    from redpool.health import RedisHealth

    class Health(RedisHealth):
        def __init__(self):
            self.events = []
            self.hooks = type("H", (), {"emit": lambda _, e, **kw: self.events.append(e)})()
            self.retry_at = self.duties_at = self._backoff = self._moving_backoff = 0.0
            self.moving_since, self.moving_last = None, 0.0
            self.outage, self.refusals = None, {}  # (no outage: outage.py)
            self._duty_backoff = 0.0

    h = Health()
    for i in range(10):
        h.redis_failed(tryagain, 100.0, "exchange")
        assert 0 < h.retry_at - 100.0 <= MOVING_MAX
    h.redis_failed(tryagain, 100.0, "duties")
    assert h.duties_at - 100.0 <= MOVING_MAX and not h.redis_down and not h.refusals
    assert h.events == ["slot_moving"]  # said once
    h.redis_ok(101.0, "exchange")       # through, but met a moment ago: not over yet
    h.redis_ok(110.0, "exchange")
    assert h.events == ["slot_moving", "slot_moved"] and h._moving_backoff == 0.0


# -- a real daemon, its queue's slot moved under load -------------------------------------

@pytest.mark.parametrize("queues", ["a", "ab"])
def test_a_queue_moved_away_and_back_under_load_loses_nothing_and_runs_nothing_twice(
        r, keys, redis_url, tmp_path, queues):
    """Queue a's slot goes to another primary and back, three cycles, the second left
    half way (MIGRATING, half its keys moved) for a few seconds; queue b's slot stays.
    A producer pushes without pause; a real daemon serves queue a alone (its loop and
    its waiter meet every TRYAGAIN), or a and b (b must go on meanwhile)."""
    from redpool.client import Client

    ns, led = "rs", keys.ns + ":ledger"
    with EmbeddedCluster(3) as c:
        url = c.url.replace("redis://", "redis+cluster://")
        ck = Keys(ns, cluster=True)
        slot = redis.cluster.key_slot(ck.queue("a").encode())
        assert slot != redis.cluster.key_slot(ck.queue("b").encode())
        d = Daemon(url, ns, "--concurrency", "2", *[a for q in queues for a in ("--queue", q)],
                   env={"REDPOOL_LEDGER_URL": redis_url, "REDPOOL_LEDGER": led}).start(tmp_path)
        acked: dict[str, float] = {}   # job id -> when its push was acknowledged
        answered: dict[str, float] = {}  # job id -> when its result was first seen
        refused: list[str] = []          # pushes not acknowledged (none expected)
        stop = threading.Event()

        def produce() -> None:
            with Client(url, namespace=ns) as client:
                i = 0
                while not stop.is_set():
                    i += 1
                    q = queues[i % len(queues)]
                    try:
                        client.enqueue("t.add", i, 1, id=f"{q}{i}", queue=q)
                        acked[f"{q}{i}"] = time.monotonic()
                    except redis.RedisError as e:
                        refused.append(repr(e))
                    stop.wait(0.01)

        def watch() -> None:
            with connect(url, socket_timeout=5) as admin:
                while not stop.is_set() or len(answered) < len(ids()):
                    todo = [i for i in ids() if i not in answered]
                    try:
                        got = admin.mget_nonatomic([ck.result(i) for i in todo]) if todo else []
                    except redis.RedisError:
                        got = []
                    now = time.monotonic()
                    answered.update((i, now) for i, v in zip(todo, got) if v is not None)
                    time.sleep(0.02)

        def ids() -> list[str]:
            return list(acked)

        def served(q: str, since: float) -> int:
            return sum(1 for i, t in list(answered.items()) if i[0] == q and t > since)

        threads = [threading.Thread(target=produce, daemon=True),
                   threading.Thread(target=watch, daemon=True)]
        windows = []  # (what, opened, closed)
        try:
            d.wait_started()
            for node in c.nodes:
                redis.Redis(port=node.port).config_resetstat()
            for t in threads:
                t.start()
            wait_for(lambda: served("a", 0) >= 20, 60, 0.05, "jobs of queue a to flow")
            home = owner(c, slot)
            for cycle in range(3):
                for target in [n for n in c.nodes if n is not home][:1] + [home]:
                    move = SlotMove(c, slot, target)
                    opened_at = time.monotonic()
                    move.open()
                    if cycle == 1 and target is not home:
                        # a reshard interrupted half way: the keys of a split for a while
                        move.move(1, limit=max(1, move.left() // 2))
                        halfway = time.monotonic()
                        time.sleep(3.0)
                        # queue b is served meanwhile, and pushes to a are acknowledged
                        assert "b" not in queues or served("b", halfway) > 0, \
                            "queue b stalled by a's reshard"
                        assert sum(t > halfway for i, t in list(acked.items())
                                   if i[0] == "a") > 0, "pushes to queue a refused"
                    move.close()
                    windows.append((f"cycle {cycle} -> {target.port}", opened_at,
                                    time.monotonic()))
                    wait_for(lambda: served("a", windows[-1][2]) >= 5, 60, 0.05,
                             "queue a served after its slot moved")
            stop.set()
            threads[0].join(30)
            wait_for(lambda: all(i in answered for i in ids()), 90, 0.1,
                     "every acknowledged job to be answered")
            threads[1].join(30)
            assert d.proc.poll() is None, d.log()[-3000:]
            assert not refused, refused
            runs = Counter(e.decode().split(":")[0] for e in r.lrange(led, 0, -1))
            assert all(runs[i] == 1 for i in ids()), {i: runs[i] for i in ids() if runs[i] != 1}
            assert sum(runs.values()) == len(ids())
            events = Counter(e.get("event") for e in d.events())
            assert events["redis_down"] == 0, d.log()[-3000:]
            assert events["slot_moving"] >= 1
            # the stalls: the longest time without a job of queue a answered, per window
            times = sorted(t for i, t in answered.items() if i[0] == "a")
            report = []
            for what, t0, t1 in windows:
                after = min(t for t in times if t > t1)
                gaps = [b - a for a, b in zip(times, times[1:]) if b > t0 and a < t1]
                report.append(f"{what}: open {t1 - t0:.2f} s, longest stall "
                              f"{max(gaps):.2f} s, first answer "
                              f"{after - t1:.2f} s after the slot was assigned")
            said = Counter()  # the redirections and refusals the nodes answered, in all
            for node in c.nodes:
                stats = redis.Redis(port=node.port).info("errorstats")
                said.update({k.removeprefix("errorstat_"): v["count"] for k, v in stats.items()})
            print(f"\nreshard under load, queues {queues}: {len(ids())} jobs, each run once; "
                  f"events {dict((k, v) for k, v in events.items() if k and 'slot' in k)}; "
                  f"nodes answered {dict(said)}\n  " + "\n  ".join(report))
        finally:
            stop.set()
            d.kill()
