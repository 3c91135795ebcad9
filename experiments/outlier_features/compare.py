"""Compare saved runs: outlier-feature scaling with total and active parameters, MoE vs dense.

Reads every ``summary.json`` under the given directories (default: ``results/``) and

* writes PNG plots (layers affected % and token positions affected % vs total and vs active
  params, bootstrap CI error bars; outlier-dim counts vs params) and ``comparison.csv`` into
  ``--output-dir`` (default ``<first results dir>/sweep_analysis``), or
* with ``--terminal`` draws text plots instead of PNGs, and
* prints the table as ``--format table|csv|json`` (with ``--terminal --format csv|json`` stdout
  carries only the data, so ``> results.csv`` works).

Examples:
    uv run --extra experiments python -m experiments.outlier_features.compare
    uv run --extra experiments python -m experiments.outlier_features.compare --terminal
    uv run --extra experiments python -m experiments.outlier_features.compare --terminal \
        --format csv > results.csv
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file (python experiments/outlier_features/run.py)
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import experiments.common.extras_core  # noqa: F401  (exits with an install hint)

# isort: split

import pandas as pd

from experiments.common.io import atomic_path, atomic_write_text

DEFAULT_RESULTS = Path(__file__).parent / "results"
METRICS = (("layers_affected", "layers affected (%)"),
           ("positions_affected", "token positions affected (%)"))


class CompareError(ValueError):
    """Nothing usable to compare."""


def load_rows(dirs: list[Path]) -> pd.DataFrame:
    """One row per ``summary.json`` under ``dirs`` (searched recursively)."""
    files: list[Path] = []
    for d in dirs:
        if d.is_file() and d.name.endswith(".json"):
            files.append(d)
        elif d.is_dir():
            files.extend(sorted(d.rglob("summary.json")))
        else:
            raise CompareError(f"no such results directory or file: {d}")
    if not files:
        raise CompareError(f"no summary.json found under {', '.join(map(str, dirs))}")
    rows = []
    for f in files:
        try:
            s = json.loads(f.read_text())
            rows.append(_row(s, f))
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CompareError(f"{f}: not an outlier_features summary ({e})") from e
    return pd.DataFrame(rows).sort_values(["family", "total_params"]).reset_index(drop=True)


def _row(s: dict[str, Any], path: Path) -> dict[str, Any]:
    m = s["model"]
    row: dict[str, Any] = {
        "model": m["name"], "id": m["id"], "family": m["family"],
        "total_params": float(m["total_params"]), "active_params": float(m["active_params"]),
        "hidden_size": m["hidden_size"], "num_layers": m["num_layers"],
        "num_experts": m.get("num_experts", 0), "top_k": m.get("top_k", 0),
        "num_sequences": s["denominators"]["values"]["B_sequences"],
        "seq_len": s["denominators"]["values"]["S_positions"],
    }
    for tag, sfx in (("with_pos0", ""), ("without_pos0", "_nopos0")):
        r = s["results"][tag]
        b = r["bootstrap"]
        row[f"n_dims{sfx}"] = r["n_dims"]
        row[f"n_dims_ci_lo{sfx}"], row[f"n_dims_ci_hi{sfx}"] = b["n_dims_ci"]
        for key, _ in METRICS:
            row[f"{key}_pct{sfx}"] = 100 * b[key]
            lo, hi = b[f"{key}_ci"]
            row[f"{key}_pct_ci_lo{sfx}"], row[f"{key}_pct_ci_hi{sfx}"] = 100 * lo, 100 * hi
        xb = r.get("cross_batch") or {}
        row[f"xbatch_mean_jaccard{sfx}"] = xb.get("mean_jaccard")
        row[f"xbatch_stable{sfx}"] = len(xb.get("stable_dims", []))
    row["massive_dims"] = s["massive_activations"]["n_dims"]
    row["kurtosis_attn_median"] = s["kurtosis"]["attn_input"]["median"]
    row["kurtosis_ffn_median"] = s["kurtosis"]["ffn_input"]["median"]
    row["max_abs"] = s.get("max_abs_overall")
    row["criteria"] = criteria_text(s["criteria"])
    run = s.get("run") or {}
    row["corpus"] = (run.get("corpus") or {}).get("source", "?")
    row["path"] = str(path)
    return row


def criteria_text(c: dict[str, Any]) -> str:
    """``|x|>=6, >=25% layers, >=6% positions`` from a summary's ``criteria``."""
    return (f"|x|>={c['threshold']:g}, >={100 * c['layer_pct']:g}% layers, "
            f">={100 * c['seq_pct']:g}% positions")


