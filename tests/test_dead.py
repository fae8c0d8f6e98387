"""`redpool dead list | requeue | purge`: dead-letter administration against a real server."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import pytest
import redis

from helpers import ROOT
from redpool import dead, protocol
from redpool.errors import ConfigError
from terminal import on_a_terminal

NOW = 1_732_492_800.0  # 2024-11-25T00:00:00Z


def bury(r, keys, raw: bytes = b'{"task":"t.add","args":[1]}', *, id: str | None = "j1",
         queue: str = "default", at: float = NOW, reason: str = "no such task",
         error_type: str = protocol.E_UNKNOWN_TASK) -> bytes:
    """Dead-letter ``raw`` as a worker would; returns the entry's bytes."""
    entry = protocol.dumps(protocol.dead_entry(raw, queue=queue, reason=reason, job_id=id,
                                               error_type=error_type, worker="w1", now=at))
    r.lpush(keys.dead, entry)
    return entry


def redpool_dead(redis_url, namespace, *args: str, env: dict | None = None):
    e = {k: v for k, v in os.environ.items() if not k.startswith("REDPOOL_")}
    e.update(COLUMNS="100", **(env or {}))
    return subprocess.run([sys.executable, "-m", "redpool", "dead", *args, "--redis-url",
                           redis_url, "--namespace", namespace], cwd=ROOT, env=e,
                          capture_output=True, text=True, timeout=60)


# -- list -------------------------------------------------------------------------------------

def test_list_is_newest_first_limited_and_counts_everything(r, keys):
    for i in range(5):
        bury(r, keys, id=f"j{i}", at=NOW + i)
    shown, matching, total = dead.list_entries(r, keys, limit=3)
    assert [e.id for e in shown] == ["j4", "j3", "j2"]
    assert [e.pos for e in shown] == [0, 1, 2]
    assert (matching, total) == (5, 5)
    assert len(dead.list_entries(r, keys, limit=0)[0]) == 5


def test_list_filters_by_queue_and_keeps_real_positions(r, keys):
    for i, q in enumerate(["a", "b", "a", "b", "a"]):
        bury(r, keys, id=f"j{i}", queue=q)
    shown, matching, total = dead.list_entries(r, keys, limit=2, queue="a")
    assert [(e.pos, e.id) for e in shown] == [(0, "j4"), (2, "j2")]
    assert (matching, total) == (3, 5)


def test_cli_list_prints_a_table_json_lines_and_an_empty_list(redis_url, namespace, r, keys):
    res = redpool_dead(redis_url, namespace, "list")
    assert res.returncode == 0 and res.stdout.strip() == "no dead letters", res.stderr
    entries = [bury(r, keys, id="j1", reason="x" * 300, queue="emails"),
               bury(r, keys, id=None, queue="default", at=NOW + 60)]
    r.lpush(keys.dead, b"\xffnot json")

    res = redpool_dead(redis_url, namespace, "list")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0].split() == ["#", "failed_at", "(UTC)", "queue", "id", "error_type", "reason"]
    assert lines[1].split() == ["0", "<unreadable", "entry>"]
    assert lines[2].split()[:5] == ["1", "2024-11-25T00:01:00Z", "default", "-", "UnknownTask"]
    assert lines[3].split()[:4] == ["2", "2024-11-25T00:00:00Z", "emails", "j1"]
    assert lines[3].endswith("xxx...") and all(len(line) <= 100 for line in lines)
    assert lines[-1] == f"3 shown of 3 dead letters in {keys.dead}, newest first"

    res = redpool_dead(redis_url, namespace, "list", "--json", "--limit", "2")
    assert res.stdout.encode().splitlines() == [entries[1]]  # unmodified; unreadable left out
    assert "left out 1 unreadable entry" in res.stderr and "2 shown of 3" in res.stderr

    res = redpool_dead(redis_url, namespace, "list", "--json", "--queue", "emails")
    assert res.stdout.encode().splitlines() == [entries[0]]


# -- requeue ----------------------------------------------------------------------------------

