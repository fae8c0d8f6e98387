"""Real Redis deployments: TLS with client certificates, and least-privilege ACL users.

The valkey-server we ship is built without TLS, so TLS is tested through a
TLS-terminating proxy written here (asyncio + ssl; a throwaway CA from trustme issues
the server's and the client's certificates; the proxy requires a client certificate)
in front of the plain test server: what we ship, the client side, runs for real.  A
second test uses a TLS-enabled redis-server natively when the machine has one.

ACL users are created on the test server from what `redpool acl` prints, and removed
afterwards.  The sentinel failover test is in test_sentinel.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import shutil
import signal
import ssl
import subprocess
import sys
import threading
import urllib.request
from datetime import datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest
import redis

from helpers import ROOT, Daemon, envelope, lpush_jobs, wait_for
from redpool import acl
from redpool.client import Client
from redpool.errors import EXIT_REDIS, EXIT_USAGE, JobFailed
from redpool.protocol import Keys
from redpool.server import EmbeddedServer, find_server_binary, free_port

PASSWORD = "pw-Xq7-not-in-logs"
NATIVE_REDIS = "/usr/bin/redis-server"


def redpool(*args: str, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, PYTHONUNBUFFERED="1")
    for var in ("REDPOOL_REDIS_URL", "REDPOOL_REDIS_CA", "REDPOOL_REDIS_CERT", "REDPOOL_REDIS_KEY"):
        full_env.pop(var, None)
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "redpool", *args], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


# -- TLS --------------------------------------------------------------------------------------

class TLSProxy:
    """Terminates TLS (requiring a client certificate signed by ``ca``) on a free
    loopback port and forwards the plain bytes to ``target_port``."""

    def __init__(self, target: tuple[str, int], context: ssl.SSLContext) -> None:
        self.target = target
        self.context = context
        self.accepted = 0            # connections that completed the handshake
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="tls-proxy")

    def start(self) -> "TLSProxy":
        self._thread.start()
        assert self._ready.wait(10), "the TLS proxy did not start"
        return self

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        # refused handshakes are the point of some tests: not worth a traceback each
        self._loop.set_exception_handler(lambda loop, ctx: None)
        server = self._loop.run_until_complete(
            asyncio.start_server(self._handle, "127.0.0.1", 0, ssl=self.context))
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()
        server.close()

    async def _handle(self, client_r, client_w) -> None:
        self.accepted += 1
        try:
            up_r, up_w = await asyncio.open_connection(*self.target)
        except OSError:
            client_w.close()
            return
        await asyncio.gather(self._pipe(client_r, up_w), self._pipe(up_r, client_w))

    @staticmethod
    async def _pipe(reader, writer) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (OSError, ssl.SSLError):
            pass
        finally:
            try:
                writer.close()
            except (OSError, RuntimeError):
                pass


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    """PEM files: our CA, the server's certificate for 127.0.0.1, a client certificate,
    and another CA that signed nothing here."""
    trustme = pytest.importorskip("trustme")
    d = tmp_path_factory.mktemp("tls")
    ca, other = trustme.CA(), trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    client = ca.issue_cert("redpool-worker")
    files = {"ca": d / "ca.pem", "other_ca": d / "other-ca.pem", "cert": d / "client.pem",
             "key": d / "client.key", "server_cert": d / "server.pem",
             "server_key": d / "server.key"}
    ca.cert_pem.write_to_path(files["ca"])
    other.cert_pem.write_to_path(files["other_ca"])
    client.cert_chain_pems[0].write_to_path(files["cert"])
    client.private_key_pem.write_to_path(files["key"])
    server.cert_chain_pems[0].write_to_path(files["server_cert"])
    server.private_key_pem.write_to_path(files["server_key"])
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.configure_cert(context)
    ca.configure_trust(context)
    context.verify_mode = ssl.CERT_REQUIRED
    return {k: str(v) for k, v in files.items()} | {"context": context}


@pytest.fixture(scope="module")
def tls_url(redis_url, certs):
    """A rediss:// URL of the session's server, through the proxy (no TLS files in it)."""
    parts = urlsplit(redis_url)
    proxy = TLSProxy((parts.hostname, parts.port), certs["context"]).start()
    netloc = parts.netloc.rpartition("@")[0]
    url = urlunsplit(("rediss", f"{netloc + '@' if netloc else ''}127.0.0.1:{proxy.port}",
                      parts.path or "/0", "", ""))
    yield url
    proxy.stop()


