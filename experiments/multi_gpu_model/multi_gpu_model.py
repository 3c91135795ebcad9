"""Run the analytical multi-GPU MoE serving model on every configured system.

Writes, under ``--output-dir`` (default ``results/multi_gpu_model``)::

    data/results_<system>.csv, data/all_systems_comparison.csv, data/validation_deepep.csv,
    data/config_used.json
    figures/{throughput_comparison,communication_overhead,cost_efficiency}_<system>.{pdf,png},
    figures/cross_system_comparison.{pdf,png}
    logs/multi_gpu_analysis_<YYYYmmdd_HHMMSS>.log
    SUMMARY_<system>.md

Every number's formula is in docs/experiments/multi_gpu_model.md.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import experiments.common.extras_core  # noqa: F401  (exits with an install hint)

# isort: split

import pandas as pd

from experiments.common.io import atomic_write_json, atomic_write_text
from experiments.common.provenance import git_commit
from experiments.multi_gpu_model.model import (
    DEFAULT_CONFIG,
    Config,
    ConfigError,
    config_as_dict,
    deepep_check,
    deepep_validation,
    evaluate,
)

log = logging.getLogger("multi_gpu_model")


def build_parser() -> argparse.ArgumentParser:
    """The CLI."""
    p = argparse.ArgumentParser(
        description="Analytical model of MoE decode throughput, communication and cost on "
        "multi-GPU systems (expert parallel, data parallel, hybrid; baseline vs prefetch).",
    )
    p.add_argument(
        "--config",
        type=Path,
        default=DEFAULT_CONFIG,
        help="JSON with hardware, dated prices, model shapes, workload (default: %(default)s)",
    )
    p.add_argument(
        "--output-dir",
        type=Path,
        default=Path("results/multi_gpu_model"),
        help="where data/, figures/, logs/ and SUMMARY_*.md go (default: %(default)s)",
    )
    p.add_argument("--model", help="model key from the config's 'models' (default: workload.model)")
    p.add_argument("--systems", nargs="+", metavar="NAME", help="only these systems, e.g. 8xA100")
    p.add_argument(
        "--prediction-accuracy", type=float, help="override prefetch.prediction_accuracy"
    )
    p.add_argument("--comm-reduction", type=float, help="override prefetch.comm_reduction")
    p.add_argument("--tokens-per-month", type=float, help="override cost.tokens_per_month")
    p.add_argument("--no-plots", action="store_true", help="skip figures")
    p.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING"],
        help="console and log-file level (default: INFO)",
    )
    return p


def apply_overrides(cfg: Config, args: argparse.Namespace) -> Config:
    """Fold CLI overrides into the config, validating them like the file's values."""
    pf = cfg.prefetch
    if args.prediction_accuracy is not None:
        if not 0 <= args.prediction_accuracy <= 1:
            raise ConfigError("--prediction-accuracy must be in [0, 1]")
        pf = replace(pf, prediction_accuracy=args.prediction_accuracy)
    if args.comm_reduction is not None:
        if not args.comm_reduction >= 1:
            raise ConfigError("--comm-reduction must be >= 1")
        pf = replace(pf, comm_reduction=args.comm_reduction)
    tpm = cfg.tokens_per_month
    if args.tokens_per_month is not None:
        if not args.tokens_per_month > 0:
            raise ConfigError("--tokens-per-month must be positive")
        tpm = args.tokens_per_month
    systems = cfg.systems
    if args.systems:
        names = [s.name for s in cfg.systems]
        bad = [n for n in args.systems if n not in names]
        if bad:
            raise ConfigError(f"unknown system(s) {bad}; choose from {names}")
        systems = [s for s in cfg.systems if s.name in args.systems]
    return replace(cfg, prefetch=pf, tokens_per_month=tpm, systems=systems)


def _setup_logging(out: Path, level: str) -> Path:
    path = out / "logs" / f"multi_gpu_analysis_{datetime.now():%Y%m%d_%H%M%S}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    log.handlers.clear()
    log.setLevel(level)
    log.propagate = False
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s")
    for h in (logging.FileHandler(path, encoding="utf-8"), logging.StreamHandler(sys.stdout)):
        h.setFormatter(fmt)
        log.addHandler(h)
    return path


