"""Statistics, plots and REPORT.md from saved results (no model needed).

Every comparison is paired by prompt (or by held-out chunk for perplexity) against the baseline
config: paired t-test, Cohen's d_z = mean(diff) / sd(diff), Wilcoxon signed-rank, a percentile
bootstrap CI of the mean difference (prompts resampled with replacement), and Holm's correction
across
the compared configs, separately per metric and test.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from experiments.common.io import atomic_path, atomic_write_json, atomic_write_text
from experiments.common.provenance import git_commit

SCALAR_COLUMNS = [
    "config_name",
    "prompt_index",
    "prompt_text",
    "prompt_category",
    "generated_text",
    "avg_experts_per_token",
    "std_experts_per_token",
    "min_experts",
    "max_experts",
    "inference_time_sec",
    "tokens_per_sec",
    "expert_utilization_cv",
    "expert_utilization_max_min_ratio",
    "unused_expert_frac",
    "num_input_tokens",
    "num_output_tokens",
    "routing_decisions",
    "experts_implementation",
    "model",
    "device",
    "dtype",
]
#: metric -> (label, "lower"/"higher" is better, or None when neither)
TESTED_METRICS: dict[str, tuple[str, str | None]] = {
    "avg_experts_per_token": ("experts per token", None),
    "inference_time_sec": ("inference time (s)", "lower"),
    "tokens_per_sec": ("tokens/s", "higher"),
    "expert_utilization_cv": ("expert-utilisation CV", "lower"),
}
N_BOOT = 10_000
#: Fewest pairs for which a test is run and a significance claim can be made. With n <= 5 the
#: two-sided exact Wilcoxon signed-rank p cannot go below 0.0625 (2 / 2^5), so no rank test could
#: ever agree with a t-test's "significant", and a t-test's normality assumption cannot be checked.
MIN_N = 6
ALPHA_CLAIM = 0.05


def verdict(r: dict[str, Any], key: str = "p_t_holm") -> str:
    """What may be said about one paired comparison: a test result or why there is none."""
    if r.get("no_test"):
        return f"no test ({r['no_test']})"
    p = r.get(key)
    if p is None:
        return "no test"
    return "significant" if p < ALPHA_CLAIM else "not significant"


def load_saved(output: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
    """Read experiment and perplexity results plus run metadata from ``output/checkpoints``."""
    ck = Path(output) / "checkpoints"
    exp_dir = ck / "experiments"
    found: dict[str, dict[str, Any]] = {}
    files = sorted(exp_dir.glob("*.json")) if exp_dir.exists() else []
    latest = ck / "latest_checkpoint.json"
    if not files and latest.exists():
        found.update(json.loads(latest.read_text(encoding="utf-8")).get("results", {}))
    for f in files:
        found[f.stem] = json.loads(f.read_text(encoding="utf-8"))
    if not found:
        raise ValueError(f"no saved results under {ck}; run run_bh_experiments.py first")
    meta_path = ck / "run_meta.json"
    meta = json.loads(meta_path.read_text(encoding="utf-8")) if meta_path.exists() else {}
    exps = [r for k, r in sorted(found.items()) if not k.endswith("__perplexity")]
    ppls = [r for k, r in sorted(found.items()) if k.endswith("__perplexity")]
    return exps, ppls, meta


def results_frame(exps: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per experiment with the scalar columns (the seed's CSV plus a few more)."""
    df = pd.DataFrame([{c: r.get(c) for c in SCALAR_COLUMNS} for r in exps])
    for c in ("alpha", "temperature", "min_k", "max_k", "p_value", "correction", "method"):
        df[c] = [r["routing_config"].get(c) for r in exps]
    return df


def cohens_dz(diff: np.ndarray) -> float | None:
    """Cohen's d_z for paired data; None when the differences have no spread."""
    sd = float(np.std(diff, ddof=1)) if diff.size > 1 else 0.0
    return float(np.mean(diff) / sd) if sd > 0 else None


