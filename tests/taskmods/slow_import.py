"""A task module that takes a while to import (to kill a child while it boots)."""

import time

from redpool import task

time.sleep(1.5)


@task(name="slow.ping")
def ping():
    return "pong"