def test_a_worker_client_and_cli_run_jobs_over_tls_with_a_client_certificate(
        tls_url, certs, namespace, r, tmp_path):
    files = {"REDPOOL_REDIS_CA": certs["ca"], "REDPOOL_REDIS_CERT": certs["cert"],
             "REDPOOL_REDIS_KEY": certs["key"]}
    # Given a worker whose TLS files come from flags
    d = Daemon(tls_url, namespace, "--concurrency", "1", "--redis-ca", certs["ca"],
               "--redis-cert", certs["cert"], "--redis-key", certs["key"]).start(tmp_path)
    try:
        d.wait_started()
        # When a Client names the same files as URL options, redis-py's own form
        url = (f"{tls_url}?ssl_ca_certs={certs['ca']}&ssl_certfile={certs['cert']}"
               f"&ssl_keyfile={certs['key']}")
        with Client(url, namespace=namespace) as client:
            # Then jobs run, their results come back by push and by result key
            assert client.enqueue("t.add", 2, 3).get(timeout=30) == 5
            assert client.enqueue("t.add", 4, 5, delay=0.2).get(timeout=30) == 9
            job = client.enqueue("t.boom", "over tls", id="tls-failed")
            with pytest.raises(JobFailed, match="over tls"):
                job.get(timeout=30)
        # and the CLI reads its files from the environment...
        res = redpool("enqueue", "t.add", "20", "22", "--wait", "--wait-timeout", "30",
                      "--redis-url", tls_url, "--namespace", namespace, env=files)
        assert res.returncode == 0, res.stderr
        assert json.loads(res.stdout.split("\n", 1)[1])["result"] == 42  # after the job id
        # ... or its flags, for every command that connects
        flags = ["--redis-url", tls_url, "--namespace", namespace, "--redis-ca", certs["ca"],
                 "--redis-cert", certs["cert"], "--redis-key", certs["key"]]
        res = redpool("dead", "list", *flags)
        assert res.returncode == 0, res.stderr
        res = redpool("status", "--json", *flags)
        assert res.returncode == 0, res.stderr
        res = redpool("inspect", "tls-failed", *flags)
        assert res.returncode == 0, res.stderr
        assert d.proc.poll() is None
        d.signal(signal.SIGTERM)
        assert d.wait(30) == 0
    finally:
        d.kill()
    assert not [e for e in d.events() if e.get("event") == "redis_down"]


@pytest.mark.parametrize("files, says", [
    (("ca",), ["requires a client certificate", "--redis-cert", "--redis-key"]),
    (("other_ca", "cert", "key"), ["not signed by a CA we trust", "--redis-ca"]),
])
def test_a_worker_refused_by_tls_exits_4_and_says_what_to_fix(tls_url, certs, files, says):
    flags = [x for name in files for x in (f"--redis-{name.removeprefix('other_')}", certs[name])]
    res = redpool("worker", "tests.taskmods.jobs", "--redis-url", tls_url, "--burst", *flags)
    assert res.returncode == EXIT_REDIS, res.stderr
    # one message, said once: a JSON line, since stderr is not a terminal
    fatal = [json.loads(x) for x in res.stderr.splitlines() if '"fatal"' in x]
    assert len(fatal) == 1 and "redpool: " not in res.stderr, res.stderr
    message = fatal[0]["error"]
    for part in says:
        assert part in message, message
    assert "rediss://127.0.0.1:" in message


