"""The producer API against a real server, answered by an in-test fake worker.

The fake worker writes results as the daemon does (lua/complete.lua): SET the result key
with the job's TTL (when > 0) and, when the job has a reply_to that is not one of our own
non-reply keys, LPUSH the envelope there and EXPIRE the list.  Everything waits on conditions with deadlines, never on bare sleeps.
"""

from __future__ import annotations

import builtins
import itertools
import multiprocessing
import os
import random
import threading
import time
import traceback

import pytest
from helpers import wait_for
import redis
from structlog.testing import capture_logs

from redpool import client as client_module
from redpool import protocol, registry
from redpool.client import BATCH, AsyncResult, Client, MapResult, TimeoutError as RedpoolTimeout
from redpool.remote_pool import IMapIterator, Pool
from redpool.errors import JobFailed, RedpoolError
from redpool.urls import redact_url


@registry.task(name="t.double")
def double(x):
    return 2 * x


def triple(x):  # a plain function: its wire name is "<module>.triple"
    return 3 * x


def _boom(*args):
    raise ValueError("boom")


def _maybe_boom(x):
    if x < 0:
        raise ValueError(f"negative: {x}")
    return x


def _sleepy(seconds, value=None):
    time.sleep(seconds)
    return value


def _jitter(x):
    time.sleep(random.uniform(0, 0.004))
    return x


FUNCS = {
    "t.add": lambda a, b: a + b,
    "t.boom": _boom,
    "t.maybe_boom": _maybe_boom,
    "t.slow": _sleepy,
    "t.jitter": _jitter,
    "t.echo": lambda x: x,
    "t.double": double,
    registry.task_name(triple): triple,
}


class FakeWorker:
    """Threads that BRPOP a queue and answer like the real worker."""

    def __init__(self, url: str, keys: protocol.Keys, queue: str = "default", threads: int = 1):
        self.url, self.keys, self.queue = url, keys, queue
        self.stopping = threading.Event()
        self.done: list[list] = []  # the args of each job, in the order they finished
        self.threads = [threading.Thread(target=self._run, args=(f"fake-{i}",), daemon=True)
                        for i in range(threads)]
        for t in self.threads:
            t.start()

    def _run(self, name: str) -> None:
        r = redis.Redis.from_url(self.url)
        try:
            while not self.stopping.is_set():
                item = r.brpop([self.keys.queue(self.queue)], timeout=0.05)
                if item is not None:
                    self._answer(r, name, protocol.decode_job(item[1]))
        finally:
            r.close()

    def _answer(self, r: redis.Redis, worker: str, job: protocol.Job) -> None:
        started = time.time()
        common = dict(id=job.id, task=job.task, queue=self.queue, worker=worker,
                      enqueued_at=job.enqueued_at, started_at=started)
        try:
            result = FUNCS[job.task](*job.args, **job.kwargs)
            env = protocol.envelope(status=protocol.SUCCEEDED, result=result, **common)
        except Exception as e:
            env = protocol.envelope(status=protocol.FAILED, **common, error=protocol.error_dict(
                type(e).__name__, str(e), traceback.format_exc()))
        data = protocol.dumps(env)
        self.done.append(job.args)  # before answering: a test may look as soon as it has the answer
        # in one step, as complete.lua writes them: a test that sees the result key
        # sees the reply and its expiry too
        with r.pipeline(transaction=True) as pipe:
            if job.result_ttl > 0:
                pipe.set(self.keys.result(job.id), data, ex=job.result_ttl)
            if job.reply_to and self._may_reply_to(job.reply_to):
                pipe.lpush(job.reply_to, data)
                pipe.expire(job.reply_to, job.result_ttl or protocol.DEFAULT_RESULT_TTL)
            pipe.execute()

    def _may_reply_to(self, key: str) -> bool:
        # As lua/complete.lua: never LPUSH onto one of our own keys but a reply list.
        return not key.startswith(f"{self.keys.ns}:") or key.startswith(self.keys.reply(""))

    def stop(self) -> None:
        self.stopping.set()
        for t in self.threads:
            t.join(5)