def test_requeue_by_id_pushes_the_exact_bytes_onto_the_tail_of_its_queue(r, keys):
    raw = b'{"task":"t.add","id":"j1","args":[1, 2],  "x":"\xc3\xa9"}'
    r.lpush(keys.queue("emails"), b"waiting")
    other = bury(r, keys, id="j2", queue="emails")
    bury(r, keys, raw, id="j1", queue="emails")

    report = dead.requeue(r, keys, ["j1"])

    assert [e.id for e in report.done] == ["j1"] and report.missing == []
    assert r.lrange(keys.queue("emails"), 0, -1) == [raw, b"waiting"]  # new work: the tail
    assert r.lrange(keys.dead, 0, -1) == [other]


def test_requeue_restores_a_job_that_was_not_utf8_byte_for_byte(r, keys):
    raw = b'{"task":"t.add","args":["\xff\xfe"]}'
    entry = bury(r, keys, raw, id=None, error_type=protocol.E_INVALID_JOB)
    assert "job_b64" in json.loads(entry)
    report = dead.requeue(r, keys, all=True)
    assert report.pushed == {"default": 1}
    assert r.lrange(keys.queue("default"), 0, -1) == [raw]
    assert r.llen(keys.dead) == 0


def test_requeue_all_of_one_queue_keeps_their_order_and_skips_what_it_cannot(r, keys):
    for i in range(3):
        bury(r, keys, f'{{"task":"t","id":"a{i}"}}'.encode(), id=f"a{i}", queue="a", at=NOW + i)
    b = bury(r, keys, id="b0", queue="b")
    broken = json.dumps({"id": "a9", "queue": "a", "failed_at": NOW}).encode()  # no raw job
    r.lpush(keys.dead, broken)
    r.lpush(keys.dead, b"[1, 2]")  # not an object: unreadable

    report = dead.requeue(r, keys, all=True, queue="a")

    assert report.pushed == {"a": 3}
    assert [why for _, why in report.skipped] == ["it holds no raw job (neither 'job' nor 'job_b64')"]
    # oldest first at the head (right end): a worker takes them in their original order
    assert [json.loads(r.rpop(keys.queue("a")))["id"] for _ in range(3)] == ["a0", "a1", "a2"]
    assert r.lrange(keys.dead, 0, -1) == [b"[1, 2]", broken, b]


def test_requeue_refuses_an_entry_that_keeps_only_the_beginning_of_its_job(r, keys):
    # Given the dead letter of a 200 KB job over a worker's --max-payload of 1000 bytes
    raw = b'{"task":"t","id":"big","args":["' + b"x" * 200_000 + b'"]}'
    entry = protocol.dumps(protocol.dead_entry(raw, queue="default", reason="too big",
                                               error_type=protocol.E_PAYLOAD_TOO_LARGE,
                                               worker="w1", job_id="big", max_job=1000))
    r.lpush(keys.dead, entry)
    # When it is requeued, Then nothing is pushed (its first 64 KiB are not a job)
    report = dead.requeue(r, keys, ["big"])
    assert report.pushed == {} and r.llen(keys.queue("default")) == 0
    assert [why for _, why in report.skipped] == [
        f"it keeps only the beginning of its job of {len(raw)} bytes (over the worker's "
        "--max-payload): send a smaller job, with a reference to large data, instead"]
    assert r.lrange(keys.dead, 0, -1) == [entry]


def test_cli_requeue_reports_unknown_ids_and_exits_1(redis_url, namespace, r, keys):
    bury(r, keys, id="j1")
    r.lpush(keys.dead, json.dumps({"id": "j2", "queue": "default", "job_b64": "%%"}))
    res = redpool_dead(redis_url, namespace, "requeue", "j1", "j2", "nope")
    assert res.returncode == 1
    assert res.stdout.strip() == "requeued 1 job (default: 1)"
    assert "no dead letter with id 'nope'" in res.stderr
    assert "cannot requeue the dead letter at position 0 (job j2): its 'job_b64' is not " \
           "valid base64" in res.stderr
    assert r.llen(keys.queue("default")) == 1 and r.llen(keys.dead) == 1

    res = redpool_dead(redis_url, namespace, "requeue")
    assert res.returncode == 2 and "name the job ids to requeue, or pass --all" in res.stderr