def test_tls_mistakes_are_configuration_errors_found_before_connecting(redis_url, tls_url, certs):
    cases = [
        (["--redis-url", redis_url, "--redis-ca", certs["ca"]], "need a TLS URL, rediss://"),
        (["--redis-url", tls_url, "--redis-ca", certs["ca"] + ".missing"], "no such readable file"),
        (["--redis-url", tls_url, "--redis-key", certs["key"]], "give the certificate too"),
        (["--redis-url", f"{tls_url}?ssl_ca_certs={certs['other_ca']}", "--redis-ca", certs["ca"]],
         "name the file once"),
    ]
    for flags, says in cases:
        res = redpool("worker", "tests.taskmods.jobs", "--burst", *flags)
        assert res.returncode == EXIT_USAGE and says in res.stderr, (flags, res.stderr)


def _native_tls_server(certs):
    if not os.access(NATIVE_REDIS, os.X_OK):
        pytest.skip(f"no {NATIVE_REDIS} on this machine (the valkey-server we ship has no TLS)")
    tls_port = free_port()
    srv = EmbeddedServer(binary=NATIVE_REDIS, extra_args=[
        "--tls-port", str(tls_port), "--tls-cert-file", certs["server_cert"],
        "--tls-key-file", certs["server_key"], "--tls-ca-cert-file", certs["ca"],
        "--tls-auth-clients", "yes"])
    try:
        srv.start()
    except Exception as e:  # ConfigError with the server's own words
        srv.cleanup()
        pytest.skip(f"{NATIVE_REDIS} cannot serve TLS here: {str(e)[-300:]}")
    return srv, f"rediss://127.0.0.1:{tls_port}/0"


def test_native_tls_against_a_redis_server_built_with_it(certs, tmp_path):
    srv, url = _native_tls_server(certs)
    try:
        plain = redis.Redis.from_url(srv.url)
        keys = Keys("native")
        for i in range(5):
            plain.lpush(keys.queue("default"), json.dumps({"task": "t.add", "id": f"n{i}",
                                                           "args": [i, i]}))
        # When a burst worker takes them over TLS with a client certificate
        res = redpool("worker", "tests.taskmods.jobs", "--namespace", "native", "--burst",
                      "--concurrency", "1", "--redis-url", url, "--redis-ca", certs["ca"],
                      "--redis-cert", certs["cert"], "--redis-key", certs["key"])
        assert res.returncode == 0, res.stderr
        assert [json.loads(plain.get(keys.result(f"n{i}")))["result"] for i in range(5)] == \
            [0, 2, 4, 6, 8]
        # and without one, Redis itself refuses it, and we say why
        res = redpool("worker", "tests.taskmods.jobs", "--namespace", "native", "--burst",
                      "--redis-url", url, "--redis-ca", certs["ca"])
        assert res.returncode == EXIT_REDIS
        assert "requires a client certificate" in res.stderr, res.stderr
        plain.close()
    finally:
        srv.cleanup()


# -- ACL users ---------------------------------------------------------------------------------

def with_user(url: str, user: str, password: str = PASSWORD) -> str:
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, f"{user}:{password}@{host}", parts.path, parts.query, ""))


@pytest.fixture
def acl_users(r, redis_url, namespace):
    """``make(role, *acl_flags) -> (user, URL)``: a user with the rules `redpool acl`
    prints for this test's namespace, and a password; deleted at teardown."""
    made: list[str] = []

    def make(role: str, *flags: str) -> tuple[str, str]:
        user = f"{namespace}-{role}"
        res = redpool("acl", role, "--namespace", namespace, "--user", user, *flags)
        assert res.returncode == 0, res.stderr
        assert "no password" in res.stderr
        try:
            r.execute_command(*shlex.split(res.stdout))
        except redis.ResponseError as e:
            pytest.skip(f"the test server does not take Redis 7 ACL rules: {e}")
        made.append(user)
        r.execute_command("ACL", "SETUSER", user, f">{PASSWORD}")
        return user, with_user(redis_url, user)

    yield make
    for user in made:
        r.execute_command("ACL", "DELUSER", user)


def denied_to(log: list[dict], *users: str) -> list[dict]:
    return [e for e in log if (e.get("username") or "") in users]


