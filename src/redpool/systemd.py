"""systemd integration: readiness, status, watchdog and stop timeout, via sd_notify(3).

The protocol is one datagram of ``NAME=value`` lines sent to the AF_UNIX socket named
by ``$NOTIFY_SOCKET`` (a path, or ``@name`` in the abstract namespace), so it is spoken
here directly rather than through libsystemd or a package.  Without ``$NOTIFY_SOCKET``
nothing of this module runs at all: ``notify_systemd`` subscribes nothing.

It is a Hooks subscriber, like the log: the loop emits what happens and never
mentions systemd.

* ``started`` (every child booted)  -> ``READY=1``, ``MAINPID=``, ``STATUS=``
* ``heartbeat`` (every second)      -> ``STATUS=`` (in flight, done, failed, jobs/s,
  Redis reachable or not); ``WATCHDOG=1`` when systemd asked for a watchdog;
  while draining, ``EXTEND_TIMEOUT_USEC=`` the grace left plus STOP_MARGIN
* ``draining``                      -> ``STOPPING=1``, ``STATUS=``, ``EXTEND_TIMEOUT_USEC=``
* ``grace_expired``, ``stop_now``   -> ``STATUS=``, ``EXTEND_TIMEOUT_USEC=`` STOP_MARGIN
* ``stopped``                       -> a last ``STATUS=``

Why the watchdog is fed from the heartbeat and never from a thread of its own: the
heartbeat is emitted by the loop itself, so a loop stuck anywhere (a wedged Redis
call, a deadlock, an endless tick) stops the pings and systemd restarts the service.
A thread would keep pinging for a dead loop, and the watchdog would prove nothing.

A notification must never hurt the daemon: the socket is non-blocking (a busy
service manager costs a lost status line, not a stalled loop), and a failed send is
logged once and otherwise ignored.
"""

from __future__ import annotations

import os
import socket
import time
from collections import deque
from typing import Any, MutableMapping

from . import logs
from .hooks import Hooks

ENV_SOCKET, ENV_WATCHDOG_USEC, ENV_WATCHDOG_PID = "NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"
RATE_WINDOW = 10.0     # seconds of heartbeats the jobs/s figure is computed over
# What a stop may take after the grace: the children get SIGTERM then SIGKILL (2 s), the
# pool closes (2 s), then the shutdown's Redis calls (a 5 s socket timeout each, when
# Redis is gone).  systemd's stop timeout is kept that far beyond the grace left.
STOP_MARGIN = 15.0
# Heartbeats come every second (duties.HEARTBEAT_EVERY), not to the microsecond: a
# ping is due a little before half the watchdog interval has passed, so that timer
# jitter never turns "every heartbeat" into "every other heartbeat".
PING_SLACK = 0.25


def socket_address(value: str) -> str:
    """The address to send to: ``@name`` is ``name`` in the abstract namespace."""
    if value.startswith("@"):
        return "\0" + value[1:]
    return value


class Notifier:
    """Sends sd_notify messages to one socket.  Never raises; logs the first failure."""

    def __init__(self, address: str, log=None) -> None:
        self.address = address
        self._target = socket_address(address)
        self._sock: socket.socket | None = None
        self._log = log or logs.get("redpool.systemd")
        self.failed = False    # a send failed (logged once)

    def send(self, *assignments: str) -> bool:
        """Send ``NAME=value`` lines as one datagram.  True if it was sent."""
        data = ("\n".join(assignments) + "\n").encode("utf-8", "replace")
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                self._sock.setblocking(False)
            self._sock.sendto(data, self._target)
            return True
        except OSError as e:
            if not self.failed:
                self.failed = True
                self._log.warning("sd_notify_failed", socket=self.address, error=str(e),
                                  note="systemd may miss readiness, status or watchdog "
                                       "messages; the daemon carries on (logged once)")
            return False

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _status(text: str) -> str:
    return "STATUS=" + " ".join(text.split("\n"))


def _usec(seconds: float) -> int:
    return max(0, int(seconds * 1_000_000))


