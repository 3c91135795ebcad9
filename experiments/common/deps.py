"""Fail with one line, not a ModuleNotFoundError traceback, when the `experiments` extra is missing.

The broker itself installs without torch, pandas & co.; the experiment scripts need them. Each
script calls :func:`require_extras` before its first heavy import (``--help`` included), so a
fresh ``uv run python experiments/...`` says how to install instead of crashing.
"""

from __future__ import annotations

import importlib.util
import sys

#: What the `experiments` extra of pyproject.toml provides and the scripts import at start-up.
CORE = ("numpy", "pandas", "scipy", "matplotlib")
TORCH = ("torch", "transformers")


def missing_modules(modules: tuple[str, ...] | list[str]) -> list[str]:
    """The modules of ``modules`` that cannot be imported (found without importing them)."""
    out = []
    for name in modules:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            out.append(name)
    return out


def require_extras(*modules: str) -> None:
    """Exit with status 2 and one line on stderr when any of ``modules`` is not installed."""
    missing = missing_modules(modules or CORE)
    if missing:
        print(
            f"error: {', '.join(missing)} not installed; install with `--extra experiments` "
            "(uv sync --extra experiments, or uv run --extra experiments python ...)",
            file=sys.stderr,
        )
        raise SystemExit(2)
