from __future__ import annotations

import asyncio
import secrets
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from bifrost import Host
from bifrost.testing import SSHServer


@pytest.fixture(autouse=True)
def _isolated_home(bifrost_home: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    # CLI calls would otherwise leave a connection holder per host behind (each one a Python
    # process with asyncssh loaded): only the holder tests turn them on.
    monkeypatch.setenv("BIFROST_HOLD", "0")
    return bifrost_home


@pytest.fixture
def host(sshd: SSHServer) -> Iterator[Host]:
    h = Host(sshd.target, identity_file=sshd.client_key)
    yield h
    h.close()


@pytest.fixture
def workspace() -> Iterator[Callable[[Host, str], str]]:
    """``workspace(host, "proj")`` → a workspace name unique to this test run, removed (with its
    state and venv) afterwards. The sshd fixtures log in as a real user (root when the tests
    run as root) whose real home holds real workspaces: a fixed name would reuse, and a push
    would prune, somebody's workspace of that name through its old manifest."""
    made: list[tuple[Host, str]] = []

    def make(host: Host, base: str) -> str:
        name = f"bftest-{base}-{secrets.token_hex(4)}"
        made.append((host, name))
        return name

    yield make
    for host, name in made:
        host.exec(
            f'rm -rf "$HOME/.bifrost/workspaces/{name}" "$HOME/.bifrost/state/{name}" '
            f'"$HOME/.bifrost/venvs/{name}"',
            warn=True,
        )


@pytest.fixture
def local_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The `local` target works in $HOME: point it at a temp dir."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    return home


class CuttableProxy:
    """A TCP proxy on its own loop thread whose live connections can be cut at will."""

    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1") -> None:
        self.upstream_port = upstream_port
        self.upstream_host = upstream_host
        self.loop = asyncio.new_event_loop()
        self.writers: set[asyncio.StreamWriter] = set()
        self.connections = 0
        self.bytes = 0  # relayed in both directions: proves traffic took this path
        self.port = 0
        ready = threading.Event()

        async def start() -> None:
            server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
            self.port = server.sockets[0].getsockname()[1]
            ready.set()

        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        asyncio.run_coroutine_threadsafe(start(), self.loop)
        ready.wait(5)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        up_reader, up_writer = await asyncio.open_connection(self.upstream_host, self.upstream_port)
        self.writers |= {writer, up_writer}

        async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            try:
                while data := await r.read(65536):
                    self.bytes += len(data)
                    w.write(data)
                    await w.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                w.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    def cut(self) -> None:
        """Abort every live connection (like a flaky link)."""

        def _cut() -> None:
            for w in list(self.writers):
                w.transport.abort()
            self.writers.clear()

        self.loop.call_soon_threadsafe(_cut)

    def close(self) -> None:
        self.cut()

        async def drain() -> None:  # let the handlers see their aborted links and finish
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(drain(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture
def proxy(sshd: SSHServer) -> Iterator[CuttableProxy]:
    p = CuttableProxy(sshd.port)
    yield p
    p.close()