def bootstrap_ci(
    diff: np.ndarray, n_boot: int = N_BOOT, level: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean paired difference (pairs resampled together)."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, diff.size, size=(n_boot, diff.size))
    means = diff[idx].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def paired_test(base: np.ndarray, other: np.ndarray) -> dict[str, Any]:
    """Paired statistics of ``other - base``; tests only where they mean something.

    Always reported: n, means, mean Δ, d_z (None if sd(Δ) = 0), a 95 % bootstrap CI of mean Δ
    (n >= 2). The paired t-test and Wilcoxon run only when n >= MIN_N and the differences vary;
    otherwise ``no_test`` says why and every p stays None, so no significance can be claimed from
    a deterministic shift (zero-variance Δ) or from too few pairs.
    """
    from scipy import stats

    diff = other - base
    n = int(diff.size)
    out: dict[str, Any] = {
        "n": n,
        "test": "paired t-test (scipy.stats.ttest_rel); Wilcoxon signed-rank as a check",
        "mean_baseline": float(base.mean()) if n else None,
        "mean_config": float(other.mean()) if n else None,
        "mean_diff": float(diff.mean()) if n else None,
        "pct_change": float(diff.mean() / base.mean() * 100) if n and base.mean() else None,
        "t": None,
        "p_t": None,
        "d_z": cohens_dz(diff),
        "wilcoxon_W": None,
        "p_wilcoxon": None,
        "ci_low": None,
        "ci_high": None,
        "no_test": None,
    }
    if n >= 2:
        out["ci_low"], out["ci_high"] = bootstrap_ci(diff)
    if n < MIN_N:
        out["no_test"] = f"n = {n} < {MIN_N} pairs"
        return out
    if not np.std(diff) > 0:
        out["no_test"] = "the differences have zero variance"
        return out
    t = stats.ttest_rel(other, base)
    out["t"], out["p_t"] = float(t.statistic), float(t.pvalue)
    try:
        w = stats.wilcoxon(other, base)
        out["wilcoxon_W"], out["p_wilcoxon"] = float(w.statistic), float(w.pvalue)
    except ValueError:
        pass
    return out


def holm(pvalues: list[float | None]) -> list[float | None]:
    """Holm-adjusted p-values (None entries stay None and are not counted)."""
    from statsmodels.stats.multitest import multipletests

    present = [(i, p) for i, p in enumerate(pvalues) if p is not None]
    out: list[float | None] = [None] * len(pvalues)
    if present:
        adj = multipletests([p for _, p in present], method="holm")[1]
        for (i, _), a in zip(present, adj, strict=True):
            out[i] = float(a)
    return out


def compare_to_baseline(df: pd.DataFrame, baseline: str) -> dict[str, list[dict[str, Any]]]:
    """Paired tests of every config against ``baseline`` for each tested metric, Holm-adjusted."""
    if baseline not in set(df.config_name):
        return {}
    base = df[df.config_name == baseline].set_index("prompt_index")
    out: dict[str, list[dict[str, Any]]] = {}
    for metric in TESTED_METRICS:
        rows = []
        for cfg in [c for c in df.config_name.unique() if c != baseline]:
            other = df[df.config_name == cfg].set_index("prompt_index")
            common = base.index.intersection(other.index)
            if len(common) == 0:
                continue
            b = base.loc[common, metric].to_numpy(dtype=float)
            o = other.loc[common, metric].to_numpy(dtype=float)
            rows.append({"config": cfg, "metric": metric, **paired_test(b, o)})
        for key in ("p_t", "p_wilcoxon"):
            for r, a in zip(rows, holm([r[key] for r in rows]), strict=True):
                r[f"{key}_holm"] = a
        out[metric] = rows
    return out


def quality_rows(ppls: list[dict[str, Any]], *, grid: bool = False) -> list[dict[str, Any]]:
    """Per-config quality against native top-k on the held-out text (main configs, or the grid).

    The paired test is on per-chunk mean NLL, config vs native on the same chunk, Holm-adjusted
    across the configs of the table.
    """
    rows = []
    for p in ppls:
        if bool(p.get("grid")) != grid:
            continue
        cfg = p["routing_config"]
        dist = p.get("k_distribution", {})
        row: dict[str, Any] = {
            "config": p["config_name"],
            "method": cfg["method"],
            "p_value": cfg["p_value"] if cfg["method"] == "bh" else "top-k",
            "alpha": cfg["alpha"] if cfg["method"] == "bh" else None,
            "temperature": cfg["temperature"],
            "perplexity": p["perplexity"],
            "native_perplexity": p.get("native_perplexity"),
            "mean_nll": p["mean_nll"],
            "delta_nll": p.get("delta_nll"),
            "mean_kl": p.get("mean_kl"),
            "tokens": p["tokens"],
            "avg_experts_per_token": p["avg_experts_per_token"],
            **{
                f"k_{q}": dist.get(q)
                for q in ("q10", "q25", "q50", "q75", "q90", "share_at_min_k", "share_at_max_k")
            },
        }
        chunks = p["chunks"]
        if chunks and "native_mean_nll" in chunks[0]:
            b = np.array([c["native_mean_nll"] for c in chunks])
            o = np.array([c["mean_nll"] for c in chunks])
            row["nll_test"] = paired_test(b, o)
        rows.append(row)
    tested = [r for r in rows if "nll_test" in r]
    for r, a in zip(tested, holm([r["nll_test"]["p_t"] for r in tested]), strict=True):
        r["nll_test"]["p_t_holm"] = a
    return rows


def _grid_key(cfg: dict[str, Any]) -> tuple[Any, ...]:
    return (cfg["p_value"], cfg["alpha"], cfg["min_k"], cfg["max_k"], cfg["correction"])


def sensitivity(ppls: list[dict[str, Any]]) -> dict[str, Any]:
    """The null x alpha x temperature table and what it says, from the saved held-out results.

    Rows: every BH held-out result (grid and named configs). ``first_layer_changed`` is the share
    of held-out tokens whose k at the first MoE layer differs from the same (null, alpha) at the
    lowest temperature present: identical inputs there, and the selection is a prefix of the
    native order, so a different k is a different expert set.
    """
    bh = [p for p in ppls if p["routing_config"]["method"] == "bh"]
    by_key: dict[tuple[Any, ...], dict[float, dict[str, Any]]] = {}
    for p in bh:
        by_key.setdefault(_grid_key(p["routing_config"]), {})[
            p["routing_config"]["temperature"]
        ] = p
    rows = []
    for key, temps in sorted(by_key.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        t0 = min(temps)
        ref = temps[t0].get("first_layer_k") or []
        for t, p in sorted(temps.items()):
            fk = p.get("first_layer_k") or []
            changed = None
            if t != t0 and ref and len(fk) == len(ref):
                changed = sum(a != b for a, b in zip(fk, ref, strict=True)) / len(ref)
            d = p.get("k_distribution", {})
            rows.append(
                {
                    "p_value": key[0],
                    "alpha": key[1],
                    "temperature": t,
                    "config": p["config_name"],
                    "mean_k": d.get("mean", p["avg_experts_per_token"]),
                    "q10": d.get("q10"),
                    "q50": d.get("q50"),
                    "q90": d.get("q90"),
                    "share_at_min_k": d.get("share_at_min_k"),
                    "share_at_max_k": d.get("share_at_max_k"),
                    "min_k": key[2],
                    "max_k": key[3],
                    "perplexity": p["perplexity"],
                    "delta_nll": p.get("delta_nll"),
                    "mean_kl": p.get("mean_kl"),
                    "first_layer_changed": changed,
                }
            )
    verdicts = []
    for null in dict.fromkeys(r["p_value"] for r in rows):
        sub = [r for r in rows if r["p_value"] == null]
        t_lo = min(r["temperature"] for r in sub)
        at_t = sorted((r for r in sub if r["temperature"] == t_lo), key=lambda r: r["alpha"])
        k_lo, k_hi = at_t[0]["mean_k"], at_t[-1]["mean_k"]
        changes = [r["first_layer_changed"] for r in sub if r["first_layer_changed"] is not None]
        pinned = all((r["share_at_min_k"] or 0) >= 0.99 for r in sub)
        verdicts.append(
            {
                "p_value": null,
                "alphas": [at_t[0]["alpha"], at_t[-1]["alpha"]],
                "temperature": t_lo,
                "mean_k_low_alpha": k_lo,
                "mean_k_high_alpha": k_hi,
                # 0.01 experts/token: below that a change is invisible in every table here.
                "alpha_matters": len(at_t) > 1 and (k_hi - k_lo) >= 0.01,
                "temperature_matters": bool(changes) and max(changes) > 0,
                "max_first_layer_changed": max(changes) if changes else None,
                "pinned_at_min_k": pinned,
                "mean_k_range": [min(r["mean_k"] for r in sub), max(r["mean_k"] for r in sub)],
                "delta_nll_range": _range([r["delta_nll"] for r in sub]),
                "kl_range": _range([r["mean_kl"] for r in sub]),
            }
        )
    return {"rows": rows, "verdicts": verdicts}


def _range(xs: list[float | None]) -> list[float] | None:
    v = [x for x in xs if x is not None]
    return [min(v), max(v)] if v else None


def _same_selection_model(c: dict[str, Any]) -> dict[str, Any]:
    """``unselected`` at T = 1 selects exactly as ``probability`` at T = 1 (log softmax(l) is a
    monotone map of the probabilities, against the same skipped experts), so it counts as that."""
    c = dict(c)
    if c.get("p_value") == "unselected" and c.get("temperature") == 1.0:
        c["p_value"] = "probability"
    return c


def temperature_pairs(configs: dict[str, dict[str, Any]]) -> list[tuple[str, str]]:
    """Pairs of configs identical except for temperature (and name/description), lower T first;
    ``unselected`` at T = 1 pairs with ``probability`` (the seed's bh_moderate / bh_adaptive)."""
    names = sorted(configs)
    pairs = []
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            ca, cb = _same_selection_model(configs[a]), _same_selection_model(configs[b])
            ta, tb = ca.pop("temperature"), cb.pop("temperature")
            for c in (ca, cb):
                c.pop("name", None)
                c.pop("description", None)
            if ca == cb and ta != tb:
                pairs.append((a, b) if ta < tb else (b, a))
    return pairs


def temperature_effect(
    exps: list[dict[str, Any]], ppls: list[dict[str, Any]], configs: dict[str, dict[str, Any]]
) -> list[dict[str, Any]]:
    """For each temperature pair: same-input selection agreement and downstream differences."""
    by = {(r["config_name"], r["prompt_index"]): r for r in exps}
    ppl = {p["config_name"]: p for p in ppls}
    out = []
    for lo, hi in temperature_pairs(configs):
        same_tok = tot_tok = same_text = n = 0
        diffs = []
        for (c, i), r in by.items():
            if c != lo or (hi, i) not in by:
                continue
            o = by[(hi, i)]
            a, b = r.get("first_layer_prompt_k", []), o.get("first_layer_prompt_k", [])
            same_tok += sum(int(x == y) for x, y in zip(a, b, strict=False))
            tot_tok += min(len(a), len(b))
            same_text += int(r["generated_text"] == o["generated_text"])
            diffs.append(o["avg_experts_per_token"] - r["avg_experts_per_token"])
            n += 1
        if n == 0:
            continue
        row = {
            "low_t": lo,
            "high_t": hi,
            "t_low": configs[lo]["temperature"],
            "t_high": configs[hi]["temperature"],
            "prompts": n,
            "first_layer_tokens": tot_tok,
            "first_layer_same_k": same_tok,
            "identical_generations": same_text,
            "mean_diff_experts": float(np.mean(diffs)),
        }
        if lo in ppl and hi in ppl:
            row["ppl_low"], row["ppl_high"] = ppl[lo]["perplexity"], ppl[hi]["perplexity"]
        out.append(row)
    return out


def summary_table(df: pd.DataFrame) -> pd.DataFrame:
    """Per-config means and standard deviations of the seed's metrics."""
    g = df.groupby("config_name", sort=False)
    t = pd.DataFrame(
        {
            "avg_experts": g.avg_experts_per_token.mean(),
            "sd_experts": g.avg_experts_per_token.std(ddof=1),
            "min_experts": g.min_experts.min(),
            "max_experts": g.max_experts.max(),
            "time_s": g.inference_time_sec.mean(),
            "tokens_per_s": g.tokens_per_sec.mean(),
            "util_cv": g.expert_utilization_cv.mean(),
            "max_min_ratio": g.expert_utilization_max_min_ratio.median(),
            "n": g.size(),
        }
    )
    return t


def layer_hist_frame(exps: list[dict[str, Any]]) -> pd.DataFrame:
    """Long table of per-layer k histograms: config, prompt, layer, k, count."""
    rows = []
    for r in exps:
        for layer, h in r["per_layer_k_hist"].items():
            for k, c in enumerate(h):
                if c:
                    rows.append(
                        {
                            "config_name": r["config_name"],
                            "prompt_index": r["prompt_index"],
                            "layer": int(layer),
                            "k": k,
                            "count": c,
                        }
                    )
    return pd.DataFrame(rows, columns=["config_name", "prompt_index", "layer", "k", "count"])


# -- plots ------------------------------------------------------------------------------------
def make_plots(df: pd.DataFrame, hist: pd.DataFrame, out: Path) -> list[str]:
    """The seed's five plots plus per-layer k histograms; returns the file names written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    order = list(dict.fromkeys(df.config_name))
    g = df.groupby("config_name", sort=False)
    written = []

    def _bar(metric: str, ylabel: str, fname: str, title: str) -> None:
        m = g[metric].mean().reindex(order)
        s = g[metric].std(ddof=1).reindex(order).fillna(0.0)
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.bar(order, m.to_numpy(), yerr=s.to_numpy(), capsize=4, color="#4C72B0")
        ax.set_ylabel(ylabel)
        ax.set_title(title + " (mean ± sd over prompts)")
        ax.tick_params(axis="x", rotation=30)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=120)
        plt.close(fig)
        written.append(fname)

    _bar(
        "avg_experts_per_token",
        "experts per token",
        "avg_experts_comparison.png",
        "Experts per token",
    )
    _bar("inference_time_sec", "seconds", "inference_time_comparison.png", "Inference time")
    _bar(
        "expert_utilization_cv",
        "CV of expert counts",
        "expert_utilization_cv.png",
        "Expert utilisation CV (lower = more even)",
    )

    cats = list(dict.fromkeys(df.prompt_category))
    fig, axes = plt.subplots(1, len(cats), figsize=(4 * len(cats), 4), sharey=True, squeeze=False)
    for ax, cat in zip(axes[0], cats, strict=True):
        sub = df[df.prompt_category == cat]
        ax.boxplot([sub[sub.config_name == c].avg_experts_per_token.to_numpy() for c in order])
        ax.set_xticks(range(1, len(order) + 1), order, rotation=45, ha="right")
        ax.set_title(cat)
    axes[0][0].set_ylabel("experts per token")
    fig.tight_layout()
    fig.savefig(out / "experts_by_category.png", dpi=120)
    plt.close(fig)
    written.append("experts_by_category.png")

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for c in order:
        sub = df[df.config_name == c]
        ax.scatter(sub.avg_experts_per_token, sub.inference_time_sec, label=c, alpha=0.8)
    ax.set_xlabel("experts per token")
    ax.set_ylabel("inference time (s)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "experts_vs_latency.png", dpi=120)
    plt.close(fig)
    written.append("experts_vs_latency.png")

    if not hist.empty:
        layers = sorted(hist.layer.unique())
        fig, axes = plt.subplots(
            1, len(order), figsize=(3.2 * len(order), 3.5), sharey=True, squeeze=False
        )
        for ax, c in zip(axes[0], order, strict=True):
            sub = (
                hist[hist.config_name == c]
                .groupby(["layer", "k"])["count"]
                .sum()
                .unstack(fill_value=0)
            )
            sub = sub.reindex(layers, fill_value=0)
            frac = sub.div(sub.sum(axis=1), axis=0).fillna(0.0)
            ax.imshow(
                frac.to_numpy(),
                aspect="auto",
                origin="lower",
                cmap="viridis",
                vmin=0,
                vmax=1,
                extent=(
                    frac.columns.min() - 0.5,
                    frac.columns.max() + 0.5,
                    -0.5,
                    len(layers) - 0.5,
                ),
            )
            ax.set_title(c, fontsize=9)
            ax.set_xlabel("k")
        axes[0][0].set_ylabel("MoE layer (order)")
        fig.tight_layout()
        fig.savefig(out / "per_layer_k_histograms.png", dpi=120)
        plt.close(fig)
        written.append("per_layer_k_histograms.png")
    return written


def plot_sensitivity(sens: dict[str, Any], out: Path) -> list[str]:
    """Mean experts/token and ΔNLL vs alpha, one line per (null, temperature)."""
    rows = sens["rows"]
    if not rows:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    keys = sorted({(r["p_value"], r["temperature"]) for r in rows})
    for null, t in keys:
        sub = sorted(
            (r for r in rows if r["p_value"] == null and r["temperature"] == t),
            key=lambda r: r["alpha"],
        )
        label = f"{null}, T={t:g}"
        style = "-" if t == min(k[1] for k in keys) else "--"
        a1.plot([r["alpha"] for r in sub], [r["mean_k"] for r in sub], style, marker="o",
                label=label)  # fmt: skip
        a2.plot([r["alpha"] for r in sub], [r["delta_nll"] or 0.0 for r in sub], style,
                marker="o", label=label)  # fmt: skip
    a1.set_xlabel("alpha")
    a1.set_ylabel("mean experts per token (held-out)")
    a2.set_xlabel("alpha")
    a2.set_ylabel("ΔNLL vs native top-k (nats/token)")
    a1.legend(fontsize=7)
    fig.tight_layout()
    name = "sensitivity_null_alpha_temperature.png"
    with atomic_path(out / name) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return [name]


# -- report -----------------------------------------------------------------------------------
def _f(x: Any, nd: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    if isinstance(x, float):
        return f"{x:.{nd}g}" if abs(x) < 1e-3 and x != 0 else f"{x:.{nd}f}"
    return str(x)


def _p(x: float | None) -> str:
    if x is None:
        return "n/a"
    return "<1e-4" if x < 1e-4 else f"{x:.4f}"


def _clean(obj: Any) -> Any:
    """Replace NaN/inf by None so the JSON stays valid."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, np.generic):
        return _clean(obj.item())
    return obj


def build_report(
    exps: list[dict[str, Any]],
    ppls: list[dict[str, Any]],
    meta: dict[str, Any],
    output: Path,
    baseline: str = "topk_8",
) -> dict[str, Any]:
    """Write CSV, JSON, plots and REPORT.md into ``output``; return the analysis summary."""
    output = Path(output)
    if not exps:
        raise ValueError("no experiment results to analyse")
    df = results_frame(exps)
    hist = layer_hist_frame(exps)
    # Generated text from small models can hold a bare carriage return; quote every text field so
    # any
    # CSV reader keeps it inside its cell.
    atomic_write_text(
        output / "bh_routing_results.csv", df.to_csv(index=False, quoting=csv.QUOTE_NONNUMERIC)
    )
    atomic_write_text(output / "per_layer_k_histograms.csv", hist.to_csv(index=False))
    atomic_write_json(
        output / "bh_routing_results.json",
        _clean({"git_commit": git_commit(), "meta": meta, "experiments": exps, "perplexity": ppls}),
    )
    configs = {r["config_name"]: r["routing_config"] for r in exps}
    if baseline not in configs:
        baseline = next(iter(configs))
    tests = compare_to_baseline(df, baseline)
    ppl_rows = quality_rows(ppls) if ppls else []
    grid_rows = quality_rows(ppls, grid=True) if ppls else []
    sens = sensitivity(ppls) if ppls else {"rows": [], "verdicts": []}
    if ppl_rows or grid_rows:
        atomic_write_text(
            output / "perplexity.csv",
            pd.DataFrame(
                [{k: v for k, v in r.items() if k != "nll_test"} for r in ppl_rows + grid_rows]
            ).to_csv(index=False),
        )
    if sens["rows"]:
        atomic_write_text(
            output / "sensitivity.csv", pd.DataFrame(sens["rows"]).to_csv(index=False)
        )
    temp = temperature_effect(exps, ppls, configs)
    summ = summary_table(df)
    cat = df.pivot_table(
        index="config_name",
        columns="prompt_category",
        values="avg_experts_per_token",
        aggfunc="mean",
        sort=False,
    )
    plots = make_plots(df, hist, output / "plots")
    plots += plot_sensitivity(sens, output / "plots")
    layer_avg = (
        (
            hist.assign(kc=hist.k * hist["count"])
            .groupby(["config_name", "layer"])[["kc", "count"]]
            .sum()
            .pipe(lambda t: t.kc / t["count"])
            .unstack("layer")
        )
        if not hist.empty
        else None
    )
    analysis = {
        "git_commit": git_commit(),
        "baseline": baseline,
        "meta": meta,
        "configs": configs,
        "summary": summ.reset_index().to_dict(orient="records"),
        "by_category": cat.reset_index().to_dict(orient="records"),
        "tests": tests,
        "perplexity": ppl_rows,
        "grid_quality": grid_rows,
        "sensitivity": sens,
        "min_n": MIN_N,
        "temperature": temp,
        "per_layer_avg_k": layer_avg.reset_index().to_dict(orient="records")
        if layer_avg is not None
        else [],
        "plots": plots,
    }
    atomic_write_json(output / "analysis_summary.json", _clean(analysis))
    atomic_write_text(output / "REPORT.md", render_report(analysis, summ, cat, layer_avg))
    return analysis


def _md_table(frame: pd.DataFrame, index_name: str) -> str:
    cols = [index_name, *map(str, frame.columns)]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for idx, row in frame.iterrows():
        lines.append("| " + " | ".join([str(idx), *(_f(v) for v in row.to_list())]) + " |")
    return "\n".join(lines)


def _conclusions(a: dict[str, Any]) -> list[str]:
    base = a["baseline"]
    out = []
    exp_rows = {r["config"]: r for r in a["tests"].get("avg_experts_per_token", [])}
    tps_rows = {r["config"]: r for r in a["tests"].get("tokens_per_sec", [])}
    ppl = {r["config"]: r for r in a["perplexity"]}
    for cfg, r in exp_rows.items():
        v = verdict(r)
        direction = "fewer" if r["mean_diff"] < 0 else "more"
        s = (
            f"**{cfg}** used {_f(r['mean_config'])} experts per token against "
            f"{_f(r['mean_baseline'])} for {base} ({_f(r['pct_change'], 1)} %, n = {r['n']} "
            f"prompts, d_z {_f(r['d_z'], 2)}, 95 % bootstrap CI of the difference "
            f"[{_f(r['ci_low'])}, {_f(r['ci_high'])}]); "
        )
        if r["mean_diff"] == 0:
            s += "no change at all. "
        elif v == "significant":
            s += (
                f"{direction} experts, significant after Holm "
                f"(paired t, p_holm {_p(r['p_t_holm'])}). "
            )
        elif v == "not significant":
            s += f"not significant after Holm (paired t, p_holm {_p(r['p_t_holm'])}). "
        else:
            s += f"{v}: no significance is claimed. "
        t = tps_rows.get(cfg)
        if t is not None:
            s += (
                f"Throughput {_f(t['mean_config'], 1)} vs {_f(t['mean_baseline'], 1)} tokens/s "
                f"({_f(t['pct_change'], 1)} %, {verdict(t)}). "
            )
        if cfg in ppl:
            q = ppl[cfg]
            nt = q.get("nll_test", {})
            s += (
                f"Held-out perplexity {_f(q['perplexity'])} vs native top-k "
                f"{_f(q['native_perplexity'])} (ΔNLL {_f(q['delta_nll'])} nats/token, "
                f"KL(native‖config) {_f(q['mean_kl'])} nats/token; per-chunk NLL test over "
                f"n = {nt.get('n', 'n/a')} chunks: {verdict(nt) if nt else 'no test'})."
            )
        out.append(s)
    return out


def _sensitivity_lines(sens: dict[str, Any]) -> list[str]:
    """The sensitivity table and plain sentences on which null makes alpha and T matter."""
    rows = sens["rows"]
    if not rows:
        return ["No held-out BH results in this run (perplexity or grid skipped)."]
    L = [
        "Held-out text, teacher-forced; every row also ran native top-k on the same chunks. "
        "k quantiles are over all (token, MoE layer) decisions; ΔNLL = config − native "
        "(nats/token); KL = mean KL(native ‖ config) of the next-token distribution; "
        "'T changes k' = share of held-out tokens whose k at the first MoE layer (identical "
        "inputs) differs from the lowest temperature of the same null and alpha.",
        "",
        "| null | alpha | T | mean k | q10 | q50 | q90 | share at min_k | share at max_k | "
        "perplexity | ΔNLL | KL | T changes k |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ch = r["first_layer_changed"]
        L.append(
            f"| {r['p_value']} | {r['alpha']:g} | {r['temperature']:g} | {_f(r['mean_k'])} | "
            f"{_f(r['q10'])} | {_f(r['q50'])} | {_f(r['q90'])} | "
            f"{_f(r['share_at_min_k'])} | {_f(r['share_at_max_k'])} | {_f(r['perplexity'])} | "
            f"{_f(r['delta_nll'])} | {_f(r['mean_kl'])} | "
            f"{'–' if ch is None else _f(ch * 100, 1) + ' %'} |"
        )
    L += ["", "What the table says:", ""]
    for v in sens["verdicts"]:
        name = f"`{v['p_value']}`"
        if v["pinned_at_min_k"]:
            s = (
                f"- {name}: pinned at min_k (≥ 99 % of decisions) in every row, so neither alpha "
                "nor temperature can matter under it"
            )
        elif v["alphas"][0] == v["alphas"][1]:
            s = f"- {name}: alpha not varied (mean k {_f(v['mean_k_low_alpha'])})"
        else:
            a_lo, a_hi = v["alphas"]
            s = (
                f"- {name}: alpha {'matters' if v['alpha_matters'] else 'does not matter'} "
                f"(mean k {_f(v['mean_k_low_alpha'])} at alpha {a_lo:g} → "
                f"{_f(v['mean_k_high_alpha'])} at {a_hi:g}, T = {v['temperature']:g})"
            )
        if v["max_first_layer_changed"] is None:
            s += "; temperature not varied"
        elif v["temperature_matters"]:
            s += (
                f"; temperature changes the selection (up to "
                f"{_f(v['max_first_layer_changed'] * 100, 1)} % of first-layer decisions)"
            )
        else:
            s += (
                "; temperature did not change the selection on any first-layer decision here "
                "(only the mixing weights)"
            )
        if v["delta_nll_range"] is not None:
            s += (
                f"; quality cost vs native top-k: ΔNLL {_f(v['delta_nll_range'][0])} to "
                f"{_f(v['delta_nll_range'][1])} nats/token, KL {_f(v['kl_range'][0])} to "
                f"{_f(v['kl_range'][1])}"
            )
        L.append(s + ".")
    movers = [v["p_value"] for v in sens["verdicts"] if v["alpha_matters"]]
    t_movers = [v["p_value"] for v in sens["verdicts"] if v["temperature_matters"]]
    L += [
        "",
        f"In short: alpha changes how many experts are kept under "
        f"{', '.join(f'`{m}`' for m in movers) or 'no null in this run'}; temperature changes "
        f"which experts are kept under {', '.join(f'`{m}`' for m in t_movers) or 'no null'}.",
    ]
    return L


def render_report(
    a: dict[str, Any], summ: pd.DataFrame, cat: pd.DataFrame, layer_avg: pd.DataFrame | None
) -> str:
    """The markdown report; every sentence with a number is computed from ``a``."""
    meta = a["meta"]
    base = a["baseline"]
    L: list[str] = ["# BH routing vs top-k: report", ""]
    model = meta.get("model_id") or (a["summary"] and "unknown")
    n_prompts = int(summ["n"].max())
    L += [
        "## Setup",
        "",
        f"- Model: `{model}` ({meta.get('architecture', '?')}, {meta.get('num_experts', '?')} "
        "experts, "
        f"native top-{meta.get('native_top_k', '?')}, {meta.get('num_moe_layers', '?')} MoE "
        "layers, "
        f"native renormalisation: {meta.get('native_renormalize', '?')})",
        f"- Experts implementation: `{meta.get('experts_implementation', '?')}`; device "
        f"`{meta.get('device', '?')}`, dtype `{meta.get('dtype', '?')}`; torch "
        f"{meta.get('torch', '?')}, "
        f"transformers {meta.get('transformers', '?')}",
        f"- {len(a['configs'])} configs × {n_prompts} prompts, greedy decoding; baseline `{base}`.",
    ]
    null = meta.get("null")
    if null:
        L.append(
            f"- Empirical null: {null['calibration_tokens']} calibration tokens, at least "
            f"{min(null['samples_per_layer'].values())} scores per layer; smallest attainable p "
            f"{_f(null['min_attainable_p'])} (BH at rank 1 needs p ≤ alpha/E, e.g. "
            f"{_f(0.01 / null['num_experts'])} for alpha 0.01)."
        )
    if str(model).startswith("tiny-"):
        L.append(
            "- **This run used a tiny random model.** The numbers test the pipeline; they say "
            "nothing "
            "about how BH routing behaves in a trained MoE."
        )
    L += [
        "",
        "## Configurations",
        "",
        "| config | method | alpha | temperature | min_k | max_k | p-value | "
        "correction | renormalize |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, c in a["configs"].items():
        if c["method"] == "topk":
            L.append(
                f"| {name} | top-{c['k']} | – | {c['temperature']} | – | – | – | – | "
                f"{c['renormalize']} |"
            )
        else:
            L.append(
                f"| {name} | BH | {c['alpha']} | {c['temperature']} | {c['min_k']} | {c['max_k']} "
                "| "
                f"{c['p_value']} | {c['correction']} | {c['renormalize']} |"
            )
    L += [
        "",
        "## Summary by configuration",
        "",
        "Means over prompts; experts per token is averaged over every (token, MoE layer) routing "
        "decision, prompt and generated tokens alike.",
        "",
        _md_table(summ, "config"),
        "",
    ]
    if a["perplexity"]:
        L += [
            "## Quality against native top-k (held-out text)",
            "",
            "Each chunk is run with the native router and with the config on the same tokens. "
            "ΔNLL = config − native (nats/token); KL = mean KL(native ‖ config); the test is "
            "paired over chunks (test, n, d_z, CI and verdict as in the tests section).",
            "",
            "| config | null | mean k | share at min_k | share at max_k | perplexity | "
            "native perplexity | ΔNLL | KL | n chunks | d_z | 95 % CI of ΔNLL | verdict |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in a["perplexity"]:
            t = r.get("nll_test", {})
            L.append(
                f"| {r['config']} | {r['p_value']} | {_f(r['avg_experts_per_token'])} | "
                f"{_f(r['k_share_at_min_k'])} | {_f(r['k_share_at_max_k'])} | "
                f"{_f(r['perplexity'])} | {_f(r['native_perplexity'])} | {_f(r['delta_nll'])} | "
                f"{_f(r['mean_kl'])} | {t.get('n', 'n/a')} | {_f(t.get('d_z'), 2)} | "
                f"[{_f(t.get('ci_low'))}, {_f(t.get('ci_high'))}] | "
                f"{verdict(t) if t else 'no test'} |"
            )
        L.append("")
    L += ["## Sensitivity: null × alpha × temperature", ""]
    L += _sensitivity_lines(a.get("sensitivity", {"rows": [], "verdicts": []}))
    L.append("")
    L += [
        "## Statistical tests against the baseline",
        "",
        f"Paired by prompt (n = {n_prompts}). Test: paired t-test (`scipy.stats.ttest_rel`), "
        "Wilcoxon signed-rank as a check; effect size d_z = mean Δ / sd Δ; Δ = config − "
        f"{base}; CI = 95 % paired bootstrap ({N_BOOT} resamples) of the mean Δ; Holm adjusts "
        f"across the {len(a['configs']) - 1} compared configs within each metric. No test is "
        f"run (and no significance claimed) with fewer than {a.get('min_n', MIN_N)} pairs or "
        "when the differences have zero variance.",
        "",
    ]
    for metric, rows in a["tests"].items():
        label = TESTED_METRICS[metric][0]
        L += [
            f"### {label}",
            "",
            "| config | n | mean | Δ | Δ % | 95 % CI | t | p | p Holm | d_z | "
            "Wilcoxon p | Wilcoxon p Holm | verdict |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            L.append(
                f"| {r['config']} | {r['n']} | {_f(r['mean_config'])} | {_f(r['mean_diff'])} | "
                f"{_f(r['pct_change'], 1)} | [{_f(r['ci_low'])}, {_f(r['ci_high'])}] | "
                f"{_f(r['t'], 2)} | "
                f"{_p(r['p_t'])} | {_p(r['p_t_holm'])} | {_f(r['d_z'], 2)} | "
                f"{_p(r['p_wilcoxon'])} | "
                f"{_p(r['p_wilcoxon_holm'])} | {verdict(r)} |"
            )
        L.append("")
    L += ["## Experts per token by prompt category", "", _md_table(cat, "config"), ""]
    if layer_avg is not None:
        L += ["## Mean k per MoE layer", "", _md_table(layer_avg, "config"), ""]
    L += ["## What temperature does and does not change", ""]
    L.append(
        "Under the `empirical`, `unselected` and `gaussian` p-value models the p-values use "
        "untempered router scores (the Gaussian z-score is also invariant to any rescaling of a "
        "token's logits), so there **temperature cannot change which experts are selected for a "
        "given hidden state**; it changes only the mixing weights softmax(logits / T), and any "
        "difference in expert counts between such configs comes from changed hidden states in "
        "later layers and tokens. Under `probability` (log softmax(logits / T) against a null "
        "calibrated at the same T) and `seed_probability` (1 − softmax(logits / T)) temperature "
        "enters the p-values; the sensitivity table above measures how much. Pairs of named "
        "configs that differ only in temperature (`unselected` at T = 1 counts as `probability` "
        "at T = 1: they select identically):"
    )
    for t in a["temperature"]:
        frac = (
            t["first_layer_same_k"] / t["first_layer_tokens"]
            if t["first_layer_tokens"]
            else float("nan")
        )
        nulls = {a["configs"][t["low_t"]].get("p_value"), a["configs"][t["high_t"]].get("p_value")}
        s = (
            f"- `{t['low_t']}` (T = {t['t_low']}) vs `{t['high_t']}` (T = {t['t_high']}"
            f"{', nulls ' + ' / '.join(sorted(n for n in nulls if n)) if len(nulls) > 1 else ''}"
            "): at the "
            "first MoE "
            f"layer on the prompt tokens, where both see identical inputs, k agreed on "
            f"{t['first_layer_same_k']}/{t['first_layer_tokens']} tokens ({_f(frac * 100, 1)} %). "
            f"Downstream, {t['identical_generations']}/{t['prompts']} generations were identical "
            "and the "
            f"mean experts per token differed by {_f(t['mean_diff_experts'])}"
        )
        if "ppl_low" in t:
            s += f"; held-out perplexity {_f(t['ppl_low'])} vs {_f(t['ppl_high'])}"
        L.append(s + ".")
    if not a["temperature"]:
        L.append("- No pair of configs in this run differs only in temperature.")
    L += ["", "## Conclusions", ""]
    L += [f"- {c}" for c in _conclusions(a)]
    L += [
        f"- Results rest on {n_prompts} prompts"
        + (
            f", fewer than the {a.get('min_n', MIN_N)} pairs needed for any test: no "
            "significance is claimed; read the bootstrap intervals."
            if n_prompts < a.get("min_n", MIN_N)
            else "; with so few pairs, treat p-values near 0.05 as inconclusive and read the "
            "bootstrap intervals first."
        ),
        "",
    ]
    L += ["## Plots", ""] + [f"![{p}](plots/{p})" for p in a["plots"]] + [""]
    L += [
        "## Files",
        "",
        "- `bh_routing_results.csv`, `bh_routing_results.json`: one row per experiment",
        "- `per_layer_k_histograms.csv`, `perplexity.csv`, `analysis_summary.json`",
        "- `experiment_log.txt`, `checkpoints/`",
        "",
    ]
    return "\n".join(L)
