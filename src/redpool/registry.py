"""Registered tasks: the only code a job can run.

``@task`` records a function under ``"<module>.<name>"`` (or a chosen name).  A job
names a task; it never names a module to import: children import the modules the
operator listed on the command line, once, at start, and look names up here.
"""

from __future__ import annotations

import contextvars
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable

from .protocol import ID_RE


@dataclass
class Task:
    fn: Callable[..., Any]
    name: str
    options: dict[str, Any] = field(default_factory=dict)
    _signature: inspect.Signature | None = field(default=None, repr=False)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Calling a task runs it here, like the plain function."""
        return self.fn(*args, **kwargs)

    def check_arguments(self, args: list, kwargs: dict) -> str | None:
        """None if ``fn(*args, **kwargs)`` binds, else a human reason why not."""
        if self._signature is None:
            try:
                self._signature = inspect.signature(self.fn)
            except (TypeError, ValueError):  # builtins without a signature: let the call decide
                return None
        try:
            self._signature.bind(*args, **kwargs)
        except TypeError as e:
            return f"arguments do not match {self.name}{self._signature}: {e}"
        return None


class Registry:
    def __init__(self) -> None:
        self.tasks: dict[str, Task] = {}
        self.child_init: list[Callable[[], Any]] = []

    def task(self, fn: Callable | None = None, *, name: str | None = None, **options: Any):
        def register(f: Callable) -> Task:
            task_name = name or f"{f.__module__}.{f.__qualname__}"
            if not ID_RE.match(task_name.replace("<", "").replace(">", "")):
                raise ValueError(f"task name {task_name!r}: use letters, digits and . _ : -")
            existing = self.tasks.get(task_name)
            if existing is not None and existing.fn is not f and not _same_function(existing.fn, f):
                raise ValueError(f"task name {task_name!r} is already registered to {existing.fn!r}")
            t = Task(fn=f, name=task_name, options=options)
            self.tasks[task_name] = t
            return t
        return register(fn) if fn is not None else register

    def on_child_start(self, fn: Callable[[], Any]) -> Callable[[], Any]:
        """Run ``fn()`` in every pool child after the task modules are imported
        (open database connections here, after the fork/spawn, not before)."""
        self.child_init.append(fn)
        return fn

    def get(self, name: str) -> Task | None:
        return self.tasks.get(name)

    def names(self) -> list[str]:
        return sorted(self.tasks)


def _same_function(a: Callable, b: Callable) -> bool:
    # A module imported twice (e.g. as __main__ and by name) defines the function twice,
    # from the same source lines.
    def where(f: Callable) -> tuple:
        code = getattr(f, "__code__", None)
        return (getattr(f, "__qualname__", None), code and code.co_filename,
                code and code.co_firstlineno)
    return where(a) == where(b)


def task_name(t: "Task | Callable | str") -> str:
    """The wire name of a task given as a name, a decorated task or a plain function.

    Refuses, in the producer, what no worker could ever find: lambdas, nested
    functions, bound methods, partials, and functions defined in ``__main__``."""
    if isinstance(t, str):
        return t
    if isinstance(t, Task):
        if t.name.startswith("__main__."):
            raise ValueError(f"task {t.name!r} is defined in the __main__ script, where no "
                             "worker can import it: move it into a module that the worker "
                             "is started with, or give it a name with @task(name=...)")
        return t.name
    module = getattr(t, "__module__", None)
    qualname = getattr(t, "__qualname__", None)
    if not callable(t) or not module or not qualname or inspect.ismethod(t):
        raise TypeError(f"expected a task name or a module-level function, got {t!r}")
    if "<" in qualname:
        raise TypeError(f"{qualname} is a lambda or nested function that no worker can "
                        "find: define it at module level and decorate it with @task")
    if module == "__main__":
        raise ValueError(f"{qualname} is defined in the __main__ script, where no worker can "
                         "import it: move it into a module that the worker is started with")
    return f"{module}.{qualname}"


@dataclass(frozen=True)
class JobInfo:
    """What a running task may know about its job (for idempotency keys, logs)."""

    id: str
    task: str
    queue: str
    attempt: int              # 1, then 2, 3, ... on retries
    worker: str
    crashes: int = 0          # earlier runs of this attempt cut short by a crash


_current: contextvars.ContextVar[JobInfo | None] = contextvars.ContextVar("redpool_job", default=None)


def current_job() -> JobInfo | None:
    """The job the calling task is running for, or None outside a worker."""
    return _current.get()


#: The process-wide registry that ``@redpool.task`` fills.
default_registry = Registry()
task = default_registry.task
on_child_start = default_registry.on_child_start
