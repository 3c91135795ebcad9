"""Benchmark: in-trace reduction (this experiment) vs dump-then-scan (the seed's approach).

Both methods analyse the same random OLMoE (real hidden size, planted outlier dims) on the same
token chunks and must produce the same outlier dims and per-dim table:

* ``naive``: forward hooks write every site's activations (both RMSNorm outputs and the block
  output, in the dump dtype) of every sequence to disk with ``torch.save``; afterwards the
  files are loaded one by one and scanned into the same statistics, then analysed.
* ``ours``: ``extract`` (nnsight trace, reduction inside the trace, forward stopped after the
  last observed block) then the same analysis; only summary.json and per_dim.csv are written.

Each method runs in a fresh child process, so peak RSS (``ru_maxrss`` of that process) is its
own. Bytes written = sizes of every file the method created (the dump plus its outputs);
``/proc/self/io`` ``wchar`` (bytes passed to write(2)) is recorded as a cross-check.

On a GPU (``--device cuda``) each method also records tokens/s and peak GPU memory
(``torch.cuda.max_memory_allocated``); ``--preset olmoe`` builds the random model at
OLMoE-1B-7B's real size (h 2048, 16 layers, 64 experts, top-8, 16 heads, vocab 50304).

Run by hand (takes minutes on a CPU):
    uv run --extra experiments python bench/bench_outlier_features.py                       # 16 \
        x 2048, h 2048
    uv run --extra experiments python bench/bench_outlier_features.py --seq-len 512        # quicker
    uv run --extra experiments python bench/bench_outlier_features.py --device cuda --preset olmoe
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "bench" / "results"
PLANTED = (7, 42, 99)
#: OLMoE-1B-7B's shape (allenai/OLMoE-1B-7B-0924 config.json), for random weights.
PRESETS: dict[str, dict[str, int]] = {
    "olmoe": {"hidden": 2048, "layers": 16, "experts": 64, "top_k": 8, "heads": 16,
              "intermediate": 1024, "vocab": 50304},
}


def _wchar() -> int:
    try:
        for line in Path("/proc/self/io").read_text().splitlines():
            if line.startswith("wchar:"):
                return int(line.split()[1])
    except OSError:
        pass
    return -1


def _dir_bytes(path: Path) -> tuple[int, int]:
    files = [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files), len(files)


def _setup(args: argparse.Namespace) -> tuple[Any, Any]:
    import torch

    from experiments.outlier_features.configs import get_spec, with_overrides
    from experiments.outlier_features.data import load_chunks
    from experiments.outlier_features.models import load_model

    torch.set_num_threads(args.threads or torch.get_num_threads())
    spec = with_overrides(
        get_spec("tiny-moe"), hidden_size=args.hidden, num_layers=args.layers,
        num_experts=args.experts, top_k=args.top_k, seq_len=args.seq_len,
        num_sequences=args.num_sequences, plant_dims=PLANTED, plant_gain=8.0,
        num_heads=args.heads, intermediate_size=args.intermediate, vocab_size=args.vocab,
    )
    lm = load_model(spec, device=args.device, dtype=args.dtype,
                    backend="nnsight" if args.child == "ours" else "hooks")
    ids = load_chunks(lm.tokenizer, num_sequences=args.num_sequences, seq_len=args.seq_len,
                      corpus="packaged").input_ids
    if args.device != "cpu":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    return lm, ids


def _sync(args: argparse.Namespace) -> None:
    """Wait for queued GPU work, so a timer read after it covers that work."""
    if args.device != "cpu":
        import torch

        torch.cuda.synchronize()


def child_ours(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """In-trace reduction, then analysis and the two output files."""
    from experiments.common.io import atomic_write_json, atomic_write_text
    from experiments.outlier_features.analysis import analyze
    from experiments.outlier_features.extract import extract

    lm, ids = _setup(args)
    w0 = _wchar()
    t0 = time.perf_counter()
    stats = extract(lm, ids, backend="nnsight")
    _sync(args)
    t1 = time.perf_counter()
    summary, table = analyze(stats, n_resamples=args.bootstrap, k=4)
    atomic_write_text(work / "per_dim.csv", table.to_csv(index=False))
    atomic_write_json(work / "summary.json", {k: v for k, v in summary.items()})
    t2 = time.perf_counter()
    return {"extract_s": t1 - t0, "scan_s": 0.0, "analysis_s": t2 - t1, "wall_s": t2 - t0,
            "wchar": _wchar() - w0, "dims": summary["results"]["with_pos0"]["dims"],
            "dims_without_pos0": summary["results"]["without_pos0"]["dims"],
            "table_sha": _table_sha(table)}


def child_naive(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Dump every site's activations to disk during the forward, then scan the files."""
    import torch

    from experiments.common.io import atomic_write_json, atomic_write_text
    from experiments.outlier_features.analysis import analyze
    from experiments.outlier_features.extract import StatsBuilder
    from experiments.outlier_features.models import SITES, decoder_layers

    lm, ids = _setup(args)
    dump = work / "dump"
    dump.mkdir()
    layers = decoder_layers(lm.module)
    dump_dtype = getattr(torch, args.dump_dtype)
    w0 = _wchar()
    t0 = time.perf_counter()
    cur = {"b": 0}

    def saver(tag: str) -> Any:
        def hook(_m: Any, _i: Any, out: Any) -> None:
            x = out[0] if isinstance(out, tuple) else out
            # .cpu() is the GPU->host copy the seed's "immediate CPU transfer" did.
            torch.save(x[0].detach().to(dump_dtype).cpu().clone(),
                       dump / f"b{cur['b']:03d}_{tag}.pt")
        return hook

    handles = []
    for li, layer in enumerate(layers):
        for si, name in enumerate(SITES):
            handles.append(getattr(layer, name).register_forward_hook(saver(f"l{li:03d}_s{si}")))
        handles.append(layer.register_forward_hook(saver(f"l{li:03d}_out")))
    with torch.inference_mode():
        for b in range(ids.shape[0]):
            cur["b"] = b
            lm.module.model(input_ids=ids[b : b + 1].to(lm.input_device), use_cache=False)
    for h in handles:
        h.remove()
    _sync(args)
    t1 = time.perf_counter()
    n_b, n_s = ids.shape
    hidden = layers[0].input_layernorm.weight.shape[0]
    sb = StatsBuilder(n_b, n_s, len(layers), hidden)
    for b in range(n_b):
        for li in range(len(layers)):
            for si in range(2):
                sb.add_site(b, li, si, torch.load(dump / f"b{b:03d}_l{li:03d}_s{si}.pt").float())
            sb.add_block_output(li, torch.load(dump / f"b{b:03d}_l{li:03d}_out.pt").float())
    t2 = time.perf_counter()
    summary, table = analyze(sb.finish(), n_resamples=args.bootstrap, k=4)
    atomic_write_text(work / "per_dim.csv", table.to_csv(index=False))
    atomic_write_json(work / "summary.json", summary)
    t3 = time.perf_counter()
    return {"extract_s": t1 - t0, "scan_s": t2 - t1, "analysis_s": t3 - t2, "wall_s": t3 - t0,
            "wchar": _wchar() - w0, "dims": summary["results"]["with_pos0"]["dims"],
            "dims_without_pos0": summary["results"]["without_pos0"]["dims"],
            "table_sha": _table_sha(table)}


