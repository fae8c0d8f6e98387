"""The soak's private Redis: one server (``Single``) or a three-primary cluster plus a
ledger server (``Cluster``).  Both start, give clients and URLs, kill -9 and restart
what the soak's "Redis restart" step takes down, and keep their logs."""

from __future__ import annotations

import os
import shutil
import signal
import time
from pathlib import Path

import redis

from redpool.keys import Keys
from redpool.server import EmbeddedCluster, EmbeddedServer

RESTART_PATIENCE = 30.0  # seconds a fixed port may take to be free again


def _retry(start, what: str) -> None:
    deadline = time.monotonic() + RESTART_PATIENCE
    while True:
        try:
            return start()
        except Exception as e:
            if time.monotonic() > deadline:
                raise RuntimeError(f"could not (re)start {what}: {e}") from e
            time.sleep(0.2)


def _client(port: int) -> redis.Redis:
    return redis.Redis(host="127.0.0.1", port=port, socket_timeout=10.0,
                       socket_connect_timeout=2.0)


class Single:
    """One server with AOF on (appendfsync always): the queue, the results, the ledger.
    Its restart kills -9 the server and starts it again on the same port and dir."""

    queues = ("default",)

    def __init__(self, tmp: Path, ns: str) -> None:
        self.dir = tmp / "server"
        self.dir.mkdir(exist_ok=True)
        self.keys = Keys(ns)
        self.server: EmbeddedServer | None = None
        self.port: int | None = None

    def start(self) -> None:
        def attempt() -> None:
            srv = EmbeddedServer(port=self.port, dir=str(self.dir), appendonly=True)
            try:
                srv.start()
            except Exception:
                srv.stop()
                raise
            self.server, self.port = srv, srv.port
        _retry(attempt, "the server")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    ledger_url = url

    def describe(self) -> str:
        return f"server {self.url} (AOF, appendfsync always) in {self.dir}"

    def client(self) -> redis.Redis:
        return _client(self.port)

    ledger_client = client

    def kill(self) -> str:
        pid = self.server.proc.pid
        os.kill(pid, signal.SIGKILL)
        self.server.proc.wait()
        self.server.proc = None
        return f"the server (pid {pid})"

    def restart(self, r: redis.Redis) -> str:
        """Start it again; ``r``'s connections to the dead one are dropped."""
        self.start()
        r.connection_pool.disconnect()
        return f"server back on port {self.port} (pid {self.server.proc.pid})"

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()

    def logs(self) -> list[tuple[str, Path]]:
        return [("server.log", self.dir / "server.log")]

    def cleanup(self) -> None:
        pass  # its directory is in the soak's


class Cluster:
    """Three primaries with AOF on (appendfsync always), queues "a", "b" and "c" on
    three different ones; the ledger on a separate plain server (AOF, appendfsync
    always), never restarted.  The restart kills -9 the primary of queue "b" and
    starts it again on its port and dir (``EmbeddedCluster.restart``)."""

    queues = ("a", "b", "c")

    def __init__(self, tmp: Path, ns: str) -> None:
        self.ledger_dir = tmp / "ledger"
        self.ledger_dir.mkdir(exist_ok=True)
        self.keys = Keys(ns, cluster=True)
        self.cluster: EmbeddedCluster | None = None
        self.ledger: EmbeddedServer | None = None
        self.victim: EmbeddedServer | None = None

    def start(self) -> None:
        self.ledger = EmbeddedServer(dir=str(self.ledger_dir), appendonly=True).start()
        self.cluster = EmbeddedCluster(3, appendonly=True).start()
        self.victim = self.cluster.node_of(self.keys.queue("b"))
        homes = {self.cluster.node_of(self.keys.queue(q)).port for q in self.queues}
        if len(homes) != len(self.queues):
            raise RuntimeError(f"queues {self.queues} do not live on different primaries")

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.cluster.nodes)

    @property
    def ledger_url(self) -> str:
        return self.ledger.url

    def describe(self) -> str:
        homes = ", ".join(f"{q} on {self.cluster.node_of(self.keys.queue(q)).port}"
                          for q in self.queues)
        return (f"cluster {self.url} (3 primaries, AOF, appendfsync always; queues {homes}); "
                f"ledger {self.ledger_url} (AOF) in {self.ledger_dir}")

    def client(self) -> redis.Redis:
        from redis.cluster import RedisCluster

        return RedisCluster.from_url(self.cluster.url, socket_timeout=10.0,
                                     socket_connect_timeout=2.0)

    def ledger_client(self) -> redis.Redis:
        return _client(self.ledger.port)

    def kill(self) -> str:
        node = self.victim
        pid = node.proc.pid
        os.kill(pid, signal.SIGKILL)
        node.proc.wait()
        node.proc = None
        return f"the primary of queue b (port {node.port}, pid {pid})"

    def restart(self, r) -> str:
        """Start it again and wait until the cluster is ok (``r`` finds it by itself)."""
        node = self.victim
        _retry(lambda: self.cluster.restart(node) if node.proc is None else
               self.cluster.wait_ok(RESTART_PATIENCE), f"the node on {node.port}")
        return f"primary back on port {node.port} (pid {node.proc.pid})"

    def stop(self) -> None:
        for srv in [self.ledger, *(self.cluster.everyone if self.cluster else [])]:
            if srv is not None:
                srv.stop()

    def logs(self) -> list[tuple[str, Path]]:
        nodes = self.cluster.nodes if self.cluster else []
        return [("ledger.log", self.ledger_dir / "server.log")] + \
            [(f"node-{n.port}.log", Path(n.dir) / "server.log") for n in nodes]

    def cleanup(self) -> None:
        if self.cluster is not None:
            self.cluster.cleanup()


def keep_logs(backend, tmp: Path, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for f in (tmp / "logs").glob("*.log"):
        shutil.copy2(f, dest / f.name)
    for name, path in backend.logs():
        if path.exists():
            shutil.copy2(path, dest / name)
