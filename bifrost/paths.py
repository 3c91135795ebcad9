"""Where bifrost keeps its own state on this machine (never ~/.ssh)."""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs


def bifrost_home() -> Path:
    """Local state directory: ``$BIFROST_HOME`` or the platform's user data dir for bifrost."""
    env = os.environ.get("BIFROST_HOME")
    path = Path(env) if env else Path(platformdirs.user_data_dir("bifrost", appauthor=False))
    path.mkdir(parents=True, exist_ok=True)
    return path


def known_hosts_path() -> Path:
    """bifrost's own known_hosts file (OpenSSH format, so `ssh`/`rsync` can use it too)."""
    return bifrost_home() / "known_hosts"
