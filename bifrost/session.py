"""What the operation modules (jobs, sync, transfer, gpus) need from a connection: a
:class:`Session`. ``Host`` is one; the modules never import ``bifrost.host``, so there is no
import cycle between the facade and the modules it fronts."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar

from bifrost.target import Target
from bifrost.transport.base import Transport

T = TypeVar("T")

__all__ = ["Session"]


class Session(Protocol):
    """A target with a (re)connectable transport: the interface behind ``Host``."""

    spec: str
    target: Target
    identity_file: str | None

    @property
    def name(self) -> str:
        """Display name for messages and tables."""
        ...

    async def atransport(self) -> Transport:
        """The open transport, connecting if needed."""
        ...

    async def areconnect(self) -> Transport:
        """Drop the current connection and open a new one."""
        ...

    async def aretrying(self, fn: Callable[[Transport], Awaitable[T]], *, attempts: int = 3) -> T:
        """Run an idempotent operation, reconnecting if the link drops mid-way."""
        ...
