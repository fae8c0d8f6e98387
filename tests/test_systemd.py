"""systemd integration: sd_notify spoken to a real datagram socket, the real daemon
with a test playing systemd's side, and the unit file checked by systemd-analyze."""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pytest

from helpers import ROOT, lpush_jobs, envelope, wait_for
from redpool.hooks import Hooks
from redpool.systemd import PING_SLACK, STOP_MARGIN, Notifier, SystemdNotify, notify_systemd

UNIT = ROOT / "deploy" / "systemd" / "redpool@.service"
WATCHDOG_USEC = 2_000_000


class NotifySocket:
    """systemd's side: a datagram socket that records each message with the time it
    arrived and the pid of its sender (SO_PASSCRED, as systemd checks NotifyAccess)."""

    def __init__(self, address: str) -> None:
        self.address = address   # as NOTIFY_SOCKET says it: a path or @abstract
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self.sock.settimeout(0.1)
        self.received: list[tuple[float, int, dict[str, str]]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        ucred = struct.Struct("iII")
        while not self._stop.is_set():
            try:
                data, anc, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(ucred.size))
            except TimeoutError:
                continue
            except OSError:
                return
            pid = -1
            for level, kind, cdata in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = ucred.unpack(cdata[:ucred.size])[0]
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            with self._lock:
                self.received.append((time.monotonic(), pid, fields))

    def messages(self) -> list[tuple[float, int, dict[str, str]]]:
        with self._lock:
            return list(self.received)

    def wait(self, pred, timeout: float = 30.0, what: str = "a notification") -> dict:
        """The first message (already received or to come) for which pred(fields) holds."""
        return wait_for(lambda: next((m for m in self.messages() if pred(m[2])), None),
                        timeout, interval=0.02, what=what)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


@pytest.fixture
def short_dir():
    # AF_UNIX paths are limited to 107 bytes; pytest's tmp_path can be longer.
    d = tempfile.mkdtemp(prefix="rp-sd-")
    yield Path(d)
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def path_socket(tmp_path, short_dir):
    path = tmp_path / "notify"
    if len(str(path)) > 100:
        path = short_dir / "notify"
    s = NotifySocket(str(path))
    yield s
    s.close()


@pytest.fixture
def abstract_socket():
    s = NotifySocket(f"@redpool-test-{uuid.uuid4().hex}")
    yield s
    s.close()


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class FakeLog:
    def __init__(self) -> None:
        self.lines: list[tuple[str, dict]] = []

    def warning(self, event, **kw) -> None:
        self.lines.append((event, kw))


def beat(state="running", **kw) -> dict:
    """Heartbeat fields, as Supervisor.snapshot() gives them."""
    f = dict(state=state, inflight=0, held=0, unacknowledged=0, concurrency=2, children=2,
             redis_down=False, drain_left=None, succeeded=0, failed=0, retrying=0, dead=0,
             crashed=0, timed_out=0, requeued=0)
    f.update(kw)
    return f


# -- the notifier, on real sockets ------------------------------------------------------------

def test_sends_one_datagram_to_a_path_socket(path_socket):
    n = Notifier(path_socket.address)
    assert n.send("READY=1", "STATUS=all good")
    _, pid, fields = path_socket.wait(lambda f: "READY" in f)
    assert fields == {"READY": "1", "STATUS": "all good"}
    assert pid == os.getpid()
    n.close()


def test_sends_to_an_abstract_socket(abstract_socket):
    n = Notifier(abstract_socket.address)
    assert abstract_socket.address.startswith("@")
    assert n.send("WATCHDOG=1")
    assert abstract_socket.wait(lambda f: "WATCHDOG" in f)[2] == {"WATCHDOG": "1"}
    n.close()


