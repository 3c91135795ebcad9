"""Where bifrost keeps its own state on this machine (never ~/.ssh)."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def _data_dir() -> Path:
    if sys.platform.startswith("linux"):
        # platformdirs' answer on Linux, without its import (~10 ms on every CLI call).
        xdg = os.environ.get("XDG_DATA_HOME", "").strip()
        return Path(xdg if xdg else os.path.expanduser("~/.local/share")) / "bifrost"
    import platformdirs

    return Path(platformdirs.user_data_dir("bifrost", appauthor=False))


def bifrost_home() -> Path:
    """Local state directory: ``$BIFROST_HOME`` or the platform's user data dir for bifrost."""
    env = os.environ.get("BIFROST_HOME")
    path = Path(env) if env else _data_dir()
    path.mkdir(parents=True, exist_ok=True)
    return path


def known_hosts_path() -> Path:
    """bifrost's own known_hosts file (OpenSSH format, so `ssh`/`rsync` can use it too)."""
    return bifrost_home() / "known_hosts"
