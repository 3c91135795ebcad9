"""Many hosts: the same exec/run/status with bounded concurrency and per-host results."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from bifrost._loop import run_sync
from bifrost.errors import BifrostError, CommandError
from bifrost.exec import Result
from bifrost.host import Host
from bifrost.jobs import Job, JobStatus, astart
from bifrost.target import Target

T = TypeVar("T")

__all__ = ["Group", "HostOutcome", "PrefixWriter"]


@dataclass(frozen=True)
class HostOutcome(Generic[T]):
    """One host's outcome: ``value`` on success, ``error`` (one line) on failure."""

    host: str
    value: T | None
    error: str | None
    duration: float

    @property
    def ok(self) -> bool:
        """True when the operation succeeded on this host."""
        if self.error is not None:
            return False
        return not (isinstance(self.value, Result) and self.value.exit_code != 0)

    @property
    def reason(self) -> str | None:
        """Why this host failed in one line (``exit 3`` for a non-zero exit), None when ok."""
        if self.error is not None:
            return self.error
        if isinstance(self.value, Result) and self.value.exit_code != 0:
            return f"exit {self.value.exit_code}"
        return None


class PrefixWriter:
    """Turns a byte stream into ``[host] line`` lines, never interleaving partial lines."""

    def __init__(self, prefix: str, write: Callable[[str], None]) -> None:
        self.prefix = prefix
        self.write = write
        self._buf = b""

    def __call__(self, chunk: bytes) -> None:
        self._buf += chunk
        *lines, self._buf = self._buf.split(b"\n")
        for line in lines:
            self.write(f"{self.prefix}{line.decode('utf-8', 'replace')}\n")

    def flush(self) -> None:
        """Emit a trailing unterminated line."""
        if self._buf:
            self.write(f"{self.prefix}{self._buf.decode('utf-8', 'replace')}\n")
            self._buf = b""


def _stdout_write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _stderr_write(text: str) -> None:
    sys.stderr.write(text)
    sys.stderr.flush()


class Group:
    """The same operation on N hosts, at most ``concurrency`` at a time.

    >>> g = Group(["root@a:22", "root@b:22"])            # doctest: +SKIP
    >>> outcomes = g.exec("nvidia-smi -L", echo=True)    # doctest: +SKIP
    """

    def __init__(
        self,
        targets: Iterable[str | Target | Host],
        *,
        concurrency: int = 16,
        **host_options: Any,
    ) -> None:
        self.hosts = [t if isinstance(t, Host) else Host(t, **host_options) for t in targets]
        if not self.hosts:
            raise ValueError("a Group needs at least one target")
        self.concurrency = max(1, concurrency)

    async def _each(self, op: Callable[[Host], Awaitable[T]]) -> list[HostOutcome[T]]:
        sem = asyncio.Semaphore(self.concurrency)

        async def one(h: Host) -> HostOutcome[T]:
            async with sem:
                started = time.monotonic()
                try:
                    value = await op(h)
                except CommandError as exc:
                    return HostOutcome(h.name, exc.result, str(exc), time.monotonic() - started)  # type: ignore[arg-type]
                except (BifrostError, OSError) as exc:
                    return HostOutcome(h.name, None, str(exc), time.monotonic() - started)
                return HostOutcome(h.name, value, None, time.monotonic() - started)

        return list(await asyncio.gather(*(one(h) for h in self.hosts)))

    def exec(
        self,
        command: str,
        *,
        env: Mapping[str, str] | None = None,
        secrets: Mapping[str, str] | None = None,
        cwd: str | None = None,
        timeout: float | None = None,
        merge_stderr: bool = False,
        echo: bool = False,
    ) -> list[HostOutcome[Result]]:
        """Run ``command`` everywhere (the options as in :meth:`Host.exec`); with ``echo`` print
        ``[host]``-prefixed output live."""

        async def op(h: Host) -> Result:
            out = err = None
            if echo:
                out = PrefixWriter(f"[{h.name}] ", _stdout_write)
                err = PrefixWriter(f"[{h.name}] ", _stderr_write)
            try:
                return await h.aexec(
                    command, env=env, secrets=secrets, cwd=cwd, timeout=timeout, warn=True,
                    merge_stderr=merge_stderr, on_stdout=out, on_stderr=err,
                )  # fmt: skip
            finally:
                if out is not None and err is not None:
                    out.flush()
                    err.flush()

        return run_sync(self._each(op))

    def run(self, command: str, **options: Any) -> list[HostOutcome[Job]]:
        """Start the same detached job on every host (see :meth:`Host.run`)."""
        return run_sync(self._each(lambda h: astart(h, command, **options)))

    def status(
        self, job_ids: Mapping[str, str] | str | None = None
    ) -> list[HostOutcome[list[JobStatus]]]:
        """Job statuses per host: one id everywhere, a ``{host name: id}`` map, or all jobs."""
        from bifrost.jobs import astatuses

        def ids_for(h: Host) -> list[str] | None:
            if job_ids is None:
                return None
            if isinstance(job_ids, str):
                return [job_ids]
            return [job_ids[h.name]] if h.name in job_ids else []

        return run_sync(self._each(lambda h: astatuses(h, ids_for(h))))

    def close(self) -> None:
        """Close every connection."""

        async def go() -> None:
            await asyncio.gather(*(h.aclose() for h in self.hosts), return_exceptions=True)

        run_sync(go())

    def __enter__(self) -> Group:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
