"""The producer side on Redis Cluster: Client, Pool and `redpool acl`, against the
session's private three-primary cluster (conftest.py).

Jobs are answered by a fake worker that writes results as the daemon does on Redis
Cluster (cluster.py, deliver()): SET the result key, LPUSH the job's reply_to and EXPIRE
it.  The queues of SPREAD_QUEUES live on three different primaries, so every test that
uses them crosses nodes.  The ACL test runs the real daemon (--burst) under the worker
rules.
"""

from __future__ import annotations

import multiprocessing
import os
import shlex
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta

import pytest
import redis
from redis.cluster import RedisCluster

from conftest import SPREAD_QUEUES
from helpers import ROOT, wait_for
from redpool import protocol
from redpool.client import Client
from redpool.remote_pool import Pool
from redpool.connection import connect
from redpool.errors import ConfigError, RedpoolError
from redpool.protocol import Keys

PASSWORD = "pw-cluster-not-in-logs"


def answer(r, keys: Keys, queue: str, raw: bytes | None = None, *, reply: bool = True) -> str:
    """Answer the oldest job of ``queue`` (or ``raw``) with the sum of its args; its id."""
    job = protocol.decode_job(raw if raw is not None else r.rpop(keys.queue(queue)))
    data = protocol.dumps(protocol.envelope(
        id=job.id, task=job.task, queue=queue, status=protocol.SUCCEEDED, worker="fake",
        result=sum(job.args), enqueued_at=job.enqueued_at, started_at=time.time()))
    r.set(keys.result(job.id), data, ex=job.result_ttl)
    if reply and job.reply_to:
        r.lpush(job.reply_to, data)
        r.expire(job.reply_to, job.result_ttl)
    return job.id


class FakeWorker:
    """A thread per queue (one BRPOP names one slot) answering with answer()."""

    def __init__(self, url: str, keys: Keys, queues=SPREAD_QUEUES) -> None:
        self.r = connect(url)
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(keys, q), daemon=True)
                        for q in queues]
        for t in self.threads:
            t.start()

    def _run(self, keys: Keys, queue: str) -> None:
        while not self.stopping.is_set():
            item = self.r.brpop([keys.queue(queue)], timeout=0.05)
            if item is not None:
                answer(self.r, keys, queue, item[1])

    def stop(self) -> None:
        self.stopping.set()
        for t in self.threads:
            t.join(5)
        self.r.close()


@pytest.fixture
def client(cluster_url, cluster_namespace):
    c = Client(cluster_url, namespace=cluster_namespace)
    yield c
    c.close()


@pytest.fixture
def worker(cluster_url, cluster_keys):
    w = FakeWorker(cluster_url, cluster_keys)
    yield w
    w.stop()


def test_jobs_land_on_their_queues_hash_tagged_lists_on_three_primaries(client, rc, cluster_keys):
    assert client.keys.cluster and repr(client).startswith("<redpool.Client redis+cluster://")
    ns = cluster_keys.ns
    # When one job goes to each queue, and a batch to the first
    ids = {q: client.enqueue("t.add", 1, 2, queue=q).id for q in SPREAD_QUEUES}
    many = client.enqueue_many("t.add", [(i, i) for i in range(5)], queue=SPREAD_QUEUES[0])
    # Then each sits on <ns>:queue:{q}, and those lists are on three different nodes
    nodes = set()
    for q in SPREAD_QUEUES:
        key = f"{ns}:queue:{{{q}}}"
        jobs = [protocol.decode_job(raw) for raw in reversed(rc.lrange(key, 0, -1))]
        assert jobs[0].id == ids[q] and jobs[0].reply_to == client.reply_key
        nodes.add(rc.get_node_from_key(key).name)
    assert [j.id for j in map(protocol.decode_job, rc.lrange(
        f"{ns}:queue:{{{SPREAD_QUEUES[0]}}}", 0, -1))][:5] == [ar.id for ar in reversed(many)]
    assert len(nodes) == 3


