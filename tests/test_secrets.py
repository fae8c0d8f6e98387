"""Passwords never show: not in an error about a malformed Redis URL (whatever part of
the password a parser took for a host or a port), not in ps while a command runs, and
a password on the command line is warned about once (docs/deploy.md, "Secrets")."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.backoff import NoBackoff
from redis.retry import Retry

from helpers import ROOT
from redpool import Client, urls
from redpool.connection import check, connect
from redpool.errors import EXIT_USAGE, ConfigError, RedpoolError

# A password in three distinctive parts, so that a part a parser split off (at '@', '/',
# ':', '?', '#', '&') is found wherever it turns up.
PARTS = ("Hq7sealA", "Jm4sealB", "Wz2sealC")
A, B, C = PARTS
NOWHERE = "127.0.0.1:1"

MALFORMED = [
    f"redis://:{A}@{B}/{C}@{NOWHERE}/0",           # the tester's: '@' and '/' unencoded
    f"rediss://:{A}@{B}/{C}@{NOWHERE}/0",
    f"redis://u:{A}/{B}@{NOWHERE}/0",              # '/' in the password
    f"redis://u:{A}?{B}@{NOWHERE}/0",              # '?'
    f"redis://u:{A}#{B}@{NOWHERE}/0",              # '#'
    f"redis://u:{A}[{B}@{NOWHERE}/0",              # '['
    f"redis://default:{A}",                        # '@host' forgotten: the password is a port
    f"redis://default:{A}/{B}",
    f"redis://:{A}@127.0.0.1:99999/0",             # a port out of range
    f"http://:{A}@{NOWHERE}/0",                    # a scheme that is not Redis's
    f"{A}",                                        # the password where the URL goes
    f"redis+sentinel://:{A}/{B}@{NOWHERE},127.0.0.1:2/main",
    f"redis+sentinel://u:{A},127.0.0.1:2/main",    # '@' forgotten in a list of hosts
    f"rediss+sentinel://:{A}?{B}@{NOWHERE}/main",
    f"redis+cluster://:{A}@{B}/{C}@{NOWHERE},127.0.0.1:2",
    f"rediss+cluster://u:{A}?{B}@{NOWHERE}",
    f"unix:///tmp/redpool-nowhere.sock?password={A}&{B}",    # '&' in a query password
    f"unix:///tmp/redpool-nowhere.sock?password={A}#{B}",
]


def leaked(text: str) -> list[str]:
    return [p for p in PARTS if p in text]


def run(*args: str, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    e = {k: v for k, v in os.environ.items() if not k.startswith("REDPOOL_REDIS_URL")}
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "redpool", *args], cwd=ROOT, env=e,
                          capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


# -- malformed URLs -----------------------------------------------------------------------------

@pytest.mark.parametrize("url", MALFORMED)
def test_a_malformed_url_is_refused_without_quoting_any_part_of_it(url):
    # Client(...) and every command connect through connection.connect
    with pytest.raises(ConfigError) as e:
        Client(url)
    assert e.value.exit_code == EXIT_USAGE
    assert not leaked(str(e.value)) and not leaked(repr(e.value)), str(e.value)
    assert "Redis URL" in str(e.value)
    assert not leaked(urls.redact_url(url)), urls.redact_url(url)


@pytest.mark.parametrize("url", MALFORMED)
def test_commands_say_a_url_is_malformed_with_exit_code_2_and_without_the_password(url):
    # Given the URL on the command line of a one-shot command (and of the daemon, JSON log)
    status = run("status", "--json", "--redis-url", url)
    worker = run("worker", "tests.taskmods.jobs", "--burst", "--log-format", "json",
                 env={"REDPOOL_REDIS_URL": url})
    for res in (status, worker):
        # Then it stops with a usage error that quotes nothing of the URL
        assert res.returncode == EXIT_USAGE, res.stderr
        assert not leaked(res.stdout + res.stderr), res.stderr
    # (after the warning a password on the command line gets, if it holds one)
    lines = status.stderr.splitlines()
    assert status.stdout == "" and lines[-1].startswith("redpool: the Redis URL ")
    assert len(lines) == 1 or (len(lines) == 2 and lines[0].startswith("redpool: warning: "))
    (fatal,) = [json.loads(line) for line in worker.stderr.splitlines()
                if json.loads(line)["event"] == "fatal"]
    assert fatal["error"].startswith("the Redis URL ")


def test_the_testers_url_is_called_malformed_and_how_to_write_it_is_said():
    with pytest.raises(ConfigError) as e:
        urls.check_url("redis://:head@SECRET/tail@host")
    text = str(e.value)
    assert text.startswith("the Redis URL is malformed: an '@' comes after the '/'")
    assert "%40" in text and "%2F" in text
    assert "SECRET" not in text and "head" not in text and "tail" not in text


@pytest.mark.parametrize("url", [
    "redis://localhost:6379/0", "redis://:p%40ss%2Fw%3Fd@db.internal:6380/2",
    "redis://:p@ss@db:6379/0",      # several '@' in the address: every parser takes the last
    "redis://u:pa:ss@[::1]:6379/0", "rediss://db/0?ssl_ca_certs=/etc/a@b.pem&ssl_cert_reqs=none",
    "redis+sentinel://u:pw@s1:26379,[::1],s3/main/2?sentinel_password=x",
    "redis+cluster://u:pw@n1:7000,n2", "unix:///run/a@b.sock?db=1&password=p%26w",
    "REDIS://Host/0", "redis://db:/0",
])
def test_well_formed_urls_pass(url):
    urls.check_url(url)


# -- random passwords, every URL form -----------------------------------------------------------

# (Not "redis://user:{pw}", its '@host' forgotten: a password "a@b" makes it a URL of
# host b, well-formed, that nothing can tell from one meant so; MALFORMED has the rest.)
FORMS = [
    "redis://:{pw}@127.0.0.1:1/0",
    "redis://user:{pw}@127.0.0.1:1/0",
    "rediss://u:{pw}@127.0.0.1:1/0",
    "redis://127.0.0.1:1/0?password={pw}",
    "redis://u:{pw}@127.0.0.1:1/0?socket_timeout=1&db=0",
    "rediss://127.0.0.1:1/0?ssl_password={pw}&ssl_cert_reqs=none",
    "unix:///tmp/redpool-nowhere.sock?db=0&password={pw}",
    "redis+sentinel://u:{pw}@127.0.0.1:1,127.0.0.1:2/main",
    "redis+sentinel://127.0.0.1:1/main?sentinel_password={pw}",
    "redis+cluster://:{pw}@127.0.0.1:1,127.0.0.1:2",
    "rediss+cluster://u:{pw}@127.0.0.1:1",
]
# distinctive parts (nothing a message says by chance), joined by what breaks URLs
part = st.text("abcdefghjkmnpqrstuvwxyzACEFHJKLMNPRTUVWXY3479", min_size=5,
               max_size=9).map(lambda s: "Zq" + s)
separator = st.text("@/:#?&%[] =,;\\", min_size=1, max_size=3)


@st.composite
def password(draw) -> tuple[str, list[str]]:
    parts = draw(st.lists(part, min_size=1, max_size=4, unique=True))
    seps = draw(st.lists(separator, min_size=len(parts) + 1, max_size=len(parts) + 1))
    text = seps[0] if draw(st.booleans()) else ""
    for p, sep in zip(parts, seps[1:]):
        text += p + sep
    return text, parts


@settings(max_examples=150, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(form=st.sampled_from(FORMS), pw=password())
def test_no_part_of_any_password_shows_in_any_message(form, pw):
    text, parts = pw
    url = form.format(pw=text)
    # What the daemon logs (redacted), and the one error it stops with: malformed,
    # or Redis unreachable (nothing listens there), with the URL redacted
    try:
        r = connect(url, socket_connect_timeout=0.5, socket_timeout=0.5,
                    retry=Retry(NoBackoff(), 0))
        check(r, url)
        message = "connected?!"
    except RedpoolError as e:
        message = str(e)
    assert message != "connected?!"
    for shown in (message, urls.redact_url(url)):
        assert not [p for p in parts if p in shown], (url, shown)


# -- the URL from a file: --redis-url-file, REDPOOL_REDIS_URL_FILE ------------------------------

PASSWORD = f"{A}@{B}/{C}"            # needs percent-encoding in a URL, as many real ones do
ENCODED = f"{A}%40{B}%2F{C}"


@pytest.fixture(scope="module")
def server():
    """A private server with a password (of three parts, '@' and '/' between them)."""
    from redpool.server import EmbeddedServer

    with EmbeddedServer(extra_args=["--requirepass", PASSWORD]) as srv:
        yield srv


@pytest.fixture
def url(server) -> str:
    return f"redis://:{ENCODED}@127.0.0.1:{server.port}/0"


@pytest.fixture
def url_file(tmp_path, url) -> str:
    path = tmp_path / "redis-url"
    path.write_text(url + "\n")
    path.chmod(0o600)
    return str(path)


def namespaced(url: str) -> tuple[redis.Redis, str]:
    import uuid

    return redis.Redis.from_url(url), f"s{uuid.uuid4().hex[:10]}"


def test_the_worker_reads_its_url_from_a_file_flag_or_variable(url, url_file):
    r, ns = namespaced(url)
    for i, how in enumerate([("--redis-url-file", url_file), ()]):
        r.lpush(f"{ns}:queue:default", json.dumps({"task": "t.add", "id": f"f{i}", "args": [i, 1]}))
        env = {} if how else {"REDPOOL_REDIS_URL_FILE": url_file}
        res = run("worker", "tests.taskmods.jobs", *how, "--namespace", ns, "--burst",
                  "--concurrency", "1", "--log-format", "json", env=env)
        assert res.returncode == 0, res.stderr
        assert json.loads(r.get(f"{ns}:result:f{i}"))["result"] == i + 1
        assert not leaked(res.stdout + res.stderr), res.stderr
        starting = [json.loads(x) for x in res.stderr.splitlines() if '"starting"' in x][0]
        assert starting["redis"] == f"redis://:***@127.0.0.1:{url.rsplit(':', 1)[1]}"
    r.close()


def test_one_shot_commands_and_the_client_read_the_file_too(url, url_file, monkeypatch):
    res = run("status", "--json", "--redis-url-file", url_file)
    assert res.returncode == 0 and json.loads(res.stdout)["redis"].startswith("redis://:***@")
    res = run("dead", "list", env={"REDPOOL_REDIS_URL_FILE": url_file})
    assert res.returncode == 0, res.stderr
    assert not leaked(res.stdout + res.stderr)
    monkeypatch.delenv("REDPOOL_REDIS_URL", raising=False)
    monkeypatch.setenv("REDPOOL_REDIS_URL_FILE", url_file)
    with Client() as client:
        assert client.redis.ping() and not leaked(repr(client))


def test_a_url_and_a_file_together_or_a_bad_file_are_said_without_the_content(url, url_file,
                                                                                tmp_path):
    two = tmp_path / "two-lines"
    two.write_text(f"{url}\n{url}\n")
    cases = [
        (["--redis-url", url, "--redis-url-file", url_file], {},
         "--redis-url and --redis-url-file both name the Redis URL: give one"),
        ([], {"REDPOOL_REDIS_URL": url, "REDPOOL_REDIS_URL_FILE": url_file},
         "REDPOOL_REDIS_URL and REDPOOL_REDIS_URL_FILE are both set"),
        (["--redis-url-file", str(tmp_path / "nope")], {},
         f"--redis-url-file {tmp_path / 'nope'}: cannot read the Redis URL from it: No such file"),
        ([], {"REDPOOL_REDIS_URL_FILE": str(two)},
         f"REDPOOL_REDIS_URL_FILE {two}: the file must hold the Redis URL on one line"),
    ]
    for flags, env, says in cases:
        for res in (run("status", *flags, env=env),
                    run("worker", "tests.taskmods.jobs", *flags, "--log-format", "json", env=env)):
            assert res.returncode == EXIT_USAGE, res.stderr
            assert says in res.stderr and not leaked(res.stderr), res.stderr
    # a flag wins over the variables, as everywhere
    res = run("status", "--json", "--redis-url-file", url_file,
              env={"REDPOOL_REDIS_URL": "redis://127.0.0.1:1/0"})
    assert res.returncode == 0, res.stderr


def test_the_systemd_credential_drop_in_of_deploy_md_works(url, tmp_path):
    # Given the drop-in docs/deploy.md shows ("Secrets: the Redis password")
    import re

    text = (ROOT / "docs" / "deploy.md").read_text("utf-8")
    section = text.split("### Secrets: the Redis password", 1)[1]
    drop_in = section.split("```ini\n", 1)[1].split("```", 1)[0]
    name, source = re.search(r"^LoadCredential=([\w-]+):(\S+)$", drop_in, re.M).groups()
    (variable, value), = re.findall(r"^Environment=(\w+)=(\S+)$", drop_in, re.M)
    assert source == "/etc/redpool/myapp.redis-url" and variable == "REDPOOL_REDIS_URL_FILE"
    # When systemd has copied the credential into the service's directory (%d)
    creds = tmp_path / "credentials"
    creds.mkdir(mode=0o700)
    (creds / name).write_text(url + "\n")
    r, ns = namespaced(url)
    r.lpush(f"{ns}:queue:default", json.dumps({"task": "t.add", "id": "cred", "args": [2, 2]}))
    res = run("worker", "tests.taskmods.jobs", "--namespace", ns, "--burst", "--concurrency", "1",
              "--log-format", "json", env={variable: value.replace("%d", str(creds))})
    # Then the worker runs with it, and says nothing of the password
    assert res.returncode == 0, res.stderr
    assert json.loads(r.get(f"{ns}:result:cred"))["result"] == 4
    assert not leaked(res.stderr)
    r.close()


# -- ps: every command hides its command line at once; one warning ------------------------------

WARNING = "the password in --redis-url can be read by every user of this host"


def cmdline(pid: int) -> bytes:
    """What ps and /proc/<pid>/cmdline show of a process, byte for byte (setproctitle
    writes over the original arguments: nothing of them may be left behind its NULs)."""
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read()


def secret_bytes(data: bytes) -> list[str]:
    return [p for p in (*PARTS, ENCODED, PASSWORD) if p.encode() in data]


class Running:
    """``python -m redpool ARGS`` in its own session, stdout and stderr read by threads."""

    def __init__(self, *args: str, env: dict | None = None) -> None:
        import threading

        e = {k: v for k, v in os.environ.items() if not k.startswith("REDPOOL_REDIS_URL")}
        e.update(env or {}, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen([sys.executable, "-m", "redpool", *args], cwd=ROOT, env=e,
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, start_new_session=True)
        self.out: list[str] = []
        self.err: list[str] = []
        for stream, lines in ((self.proc.stdout, self.out), (self.proc.stderr, self.err)):
            threading.Thread(target=self._read, args=(stream, lines), daemon=True).start()

    @staticmethod
    def _read(stream, lines: list[str]) -> None:
        for line in iter(stream.readline, b""):
            lines.append(line.decode(errors="replace"))

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        from helpers import kill_group

        kill_group(self.proc)

    def warnings(self) -> int:
        return sum(WARNING in line for line in self.err)


@pytest.fixture
def running():
    started: list[Running] = []

    def start(*args: str, **kw) -> Running:
        started.append(Running(*args, **kw))
        return started[-1]

    yield start
    for p in started:
        p.stop()


def test_status_watch_hides_the_password_from_ps_once_it_runs(url, running):
    # Given `redpool status --watch` with a password in its --redis-url
    p = running("status", "--watch", "0.2", "--redis-url", url)
    # When it has drawn its first screen
    from helpers import wait_for

    wait_for(lambda: any("QUEUE" in line or "queues" in line for line in p.out)
             or p.proc.poll() is not None, 30, what="the first screen")
    assert p.proc.poll() is None, "".join(p.err)
    # Then ps shows the command without the password, and no byte of it is left
    shown = cmdline(p.pid)
    assert not secret_bytes(shown), shown
    assert shown.replace(b"\0", b" ").strip() == \
        f"redpool status --watch 0.2 --redis-url redis://:***@127.0.0.1:{url.rsplit(':', 1)[1]}".encode()
    # and stderr said so once, in the one-shot commands' format, without the password
    p.proc.send_signal(2)
    assert p.proc.wait(30) == 0
    wait_for(lambda: p.warnings() == 1, 10, what="the warning")
    (line,) = [x for x in p.err if WARNING in x]
    assert line.startswith("redpool: warning: ") and "--redis-url-file" in line
    assert not leaked("".join(p.out + p.err))


def test_enqueue_wait_hides_the_password_while_it_waits(url, running):
    r, ns = namespaced(url)
    # Given `redpool enqueue --wait` waiting for a result no worker will write yet
    p = running("enqueue", "t.add", "1", "2", "--wait", "--wait-timeout", "120",
                f"--redis-url={url}", "--namespace", ns)
    from helpers import wait_for

    wait_for(lambda: p.out or p.proc.poll() is not None, 30, what="the job's id")
    assert p.proc.poll() is None, "".join(p.err)
    # Then ps shows no password while it waits
    shown = cmdline(p.pid)
    assert not secret_bytes(shown) and b"--redis-url=redis://:***@" in shown, shown
    assert p.warnings() == 1
    r.close()


def test_the_worker_and_its_children_never_show_the_password(url, running):
    _, ns = namespaced(url)
    p = running("worker", "tests.taskmods.jobs", "--redis-url", url, "--namespace", ns,
                "--concurrency", "2", "--log-format", "json")
    from helpers import wait_for

    wait_for(lambda: any('"started"' in line for line in p.err) or p.proc.poll() is not None,
             60, what="the worker to start")
    assert p.proc.poll() is None, "".join(p.err)
    pids = [p.pid, *map(int, subprocess.run(["ps", "-o", "pid=", "--ppid", str(p.pid)],
                                            capture_output=True, text=True).stdout.split())]
    assert len(pids) >= 3
    for pid in pids:
        assert not secret_bytes(cmdline(pid)), (pid, cmdline(pid))
    # one warning, a log event of the daemon's format
    events = [json.loads(line) for line in p.err if line.startswith("{")]
    said = [e for e in events if e["event"] == "password_on_command_line"]
    assert len(said) == 1 and said[0]["level"] == "warning", events
    assert said[0]["message"].startswith(WARNING) and "REDPOOL_REDIS_URL_FILE" in said[0]["message"]
    assert not leaked("".join(p.err))


def test_dev_with_a_url_of_yours_warns_once_and_hides_it(url, running, tmp_path):
    _, ns = namespaced(url)
    p = running("dev", "tests.taskmods.jobs", "--redis-url", url, "--namespace", ns,
                "--concurrency", "1", "--log-format", "json")
    from helpers import wait_for

    wait_for(lambda: any('"started"' in line for line in p.err) or p.proc.poll() is not None,
             60, what="the dev worker to start")
    assert p.proc.poll() is None, "".join(p.err)
    assert not secret_bytes(cmdline(p.pid))
    events = [json.loads(line) for line in p.err if line.startswith("{")]
    assert [e["event"] for e in events].count("password_on_command_line") == 1
    assert not leaked("".join(p.err))


def test_the_demo_hands_its_worker_the_url_in_the_environment(url, running):
    # Given `redpool demo` on a server of ours, with a password
    p = running("demo", "--jobs", "2", "--redis-url", url)
    from helpers import wait_for

    def worker_pid():
        out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(p.pid)], capture_output=True,
                             text=True).stdout.split()
        return int(out[0]) if out else None

    # Then the worker it starts never has the password on its command line, from its
    # first moment (read as soon as it exists, before it could retitle itself)
    child = wait_for(lambda: worker_pid() or (p.proc.poll() is not None and -1), 60, 0.005,
                     what="the demo's worker")
    assert child != -1, "".join(p.out + p.err)
    assert not secret_bytes(cmdline(child)), cmdline(child)
    assert not secret_bytes(cmdline(p.pid))
    assert p.proc.wait(120) == 0, "".join(p.err)
    wait_for(lambda: p.warnings() == 1, 10, what="one warning")
    (line,) = [x for x in p.err if WARNING in x]
    assert "--redis-url-file FILE" in line and "REDPOOL_REDIS_URL," not in line
    assert not leaked("".join(p.out + p.err))


def test_no_warning_without_a_password_on_the_command_line(url, url_file, server):
    plain = f"redis://127.0.0.1:{server.port}/0"   # (refused: NOAUTH; what counts is stderr)
    for args, env in [(["--redis-url-file", url_file], {}), ([], {"REDPOOL_REDIS_URL": url}),
                      (["--redis-url", plain], {}),
                      (["--redis-url", f"redis://someone@127.0.0.1:{server.port}/0"], {})]:
        res = run("dead", "list", *args, env=env)
        assert WARNING not in res.stderr, (args, res.stderr)
    res = run("dead", "list", "--redis-url", url)
    assert res.returncode == 0 and res.stderr.count(WARNING) == 1, res.stderr


@pytest.mark.parametrize("argv, shown", [
    (["status", "--redis-url", "redis://:pw@db:6379/0"], "redpool status --redis-url redis://:***@db:6379/0"),
    (["dead", "list", "--redis-url=rediss://u:pw@db/0?ssl_password=k"],
     "redpool dead list --redis-url=rediss://u:***@db/0?ssl_password=***"),
    (["worker", "m", "--redis-url", "pw-only"], "redpool worker m --redis-url ***"),
    (["worker", "m", "--redis-url", "redis://:a/b@db/0"], "redpool worker m --redis-url redis://***"),
    (["enqueue", "t", "redis://:pw@db/0", "--queue", "q"], "redpool enqueue t redis://:***@db/0 --queue q"),
    (["worker", "m", "--redis-url-file", "/run/credentials/x/redis-url"],
     "redpool worker m --redis-url-file /run/credentials/x/redis-url"),
])
def test_a_command_title_is_its_command_line_without_secrets(argv, shown):
    from redpool.titles import command_title

    assert command_title(argv) == shown
