"""Connections behind bifrost's own small interface: SSH (asyncssh) and local."""

from bifrost.transport.base import Transport
from bifrost.transport.local import LocalTransport
from bifrost.transport.ssh import SSHTransport, open_transport

__all__ = ["LocalTransport", "SSHTransport", "Transport", "open_transport"]
