"""Analyse one model for systematic outlier features on the current machine.

Examples:
    uv run python -m experiments.outlier_features.run --model tiny-moe-planted
    uv run python -m experiments.outlier_features.run --model 03 --device cuda
    uv run python -m experiments.outlier_features.run --model ./my_ckpt --dtype bfloat16
    uv run python -m experiments.outlier_features.run --model 06 --dry-run   # plan only

Writes ``<output-dir>/summary.json`` and ``<output-dir>/per_dim.csv`` atomically.
"""

from __future__ import annotations

import argparse
import logging
import platform
import resource
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file (python experiments/outlier_features/run.py)
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from experiments.common.io import atomic_write_json, atomic_write_text
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
                   help="GiB cap per GPU for device_map='balanced' (default: from the VRAM plan)")
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
    if args.threshold <= 0:
        raise ConfigError("--threshold must be > 0")
    for name in ("layer_pct", "seq_pct"):
        v = getattr(args, name)
        if not 0 < v <= 100:
            raise ConfigError(f"--{name.replace('_', '-')} is a percentage in (0, 100], got {v}")
    return spec


def _device(arg: str) -> str:
    import torch

    if arg == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if arg.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {arg}: CUDA is not available on this machine")
    if arg not in ("cpu", "cuda") and not arg.startswith("cuda:"):
        raise ConfigError(f"--device must be auto, cpu, cuda or cuda:N, got {arg!r}")
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
    from experiments.outlier_features.models import load_model

    spec = resolve_spec(args)
    device = _device(args.device)
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
    max_mem = args.max_memory_per_gpu or (plan.max_memory_per_gpu_gib if plan else None)
    lm = load_model(spec, device=device, backend=args.backend, dtype=args.dtype,
                    max_memory_per_gpu_gib=max_mem, seed=args.seed)
    t_load = time.perf_counter() - t0
    chunks = load_chunks(lm.tokenizer, num_sequences=spec.num_sequences, seq_len=spec.seq_len,
                         corpus=args.corpus, bos=not args.no_bos)
    layers = list(_int_list(args.layers, "--layers")) if args.layers else None
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
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
            "device": device, "device_map": str(lm.device_map), "dtype": str(lm.dtype),
            "backend": args.backend, "batch_size": spec.batch_size,
            "chunk_layers": spec.chunk_layers, "layers_observed": stats.layer_indices,
            "corpus": chunks.to_dict(), "bos": not args.no_bos, "seed": args.seed,
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
              f"{xb['mean_jaccard']:.2f}, stable {len(xb['stable_dims'])}")
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
