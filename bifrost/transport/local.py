"""Local transport: the same semantics as SSH, on this machine, without SSH."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import shutil
import signal
from pathlib import Path

from bifrost.target import LOCAL
from bifrost.transport.base import OutputSink, Progress, StdinSource, Transport

CHUNK = 1 << 16


class LocalTransport(Transport):
    """Runs commands with ``bash -c`` from $HOME in a new session, like sshd does."""

    def __init__(self) -> None:
        self.target = LOCAL
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    async def run(
        self,
        command: str,
        *,
        stdin: StdinSource = None,
        on_stdout: OutputSink | None = None,
        on_stderr: OutputSink | None = None,
        merge_stderr: bool = False,
    ) -> int:
        proc = await asyncio.create_subprocess_exec(
            "bash",
            "-c",
            command,
            cwd=os.path.expanduser("~"),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT if merge_stderr else asyncio.subprocess.PIPE,
            start_new_session=True,  # as sshd does: the command leads its own process group
            preexec_fn=_default_signal_mask,
        )

        async def pump(reader: asyncio.StreamReader | None, sink: OutputSink | None) -> None:
            if reader is None:
                return
            while chunk := await reader.read(CHUNK):
                if sink is not None:
                    backlog = sink(chunk)
                    if inspect.isawaitable(backlog):
                        await backlog  # a slow sink: the pipe fills and the command waits

        async def feed() -> None:
            assert proc.stdin is not None
            try:
                if isinstance(stdin, bytes):
                    proc.stdin.write(stdin)
                    await proc.stdin.drain()
                elif stdin is not None:
                    async for chunk in stdin:
                        proc.stdin.write(chunk)
                        await proc.stdin.drain()
                proc.stdin.close()
            except (BrokenPipeError, ConnectionResetError):
                pass

        try:
            tasks = [pump(proc.stdout, on_stdout), feed()]
            if not merge_stderr:
                tasks.append(pump(proc.stderr, on_stderr))
            await asyncio.gather(*tasks)
            rc = await proc.wait()
        except asyncio.CancelledError:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
            raise
        return 128 - rc if rc < 0 else rc

    async def home(self) -> str:
        return os.path.expanduser("~")

    async def put(self, local: Path, remote: str, *, progress: Progress | None = None) -> None:
        await asyncio.to_thread(_copy, local, Path(remote), progress)

    async def get(self, remote: str, local: Path, *, progress: Progress | None = None) -> None:
        await asyncio.to_thread(_copy, Path(remote), local, progress)

    def rsync_shell(self) -> tuple[list[str], str] | None:
        return [], ""

    async def close(self) -> None:
        self._closed = True


def _copy(src: Path, dst: Path, progress: Progress | None) -> None:
    def copy_file(s: str, d: str) -> str:
        out = shutil.copy2(s, d)
        if progress is not None:
            progress(os.path.getsize(s))
        return str(out)

    if src.is_dir():
        shutil.copytree(src, dst, dirs_exist_ok=True, copy_function=copy_file)
    else:
        copy_file(str(src), str(dst))


def _default_signal_mask() -> None:
    """Give the child an empty signal mask, as sshd's children have.

    The command is spawned from bifrost's event-loop thread, which blocks SIGINT/SIGTERM/SIGHUP
    (so they reach the main thread); a blocked mask is inherited across fork and exec, and a
    local job would then ignore the TERM of ``kill`` and a follower ``tail`` would never end.
    """
    signal.pthread_sigmask(signal.SIG_SETMASK, set())