def test_a_failing_send_is_logged_once_and_never_raises(short_dir):
    # Given a NOTIFY_SOCKET nobody listens on
    log = FakeLog()
    sub = SystemdNotify(Notifier(str(short_dir / "gone"), log), watchdog=2.0)
    hooks = Hooks()
    hooks.subscribe(sub)
    # When every kind of event is emitted, repeatedly
    for _ in range(3):
        hooks.emit("started", name="w1", queues=["default"], concurrency=2, succeeded=0, failed=0)
        hooks.emit("heartbeat", **beat())
        hooks.emit("draining", signal="SIGTERM", running=1, grace=30)
    # Then nothing raised (a raising subscriber would be logged as hook_failed, not
    # here), and the failure is logged exactly once
    assert sub.notifier.failed
    assert [e for e, _ in log.lines] == ["sd_notify_failed"]
    assert log.lines[0][1]["socket"] == str(short_dir / "gone")
    # And once systemd listens again, messages go through
    back = NotifySocket(str(short_dir / "gone"))
    try:
        hooks.emit("heartbeat", **beat(succeeded=4))
        assert "4 done" in back.wait(lambda f: "STATUS" in f)[2]["STATUS"]
        assert len(log.lines) == 1
    finally:
        back.close()


def test_pings_come_only_from_heartbeats_never_from_a_thread_or_timer(path_socket):
    # The watchdog must prove the loop turns: no heartbeat event, no ping, however long
    threads = threading.active_count()
    sub = SystemdNotify(Notifier(path_socket.address), watchdog=0.5)
    sub("started", dict(name="w1", queues=["q"], concurrency=1))
    path_socket.wait(lambda f: "READY" in f)
    assert threading.active_count() == threads
    time.sleep(1.0)  # twice the watchdog interval without a heartbeat: the wait is the test
    assert len(path_socket.messages()) == 1
    sub("heartbeat", beat())
    path_socket.wait(lambda f: "WATCHDOG" in f and "READY" not in f, what="a ping")
    sub.notifier.close()


# -- from the environment ---------------------------------------------------------------------

class RecordingHooks(Hooks):
    def __init__(self) -> None:
        super().__init__()
        self.subscribed = []

    def subscribe(self, fn):
        self.subscribed.append(fn)
        return super().subscribe(fn)


def test_nothing_happens_without_notify_socket():
    hooks = RecordingHooks()
    env = {"WATCHDOG_USEC": "2000000", "PATH": "/bin"}
    assert notify_systemd(hooks, env) is None
    assert hooks.subscribed == []
    assert env == {"WATCHDOG_USEC": "2000000", "PATH": "/bin"}  # not even that is touched


def test_from_environ_reads_and_unsets_the_variables(path_socket):
    env = {"NOTIFY_SOCKET": path_socket.address, "WATCHDOG_USEC": "3000000",
           "WATCHDOG_PID": str(os.getpid()), "PATH": "/bin"}
    hooks = RecordingHooks()
    sub = notify_systemd(hooks, env)
    assert hooks.subscribed == [sub]
    assert sub.notifier.address == path_socket.address
    assert sub.watchdog == 3.0
    # pool children spawned later must not inherit them
    assert env == {"PATH": "/bin"}


def test_a_watchdog_meant_for_another_process_is_ignored(path_socket):
    env = {"NOTIFY_SOCKET": path_socket.address, "WATCHDOG_USEC": "3000000",
           "WATCHDOG_PID": str(os.getpid() + 1)}
    sub = SystemdNotify.from_environ(env, unset=False)
    assert sub is not None and sub.watchdog is None
    assert "NOTIFY_SOCKET" in env  # unset=False leaves them
    for usec in ("0", "-5", "soon"):
        env = {"NOTIFY_SOCKET": path_socket.address, "WATCHDOG_USEC": usec}
        assert SystemdNotify.from_environ(env, log=FakeLog()).watchdog is None


def test_an_unsupported_socket_address_is_refused_with_a_warning():
    log = FakeLog()
    assert SystemdNotify.from_environ({"NOTIFY_SOCKET": "vsock:2:999"}, log=log) is None
    assert [e for e, _ in log.lines] == ["sd_notify_unsupported"]


# -- what is said, and when (a fake clock) ------------------------------------------------------

class Sent:
    """A Notifier stand-in that keeps what would have been sent, with the time."""

    def __init__(self, clock) -> None:
        self.clock = clock
        self.sent: list[tuple[float, dict[str, str]]] = []
        self.lose = 0          # how many of the next datagrams are lost (send fails)

    def send(self, *lines: str) -> bool:
        if self.lose:
            self.lose -= 1
            return False
        self.sent.append((self.clock(), dict(line.split("=", 1) for line in lines)))
        return True

    def close(self) -> None:
        pass

    def with_key(self, key: str) -> list[tuple[float, dict]]:
        return [(t, f) for t, f in self.sent if key in f]


