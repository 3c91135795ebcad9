"""argv for the OpenSSH client (rsync ``-e``, ``bifrost ssh``, ``bifrost attach``) that sees the
same target, hops and pinned host keys as bifrost's own asyncssh connection.

No asyncssh import here: the CLI builds these argv without paying for it.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from bifrost.target import Target

__all__ = ["hop_chain", "ssh_argv"]


def hop_chain(target: Target) -> list[Target]:
    """The ProxyJump hops of ``target`` in dialling order, nested jumps flattened.

    Mirrors ``connect_ssh``: each jump (itself reached through its own jumps) is dialled through
    the previous hop, and the target through the last one.
    """
    hops: list[Target] = []
    for jump in target.proxy_jump:
        hops += [*hop_chain(jump), jump]
    return hops


def _options(target: Target, known_hosts: Path, *, batch: bool, connect_timeout: int) -> list[str]:
    # Strict checking against bifrost's own file: keys were pinned (TOFU) by the asyncssh
    # connection that always precedes any use of these argv.
    argv = [
        "-p", str(target.port),
        "-o", "StrictHostKeyChecking=yes",
        "-o", f"UserKnownHostsFile={known_hosts}",
        "-o", "GlobalKnownHostsFile=/dev/null",
        "-o", f"ConnectTimeout={connect_timeout}",
        "-o", "ServerAliveInterval=15",
    ]  # fmt: skip
    if batch:
        argv += ["-o", "BatchMode=yes"]
    for key in target.identity_files:
        argv += ["-i", key]
    return argv


def _escape_tokens(text: str) -> str:
    """ssh expands ``%`` tokens in ProxyCommand once per level; a nested command must survive
    its parent's expansion intact."""
    return text.replace("%", "%%")


def ssh_argv(
    target: Target,
    known_hosts: Path,
    *,
    batch: bool = True,
    connect_timeout: int = 15,
) -> tuple[list[str], str]:
    """(``ssh`` argv without the destination, ``user@host`` destination) for ``target``.

    ProxyJump hops become a nested ``ProxyCommand`` of ``ssh -W``, each hop with its own port,
    identity and bifrost's known_hosts: ``ssh -J`` would apply command-line options to the final
    host only and check the hops against ``~/.ssh/known_hosts``.
    """
    proxy: str | None = None
    for hop in hop_chain(target):
        argv = ["ssh", *_options(hop, known_hosts, batch=True, connect_timeout=connect_timeout)]
        if proxy is not None:
            argv += ["-o", "ProxyCommand=" + _escape_tokens(proxy)]
        elif hop.proxy_command:
            argv += ["-o", "ProxyCommand=" + hop.proxy_command]
        argv += ["-W", "[%h]:%p", hop.ssh_destination().replace("[", "").replace("]", "")]
        proxy = " ".join(shlex.quote(a) for a in argv)
    argv = ["ssh", *_options(target, known_hosts, batch=batch, connect_timeout=connect_timeout)]
    if proxy is not None:
        argv += ["-o", "ProxyCommand=" + proxy]
    elif target.proxy_command:
        argv += ["-o", "ProxyCommand=" + target.proxy_command]  # ssh expands its tokens
    return argv, target.ssh_destination()
