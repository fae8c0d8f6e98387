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
    # A module imported twice (e.g. as __main__ and by name) defines the function twice.
    return getattr(a, "__qualname__", None) == getattr(b, "__qualname__", None) and \
        getattr(a, "__module__", None) == getattr(b, "__module__", None)


def task_name(t: "Task | Callable | str") -> str:
    """The wire name of a task given as a name, a decorated task or a plain function."""
    if isinstance(t, str):
        return t
    if isinstance(t, Task):
        return t.name
    if callable(t):
        return f"{t.__module__}.{t.__qualname__}"
    raise TypeError(f"expected a task name or a function, got {type(t).__name__}")


@dataclass(frozen=True)
class JobInfo:
    """What a running task may know about its job (for idempotency keys, logs)."""

    id: str
    task: str
    queue: str
    attempt: int
    worker: str


_current: contextvars.ContextVar[JobInfo | None] = contextvars.ContextVar("redpool_job", default=None)


def current_job() -> JobInfo | None:
    """The job the calling task is running for, or None outside a worker."""
    return _current.get()


#: The process-wide registry that ``@redpool.task`` fills.
default_registry = Registry()
task = default_registry.task
on_child_start = default_registry.on_child_start
