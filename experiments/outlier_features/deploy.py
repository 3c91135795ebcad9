"""Deploy the outlier analysis of one model: a thin client of ``broker.launch``.

Examples:
    uv run --extra experiments python experiments/outlier_features/deploy.py \\
        --provider local --model tiny-moe                     # this machine, $0, < 1 minute
    uv run --extra experiments python experiments/outlier_features/deploy.py --model 03 -y
    uv run --extra experiments python experiments/outlier_features/deploy.py --model 06 \\
        --gpu-filter H100 --max-price 12 --ttl 3h --keep-running

This script only turns a model config into a :class:`broker.Task` (what to rent, the ``run.py``
command, what to pull back); ``broker.launch`` does the rest: rent → push (+ ``uv sync --extra
experiments`` on a rented box) → detached job → follow → pull into ``<results-dir>/<model>/`` →
terminate, on errors, Ctrl-C, SIGTERM and SIGHUP too, unless ``--keep-running``.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import shlex
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file (python experiments/outlier_features/deploy.py)
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from broker import BrokerError, F, parse_ttl
from broker.launch import Task
from broker.launch.script import launch_task
from experiments.common.io import atomic_write_json
from experiments.outlier_features import run as run_script
from experiments.outlier_features.configs import (
    ALL_SPECS,
    ModelSpec,
    disk_gb_needed,
    get_spec,
    plan_gpus,
    spec_for_unknown,
    with_overrides,
)
from experiments.outlier_features.configs import ConfigError as SpecError

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_RESULTS = Path(__file__).resolve().parent / "results"
#: Minutes of analysis per model (the seed's runtimes, upper end); drives estimate and TTL.
RUN_MINUTES = {
    "01": 20,
    "02": 30,
    "03": 35,
    "04": 40,
    "05": 50,
    "06": 60,
    "07": 70,
    "d1": 10,
    "d2": 10,
    "d3": 15,
    "d4": 20,
    "d5": 25,
}
SETUP_MINUTES, TINY_MINUTES, TINY_MAX_PRICE = 15.0, 2.0, 1.0
EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_NO_OFFER = 0, 1, 2, 3


class BadInput(Exception):
    """The request itself is wrong (exit 2); the message names the fix."""


def known_models() -> str:
    """``01 OLMoE-1B-7B, 02 GPT-OSS-20B, ...`` for error messages and --help."""
    return ", ".join(s.id if s.id == s.name else f"{s.id} ({s.name})" for s in ALL_SPECS)


def resolve_model(key: str) -> ModelSpec:
    """A config by number, name or HF id, or any other hub id (then --min-vram is needed)."""
    if not key.strip():
        raise BadInput(f"--model is empty; choose one of: {known_models()}, or an owner/name id")
    spec = get_spec(key)
    if spec is not None:
        return spec
    if re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", key.strip()):
        return spec_for_unknown(key.strip())
    raise BadInput(f"unknown model {key!r}; choose one of: {known_models()}, or an owner/name id")


def slug(spec: ModelSpec) -> str:
    """The results folder name of a model, as ``run.py`` names it."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in spec.name).lower()


def estimated_minutes(spec: ModelSpec) -> float:
    """Wall minutes one deploy should take, setup included."""
    return TINY_MINUTES if spec.is_tiny else RUN_MINUTES.get(spec.id, 30.0) + SETUP_MINUTES


def run_args(spec: ModelSpec, a: argparse.Namespace, out_rel: str) -> list[str]:
    """The flags handed to ``run.py`` on the box (validated here before anything is rented)."""
    # A real model on a box rented for its GPUs must fail loudly if torch cannot see them.
    device = "cuda" if a.device == "auto" and not spec.is_tiny else a.device
    corpus = a.corpus or ("packaged" if spec.is_tiny else "auto")
    argv = ["--model", spec.id, "--output-dir", out_rel, "--device", device, "--corpus", corpus]
    if a.num_sequences is not None:  # run.py's K=4 disjoint batches need 4 sequences
        argv += [
            "--num-sequences",
            str(a.num_sequences),
            "--xbatch-k",
            str(max(1, min(4, a.num_sequences))),
        ]
    if a.seq_len is not None:
        argv += ["--seq-len", str(a.seq_len)]
    return argv


