"""Connection reuse across CLI invocations: a per-host *holder* process.

Every ``bifrost`` command is a new process; without reuse each one pays Python's imports of
asyncssh (~0.4 s) plus a full SSH handshake, which made ``bifrost exec HOST true`` slower than
plain ``ssh``. The first CLI call to a host starts a holder in the background (and itself
connects directly, as before); the holder keeps one authenticated asyncssh connection and
serves later calls over a Unix socket until it has been idle for ``$BIFROST_HOLD_IDLE``
seconds (default 300), like OpenSSH's ControlPersist. A later ``bifrost exec`` is then a small
stdlib-only client (no asyncio, asyncssh or typer import) that sends one request and streams
the output back.

Safety: the socket lives in a directory only the user can enter (0700, owner checked) and the
holder serves only peers whose ``SO_PEERCRED`` uid is its own; requests carry env values and
secrets over that socket, never argv. A missing, stale (nobody listening), hung (no answer to
the greeting within a second) or dead holder never fails a call: the client falls back to a
direct connection. ``BIFROST_HOLD=0`` turns holders off.

Wire format: the client sends one JSON line (the request), then for ``run`` stdin frames; every
frame is a one-byte kind, a 4-byte big-endian length and the payload. The holder answers with
``o``/``e`` frames (stdout/stderr bytes) and one final ``x`` frame (JSON). Closing the client's
end cancels the request: the holder's command cleanup (remote process-group kill) runs as for
a Ctrl-C in-process.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import stat
import struct
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

from bifrost.errors import ConnectionLostError
from bifrost.transport.base import OutputSink, Progress, StdinSource, Transport

# `typing` costs ~5 ms at import; every CLI call imports this module, and mypy treats a
# local TYPE_CHECKING like typing's.
TYPE_CHECKING = False

if TYPE_CHECKING:
    import asyncio
    from typing import Any

    from bifrost.host import Host
    from bifrost.session import Session
    from bifrost.target import Target

__all__ = ["HolderTransport", "aopen", "enabled", "exec_via_holder", "socket_path"]

HELLO_TIMEOUT = 1.0  # a holder that does not answer the greeting by then is treated as hung
DEFAULT_IDLE = 300.0
_HDR = struct.Struct(">cI")
#: Output bytes a holder keeps queued for a slow client before it pauses the command's channel.
_BACKLOG = 1 << 20


def enabled() -> bool:
    """Holders are on unless ``$BIFROST_HOLD`` is ``0``/``no``/``false``/``off``."""
    return os.environ.get("BIFROST_HOLD", "1").strip().lower() not in ("0", "no", "false", "off")


def _idle() -> float:
    try:
        value = float(os.environ.get("BIFROST_HOLD_IDLE", DEFAULT_IDLE))
    except ValueError:
        return DEFAULT_IDLE
    return value if value > 0 else DEFAULT_IDLE


def _private_dir(path: Path) -> bool:
    """Create ``path`` 0700 if needed; True only if it is a real directory we own, 0700."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = os.lstat(path)
    except OSError:
        return False
    return (
        stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and stat.S_IMODE(st.st_mode) == 0o700
    )


def socket_path(target: Target, identity: str | None, known_hosts: Path) -> Path | None:
    """The holder socket for this exact target (host, port, user, keys, hops, proxy) and trust
    file, or None when no private directory short enough for a Unix socket exists."""
    from bifrost.paths import bifrost_home

    key = hashlib.sha256(repr((target, identity, str(known_hosts))).encode()).hexdigest()[:24]
    for base in (bifrost_home() / "hold", Path(f"/tmp/bifrost-hold-{os.getuid()}")):  # noqa: S108
        path = base / f"{key}.sock"
        # sockaddr_un holds 108 bytes; the /tmp fallback is for a deep $BIFROST_HOME.
        if len(os.fsencode(path)) < 100 and _private_dir(base):
            return path
    return None


