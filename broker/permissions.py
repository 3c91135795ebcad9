"""File-permission checks for files that hold secrets (issue 16.8).

A config file holding an API key that other users can read hands them the account. broker does
not refuse such a file (a shared CI box may have reasons), but says so once per command.
"""

from __future__ import annotations

import re
import stat
from pathlib import Path

#: Config keys whose values are secrets.
_SECRET_KEY = re.compile(r"(?m)^\s*\w*(api_key|token|secret)\w*\s*=\s*['\"]?[^'\"\s#]+")


def secret_file_warning(path: Path | str | None) -> str | None:
    """A one-line warning when ``path`` holds a key and group or others may read it, else None.

    Call it wherever the config file is loaded (``broker.config``/``broker.cli``); ``broker
    create`` calls it for the default config path.
    """
    if path is None:
        return None
    p = Path(path)
    try:
        st = p.stat()
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode) or not st.st_mode & (stat.S_IRGRP | stat.S_IROTH):
        return None
    try:
        text = p.read_text(errors="replace")
    except OSError:
        return None
    if not _SECRET_KEY.search(text):
        return None
    who = "everyone" if st.st_mode & stat.S_IROTH else "its group"
    return (
        f"{p} holds an API key and is readable by {who} "
        f"(mode {stat.S_IMODE(st.st_mode):04o}); run `chmod 600 {p}`"
    )


def default_config_warning() -> str | None:
    """:func:`secret_file_warning` for the config file broker reads (``BROKER_CONFIG``)."""
    from broker.config import default_config_path

    try:
        return secret_file_warning(default_config_path())
    except Exception:  # a broken config path is reported by the settings loader, not here
        return None


__all__ = ["default_config_warning", "secret_file_warning"]
