"""A task module that installs a SIGTERM handler of its own at import: it stops the
running task by raising, to clean up (tests/test_child.py)."""

import signal


class Stopped(Exception):
    """Raised into the running task by this module's SIGTERM handler."""


def _stop(signum, frame):
    raise Stopped("stopped by SIGTERM")


signal.signal(signal.SIGTERM, _stop)
