"""A task module that sets up logging of its own: redpool leaves it alone."""

import logging

from redpool import task

logging.basicConfig(format="OWN %(levelname)s %(message)s", level=logging.INFO)


@task(name="own.say")
def say(text):
    logging.getLogger("own").info("own says %s", text)
    return text
