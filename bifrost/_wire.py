"""Shell-text helpers shared by the command wrapper and the CLI (stdlib only: the CLI validates
names without importing asyncio)."""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def quote_path(path: str) -> str:
    """Shell-quote a remote path, keeping a leading ``~`` meaning the remote home."""
    if path == "~":
        return '"$HOME"'
    if path.startswith("~/"):
        return '"$HOME"/' + shlex.quote(path[2:])
    return shlex.quote(path)


def check_env_name(name: str) -> str:
    """Reject names that cannot be shell variables (they would be an injection vector)."""
    if not _ENV_NAME.match(name):
        raise ValueError(
            f"invalid environment variable name {name!r}: use letters, digits and _ "
            "(not starting with a digit)"
        )
    return name


def env_lines(env: Mapping[str, str]) -> str:
    """``export K='v'`` lines, values quoted with shlex (sshd would drop ``env=`` anyway)."""
    return "".join(f"export {check_env_name(k)}={shlex.quote(str(v))}\n" for k, v in env.items())
