"""The Node.js, Ruby and Go programs of docs/protocol.md ("Other languages"), run as a
user would run them, against the session's private server and a real worker.

The page is the single source: each test takes its program from the section's fenced
blocks (by info string: js, ruby, go) and changes only what a deployment changes, each
string exactly once: the server's address (never the machine's port 6379), the namespace
of the queue key and of the reply list (one of this module's own) and, for the failure
path, the task name.

What is executed and what is only checked:

- Node.js (npm's ``redis``, pinned in tests/polyglot/node), Ruby (redis-rb) and Go with
  redigo (Debian's package, GOPATH mode, offline): run against a worker serving
  ``examples.tasks``; each must print ``5``, and the same program asking for a task no
  worker has must take its failed-envelope path (stderr, exit status 1).
- Go with go-redis: NOT run, NOT built against the real library.  Debian does not package
  go-redis and this machine cannot reach the Go module proxy, so it is checked with gofmt
  and type-checked with ``go vet`` against tests/polyglot/gostub, a stub that declares the
  signatures of go-redis v9 the example uses.  That catches a wrong call, a wrong type or
  a typo, not a wrong behaviour of the real library, and only as well as the stub's
  signatures match go-redis's.
- The no-answer branch (nothing within 30 s) is exercised once, the three programs at
  once, so that it costs 30 s and not 90.

Toolchains come from ``make polyglot``.  Missing ones skip these tests with the reason;
under REDPOOL_REQUIRE_POLYGLOT=1 (.ci/run sets it) they fail instead.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest
import redis

from helpers import ROOT, TESTS, Daemon

pytestmark = pytest.mark.daemon

DOC = ROOT / "docs" / "protocol.md"
SECTION = "## Other languages"
POLYGLOT = TESTS / "polyglot"
NODE_DIR = POLYGLOT / "node"
GO_STUB = POLYGLOT / "gostub"
# where Debian's golang-*-dev packages put their sources, for GOPATH mode
DEBIAN_GOCODE = Path("/usr/share/gocode")
REDIGO = DEBIAN_GOCODE / "src" / "github.com" / "gomodule" / "redigo" / "redis"

# What the examples say, and a test changes:
DOC_URL = "redis://localhost:6379"
DOC_QUEUE_KEY = "redpool:queue:default"
DOC_REPLY_PREFIX = "redpool:reply:"
DOC_TASK = "examples.tasks.add"

RUNS = ("node", "ruby", "redigo")  # the programs that are executed
IMPORTS = {"redigo": "github.com/gomodule/redigo/redis", "go-redis": "github.com/redis/go-redis/v9"}


# -- the doc ---------------------------------------------------------------------------------

@functools.cache
def examples() -> dict[str, str]:
    """The section's programs by name: node, ruby, redigo, go-redis."""
    text = DOC.read_text("utf-8")
    start = text.index(f"\n{SECTION}\n")
    end = text.find("\n## ", start + 1)
    section = text[start:end if end != -1 else len(text)]
    found: dict[str, list[str]] = {}
    for info, code in re.findall(r"^```(\S*)\n(.*?)^```$", section, re.M | re.S):
        if info == "js":
            found.setdefault("node", []).append(code)
        elif info == "ruby":
            found.setdefault("ruby", []).append(code)
        elif info == "go":
            names = [n for n, path in IMPORTS.items() if f'"{path}"' in code]
            assert len(names) == 1, f"a go block of {SECTION!r} imports neither or both of {list(IMPORTS.values())}"
            found.setdefault(names[0], []).append(code)
    assert sorted(found) == sorted([*RUNS, "go-redis"]), (
        f"{SECTION!r} of docs/protocol.md should have one js, one ruby and two go blocks "
        f"(redigo, go-redis); found {sorted(found)}")
    for name, codes in found.items():
        assert len(codes) == 1, f"{SECTION!r} has {len(codes)} programs for {name}"
    return {name: codes[0] for name, codes in found.items()}


def adapt(code: str, *, url: str, ns: str, task: str = DOC_TASK) -> str:
    for old, new in ((DOC_URL, url), (DOC_QUEUE_KEY, f"{ns}:queue:default"),
                     (DOC_REPLY_PREFIX, f"{ns}:reply:"), (DOC_TASK, task)):
        assert code.count(old) == 1, f"expected {old!r} exactly once in the example:\n{code}"
        code = code.replace(old, new)
    return code


