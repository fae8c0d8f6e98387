"""redpool: a multiprocessing.Pool that spans hosts, fed by Redis lists."""

from .errors import JobFailed, RedpoolError
from .registry import JobInfo, Task, current_job, on_child_start, task

__version__ = "0.1.0"

__all__ = ["task", "on_child_start", "current_job", "JobInfo", "Task", "Client", "AsyncResult",
           "Pool", "JobFailed", "RedpoolError", "MaybeQueued", "__version__"]


def __getattr__(name: str):
    # The client pulls in redis-py; keep `import redpool` in pool children light.
    if name in ("Client", "AsyncResult", "MaybeQueued"):
        from . import client
        return getattr(client, name)
    if name == "Pool":  # (remote_pool imports client: the arrows run one way)
        from . import remote_pool
        return remote_pool.Pool
    raise AttributeError(f"module 'redpool' has no attribute {name!r}")
