"""The import arrows of docs/STYLE ("cli -> supervisor -> queue | pool | signals ->
protocol, errors"), checked by parsing the source, plus the size of each module, and
that no modules import each other in a circle.

Static checks read every import statement, also those inside functions (a lazy import
is still an arrow).  The transitive checks follow only module-level imports, which are
what runs when a module is imported; one check also imports in a fresh interpreter to
see what a pool child really loads.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import warnings
from functools import lru_cache
from pathlib import Path

import pytest
import redis

SRC = Path(__file__).resolve().parent.parent / "src" / "redpool"
MODULES = sorted(p.stem for p in SRC.glob("*.py"))
PKG = "redpool"

SOFT_LIMIT = 400   # warn above this many lines
HARD_LIMIT = 450   # fail above this many lines

# Modules known to be over the hard limit: a strict xfail each while they are over it
# (the file may be split by the time this runs: then the plain test applies again, and
# the entry here can go).
KNOWN_OVERSIZE: dict[str, str] = {}


def _tree(module: str) -> ast.Module:
    return ast.parse((SRC / f"{module}.py").read_text("utf-8"), filename=f"{module}.py")


def _resolve(node: ast.ImportFrom, name: str | None) -> str:
    """The module an ImportFrom names (``from . import child`` -> redpool.child)."""
    if node.level == 0:
        return node.module or ""
    if node.level > 1:
        raise AssertionError(f"relative import beyond the package: level {node.level}")
    base = PKG + (f".{node.module}" if node.module else "")
    if node.module is None and name is not None and (SRC / f"{name}.py").exists():
        return f"{PKG}.{name}"
    return base


def _import_nodes(tree: ast.Module, top_level_only: bool):
    """Import statements; with top_level_only, not those inside a def (they run later)."""
    todo: list[ast.AST] = [tree]
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        for child in ast.iter_child_nodes(node):
            if top_level_only and isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                     ast.Lambda)):
                continue
            todo.append(child)


@lru_cache(maxsize=None)
def imports(module: str, *, top_level_only: bool = False) -> frozenset[str]:
    """Fully qualified names of the modules ``module`` imports."""
    out: set[str] = set()
    for node in _import_nodes(_tree(module), top_level_only):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        else:
            for a in node.names:
                out.add(_resolve(node, a.name))
    return frozenset(out)


def internal(names) -> set[str]:
    """redpool.x -> x (the package itself -> '__init__')."""
    out = set()
    for n in names:
        if n == PKG:
            out.add("__init__")
        elif n.startswith(PKG + "."):
            out.add(n.split(".")[1])
    return out


def external_roots(names) -> set[str]:
    return {n.split(".")[0] for n in names if n != PKG and not n.startswith(PKG + ".")}


def closure(module: str) -> set[str]:
    """Every redpool module loaded by importing ``module`` (module-level imports only;
    importing any submodule also runs the package's __init__)."""
    seen: set[str] = set()
    todo = [module, "__init__"]
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        todo.extend(internal(imports(m, top_level_only=True)))
    return seen


def external_closure(module: str) -> set[str]:
    return set().union(*(external_roots(imports(m, top_level_only=True)) for m in closure(module)))


# -- the arrows -------------------------------------------------------------------------------

def test_the_scanner_sees_known_imports():
    # guard against a checker that silently finds nothing
    assert {"redpool.child", "redpool.errors"} <= imports("pool")
    assert "redis" in imports("queue")
    assert "redpool.protocol" in imports("queue")
    assert "redpool.queue" in imports("cli")            # a lazy import inside a function
    assert "redpool.queue" not in imports("cli", top_level_only=True)
    assert {"queue", "pool", "signals", "protocol"} <= internal(imports("supervisor"))


def test_the_contract_imports_nothing_else_from_redpool():
    # protocol.py, keys.py (key names), encoding.py (how JSON is written) and strictjson.py
    # (the JSON a worker reads: limits on depth, numbers, Unicode), all re-exported by
    # protocol, are the whole contract
    assert internal(imports("protocol")) == {"keys", "encoding", "strictjson"}
    assert internal(imports("keys")) == internal(imports("strictjson")) == set()
    assert internal(imports("encoding")) == set()
    for m in ("protocol", "keys", "encoding", "strictjson"):
        assert external_roots(imports(m)) <= set(sys.stdlib_module_names)


def test_pool_never_imports_queue_or_redis():
    assert not {"queue", "supervisor", "waiter", "client"} & internal(imports("pool"))
    assert "redis" not in external_roots(imports("pool"))
    # nor through anything it imports
    assert not {"queue", "supervisor", "waiter", "client"} & closure("pool")
    assert "redis" not in external_closure("pool")


def test_queue_never_imports_the_process_side():
    assert not {"pool", "child", "supervisor", "signals", "waiter"} & internal(imports("queue"))
    assert not {"pool", "child", "supervisor"} & closure("queue")


def test_child_does_not_import_redis():
    assert "redis" not in external_roots(imports("child"))
    assert "redis" not in external_closure("child")
    assert not {"queue", "waiter", "client", "supervisor", "pool"} & closure("child")


def test_a_pool_child_loads_neither_redis_nor_the_queue():
    # What a spawned child imports to unpickle its target, in a fresh interpreter.
    code = ("import sys, redpool.child, redpool.pool; "
            "bad = sorted(m for m in sys.modules if m == 'redis' or m.startswith('redis.') "
            "or m in ('redpool.queue', 'redpool.supervisor', 'redpool.client')); "
            "print(','.join(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""


def test_signals_import_nothing_from_redpool_but_wakeup_protocol_and_errors():
    assert internal(imports("signals")) <= {"wakeup", "protocol", "errors"}
    assert internal(imports("wakeup")) == set()


def test_supervisor_uses_redis_only_for_its_exception_types():
    tree = _tree("supervisor")
    # `import redis` is allowed; `from redis import X` only for exception classes
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "redis":
            for a in node.names:
                obj = getattr(redis, a.name, None)
                assert isinstance(obj, type) and issubclass(obj, BaseException), a.name
    used = {node.attr for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
            and node.value.id == "redis"}
    assert used, "expected the supervisor to catch redis errors"
    for attr in used:
        obj = getattr(redis, attr, None)
        assert isinstance(obj, type) and issubclass(obj, BaseException), \
            f"supervisor.py uses redis.{attr}: Redis calls belong in queue.py"
    # and it makes no Redis calls of its own: no client built, no command sent
    assert "Redis" not in used and "from_url" not in used


def test_supervisor_is_glue_over_queue_pool_and_signals():
    allowed = {"__init__", "protocol", "errors", "child", "config", "hooks", "pool", "queue",
               "signals", "waiter", "logs", "duties", "work", "outcomes", "poller", "lifecycle",
               "completion"}
    assert internal(imports("supervisor")) <= allowed
    assert internal(imports("outcomes")) <= {"protocol", "pool", "child", "completion", "work",
                                             "config", "oversized"}
    assert internal(imports("lifecycle")) <= {"outcomes", "pool", "signals"}


def test_the_supervisor_is_one_class_that_owns_its_collaborators():
    # The loop reads in one place: Supervisor inherits from nothing (no mixins spread
    # over files); what it delegates to (outcomes.ChildEvents, lifecycle.Lifecycle,
    # duties.Duties) it owns as attributes and calls by name.
    [sup] = [n for n in _tree("supervisor").body
             if isinstance(n, ast.ClassDef) and n.name == "Supervisor"]
    assert sup.bases == [] and sup.keywords == []
    for module, name in (("outcomes", "ChildEvents"), ("lifecycle", "Lifecycle")):
        [cls] = [n for n in _tree(module).body if isinstance(n, ast.ClassDef) and n.name == name]
        assert cls.bases == [], f"{module}.{name} must not be a mixin of another class"


def test_duties_use_redis_only_through_queue_and_lease():
    assert internal(imports("duties")) <= {"__init__", "protocol", "errors", "config", "hooks",
                                          "lease", "queue", "work", "supervisor", "dataset",
                                          "health", "keytypes", "suspicion"}
    # (dataset: Redis losing its data, a mixin of the duties; it reaches Redis through
    # the queue and the lease as they do, and imports neither the loop nor the pool;
    # health, the same for Redis's errors, with keytypes: keys of the wrong type)
    assert internal(imports("dataset")) <= {"errors"}
    assert internal(imports("health")) <= {"errors", "keytypes", "outage"}
    assert internal(imports("outage")) == set()   # (what counts as one outage: a rule)
    assert internal(imports("suspicion")) == set()  # (rq.suspect, raised from any thread)
    assert internal(imports("keytypes")) <= {"errors", "protocol"}
    assert "pool" not in internal(imports("duties"))
    assert "cli" not in closure("supervisor")


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module, or of one that
    imports itself (Tarjan's algorithm): each is a set of modules importing each other
    in a loop."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in graph.get(v, ()):
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_circle_finder_finds_circles():
    # guard against a check that silently finds nothing
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _circles({"a": {"a"}}) == [["a"]]
    assert _circles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_no_modules_import_each_other_in_a_circle():
    # Every import statement counts: inside functions (a lazy import is still an arrow)
    # and under `if TYPE_CHECKING` (an annotation naming a module above is one too).  A
    # module that must call back up takes what it needs as an argument, or names it by a
    # typing.Protocol (duties.Loop), instead of importing it.
    graph = {m: internal(imports(m)) & set(MODULES) for m in MODULES}
    assert {"queue", "protocol"} <= graph["supervisor"]  # (the graph is not empty)
    assert _circles(graph) == []


def test_every_name_imported_from_a_redpool_module_is_there():
    # A name moved to another module must not leave an import of it behind (a lazy one
    # fails only when its function runs: `redpool demo` did, once, for Pool).
    import importlib

    missing = []
    for m in MODULES:
        for node in _import_nodes(_tree(m), top_level_only=False):
            if not isinstance(node, ast.ImportFrom) or node.level == 0 and \
                    (node.module or "").split(".")[0] != PKG:
                continue
            target = importlib.import_module(_resolve(node, None))
            for a in node.names:
                if a.name != "*" and not hasattr(target, a.name) \
                        and not (SRC / f"{a.name}.py").exists():
                    missing.append(f"{m}.py:{node.lineno}: {a.name} from {target.__name__}")
    assert missing == []


def test_nothing_below_the_cli_imports_it():
    for m in MODULES:
        if m not in ("cli", "__main__"):
            assert "cli" not in internal(imports(m)), m


def test_keys_are_assembled_only_in_protocol():
    markers = (":queue:", ":processing:", ":result:", ":reply:", ":supervisor", ":dead")
    offenders = []
    for m in MODULES:
        if m in ("protocol", "keys"):
            continue
        tree = _tree(m)
        docstrings = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Expr)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) \
                    and id(node) not in docstrings and any(k in node.value for k in markers):
                offenders.append(f"{m}.py:{node.lineno}: {node.value!r}")
    assert offenders == []


# -- size -------------------------------------------------------------------------------------

def _lines(module: str) -> int:
    return len((SRC / f"{module}.py").read_text("utf-8").splitlines())


@pytest.mark.parametrize("module", [
    pytest.param(m, marks=pytest.mark.xfail(strict=True, reason=KNOWN_OVERSIZE[m]))
    if m in KNOWN_OVERSIZE and _lines(m) > HARD_LIMIT else m
    for m in MODULES])
def test_module_size(module):
    n = _lines(module)
    if n > SOFT_LIMIT:
        warnings.warn(f"src/redpool/{module}.py has {n} lines (aim for <= {SOFT_LIMIT})",
                      stacklevel=1)
    assert n <= HARD_LIMIT, f"src/redpool/{module}.py has {n} lines: split it (limit {HARD_LIMIT})"