def test_a_worker_user_and_a_producer_user_do_everything_redpool_does(
        r, keys, namespace, acl_users, tmp_path):
    replies = f"{namespace}-app:replies:*"
    wuser, worker_url = acl_users("worker", "--reply-to", replies)
    puser, producer_url = acl_users("producer", "--reply-to", replies)
    r.acl_log_reset()
    # Given a dead supervisor's job left in its processing list (for our reaper)
    r.sadd(keys.supervisors, "ghost")
    r.lpush(keys.processing("ghost", "default"),
            json.dumps({"task": "t.add", "id": "ghost", "args": [20, 22]}))
    metrics_port = free_port()
    d = Daemon(worker_url, namespace, "--concurrency", "2", "--max-crashes", "1",
               "--metrics-port", str(metrics_port), name="acl-w",
               env={"REDPOOL_REPLY_TO": replies}).start(tmp_path)
    try:
        d.wait_started()
        # When the producer user uses every part of the Client
        with Client(producer_url, namespace=namespace) as c:
            assert c.enqueue("t.add", 2, 3).get(timeout=30) == 5
            assert c.enqueue("t.add", 1, 1, delay=0.2).get(timeout=30) == 2      # TIME + ZADD
            at = datetime.now() + timedelta(seconds=0.2)
            assert c.enqueue("t.add", 1, 2, at=at).get(timeout=30) == 3           # ZADD
            assert c.enqueue("t.flaky", 1).get(timeout=30) == 2                   # a retry
            assert [x.get(30) for x in c.enqueue_many("t.add", [(1, 1), (2, 2)])] == [2, 4]
            with pytest.raises(JobFailed, match="UnknownTask"):                   # dead letter
                c.enqueue("t.nope").get(timeout=30)
            with pytest.raises(JobFailed, match="WorkerCrashed"):                 # crashed.lua
                c.enqueue("t.die").get(timeout=60)
            own_reply = replies.replace("*", "1")
            assert c.enqueue("t.add", 3, 4, reply_to=own_reply).get(timeout=30) == 7  # GET
            assert json.loads(c.redis.brpop([own_reply], 10)[1])["result"] == 7
            assert c.result("ghost").get(timeout=30) == 42                        # reaped
        # and operators use the worker user for the read-and-repair commands
        for args in (["dead", "list", "--json"], ["status", "--json"], ["inspect", "ghost"]):
            res = redpool(*args, "--redis-url", worker_url, "--namespace", namespace)
            assert res.returncode == 0, (args, res.stderr)
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10)
        assert b"redpool_queue_metrics_ok 1.0" in metrics.read()
        d.signal(signal.SIGTERM)
        assert d.wait(30) == 0
    finally:
        d.kill()
    # Then the server refused neither user anything, and the worker never saw an error
    assert denied_to(r.acl_log(count=100), wuser, puser) == []
    assert not [e for e in d.events() if e.get("event") in ("redis_down", "fatal")]
    assert PASSWORD not in d.log()


def test_a_reply_to_the_worker_may_not_write_is_skipped_and_the_batch_goes_through(
        r, keys, namespace, acl_users, tmp_path):
    # Given a worker told to answer on a pattern its ACL user was not granted (the
    # operator forgot `redpool acl worker --reply-to ...`)
    _, worker_url = acl_users("worker")
    forbidden = f"{namespace}-elsewhere:replies"
    d = Daemon(worker_url, namespace, "--concurrency", "1", "--reply-to", forbidden,
               name="acl-r").start(tmp_path)
    try:
        d.wait_started()
        lpush_jobs(r, keys, [{"task": "t.add", "id": "denied", "args": [1, 2],
                              "reply_to": forbidden},
                             {"task": "t.add", "id": "after", "args": [2, 2]}])
        wait_for(lambda: envelope(r, keys, "after"), what="the job after it")
        assert envelope(r, keys, "denied")["result"] == 3   # its result key is written
        assert not r.exists(forbidden)
        assert r.llen(keys.processing("acl-r", "default")) == 0
        wait_for(lambda: [e for e in d.events() if e.get("event") == "replies_skipped"],
                 what="the skipped reply logged")
        assert not [e for e in d.events() if e.get("event") == "redis_down"]
    finally:
        d.kill()


