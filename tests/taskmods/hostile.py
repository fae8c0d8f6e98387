"""Tasks that return or raise what a worker cannot simply write (tests/test_hostile_results.py,
tests/test_child.py).  Each must end its job in one failed envelope (or a succeeded one
with ``warnings``), never in the death of its pool process."""

import math

from redpool import task


class Unprintable(Exception):
    def __str__(self):
        raise RuntimeError("no str for you")

    def __repr__(self):
        raise RuntimeError("no repr either")


class ExitingStr(Exception):
    """str() raises SystemExit: the traceback module only guards against Exception."""

    def __str__(self):
        raise SystemExit(9)


class Nowhere(Exception):
    pass


Nowhere.__module__ = None  # a class made by type() in odd code, or a C extension's


class BadNotes(Exception):
    """Formatting its traceback raises (the traceback module reads __notes__)."""

    @property
    def __notes__(self):
        raise RuntimeError("no notes")


class Nameless(type):
    """A metaclass whose classes cannot say their name."""

    def __getattribute__(cls, name):
        if name in ("__qualname__", "__name__", "__module__"):
            raise RuntimeError("no name")
        return super().__getattribute__(name)


class Anonymous(Exception, metaclass=Nameless):
    pass


class Fatal(BaseException):
    pass


class LoudDel(Exception):
    def __del__(self):
        raise RuntimeError("from __del__")


class BadRepr:
    def __repr__(self):
        raise RuntimeError("no repr")

    __str__ = __repr__


class BadItems(dict):
    def items(self):
        raise SystemExit("items() exits")


def nested(depth: int):
    x: list = []
    for _ in range(depth):
        x = [x]
    return x


@task(name="h.surrogate_raise")
def surrogate_raise():
    raise ValueError("bad \ud800 text")


@task(name="h.surrogate_result")
def surrogate_result():
    return {"text": "a\udc00b", "key\ud800": 1, "pair": "\ud83d\ude00"}


RESULTS = {
    "set": lambda: {1, 2},
    "bad_repr": BadRepr,
    "nan": lambda: [math.nan],
    "inf": lambda: {"x": math.inf},
    "deep": lambda: nested(100_000),
    "tuple_key": lambda: {(1, 2): "x"},
    "generator": lambda: (i for i in range(3)),
    "bad_items": lambda: BadItems(a=1),
}

RAISES = {
    "unprintable": Unprintable,
    "exiting_str": ExitingStr,
    "nowhere": Nowhere,
    "fatal": Fatal,
    "loud_del": LoudDel,
    "bad_notes": BadNotes,
    "anonymous": Anonymous,
}


@task(name="h.returns")
def returns(kind: str):
    return RESULTS[kind]()


@task(name="h.raises")
def raises(kind: str):
    raise RAISES[kind]("boom")


@task(name="h.big")
def big(n: int, char: str = "x"):
    """A string of ``n`` characters: with a control character, six bytes each in JSON."""
    return char * n


@task(name="h.long_error")
def long_error(n: int):
    raise RuntimeError("e" * n)


@task(name="h.add")
def add(a, b):
    return a + b


# -- state a task leaves behind in its process (src/redpool/leftovers.py) -----------------------

@task(name="h.leave")
def leave(kind: str, arg=None):
    """Change per-process state and return, as a careless task would."""
    import os
    import signal
    import sys

    if kind == "alarm":
        signal.alarm(1)
    elif kind == "itimer":
        signal.setitimer(signal.ITIMER_REAL, 0.5)
    elif kind == "alarm_handler":   # a handler that would raise into a later job
        def timeout(signum, frame):
            raise TimeoutError("the alarm of an earlier job")
        signal.signal(signal.SIGALRM, timeout)
        signal.alarm(1)
    elif kind == "sigpipe":
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    elif kind == "recursion":
        sys.setrecursionlimit(50)
    elif kind == "chdir":
        os.chdir(arg)
    elif kind == "close_stdout":
        sys.stdout.close()
    elif kind == "close_stderr":
        sys.stderr.close()
    elif kind == "replace_stdout":
        sys.stdout = None
    return kind


@task(name="h.after")
def after(seconds: float = 0.0):
    """A later job: a little Python that prints, recurses a bit and reads its
    surroundings, and waits past any alarm left for it."""
    import os
    import sys
    import time

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.05)
    print("after", flush=True)
    print("after", file=sys.stderr, flush=True)
    return {"cwd": os.getcwd(), "deep": nested(100)}


class SurrogateName(Exception):
    """Its qualified name and module hold unpaired surrogates (``type()`` refuses such a
    name; assigning ``__qualname__`` and ``__module__`` does not)."""


SurrogateName.__qualname__ = "Bad\ud800Name"
SurrogateName.__module__ = "mod\udc00ule"


@task(name="h.surrogate_class")
def surrogate_class():
    raise SurrogateName("odd class")