def _answered(f: dict) -> int:
    """Attempts that ended with an answer: every job run once, every retry once more."""
    return f.get("succeeded", 0) + f.get("failed", 0) + f.get("retrying", 0)


class SystemdNotify:
    """The Hooks subscriber: turns supervisor events into sd_notify messages.

    ``watchdog`` is systemd's watchdog interval in seconds (None: no watchdog);
    ``clock`` is injectable for tests, like the loop's."""

    def __init__(self, notifier: Notifier, *, watchdog: float | None = None,
                 pid: int | None = None, clock=time.monotonic) -> None:
        self.notifier = notifier
        self.watchdog = watchdog
        self.ping_every = max(0.0, watchdog / 2 - PING_SLACK) if watchdog else None
        self.pid = os.getpid() if pid is None else pid
        self.clock = clock
        self.last_ping = float("-inf")
        self._samples: deque[tuple[float, int]] = deque()   # (time, jobs answered)
        self._handlers = {"started": self.started, "heartbeat": self.heartbeat,
                          "draining": self.draining, "grace_expired": self.grace_expired,
                          "stop_now": self.stop_now, "stopped": self.stopped,
                          "reloading": self.reloading, "reloaded": self.reloaded,
                          "reload_failed": self.reload_failed}

    @classmethod
    def from_environ(cls, environ: MutableMapping[str, str] | None = None, *,
                     unset: bool = True, log=None) -> SystemdNotify | None:
        """A notifier for the socket systemd gave us, or None outside systemd.

        With ``unset`` (sd_notify's unset_environment) the variables are removed from
        ``environ``: pool children spawned later do not inherit them, so task code
        cannot talk to systemd in our name (NotifyAccess=main would refuse it anyway,
        with a warning in the journal for every message)."""
        env = os.environ if environ is None else environ
        address = env.get(ENV_SOCKET, "")
        if not address:
            return None  # not under systemd: touch nothing
        log = log or logs.get("redpool.systemd")
        usec, wpid = env.get(ENV_WATCHDOG_USEC, ""), env.get(ENV_WATCHDOG_PID, "")
        if unset:
            for name in (ENV_SOCKET, ENV_WATCHDOG_USEC, ENV_WATCHDOG_PID):
                env.pop(name, None)
        if not address.startswith(("/", "@")):
            log.warning("sd_notify_unsupported", socket=address,
                        note="NOTIFY_SOCKET must be an absolute path or @abstract name; "
                             "systemd will not hear from this process")
            return None
        watchdog = None
        if usec:
            try:
                watchdog = int(usec) / 1_000_000 if int(usec) > 0 else None
            except ValueError:
                log.warning("watchdog_ignored", watchdog_usec=usec, note="not a number")
        if watchdog and wpid and wpid != str(os.getpid()):
            watchdog = None  # the watchdog is some other process's business
        return cls(Notifier(address, log), watchdog=watchdog)

    # -- the subscriber --------------------------------------------------------------------

    def __call__(self, event: str, fields: dict[str, Any]) -> None:
        handler = self._handlers.get(event)
        if handler is not None:
            handler(fields)

    def started(self, f: dict) -> None:
        now = self.clock()
        self._samples.append((now, _answered(f)))
        queues = f.get("queues") or []
        lines = ["READY=1", f"MAINPID={self.pid}",
                 _status(f"ready: {f.get('concurrency')} processes on "
                         f"{'queue' if len(queues) == 1 else 'queues'} {', '.join(queues)} "
                         f"as {f.get('name')}")]
        self._send_with_ping(now, lines)

    def heartbeat(self, f: dict) -> None:
        now = self.clock()
        lines = [_status(self.summary(f, self.rate(now, f)))]
        if f.get("state") == "draining" and f.get("drain_left") is not None:
            lines.append(f"EXTEND_TIMEOUT_USEC={_usec(f['drain_left'] + STOP_MARGIN)}")
        self._send_with_ping(now, lines)

    def draining(self, f: dict) -> None:
        self.notifier.send(
            "STOPPING=1",
            _status(f"draining ({f.get('signal')}): {f.get('running', 0)} running, up to "
                    f"{f.get('grace', 0):g} s of grace"),
            f"EXTEND_TIMEOUT_USEC={_usec(f.get('grace', 0) + STOP_MARGIN)}")

    def grace_expired(self, f: dict) -> None:
        self.notifier.send(_status(f"grace expired: stopping {f.get('running', 0)} running "
                                   "jobs; they go back to their queues"),
                           f"EXTEND_TIMEOUT_USEC={_usec(STOP_MARGIN)}")

    def stop_now(self, f: dict) -> None:
        self.notifier.send(_status(f"stopping now (second {f.get('signal')}): running jobs "
                                   "go back to their queues"),
                           f"EXTEND_TIMEOUT_USEC={_usec(STOP_MARGIN)}")

    # A reload (SIGHUP, ExecReload=) is told as systemd's reload protocol has it:
    # RELOADING=1 with the monotonic time it began, then READY=1 once the new children
    # have taken over (or the reload was given up and the old ones serve on).
    def reloading(self, f: dict) -> None:
        self.notifier.send("RELOADING=1", f"MONOTONIC_USEC={_usec(time.monotonic())}",
                           _status(f"reloading: generation {f.get('generation')} of the "
                                   "pool is booting"))

    def reloaded(self, f: dict) -> None:
        self.notifier.send("READY=1", _status(f"reloaded: generation {f.get('generation')} "
                                              "serves"))

    def reload_failed(self, f: dict) -> None:
        self.notifier.send("READY=1", _status("reload failed (the new code does not import); "
                                              "the previous processes serve on"))

    def stopped(self, f: dict) -> None:
        self.notifier.send(_status(
            f"stopped after {f.get('uptime', 0):.0f} s: {f.get('succeeded', 0) + f.get('failed', 0)}"
            f" done ({f.get('failed', 0)} failed), {f.get('requeued', 0)} put back"))
        self.notifier.close()

    # -- what it says ------------------------------------------------------------------------

    def _send_with_ping(self, now: float, lines: list[str]) -> None:
        """Send ``lines``, with ``WATCHDOG=1`` when a ping is due (at most every half
        interval, less slack).  A ping counts only once sent: one lost datagram must
        not leave a whole interval without a ping, which gets a healthy daemon killed."""
        due = self.ping_every is not None and now - self.last_ping >= self.ping_every
        if self.notifier.send(*lines, *(["WATCHDOG=1"] if due else [])) and due:
            self.last_ping = now

    def rate(self, now: float, f: dict) -> float | None:
        """Jobs answered per second over the last RATE_WINDOW seconds (None: too soon)."""
        answered = _answered(f)
        self._samples.append((now, answered))
        while len(self._samples) > 1 and self._samples[1][0] <= now - RATE_WINDOW:
            self._samples.popleft()
        t0, n0 = self._samples[0]
        return (answered - n0) / (now - t0) if now > t0 else None

    @staticmethod
    def summary(f: dict, rate: float | None) -> str:
        """One line for ``systemctl status``: what matters first, as the width is short."""
        done = f.get("succeeded", 0) + f.get("failed", 0)
        if f.get("state") == "draining":
            head = (f"draining: {f.get('inflight', 0)} running, "
                    f"{f.get('drain_left') or 0:.0f} s of grace left")
        else:
            head = (f"{f.get('inflight', 0)} in flight on {f.get('children', 0)}/"
                    f"{f.get('concurrency', 0)} processes")
        text = f"{head}; {done} done ({f.get('failed', 0)} failed)"
        if rate is not None:
            text += f"; {rate:.1f} jobs/s"
        if f.get("redis_down"):
            text = "Redis unreachable, retrying; " + text
        return text


def notify_systemd(hooks: Hooks, environ: MutableMapping[str, str] | None = None
                   ) -> SystemdNotify | None:
    """Subscribe a SystemdNotify to ``hooks`` when run under systemd ($NOTIFY_SOCKET);
    otherwise do nothing.  Returns the subscriber, or None."""
    sub = SystemdNotify.from_environ(environ)
    if sub is not None:
        hooks.subscribe(sub)
    return sub