def mixed_runs(df: pd.DataFrame) -> list[str]:
    """Warnings for runs that are not comparable: different criteria or corpora."""
    out = []
    for col, what in (("criteria", "detection criteria"), ("corpus", "corpora")):
        vals = sorted(df[col].unique())
        if len(vals) > 1:
            per = "; ".join(f"{v}: {', '.join(df.loc[df[col] == v, 'model'])}" for v in vals)
            out.append(f"runs use different {what} ({per}); their numbers are not comparable")
    return out


def plot_png(df: pd.DataFrame, out_dir: Path, sfx: str = "") -> list[Path]:
    """Scaling plots with CI error bars; returns the written files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    fig, axes = plt.subplots(2, 2, figsize=(11, 8), constrained_layout=True)
    styles = {"moe": ("o", "tab:red", "MoE"), "dense": ("s", "tab:blue", "dense")}
    for i, (key, label) in enumerate(METRICS):
        for j, xcol in enumerate(("total_params", "active_params")):
            ax = axes[i, j]
            for fam, g in df.groupby("family"):
                marker, color, name = styles.get(str(fam), ("^", "tab:gray", str(fam)))
                y = g[f"{key}_pct{sfx}"]
                yerr = [(y - g[f"{key}_pct_ci_lo{sfx}"]).clip(lower=0),
                        (g[f"{key}_pct_ci_hi{sfx}"] - y).clip(lower=0)]
                ax.errorbar(g[xcol] / 1e9, y, yerr=yerr, fmt=marker, color=color, label=name,
                            capsize=3)
                for _, r in g.iterrows():
                    ax.annotate(r["model"], (r[xcol] / 1e9, r[f"{key}_pct{sfx}"]),
                                fontsize=7, xytext=(3, 3), textcoords="offset points")
            if (df[xcol] > 0).all():
                ax.set_xscale("log")
            ax.set_xlabel(f"{xcol.replace('_', ' ')} (B)")
            ax.set_ylabel(label)
            ax.set_ylim(-3, 103)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    crit = df["criteria"].unique()
    fig.suptitle("Systematic outlier features ("
                 + (str(crit[0]) if len(crit) == 1 else "MIXED criteria, see the table") + ")"
                 + (", position 0 excluded" if sfx else ""))
    p = out_dir / f"outlier_scaling{sfx}.png"
    with atomic_path(p) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    written.append(p)

    fig, ax = plt.subplots(figsize=(7, 4.5), constrained_layout=True)
    for fam, g in df.groupby("family"):
        marker, color, name = styles.get(str(fam), ("^", "tab:gray", str(fam)))
        y = g[f"n_dims{sfx}"]
        yerr = [(y - g[f"n_dims_ci_lo{sfx}"]).clip(lower=0),
                (g[f"n_dims_ci_hi{sfx}"] - y).clip(lower=0)]
        ax.errorbar(g["total_params"] / 1e9, y, yerr=yerr, fmt=marker, color=color, label=name,
                    capsize=3)
    if (df["total_params"] > 0).all():
        ax.set_xscale("log")
    ax.set_xlabel("total params (B)")
    ax.set_ylabel("unique outlier dims")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    p = out_dir / f"outlier_counts{sfx}.png"
    with atomic_path(p) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    written.append(p)
    return written


def text_plot(df: pd.DataFrame, xcol: str, ycol: str, title: str, width: int = 60,
              height: int = 12) -> str:
    """Character scatter plot: x on a log10 scale, y in percent (0-100). M = MoE, D = dense."""
    xs = [math.log10(max(v, 1.0)) for v in df[xcol]]
    lo, hi = min(xs), max(xs)
    span = hi - lo or 1.0
    grid = [[" "] * width for _ in range(height)]
    for x, y, fam in zip(xs, df[ycol], df["family"], strict=True):
        c = min(width - 1, int((x - lo) / span * (width - 1)))
        r = height - 1 - min(height - 1, int(max(0.0, min(100.0, y)) / 100 * (height - 1)))
        mark = {"moe": "M", "dense": "D"}.get(str(fam), "?")
        grid[r][c] = "*" if grid[r][c] not in (" ", mark) else mark
    lines = [title]
    for i, row in enumerate(grid):
        label = f"{100 - i * 100 / (height - 1):5.0f}% |" if i % 3 == 0 else "       |"
        lines.append(label + "".join(row))
    lines.append("       +" + "-" * width)
    lines.append(f"        {xcol}: 10^{lo:.1f} ... 10^{hi:.1f}   (M MoE, D dense, * overlap)")
    return "\n".join(lines)


TABLE_COLS = ["model", "family", "total_params", "active_params", "n_dims", "n_dims_ci_lo",
              "n_dims_ci_hi", "layers_affected_pct", "positions_affected_pct", "n_dims_nopos0",
              "positions_affected_pct_nopos0", "xbatch_mean_jaccard", "massive_dims",
              "corpus"]


def render(df: pd.DataFrame, fmt: str) -> str:
    """The comparison table as csv, json or an aligned text table."""
    data = df.drop(columns=["path"])
    if fmt == "csv":
        return data.to_csv(index=False)
    if fmt == "json":
        return data.to_json(orient="records", indent=2) + "\n"
    t = df[TABLE_COLS].copy()
    t["total_params"] = (t["total_params"] / 1e9).map("{:.3g}B".format)
    t["active_params"] = (t["active_params"] / 1e9).map("{:.3g}B".format)
    for c in ("layers_affected_pct", "positions_affected_pct", "positions_affected_pct_nopos0"):
        t[c] = t[c].map("{:.1f}".format)
    return t.to_string(index=False) + "\n"


def build_parser(prog: str = "compare.py") -> argparse.ArgumentParser:
    """The CLI of ``compare.py`` (also ``generate_comparison_plots.py``, the seed's name)."""
    p = argparse.ArgumentParser(
        prog=prog,
        description="Comparison plots and tables over saved outlier-feature runs.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("results", nargs="*", type=Path, default=[DEFAULT_RESULTS],
                   help="result directories (searched for summary.json) or summary files")
    p.add_argument("--output-dir", type=Path,
                   help="where PNGs and comparison.csv go (default: <results>/sweep_analysis)")
    p.add_argument("--terminal", action="store_true", help="text plots instead of PNG files")
    p.add_argument("--format", choices=["table", "csv", "json"], default="table",
                   help="how the table is printed")
    p.add_argument("--without-pos0", action="store_true",
                   help="plot the variant that excludes position 0")
    return p


def main(argv: list[str] | None = None, prog: str = "compare.py") -> int:
    """Entry point; returns the exit code (2 when there is nothing valid to compare)."""
    args = build_parser(prog).parse_args(argv)
    try:
        df = load_rows(args.results)
    except CompareError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    sfx = "_nopos0" if args.without_pos0 else ""
    for w in mixed_runs(df):
        print(f"warning: {w}", file=sys.stderr)
    if args.terminal:
        if args.format == "table":
            for key, label in METRICS:
                for xcol in ("total_params", "active_params"):
                    print(text_plot(df, xcol, f"{key}_pct{sfx}", f"{label} vs {xcol}"))
                    print()
        sys.stdout.write(render(df, args.format))
        return 0
    out = args.output_dir or (args.results[0] if args.results[0].is_dir()
                              else args.results[0].parent) / "sweep_analysis"
    try:
        files = plot_png(df, out, sfx)
        files.append(atomic_write_text(out / "comparison.csv", render(df, "csv")))
    except OSError as e:
        print(f"error: cannot write to {out}: {e}", file=sys.stderr)
        return 2
    sys.stdout.write(render(df, args.format))
    if args.format == "table":
        for f in files:
            print(f"wrote {f}")
    return 0


def run_cli(prog: str = "compare.py") -> None:
    """``main`` for a script: exit with its code; a reader leaving early is not an error."""
    try:
        sys.exit(main(prog=prog))
    except BrokenPipeError:  # e.g. `compare.py --terminal | head`: the reader left early
        sys.stderr.close()
        sys.exit(0)


if __name__ == "__main__":
    run_cli()