def _frame(kind: bytes, data: bytes) -> bytes:
    return _HDR.pack(kind, len(data)) + data


# -- spawning ---------------------------------------------------------------------------------
def spawn(spec: str, identity: str | None, known_hosts: Path, path: Path) -> None:
    """Start a holder for ``spec`` in the background (its own session; no fd of ours kept
    open, so a caller reading our output to EOF is never held up by it). Never raises."""
    args = json.dumps(
        {
            "spec": spec,
            "identity": identity,
            "known_hosts": str(known_hosts),
            "socket": str(path),
            "idle": _idle(),
        }
    )
    log = str(path.with_suffix(".log"))
    with contextlib.suppress(OSError):
        os.posix_spawn(
            sys.executable,
            [sys.executable, "-m", "bifrost.holder", args],
            os.environ,
            file_actions=[
                (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0),
                (os.POSIX_SPAWN_OPEN, 2, log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600),
            ],
            setsid=True,
            # Spawned from bifrost's loop thread, which blocks INT/TERM/HUP (see _loop): the
            # holder must not inherit that, or a plain `kill` could not stop it.
            setsigmask=(),
        )


def _socket_owned(path: Path) -> bool:
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISSOCK(st.st_mode) and st.st_uid == os.getuid()


# -- synchronous client (the CLI's `exec`: stdlib only) ----------------------------------------
def _connect_sync(path: Path) -> socket.socket | None:
    """A connected, greeted socket to a live holder, or None (missing, stale, hung)."""
    if not _socket_owned(path):
        return None
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(HELLO_TIMEOUT)
        s.connect(str(path))
        s.sendall(b'{"op": "hello"}\n')
        kind, payload = _read_frame_sync(s)
        if kind != b"x" or not json.loads(payload).get("hello"):
            raise OSError("no greeting")
        s.close()
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(HELLO_TIMEOUT)
        s.connect(str(path))
        s.settimeout(None)
        return s
    except (OSError, ValueError):
        s.close()
        return None