def build_task(spec: ModelSpec, a: argparse.Namespace) -> Task:
    """The model's task: resources from its VRAM plan, ``run.py`` as the job, results back."""
    for flag, v in (
        ("--gpu-count", a.gpu_count),
        ("--num-sequences", a.num_sequences),
        ("--seq-len", a.seq_len),
        ("--disk", a.disk_gb),
    ):
        if v is not None and v < 1:
            raise BadInput(f"{flag} must be >= 1, got {v}")
    for flag, x in (
        ("--max-price", a.max_price),
        ("--min-vram", a.min_vram_gb),
        ("--min-cpu-ram", a.min_cpu_ram_gb),
        ("--ready-timeout", a.ready_timeout),
    ):
        if x is not None and not (math.isfinite(x) and x > 0):
            raise BadInput(f"{flag} must be a number > 0, got {x}")
    try:
        if a.ttl is not None:
            try:
                parse_ttl(a.ttl)
            except BrokerError as e:
                raise BadInput(f"--ttl: {e}") from None
        out_rel = f"experiments/outlier_features/results/{slug(spec)}"
        argv = run_args(spec, a, out_rel)
        run_script.validate(run_script.build_parser().parse_args(argv), root=ROOT)
        gpus, vram, gpu_type = a.gpu_count, a.min_vram_gb, a.gpu_filter
        if spec.family == "unknown" and vram is None:
            raise BadInput(
                f"{spec.hf_id} is not one of the configs, so its size is unknown: "
                "say how much GPU memory to rent with --min-vram GB"
            )
        if not spec.is_tiny and spec.family != "unknown":
            vram = vram or spec.vram_per_gpu_gb
            gpus = gpus or plan_gpus(with_overrides(spec, seq_len=a.seq_len), vram).gpu_count
            gpu_type = gpu_type or spec.gpu_type
        q: Any = None
        for part in (
            F.gpu_type.contains(gpu_type) if gpu_type else None,
            F.vram_gb >= vram if vram else None,
            F.manufacturer == "nvidia" if not spec.is_tiny else None,
            F.ram_gb >= a.min_cpu_ram_gb if a.min_cpu_ram_gb else None,
        ):
            q = part if q is None else (q if part is None else q & part)
        cap = a.max_price or (
            TINY_MAX_PRICE if spec.is_tiny else spec.max_price_per_gpu_hour * (gpus or 1)
        )
        minutes = estimated_minutes(spec)
        return Task(
            name=slug(spec),
            resources={
                "query": q,
                "gpus": gpus,
                "max_price": cap,
                "providers": a.providers,
                "ttl": a.ttl or f"{max(60, math.ceil(2 * minutes))}m",
                "disk": a.disk_gb or (50 if spec.is_tiny else disk_gb_needed(spec)),
                "ready_timeout": a.ready_timeout,
            },
            workdir=str(ROOT),
            extras=["experiments"]
            + (
                ["fineweb"]
                if (a.corpus or "auto") in ("auto", "fineweb-edu") and not spec.is_tiny
                else []
            ),
            # On a rented box `python` is the synced venv's; on `local`, broker's own.
            run=shlex.join(["python", "experiments/outlier_features/run.py", *argv]),
            env={"TOKENIZERS_PARALLELISM": "false"},
            secrets=[k for k in ("HF_TOKEN",) if k in os.environ],
            outputs=[f"{out_rel}:."],
            expected_duration=f"{math.ceil(minutes)}m",
            retries={"max": a.retries},
        )
    except (SpecError, BrokerError) as e:
        raise BadInput(str(e)) from None


#: The flags deploy.py and deploy_sweep.py share: (name, argparse keywords, help).
FLAGS: list[tuple[str, dict[str, Any], str]] = [
    ("--provider", {"action": "append", "dest": "providers"}, "cloud (repeatable); local = here"),
    ("--gpu-filter", {}, "GPU type substring, e.g. A100 (default: the config's)"),
    ("--gpu-count", {"type": int}, "GPUs per instance (default: the VRAM plan's)"),
    ("--min-vram", {"type": float, "dest": "min_vram_gb"}, "GB per GPU"),
    ("--min-cpu-ram", {"type": float, "dest": "min_cpu_ram_gb"}, "system RAM in GB"),
    ("--max-price", {"type": float}, "instance price cap in $/h"),
    ("--ttl", {}, "instance lifetime, e.g. 3h (default: 2x the estimate, >= 1h)"),
    ("--disk", {"type": int, "dest": "disk_gb"}, "disk GB (default: from the config)"),
    ("--ready-timeout", {"type": float}, "seconds to wait for SSH + GPU probe"),
    ("--results-dir", {"type": Path, "default": DEFAULT_RESULTS}, "results: <this>/<model>/"),
    ("--keep-running", {"action": "store_true"}, "leave the box up at the end"),
    ("--retries", {"type": int, "default": 1}, "new boxes after a lost or full one"),
    ("--yes", {"action": "store_true"}, "rent without asking"),
    ("--num-sequences", {"type": int}, "passed to run.py"),
    ("--seq-len", {"type": int}, "passed to run.py"),
    ("--corpus", {}, "passed to run.py: auto, packaged, fineweb-edu or a file"),
    ("--device", {"default": "auto"}, "passed to run.py: auto, cpu, cuda"),
]


def add_deploy_flags(p: argparse.ArgumentParser) -> None:
    """Add :data:`FLAGS` to a parser."""
    for name, kw, text in FLAGS:
        p.add_argument(*(["-y", name] if name == "--yes" else [name]), help=text, **kw)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="deploy.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help=f"config: {known_models()}, or a hub id")
    p.add_argument("--dry-run", action="store_true", help="show the plan; rent nothing")
    add_deploy_flags(p)
    a = p.parse_args(argv)
    try:
        spec = resolve_model(a.model)
        task = build_task(spec, a)
    except BadInput as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    code, result = launch_task(
        task,
        providers=a.providers,
        yes=a.yes,
        dry_run=a.dry_run,
        results_dir=a.results_dir,
        keep=a.keep_running,
    )
    if result is None:
        return code
    record = result.model_dump(mode="json") | {
        "status": result.state,
        "model": spec.id,
        "instance": (result.instances or [None])[0],
        "job_id": (result.job_ids or [None])[0],
    }
    if result.results_dir:
        atomic_write_json(Path(result.results_dir) / "deploy.json", record)
    # run.py exits 2 for bad input: the same on any box, so a sweep must not rent another.
    return 0 if code == 0 else (EXIT_BAD_INPUT if code == EXIT_BAD_INPUT else EXIT_FAILED)


if __name__ == "__main__":
    sys.exit(main())