def test_the_script_requeues_an_entry_only_once(r, keys):
    entry = bury(r, keys, b"job", id="j1")
    script = dead.load_script(r, "dead_requeue")
    args = dict(keys=[keys.dead, keys.queue("default")], args=[entry, b"job"])
    assert script(**args) == [1]
    assert script(**args) == [0]
    assert r.lrange(keys.queue("default"), 0, -1) == [b"job"]


def test_two_operators_requeueing_one_entry_at_once_requeue_it_once(redis_url, r, keys):
    for round_ in range(20):
        bury(r, keys, f"job-{round_}".encode(), id=f"j{round_}")
        start = threading.Barrier(2)
        reports = []

        def operator():
            client = redis.Redis.from_url(redis_url)
            start.wait()
            reports.append(dead.requeue(client, keys, [f"j{round_}"]))
            client.close()

        threads = [threading.Thread(target=operator) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        assert sorted(sum(rep.pushed.values()) for rep in reports) == [0, 1]
        assert r.lrange(keys.queue("default"), 0, -1) == [f"job-{round_}".encode()]
        r.delete(keys.queue("default"))


# -- purge ------------------------------------------------------------------------------------

def test_purge_older_than_removes_by_age_and_leaves_what_it_cannot_date(r, keys):
    now = time.time()
    young = bury(r, keys, id="young", at=now - 10)
    bury(r, keys, id="hours", at=now - 2 * 3600)
    bury(r, keys, id="days", at=now - 3 * 86400)
    undated = json.dumps({"id": "u", "queue": "default", "failed_at": "yesterday"}).encode()
    r.lpush(keys.dead, undated, b"corrupt")
    bury(r, keys, id="other-q", queue="b", at=now - 3 * 86400)

    assert dead.purge(r, keys, older_than=86400, queue="default") == 1
    assert dead.purge(r, keys, older_than=3600, now=now) == 2
    assert r.lrange(keys.dead, 0, -1) == [b"corrupt", undated, young]


def test_cli_purge_needs_a_flag_and_all_removes_corrupt_entries(redis_url, namespace, r, keys):
    bury(r, keys, id="j1")
    r.lpush(keys.dead, b"corrupt", b"{}")
    for flags in [(), ("--all", "--older-than", "1d")]:
        res = redpool_dead(redis_url, namespace, "purge", *flags)
        assert res.returncode == 2 and "a bare purge never empties the list" in res.stderr
    assert r.llen(keys.dead) == 3
    res = redpool_dead(redis_url, namespace, "purge", "--older-than", "soon")
    assert res.returncode == 2 and "invalid duration 'soon'" in res.stderr

    res = redpool_dead(redis_url, namespace, "purge", "--older-than", "1h")
    assert res.returncode == 0 and res.stdout.strip() == "purged 1 entry"
    res = redpool_dead(redis_url, namespace, "purge", "--all")
    assert res.returncode == 0 and res.stdout.strip() == "purged 2 entries"
    assert r.exists(keys.dead) == 0


# -- progress ---------------------------------------------------------------------------------

def bury_many(r, keys, n: int, queue: str = "default") -> None:
    pipe = r.pipeline(transaction=False)
    for i in range(n):
        pipe.lpush(keys.dead, protocol.dumps(protocol.dead_entry(
            f'{{"task":"t.add","id":"m{i}"}}'.encode(), queue=queue, reason="r", job_id=f"m{i}",
            error_type=protocol.E_UNKNOWN_TASK, worker="w1", now=NOW + i)))
    pipe.execute()


def test_requeue_and_purge_of_many_print_only_their_summary_off_a_terminal(
        redis_url, namespace, r, keys):
    bury_many(r, keys, 700)
    res = redpool_dead(redis_url, namespace, "requeue", "--all")
    assert res.returncode == 0
    assert res.stdout == "requeued 700 jobs (default: 700)\n" and res.stderr == ""
    bury_many(r, keys, 700)
    res = redpool_dead(redis_url, namespace, "purge", "--all")
    assert res.returncode == 0
    assert res.stdout == "purged 700 entries\n" and res.stderr == ""


def test_requeue_all_draws_a_progress_bar_on_a_terminal_then_its_summary(
        redis_url, namespace, r, keys):
    bury_many(r, keys, 700)
    env = {k: v for k, v in os.environ.items() if not k.startswith("REDPOOL_")}
    code, out, drawn = on_a_terminal(
        [sys.executable, "-m", "redpool", "dead", "requeue", "--all", "--redis-url", redis_url,
         "--namespace", namespace], env=env, cwd=ROOT)
    assert code == 0, drawn
    assert out == "requeued 700 jobs (default: 700)\n"      # unchanged on stdout
    assert "requeue:" in drawn and "/700" in drawn            # tqdm's bar, on stderr
    assert drawn.split("\r")[-2].strip() == ""               # and blanked when done
    assert r.llen(keys.queue("default")) == 700


def test_a_bar_is_given_the_number_of_entries_it_will_go_through(r, keys):
    bury_many(r, keys, 250, queue="a")
    bury_many(r, keys, 50, queue="b")
    totals, done = [], []

    @contextlib.contextmanager
    def progress(total):
        totals.append(total)
        yield SimpleNamespace(update=done.append)

    assert dead.purge(r, keys, all=True, queue="a", progress=progress) == 250
    assert totals == [250] and sum(done) == 250 and max(done) <= dead.BATCH


def test_purge_removes_identical_copies_and_never_new_entries(r, keys):
    old = bury(r, keys, id="j1", at=NOW)
    r.lpush(keys.dead, old)
    new = bury(r, keys, id="j2", at=time.time())
    assert dead.purge(r, keys, older_than=60) == 2
    assert r.lrange(keys.dead, 0, -1) == [new]


# -- input and errors -------------------------------------------------------------------------

@pytest.mark.parametrize("text, seconds", [
    ("30s", 30), ("15m", 900), ("12h", 43200), ("7d", 604800), ("90", 90), ("1.5h", 5400),
    (" 2D ", 172800), ("0", 0)])
def test_parse_duration(text, seconds):
    assert dead.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "h", "-5", "5w", "1h30m", "nan", "inf", "5 days"])
