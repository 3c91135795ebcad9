"""Rebuild CSV, plots, analysis_summary.json and REPORT.md from a results directory's saved JSON.

No model is loaded. Example:
    uv run --extra experiments python experiments/bh_routing/analyze_bh_results.py --output \
        ./results
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import experiments.common.extras_core  # noqa: F401  (exits with an install hint)

# isort: split

from experiments.bh_routing.cli_common import run_cli


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns a process exit code."""
    p = argparse.ArgumentParser(
        prog="analyze_bh_results.py",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--output", type=Path, default=Path("./results"), help="results directory of a run"
    )
    p.add_argument(
        "--baseline", default="topk_8", help="config every other config is compared with"
    )
    args = p.parse_args(argv)

    def body() -> int:
        from experiments.bh_routing.analysis import build_report, load_saved

        if not args.output.is_dir():
            raise ValueError(f"results directory not found: {args.output}")
        exps, ppls, meta = load_saved(args.output)
        build_report(exps, ppls, meta, args.output, baseline=args.baseline)
        print(f"wrote {args.output / 'REPORT.md'} from {len(exps)} saved experiments")
        return 0

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