def test_a_producer_cannot_use_the_worker_to_write_a_key_its_own_acl_forbids(
        r, keys, namespace, acl_users, tmp_path):
    # Given least-privilege users, and another application's list that neither the
    # producer's ACL nor the worker's grants
    wuser, worker_url = acl_users("worker")
    puser, producer_url = acl_users("producer")
    theirs = f"{namespace}-otherapp:jobs"
    r.rpush(theirs, "their job")
    p = redis.Redis.from_url(producer_url)
    d = Daemon(worker_url, namespace, "--concurrency", "1", name="acl-o").start(tmp_path)
    try:
        d.wait_started()
        with pytest.raises(redis.exceptions.NoPermissionError):
            p.lpush(theirs, "x")                     # the producer may not touch it...
        r.acl_log_reset()
        # When it asks the worker to answer there
        p.lpush(keys.queue("default"), json.dumps({"task": "t.add", "id": "sneaky",
                                                   "args": [1, 2], "reply_to": theirs}))
        # Then the worker refuses it (before its own ACL could), answering on the result
        # key the producer may read, and the list is as it was: no push, no TTL
        wait_for(lambda: p.get(keys.result("sneaky")), what="the refusal")
        env = json.loads(p.get(keys.result("sneaky")))
        assert env["error"]["type"] == "InvalidJob" and theirs in env["error"]["message"]
        assert r.lrange(theirs, 0, -1) == [b"their job"] and r.ttl(theirs) == -1
        assert denied_to(r.acl_log(count=100), wuser, puser) == []
    finally:
        d.kill()
        p.close()
        r.delete(theirs)


def test_the_producer_user_can_push_and_read_results_and_nothing_else(r, keys, namespace,
                                                                      acl_users):
    _, url = acl_users("producer")
    p = redis.Redis.from_url(url)
    other = Keys(f"{namespace}-other")
    r.set(keys.result("x"), "an envelope")
    r.lpush(keys.processing("w1", "default"), "a held job")
    # It may do its job (so the denials below are not a login problem)
    assert p.lpush(keys.queue("default"), "a job") == 1
    assert p.get(keys.result("x")) == b"an envelope"
    denied = {
        "read a queue": lambda: p.lrange(keys.queue("default"), 0, -1),
        "take a job": lambda: p.rpop(keys.queue("default")),
        "delete a queue": lambda: p.delete(keys.queue("default")),
        "read a processing list": lambda: p.lrange(keys.processing("w1", "default"), 0, -1),
        "forge a result": lambda: p.set(keys.result("x"), "forged"),
        "put a sorted set where a queue goes": lambda: p.zadd(keys.queue("zz"), {"j": 1}),
        "read the schedule": lambda: p.zrange(keys.scheduled("default"), 0, -1),
        "read the dead letters": lambda: p.lrange(keys.dead, 0, -1),
        "read a lease": lambda: p.hgetall(keys.supervisor("w1")),
        "push to another namespace": lambda: p.lpush(other.queue("default"), "x"),
        "read another namespace's result": lambda: p.get(other.result("x")),
        "pop another namespace's replies": lambda: p.rpop(other.reply("c")),
        "FLUSHALL": lambda: p.flushall(),
        "FLUSHDB": lambda: p.flushdb(),
        "KEYS": lambda: p.keys("*"),
        "SCAN": lambda: p.scan(0),
        "CONFIG GET": lambda: p.config_get("*"),
        "EVAL": lambda: p.eval("return 1", 0),
        "SCRIPT FLUSH": lambda: p.script_flush(),
        "PUBLISH": lambda: p.publish("channel", "x"),
        "ACL LIST": lambda: p.acl_list(),
        "CLIENT LIST": lambda: p.client_list(),
    }
    allowed = []
    for what, call in denied.items():
        try:
            call()
            allowed.append(what)
        except redis.exceptions.NoPermissionError:
            pass
    assert allowed == []
    # No scripting at all: neither loading nor running one
    body = f"return redis.call('DEL', '{keys.queue('default')}')"
    with pytest.raises(redis.exceptions.NoPermissionError):
        p.script_load(body)
    with pytest.raises(redis.exceptions.NoPermissionError):
        p.eval(body, 1, keys.scheduled("default"))
    with pytest.raises(redis.exceptions.NoPermissionError):
        p.evalsha(r.script_load(body), 1, keys.scheduled("default"))
    # Nothing it tried changed anything
    assert r.lrange(keys.queue("default"), 0, -1) == [b"a job"]
    assert r.get(keys.result("x")) == b"an envelope" and r.dbsize() > 2
    p.close()


