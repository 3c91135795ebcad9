"""``Host``: the synchronous facade users script against (one reused connection per host)."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from bifrost._loop import run_sync
from bifrost.errors import CommandError, CommandTimeout, ConnectionLostError
from bifrost.exec import Result, echo_sink, run_command
from bifrost.hostkeys import KnownHosts
from bifrost.target import Target, parse_target
from bifrost.transport.base import OutputSink, StdinSource, Transport

if TYPE_CHECKING:
    from bifrost.gpus import GPUReport
    from bifrost.jobs import Job, JobStatus
    from bifrost.sync import PushResult

T = TypeVar("T")

__all__ = ["Host", "connect"]


class Host:
    """A target plus a lazily opened, reused connection.

    >>> with Host("root@1.2.3.4:22022") as box:          # doctest: +SKIP
    ...     print(box.exec("nvidia-smi -L").stdout)

    ``hold=True`` shares one SSH connection between processes through a per-host holder
    process (what the CLI does; see ``bifrost.holder``). One connection is kept per event
    loop, so the synchronous methods and your own loop can use the same Host in turn.

    For asyncio code the coroutines behind the facade are public: ``aexec``, ``ahome``,
    ``atransport``, ``areconnect``, ``aretrying`` and ``aclose`` (``run``, ``push``, ``pull``
    and the others have no coroutine twin on ``Host``; see ``bifrost.jobs.astart``,
    ``bifrost.sync.apush`` and ``bifrost.transfer.apull``/``aupload``).
    """

    def __init__(
        self,
        target: str | Target,
        *,
        identity_file: str | Path | None = None,
        connect_timeout: float = 15.0,
        keepalive_interval: float = 15.0,
        retries: int = 4,
        known_hosts: KnownHosts | Path | None = None,
        hold: bool = False,
    ) -> None:
        self.spec = target if isinstance(target, str) else str(target)
        parsed = parse_target(target)
        #: The key file given here (not those from ssh_config), remembered with started jobs.
        self.identity_file = (
            str(Path(identity_file).expanduser().absolute()) if identity_file is not None else None
        )
        if self.identity_file is not None:
            parsed = parsed.with_identity(self.identity_file)
        self.target = parsed
        self.connect_timeout = connect_timeout
        self.keepalive_interval = keepalive_interval
        self.retries = retries
        self.known_hosts = (
            known_hosts if isinstance(known_hosts, KnownHosts) else KnownHosts(known_hosts)
        )
        #: Share one SSH connection between processes through a per-host holder (what the CLI
        #: does, see ``bifrost.holder``); off for the API, whose Host already reuses one.
        self.hold = hold
        # One connection (and lock) per event loop: an asyncssh connection belongs to the loop
        # that opened it, and the same Host may be used from the synchronous facade (bifrost's
        # private loop) and from the caller's own loop in turn.
        self._transports: dict[asyncio.AbstractEventLoop, Transport] = {}
        self._locks: dict[asyncio.AbstractEventLoop, asyncio.Lock] = {}

    def __repr__(self) -> str:
        return f"Host({self.target.display!r})"

    @property
    def name(self) -> str:
        """The display name used in prefixes and tables."""
        return self.target.display

    # -- connection -------------------------------------------------------------------------
    def current_transport(self) -> Transport | None:
        """The open transport of the running loop (else of bifrost's own loop), if any."""
        from bifrost import _loop

        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            loop = _loop._loop
        return self._transports.get(loop) if loop is not None else None

    @property
    def _transport(self) -> Transport | None:
        return self.current_transport()

    def _prune(self) -> None:
        for loop in [lp for lp in self._transports if lp.is_closed()]:
            self._transports.pop(loop, None)
            self._locks.pop(loop, None)

    async def _open(self) -> Transport:
        if self.target.is_local:
            from bifrost.transport.local import LocalTransport

            return LocalTransport()  # and no asyncssh import (~1 s)
        if self.hold:
            from bifrost import holder

            if holder.enabled():
                via = await holder.aopen(self)
                if via is not None:
                    return via
        return await self._open_direct()

    async def _open_direct(self) -> Transport:
        from bifrost.transport.ssh import open_transport

        return await open_transport(
            self.target,
            known_hosts=self.known_hosts,
            connect_timeout=self.connect_timeout,
            keepalive_interval=self.keepalive_interval,
            retries=self.retries,
        )

    async def atransport(self) -> Transport:
        """The open transport, connecting (with retries) if needed."""
        loop = asyncio.get_running_loop()
        self._prune()
        lock = self._locks.setdefault(loop, asyncio.Lock())
        async with lock:
            transport = self._transports.get(loop)
            if transport is None or transport.closed:
                if transport is not None:
                    await transport.close()
                transport = self._transports[loop] = await self._open()
            return transport

    async def areconnect(self) -> Transport:
        """Drop the current connection and open a new one."""
        loop = asyncio.get_running_loop()
        transport = self._transports.pop(loop, None)
        if transport is not None:
            if type(transport).__name__ == "HolderTransport":
                self.hold = False  # its holder lost the link: connect directly from now on
            await transport.close()
        return await self.atransport()

    async def aretrying(self, fn: Callable[[Transport], Awaitable[T]], *, attempts: int = 3) -> T:
        """Run an idempotent operation, reconnecting if the link drops mid-way."""
        for i in range(attempts):
            transport = await self.atransport()
            try:
                return await fn(transport)
            except ConnectionLostError:
                if i == attempts - 1:
                    raise
                await self.areconnect()
        raise AssertionError("unreachable")  # pragma: no cover

    def connect(self) -> Host:
        """Connect now (otherwise the first command connects). Returns self."""
        run_sync(self.atransport())
        return self

    async def aclose(self) -> None:
        """Close the connection (of the running event loop)."""
        transport = self._transports.pop(asyncio.get_running_loop(), None)
        if transport is not None:
            await transport.close()

    def close(self) -> None:
        """Close the connection (a later call reconnects)."""
        run_sync(self.aclose())

    def __enter__(self) -> Host:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- exec -------------------------------------------------------------------------------
    async def aexec(
        self,
        command: str,
        *,
        env: Mapping[str, str] | None = None,
        secrets: Mapping[str, str] | None = None,
        cwd: str | None = None,
        timeout: float | None = None,
        warn: bool = False,
        stdin: StdinSource | str = None,
        merge_stderr: bool = False,
        echo: bool = False,
        on_stdout: OutputSink | None = None,
        on_stderr: OutputSink | None = None,
        capture: bool = True,
    ) -> Result:
        """Coroutine twin of :meth:`exec`."""
        if timeout is not None and not (math.isfinite(timeout) and timeout > 0):
            raise ValueError(f"timeout must be a number of seconds > 0, not {timeout!r}")
        transport = await self.atransport()
        if echo:
            on_stdout = on_stdout or echo_sink("stdout")
            on_stderr = on_stderr or echo_sink("stderr")
        result, timed_out = await run_command(
            transport,
            command,
            env=env,
            secrets=secrets,
            cwd=cwd,
            timeout=timeout,
            stdin=stdin.encode() if isinstance(stdin, str) else stdin,
            merge_stderr=merge_stderr,
            on_stdout=on_stdout,
            on_stderr=on_stderr,
            capture=capture,
        )
        if timed_out:
            assert timeout is not None
            raise CommandTimeout(result, timeout)
        if result.exit_code != 0 and not warn:
            raise CommandError(result)
        return result

    def exec(
        self,
        command: str,
        *,
        env: Mapping[str, str] | None = None,
        secrets: Mapping[str, str] | None = None,
        cwd: str | None = None,
        timeout: float | None = None,
        warn: bool = False,
        stdin: StdinSource | str = None,
        merge_stderr: bool = False,
        echo: bool = False,
        on_stdout: OutputSink | None = None,
        on_stderr: OutputSink | None = None,
        capture: bool = True,
    ) -> Result:
        """Run a shell command and wait for it.

        Output is streamed to ``on_stdout``/``on_stderr`` (raw bytes) or to this terminal with
        ``echo=True``, and collected in the returned :class:`Result` (not with
        ``capture=False``, for output larger than memory: the Result's stdout/stderr are then
        empty). ``env`` values are quoted inline; ``secrets`` go through a 0600 file (never
        argv). ``cwd`` may start with ``~``. On ``timeout`` the remote process group is killed
        and :class:`CommandTimeout` raised. A non-zero exit raises :class:`CommandError`
        (carrying the Result) unless ``warn=True``.
        """
        return run_sync(
            self.aexec(
                command,
                env=env,
                secrets=secrets,
                cwd=cwd,
                timeout=timeout,
                warn=warn,
                stdin=stdin,
                merge_stderr=merge_stderr,
                echo=echo,
                on_stdout=on_stdout,
                on_stderr=on_stderr,
                capture=capture,
            )
        )

    async def ahome(self) -> str:
        """Coroutine twin of :meth:`home`."""
        return await self.aretrying(lambda t: t.home())

    def home(self) -> str:
        """The remote user's absolute home directory (never assumed to be /root)."""
        return run_sync(self.ahome())

    # -- jobs -------------------------------------------------------------------------------
    def run(
        self,
        command: str,
        *,
        name: str | None = None,
        cwd: str | None = None,
        workspace: str | None = None,
        env: Mapping[str, str] | None = None,
        secrets: Mapping[str, str] | None = None,
        outputs: Sequence[str] = (),
    ) -> Job:
        """Start a detached job (survives disconnects) and return its :class:`Job` handle.

        One round trip: a launcher script goes on stdin to ``bash -s``; no daemon on the box.
        ``workspace`` runs inside a pushed workspace (and its venv); ``outputs`` are paths
        (relative to the job's cwd) that :meth:`Job.pull_results` fetches later.
        """
        from bifrost.jobs import astart

        return run_sync(
            astart(
                self,
                command,
                name=name,
                cwd=cwd,
                workspace=workspace,
                env=env,
                secrets=secrets,
                outputs=outputs,
            )
        )

    def job(self, job_id: str) -> Job:
        """A handle on an existing job."""
        from bifrost.jobs import Job, check_job_id

        return Job(self, check_job_id(job_id))

    def jobs(self) -> list[JobStatus]:
        """Every job on this target, oldest first."""
        from bifrost.jobs import astatuses

        return run_sync(astatuses(self, None))

    # -- files ------------------------------------------------------------------------------
    def push(
        self,
        path: str | Path = ".",
        *,
        name: str | None = None,
        bootstrap: bool = False,
        extras: Sequence[str] = (),
        progress: bool = False,
        submodules: bool = False,
        force: bool = False,
    ) -> PushResult:
        """Sync a local project to ``~/.bifrost/workspaces/<name>`` (see ``bifrost.sync.apush``:
        ``submodules`` pushes git submodules' files, ``force`` replaces a same-named workspace
        pushed from another local directory)."""
        from bifrost.sync import apush

        return run_sync(
            apush(
                self, Path(path), name=name, bootstrap=bootstrap, extras=extras,
                progress=progress, submodules=submodules, force=force,
            )
        )  # fmt: skip

    def pull(self, remote: str, local: str | Path, *, progress: bool = False) -> Path:
        """Download a remote file or tree (``~`` is the remote home) to ``local``."""
        from bifrost.transfer import apull

        return run_sync(apull(self, remote, Path(local), progress=progress))

    def upload(self, local: str | Path, remote: str, *, progress: bool = False) -> str:
        """Upload a local file or tree to ``remote``; returns the absolute remote path."""
        from bifrost.transfer import aupload

        return run_sync(aupload(self, Path(local), remote, progress=progress))

    def gpus(self, *, processes: bool = True, timeout: float | None = None) -> GPUReport:
        """nvidia-smi's view of this box (``available`` is False when there is no NVIDIA GPU).

        ``processes=False`` skips the per-GPU process list: one nvidia-smi call instead of two
        (each can take a few hundred milliseconds on a real box), as readiness checks want.
        ``timeout`` (seconds) ends a hung nvidia-smi (a wedged driver): the report then says
        no GPU is available and why.
        """
        from bifrost.gpus import agpus

        if timeout is not None and not (math.isfinite(timeout) and timeout > 0):
            raise ValueError(f"timeout must be a positive number of seconds, not {timeout!r}")
        return run_sync(agpus(self, processes=processes, timeout=timeout))


def connect(target: str | Target, **options: object) -> Host:
    """Parse ``target``, connect now, and return the :class:`Host` (a context manager)."""
    host = Host(target, **options)  # type: ignore[arg-type]
    return host.connect()
