"""Connections behind bifrost's own small interface: SSH (asyncssh) and local.

The SSH implementation is imported on first use: asyncssh takes a second or more to import,
which `local` targets and CLI usage errors should not pay.
"""

from typing import Any

from bifrost.transport.base import Transport

__all__ = ["LocalTransport", "SSHTransport", "Transport", "open_transport"]


def __getattr__(name: str) -> Any:
    if name in ("SSHTransport", "open_transport"):
        from bifrost.transport import ssh

        return getattr(ssh, name)
    if name == "LocalTransport":
        from bifrost.transport import local

        return local.LocalTransport
    raise AttributeError(name)