def notifier(watchdog=None):
    clock = Clock()
    sent = Sent(clock)
    return SystemdNotify(sent, watchdog=watchdog, pid=4242, clock=clock), sent, clock


def run_heartbeats(sub, clock, seconds: float, every: float = 1.0, **kw) -> None:
    end = clock.t + seconds
    while clock.t + every <= end + 1e-9:
        clock.t += every
        sub("heartbeat", beat(**kw))


def test_started_says_ready_with_the_main_pid_and_a_status():
    sub, sent, _ = notifier(watchdog=2.0)
    sub("started", dict(name="w1", queues=["high", "default"], concurrency=4, succeeded=0,
                        failed=0, pid=4242))
    (_, msg), = sent.sent
    assert msg["READY"] == "1" and msg["MAINPID"] == "4242" and msg["WATCHDOG"] == "1"
    assert msg["STATUS"] == "ready: 4 processes on queues high, default as w1"


@pytest.mark.parametrize("watchdog, every", [(2.0, 1.0), (2.0, 0.999), (2.0, 1.05),
                                             (10.0, 1.0), (30.0, 1.0)])
def test_watchdog_pings_come_well_inside_the_interval_and_not_more_than_needed(watchdog, every):
    # Given heartbeats every ~second (a little early or late: timer jitter)
    sub, sent, clock = notifier(watchdog=watchdog)
    sub("started", dict(name="w1", queues=["q"], concurrency=1))
    run_heartbeats(sub, clock, 120, every=every)
    pings = [t for t, _ in sent.with_key("WATCHDOG")]
    gaps = [b - a for a, b in zip(pings, pings[1:])]
    # Then systemd always hears from us within its interval: at the first heartbeat
    # after half of it
    assert max(gaps) < watchdog
    assert max(gaps) <= watchdog / 2 + every + 1e-6
    # and not more often than that (or than the heartbeat)
    assert min(gaps) >= min(watchdog / 2 - PING_SLACK, every) - 1e-6
    assert all(f["WATCHDOG"] == "1" for _, f in sent.with_key("WATCHDOG"))


def test_a_lost_ping_is_sent_again_at_the_next_heartbeat_not_an_interval_later():
    sub, sent, clock = notifier(watchdog=30.0)
    run_heartbeats(sub, clock, 3.0)
    (last, _), = sent.with_key("WATCHDOG")
    clock.t = last + sub.ping_every - 0.5
    sent.lose = 1                          # the datagram that carries the due ping is lost
    run_heartbeats(sub, clock, 1.0)
    assert len(sent.with_key("WATCHDOG")) == 1
    run_heartbeats(sub, clock, 1.0)        # so the next heartbeat carries it
    (_, _), (again, _) = sent.with_key("WATCHDOG")
    assert again - last <= sub.ping_every + 2.0   # one heartbeat after the lost one


def test_no_watchdog_no_pings():
    sub, sent, clock = notifier(watchdog=None)
    sub("started", dict(name="w1", queues=["q"], concurrency=1))
    run_heartbeats(sub, clock, 10)
    assert sent.with_key("WATCHDOG") == []
    assert len(sent.with_key("STATUS")) == 11  # started + 10 heartbeats


def test_status_counts_jobs_and_a_rate_over_the_recent_window():
    sub, sent, clock = notifier()
    sub("started", dict(name="w1", queues=["q"], concurrency=2))
    # 20 jobs answered per second for 15 s, 2 of them each second failing
    for i in range(1, 16):
        clock.t += 1
        sub("heartbeat", beat(inflight=2, succeeded=18 * i, failed=2 * i))
    status = sent.sent[-1][1]["STATUS"]
    assert status == "2 in flight on 2/2 processes; 300 done (30 failed); 20.0 jobs/s"
    # Then nothing for 11 s: the rate falls to 0 once the window has passed
    for _ in range(11):
        clock.t += 1
        sub("heartbeat", beat(succeeded=270, failed=30))
    assert sent.sent[-1][1]["STATUS"].endswith("300 done (30 failed); 0.0 jobs/s")
    # Retries count as work done per second, not as jobs done
    clock.t += 1
    sub("heartbeat", beat(succeeded=270, failed=30, retrying=10))
    assert "300 done" in sent.sent[-1][1]["STATUS"] and "jobs/s" in sent.sent[-1][1]["STATUS"]


