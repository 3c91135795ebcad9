"""The interface every transport implements: run a shell command with streams, move files."""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

from bifrost.target import Target

#: Receives output chunks. A sink that cannot keep up returns an awaitable: the transport stops
#: reading that stream (the remote command blocks on its pipe) until the awaitable is done.
#: Any other return value (``file.write`` returns a count) is ignored.
OutputSink = Callable[[bytes], Awaitable[None] | None]
Progress = Callable[[int], None]
StdinSource = bytes | AsyncIterator[bytes] | None


class Transport(abc.ABC):
    """One connection to one target. Commands are shell strings run from the user's home."""

    target: Target

    @abc.abstractmethod
    async def run(
        self,
        command: str,
        *,
        stdin: StdinSource = None,
        on_stdout: OutputSink | None = None,
        on_stderr: OutputSink | None = None,
        merge_stderr: bool = False,
    ) -> int:
        """Run ``command`` under the login shell; stream output to the sinks; return the exit code
        (128+N for a signal). Raises ``ConnectionLostError`` if the link drops mid-way."""

    @abc.abstractmethod
    async def home(self) -> str:
        """The absolute home directory of the remote user."""

    @abc.abstractmethod
    async def put(self, local: Path, remote: str, *, progress: Progress | None = None) -> None:
        """Copy a local file or tree to an absolute remote path (the parent must exist)."""

    @abc.abstractmethod
    async def get(self, remote: str, local: Path, *, progress: Progress | None = None) -> None:
        """Copy an absolute remote file or tree to a local path."""

    @abc.abstractmethod
    def rsync_shell(self) -> tuple[list[str], str] | None:
        """(rsync ``-e`` args, destination prefix) to reach this target, or None if rsync
        cannot reach it directly (the caller falls back to tar over this transport)."""

    @property
    @abc.abstractmethod
    def closed(self) -> bool:
        """True once the connection is gone (a new transport must be opened)."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Close the connection; idempotent."""