def test_the_worker_user_is_confined_to_its_namespace(r, keys, namespace, acl_users):
    _, url = acl_users("worker")
    w = redis.Redis.from_url(url)
    other = Keys(f"{namespace}-other")
    assert w.lpush(keys.queue("default"), "x") == 1
    for call in (lambda: w.lpush(other.queue("default"), "x"), lambda: w.get(other.result("x")),
                 lambda: w.lpush(f"{namespace}-app:replies:1", "x"), lambda: w.flushall(),
                 lambda: w.keys("*"), lambda: w.config_get("*"), lambda: w.eval("return 1", 0),
                 lambda: w.acl_list(), lambda: w.script_flush()):
        with pytest.raises(redis.exceptions.NoPermissionError):
            call()
    w.close()


def test_redpool_acl_prints_a_line_redis_cli_runs_as_is(r, namespace):
    cli = Path(find_server_binary()).with_name("valkey-cli")
    cli = str(cli) if cli.is_file() else shutil.which("valkey-cli") or shutil.which("redis-cli")
    if not cli:
        pytest.skip("no valkey-cli or redis-cli to pipe the line into")
    user = f"{namespace}-cli"
    line = redpool("acl", "producer", "--namespace", "a*b", "--user", user).stdout
    port = r.connection_pool.connection_kwargs["port"]
    try:
        out = subprocess.run([cli, "-h", "127.0.0.1", "-p", str(port)], input=line,
                             capture_output=True, text=True, timeout=30)
        assert out.stdout.strip() == "OK", out.stdout + out.stderr
        got = r.acl_getuser(user)
        # the namespace's "*" arrives escaped: matched literally, not as a wildcard
        assert not got["keys"] and any("%W~a\\*b:queue:*" in sel for sel in got["selectors"])
    finally:
        r.execute_command("ACL", "DELUSER", user)


def test_the_docs_show_exactly_the_rules_redpool_acl_prints():
    text = (ROOT / "docs" / "deploy.md").read_text()
    for role in acl.ROLES:
        res = redpool("acl", role)
        assert res.stdout.strip() == acl.setuser(role)
        assert acl.setuser(role) in text, f"docs/deploy.md does not show `redpool acl {role}`"


def test_redpool_acl_grants_the_workers_reply_to_patterns_and_no_other_key():
    # the same patterns as the workers' --reply-to, from the flag or the same variable
    line = redpool("acl", "worker", "--reply-to", "a:replies:*", "--reply-to", "b:r?").stdout
    assert line == redpool("acl", "worker", env={"REDPOOL_REPLY_TO": "a:replies:*,b:r?"}).stdout
    assert line == redpool("acl", "worker", "--reply-pattern", "a:replies:*",
                           "--reply-pattern", "b:r?").stdout       # the flag's former name
    tokens = shlex.split(line)
    assert tokens[-2:] == ["~a:replies:*", "~b:r?"]
    outside = [t for t in tokens if t.startswith("~") and not t.startswith(("~redpool:",
                                                                            "~{redpool}:"))]
    assert outside == ["~", "~a:replies:*", "~b:r?"]               # never ~* (or %RW~*)
    assert "(+brpop +del +rpop +rpush ~redpool:reply:* ~a:replies:* ~b:r?)" in \
        redpool("acl", "producer", "--reply-to", "a:replies:*", "--reply-to", "b:r?").stdout
    # and the patterns a worker would refuse are refused here too
    for pattern, says in (("redpool:queue:*", "names keys inside the namespace 'redpool'"),
                          ("x:[a", "'[' is not closed")):
        res = redpool("acl", "worker", "--reply-to", pattern)
        assert res.returncode == EXIT_USAGE and says in res.stderr, res.stderr
