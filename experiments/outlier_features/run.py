"""Analyse one model for systematic outlier features on the current machine.

Examples:
    uv run --extra experiments python -m experiments.outlier_features.run --model tiny-moe-planted
    uv run --extra experiments python -m experiments.outlier_features.run --model 03 --device cuda
    uv run --extra experiments python -m experiments.outlier_features.run --model ./my_ckpt \
        --dtype bfloat16
    uv run --extra experiments python -m experiments.outlier_features.run --model 06 --dry-run \
        # plan only

Writes ``<output-dir>/summary.json`` and ``<output-dir>/per_dim.csv`` atomically.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import platform
import resource
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file (python experiments/outlier_features/run.py)
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import experiments.common.extras_torch  # noqa: F401  (exits with an install hint)

# isort: split

from experiments.common.io import atomic_write_json, atomic_write_text
from experiments.common.provenance import git_commit
from experiments.outlier_features.configs import (
    ALL_SPECS,
    ConfigError,
    ModelSpec,
    broker_query,
    disk_gb_needed,
    get_spec,
    plan_gpus,
    spec_for_unknown,
    with_overrides,
)

log = logging.getLogger("outlier_features")

DEFAULT_RESULTS = Path(__file__).parent / "results"


def build_parser() -> argparse.ArgumentParser:
    """The CLI of ``run.py``."""
    known = ", ".join(s.id for s in ALL_SPECS)
    p = argparse.ArgumentParser(
        prog="run.py",
        description="LLM.int8() systematic outlier features of one model, in one pass "
        "(activations are reduced inside the trace; nothing per activation is written).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", required=True,
                   help=f"config id/name ({known}), a Hugging Face id, or a local checkpoint dir")
    p.add_argument("--num-sequences", type=int, help="sequences (default: the config's, 16)")
    p.add_argument("--seq-len", type=int, help="tokens per sequence (default: config's, 2048)")
    p.add_argument("--batch-size", type=int, help="sequences per forward (default: config's, 1)")
    p.add_argument("--chunk-layers", type=int,
                   help="blocks observed per forward; 0 = all (default: the config's)")
    p.add_argument("--layers", help="comma-separated block indices to observe (default: all)")
    p.add_argument("--output-dir", type=Path,
                   help=f"where summary.json / per_dim.csv go (default: {DEFAULT_RESULTS}/<model>)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda (all GPUs) or cuda:N")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="load dtype (default: the config's; bfloat16 for real models)")
    p.add_argument("--max-memory-per-gpu", type=float,
                   help="GiB cap per GPU for device_map='balanced' (default: GPU memory - 3)")
    p.add_argument("--backend", choices=["nnsight", "hooks"], default="nnsight",
                   help="nnsight trace (default) or plain torch forward hooks (same reduction)")
    p.add_argument("--corpus", default="auto",
                   help="auto, packaged (offline), fineweb-edu, or a path to a UTF-8 text file")
    p.add_argument("--no-bos", action="store_true", help="do not start sequences with BOS")
    p.add_argument("--threshold", type=float, default=6.0, help="|x| threshold")
    p.add_argument("--layer-pct", type=float, default=25.0, help="min %% of blocks hit")
    p.add_argument("--seq-pct", type=float, default=6.0, help="min %% of token positions hit")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples")
    p.add_argument("--xbatch-k", type=int, default=4, help="disjoint batches for cross-validation")
    p.add_argument("--plant-dims", help="tiny models only: comma-separated dims to plant")
    p.add_argument("--plant-gain", type=float, help="tiny models only: RMSNorm gain to plant")
    p.add_argument("--seed", type=int, default=0, help="seed for tiny weights and the bootstrap")
    p.add_argument("--dry-run", action="store_true",
                   help="print the resolved config, VRAM plan and broker query, then exit")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--debug", action="store_true", help="show tracebacks for unexpected errors")
    return p


def _int_list(text: str, what: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError as e:
        raise ConfigError(f"{what} must be comma-separated integers, got {text!r}") from e


def resolve_spec(args: argparse.Namespace) -> ModelSpec:
    """Config id / HF id / local path -> spec with the CLI overrides applied."""
    if not args.model.strip():
        raise ConfigError("--model is empty; give a config id (for example 01 or tiny-moe), "
                          "a Hugging Face id or a checkpoint directory")
    spec = get_spec(args.model)
    if spec is None:
        path = Path(args.model).expanduser()
        if path.exists():
            if not (path / "config.json").is_file():
                raise ConfigError(f"{path} has no config.json; not a saved model directory")
            spec = spec_for_unknown(str(path.resolve()))
        elif "/" in args.model and not args.model.startswith((".", "/")):
            spec = spec_for_unknown(args.model)  # a hub id; loading tells if it exists
        else:
            known = ", ".join(s.id for s in ALL_SPECS)
            raise ConfigError(f"unknown model {args.model!r}: not a config ({known}), "
                              "not an existing directory, not a hub id (owner/name)")
    plant = _int_list(args.plant_dims, "--plant-dims") if args.plant_dims else None
    if (plant is not None or args.plant_gain is not None) and not spec.is_tiny:
        raise ConfigError("--plant-dims/--plant-gain only apply to the in-code tiny models")
    if args.plant_gain is not None and not (plant or spec.plant_dims):
        raise ConfigError(f"--plant-gain does nothing: {spec.id} has no planted dims; add "
                          "--plant-dims (for example 7,42) or use tiny-moe-planted")
    if args.plant_gain is not None and not math.isfinite(args.plant_gain):
        raise ConfigError(f"--plant-gain must be a finite number, got {args.plant_gain}")
    spec = with_overrides(
        spec, num_sequences=args.num_sequences, seq_len=args.seq_len,
        batch_size=args.batch_size, chunk_layers=args.chunk_layers, dtype=args.dtype,
        plant_dims=plant, plant_gain=args.plant_gain,
    )
    if spec.num_sequences < 1:
        raise ConfigError("--num-sequences must be >= 1")
    if spec.seq_len < 2:
        raise ConfigError("--seq-len must be >= 2 (position 0 is reported separately)")
    if spec.batch_size < 1:
        raise ConfigError("--batch-size must be >= 1")
    if spec.chunk_layers < 0:
        raise ConfigError("--chunk-layers must be >= 0")
    if not 1 <= args.xbatch_k <= spec.num_sequences:
        raise ConfigError(f"--xbatch-k must be in [1, {spec.num_sequences}] (the sequence count)")
    if args.bootstrap < 1:
        raise ConfigError("--bootstrap must be >= 1")
    if not (math.isfinite(args.threshold) and args.threshold > 0):
        raise ConfigError(f"--threshold must be a finite number > 0, got {args.threshold}")
    for name in ("layer_pct", "seq_pct"):
        v = getattr(args, name)
        if not 0 < v <= 100:
            raise ConfigError(f"--{name.replace('_', '-')} is a percentage in (0, 100], got {v}")
    if args.max_memory_per_gpu is not None and not (
        math.isfinite(args.max_memory_per_gpu) and args.max_memory_per_gpu > 0
    ):
        raise ConfigError(f"--max-memory-per-gpu is GiB > 0, got {args.max_memory_per_gpu}")
    layers = _layer_list(args.layers)
    if layers and spec.num_layers and layers[-1] >= spec.num_layers:
        raise ConfigError(f"--layers {args.layers}: {spec.name} has blocks 0-{spec.num_layers - 1}")
    return spec


def _layer_list(text: str | None) -> list[int] | None:
    """``--layers`` as a sorted list of distinct block indices (nnsight needs forward order)."""
    if not text:
        return None
    layers = list(_int_list(text, "--layers"))
    if not layers:
        raise ConfigError("--layers is empty; give block indices such as 0,4,8 or leave it out")
    if any(i < 0 for i in layers) or layers != sorted(set(layers)):
        raise ConfigError(f"--layers must be distinct block indices >= 0 in increasing order, "
                          f"got {text!r} (for example 0,4,8)")
    return layers


def validate(args: argparse.Namespace, *, root: Path | None = None) -> ModelSpec:
    """Every check that needs no model or GPU, so a bad flag fails before anything is loaded
    (or rented: ``deploy.py`` runs this on the argv it will send). Relative paths are taken
    from ``root`` (the job's working directory) when given."""
    spec = resolve_spec(args)
    _device_name(args.device)
    corpus = args.corpus
    if corpus not in ("auto", "packaged", "fineweb-edu"):
        path = Path(corpus).expanduser()
        if root is not None and not path.is_absolute():
            path = root / path
        if not path.is_file():
            raise ConfigError(f"--corpus must be auto, packaged, fineweb-edu or an existing "
                              f"text file, got {corpus!r}")
    if args.output_dir is not None and not args.dry_run:
        _check_output_dir(args.output_dir if root is None or args.output_dir.is_absolute()
                          else root / args.output_dir)
    return spec


def _check_output_dir(out: Path) -> None:
    """The results must be writable there: found out now, not after hours of extraction."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--output-dir {out} exists and is not a directory")
    parent = out
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"--output-dir {out}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"--output-dir {out}: {parent} is not writable")


def _device_name(arg: str) -> str:
    if arg in ("auto", "cpu", "cuda") or (arg.startswith("cuda:") and arg[5:].isdigit()):
        return arg
    raise ConfigError(f"--device must be auto, cpu, cuda or cuda:N, got {arg!r}")


def _device(arg: str, spec: ModelSpec) -> str:
    import torch

    arg = _device_name(arg)
    if arg == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if not spec.is_tiny:
            # A rented box whose driver is older than torch's CUDA also lands here: say so
            # loudly instead of running a 30B model on the CPU until the TTL ends it.
            log.warning("no CUDA device visible to torch %s (CUDA %s): running %s on the CPU; "
                        "pass --device cuda to fail instead", torch.__version__,
                        torch.version.cuda, spec.name)
        return "cpu"
    if arg.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {arg}: torch {torch.__version__} (CUDA {torch.version.cuda})"
                          " sees no CUDA device on this machine (driver missing or too old?)")
    return arg


def _slug(spec: ModelSpec) -> str:
    base = spec.name if spec.family != "unknown" else spec.hf_id.rstrip("/").split("/")[-1]
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in base).lower()


def _model_sizes(spec: ModelSpec, module: Any) -> dict[str, Any]:
    """Total/active params: the config's published values, else counted from the module."""
    from experiments.outlier_features.models import count_params

    counted = count_params(module)
    cfg = module.config
    n_exp = getattr(cfg, "num_experts", None) or getattr(cfg, "num_local_experts", None) or 0
    top_k = getattr(cfg, "num_experts_per_tok", None) or getattr(cfg, "experts_per_token", 0)
    expert_params = sum(
        p.numel() for n, p in module.named_parameters() if ".mlp.experts." in n
    ) if n_exp else 0
    # Counted active = everything except the experts a token does not visit.
    active = counted - (expert_params * (1 - top_k / n_exp) if n_exp else 0)
    family = spec.family if spec.family != "unknown" else ("moe" if n_exp else "dense")
    return {
        "family": family,
        "total_params": spec.total_params or float(counted),
        "active_params": spec.active_params or float(active),
        "total_params_counted": counted,
        "active_params_counted": int(active),
        "num_experts": int(n_exp),
        "top_k": int(top_k or 0),
        "hidden_size": int(cfg.hidden_size),
        "num_layers": int(cfg.num_hidden_layers),
        "architecture": type(module).__name__,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Load, extract, analyse, write. Returns the summary."""
    import torch

    from experiments.outlier_features.analysis import analyze
    from experiments.outlier_features.data import load_chunks
    from experiments.outlier_features.extract import extract
    from experiments.outlier_features.models import decoder_layers, load_model

    spec = validate(args)
    device = _device(args.device, spec)
    plan = None
    if not spec.is_tiny and spec.total_params:
        plan = plan_gpus(spec)
    if args.dry_run:
        info = {"spec": spec.to_dict(), "device": device,
                "vram_plan": plan.to_dict() if plan else None,
                "disk_gb": disk_gb_needed(spec) if plan else None,
                "broker_query": broker_query(spec) if plan else None}
        import json

        print(json.dumps(info, indent=2))
        return info
    out_dir = args.output_dir or DEFAULT_RESULTS / _slug(spec)
    t0 = time.perf_counter()
    # None: load_model caps each GPU at its real memory minus the reserve; the plan's cap
    # assumes the config's card size, which the rented GPUs need not have.
    max_mem = args.max_memory_per_gpu
    lm = load_model(spec, device=device, backend=args.backend, dtype=args.dtype,
                    max_memory_per_gpu_gib=max_mem, seed=args.seed)
    t_load = time.perf_counter() - t0
    chunks = load_chunks(lm.tokenizer, num_sequences=spec.num_sequences, seq_len=spec.seq_len,
                         corpus=args.corpus, bos=not args.no_bos)
    layers = _layer_list(args.layers)
    n_blocks = len(decoder_layers(lm.module))
    if layers and layers[-1] >= n_blocks:
        raise ConfigError(f"--layers {args.layers}: the model has blocks 0-{n_blocks - 1}")
    if device.startswith("cuda"):
        for i in range(torch.cuda.device_count()):
            torch.cuda.reset_peak_memory_stats(i)
    stats = extract(lm, chunks.input_ids, backend=args.backend, batch_size=spec.batch_size,
                    chunk_layers=spec.chunk_layers, layers=layers, progress=not args.quiet)
    t1 = time.perf_counter()
    summary, table = analyze(
        stats, threshold=args.threshold, layer_pct=args.layer_pct / 100,
        seq_pct=args.seq_pct / 100, n_resamples=args.bootstrap, k=args.xbatch_k, seed=args.seed,
    )
    t_analysis = time.perf_counter() - t1
    gpu_peak = {}
    if device.startswith("cuda"):
        gpu_peak = {f"cuda:{i}": round(torch.cuda.max_memory_allocated(i) / 1024**3, 3)
                    for i in range(torch.cuda.device_count())}
    import nnsight
    import transformers

    full = {
        "model": {"id": spec.id, "name": spec.name, "hf_id": spec.hf_id or None,
                  **_model_sizes(spec, lm.module), "spec": spec.to_dict()},
        "run": {
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "git_commit": git_commit(),
            "device": device, "device_map": str(lm.device_map), "dtype": str(lm.dtype),
            "backend": args.backend, "batch_size": spec.batch_size,
            "chunk_layers": spec.chunk_layers, "layers_observed": stats.layer_indices,
            "corpus": chunks.to_dict(), "seed": args.seed,
            # Whether every sequence starts with BOS: asked for and the tokenizer has one.
            "bos": (not args.no_bos) and getattr(lm.tokenizer, "bos_token_id", None) is not None,
            "timings_s": {"load": round(t_load, 3),
                          "extract": round(stats.timings["extract_s"], 3),
                          "analysis": round(t_analysis, 3)},
            "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, 3),
            "peak_gpu_allocated_gib": gpu_peak,
            "vram_plan": plan.to_dict() if plan else None,
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "transformers": transformers.__version__,
                         "nnsight": getattr(nnsight, "__version__", "?")},
        },
        **summary,
        "git_commit": git_commit(),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "per_dim.csv", table.to_csv(index=False))
    atomic_write_json(out_dir / "summary.json", _finite(full))
    return full


def _finite(obj: Any) -> Any:
    """NaN/inf -> None so the summary stays valid JSON."""
    import math

    import numpy as np

    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _finite(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _fmt(x: float | None) -> str:
    return "n/a (K=1)" if x is None else f"{x:.2f}"


def _print_result(s: dict[str, Any], out_dir: Path | None) -> None:
    m = s["model"]
    print(f"model {m['name']} ({m['family']}, {m['total_params'] / 1e9:.3g}B total, "
          f"{m['active_params'] / 1e9:.3g}B active), H={m['hidden_size']}, L={m['num_layers']}")
    for tag in ("with_pos0", "without_pos0"):
        r = s["results"][tag]
        b = r["bootstrap"]
        lo, hi = b["n_dims_ci"]
        xb = r["cross_batch"]
        dims = r["dims"][:16]
        more = " ..." if len(r["dims"]) > 16 else ""
        print(f"  {tag:13s} outlier dims: {r['n_dims']} [{lo:g}, {hi:g}] {dims}{more}; "
              f"layers affected {100 * b['layers_affected']:.1f}%, positions affected "
              f"{100 * b['positions_affected']:.1f}%; cross-batch K={xb['k']} mean Jaccard "
              f"{_fmt(xb['mean_jaccard'])}, stable {len(xb['stable_dims'])}")
        dropped = (xb.get("stable_excluded") or {}).get("dims") or []
        if dropped:
            print(f"    not in the stable set although detected in >= ceil(K/2) batches "
                  f"(they fail the criteria on the full data): {dropped[:16]}")
    t = s["run"]["timings_s"]
    print(f"  load {t['load']:.1f}s, extract {t['extract']:.1f}s, analysis {t['analysis']:.1f}s;"
          f" peak RSS {s['run']['peak_rss_gib']:.2f} GiB")
    if out_dir is not None:
        print(f"  wrote {out_dir / 'summary.json'} and {out_dir / 'per_dim.csv'}")


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (2 for bad input, 1 for a failed run)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from experiments.outlier_features.data import DataError

    try:
        s = run(args)
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if args.debug:
            raise
        print(f"error: {type(e).__name__}: {e} (run with --debug for the traceback)",
              file=sys.stderr)
        return 1
    if not args.dry_run:
        spec_dir = args.output_dir or DEFAULT_RESULTS / _slug(resolve_spec(args))
        _print_result(s, spec_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