# -- toolchains ------------------------------------------------------------------------------

REQUIRED = os.environ.get("REDPOOL_REQUIRE_POLYGLOT", "") not in ("", "0")


def need(ok: bool, what: str) -> None:
    if ok:
        return
    if REQUIRED:
        pytest.fail(f"{what}, and REDPOOL_REQUIRE_POLYGLOT is set: run `make polyglot`",
                    pytrace=False)
    pytest.skip(f"{what} (`make polyglot` installs it)")


@functools.cache
def node_problem() -> str | None:
    if not (shutil.which("node") and shutil.which("npm")):
        return "Node.js is not installed"
    pinned = json.loads((NODE_DIR / "package.json").read_text())["dependencies"]["redis"]
    installed = NODE_DIR / "node_modules" / "redis" / "package.json"
    if not installed.exists():
        return "npm's redis is not installed in tests/polyglot/node"
    version = json.loads(installed.read_text())["version"]
    if version != pinned:
        return f"tests/polyglot/node has redis {version}, package.json pins {pinned}"
    return None


@functools.cache
def ruby_problem() -> str | None:
    if not shutil.which("ruby"):
        return "Ruby is not installed"
    p = subprocess.run(["ruby", "-e", 'require "redis"'], capture_output=True, text=True)
    return None if p.returncode == 0 else f"Ruby has no redis gem ({p.stderr.strip()})"


def go_problem(name: str) -> str | None:
    if not (shutil.which("go") and shutil.which("gofmt")):
        return "Go is not installed"
    if name == "redigo" and not REDIGO.is_dir():
        return f"redigo is not installed ({REDIGO} is missing)"
    return None


def problem(name: str) -> str | None:
    """Why the toolchain of example ``name`` cannot be used here, or None."""
    if name == "node":
        return node_problem()
    if name == "ruby":
        return ruby_problem()
    return go_problem(name)


def require(name: str) -> None:
    why = problem(name)
    need(why is None, why or "")


def go_env(tmp_path: Path, *gopath: Path) -> dict[str, str]:
    """GOPATH mode, as the doc tells a Debian user to run the example: the packages come
    from GOPATH (Debian's /usr/share/gocode), never from the network."""
    env = dict(os.environ, GO111MODULE="off", GOPROXY="off", GOFLAGS="",
               GOPATH=os.pathsep.join(str(p) for p in (tmp_path / "gopath", *gopath)))
    if "GOCACHE" not in env and "HOME" not in env and "XDG_CACHE_HOME" not in env:
        env["GOCACHE"] = str(tmp_path / "gocache")
    return env


# -- the worker ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def worker(redis_url, tmp_path_factory):
    """A real worker serving examples.tasks, in a namespace of this module's own; the
    namespace is returned."""
    ns = f"t{uuid.uuid4().hex[:10]}"
    d = Daemon(redis_url, ns, modules=("examples.tasks",)).start(tmp_path_factory.mktemp("worker"))
    try:
        d.wait_started()
        yield ns
    finally:
        d.kill()
        client = redis.Redis.from_url(redis_url)
        keys = list(client.scan_iter(match=f"{ns}:*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()


def start_example(name: str, code: str, tmp_path: Path) -> subprocess.Popen:
    """Save the program as the doc says and start it the way the doc says."""
    if name == "node":
        (tmp_path / "add.mjs").write_text(code)
        # node looks for `redis` in node_modules beside the program, as in a user's project
        (tmp_path / "node_modules").symlink_to(NODE_DIR / "node_modules", target_is_directory=True)
        cmd, env = ["node", "add.mjs"], None
    elif name == "ruby":
        (tmp_path / "add.rb").write_text(code)
        cmd, env = ["ruby", "add.rb"], None
    else:
        (tmp_path / "add.go").write_text(code)
        cmd, env = ["go", "run", "add.go"], go_env(tmp_path, DEBIAN_GOCODE)
    return subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)


def finish(proc: subprocess.Popen) -> subprocess.CompletedProcess:
    # the programs wait 30 s at most; the rest is for a first Go build on a busy machine
    try:
        out, err = proc.communicate(timeout=150)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"{proc.args} still running after 150 s:\n{out}{err}") from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def run_example(name: str, code: str, tmp_path: Path) -> subprocess.CompletedProcess:
    return finish(start_example(name, code, tmp_path))


def show(p: subprocess.CompletedProcess) -> str:
    return f"exit {p.returncode}\n--- stdout\n{p.stdout}--- stderr\n{p.stderr}"


