"""Processes the suite starts, and what /proc says about them (Linux).

Every process is started in its own session, so a Ctrl-C at the terminal reaches only
the suite, which then stops them itself (`Managed.stop`: SIGTERM, then SIGKILL of the
whole process group).  Each also gets PR_SET_PDEATHSIG, so even a `kill -9` of the
suite does not leave them behind.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _die_with_parent() -> None:
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class Managed:
    """One subprocess, run from the repository root, its output in a temporary file."""

    def __init__(self, name: str, cmd: list[str]) -> None:
        self.name = name
        self.cmd = cmd
        fd, self.log_path = tempfile.mkstemp(prefix=f"bench-{name}-", suffix=".log")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env.pop("REDPOOL_REDIS_URL", None)
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=fd, stderr=fd,
                                     stdin=subprocess.DEVNULL, start_new_session=True,
                                     preexec_fn=_die_with_parent)
        os.close(fd)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def check_alive(self) -> None:
        if not self.alive():
            raise RuntimeError(f"{self.name} exited with code {self.proc.returncode}:\n"
                               f"{self.log_tail()}")

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return Path(self.log_path).read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM, wait; then SIGKILL the process group (its children too)."""
        if self.alive():
            try:
                os.kill(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # its session: leftovers only
        except (ProcessLookupError, PermissionError):
            pass
        if self.alive():
            self.proc.wait(10)
        return self.proc.returncode

    def cleanup(self) -> None:
        try:
            os.unlink(self.log_path)
        except OSError:
            pass


def python_module(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


# -- /proc ---------------------------------------------------------------------------------------

def cpu_seconds(pid: int) -> float:
    """utime + stime of one process (all its threads, none of its children)."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def vm_hwm(pid: int) -> int | None:
    """Peak resident set size (VmHWM) in bytes, or None once the process is gone."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    return None


def _ppids() -> dict[int, int]:
    """pid -> parent pid, for every process."""
    out = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/stat", "rb") as f:
                    out[int(entry.name)] = int(f.read().rsplit(b")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                pass
    return out


def tree_cpu_seconds(root: int) -> float:
    """CPU seconds of ``root`` and all its descendants (those alive now)."""
    kids: dict[int, list[int]] = {}
    for pid, ppid in _ppids().items():
        kids.setdefault(ppid, []).append(pid)
    total, todo = 0.0, [root]
    while todo:
        pid = todo.pop()
        try:
            total += cpu_seconds(pid)
        except (OSError, ValueError, IndexError):
            continue
        todo += kids.get(pid, [])
    return total


def machine_busy_seconds() -> float:
    """CPU seconds all CPUs spent on anything but idling, since boot (/proc/stat)."""
    with open("/proc/stat", "rb") as f:
        user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, f.readline().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / CLOCK_TICKS


class CpuWatch:
    """How busy the rest of the machine was while we measured: CPU spent by everything
    (other tenants, hypervisor steal, the kernel) except this process and its descendants,
    in cores.  Started on creation."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.busy0, self.ours0 = machine_busy_seconds(), tree_cpu_seconds(os.getpid())

    def foreign_cores(self) -> float:
        wall = time.perf_counter() - self.t0
        busy = machine_busy_seconds() - self.busy0
        ours = tree_cpu_seconds(os.getpid()) - self.ours0
        return max(0.0, busy - ours) / wall


def children(pid: int) -> list[int]:
    """Pids whose parent is ``pid``, but for multiprocessing's resource tracker."""
    return [c for c, ppid in _ppids().items() if ppid == pid and not _is_resource_tracker(c)]


def _is_resource_tracker(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"resource_tracker" in f.read()
    except OSError:
        return False


class MemorySampler:
    """Keeps the highest VmHWM seen of a process and of each of its children, sampled
    every ``interval`` seconds (children may be replaced; VmHWM dies with them)."""

    def __init__(self, pid: int, interval: float = 0.5) -> None:
        self.pid = pid
        self.interval = interval
        self.parent_peak = 0
        self.child_peaks: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"hwm-{pid}")
        self._thread.start()

    def sample(self) -> None:
        self.parent_peak = max(self.parent_peak, vm_hwm(self.pid) or 0)
        for c in children(self.pid):
            hwm = vm_hwm(c)
            if hwm:
                self.child_peaks[c] = max(self.child_peaks.get(c, 0), hwm)

    @property
    def child_peak(self) -> int:
        return max(self.child_peaks.values(), default=0)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def stop(self) -> None:
        """One last sample (call it while the process still runs), then stop."""
        self._stop.set()
        self._thread.join()
        self.sample()


def wait_until(cond, timeout: float, what: str, interval: float = 0.01, check=None):
    """Return cond()'s first truthy value; ``check()`` may raise (a process died)."""
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if check is not None:
            check()
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)
