"""The seed's comparison entry point: plots and a summary table over saved outlier-feature runs.

The same program as ``compare.py`` (its parser and logic, under the seed's name), so both stay
one implementation:

    uv run --extra experiments python experiments/outlier_features/generate_comparison_plots.py
    uv run --extra experiments python experiments/outlier_features/generate_comparison_plots.py \
        --terminal
    uv run --extra experiments python experiments/outlier_features/generate_comparison_plots.py \
        --terminal --format csv > results.csv
    uv run --extra experiments python experiments/outlier_features/generate_comparison_plots.py \
        --terminal --format json > results.json

Without ``--terminal`` it writes PNGs and ``comparison.csv`` into ``<results>/sweep_analysis/``
(the seed's directory) and prints the table.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import experiments.common.extras_core  # noqa: F401  (exits with an install hint)

# isort: split

from experiments.outlier_features import compare

PROG = "generate_comparison_plots.py"


def main(argv: list[str] | None = None) -> int:
    """Entry point; the exit code of ``compare.main``."""
    return compare.main(argv, prog=PROG)


if __name__ == "__main__":
    compare.run_cli(PROG)
