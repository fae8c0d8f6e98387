"""Producers that abuse a worker's answers (issue 12 §5, §6): a reply_to naming a list
that is not theirs to write, reply lists shared by jobs that ask for different TTLs,
and the worker's Redis password, which nothing a job or task gets back may show.
"""

from __future__ import annotations

import json
import uuid

import pytest

from helpers import Daemon
from hostile.conftest import MODULES, started
from hostile.invariants import Case, Checker, waiting

pytestmark = pytest.mark.daemon


def other_app_list(r, name: str) -> tuple[str, tuple]:
    """A list of another application, outside the worker's namespace: its key and what
    it holds (items, TTL) before the test."""
    r.delete(name)
    r.rpush(name, "their item 1", "their item 2")
    return name, (r.lrange(name, 0, -1), r.ttl(name))


def test_reply_to_another_applications_list_is_refused(worker):
    with worker.checker() as chk:
        key, before = other_app_list(chk.r, f"{chk.ns}-other-app:inbox")
        try:
            c = chk.case({"task": "h.ok", "reply_to": key}, status="failed",
                         error_type="InvalidJob")   # answered through its result key only
            chk.run([c])
            assert (chk.r.lrange(key, 0, -1), chk.r.ttl(key)) == before, "their list changed"
        finally:
            chk.r.delete(key)


@pytest.mark.parametrize("which", ["queue", "tagged"])
def test_reply_to_a_key_of_the_namespace_is_refused(worker, which):
    """A queue of the namespace (one no worker serves, so that we see what lands there)."""
    with worker.checker() as chk:
        key = chk.keys.queue("elsewhere") if which == "queue" else f"{{{chk.ns}}}:queue:x"
        c = chk.case({"task": "h.ok", "reply_to": key}, status="failed", error_type="InvalidJob")
        chk.run([c])
        assert not chk.r.exists(key)


def test_reply_to_allowed_by_a_pattern(hostile_daemons, r, keys):
    pattern = f"{keys.ns}-app:replies:*"
    d = hostile_daemons("--concurrency", "2", "--reply-to", pattern)
    chk = Checker(r, keys, [d], concurrency=2)
    label = chk.label()
    reply = f"{keys.ns}-app:replies:{label}"
    try:
        c = Case(json.dumps({"task": "h.ok", "id": label, "reply_to": reply}).encode(), label,
                 id=label, reply_to=reply, status="succeeded")
        chk.run([c])
    finally:
        r.delete(reply)


def test_jobs_sharing_a_reply_list_keep_the_longest_ttl(worker):
    # Given a producer's one reply list, answered for a job that keeps its result an hour
    with worker.checker() as chk:
        shared = chk.reply("shared")
        first = chk.case({"task": "h.ok", "reply_to": shared, "result_ttl": 3600})
        first.reply_to = None   # (two answers there: counted below)
        chk.run([first])
        # When a job asking for one second is answered on the same list
        second = chk.case({"task": "h.ok", "reply_to": shared, "result_ttl": 1})
        second.reply_to = None
        chk.run([second])
        # Then both answers are there, and stay as long as the first asked
        ids = sorted(json.loads(x)["id"] for x in chk.r.lrange(shared, 0, -1))
        assert ids == sorted([first.id, second.id])
        assert chk.r.ttl(shared) > 3000, f"the list expires in {chk.r.ttl(shared)} s"


def test_the_redis_password_reaches_no_task_answer_log_or_ps(redis_url, r, keys, tmp_path):
    # Given a worker whose Redis user has a password, given in a file
    user, password = f"hostile-{uuid.uuid4().hex[:8]}", f"pw-{uuid.uuid4().hex}"
    r.execute_command("ACL", "SETUSER", user, "on", f">{password}", "~*", "&*", "+@all")
    url = redis_url.replace("redis://", f"redis://{user}:{password}@", 1)
    url_file = tmp_path / "redis-url"
    url_file.write_text(url + "\n")
    url_file.chmod(0o600)
    d = Daemon(redis_url, keys.ns, "--concurrency", "2", name="secrets", modules=MODULES,
               env={"HOSTILE_DIR": str(tmp_path)})
    i = d.cmd.index("--redis-url")
    d.cmd[i:i + 2] = ["--redis-url-file", str(url_file)]
    try:
        started(d.start(tmp_path))
        chk = Checker(r, keys, [d], concurrency=2)
        # When a task looks at everything it can see of the worker, and bad jobs fail
        cases = [chk.case({"task": "h.secrets"}), chk.case({"task": "h.nope"}),
                 chk.case({"task": "h.raise_unprintable"})]
        chk.run(cases)
        # Then the password is in none of it, nor in the log or any process's command line
        seen = [json.dumps(c.answer) for c in cases] + [d.log()]
        seen += [json.dumps(e) for e in chk.dead_raws().values()]
        for pid in [d.pid, *d.children()]:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                seen.append(f.read().decode("utf-8", "replace"))
            with open(f"/proc/{pid}/environ", "rb") as f:
                seen.append(f.read().decode("utf-8", "replace"))
        leaks = [s[max(0, s.find(password) - 80):s.find(password) + 40] for s in seen
                 if password in s]
        assert not leaks, f"the password shows in: {leaks}"
    finally:
        d.kill()
        r.execute_command("ACL", "DELUSER", user)
