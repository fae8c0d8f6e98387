"""A task module that configures structlog of its own: redpool leaves it alone."""

import sys

import structlog

from redpool import task

structlog.configure(
    processors=[structlog.processors.KeyValueRenderer(key_order=["event"])],
    logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
)


@task(name="own.structlog")
def say(text):
    structlog.get_logger().info("own_structlog_says", text=text)
    return text
