"""A task module that cannot be imported: the daemon must refuse to start."""

from redpool import task

raise ImportError("this module is broken on purpose (tests.taskmods.broken)")


@task(name="never")
def never():
    pass
