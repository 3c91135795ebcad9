"""Trust-on-first-use host keys in bifrost's own known_hosts (OpenSSH format)."""

from __future__ import annotations

import fcntl
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from bifrost.paths import known_hosts_path

if TYPE_CHECKING:
    import asyncssh

__all__ = ["KnownHosts", "forget_host"]

_thread_lock = threading.Lock()


def host_pattern(host: str, port: int) -> str:
    """The name OpenSSH uses in known_hosts for this host and port."""
    return host if port == 22 else f"[{host}]:{port}"


def host_port(host: str, port: int) -> str:
    """``host:port`` as a target string: IPv6 in brackets (``[::1]:2222``), so it parses back."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class KnownHosts:
    """bifrost's pinned host keys. Safe to share between threads and processes (flock)."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path if path is not None else known_hosts_path()

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with _thread_lock, open(str(self.path) + ".lock", "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _lines(self) -> list[str]:
        try:
            return self.path.read_text().splitlines()
        except FileNotFoundError:
            return []

    def lookup(self, host: str, port: int) -> list[str]:
        """Pinned known_hosts lines for this host and port (empty when never seen)."""
        pattern = host_pattern(host, port)
        return [ln for ln in self._lines() if ln.split(" ", 1)[0].split(",").count(pattern)]

    def add(self, host: str, port: int, key: asyncssh.SSHKey) -> None:
        """Pin ``key`` for this host unless a key is already pinned."""
        with self._locked():
            if self.lookup(host, port):
                return
            line = f"{host_pattern(host, port)} {key.export_public_key('openssh').decode().strip()}"
            lines = [*self._lines(), line]
            self._write(lines)

    def forget(self, host: str, port: int | None = None) -> int:
        """Remove the pinned keys for ``host`` (every port unless ``port`` is given)."""
        return len(self.forget_entries(host, port))

    def forget_entries(self, host: str, port: int | None = None) -> list[str]:
        """Like :meth:`forget`; returns the host names of the removed lines (``[h]:p``)."""
        with self._locked():
            keep: list[str] = []
            removed: list[str] = []
            for ln in self._lines():
                names = ln.split(" ", 1)[0].split(",")
                hit = [
                    n
                    for n in names
                    if (
                        n == host_pattern(host, port)
                        if port is not None
                        else n == host or n.startswith(f"[{host}]:")
                    )
                ]
                if hit:
                    removed.append(hit[0])
                else:
                    keep.append(ln)
            if removed:
                self._write(keep)
            return removed

    def _write(self, lines: list[str]) -> None:
        tmp = self.path.with_name(self.path.name + f".tmp{os.getpid()}")
        tmp.write_text("".join(ln + "\n" for ln in lines))
        os.chmod(tmp, 0o600)
        os.replace(tmp, self.path)


def forget_host(host: str, port: int | None = None, *, path: Path | None = None) -> int:
    """Forget the pinned key(s) of ``host``; returns how many entries were removed."""
    return KnownHosts(path).forget(host, port)
