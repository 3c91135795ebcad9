"""Analysis of PEFT sweep results: comparison table, plots and a markdown report.

Reads only the result JSONs under ``<sweep dir>/runs`` (see experiments/common/sweep.py), so it
works on partial sweeps: failed or timed-out runs are listed, and every statistic is computed over
the completed runs that pass the filters.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from experiments.common.io import atomic_write_text
from experiments.common.sweep import load_results

COLUMNS = [
    "experiment_id",
    "model",
    "strategy",
    "augmentation",
    "data",
    "max_epochs",
    "status",
    "val_acc",
    "val_f1_macro",
    "test_acc",
    "test_f1_macro",
    "best_epoch",
    "final_train_loss",
    "final_val_loss",
    "total_params",
    "trainable_params",
    "param_efficiency",
    "training_time_seconds",
    "avg_epoch_time",
    "timestamp",
    "git_commit",
    "error",
]


def results_frame(results: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """One row per result: config, metrics and efficiency flattened to the table's columns."""
    rows = []
    for r in results:
        row = {**r.get("config", {}), **r.get("metrics", {}), **r.get("efficiency", {})}
        row.update(
            {k: r.get(k) for k in ("experiment_id", "status", "timestamp", "git_commit", "error")}
        )
        rows.append(row)
    df = pd.DataFrame(rows)
    for c in COLUMNS:
        if c not in df.columns:
            df[c] = pd.NA
    return df[COLUMNS + [c for c in df.columns if c not in COLUMNS]]