def test_status_says_when_redis_is_unreachable():
    sub, sent, clock = notifier()
    clock.t += 1
    sub("heartbeat", beat(redis_down=True, inflight=1, succeeded=5))
    assert sent.sent[-1][1]["STATUS"].startswith("Redis unreachable, retrying; 1 in flight")
    clock.t += 1
    sub("heartbeat", beat(redis_down=False, inflight=1, succeeded=5))
    assert "Redis" not in sent.sent[-1][1]["STATUS"]


def test_draining_says_stopping_and_keeps_the_stop_timeout_beyond_the_grace():
    sub, sent, clock = notifier(watchdog=2.0)
    sub("started", dict(name="w1", queues=["q"], concurrency=2))
    sub("draining", dict(signal="SIGTERM", running=1, grace=30))
    msg = sent.sent[-1][1]
    assert msg["STOPPING"] == "1"
    assert msg["STATUS"] == "draining (SIGTERM): 1 running, up to 30 s of grace"
    assert int(msg["EXTEND_TIMEOUT_USEC"]) == (30 + STOP_MARGIN) * 1_000_000
    # Every heartbeat of the drain pushes systemd's deadline past the grace left
    for left in (29.0, 28.0, 12.5, 0.4):
        clock.t += 1
        sub("heartbeat", beat(state="draining", inflight=1, drain_left=left))
        msg = sent.sent[-1][1]
        assert int(msg["EXTEND_TIMEOUT_USEC"]) == int((left + STOP_MARGIN) * 1_000_000)
        assert msg["STATUS"].startswith(f"draining: 1 running, {left:.0f} s of grace left")
        assert msg["WATCHDOG"] == "1"
    sub("grace_expired", dict(running=1))
    assert int(sent.sent[-1][1]["EXTEND_TIMEOUT_USEC"]) == STOP_MARGIN * 1_000_000
    assert "grace expired" in sent.sent[-1][1]["STATUS"]
    sub("stopped", dict(uptime=61.2, succeeded=7, failed=1, requeued=1))
    assert sent.sent[-1][1] == {"STATUS": "stopped after 61 s: 8 done (1 failed), 1 put back"}


def test_running_heartbeats_do_not_extend_the_timeout_and_other_events_say_nothing():
    sub, sent, clock = notifier()
    clock.t += 1
    sub("heartbeat", beat())
    sub("job_finished", dict(id="x", status="succeeded"))
    sub("child_died", dict(pid=1))
    assert len(sent.sent) == 1 and "EXTEND_TIMEOUT_USEC" not in sent.sent[0][1]


def test_a_reload_is_told_with_systemds_reload_protocol():
    import time as _time
    sub, sent, _ = notifier()
    before = _time.monotonic()
    sub("reloading", dict(generation=1, children=2))
    sub("reloaded", dict(generation=1))
    sub("reloading", dict(generation=2, children=2))
    sub("reload_failed", dict(generation=2, message="SyntaxError", pid=7))
    msgs = [m for _, m in sent.sent]
    assert [("RELOADING" in m, "READY" in m) for m in msgs] == [(True, False), (False, True),
                                                                 (True, False), (False, True)]
    assert before * 1e6 <= int(msgs[0]["MONOTONIC_USEC"]) <= _time.monotonic() * 1e6
    assert msgs[1]["STATUS"] == "reloaded: generation 1 serves"
    assert "reload failed" in msgs[3]["STATUS"]


# -- the real daemon, with this test as systemd -----------------------------------------------

def sd_env(sock: NotifySocket) -> dict:
    return {"NOTIFY_SOCKET": sock.address, "WATCHDOG_USEC": str(WATCHDOG_USEC)}


def index_of(msgs, pred, start=0) -> int:
    return next(i for i, m in enumerate(msgs) if i >= start and pred(m[2]))