def test_parse_duration_refuses(text):
    with pytest.raises(ConfigError, match="invalid duration"):
        dead.parse_duration(text)


def test_entries_that_are_not_objects_are_unreadable_not_fatal(r, keys):
    for raw in [b"\xff", b"[]", b'"text"', b"null", b"[" * 100_000]:
        r.lpush(keys.dead, raw)
    shown, _, total = dead.list_entries(r, keys, limit=0)
    assert total == 5 and all(e.data is None for e in shown)
    assert "<unreadable entry>" in dead.format_table(shown)
    report = dead.requeue(r, keys, all=True)
    assert report.unreadable == 5 and not report.done and r.llen(keys.dead) == 5


def test_an_unreachable_server_exits_4_without_showing_the_password(namespace):
    res = redpool_dead("redis://user:s3cret@127.0.0.1:1/0", namespace, "list")
    assert res.returncode == 4 and "cannot reach Redis at redis://user:***@127.0.0.1:1/0" \
        in res.stderr
    assert "s3cret" not in res.stdout + res.stderr


def test_requeue_starts_a_retried_job_over(r, keys):
    from redpool import dead, protocol as p

    job = {"task": "t.boom", "id": "again", "attempt": 4, "max_retries": 3, "x-extra": [1]}
    r.lpush(keys.dead, p.dumps(p.dead_entry(json.dumps(job).encode(), queue="default",
                                            reason="failed after 4 attempt(s)",
                                            error_type="ValueError", worker="w", job_id="again")))
    dead.requeue(r, keys, ["again"])
    back = json.loads(r.lpop(keys.queue("default")))
    assert "attempt" not in back and back["max_retries"] == 3 and back["x-extra"] == [1]
