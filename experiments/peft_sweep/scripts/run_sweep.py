"""Run the PEFT sweep: models x strategies x augmentation, one subprocess per experiment.

    uv run --extra experiments python experiments/peft_sweep/scripts/run_sweep.py --data tiny \
        --max-epochs 5
    uv run --extra experiments python experiments/peft_sweep/scripts/run_sweep.py --models ast \
        htsat \
        --strategies lora adalora --augmentation true --data tiny --resume

Results: ``<output-dir>/runs/<model>_<strategy>_<aug|noaug>_<data>.json`` in the seed's format;
logs in ``logs/``, failures in ``errors/``. See docs/experiments/peft_sweep.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

import experiments.common.extras_torch  # noqa: F401  (exits with an install hint)

# isort: split

from experiments.common.sweep import (
    ExperimentSpec,
    SweepError,
    add_sweep_arguments,
    expand_matrix,
    options_from_args,
    parse_bool,
    run_sweep,
)
from experiments.peft_sweep.data import DATA_PRESETS
from experiments.peft_sweep.models import MODELS, PRETRAINED_NOTE, SIZES
from experiments.peft_sweep.train import STRATEGIES

REPO = Path(__file__).resolve().parents[3]


def build_parser() -> argparse.ArgumentParser:
    """The CLI (the seed's flags plus the harness's)."""
    p = argparse.ArgumentParser(
        description="Sweep audio models x PEFT strategies x augmentation "
        "on rudiment classification. " + PRETRAINED_NOTE
    )
    p.add_argument("--models", nargs="+", choices=MODELS, help="default: all")
    p.add_argument("--strategies", nargs="+", choices=STRATEGIES, help="default: all")
    p.add_argument(
        "--augmentation", nargs="+", type=parse_bool, help="true and/or false (default: both)"
    )
    p.add_argument("--data", default="tiny", choices=list(DATA_PRESETS))
    p.add_argument("--data-source", default="auto", choices=["auto", "sousa", "synthetic"])
    p.add_argument("--per-class", type=int, help="override the data preset's clips per class")
    p.add_argument("--max-epochs", type=int, default=5)
    p.add_argument("--max-steps-per-epoch", type=int, help="cap batches per epoch (smoke runs)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--size",
        default="tiny",
        choices=SIZES,
        help="backbone size: tiny (random, CPU), base (random, full size), pretrained "
        "(published weights for AST and HTS-AT only)",
    )
    p.add_argument(
        "--checkpoint",
        action="append",
        default=[],
        metavar="MODEL=SOURCE",
        help="checkpoint per model for --size pretrained (repeatable)",
    )
    p.add_argument("--device", help="passed to the trainer (default: cuda if available)")
    add_sweep_arguments(p, "results/sweep")
    return p


def build_specs(args: argparse.Namespace) -> list[ExperimentSpec]:
    """One spec per config in the filtered matrix."""
    if args.max_epochs < 1:
        raise SweepError("--max-epochs must be >= 1")
    ckpts: dict[str, str] = {}
    for item in args.checkpoint:
        model, sep, source = item.partition("=")
        if not sep or model not in MODELS:
            raise SweepError(f"--checkpoint expects MODEL=SOURCE with MODEL in {MODELS}: {item!r}")
        ckpts[model] = source
    filters = {}
    if args.models:
        filters["model"] = args.models
    if args.strategies:
        filters["strategy"] = args.strategies
    if args.augmentation:
        filters["augmentation"] = args.augmentation
    matrix = expand_matrix(
        {"model": list(MODELS), "strategy": list(STRATEGIES), "augmentation": [True, False]},
        filters,
    )
    specs = []
    for c in matrix:
        config = {
            **c,
            "data": args.data,
            "max_epochs": args.max_epochs,
            "size": args.size,
            "seed": args.seed,
        }
        key = f"{c['model']}_{c['strategy']}_{'aug' if c['augmentation'] else 'noaug'}_{args.data}"
        cmd = [
            sys.executable,
            "-m",
            "experiments.peft_sweep.train",
            "--model",
            c["model"],
            "--strategy",
            c["strategy"],
            "--augmentation",
            str(c["augmentation"]).lower(),
            "--data",
            args.data,
            "--data-source",
            args.data_source,
            "--max-epochs",
            str(args.max_epochs),
            "--batch-size",
            str(args.batch_size),
            "--lr",
            str(args.lr),
            "--seed",
            str(args.seed),
            "--size",
            args.size,
        ]
        for flag, val in (
            ("--per-class", args.per_class),
            ("--max-steps-per-epoch", args.max_steps_per_epoch),
            ("--device", args.device),
            ("--checkpoint", ckpts.get(c["model"])),
        ):
            if val is not None:
                cmd += [flag, str(val)]
        # Offline by default: the hub is not reachable from the machines this runs on.
        specs.append(
            ExperimentSpec(
                key, config, cmd, env={"HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}, cwd=REPO
            )
        )
    return specs


def main(argv: list[str] | None = None) -> int:
    """Entry point: exit 0 when every experiment completed, 1 if any failed, 2 on bad input."""
    args = build_parser().parse_args(argv)
    try:
        summary = run_sweep(build_specs(args), options_from_args(args))
    except SweepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0 if summary.ok else 1


if __name__ == "__main__":
    sys.exit(main())
