"""Run the BH-vs-top-k routing experiment: configs x prompts, checkpointed, then analyse and report.

Examples:
    uv run --extra experiments python experiments/bh_routing/run_bh_experiments.py --model \
        tiny-olmoe --device cpu
    uv run --extra experiments python experiments/bh_routing/run_bh_experiments.py --max-tokens 20 \
        --checkpoint-interval 3
    uv run --extra experiments python experiments/bh_routing/run_bh_experiments.py --no-resume \
        --output ./results
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import experiments.common.extras_torch  # noqa: F401  (exits with an install hint)

# isort: split

from experiments.bh_routing.cli_common import run_cli, setup_logging
from experiments.bh_routing.models import TINY_MODELS
from experiments.bh_routing.runner import (
    DEFAULT_MODEL,
    GRID_ALPHAS,
    GRID_NULLS,
    GRID_TEMPERATURES,
    RunSettings,
)
from experiments.bh_routing.selector import PVALUE_METHODS


def _floats(text: str, flag: str) -> tuple[float, ...]:
    try:
        vals = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"{flag} must be comma-separated numbers, got {text!r}") from None
    if not vals:
        raise ValueError(f"{flag} needs at least one value")
    return vals


def build_parser() -> argparse.ArgumentParser:
    """The seed's CLI plus options for custom configs, prompts and offline tiny models."""
    p = argparse.ArgumentParser(
        prog="run_bh_experiments.py",
        description="Compare Benjamini-Hochberg expert selection with top-k routing in MoE models. "
        f"Offline tiny random models: {', '.join(TINY_MODELS)}.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--model", default=DEFAULT_MODEL, help="HF model id, local directory, or tiny-* name"
    )
    p.add_argument("--output", type=Path, default=Path("./results"), help="output directory")
    p.add_argument(
        "--max-tokens", type=int, default=50, help="maximum tokens to generate per prompt"
    )
    p.add_argument(
        "--checkpoint-interval",
        type=int,
        default=5,
        help="rewrite latest_checkpoint.json every N experiments (each experiment is also "
        "saved on its own as soon as it finishes)",
    )
    p.add_argument("--no-resume", action="store_true", help="do not resume from checkpoint")
    p.add_argument("--device", default="auto", help="cuda, cpu or auto")
    p.add_argument("--no-fp16", action="store_true", help="use float32 instead of bfloat16 on CUDA")
    p.add_argument(
        "--configs",
        type=Path,
        default=None,
        help="JSON file {name: config} with custom configs added to the five defaults",
    )
    p.add_argument("--only", default=None, help="comma-separated config names to run")
    p.add_argument(
        "--prompts", type=Path, default=None, help="prompts JSON file (default: 12 built-in)"
    )
    p.add_argument("--max-prompts", type=int, default=None, help="use only the first N prompts")
    p.add_argument(
        "--calibration-text",
        type=Path,
        default=None,
        help="held-out text for the empirical null (default: data/calibration.txt)",
    )
    p.add_argument(
        "--heldout-text",
        type=Path,
        default=None,
        help="held-out text for perplexity (default: data/heldout.txt)",
    )
    p.add_argument(
        "--no-perplexity",
        action="store_true",
        help="skip the held-out quality pass (perplexity, KL vs native) and the grid",
    )
    p.add_argument(
        "--heldout-max-tokens",
        type=int,
        default=2048,
        help="use at most this many held-out tokens (128-token chunks)",
    )
    p.add_argument(
        "--experts-implementation",
        choices=["eager", "grouped_mm", "batched_mm"],
        default=None,
        help="transformers experts kernel (default: the model's default)",
    )
    p.add_argument(
        "--seed", type=int, default=0, help="seed for tiny-model weights and null subsampling"
    )
    p.add_argument(
        "--p-value",
        default="unselected",
        choices=list(PVALUE_METHODS),
        help="p-value model (null) of BH configs that do not name one, the seed's four included; "
        "see docs/experiments/bh_routing.md",
    )
    p.add_argument(
        "--no-grid",
        action="store_true",
        help="skip the sensitivity grid (null x alpha x temperature, held-out text only)",
    )
    p.add_argument(
        "--grid-nulls",
        default=",".join(GRID_NULLS),
        help="comma-separated p-value models of the sensitivity grid",
    )
    p.add_argument(
        "--grid-alphas",
        default=",".join(f"{a:g}" for a in GRID_ALPHAS),
        help="comma-separated alphas of the sensitivity grid",
    )
    p.add_argument(
        "--grid-temperatures",
        default=",".join(f"{t:g}" for t in GRID_TEMPERATURES),
        help="comma-separated temperatures of the sensitivity grid",
    )
    p.add_argument(
        "--report-only",
        action="store_true",
        help="rebuild CSV/plots/REPORT.md from saved JSON without loading a model",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns a process exit code."""
    args = build_parser().parse_args(argv)

    def body() -> int:
        from experiments.bh_routing.analysis import build_report, load_saved

        out: Path = args.output
        log = setup_logging(out)
        if args.report_only:
            exps, ppls, meta = load_saved(out)
        else:
            from experiments.bh_routing.runner import DATA, ExperimentRunner

            s = RunSettings(
                model=args.model,
                output=out,
                max_tokens=args.max_tokens,
                checkpoint_interval=args.checkpoint_interval,
                resume=not args.no_resume,
                device=args.device,
                fp16=not args.no_fp16,
                experts_implementation=args.experts_implementation,
                configs_file=args.configs,
                only_configs=[c.strip() for c in args.only.split(",") if c.strip()]
                if args.only
                else None,
                prompts_file=args.prompts,
                max_prompts=args.max_prompts,
                calibration_file=args.calibration_text or DATA / "calibration.txt",
                heldout_file=args.heldout_text or DATA / "heldout.txt",
                perplexity=not args.no_perplexity,
                ppl_max_tokens=args.heldout_max_tokens,
                seed=args.seed,
                p_value=args.p_value,
                grid=not args.no_grid,
                grid_nulls=tuple(n.strip() for n in args.grid_nulls.split(",") if n.strip()),
                grid_alphas=_floats(args.grid_alphas, "--grid-alphas"),
                grid_temperatures=_floats(args.grid_temperatures, "--grid-temperatures"),
            )
            exps, ppls, meta = ExperimentRunner(s).run_all()
        analysis = build_report(exps, ppls, meta, out)
        log.info(
            "wrote %s (%d experiments, %d plots)",
            out / "REPORT.md",
            len(exps),
            len(analysis["plots"]),
        )
        return 0

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
