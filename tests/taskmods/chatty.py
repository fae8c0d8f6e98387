"""A task that logs through the standard library, as application code does: its
lines must come out in the worker's log format (tests/test_output.py)."""

import logging

from redpool import task

log = logging.getLogger("tests.taskmods.chatty")


@task(name="chatty.say")
def say(text):
    log.warning("task says %s", text)
    return text