# -- the tests -------------------------------------------------------------------------------

def test_the_section_has_one_program_per_client():
    assert sorted(examples()) == ["go-redis", "node", "redigo", "ruby"]


@pytest.mark.timeout(240)
@pytest.mark.parametrize("name", RUNS)
def test_example_prints_the_result(name, request, redis_url, tmp_path):
    require(name)
    ns = request.getfixturevalue("worker")
    code = adapt(examples()[name], url=redis_url, ns=ns)

    p = run_example(name, code, tmp_path)

    # examples.tasks.add(2, 3), as the worker computed it, and nothing else said
    assert (p.returncode, p.stdout, p.stderr) == (0, "5\n", ""), show(p)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("name", RUNS)
def test_example_reports_a_failed_job(name, request, redis_url, tmp_path):
    require(name)
    ns = request.getfixturevalue("worker")
    # Given the same program, asking for a task the worker does not have
    code = adapt(examples()[name], url=redis_url, ns=ns,
                 task="examples.tasks.no_such_task")

    p = run_example(name, code, tmp_path)

    # Then the worker's failed envelope (UnknownTask) reaches the user, and the exit
    # status says it failed
    assert p.returncode == 1, show(p)
    assert p.stdout == "", show(p)
    assert re.search(r"job [0-9a-f-]+ failed: UnknownTask: .*examples\.tasks\.no_such_task", p.stderr), show(p)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("name", ["redigo", "go-redis"])
def test_go_example_is_gofmt_formatted_and_vets(name, tmp_path):
    """For go-redis this is all that is checked: see the module's docstring."""
    require(name)
    src = tmp_path / "add.go"
    src.write_text(examples()[name])

    fmt = subprocess.run(["gofmt", "-d", str(src)], capture_output=True, text=True)
    assert (fmt.returncode, fmt.stdout, fmt.stderr) == (0, "", ""), f"not gofmt-formatted:\n{fmt.stdout}{fmt.stderr}"

    gopath = (GO_STUB,) if name == "go-redis" else (DEBIAN_GOCODE,)
    vet = subprocess.run(["go", "vet", "add.go"], cwd=tmp_path, env=go_env(tmp_path, *gopath),
                         capture_output=True, text=True, timeout=180)
    assert vet.returncode == 0, show(vet)


@pytest.mark.timeout(240)
def test_the_go_redis_check_catches_a_wrong_call(tmp_path):
    """The stub is only worth its keep if vet against it refuses what go-redis would."""
    require("go-redis")
    wrong = examples()["go-redis"].replace("rdb.BRPop(ctx, 30*time.Second, replyTo)",
                                           "rdb.BRPop(ctx, replyTo, 30)")
    assert wrong != examples()["go-redis"], "the example no longer calls BRPop as this test expects"
    (tmp_path / "add.go").write_text(wrong)

    vet = subprocess.run(["go", "vet", "add.go"], cwd=tmp_path, env=go_env(tmp_path, GO_STUB),
                         capture_output=True, text=True, timeout=180)

    assert vet.returncode != 0 and "BRPop" in vet.stderr, show(vet)


@pytest.mark.timeout(240)
def test_examples_say_when_no_answer_came(redis_url, namespace, tmp_path):
    # Given a queue no worker serves
    ready = [n for n in RUNS if problem(n) is None]
    for name in RUNS:
        if name not in ready and REQUIRED:
            need(False, problem(name))
    if not ready:
        pytest.skip("no Node.js, Ruby or Go toolchain (`make polyglot` installs them)")
    queue_key = f"{namespace}:queue:default"

    # When each program waits its 30 s (all at once: they are only blocked on BRPOP)
    procs = {}
    for name in ready:
        (tmp_path / name).mkdir()
        procs[name] = start_example(name, adapt(examples()[name], url=redis_url, ns=namespace),
                                    tmp_path / name)
    done = {name: finish(proc) for name, proc in procs.items()}

    # Then each says so and exits 1, and its job is still queued for a worker to come
    for name, p in done.items():
        assert p.returncode == 1 and p.stdout == "", f"{name}: {show(p)}"
        assert re.search(r"no answer to job [0-9a-f-]+ within 30 s", p.stderr), f"{name}: {show(p)}"
    r = redis.Redis.from_url(redis_url)
    try:
        assert r.llen(queue_key) == len(done)
    finally:
        r.close()
