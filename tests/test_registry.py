"""Task registration and naming: only registered names run, and a producer is told
at once when it names something no worker could ever find."""

from __future__ import annotations

import functools
import pickle

import pytest

from redpool.errors import JobFailed
from redpool.registry import Registry, task_name


def module_level(x):
    return x


class Thing:
    def method(self):
        pass


def test_task_registers_under_module_and_name_or_a_chosen_name():
    reg = Registry()
    a = reg.task(module_level)
    b = reg.task(name="images.resize")(lambda size: size)
    assert a.name == f"{__name__}.module_level"
    assert reg.get("images.resize") is b and b(3) == 3
    assert reg.names() == sorted([a.name, "images.resize"])


def test_two_functions_cannot_share_a_name():
    reg = Registry()
    reg.task(name="x")(lambda: 1)
    with pytest.raises(ValueError, match="already registered"):
        reg.task(name="x")(lambda: 2)


def test_argument_check_names_the_signature():
    reg = Registry()
    t = reg.task(name="add")(lambda a, b: a + b)
    assert t.check_arguments([1, 2], {}) is None
    assert "missing a required argument: 'b'" in t.check_arguments([1], {})
    assert "unexpected keyword" in t.check_arguments([1, 2], {"c": 3})


def test_task_name_accepts_names_tasks_and_module_functions():
    reg = Registry()
    assert task_name("a.b") == "a.b"
    assert task_name(reg.task(name="n.m")(module_level)) == "n.m"
    assert task_name(module_level) == f"{__name__}.module_level"


@pytest.mark.parametrize("thing, match", [
    (lambda: 1, "lambda or nested"),
    (functools.partial(module_level, 1), "module-level function"),
    (Thing().method, "module-level function"),
    (42, "module-level function"),
])
def test_task_name_refuses_what_no_worker_can_find(thing, match):
    with pytest.raises(TypeError, match=match):
        task_name(thing)


def test_task_name_refuses_functions_of_the_main_script():
    def f():
        pass
    f.__module__ = "__main__"
    f.__qualname__ = "f"
    with pytest.raises(ValueError, match="__main__"):
        task_name(f)


def test_job_failed_carries_the_remote_error_and_survives_pickling():
    env = {"id": "j1", "worker": "w", "status": "failed",
           "error": {"type": "ValueError", "message": "bad", "traceback": "Traceback..."}}
    e = pickle.loads(pickle.dumps(JobFailed(env)))
    assert (e.type, e.message, e.traceback, e.job_id) == ("ValueError", "bad", "Traceback...", "j1")
    assert str(e).startswith("ValueError: bad")