def test_delayed_jobs_land_in_their_queues_scheduled_set_scored_by_server_time(client, rc,
                                                                               cluster_keys):
    at = datetime.now() + timedelta(minutes=5)
    for q in SPREAD_QUEUES:
        # When a job is delayed by 30 s and another is due at a given time
        before = float("%d.%06d" % rc.time())
        delayed = client.enqueue("t.add", 1, 1, queue=q, delay=30)
        later = client.enqueue("t.add", 2, 2, queue=q, at=at)
        after = float("%d.%06d" % rc.time())
        # Then both wait in <ns>:scheduled:{q}, due 30 s after the server's now, and at `at`
        key = f"{cluster_keys.ns}:scheduled:{{{q}}}"
        scores = {protocol.decode_job(raw).id: score
                  for raw, score in rc.zrange(key, 0, -1, withscores=True)}
        assert before + 30 <= scores[delayed.id] <= after + 30
        assert scores[later.id] == pytest.approx(at.timestamp())
        assert not rc.exists(cluster_keys.queue(q))


def test_results_come_back_by_push_from_every_queue(client, worker):
    # Given a worker answering on three primaries, the replies come back on one list
    results = [client.enqueue("t.add", i, 10, queue=q) for i, q in enumerate(SPREAD_QUEUES)]
    assert [ar.get(timeout=10) for ar in results] == [10, 11, 12]
    batch = client.enqueue_many("t.add", [(i, 1) for i in range(50)], queue=SPREAD_QUEUES[1])
    assert [ar.get(timeout=10) for ar in batch] == list(range(1, 51))
    delayed = client.enqueue("t.add", 3, 4, queue=SPREAD_QUEUES[2], delay=0)
    # (a delayed job is the worker's to promote; do it by hand here)
    scheduled = client.keys.scheduled(SPREAD_QUEUES[2])
    raw = client.redis.zrange(scheduled, 0, -1)[0]
    client.redis.zrem(scheduled, raw)
    answer(client.redis, client.keys, SPREAD_QUEUES[2], raw)
    assert delayed.get(timeout=10) == 7


def test_result_keys_are_read_across_slots(client, cluster_url, cluster_namespace, rc,
                                           cluster_keys):
    # Given jobs answered by result key only (their replies lost), on every queue
    pending = [client.enqueue("t.add", i, i, queue=q) for q in SPREAD_QUEUES for i in range(10)]
    for q in SPREAD_QUEUES:
        for _ in range(10):
            answer(rc, cluster_keys, q, reply=False)
    assert len({rc.get_node_from_key(cluster_keys.result(ar.id)).name for ar in pending}) == 3
    # When the listener's sweep runs, then one MGET per slot finds them all
    client._sweep()
    assert [ar.get(timeout=0) for ar in pending] == [2 * i for _ in SPREAD_QUEUES
                                                     for i in range(10)]
    # and another client reads any of them by id, polling its result key
    with Client(cluster_url, namespace=cluster_namespace) as other:
        assert [other.result(ar.id).get(timeout=5) for ar in pending[::10]] == [0, 0, 0]
        late = other.result("not-yet")
        assert not late.ready()
        rc.set(cluster_keys.result("not-yet"), protocol.dumps(protocol.envelope(
            id="not-yet", task="t.add", queue="b", status=protocol.SUCCEEDED, worker="fake",
            result=42)))
        assert late.get(timeout=5) == 42


def test_queue_names_with_braces_are_refused_at_enqueue(client, rc, cluster_keys):
    for bad in ("a{b}", "{x}", "left{", "right}"):
        with pytest.raises(ValueError, match="invalid queue name .* on Redis Cluster"):
            client.enqueue("t.add", 1, 2, queue=bad)
        with pytest.raises(ValueError, match="on Redis Cluster"):
            client.enqueue_many("t.add", [(1, 2)], queue=bad)
    assert client._pending == {}
    assert not list(rc.scan_iter(match=f"{cluster_keys.ns}:*"))


def test_a_cluster_node_reached_by_redis_url_is_named_as_such(cluster, rc, cluster_namespace):
    plain = Keys(cluster_namespace)
    first = f"127.0.0.1:{cluster.nodes[0].port}"
    queue = next(q for q in map(str, range(100))
                 if rc.get_node_from_key(plain.queue(q)).name != first)
    with Client(cluster.url, namespace=cluster_namespace) as c:
        with pytest.raises(ConfigError, match=r"Cluster node: connect with redis\+cluster://"):
            c.enqueue("t.add", 1, 2, queue=queue)
        assert c._pending == {}


