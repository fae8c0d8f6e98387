"""Run a command with its stderr on a real pseudo-terminal (Python's pty module), as a
person at a terminal would, and keep what it drew there."""

from __future__ import annotations

import fcntl
import os
import pty
import struct
import subprocess
import termios
import threading


def on_a_terminal(cmd: list[str], *, env: dict, cwd, input: str | None = None,
                  timeout: float = 120) -> tuple[int, str, str]:
    """(exit code, stdout, what stderr drew on the terminal).  stdout stays a pipe, so
    a command that prints its results there and progress on stderr shows both."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))
    drawn: list[bytes] = []

    def read() -> None:
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: every holder of the terminal's other end is gone
                return
            if not chunk:
                return
            drawn.append(chunk)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=slave,
                                stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
                                text=True, start_new_session=True)
        os.close(slave)
        slave = -1
        out, _ = proc.communicate(input, timeout=timeout)
        reader.join(10)
    finally:
        if slave != -1:
            os.close(slave)
        os.close(master)
    return proc.returncode, out, b"".join(drawn).decode("utf-8", "replace")