def _recv_exact(s: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise EOFError
        buf += chunk
    return bytes(buf)


def _read_frame_sync(s: socket.socket) -> tuple[bytes, bytes]:
    kind, size = _HDR.unpack(_recv_exact(s, _HDR.size))
    return kind, _recv_exact(s, size)


def exec_via_holder(
    target: Target,
    spec: str,
    identity: str | None,
    known_hosts: Path,
    request: dict[str, Any],
    on_stdout: Callable[[bytes], None],
    on_stderr: Callable[[bytes], None],
) -> dict[str, Any] | None:
    """Run an ``exec`` request through the host's holder; returns the holder's final answer
    (``exit_code``, ``timed_out``, ``duration``), or None when there is no usable holder (one
    is started for next time and the caller connects directly). Raises
    :class:`ConnectionLostError` if the holder or its connection went away mid-command."""
    path = socket_path(target, identity, known_hosts)
    if path is None:
        return None
    s = _connect_sync(path)
    if s is None:
        if not _lock_held(path):
            spawn(spec, identity, known_hosts, path)
        return None
    with s:
        s.sendall(json.dumps({**request, "op": "exec"}).encode() + b"\n")
        try:
            while True:
                kind, payload = _read_frame_sync(s)
                if kind == b"o":
                    on_stdout(payload)
                elif kind == b"e":
                    on_stderr(payload)
                elif kind == b"x":
                    answer: dict[str, Any] = json.loads(payload)
                    if "lost" in answer:
                        raise ConnectionLostError(answer["lost"])
                    return answer
        except EOFError:
            raise ConnectionLostError(
                f"the connection holder for {target.display} went away mid-command"
            ) from None


def _lock_held(path: Path) -> bool:
    """Whether a holder (maybe still connecting) owns this socket's lock."""
    import fcntl

    try:
        with open(str(path) + ".lock", "a") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                return True
            fcntl.flock(f, fcntl.LOCK_UN)
            return False
    except OSError:
        return True  # cannot even open it: do not spawn


# -- asynchronous client: a Transport whose commands run on the holder's connection ------------
class _Unavailable(Exception):
    """The holder could not be reached; no part of the request was sent."""


async def aopen(host: Host) -> Transport | None:
    """A :class:`HolderTransport` for ``host`` when its holder answers; otherwise None (and a
    holder is started for the next call)."""
    import asyncio

    path = socket_path(host.target, host.identity_file, host.known_hosts.path)
    if path is None:
        return None
    if _socket_owned(path):
        try:
            async with asyncio.timeout(HELLO_TIMEOUT):
                reader, writer = await asyncio.open_unix_connection(str(path))
                writer.write(b'{"op": "hello"}\n')
                kind, payload = await _read_frame(reader)
            writer.close()
            if kind == b"x" and json.loads(payload).get("hello"):
                return HolderTransport(
                    host.target, path, host.known_hosts.path, fallback=host._open_direct
                )
        except (OSError, TimeoutError, ValueError, EOFError, asyncio.IncompleteReadError):
            pass  # stale (a new holder is started below) or hung (left to its idle timeout)
    if not _lock_held(path):
        spawn(host.spec, host.identity_file, host.known_hosts.path, path)
    return None


async def _read_frame(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    kind, size = _HDR.unpack(await reader.readexactly(_HDR.size))
    return kind, await reader.readexactly(size)


class HolderTransport(Transport):
    """Commands run on the holder's SSH connection (one Unix-socket stream per command)."""

    def __init__(
        self,
        target: Target,
        path: Path,
        known_hosts: Path,
        *,
        fallback: Callable[[], Awaitable[Transport]] | None = None,
    ) -> None:
        self.target = target
        self._path = path
        self._known_hosts = known_hosts
        self._dead = False
        self._home: str | None = None
        # A direct connection, opened when the holder is gone before a request was sent (it
        # idled out between two calls of a long-lived Host) and for file transfers.
        self._fallback = fallback
        self._direct: Transport | None = None

    @property
    def closed(self) -> bool:
        if self._direct is not None:
            return self._direct.closed
        return self._dead and self._fallback is None

    async def _via_direct(self) -> Transport:
        if self._fallback is None:
            raise ConnectionLostError(f"the connection holder for {self.target.display} is gone")
        if self._direct is None or self._direct.closed:
            self._direct = await self._fallback()
        return self._direct

    async def _request(
        self,
        header: dict[str, Any],
        stdin: StdinSource = None,
        on_stdout: OutputSink | None = None,
        on_stderr: OutputSink | None = None,
    ) -> dict[str, Any]:
        import asyncio

        try:
            reader, writer = await asyncio.open_unix_connection(str(self._path))
        except OSError:
            self._dead = True
            raise _Unavailable from None

        async def feed() -> None:
            if isinstance(stdin, bytes):
                if stdin:
                    writer.write(_frame(b"i", stdin))
            elif stdin is not None:
                async for chunk in stdin:
                    if chunk:
                        writer.write(_frame(b"i", chunk))
                        await writer.drain()
            writer.write(_frame(b"i", b""))
            await writer.drain()

        writer.write(json.dumps(header).encode() + b"\n")
        feeder = asyncio.create_task(feed())
        try:
            while True:
                kind, payload = await _read_frame(reader)
                if kind == b"o" and on_stdout is not None:
                    on_stdout(payload)
                elif kind == b"e" and on_stderr is not None:
                    on_stderr(payload)
                elif kind == b"x":
                    answer: dict[str, Any] = json.loads(payload)
                    if "lost" in answer:
                        self._dead = True
                        raise ConnectionLostError(answer["lost"])
                    return answer
        except (OSError, asyncio.IncompleteReadError):
            self._dead = True
            raise ConnectionLostError(
                f"the connection holder for {self.target.display} went away"
            ) from None
        finally:
            feeder.cancel()
            with contextlib.suppress(BaseException):
                await feeder
            writer.close()  # the holder cancels the command if it is still running

    async def run(
        self,
        command: str,
        *,
        stdin: StdinSource = None,
        on_stdout: OutputSink | None = None,
        on_stderr: OutputSink | None = None,
        merge_stderr: bool = False,
    ) -> int:
        if not self._dead:
            try:
                answer = await self._request(
                    {"op": "run", "command": command, "merge": merge_stderr},
                    stdin, on_stdout, on_stderr,
                )  # fmt: skip
                return int(answer["rc"])
            except _Unavailable:
                pass  # nothing was sent: safe to run it directly instead
        direct = await self._via_direct()
        return await direct.run(
            command, stdin=stdin, on_stdout=on_stdout, on_stderr=on_stderr,
            merge_stderr=merge_stderr,
        )  # fmt: skip

    async def home(self) -> str:
        if self._home is None:
            try:
                if self._dead:
                    raise _Unavailable
                self._home = str((await self._request({"op": "home"}))["home"])
            except _Unavailable:
                self._home = await (await self._via_direct()).home()
        return self._home

    async def put(self, local: Path, remote: str, *, progress: Progress | None = None) -> None:
        await (await self._via_direct()).put(local, remote, progress=progress)

    async def get(self, remote: str, local: Path, *, progress: Progress | None = None) -> None:
        await (await self._via_direct()).get(remote, local, progress=progress)

    def rsync_shell(self) -> tuple[list[str], str] | None:
        from bifrost.transport.openssh import ssh_argv

        argv, dest = ssh_argv(self.target, self._known_hosts)
        return argv, dest + ":"

    async def close(self) -> None:
        self._dead = True
        self._fallback = None
        if self._direct is not None:
            await self._direct.close()


# -- the holder process ------------------------------------------------------------------------
class _Holder:
    """Serves requests on one connection: the holder process, and push's rsync tunnel."""

    def __init__(self, host: Session, path: Path, idle: float) -> None:
        self.host = host
        self.path = path
        self.idle = idle
        self.active = 0
        self.last = time.monotonic()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        import asyncio

        sock = writer.get_extra_info("socket")
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        if struct.unpack("3i", creds)[1] != os.getuid():
            writer.close()
            return
        self.active += 1
        try:
            header = json.loads(await reader.readline())
            op = header.get("op")
            if op == "hello":
                # A holder whose link just dropped (it exits within half a second) says no, so
                # the caller connects directly instead of getting "connection lost".
                t = self.host.current_transport()  # type: ignore[attr-defined]
                ok = t is not None and not t.closed
                answer = {"hello": ok, "pid": os.getpid()}
                writer.write(_frame(b"x", json.dumps(answer).encode()))
            elif op in ("run", "exec", "home"):
                await self._serve(op, header, reader, writer)
            await writer.drain()
        except (OSError, ValueError, asyncio.IncompleteReadError):
            pass
        finally:
            self.active -= 1
            self.last = time.monotonic()
            writer.close()

    async def _serve(
        self,
        op: str,
        header: dict[str, Any],
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        import asyncio

        from bifrost.exec import run_command

        # Bounded: a fast writer (rsync's sender) waits for the channel instead of filling RAM.
        queue: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=16)

        async def stdin() -> AsyncIterator[bytes]:
            while (chunk := await queue.get()) is not None:
                yield chunk

        async def drained() -> None:
            with contextlib.suppress(Exception):  # a gone client ends the request elsewhere
                await writer.drain()

        def out(kind: bytes) -> OutputSink:
            def sink(data: bytes) -> Awaitable[None] | None:
                writer.write(_frame(kind, data))
                # A client that reads slower than the command writes: pause the channel
                # (the transport stops reading it) until the socket buffer has drained.
                if writer.transport.get_write_buffer_size() > _BACKLOG:
                    return drained()
                return None

            return sink

        async def work() -> dict[str, Any]:
            t = await self.host.atransport()
            if op == "home":
                return {"home": await t.home()}
            if op == "run":
                rc = await t.run(
                    header["command"], stdin=stdin(), on_stdout=out(b"o"),
                    on_stderr=out(b"e"), merge_stderr=bool(header.get("merge")),
                )  # fmt: skip
                return {"rc": rc}
            result, timed_out = await run_command(
                t, header["command"], env=header.get("env"), secrets=header.get("secrets"),
                cwd=header.get("cwd"), timeout=header.get("timeout"),
                merge_stderr=bool(header.get("merge")), on_stdout=out(b"o"),
                on_stderr=out(b"e"), capture=False,
            )  # fmt: skip
            return {"exit_code": result.exit_code, "timed_out": timed_out,
                    "duration": result.duration}  # fmt: skip

        async def watch() -> None:
            # stdin frames for `run`; then (and for other ops at once) wait for the client to
            # close its end: that is a cancellation (Ctrl-C) if the command is still running.
            fed = op != "run"
            if fed:
                queue.put_nowait(None)
            while True:
                try:
                    kind, payload = await _read_frame(reader)
                except (asyncio.IncompleteReadError, OSError):
                    return
                if not fed and kind == b"i":
                    await queue.put(payload or None)
                    fed = not payload

        task = asyncio.create_task(work())
        watcher = asyncio.create_task(watch())
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if not task.done():
            if op == "run":
                # Closed stdin early is not a cancellation for `run`; only a gone client is.
                with contextlib.suppress(Exception):
                    queue.put_nowait(None)
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
            return
        watcher.cancel()
        try:
            answer = task.result()
        except ConnectionLostError as exc:
            answer = {"lost": str(exc)}
        except Exception as exc:
            answer = {"lost": f"{type(exc).__name__}: {exc}"}
        writer.write(_frame(b"x", json.dumps(answer).encode()))

    async def serve(self) -> None:
        import asyncio

        t = await self.host.atransport()  # connect (and pin the key) before accepting anyone
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # a stale socket of a dead holder: we hold the lock now
        old = os.umask(0o177)
        try:
            server = await asyncio.start_unix_server(self.handle, str(self.path))
        finally:
            os.umask(old)
        ino = os.stat(self.path).st_ino
        try:
            while not t.closed:
                await asyncio.sleep(0.5)
                if self.active == 0 and time.monotonic() - self.last > self.idle:
                    break
                t = self.host.current_transport() or t  # type: ignore[attr-defined]
        finally:
            server.close()
            with contextlib.suppress(OSError):
                if os.stat(self.path).st_ino == ino:
                    self.path.unlink()
            await self.host.aclose()  # type: ignore[attr-defined]


def main(argv: list[str] | None = None) -> int:
    """``python -m bifrost.holder '<json>'``: hold one connection until idle (see module doc)."""
    import asyncio
    import fcntl

    from bifrost.host import Host

    args = json.loads((argv or sys.argv[1:])[0])
    path = Path(args["socket"])
    with open(str(path) + ".lock", "a") as lock:
        # A holder that is just exiting (idle, or its link dropped) still has the lock for a
        # moment: wait a little for it rather than leave the host without a holder.
        deadline = time.monotonic() + 2.0
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError:
                if time.monotonic() > deadline:
                    return 0  # another holder is alive and has it
                time.sleep(0.05)
        host = Host(
            args["spec"], identity_file=args.get("identity"), known_hosts=Path(args["known_hosts"])
        )
        if host.target.is_local:
            return 1
        try:
            asyncio.run(_Holder(host, path, float(args.get("idle") or DEFAULT_IDLE)).serve())
        except Exception as exc:
            sys.stderr.write(f"bifrost holder for {args['spec']}: {exc}\n")
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