def test_a_redis_cluster_of_the_callers_own_works(cluster, cluster_namespace, worker):
    theirs = RedisCluster.from_url(cluster.url, socket_timeout=1.0)
    with Client(redis=theirs, namespace=cluster_namespace) as c:
        assert c.keys.cluster and c._block == 0.5
        assert repr(c).startswith("<redpool.Client redis+cluster://127.0.0.1:")
        assert c.enqueue("t.add", 20, 22, queue=SPREAD_QUEUES[2]).get(timeout=10) == 42
    assert theirs.ping()  # not ours to close
    theirs.close()


def test_close_is_prompt_and_drops_the_reply_list(client, rc):
    # a listener blocking 60 s at a time: close() must wake it, not wait the block out
    # (the bound below is half of that, so a busy machine cannot make it fail)
    client._block = 60.0
    ar = client.enqueue("t.add", 1, 2, queue=SPREAD_QUEUES[0])
    wait_for(lambda: client._listener is not None and client._listener.is_alive())
    start = time.monotonic()
    client.close()
    assert time.monotonic() - start < 30 and not client._listener.is_alive()
    with pytest.raises(RedpoolError, match="closed before"):
        ar.get(timeout=0)
    assert not rc.exists(client.reply_key)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_gets_its_own_reply_list(client, worker):
    # Given a client already listening in the parent (as with gunicorn --preload)
    assert client.enqueue("t.add", 1, 1, queue=SPREAD_QUEUES[0]).get(10) == 2
    parent_reply_key = client.reply_key

    def child() -> None:
        ok = (client.enqueue("t.add", 2, 2, queue=SPREAD_QUEUES[1]).get(10) == 4
              and client.reply_key != parent_reply_key)
        os._exit(0 if ok else 1)

    # When a forked child enqueues, then it gets its result on a reply list of its own
    proc = multiprocessing.get_context("fork").Process(target=child)
    proc.start()
    proc.join(20)
    assert proc.exitcode == 0
    assert client.reply_key == parent_reply_key
    assert client.enqueue("t.add", 3, 3, queue=SPREAD_QUEUES[2]).get(10) == 6


def test_pool_maps_over_a_cluster(cluster_url, cluster_namespace, worker):
    with Pool(cluster_url, queue=SPREAD_QUEUES[1], namespace=cluster_namespace) as pool:
        assert pool.client.keys.cluster
        assert pool.starmap("t.add", [(i, i) for i in range(20)]) == [2 * i for i in range(20)]
    with Pool(cluster_url, queue="{b}", namespace=cluster_namespace) as bad:
        with pytest.raises(ValueError, match="on Redis Cluster"):
            bad.map("t.add", [1])


# -- ACL users -----------------------------------------------------------------------------------

