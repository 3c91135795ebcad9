"""Summarise the output of multi_gpu_model.py: files, per-system numbers, key findings, log tail.

Reads only what ``multi_gpu_model.py`` wrote (``data/*.csv`` and ``logs/*.log``), prints the summary
and writes it to ``<results-dir>/ANALYSIS.md``. Works on partial output (e.g. ``--systems`` runs).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import experiments.common.extras_core  # noqa: F401  (exits with an install hint)

# isort: split

import pandas as pd

from experiments.common.io import atomic_write_text

REQUIRED = {
    "system",
    "strategy",
    "variant",
    "fits_memory",
    "throughput_tok_s",
    "comm_overhead",
    "cost_per_1m_tokens_usd",
    "annual_cost_usd",
}


class AnalysisError(Exception):
    """Missing or malformed results; reported as one line."""


def build_parser() -> argparse.ArgumentParser:
    """The CLI."""
    p = argparse.ArgumentParser(description="Summarise the multi-GPU analytical model's results.")
    p.add_argument(
        "--results-dir",
        type=Path,
        default=Path("results/multi_gpu_model"),
        help="output dir of multi_gpu_model.py (default: %(default)s)",
    )
    p.add_argument("--log-lines", type=int, default=20, help="log lines to show (default: 20)")
    p.add_argument("--no-write", action="store_true", help="print only; do not write ANALYSIS.md")
    return p


def load_results(results_dir: Path) -> pd.DataFrame:
    """All per-system CSVs concatenated (the comparison CSV when per-system files are absent)."""
    data = results_dir / "data"
    if not results_dir.is_dir():
        raise AnalysisError(f"no results dir {results_dir}; run multi_gpu_model.py first")
    files = sorted(data.glob("results_*.csv")) if data.is_dir() else []
    if not files and (data / "all_systems_comparison.csv").is_file():
        files = [data / "all_systems_comparison.csv"]
    if not files:
        raise AnalysisError(f"no data/results_*.csv under {results_dir}; run multi_gpu_model.py")
    frames = []
    for f in files:
        try:
            df = pd.read_csv(f)
        except (OSError, ValueError) as e:
            raise AnalysisError(f"cannot read {f}: {e}") from e
        missing = REQUIRED - set(df.columns)
        if missing:
            raise AnalysisError(f"{f} lacks columns {sorted(missing)}")
        frames.append(df)
    return pd.concat(frames, ignore_index=True).drop_duplicates(["system", "strategy", "variant"])


def _money(x: float) -> str:
    return "n/a" if math.isnan(x) else f"${x:,.0f}"


def summarise(df: pd.DataFrame, results_dir: Path, log_lines: int) -> str:
    """Markdown: file inventory, per-system best baseline vs prefetch, findings, log tail."""
    lines = [f"# Multi-GPU model results in {results_dir}", "", "## Files", ""]
    for sub in ("data", "figures", "logs"):
        d = results_dir / sub
        names = sorted(p.name for p in d.iterdir() if p.is_file()) if d.is_dir() else []
        lines.append(
            f"- {sub}/: {len(names)} file(s)"
            + (
                f" ({', '.join(names[:6])}" + (", ..." if len(names) > 6 else "") + ")"
                if names
                else ""
            )
        )
    summaries = sorted(p.name for p in results_dir.glob("SUMMARY_*.md"))
    lines.append(f"- summaries: {', '.join(summaries) or 'none'}")

    lines += [
        "",
        "## Per system (best strategy of each variant)",
        "",
        "| system | variant | strategy | tokens/s | comm overhead | $/1M tokens | annual cost |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    ok = df[df["fits_memory"].astype(bool)].dropna(subset=["throughput_tok_s"])
    findings = []
    for system, d in ok.groupby("system", sort=False):
        best = d.loc[d.groupby("variant", sort=False)["throughput_tok_s"].idxmax()]
        for r in best.to_dict("records"):
            lines.append(
                f"| {system} | {r['variant']} | {r['strategy']} | {r['throughput_tok_s']:,.0f} | "
                f"{100 * r['comm_overhead']:.1f} % | {r['cost_per_1m_tokens_usd']:.3f} | "
                f"{_money(r['annual_cost_usd'])} |"
            )
        base = best[best["variant"] == "baseline"]
        other = best[best["variant"] != "baseline"]
        if len(base) and len(other):
            b, o = base.iloc[0], other.iloc[0]
            findings.append(
                f"- {system}: best {o['variant']} vs best baseline: "
                f"{o['throughput_tok_s'] / b['throughput_tok_s']:.2f}x throughput, comm overhead "
                f"{100 * b['comm_overhead']:.1f} % -> {100 * o['comm_overhead']:.1f} %, "
                f"annual savings {_money(b['annual_cost_usd'] - o['annual_cost_usd'])}"
            )
    misfits = df[~df["fits_memory"].astype(bool)]
    for (system, strategy), _ in misfits.groupby(["system", "strategy"], sort=False):
        findings.append(f"- {system} {strategy}: does not fit in GPU memory")
    if not ok.empty:
        cheapest = ok.loc[ok["cost_per_1m_tokens_usd"].idxmin()]
        fastest = ok.loc[ok["throughput_tok_s"].idxmax()]
        findings.append(
            f"- cheapest: {cheapest['system']} {cheapest['strategy']} "
            f"{cheapest['variant']} at ${cheapest['cost_per_1m_tokens_usd']:.3f} per 1M"
        )
        findings.append(
            f"- fastest: {fastest['system']} {fastest['strategy']} "
            f"{fastest['variant']} at {fastest['throughput_tok_s']:,.0f} tokens/s"
        )
        top = ok.loc[ok["comm_overhead"].idxmax()]
        findings.append(
            f"- most communication-bound: {top['system']} {top['strategy']} "
            f"{top['variant']} ({100 * top['comm_overhead']:.1f} % of the step)"
        )
    lines += ["", "## Key findings", "", *findings]

    val = results_dir / "data" / "validation_deepep.csv"
    if val.is_file():
        v = pd.read_csv(val).iloc[0]
        lines += ["", "## DeepEP check", ""]
        for ph in ("dispatch", "combine"):
            lines.append(
                f"- {ph}: formula {v[f'{ph}_pred_us']:.1f} µs vs published "
                f"{v[f'{ph}_pub_us']:.0f} µs ({100 * v[f'{ph}_rel_err']:+.1f} %)"
            )
    tab = results_dir / "data" / "validation_deepep_tables.json"
    if tab.is_file():
        v = json.loads(tab.read_text(encoding="utf-8"))
        p = v["params"]
        lines += [
            "",
            "## DeepEP out-of-sample validation",
            "",
            f"Fitted on {', '.join(v['fit_rows'])}: RDMA {p['rdma_gb_s']:.1f} GB/s, NVLink "
            f"{p['nvlink_gb_s']:.1f} GB/s, latency {p['latency_us']:.1f} µs per all-to-all. "
            f"Median |error| of the other rows: {v['median_abs_err_pct_out_of_sample']:.1f} %.",
            "",
            "| row | phase | used for fit | published µs | predicted µs | time err % | "
            "published GB/s | predicted GB/s | bandwidth err % |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in v["rows"]:
            # The normal-kernel tables publish bandwidth only, no times.
            t = (
                "– | – | –"
                if r["published_us"] is None
                else f"{r['published_us']:g} | {r['predicted_us']:.1f} | {r['time_err_pct']:+.1f}"
            )
            lines.append(
                f"| {r['row']} | {r['phase']} | {'yes' if r['used_for_fit'] else 'no'} | {t} | "
                f"{r['published_gb_s']:g} | {r['predicted_gb_s']:.1f} | {r['bw_err_pct']:+.1f} |"
            )
    logs = sorted((results_dir / "logs").glob("multi_gpu_analysis_*.log"))
    if logs and log_lines > 0:
        tail = logs[-1].read_text(encoding="utf-8", errors="replace").splitlines()[-log_lines:]
        lines += ["", f"## Last {len(tail)} lines of {logs[-1].name}", "", "```", *tail, "```"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Entry point: one-line errors for missing or malformed results."""
    args = build_parser().parse_args(argv)
    try:
        df = load_results(args.results_dir)
        text = summarise(df, args.results_dir, args.log_lines)
    except AnalysisError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(text)
    if not args.no_write:
        try:
            atomic_write_text(args.results_dir / "ANALYSIS.md", text)
        except OSError as e:
            print(f"error: cannot write ANALYSIS.md: {e}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
