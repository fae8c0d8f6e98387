"""What ProcessPool.poll() tells the supervisor: a child answered, gave jobs back, said
its job's own timeout, booted, could not boot, or died (and which jobs it held)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Done:
    token: int
    msg: bytes
    pid: int


@dataclass
class Died:
    tokens: list[int]       # every job it held and had not answered, in order
    pid: int
    exitcode: int | None
    description: str
    running: int | None = None   # the one it was running when it died, if any
    doomed: bool = False         # we killed it (a timeout): no job of it crashed it

    @property
    def token(self) -> int | None:
        return self.running


@dataclass
class BootFailed:
    pid: int
    message: str
    import_error: bool = True   # False: it died (was killed) before it could say why
    generation: int = 0         # of the child (a reload's, or an older one's)


@dataclass
class Ready:
    pid: int
    generation: int = 0


@dataclass
class Returned:
    """A child gave back the jobs it held and had not started (its batch ran long)."""
    pid: int
    tokens: list[int]


@dataclass
class Started:
    """The job's own timeout (its field or task option differs from the default)."""
    token: int
    timeout: float
