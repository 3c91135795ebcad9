"""Analyse PEFT sweep results (complete or partial).

    uv run --extra experiments python experiments/peft_sweep/scripts/analyze_sweep.py
    uv run --extra experiments python experiments/peft_sweep/scripts/analyze_sweep.py \
        --filter-models ast htsat \
        --filter-augmentation true --no-plots --output-dir /tmp/analysis

Writes comparison_table.csv, summary_report.md and plots/{accuracy_comparison,
efficiency_scatter,training_time}.png.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

import experiments.common.extras_torch  # noqa: F401  (exits with an install hint)

# isort: split

from experiments.common.sweep import STATUSES, parse_bool
from experiments.peft_sweep.analyze import analyze
from experiments.peft_sweep.models import MODELS
from experiments.peft_sweep.train import STRATEGIES


def build_parser() -> argparse.ArgumentParser:
    """The CLI."""
    p = argparse.ArgumentParser(description="Comparison table, plots and report of a PEFT sweep.")
    p.add_argument(
        "--sweep-dir",
        type=Path,
        default=Path("results/sweep"),
        help="the sweep's --output-dir (default: %(default)s)",
    )
    p.add_argument("--output-dir", type=Path, help="where to write (default: the sweep dir)")
    p.add_argument("--filter-models", nargs="+", choices=MODELS)
    p.add_argument("--filter-strategies", nargs="+", choices=STRATEGIES)
    p.add_argument("--filter-augmentation", type=parse_bool, help="true or false")
    p.add_argument("--filter-status", nargs="+", choices=STATUSES)
    p.add_argument("--no-plots", action="store_true", help="table and report only")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point: one-line error when there is nothing to analyse."""
    args = build_parser().parse_args(argv)
    try:
        out = analyze(
            args.sweep_dir,
            args.output_dir or args.sweep_dir,
            models=args.filter_models,
            strategies=args.filter_strategies,
            augmentation=args.filter_augmentation,
            status=args.filter_status,
            plots=not args.no_plots,
        )
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(
        f"{out['rows']} experiment(s) -> {out['table']}, {out['report']}"
        + (f", {len(out['plots'])} plot(s)" if out["plots"] else "")
    )
    if out["unreadable"]:
        print(f"warning: skipped {len(out['unreadable'])} unreadable result file(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