@pytest.mark.daemon
def test_the_daemon_tells_systemd_ready_status_watchdog_and_stopping(r, keys, daemons,
                                                                      path_socket):
    # Given a worker under "systemd" whose task modules take 1.5 s to import
    t0 = time.monotonic()
    d = daemons("--concurrency", "2", "--grace", "30", env=sd_env(path_socket),
                modules=("tests.taskmods.jobs", "tests.taskmods.slow_import"),
                ledger=f"{keys.ns}:ledger")
    # Then READY=1 comes first, once the children have imported their modules
    t_ready, pid, ready = path_socket.wait(lambda f: "READY" in f, 60, "READY=1")
    msgs = path_socket.messages()
    assert "READY" in msgs[0][2], msgs[:3]
    assert t_ready - t0 >= 1.5, "READY=1 before the pool children booted"
    assert ready["MAINPID"] == str(d.pid) and pid == d.pid
    assert ready["STATUS"] == "ready: 2 processes on queue default as w1"
    assert any(e.get("event") == "started" for e in d.events())
    # (and the pool children did not inherit the socket: task code cannot speak for us)
    for child in d.children():
        environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        assert not any(v.startswith((b"NOTIFY_SOCKET=", b"WATCHDOG_USEC=")) for v in environ)
    assert len(d.children()) == 2
    # When jobs come in
    lpush_jobs(r, keys, [{"task": "t.add", "id": f"j{i}", "args": [i, i]} for i in range(5)])
    wait_for(lambda: all(envelope(r, keys, f"j{i}") for i in range(5)), 30, what="results")
    # Then the status line counts them
    path_socket.wait(lambda f: "5 done (0 failed)" in f.get("STATUS", ""), 15, "a status of 5 done")
    # And the watchdog is fed regularly: about every heartbeat for a 2 s watchdog
    wait_for(lambda: len([m for m in path_socket.messages() if "WATCHDOG" in m[2]]) >= 5, 30,
             what="5 watchdog pings")
    pings = [t for t, _, f in path_socket.messages() if "WATCHDOG" in f]
    gaps = [b - a for a, b in zip(pings, pings[1:])]
    # (a shared, noisy machine: 1 s of tolerance over the 2 s systemd would allow)
    assert max(gaps) < WATCHDOG_USEC / 1e6 + 1.0, gaps

    # Given a long job running
    r.lpush(keys.queue("default"), '{"task": "t.sleep", "id": "slow", "args": [4, "done"]}')
    wait_for(lambda: any(x.startswith(b"slow:start") for x in r.lrange(f"{keys.ns}:ledger", 0, -1)),
             30, what="the slow job to start")
    # When systemd stops the service (KillMode=mixed: SIGTERM to the main process only)
    n_before = len(path_socket.messages())
    t_term = time.monotonic()
    d.signal(signal.SIGTERM)
    assert d.wait(60) == 0, d.log()
    t_exit = time.monotonic()
    msgs = path_socket.messages()
    assert all(pid == d.pid for _, pid, _ in msgs), "a message not from the main process"
    # Then STOPPING=1 comes first, with a stop timeout beyond the grace
    stopping = index_of(msgs, lambda f: "STOPPING" in f, n_before)
    assert "EXTEND_TIMEOUT_USEC" in msgs[stopping][2]
    assert all("STOPPING" not in f and "EXTEND_TIMEOUT_USEC" not in f
               for _, _, f in msgs[:stopping])
    # And every second of the drain extends systemd's stop timeout, each extension
    # arriving before the previous one ran out, the last one reaching past our exit
    extends = [(t, int(f["EXTEND_TIMEOUT_USEC"]) / 1e6) for t, _, f in msgs[stopping:]
               if "EXTEND_TIMEOUT_USEC" in f]
    assert len(extends) >= 3, msgs[stopping:]
    for (t1, v1), (t2, _) in zip(extends, extends[1:]):
        assert t2 < t1 + v1
    assert extends[-1][0] + extends[-1][1] > t_exit
    assert extends[0][0] + extends[0][1] >= t_term + 30
    draining = [f["STATUS"] for _, _, f in msgs[stopping + 1:] if "EXTEND_TIMEOUT_USEC" in f]
    assert all(s.startswith("draining: 1 running, ") for s in draining), draining
    # And the last word is the final status; the running job finished within the grace
    assert msgs[-1][2]["STATUS"].startswith("stopped after "), msgs[-1]
    assert "6 done (0 failed)" in msgs[-1][2]["STATUS"]
    assert envelope(r, keys, "slow")["result"] == "done"


