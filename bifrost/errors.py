"""One exception tree for bifrost: every failure a user can act on is a ``BifrostError``."""

from __future__ import annotations

# `typing` costs ~5 ms at import; every CLI call imports this module, and mypy treats a
# local TYPE_CHECKING like typing's.
TYPE_CHECKING = False

if TYPE_CHECKING:
    from bifrost.exec import Result


class BifrostError(Exception):
    """Base class of every error bifrost raises on purpose."""


class TargetError(BifrostError, ValueError):
    """A target string could not be parsed (says what was wrong and what would be right)."""


class ConnectError(BifrostError):
    """The SSH connection could not be established (after retries for transient failures)."""

    def __init__(self, message: str, *, attempts: int = 1) -> None:
        super().__init__(message)
        self.attempts = attempts


class AuthError(ConnectError):
    """The server rejected our credentials. Never retried: retrying cannot fix a wrong key."""


class HostKeyChangedError(ConnectError):
    """The host presented a key different from the one pinned on first use. Never retried."""


class ConnectionLostError(BifrostError):
    """An established connection dropped in the middle of an operation."""


class CommandError(BifrostError):
    """A command exited non-zero; ``result`` carries its output and exit code."""

    def __init__(self, result: Result) -> None:
        tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        detail = (": " + " | ".join(tail)) if tail else ""
        super().__init__(
            f"command exited with {result.exit_code} on {result.target}: {result.command!r}{detail}"
        )
        self.result = result


class CommandTimeout(CommandError):
    """A command ran past its timeout; its remote process group was killed."""

    def __init__(self, result: Result, timeout: float) -> None:
        BifrostError.__init__(
            self, f"command timed out after {timeout:g}s on {result.target}: {result.command!r}"
        )
        self.result = result
        self.timeout = timeout


class TransferError(BifrostError):
    """A push, pull or upload failed."""


class JobError(BifrostError):
    """A detached job could not be started or inspected."""


class JobNotFoundError(JobError):
    """No job with this id exists on the target."""


class JobTimeout(JobError, TimeoutError):
    """``Job.wait(timeout)`` gave up while the job was still running (the job keeps running).

    Also a ``TimeoutError``, so ``except TimeoutError`` keeps working."""

    def __init__(self, job_id: str, timeout: float) -> None:
        super().__init__(f"job {job_id} still running after {timeout:g}s (it keeps running)")
        self.job_id = job_id
        self.timeout = timeout
