"""Matplotlib helpers shared by the experiments: headless backend and atomic figure saving."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

# Headless: the experiments run on servers and in tests without a display.
matplotlib.use("Agg")
import matplotlib.pyplot as plt


def save_figure(
    fig: Any, path: Path | str, formats: Sequence[str] = ("png",), dpi: int = 150
) -> list[Path]:
    """Save ``fig`` as ``path`` with each suffix in ``formats`` (tmp file + rename), then close it.

    ``path`` may carry a suffix; it is replaced. A crash mid-save never leaves a truncated figure.
    """
    stem = Path(path).with_suffix("")
    stem.parent.mkdir(parents=True, exist_ok=True)
    written = []
    try:
        for fmt in formats:
            target = stem.with_suffix(f".{fmt}")
            fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=f".{fmt}", dir=stem.parent)
            os.close(fd)
            try:
                fig.savefig(tmp, format=fmt, dpi=dpi, bbox_inches="tight")
                os.replace(tmp, target)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
            written.append(target)
    finally:
        plt.close(fig)
    return written


def new_figure(width: float = 7.0, height: float = 4.0, ncols: int = 1) -> tuple[Any, Any]:
    """A figure with a light grid style used across the experiments."""
    fig, axes = plt.subplots(1, ncols, figsize=(width, height))
    for ax in axes if ncols > 1 else [axes]:
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
    return fig, axes