@pytest.mark.daemon
def test_a_wedged_loop_stops_feeding_the_watchdog(daemons, abstract_socket):
    # Given a worker under "systemd" with a 2 s watchdog, on an abstract socket
    d = daemons("--concurrency", "1", env=sd_env(abstract_socket))
    abstract_socket.wait(lambda f: "READY" in f, 60, "READY=1")
    wait_for(lambda: len([m for m in abstract_socket.messages() if "WATCHDOG" in m[2]]) >= 3,
             30, what="watchdog pings")
    # When its loop is wedged for twice the watchdog interval (SIGSTOP: the children
    # run on, as they would behind a stuck loop; the wait is the point of the test)
    d.signal(signal.SIGSTOP)
    t_stop = time.monotonic()
    try:
        time.sleep(2 * WATCHDOG_USEC / 1e6 + 1)
    finally:
        t_cont = time.monotonic()
        d.signal(signal.SIGCONT)
    # Then no ping arrived meanwhile (systemd would have killed it and restarted it);
    # a datagram sent just before the stop may be read a little later
    during = [t for t, _, f in abstract_socket.messages()
              if "WATCHDOG" in f and t_stop + 0.5 < t < t_cont]
    assert during == []
    # And once the loop turns again, so does the watchdog
    wait_for(lambda: [t for t, _, f in abstract_socket.messages() if "WATCHDOG" in f and t > t_cont],
             15, what="a watchdog ping after SIGCONT")
    d.signal(signal.SIGTERM)
    assert d.wait(60) == 0, d.log()


# -- the unit file ----------------------------------------------------------------------------

def unit_settings(text: str) -> dict[str, list[str]]:
    """Every Key=value of the unit, all values of a repeated key in order."""
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")) and "=" in line:
            k, v = line.split("=", 1)
            out.setdefault(k.strip(), []).append(v.strip())
    return out