def wait_until(condition, timeout: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


@pytest.fixture
def client(redis_url, namespace):
    c = Client(redis_url, namespace=namespace)
    yield c
    c.close()


@pytest.fixture
def pool(redis_url, namespace):
    p = Pool(redis_url, namespace=namespace)
    yield p
    p.terminate()


@pytest.fixture
def start_worker(redis_url, keys):
    workers: list[FakeWorker] = []

    def start(queue: str = "default", threads: int = 1) -> FakeWorker:
        workers.append(FakeWorker(redis_url, keys, queue, threads))
        return workers[-1]

    yield start
    for w in workers:
        w.stop()


def queued_jobs(r, keys, queue="default") -> list[protocol.Job]:
    return [protocol.decode_job(raw) for raw in reversed(r.lrange(keys.queue(queue), 0, -1))]


# -- Client / AsyncResult ------------------------------------------------------------------------

def test_enqueue_and_get(client, start_worker):
    start_worker()
    ar = client.enqueue("t.add", 2, 3)
    assert isinstance(ar, AsyncResult)
    assert ar.get(timeout=5) == 5
    assert ar.envelope["id"] == ar.id and ar.envelope["status"] == protocol.SUCCEEDED
    assert client.enqueue("t.add", 1, kwargs={"b": 2}).get(timeout=5) == 3


def test_enqueue_kwargs_and_job_fields(client, r, keys):
    ar = client.enqueue("t.add", 1, queue="q1", kwargs={"b": 2}, id="job-1", result_ttl=30)
    (job,) = queued_jobs(r, keys, "q1")
    assert (job.id, job.task, job.args, job.kwargs) == ("job-1", "t.add", [1], {"b": 2})
    assert job.result_ttl == 30 and job.reply_to == client.reply_key == keys.reply(client.id)
    assert ar.id == "job-1"


def test_result_ttl_zero_is_delivered_by_push_and_not_stored(client, r, keys, start_worker):
    start_worker()
    ar = client.enqueue("t.add", 1, 2, result_ttl=0)
    assert ar.get(timeout=5) == 3
    assert not r.exists(keys.result(ar.id))


def test_a_caller_redis_that_decodes_responses_works(redis_url, namespace, start_worker):
    start_worker()
    decoding = redis.Redis.from_url(redis_url, decode_responses=True)
    with capture_logs() as logs, Client(redis=decoding, namespace=namespace) as c:
        assert c.enqueue("t.add", 1, 2).get(timeout=5) == 3
    decoding.close()
    assert not [e for e in logs if e["log_level"] == "warning"]


def test_failure_raises_job_failed_with_remote_details(client, start_worker):
    start_worker()
    ar = client.enqueue("t.boom", 1)
    with pytest.raises(JobFailed) as info:
        ar.get(timeout=5)
    err = info.value
    assert isinstance(err, RedpoolError)
    assert (err.type, err.message, err.job_id) == ("ValueError", "boom", ar.id)
    assert "Traceback" in err.traceback and "boom" in str(err)


def test_timeout_is_both_builtin_and_multiprocessing_timeout(client):
    ar = client.enqueue("t.add", 1, 2)  # no worker: it never finishes
    for cls in (builtins.TimeoutError, multiprocessing.TimeoutError, RedpoolTimeout):
        with pytest.raises(cls):
            ar.get(timeout=0.05)   # (a get that ignored its timeout would hang: pytest-timeout)


def test_ready_and_successful(client, r, keys, start_worker):
    # Given a job nobody has run yet
    ar = client.enqueue("t.add", 1, 2)
    assert not ar.ready() and ar.envelope is None
    with pytest.raises(ValueError):
        ar.successful()
    # When a worker runs it, and another that fails
    start_worker()
    bad = client.enqueue("t.boom")
    ar.wait(5)
    bad.wait(5)
    # Then both are ready, one successful
    assert ar.ready() and ar.successful()
    assert bad.ready() and not bad.successful()


def test_callbacks_run_and_a_raising_callback_does_not_kill_the_listener(client, start_worker):
    start_worker()
    got, errs = [], []
    client.enqueue("t.add", 1, 1, callback=lambda v: 1 / 0).wait(5)  # raises in the listener
    ok = client.enqueue("t.add", 2, 2, callback=got.append)
    bad = client.enqueue("t.boom", error_callback=errs.append)
    ok.wait(5)
    bad.wait(5)
    assert got == [4]  # like multiprocessing: callbacks have run when wait() returns
    assert isinstance(errs[0], JobFailed) and errs[0].message == "boom"


def test_callbacks_need_the_reply_list(client, namespace):
    with pytest.raises(ValueError, match="reply_to"):
        client.enqueue("t.add", 1, 2, reply_to=f"{namespace}:mine", callback=print)


def test_result_polls_the_result_key_when_reply_to_is_elsewhere(client, redis_url, namespace, r,
                                                                keys, start_worker):
    start_worker()
    mine = keys.reply("somebody-else")  # the real worker only pushes to reply lists
    ar = client.enqueue("t.add", 20, 22, reply_to=mine)
    assert ar.get(timeout=5) == 42  # polled from the result key
    # Another client, knowing only the id, reads the same result
    with Client(redis_url, namespace=namespace) as other:
        assert other.result(ar.id).get(timeout=5) == 42
        assert other.result(ar.id).successful()
    assert r.llen(mine) == 1 and 0 < r.ttl(mine)


def test_result_of_unknown_job_times_out_then_resolves(client, r, keys):
    ar = client.result("later")
    assert not ar.ready()
    with pytest.raises(RedpoolTimeout):
        ar.get(timeout=0.05)
    env = protocol.envelope(id="later", task="t.x", queue="default", status="succeeded",
                            worker="w", result=[1])
    r.set(keys.result("later"), protocol.dumps(env))
    assert ar.get(timeout=5) == [1] and ar.ready()


def test_unclaimed_reply_is_kept_for_result(client, r):
    client.enqueue("t.add", 1, 2)  # starts the listener
    env = protocol.envelope(id="stray", task="t.x", queue="default", status="failed", worker="w")
    with capture_logs() as logs:
        r.lpush(client.reply_key, b"not json{", protocol.dumps(env))
        wait_until(lambda: client.result("stray").ready(), what="stray envelope")
    assert any("not a result envelope" in e["event"] for e in logs)
    with pytest.raises(JobFailed):
        client.result("stray").get(0)


def test_task_given_as_decorated_or_plain_function(client, r, keys, start_worker):
    client.enqueue(double, 1)
    client.enqueue(triple, 1)
    names = [job.task for job in queued_jobs(r, keys)]
    assert names == ["t.double", f"{__name__}.triple"]
    start_worker()
    assert client.enqueue(double, 5).get(5) == 10
    assert client.enqueue(triple, 5).get(5) == 15


def test_bad_jobs_fail_in_the_producer(client):
    with pytest.raises(ValueError, match="'id' must be"):
        client.enqueue("t.add", 1, 2, id="has space")
    with pytest.raises(ValueError, match="result_ttl"):
        client.enqueue("t.add", 1, 2, result_ttl=-1)
    with pytest.raises(TypeError, match="JSON"):
        client.enqueue("t.add", object(), 2)
    with pytest.raises(ValueError, match="JSON"):
        client.enqueue("t.add", float("nan"), 2)
    with pytest.raises(TypeError):
        client.enqueue(42)
    with pytest.raises(ValueError, match="kwargs"):
        client.enqueue_many("t.add", [(1, 2)], kwargs_list=[{}, {}])
    client.enqueue("t.add", 1, 2, id="dup")
    with pytest.raises(ValueError, match="already waiting"):
        client.enqueue("t.add", 1, 2, id="dup")
    with pytest.raises(ValueError):
        client.result("no spaces allowed")


def test_enqueue_many(client, start_worker):
    start_worker()
    results = client.enqueue_many("t.add", [(i, i) for i in range(10)],
                                  kwargs_list=[{} for _ in range(10)])
    assert [ar.get(5) for ar in results] == [2 * i for i in range(10)]


def test_close_is_prompt_and_abandons_pending_results(redis_url, namespace, r):
    c = Client(redis_url, namespace=namespace)
    # a listener blocking 60 s at a time: close() must wake it, not wait the block out
    # (the bound below is half of that, so a busy machine cannot make it fail)
    c._block = 60.0
    ar = c.enqueue("t.add", 1, 2)
    listener = c._listener
    assert listener.is_alive()
    wait_for(lambda: any(x.get("cmd") == "brpop" for x in r.client_list()),
             what="the listener blocked in BRPOP")
    t0 = time.monotonic()
    c.close()
    assert time.monotonic() - t0 < 30 and not listener.is_alive()
    assert not r.exists(c.reply_key)
    with pytest.raises(RedpoolError, match="closed"):
        ar.get(1)
    with pytest.raises(RedpoolError, match="closed"):
        c.enqueue("t.add", 1, 2)
    c.close()  # idempotent


class FlakyRedis(redis.Redis):
    """Loses the first reply the listener pops, as if the connection broke mid-answer."""

    lost = 0

    def brpop(self, *args, **kwargs):
        item = super().brpop(*args, **kwargs)
        if item is not None and not self.lost:
            self.lost += 1
            raise redis.ConnectionError("connection lost (test)")
        return item


def test_listener_survives_redis_errors_and_recovers_a_lost_reply(redis_url, namespace,
                                                                   start_worker):
    start_worker()
    flaky = FlakyRedis.from_url(redis_url)
    with capture_logs() as logs, Client(redis=flaky, namespace=namespace) as c:
        assert c.enqueue("t.add", 1, 2).get(timeout=5) == 3  # recovered from its result key
        assert c.enqueue("t.add", 2, 2).get(timeout=5) == 4  # and the listener lives on
    flaky.close()
    assert flaky.lost == 1
    assert any(e["log_level"] == "warning" and "retrying" in e["event"] for e in logs)


def test_a_reply_that_never_comes_is_found_by_the_sweep(client, r, keys, monkeypatch):
    monkeypatch.setattr(client_module, "SWEEP_SECONDS", 0.05)
    # Given a job whose worker wrote the result key but whose reply never arrived
    ar = client.enqueue("t.add", 1, 2)
    job = protocol.decode_job(r.rpop(keys.queue("default")))
    env = protocol.envelope(id=job.id, task=job.task, queue="default", status="succeeded",
                            worker="w", result=3)
    r.set(keys.result(job.id), protocol.dumps(env))
    # Then the listener's sweep still resolves it
    assert ar.get(timeout=5) == 3


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_gets_its_own_reply_list(client, start_worker):
    # Given a client already listening in the parent (as with gunicorn --preload)
    start_worker()
    assert client.enqueue("t.add", 1, 1).get(5) == 2
    parent_reply_key = client.reply_key

    def child() -> None:
        ok = client.enqueue("t.add", 2, 2).get(5) == 4 and client.reply_key != parent_reply_key
        os._exit(0 if ok else 1)

    # When a forked child enqueues, then it gets its result on a reply list of its own
    proc = multiprocessing.get_context("fork").Process(target=child)
    proc.start()
    proc.join(10)
    assert proc.exitcode == 0
    assert client.reply_key == parent_reply_key and client.enqueue("t.add", 3, 3).get(5) == 6


def test_client_defaults_come_from_the_environment(monkeypatch, redis_url, namespace, start_worker):
    monkeypatch.setenv("REDPOOL_REDIS_URL", redis_url)
    monkeypatch.setenv("REDPOOL_NAMESPACE", namespace)
    start_worker()
    with Client() as c:
        assert (c.url, c.namespace) == (redis_url, namespace)
        assert c.enqueue("t.add", 1, 2).get(5) == 3
    monkeypatch.delenv("REDPOOL_REDIS_URL")
    monkeypatch.delenv("REDPOOL_NAMESPACE")
    with Client() as c:
        assert (c.url, c.namespace) == ("redis://localhost:6379/0", protocol.DEFAULT_NAMESPACE)


def test_repr_never_shows_the_password(redis_url):
    with Client("redis://user:hunter2@localhost:1/0") as c:
        assert "hunter2" not in repr(c) and "user:***@localhost:1/0" in repr(c)
    theirs = redis.Redis(host="localhost", port=1, password="hunter2")
    with Client(redis=theirs) as c:
        assert "hunter2" not in repr(c) and "redis://localhost:1/0" in repr(c)
    theirs.close()


@pytest.mark.parametrize("url, expected", [
    ("redis://user:pass@host:6380/2", "redis://user:***@host:6380/2"),
    ("redis://:pass@host", "redis://:***@host"),
    ("rediss://default:p%40ss@cache.example.com:6380/0", "rediss://default:***@cache.example.com:6380/0"),
    ("redis://lonely@host/0", "redis://***@host/0"),
    ("redis://u:p@ss/w?rd@host:1/0", "redis://***"),  # unencoded '/': nothing can be trusted
    ("redis://host:6379/0", "redis://host:6379/0"),
    ("redis://[::1]:6379/0", "redis://[::1]:6379/0"),
    ("unix:///run/redis.sock?db=1&password=s3cret", "unix:///run/redis.sock?db=1&password=***"),
    ("unix:///run/redis.sock", "unix:///run/redis.sock"),
    ("unix://user:pw@/run/redis.sock?db=0", "unix://user:***@/run/redis.sock?db=0"),
    ("redis://h/0?sentinel_password=x&socket_timeout=5", "redis://h/0?sentinel_password=***&socket_timeout=5"),
    ("localhost:6379", "***"),   # not a URL: perhaps the password, given where the URL goes
    ("user:pass@localhost", "***"),
])
def test_redact_url(url, expected):
    assert redact_url(url) == expected


# -- Pool ---------------------------------------------------------------------------------------

def test_pool_apply_and_apply_async(pool, start_worker):
    start_worker()
    assert pool.apply("t.add", (1, 2)) == 3
    assert pool.apply(double, (4,)) == 8
    got = []
    ar = pool.apply_async("t.add", (1,), {"b": 5}, callback=got.append)
    assert ar.get(5) == 6 and got == [6]


def test_map_preserves_input_order_when_answers_arrive_out_of_order(pool, start_worker):
    # Given two workers, the first item the slowest
    w = start_worker(threads=2)
    out = pool.starmap("t.slow", [(0.3, "a"), (0.0, "b"), (0.0, "c")], chunksize=7)
    # Then the answers arrived out of order, but map kept input order
    assert w.done[-1] == [0.3, "a"]
    assert out == ["a", "b", "c"]
    # And with many items and jitter, order still holds
    assert pool.map("t.jitter", range(300)) == list(range(300))


def test_map_raises_the_failure(pool, start_worker):
    start_worker()
    with pytest.raises(JobFailed, match="negative: -1"):
        pool.map("t.maybe_boom", [1, 2, -1, 4])
    errs = []
    mr = pool.map_async("t.maybe_boom", [1, -2], error_callback=errs.append)
    mr.wait(5)
    assert mr.ready() and not mr.successful()
    assert isinstance(errs[0], JobFailed)


def test_map_async_semantics(pool, start_worker):
    got = []
    mr = pool.map_async("t.double", [1, 2, 3], callback=got.append)
    assert isinstance(mr, MapResult) and not mr.ready()
    with pytest.raises(ValueError):
        mr.successful()
    with pytest.raises(multiprocessing.TimeoutError):
        mr.get(timeout=0.05)
    start_worker()
    assert mr.get(5) == [2, 4, 6] and mr.successful() and got == [[2, 4, 6]]
    assert pool.map("t.double", []) == []
    assert pool.starmap_async("t.add", [(1, 2)]).get(5) == [3]


def test_imap_and_imap_unordered(pool, start_worker):
    start_worker(threads=2)
    it = pool.imap("t.jitter", range(50))
    assert isinstance(it, IMapIterator)
    assert list(it) == list(range(50))
    assert sorted(pool.imap_unordered("t.jitter", range(50))) == list(range(50))
    # a failure is raised at its position, and iteration can go on
    it = pool.imap("t.maybe_boom", [1, -1, 3])
    assert next(it) == 1
    with pytest.raises(JobFailed):
        next(it)
    assert next(it) == 3
    with pytest.raises(StopIteration):
        next(it)


def test_imap_next_timeout_keeps_the_item(pool, start_worker):
    it = pool.imap("t.double", [21])
    for cls in (multiprocessing.TimeoutError, builtins.TimeoutError):
        with pytest.raises(cls):
            it.next(timeout=0.05)
    start_worker()
    assert it.next(timeout=5) == 42
    u = pool.imap_unordered("t.double", [1])
    assert u.next(timeout=5) == 2


def test_imap_enqueues_lazily(pool, r, keys, start_worker):
    # Given an endless iterable
    w = start_worker()
    it = pool.imap("t.echo", itertools.count())
    # When the first results are read
    assert [next(it) for _ in range(5)] == [0, 1, 2, 3, 4]
    # Then only a bounded window of jobs was ever enqueued
    enqueued = len(w.done) + r.llen(keys.queue("default"))
    assert 5 <= enqueued <= IMapIterator.WINDOW + BATCH


def test_close_and_join(pool, r, keys, start_worker):
    with pytest.raises(ValueError, match="still running"):
        pool.join()
    slow = pool.apply_async("t.slow", (0.2, "done"))
    it = pool.imap("t.double", range(3 * BATCH))  # nothing enqueued until consumed
    pool.close()
    for call in (lambda: pool.apply("t.add", (1, 2)), lambda: pool.map("t.double", [1]),
                 lambda: pool.imap("t.double", [1])):
        with pytest.raises(ValueError, match="Pool not running"):
            call()
    # join waits for every submitted job, every imap item included
    start_worker(threads=2)
    pool.join()
    assert slow.ready() and slow.get(0) == "done"
    assert list(it) == [2 * i for i in range(3 * BATCH)]
    assert r.llen(keys.queue("default")) == 0
    assert pool.client._closed  # the pool made its client, so join released it


def test_terminate_stops_waiting_but_jobs_stay_queued(redis_url, namespace, r, keys):
    with Pool(redis_url, namespace=namespace) as p:
        ar = p.apply_async("t.add", (1, 2))
        joiner = threading.Thread(target=lambda: (p.close(), p.join()))
        joiner.start()
    joiner.join(5)
    assert not joiner.is_alive()
    with pytest.raises(ValueError, match="Pool not running"):
        p.apply("t.add", (1, 2))
    assert p.client._closed and not p.client._listener.is_alive()
    assert r.llen(keys.queue("default")) == 1  # still runs on a worker later
    with pytest.raises(RedpoolError, match="closed"):
        ar.get(1)


def test_pool_with_a_shared_client(client, start_worker):
    start_worker()
    with Pool(client=client) as p:
        assert p.map("t.double", [1, 2]) == [2, 4]
    assert not client._closed  # not ours to close
    assert client.enqueue("t.add", 1, 1).get(5) == 2
    with pytest.raises(TypeError, match="URL"):
        Pool(4)
    with pytest.raises(ValueError):
        Pool("redis://x", client=client)


def test_map_pipelines_its_enqueues_and_jobs_are_valid(pool, r, keys, start_worker):
    def lpush_calls() -> int:
        return r.info("commandstats").get("cmdstat_lpush", {}).get("calls", 0)

    # Given no worker yet, so only the producer pushes
    before = lpush_calls()
    mr = pool.map_async("t.double", range(2000))
    # Then 2000 jobs took a handful of round trips
    assert lpush_calls() - before <= 2000 // BATCH
    # And every queued job is valid and asks for its reply on the pool's client
    jobs = queued_jobs(r, keys)
    assert len(jobs) == 2000
    assert [j.args for j in jobs] == [[i] for i in range(2000)]
    assert {j.reply_to for j in jobs} == {pool.client.reply_key}
    assert len({j.id for j in jobs}) == 2000 and all(j.task == "t.double" for j in jobs)
    start_worker(threads=2)
    assert mr.get(30) == [2 * i for i in range(2000)]