def apply_filters(
    df: pd.DataFrame,
    models: Sequence[str] | None = None,
    strategies: Sequence[str] | None = None,
    augmentation: bool | None = None,
    status: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Keep rows matching every given filter (None = no filter)."""
    if models:
        df = df[df["model"].isin(models)]
    if strategies:
        df = df[df["strategy"].isin(strategies)]
    if augmentation is not None:
        df = df[df["augmentation"].astype(bool) == augmentation]
    if status:
        df = df[df["status"].isin(status)]
    return df


def _label(r: Any) -> str:
    aug = "with aug" if bool(r["augmentation"]) else "no aug"
    return f"**{r['model']} + {r['strategy']}** ({aug})"


def _minutes(s: float) -> str:
    return f"{s / 60:.1f}m" if s >= 60 else f"{s:.1f}s"


def _stats_lines(done: pd.DataFrame, by: str) -> list[str]:
    lines = []
    for key, g in done.groupby(by, sort=True):
        std = g["test_acc"].std(ddof=1) if len(g) > 1 else 0.0
        lines.append(
            f"- **{key}**: Avg Acc={g['test_acc'].mean():.4f} ± {std:.4f}, "
            f"Best={g['test_acc'].max():.4f} ({len(g)} runs)"
        )
    return lines


def summary_report(df: pd.DataFrame, title: str = "PEFT sweep summary") -> str:
    """Markdown: counts, top 5 by test accuracy, most parameter-efficient, fastest, statistics by
    model and strategy, augmentation impact, and the runs that did not complete."""
    done = df[df["status"] == "completed"].dropna(subset=["test_acc"]).copy()
    lines = [
        f"# {title}",
        "",
        f"Experiments: {len(df)} ({len(done)} completed, "
        f"{int((df['status'] == 'failed').sum())} failed, "
        f"{int((df['status'] == 'timeout').sum())} timed out)",
        "",
    ]
    if done.empty:
        lines += ["No completed experiments match the filters yet.", ""]
    else:
        lines += ["## Top Performers", "", "### By Test Accuracy", ""]
        top = done.sort_values("test_acc", ascending=False).head(5)
        for i, r in enumerate(top.to_dict("records"), 1):
            lines.append(f"{i}. {_label(r)}: Acc={r['test_acc']:.4f}, F1={r['test_f1_macro']:.4f}")
        lines += [
            "",
            "### Most Parameter Efficient",
            "",
            "Fewest trainable parameters (ties broken by higher test accuracy).",
            "",
        ]
        eff = done.sort_values(["trainable_params", "test_acc"], ascending=[True, False]).head(5)
        for i, r in enumerate(eff.to_dict("records"), 1):
            lines.append(
                f"{i}. {_label(r)}: {int(r['trainable_params']):,} params, Acc={r['test_acc']:.4f}"
            )
        lines += ["", "### Fastest Training", ""]
        fast = done.sort_values("training_time_seconds").head(5)
        for i, r in enumerate(fast.to_dict("records"), 1):
            lines.append(
                f"{i}. {_label(r)}: {_minutes(float(r['training_time_seconds']))}, "
                f"Acc={r['test_acc']:.4f}"
            )
        lines += [
            "",
            "## Statistics by Model",
            "",
            *_stats_lines(done, "model"),
            "",
            "## Statistics by Strategy",
            "",
            *_stats_lines(done, "strategy"),
            "",
            "## Augmentation Impact",
            "",
        ]
        for flag, name in ((True, "With augmentation"), (False, "Without augmentation")):
            g = done[done["augmentation"].astype(bool) == flag]
            if len(g):
                lines.append(f"- **{name}**: Avg Acc={g['test_acc'].mean():.4f} ({len(g)} runs)")
            else:
                lines.append(f"- **{name}**: no completed runs")
        # Paired view: same model+strategy with and without augmentation.
        pairs = done.pivot_table(
            index=["model", "strategy"], columns="augmentation", values="test_acc", aggfunc="mean"
        )
        if True in pairs.columns and False in pairs.columns:
            diff = (pairs[True] - pairs[False]).dropna()
            if len(diff):
                lines.append(
                    f"- **Paired difference** (aug - no aug, {len(diff)} model+strategy "
                    f"pairs): mean {diff.mean():+.4f}"
                )
        lines.append("")
    bad = df[df["status"] != "completed"]
    if len(bad):
        lines += ["## Not completed", ""]
        for r in bad.to_dict("records"):
            lines.append(f"- {r['experiment_id']}: {r['status']} — {r['error']}")
        lines.append("")
    return "\n".join(lines)


def make_plots(df: pd.DataFrame, plot_dir: Path) -> list[Path]:
    """accuracy_comparison.png, efficiency_scatter.png, training_time.png (completed runs only)."""
    from experiments.common.plotting import new_figure, save_figure

    done = df[df["status"] == "completed"].dropna(subset=["test_acc"]).copy()
    if done.empty:
        return []
    done["label"] = (
        done["model"]
        + "+"
        + done["strategy"]
        + "\n"
        + done["augmentation"].map(lambda a: "aug" if bool(a) else "no aug")
    )
    done = done.sort_values(["model", "strategy", "augmentation"])
    written = []
    fig, ax = new_figure(max(6.0, 0.6 * len(done)), 4.5)
    x = range(len(done))
    ax.bar([i - 0.2 for i in x], done["val_acc"], 0.4, label="val acc")
    ax.bar([i + 0.2 for i in x], done["test_acc"], 0.4, label="test acc")
    ax.set_xticks(list(x), done["label"], rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.set_title("Accuracy by model, strategy and augmentation")
    ax.legend()
    written += save_figure(fig, plot_dir / "accuracy_comparison.png")

    fig, ax = new_figure()
    markers = {"lora": "o", "adalora": "s", "ia3": "^"}
    for (model, strategy), g in done.groupby(["model", "strategy"]):
        ax.scatter(
            g["trainable_params"],
            g["test_acc"],
            marker=markers.get(strategy, "x"),
            label=f"{model}+{strategy}",
        )
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log)")
    ax.set_ylabel("test accuracy")
    ax.set_title("Parameter efficiency")
    ax.legend(fontsize=7, ncol=2)
    written += save_figure(fig, plot_dir / "efficiency_scatter.png")

    fig, ax = new_figure(max(6.0, 0.6 * len(done)), 4.5)
    ax.bar(list(x), done["training_time_seconds"] / 60)
    ax.set_xticks(list(x), done["label"], rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("training time (minutes)")
    ax.set_title("Training time")
    written += save_figure(fig, plot_dir / "training_time.png")
    return written


def analyze(
    sweep_dir: Path,
    output_dir: Path,
    *,
    models: Sequence[str] | None = None,
    strategies: Sequence[str] | None = None,
    augmentation: bool | None = None,
    status: Sequence[str] | None = None,
    plots: bool = True,
) -> dict[str, Any]:
    """Write comparison_table.csv, summary_report.md and (optionally) plots/ under output_dir."""
    results, unreadable = load_results(sweep_dir)
    if not results:
        raise FileNotFoundError(f"no result JSONs under {sweep_dir / 'runs'}; run the sweep first")
    df = apply_filters(results_frame(results), models, strategies, augmentation, status)
    df = df.sort_values(["model", "strategy", "augmentation"], na_position="last")
    table = output_dir / "comparison_table.csv"
    atomic_write_text(table, df.to_csv(index=False))
    report = summary_report(df)
    if unreadable:
        report += "\nUnreadable result files (skipped): " + ", ".join(p.name for p in unreadable)
        report += "\n"
    atomic_write_text(output_dir / "summary_report.md", report)
    figs = make_plots(df, output_dir / "plots") if plots else []
    return {
        "rows": len(df),
        "table": table,
        "report": output_dir / "summary_report.md",
        "plots": figs,
        "unreadable": unreadable,
    }