def test_the_unit_is_a_notify_service_with_a_watchdog_and_a_graceful_stop():
    s = unit_settings(UNIT.read_text())
    one = {k: v[-1] for k, v in s.items()}
    assert one["Type"] == "notify" and one["NotifyAccess"] == "main"
    assert int(one["WatchdogSec"]) >= 10
    assert one["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert one["KillMode"] == "mixed" and one["KillSignal"] == "SIGTERM"
    from redpool.config import WorkerConfig
    assert int(one["TimeoutStopSec"]) > WorkerConfig().grace
    assert one["Restart"] == "on-failure"
    assert one["User"] and one["User"] != "root"
    assert one["EnvironmentFile"] == "/etc/redpool/%i.env"
    assert one["OOMPolicy"] == "continue"
    assert set(one["RestrictAddressFamilies"].split()) == {"AF_UNIX", "AF_INET", "AF_INET6"}
    for key in ("NoNewPrivileges", "ProtectHome", "PrivateTmp", "PrivateDevices",
                "ProtectKernelTunables", "ProtectKernelModules", "ProtectControlGroups",
                "RestrictNamespaces", "LockPersonality", "RestrictRealtime"):
        assert one[key] == "yes", key
    assert one["ProtectSystem"] == "strict" and one["SystemCallArchitectures"] == "native"
    assert "MemoryDenyWriteExecute" not in s  # task code may JIT: see the unit's comment
    # no shell in between: the supervisor is the main process (NotifyAccess=main)
    assert one["ExecStart"].split()[:2] == ["/srv/%i/.venv/bin/redpool", "worker"]


TOLERATED = (
    # the unit names a dedicated user that this machine does not have
    re.compile(r"(user|group).*(does not exist|not found|No such process)", re.I),
    re.compile(r"Failed to resolve (user|group)", re.I),
)


def verify(unit_dir: Path, unit_text: str, name: str = "redpool@.service") -> tuple[int, list[str]]:
    """systemd-analyze verify on a copy whose ExecStart is a binary that exists here."""
    exe = Path(sys.executable).parent / "redpool"
    assert exe.exists(), exe
    text = unit_text.replace("ExecStart=/srv/%i/.venv/bin/redpool", f"ExecStart={exe}")
    assert text != unit_text, "the unit's ExecStart changed: update this test"
    path = unit_dir / name
    path.write_text(text)
    out = subprocess.run(["systemd-analyze", "verify", "--man=no", str(path)],
                         capture_output=True, text=True, timeout=60)
    lines = [ln for ln in (out.stdout + out.stderr).splitlines() if ln.strip()]
    return out.returncode, [ln for ln in lines if not any(t.search(ln) for t in TOLERATED)]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze is not installed (apt install systemd)")
def test_systemd_analyze_verifies_the_unit(tmp_path):
    text = UNIT.read_text()
    rc, complaints = verify(tmp_path, text)
    assert complaints == [] and rc == 0, complaints
    # The check is real: the same unit with a misspelt key and a bad value is refused
    (tmp_path / "bad").mkdir()
    bad = text.replace("WatchdogSec=", "WatchdogSecs=").replace("KillMode=mixed", "KillMode=some")
    rc, complaints = verify(tmp_path / "bad", bad)
    assert any("WatchdogSecs" in c for c in complaints), complaints
    assert any(re.search(r"kill ?mode", c, re.I) for c in complaints), complaints


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze is not installed (apt install systemd)")
def test_the_unit_is_hardened(tmp_path):
    # systemd's own exposure score, 0 (locked down) to 10 (everything allowed); a
    # service with network access and no hardening scores about 9.
    exe = Path(sys.executable).parent / "redpool"
    path = tmp_path / "redpool@.service"
    path.write_text(UNIT.read_text().replace("ExecStart=/srv/%i/.venv/bin/redpool",
                                             f"ExecStart={exe}"))
    out = subprocess.run(["systemd-analyze", "security", "--offline=true", str(path)],
                         capture_output=True, text=True, timeout=60)
    if "--offline" in out.stderr and "unrecognized" in out.stderr:
        pytest.skip("this systemd-analyze cannot review unit files offline (systemd < 250)")
    score = re.search(r"Overall exposure level for \S+: ([\d.]+)", out.stdout)
    assert score, out.stdout + out.stderr
    assert out.returncode == 0 and float(score.group(1)) <= 3.0, out.stdout


# -- the environment file ---------------------------------------------------------------------

def test_the_example_environment_file_names_every_setting_with_a_valid_value():
    from redpool import config

    text = (ROOT / "deploy" / "redpool.env").read_text()
    assigned, commented = {}, {}
    for line in text.splitlines():
        if m := re.fullmatch(r"(REDPOOL_[A-Z_]+)=(.*)", line):
            assigned[m.group(1)] = m.group(2)
        elif m := re.fullmatch(r"# (REDPOOL_[A-Z_]+)=(.*)", line):
            commented[m.group(1)] = m.group(2)
        elif line and not line.startswith("#"):
            raise AssertionError(f"not NAME=value nor a comment: {line!r}")
    known = {s.env for s in config.SETTINGS} | {"REDPOOL_MODULES"}
    every = {**assigned, **commented}
    assert set(every) == known, (f"missing: {sorted(known - set(every))}, "
                                 f"unknown: {sorted(set(every) - known)}")
    # Uncommented, every example value is accepted (systemd keeps a trailing "# ..."
    # as part of the value, so none may have one)
    assert not any("#" in v for v in every.values())
    parser = argparse.ArgumentParser()
    config.add_worker_arguments(parser)
    # (the URL's file is an alternative to REDPOOL_REDIS_URL, refused together with it)
    assert "REDPOOL_REDIS_URL_FILE" in commented and "REDPOOL_REDIS_URL" in assigned
    every.pop("REDPOOL_REDIS_URL_FILE")
    cfg = config.resolve(parser.parse_args([]), env=every)
    assert cfg.modules == ["myapp.tasks"] and cfg.queues == ["high", "default"]
