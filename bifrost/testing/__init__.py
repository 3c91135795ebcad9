"""Helpers for testing code that uses bifrost against a real OpenSSH server."""

from bifrost.testing.sshd import SSHServer, ensure_user, free_port

__all__ = ["SSHServer", "ensure_user", "free_port"]