def _fmt(x: Any, spec: str = ",.0f") -> str:
    if isinstance(x, float) and math.isnan(x):
        return "n/a"
    return format(x, spec)


def summary_markdown(system_name: str, df: pd.DataFrame, cfg: Config) -> str:
    """SUMMARY_<system>.md: per strategy, baseline vs prefetch, plus the assumptions used."""
    s = next(x for x in cfg.systems if x.name == system_name)
    w, pf = cfg.workload, cfg.prefetch
    lines = [
        f"# {system_name}: analytical MoE serving model",
        "",
        f"- GPUs: {s.count} x {s.gpu.name} ({s.gpu.memory_gb:g} GB, {s.gpu.hbm_tb_s:g} TB/s HBM, "
        f"{s.gpu.bf16_tflops:g} TFLOPS bf16), interconnect {s.interconnect.name} "
        f"({s.interconnect.per_gpu_gb_s_each_way:g} GB/s each way x "
        f"{s.interconnect.alltoall_efficiency:g} efficiency, "
        f"{s.interconnect.latency_us:g} µs latency)",
        f"- Price: ${s.gpu.price_per_gpu_hour_usd:.2f} per GPU-hour (as of {s.gpu.price_as_of}; "
        f"{s.gpu.price_source})",
        f"- Model: {w.model.name} ({w.model.total_params / 1e9:.1f} B params, "
        f"{w.model.experts} experts, top-{w.model.top_k}), weights {w.weight_bytes:g} B/param, "
        f"{w.sequences_per_gpu} sequences per GPU at {w.context_tokens} context tokens",
        f"- Prefetch strategy (assumed, not measured): accuracy {pf.prediction_accuracy:g}, "
        f"communication reduction {pf.comm_reduction:g}x for predicted tokens, "
        f"predictor overhead {100 * pf.predictor_overhead:g} %",
        f"- Volume for annual cost: {cfg.tokens_per_month:,.0f} tokens per month",
        "",
        "| strategy | variant | tokens/s | step ms | comm overhead | scaling eff. | $/1M tokens "
        "| annual cost $ | speedup | annual savings $ |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in df.to_dict("records"):
        if not r["fits_memory"]:
            lines.append(
                f"| {r['strategy']} | {r['variant']} | does not fit: {r['memory_note']} "
                "| | | | | | | |"
            )
            continue
        lines.append(
            f"| {r['strategy']} | {r['variant']} | {_fmt(r['throughput_tok_s'])} | "
            f"{_fmt(r['step_ms'], '.2f')} | {_fmt(100 * r['comm_overhead'], '.1f')} % | "
            f"{_fmt(100 * r['scaling_efficiency'], '.0f')} % | "
            f"{_fmt(r['cost_per_1m_tokens_usd'], '.3f')} | {_fmt(r['annual_cost_usd'])} | "
            f"{_fmt(r['speedup_vs_baseline'], '.2f')}x | {_fmt(r['annual_savings_usd'])} |"
        )
    ok = df[df["fits_memory"]]
    if not ok.empty:
        best = ok.loc[ok["throughput_tok_s"].idxmax()]
        lines += [
            "",
            f"Highest throughput: {best['strategy']} / {best['variant']} at "
            f"{best['throughput_tok_s']:,.0f} tokens/s, "
            f"${best['cost_per_1m_tokens_usd']:.3f} per 1M tokens.",
        ]
    lines += [
        "",
        "Formulas: docs/experiments/multi_gpu_model.md. Scaling efficiency is relative "
        "to G x one GPU serving the whole model (n/a when one GPU cannot hold it).",
        "",
    ]
    return "\n".join(lines)


def _grouped_bars(
    ax: Any, d: pd.DataFrame, strategies: list[str], variants: list[str], column: str
) -> None:
    """One group of bars per strategy, one bar per variant."""
    width = 0.8 / len(variants)
    for i, v in enumerate(variants):
        vals = [float(d[(d.strategy == s) & (d.variant == v)][column].iloc[0]) for s in strategies]
        offset = (i - (len(variants) - 1) / 2) * width
        ax.bar([j + offset for j in range(len(strategies))], vals, width, label=v)
    ax.set_xticks(range(len(strategies)), strategies, rotation=15)
    ax.legend()


def make_figures(df: pd.DataFrame, out: Path) -> list[Path]:
    """Per-system throughput / communication / cost figures and the cross-system one."""
    from experiments.common.plotting import new_figure, save_figure

    figdir = out / "figures"
    written: list[Path] = []
    variants = list(dict.fromkeys(df["variant"]))
    for system, d in df.groupby("system", sort=False):
        strategies = list(dict.fromkeys(d["strategy"]))

        fig, ax = new_figure()
        _grouped_bars(ax, d, strategies, variants, "throughput_tok_s")
        ax.set_ylabel("tokens / s (whole system)")
        ax.set_title(f"{system}: decode throughput")
        written += save_figure(fig, figdir / f"throughput_comparison_{system}", ("pdf", "png"))
        n_gpus = int(d["num_gpus"].iloc[0])
        if (df.drop_duplicates("system")["num_gpus"] == n_gpus).sum() == 1:
            # The seed's name (throughput_comparison_8gpu.pdf) for the one system of that size.
            written += save_figure(
                fig, figdir / f"throughput_comparison_{n_gpus}gpu", ("pdf", "png")
            )

        fig, ax = new_figure()
        labels, local, comm = [], [], []
        for s in strategies:
            for v in variants:
                r = d[(d.strategy == s) & (d.variant == v)].iloc[0]
                labels.append(f"{s}\n{v}")
                local.append(float(r["local_ms"]))
                comm.append(float(r["comm_exposed_ms"]))
        ax.bar(labels, local, label="local work (max of compute, HBM)")
        ax.bar(labels, comm, bottom=local, label="exposed all-to-all")
        ax.set_ylabel("ms per decode step")
        ax.set_title(f"{system}: step time breakdown")
        ax.tick_params(axis="x", labelsize=7)
        ax.legend()
        written += save_figure(fig, figdir / f"communication_overhead_{system}", ("pdf", "png"))

        fig, ax = new_figure()
        _grouped_bars(ax, d, strategies, variants, "cost_per_1m_tokens_usd")
        ax.set_ylabel("$ per 1M tokens")
        ax.set_title(f"{system}: serving cost")
        written += save_figure(fig, figdir / f"cost_efficiency_{system}", ("pdf", "png"))

    best = best_rows(df)
    fig, (a1, a2) = new_figure(11, 4, ncols=2)
    systems = list(dict.fromkeys(best["system"]))
    width = 0.8 / len(variants)
    for i, v in enumerate(variants):
        sub = best[best.variant == v].set_index("system").reindex(systems)
        xs = [j + (i - (len(variants) - 1) / 2) * width for j in range(len(systems))]
        a1.bar(xs, sub["throughput_tok_s"], width, label=v)
        a2.bar(xs, sub["cost_per_1m_tokens_usd"], width, label=v)
    for ax, ylabel in ((a1, "tokens / s (best strategy)"), (a2, "$ per 1M tokens")):
        ax.set_xticks(range(len(systems)), systems)
        ax.set_ylabel(ylabel)
        ax.legend()
    a1.set_title("Throughput across systems")
    a2.set_title("Cost across systems")
    written += save_figure(fig, figdir / "cross_system_comparison", ("pdf", "png"))
    return written


def best_rows(df: pd.DataFrame) -> pd.DataFrame:
    """Per system and variant, the strategy with the highest throughput (rows that fit only)."""
    ok = df[df["fits_memory"]].dropna(subset=["throughput_tok_s"])
    idx = ok.groupby(["system", "variant"], sort=False)["throughput_tok_s"].idxmax()
    return ok.loc[idx.values].reset_index(drop=True)


def run(args: argparse.Namespace) -> int:
    """Evaluate, then write data, summaries, figures and the log."""
    from experiments.multi_gpu_model.model import load_config

    cfg = apply_overrides(load_config(args.config, args.model), args)
    out: Path = args.output_dir
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create output dir {out}: {e}") from e
    log_path = _setup_logging(out, args.log_level)
    log.info("config %s, model %s, output %s", args.config, cfg.workload.model.name, out)
    val = cfg.validation.get("deepep_low_latency")
    if val:
        chk = deepep_check(val)
        for ph in ("dispatch", "combine"):
            log.info(
                "DeepEP %s: formula %.1f µs vs published %.0f µs (%+.1f %%)",
                ph,
                chk[f"{ph}_pred_us"],
                chk[f"{ph}_pub_us"],
                100 * chk[f"{ph}_rel_err"],
            )
            if abs(chk[f"{ph}_rel_err"]) > 0.05:
                log.warning("DeepEP %s check off by more than 5 %%", ph)
        atomic_write_text(
            out / "data" / "validation_deepep.csv", pd.DataFrame([chk]).to_csv(index=False)
        )
    tables = cfg.validation.get("deepep")
    if tables:
        v = deepep_validation(tables)
        p = v["params"]
        log.info(
            "DeepEP out of sample: fitted on %s -> RDMA %.1f GB/s, NVLink %.1f GB/s, latency "
            "%.1f µs; median |error| of the other rows %.1f %%",
            " + ".join(v["fit_rows"]),
            p["rdma_gb_s"],
            p["nvlink_gb_s"],
            p["latency_us"],
            v["median_abs_err_pct_out_of_sample"],
        )
        for r in v["rows"]:
            log.info(
                "DeepEP %-22s %-8s %s published %5.0f GB/s predicted %6.1f GB/s (%+.1f %%)",
                r["row"],
                r["phase"],
                "fit " if r["used_for_fit"] else "pred",
                r["published_gb_s"],
                r["predicted_gb_s"],
                r["bw_err_pct"],
            )
        atomic_write_text(
            out / "data" / "validation_deepep_tables.csv",
            pd.DataFrame(v["rows"]).to_csv(index=False),
        )
        atomic_write_json(
            out / "data" / "validation_deepep_tables.json", {**v, "git_commit": git_commit()}
        )
    frames = []
    for s in cfg.systems:
        rows = evaluate(s, cfg.workload, cfg.prefetch, cfg.tokens_per_month)
        df = pd.DataFrame(rows)
        frames.append(df)
        atomic_write_text(out / "data" / f"results_{s.name}.csv", df.to_csv(index=False))
        atomic_write_text(out / f"SUMMARY_{s.name}.md", summary_markdown(s.name, df, cfg))
        for r in rows:
            if not r["fits_memory"]:
                log.warning("%s %s: %s", s.name, r["strategy"], r["memory_note"])
            elif r["variant"] == "baseline":
                log.info(
                    "%s %-18s baseline %10.0f tok/s, comm %5.1f %%, $%.3f/1M",
                    s.name,
                    r["strategy"],
                    r["throughput_tok_s"],
                    100 * r["comm_overhead"],
                    r["cost_per_1m_tokens_usd"],
                )
            else:
                log.info(
                    "%s %-18s %-8s %10.0f tok/s (%.2fx), comm %5.1f %%, $%.3f/1M",
                    s.name,
                    r["strategy"],
                    r["variant"],
                    r["throughput_tok_s"],
                    r["speedup_vs_baseline"],
                    100 * r["comm_overhead"],
                    r["cost_per_1m_tokens_usd"],
                )
    all_df = pd.concat(frames, ignore_index=True)
    atomic_write_text(out / "data" / "all_systems_comparison.csv", all_df.to_csv(index=False))
    atomic_write_json(
        out / "data" / "config_used.json", {**config_as_dict(cfg), "git_commit": git_commit()}
    )
    if not args.no_plots:
        figs = make_figures(all_df, out)
        log.info("wrote %d figure files under %s", len(figs), out / "figures")
    log.info("log: %s", log_path)
    log.info("ANALYSIS COMPLETED SUCCESSFULLY")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point: clear one-line errors, never a traceback for bad input."""
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