FRACTION_COLS = ["layer_frac", "seq_frac", "layer_frac_nopos0", "seq_frac_nopos0"]


def child_forward(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Reference: the bare forward over the same sequences, observing nothing."""
    import torch

    lm, ids = _setup(args)
    t0 = time.perf_counter()
    with torch.inference_mode():
        for b in range(ids.shape[0]):
            lm.module.model(input_ids=ids[b : b + 1].to(lm.input_device), use_cache=False)
    _sync(args)
    t1 = time.perf_counter()
    return {"extract_s": t1 - t0, "scan_s": 0.0, "analysis_s": 0.0, "wall_s": t1 - t0,
            "wchar": 0, "dims": None, "dims_without_pos0": None, "table_sha": None}


def _table_sha(table: Any) -> dict[str, list[float]]:
    """The per-dim fraction columns (compared across methods by the parent)."""
    return {c: table[c].astype(float).tolist() for c in FRACTION_COLS}


def run_child(args: argparse.Namespace) -> None:
    """Child process: run one method in a fresh work dir and print its JSON line."""
    work = Path(tempfile.mkdtemp(prefix=f"outlier-bench-{args.child}-", dir=args.work_dir))
    try:
        fn = {"ours": child_ours, "naive": child_naive, "forward": child_forward}[args.child]
        res = fn(args, work)
        res["bytes_written"], res["files_written"] = _dir_bytes(work)
        res["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        res["tokens_per_s"] = args.num_sequences * args.seq_len / res["extract_s"]
        if args.device != "cpu":
            import torch

            res["peak_gpu_mem_mib"] = torch.cuda.max_memory_allocated() / 2**20
            res["peak_gpu_reserved_mib"] = torch.cuda.max_memory_reserved() / 2**20
            res["gpu"] = torch.cuda.get_device_name(0)
        print("RESULT " + json.dumps(res))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    """Parent: run both methods in child processes and write the comparison JSON."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS),
                   help="a real model's shape (the size flags' defaults; explicit flags win)")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--heads", type=int, default=0, help="attention heads (0 = 4)")
    p.add_argument("--intermediate", type=int, default=0, help="expert width (0 = hidden/2)")
    p.add_argument("--vocab", type=int, default=0, help="vocabulary (0 = 384, the byte vocab)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--dtype", choices=["float32", "bfloat16"],
                   help="model dtype (default: float32 on cpu, bfloat16 on a GPU)")
    p.add_argument("--num-sequences", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--bootstrap", type=int, default=1000)
    p.add_argument("--dump-dtype", default="bfloat16", choices=["bfloat16", "float32"],
                   help="dtype of the naive dump (bf16 = what a GPU run would write)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    p.add_argument("--work-dir", default=None, help="where the dump goes (default: system tmp)")
    p.add_argument("--output", type=Path, default=None,
                   help="result JSON (default: bench/results/outlier_features[_<device>"
                        "][_<preset>].json)")
    p.add_argument("--child", choices=["ours", "naive", "forward"], help=argparse.SUPPRESS)
    preset = p.parse_known_args()[0].preset
    if preset:
        # A preset replaces the defaults only: explicit size flags still win (quick runs).
        p.set_defaults(**PRESETS[preset])
    args = p.parse_args()
    from experiments.common.deps import require_extras

    # The children import these; say how to install them rather than fail in a child.
    require_extras("numpy", "pandas", "torch", "transformers", "nnsight")
    if args.dtype is None:
        args.dtype = "float32" if args.device == "cpu" else "bfloat16"
    if args.device != "cpu" and not args.child:
        import torch

        if not torch.cuda.is_available():
            p.error(f"--device {args.device}: torch sees no CUDA device on this machine "
                    "(use --device cpu)")
    if args.output is None:
        tag = "".join(f"_{t}" for t in (args.device.replace(":", ""), args.preset)
                      if t and t != "cpu")
        args.output = RESULTS / f"outlier_features{tag}.json"
    if args.child:
        run_child(args)
        return 0
    results: dict[str, Any] = {}
    for method in ("forward", "ours", "naive"):
        cmd = [sys.executable, __file__, "--child", method,
               *[f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                 if k not in ("child", "output") and v is not None]]
        print(f"running {method} ...", flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if proc.returncode != 0:
            print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
            return 1
        line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
        results[method] = json.loads(line[len("RESULT "):])
        results[method]["process_wall_s"] = time.perf_counter() - t0
        shown = {k: v for k, v in results[method].items() if k != "table_sha"}  # long lists
        print(f"  {method}: {json.dumps(shown)}", flush=True)
    ours, naive = results["ours"], results["naive"]
    fwd = results["forward"]["wall_s"]
    fractions = {m: r.pop("table_sha") for m, r in results.items()}
    ours["table_sha"], naive["table_sha"] = fractions["ours"], fractions["naive"]
    import torch

    out = {
        "benchmark": "outlier_features: in-trace reduction vs dump-then-scan",
        "config": {k: v for k, v in vars(args).items() if k not in ("child", "output")},
        "model": f"random OlmoeForCausalLM, {args.dtype} on {args.device}, planted dims "
                 f"{list(PLANTED)} (RMSNorm gain 8)",
        "tokens": args.num_sequences * args.seq_len,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "torch": torch.__version__},
        "results": results,
        "same_outlier_dims": ours["dims"] == naive["dims"]
        and ours["dims_without_pos0"] == naive["dims_without_pos0"],
        # The dump is rounded to --dump-dtype, so fractions may differ where a value sits
        # next to a threshold; with --dump-dtype float32 they agree exactly.
        "max_abs_diff_per_dim_fractions": max(
            max(abs(a - b) for a, b in zip(ours["table_sha"][c], naive["table_sha"][c],
                                           strict=True))
            for c in FRACTION_COLS),
        "ratios_naive_over_ours": {
            "bytes_written": naive["bytes_written"] / max(1, ours["bytes_written"]),
            "wall_s": naive["wall_s"] / ours["wall_s"],
            "peak_rss": naive["peak_rss_mib"] / ours["peak_rss_mib"],
            # Time each method adds on top of the bare forward (the same in both methods).
            "wall_s_beyond_forward": (naive["wall_s"] - fwd) / max(1e-9, ours["wall_s"] - fwd),
        },
        "seconds_beyond_forward": {"ours": ours["wall_s"] - fwd, "naive": naive["wall_s"] - fwd},
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    from experiments.common.io import atomic_write_json
    from experiments.common.provenance import git_commit

    atomic_write_json(args.output, {**out, "git_commit": git_commit()})
    print(json.dumps(out["ratios_naive_over_ours"], indent=2))
    for r in results.values():
        r.pop("table_sha", None)
    print(f"same outlier dims: {out['same_outlier_dims']}, max per-dim fraction difference: "
          f"{out['max_abs_diff_per_dim_fractions']:.3g}; wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
