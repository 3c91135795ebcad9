"""Benchmark: BH routing overhead vs top-k in generated tokens/s (same model, same experts kernel).

Arms, all on one model object and one experts implementation, interleaved round by round so drift in
machine load hits every arm alike:
- ``native``: the unpatched transformers router (top-k).
- ``adapter_topk``: our adapter running top-k (cost of the patch itself).
- ``bh_same_k``: BH with min_k = max_k = native k: identical expert compute, so the difference to
  ``native`` is the pure cost of computing p-values and the BH cut-off.
- ``bh_moderate``: BH alpha 0.05 (empirical null): the net effect including fewer experts.

Example:
    uv run python bench/bench_bh_routing.py --model tiny-olmoe --device cpu
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from experiments.bh_routing.adapters import model_summary, patch_model, unpatch_model
from experiments.bh_routing.models import load_model
from experiments.bh_routing.runner import DATA
from experiments.bh_routing.selector import RoutingConfig
from experiments.common.io import atomic_write_json

PROMPT = "The Benjamini-Hochberg procedure controls the false discovery rate by ordering p-values"


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and write JSON; returns an exit code."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny-olmoe")
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--experts-implementation", default=None, choices=["eager", "grouped_mm", "batched_mm"]
    )
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 = least noisy)")
    p.add_argument("--out", type=Path, default=Path("bench/results/bh_routing_cpu_tiny.json"))
    args = p.parse_args(argv)
    if args.rounds < 1 or args.new_tokens < 1:
        print("error: --rounds and --new-tokens must be >= 1", file=sys.stderr)
        return 2
    try:
        torch.set_num_threads(args.threads)
        lm = load_model(
            args.model,
            device=args.device,
            fp16=True,
            experts_implementation=args.experts_implementation,
        )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    model, tok = lm.model, lm.tokenizer
    enc = tok(PROMPT, return_tensors="pt").to(lm.device)

    ctl = patch_model(model)
    info = model_summary(model, ctl)
    k = info["native_top_k"]
    ctl.begin_calibration()
    with torch.no_grad():
        ids = tok((DATA / "calibration.txt").read_text(), return_tensors="pt").input_ids[:, :1024]
        model(ids.to(lm.device))
    ctl.end_calibration()
    arms = {
        "native": None,
        "adapter_topk": RoutingConfig("adapter_topk", method="topk", k=k),
        "bh_same_k": RoutingConfig("bh_same_k", alpha=0.05, min_k=k, max_k=k),
        "bh_moderate": RoutingConfig("bh_moderate", alpha=0.05, min_k=1, max_k=k),
    }

    def gen() -> float:
        if lm.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(
                **enc,
                max_new_tokens=args.new_tokens,
                min_new_tokens=args.new_tokens,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
            )
        if lm.device.type == "cuda":
            torch.cuda.synchronize()
        return (out.shape[1] - enc.input_ids.shape[1]) / (time.perf_counter() - t0)

    samples: dict[str, list[float]] = {a: [] for a in arms}
    for r in range(args.rounds + 1):  # round 0 is warm-up and discarded
        for name, cfg in arms.items():
            if cfg is None:
                unpatch_model(model)
            else:
                if getattr(model, "_bh_routing_controller", None) is None:
                    null = ctl.null
                    ctl = patch_model(model)
                    ctl.null = null
                ctl.set_config(cfg)
            tps = gen()
            if r > 0:
                samples[name].append(tps)
    med = {a: statistics.median(v) for a, v in samples.items()}
    overhead = {a: (med["native"] - med[a]) / med["native"] * 100 for a in arms if a != "native"}
    result = {
        "benchmark": "bh_routing_tokens_per_sec",
        "model": args.model,
        "device": str(lm.device),
        "dtype": str(lm.dtype),
        "threads": args.threads,
        **info,
        "new_tokens": args.new_tokens,
        "rounds": args.rounds,
        "prompt_tokens": int(enc.input_ids.shape[1]),
        "median_tokens_per_sec": med,
        "samples_tokens_per_sec": samples,
        "overhead_pct_vs_native": overhead,
        "target_overhead_pct": 5.0,
        "bh_same_k_meets_target": overhead["bh_same_k"] < 5.0,
        "torch": torch.__version__,
        "measured_at": datetime.now(UTC).isoformat(),
    }
    atomic_write_json(args.out, result)
    for a in arms:
        extra = f"  overhead {overhead[a]:+.1f} %" if a in overhead else ""
        print(f"{a:>13}: {med[a]:8.1f} tok/s{extra}")
    print(f"experts implementation {info['experts_implementation']}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
