"""Why a pool child could not boot, said for a person (it stops the daemon: exit 3).

Two cases a newcomer meets, told apart:

* the task module does not exist where the child looked: one line that names the
  module, the working directory and ``sys.path``, and what to do (a close name in that
  directory or package is suggested, and a file path given for a module is caught);
* the module exists but raised while being imported (a syntax error, a dependency not
  installed, code that fails at import time): its traceback, once, without the frames
  of the import machinery (``<frozen importlib._bootstrap>``), which say nothing
  about the user's code.

Runs in the child, which knows the ``sys.path`` it really searched.
"""

from __future__ import annotations

import difflib
import importlib
import os
import pkgutil
import sys
import traceback

# Frames of the import machinery and of our own boot code: the user's traceback
# starts at their module.
_MACHINERY = ("<frozen importlib.", importlib.__file__)


def describe(exc: BaseException, module: str | None, hook: str | None = None) -> str:
    """The message of a boot failure: importing ``module`` raised ``exc``, or (module
    None) the @on_child_start hook ``hook`` did."""
    if module is None:
        return (f"the @on_child_start hook {hook or '?'} raised in a pool process "
                f"(pid {os.getpid()}):\n{readable_traceback(exc)}")
    missing = missing_module(exc, module)
    if missing:
        return missing
    return (f"task module {module!r} raised while being imported in a pool process "
            f"(working directory {os.getcwd()}):\n{readable_traceback(exc)}")


def missing_module(exc: BaseException, module: str) -> str | None:
    """One line when ``module`` itself (or a package on its dotted path) does not
    exist; None when it exists and something it imports does not (that is the
    module's own error: its traceback says which line)."""
    if not isinstance(exc, ModuleNotFoundError) or not exc.name:
        return None
    if not (module == exc.name or module.startswith(exc.name + ".")):
        return None
    if module.endswith(".py") or os.sep in module:
        return (f"task module {module!r} not found: that is a file, and a module name is "
                f"needed: {_as_module(module)!r}, with the worker run from the directory "
                f"that holds it (the working directory is {os.getcwd()}), or that "
                "directory added to PYTHONPATH")
    parent, _, leaf = exc.name.rpartition(".")
    close = " or ".join(repr(f"{parent}.{c}" if parent else c)
                        for c in _close_names(parent, leaf))
    if parent:  # the package is there: the name within it is wrong
        where = getattr(sys.modules.get(parent), "__path__", None) or [parent]
        return (f"task module {module!r} not found: package {parent!r} "
                f"({', '.join(where)}) has no module {leaf!r}; "
                + (f"did you mean {close}?" if close else "check the module name"))
    cwd = os.getcwd()
    searched = [os.path.abspath(p or cwd) for p in sys.path]
    where = (f"in the working directory {cwd} or elsewhere on sys.path {searched}"
             if cwd in searched else
             f"on sys.path {searched} (the working directory {cwd} is not on it)")
    return (f"task module {module!r} not found: no module {exc.name!r} {where}; "
            + (f"did you mean {close}? If not: " if close else "")
            + f"run the worker from your project's root (the directory that holds "
              f"{exc.name!r}), add that directory to PYTHONPATH, or check the module name")


def _close_names(parent: str, leaf: str) -> list[str]:
    """Modules whose names are close to ``leaf``: in the package ``parent``, or, for a
    top-level name, in the working directory."""
    if parent:
        pkg = sys.modules.get(parent)
        paths = list(getattr(pkg, "__path__", []) or [])
    else:
        paths = [os.getcwd()]
    names = {m.name for m in pkgutil.iter_modules(paths)}
    if not parent:  # namespace packages (a directory without __init__.py) import too
        names |= {d for d in _listdir(os.getcwd())
                  if d.isidentifier() and os.path.isdir(d)}
    return difflib.get_close_matches(leaf, sorted(names), n=2)


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


def _as_module(path: str) -> str:
    path = path[:-3] if path.endswith(".py") else path
    return path.strip(os.sep).replace(os.sep, ".").lstrip(".")


def readable_traceback(exc: BaseException) -> str:
    """The traceback of ``exc`` (and of the exceptions chained to it) without the
    import machinery's frames and ours: what a plain ``import`` would show."""
    te = traceback.TracebackException.from_exception(exc)
    seen = set()
    todo = [te]
    while todo:
        t = todo.pop()
        if id(t) in seen:
            continue
        seen.add(id(t))
        frames = [f for f in t.stack if not _machinery(f.filename)]
        t.stack = traceback.StackSummary.from_list(frames)
        todo += [x for x in (t.__cause__, t.__context__) if x is not None]
    return "".join(te.format()).rstrip("\n")


def _machinery(filename: str) -> bool:
    return filename.startswith(_MACHINERY[0]) or filename == _MACHINERY[1] \
        or filename == _CHILD


_CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "child.py")
