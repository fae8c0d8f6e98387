"""One error base class and the daemon's named exit codes."""

from __future__ import annotations

# Exit codes of `redpool worker` (documented in docs/reference.md; systemd units and
# Procfile runners see them).
EXIT_OK = 0
EXIT_ERROR = 1          # an unexpected error; the log says what
EXIT_USAGE = 2          # bad command line or environment (argparse uses 2 too)
EXIT_BOOT = 3           # a child could not import the task modules or run its init hook
EXIT_REDIS = 4          # Redis unreachable at start-up, or refused our credentials
EXIT_NAME_IN_USE = 5    # another live supervisor already uses this --name
EXIT_BROKEN_PIPE = 141  # our reader went away (`| head`): 128 + SIGPIPE, as a shell
                        # reports for any writer SIGPIPE stopped (cli.main says why)


class RedpoolError(Exception):
    """Base class of redpool's own errors.  Messages say what was wrong and what to do."""

    exit_code = EXIT_ERROR


class ConfigError(RedpoolError):
    exit_code = EXIT_USAGE


class BootError(RedpoolError):
    """A pool child failed to start: its task modules or init hook raised."""

    exit_code = EXIT_BOOT


class RedisUnavailable(RedpoolError):
    exit_code = EXIT_REDIS


class NameInUse(RedpoolError):
    exit_code = EXIT_NAME_IN_USE


class WrongType(RedpoolError):
    """One of redpool's keys holds another type than redpool keeps there: another
    program wrote to it (``SET redpool:queue:emails x``).  Raised to a producer whose
    push Redis refused with WRONGTYPE; workers report such a key (keytypes.py)."""

    def __init__(self, key: str, found: str | None, expected: str, role: str,
                 consequence: str) -> None:
        self.key, self.found, self.expected = key, found, expected
        holds = f"holds a {found}" if found else "holds another type"
        super().__init__(
            f"{key} {holds} where redpool keeps a {expected} ({role}): another program "
            f"wrote to it ({consequence}).  DEL it, or RENAME it away to keep its data "
            f"(redpool uses it as a {expected}); workers serve it again by themselves")


class JobFailed(RedpoolError):
    """Raised by AsyncResult.get() when the job failed; carries the remote error."""

    def __init__(self, envelope: dict) -> None:
        err = envelope.get("error") or {}
        self.envelope = envelope
        self.job_id = envelope.get("id")
        self.type = err.get("type") or "Error"
        self.message = err.get("message") or ""
        self.traceback = err.get("traceback")
        text = f"{self.type}: {self.message}"
        if self.traceback:
            text += f"\n\nRemote traceback (job {self.job_id}, worker {envelope.get('worker')}):\n{self.traceback}"
        super().__init__(text)

    def __reduce__(self):  # picklable, so it can be re-raised across processes
        return (JobFailed, (self.envelope,))