def redpool(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("REDPOOL_")}
    return subprocess.run([sys.executable, "-m", "redpool", *args], cwd=ROOT,
                          env=dict(env, PYTHONUNBUFFERED="1"), capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture
def nodes(cluster):
    """A plain client of every node: ACL users are per node."""
    clients = [redis.Redis(host="127.0.0.1", port=n.port) for n in cluster.nodes]
    yield clients
    for c in clients:
        c.close()


@pytest.fixture
def cluster_users(cluster, nodes, cluster_namespace):
    """``make(role) -> (user, URL)``: a user with the rules `redpool acl` prints, set on
    every node, with a password; deleted at teardown."""
    made: list[str] = []

    def make(role: str) -> tuple[str, str]:
        user = f"{cluster_namespace}-{role}"
        res = redpool("acl", role, "--namespace", cluster_namespace, "--user", user)
        assert res.returncode == 0, res.stderr
        for node in nodes:
            node.execute_command(*shlex.split(res.stdout))
            node.execute_command("ACL", "SETUSER", user, f">{PASSWORD}")
        made.append(user)
        return user, f"redis+cluster://{user}:{PASSWORD}@127.0.0.1:{cluster.nodes[0].port}"

    yield make
    for node in nodes:
        for user in made:
            node.execute_command("ACL", "DELUSER", user)


def denials(nodes, *users: str) -> list[dict]:
    return [e for node in nodes for e in node.acl_log(count=100)
            if (e.get("username") or "") in users]


def test_the_acl_users_do_everything_redpool_does_on_a_cluster(cluster_users, nodes, rc,
                                                               cluster_namespace, cluster_keys):
    puser, producer_url = cluster_users("producer")
    wuser, worker_url = cluster_users("worker")
    for node in nodes:
        node.acl_log_reset()
    queues = [x for q in SPREAD_QUEUES for x in ("--queue", q)]
    with Client(producer_url, namespace=cluster_namespace) as c:
        # Given jobs the producer user enqueues on every queue, delayed ones too
        now = [c.enqueue("t.add", i, i, queue=q) for i, q in enumerate(SPREAD_QUEUES)]
        later = [c.enqueue("t.add", 1, i, queue=q, delay=0.2) for i, q in enumerate(SPREAD_QUEUES)]
        at = c.enqueue("t.add", 5, 5, queue=SPREAD_QUEUES[0], at=datetime.now())
        many = c.enqueue_many("t.add", [(2, 3)] * 3, queue=SPREAD_QUEUES[1])
        # When a burst worker runs them as the worker user
        res = redpool("worker", "tests.taskmods.jobs", "--namespace", cluster_namespace,
                      "--burst", "--concurrency", "1", *queues, "--redis-url", worker_url)
        assert res.returncode == 0, res.stderr[-3000:]
        assert PASSWORD not in res.stderr
        # Then the producer gets every result by push, and by result key (MGET per slot)
        assert [ar.get(timeout=10) for ar in now + later + [at] + many] == \
            [0, 2, 4, 1, 2, 3, 10, 5, 5, 5]
        c._sweep()
        assert c.result(now[2].id).get(timeout=5) == 4
    with Client(producer_url, namespace=cluster_namespace) as other:
        assert other.result(now[1].id).get(timeout=5) == 2
    # and no node refused either user anything
    assert denials(nodes, puser, wuser) == []
    # while the producer user is still refused what it has no business doing
    other = Keys(f"{cluster_namespace}-other", cluster=True)
    p = connect(producer_url)
    try:
        for call in (lambda: p.lrange(cluster_keys.queue("a"), 0, -1),
                     lambda: p.rpop(cluster_keys.queue("b")),
                     lambda: p.smembers(cluster_keys.supervisors),
                     lambda: p.set(cluster_keys.result("x"), "forged"),
                     lambda: p.lpush(other.queue("a"), "x"),
                     lambda: p.execute_command("CLUSTER NODES"),
                     lambda: p.keys("*")):
            with pytest.raises(redis.exceptions.NoPermissionError):
                call()
    finally:
        p.close()


def test_the_worker_user_reaches_its_cluster_keys_and_no_others(cluster_users, cluster_namespace,
                                                                cluster_keys):
    _, url = cluster_users("worker")
    w = connect(url)
    k, other = cluster_keys, Keys(f"{cluster_namespace}-other", cluster=True)
    try:
        # Its namespace-wide keys ({ns}:...) and each queue's (<ns>:...{q}), on every node
        w.sadd(k.supervisors, "w1")
        w.hset(k.supervisor("w1"), "epoch", 1)
        w.set(k.reaper, "w1", px=100)
        for q in SPREAD_QUEUES:
            for key in (k.fence("w1", q), k.crashes_of(q)):
                w.hset(key, "x", 1)
            for key in (k.outbox("w1", q), k.dead_of(q), k.processing("w1", q), k.queue(q)):
                w.lpush(key, "x")
            w.zadd(k.scheduled(q), {"x": 1})
        # and the scripts (loaded on the node that runs them)
        bump = w.register_script("return redis.call('HINCRBY', KEYS[1], 'n', 1)")
        assert [bump(keys=[k.fence("w1", q)]) for q in SPREAD_QUEUES] == [1, 1, 1]
        # --durable-results: the replicas per primary, and a WAIT after an answer
        from redpool.nodes import send_by_node
        assert w.cluster_nodes()
        answer = k.result("j1")
        assert send_by_node(w, [(answer, ("SET", answer, "{}")), (answer, ("WAIT", 0, 10))]) \
            == [b"OK", 0]
        # but nothing of another namespace
        for call in (lambda: w.sadd(other.supervisors, "w1"),
                     lambda: w.lpush(other.queue("a"), "x"),
                     lambda: w.hset(other.fence("w1", "b"), "x", 1),
                     # (CLUSTER NODES it may: --durable-results counts replicas)
                     lambda: w.execute_command("CLUSTER INFO"),
                     lambda: w.keys("*")):
            with pytest.raises(redis.exceptions.NoPermissionError):
                call()
    finally:
        w.close()
