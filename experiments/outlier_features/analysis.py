"""LLM.int8() systematic outlier features from the reductions of ``extract``.

Definitions (Dettmers et al. 2022, denominators made explicit):

    block hit      block l is hit on dim h if |x| >= t at either site (input_layernorm or
                   post_attention_layernorm output) for any sequence b and any position s.
                   Per-site variants count one site only.
    layer_frac[h]  #{blocks hit on h} / L                        (L = observed blocks)
    seq_frac[h]    #{(b, s) : |x[b, s, h]| >= t at any block and site} / (B x S)
                   — token positions (b, s) over all sequences, never position indices pooled
                   across the batch. Without position 0 the denominator is B x (S - 1) and block
                   hits also ignore s = 0.
    outlier dim    layer_frac >= 25 % and seq_frac >= 6 % (t = 6); counts are of UNIQUE dims.

Model-level figures (Dettmers Fig. 3a): ``layers_affected`` = share of blocks hit on at least
one outlier dim; ``positions_affected`` = share of (b, s) positions where at least one outlier
dim is hit.

Uncertainty: bootstrap over sequences (unit = sequence, percentile CI), cross-batch
validation over K disjoint sequence batches, and a sensitivity grid over the three criteria.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import combinations
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats as sps

from .extract import MASSIVE_ABS, MASSIVE_RATIO, ActivationStats

THRESHOLD = 6.0
LAYER_FRAC = 0.25
SEQ_FRAC = 0.06
GRID_THRESHOLDS: tuple[float, ...] = (4.0, 5.0, 6.0, 8.0)
GRID_LAYER_FRACS: tuple[float, ...] = (0.10, 0.25, 0.50)
GRID_SEQ_FRACS: tuple[float, ...] = (0.02, 0.06, 0.10)
#: Fractions are ratios of integers; the tolerance keeps e.g. 1/4 >= 0.25 exact.
EPS = 1e-9

DENOMINATORS = {
    "layer_frac": "blocks hit on dim h / L observed blocks; a block is hit if |x| >= t at "
    "either site (input_layernorm or post_attention_layernorm output), any sequence, "
    "any position",
    "layer_frac_attn / layer_frac_ffn": "the same with one site only (input_layernorm = "
    "attention input, post_attention_layernorm = FFN/MoE input)",
    "seq_frac": "token positions (b, s) over all B sequences with |x[b,s,h]| >= t at any "
    "block and site / (B x S); without position 0: / (B x (S-1))",
    "n_dims": "number of unique hidden dims h with layer_frac >= layer_pct and "
    "seq_frac >= seq_pct",
    "layers_affected": "blocks hit on at least one outlier dim / L",
    "positions_affected": "positions (b, s) with at least one outlier dim hit / (B x S)",
    "bootstrap": "resample sequences with replacement (unit = sequence), recompute "
    "everything, percentile CI",
}


@dataclass
class Fractions:
    """Per-dim hit fractions for one threshold over a set of sequences."""

    threshold: float
    drop_pos0: bool
    layer_hit: np.ndarray  # [B, L, H] bool: block hit (either site) per sequence
    layer_hit_site: np.ndarray  # [B, L, 2, H] bool
    tok_count: np.ndarray  # [B, H] int64: positions hit per sequence
    n_positions: int  # positions per sequence in the denominator (S or S-1)

    @property
    def n_seq(self) -> int:
        """Sequences B."""
        return int(self.layer_hit.shape[0])

    @property
    def layer_frac(self) -> np.ndarray:
        """[H] share of blocks hit in any sequence."""
        return self.layer_hit.any(axis=0).mean(axis=0)

    @property
    def layer_frac_site(self) -> np.ndarray:
        """[2, H] share of blocks hit, per site."""
        return self.layer_hit_site.any(axis=0).mean(axis=0)

    @property
    def seq_frac(self) -> np.ndarray:
        """[H] share of token positions (b, s) hit."""
        return self.tok_count.sum(axis=0) / (self.n_seq * self.n_positions)


def fractions(
    stats: ActivationStats,
    threshold: float = THRESHOLD,
    *,
    drop_pos0: bool = False,
    seqs: np.ndarray | None = None,
) -> Fractions:
    """Block hits and per-sequence position counts at ``threshold`` (optionally a subset)."""
    idx = np.arange(stats.tok_max.shape[0]) if seqs is None else np.asarray(seqs)
    smax = stats.seq_max_nopos0 if drop_pos0 else stats.seq_max
    hit_site = smax[idx] >= threshold
    s0 = 1 if drop_pos0 else 0
    # One sequence at a time keeps the temporary [S, H] bool small for h = 5120 models.
    tok_count = np.stack([(stats.tok_max[b, s0:] >= threshold).sum(axis=0) for b in idx])
    return Fractions(
        threshold=threshold,
        drop_pos0=drop_pos0,
        layer_hit=hit_site.any(axis=2),
        layer_hit_site=hit_site,
        tok_count=tok_count.astype(np.int64),
        n_positions=stats.tok_max.shape[1] - s0,
    )


def detect(fr: Fractions, layer_pct: float = LAYER_FRAC, seq_pct: float = SEQ_FRAC) -> np.ndarray:
    """[H] bool: dims meeting both criteria."""
    return (fr.layer_frac >= layer_pct - EPS) & (fr.seq_frac >= seq_pct - EPS)


def affected(
    stats: ActivationStats, fr: Fractions, dims: np.ndarray
) -> tuple[float, float]:
    """(layers_affected, positions_affected) for a set of outlier dims (see module docstring)."""
    if dims.size == 0:
        return 0.0, 0.0
    layers = float(fr.layer_hit[:, :, dims].any(axis=(0, 2)).mean())
    return layers, float(_positions_hit(stats, fr, dims).sum() / (fr.n_seq * fr.n_positions))


def _positions_hit(
    stats: ActivationStats, fr: Fractions, dims: np.ndarray, seqs: np.ndarray | None = None
) -> np.ndarray:
    """[B] positions per sequence where at least one of ``dims`` is hit."""
    s0 = 1 if fr.drop_pos0 else 0
    idx = np.arange(stats.tok_max.shape[0]) if seqs is None else seqs
    return np.array(
        [(stats.tok_max[b, s0:][:, dims] >= fr.threshold).any(axis=1).sum() for b in idx],
        dtype=np.int64,
    )


def _pct(x: np.ndarray, ci: float) -> list[float]:
    lo, hi = np.nanpercentile(x, [50 * (1 - ci), 50 * (1 + ci)], axis=0)
    return [float(lo), float(hi)]


def bootstrap(
    stats: ActivationStats,
    *,
    threshold: float = THRESHOLD,
    layer_pct: float = LAYER_FRAC,
    seq_pct: float = SEQ_FRAC,
    drop_pos0: bool = False,
    n_resamples: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """Percentile bootstrap over sequences of the count and the model-level shares.

    A resample is a multinomial weight vector w over the B sequences. Then
    seq_frac* = w @ tok_count / (B x S) (O(B·H)) and block hits are ORs over the sequences with
    w > 0. A resample only drops sequences, so its layer_frac never exceeds the full-data one:
    only dims that pass the layer criterion on the full data ("candidates") can pass in a
    resample, and the O(B·L·H) block step is restricted to them.
    """
    if n_resamples < 1:
        raise ValueError("n_resamples must be >= 1")
    fr = fractions(stats, threshold, drop_pos0=drop_pos0)
    n_b, n_l = fr.n_seq, fr.layer_hit.shape[1]
    denom = n_b * fr.n_positions
    rng = np.random.default_rng(seed)
    w = rng.multinomial(n_b, np.full(n_b, 1.0 / n_b), size=n_resamples)  # [R, B]
    seq_frac_r = (w @ fr.tok_count) / denom  # [R, H]
    cand = np.flatnonzero(fr.layer_frac >= layer_pct - EPS)
    n_c = cand.size
    lf_r = np.zeros((n_resamples, n_c))
    layers_aff = np.zeros(n_resamples)
    out_r = np.zeros((n_resamples, n_c), dtype=bool)
    if n_c:
        hits = fr.layer_hit[:, :, cand].reshape(n_b, n_l * n_c).astype(np.float32)
        for r0 in range(0, n_resamples, 250):  # bounded [250, L·C] temporaries
            present = (w[r0 : r0 + 250] > 0).astype(np.float32)
            any_r = (present @ hits > 0).reshape(-1, n_l, n_c)
            lf = any_r.mean(axis=1)
            out = (lf >= layer_pct - EPS) & (seq_frac_r[r0 : r0 + 250, cand] >= seq_pct - EPS)
            lf_r[r0 : r0 + 250], out_r[r0 : r0 + 250] = lf, out
            layers_aff[r0 : r0 + 250] = (any_r & out[:, None, :]).any(axis=2).mean(axis=1)
    count_r = out_r.sum(axis=1)
    # positions_affected depends on the resample's outlier set; sets repeat, so cache them.
    pos_aff = np.zeros(n_resamples)
    cache: dict[bytes, np.ndarray] = {}
    for r in range(n_resamples):
        key = out_r[r].tobytes()
        if not out_r[r].any():
            continue
        if key not in cache:
            cache[key] = _positions_hit(stats, fr, cand[out_r[r]])
        pos_aff[r] = w[r] @ cache[key] / denom
    with np.errstate(invalid="ignore"):
        mean_lf = np.where(count_r > 0, (lf_r * out_r).sum(1) / np.maximum(count_r, 1), np.nan)
        mean_sf = np.where(
            count_r > 0,
            (seq_frac_r[:, cand] * out_r).sum(1) / np.maximum(count_r, 1) if n_c else 0.0,
            np.nan,
        )
    dims = np.flatnonzero(detect(fr, layer_pct, seq_pct))
    l_aff, p_aff = affected(stats, fr, dims)
    seq_ci = np.percentile(seq_frac_r, [50 * (1 - ci), 50 * (1 + ci)], axis=0)  # [2, H]
    lf_ci = np.full((2, fr.layer_frac.size), np.nan)
    if n_c:
        lf_ci[:, cand] = np.percentile(lf_r, [50 * (1 - ci), 50 * (1 + ci)], axis=0)
    return {
        "n_resamples": n_resamples,
        "ci": ci,
        "seed": seed,
        "n_dims": int(dims.size),
        "n_dims_ci": _pct(count_r.astype(float), ci),
        "layers_affected": l_aff,
        "layers_affected_ci": _pct(layers_aff, ci),
        "positions_affected": p_aff,
        "positions_affected_ci": _pct(pos_aff, ci),
        "mean_layer_frac_of_outliers": float(fr.layer_frac[dims].mean()) if dims.size else None,
        "mean_layer_frac_of_outliers_ci": _pct(mean_lf, ci) if np.isfinite(mean_lf).any() else None,
        "mean_seq_frac_of_outliers": float(fr.seq_frac[dims].mean()) if dims.size else None,
        "mean_seq_frac_of_outliers_ci": _pct(mean_sf, ci) if np.isfinite(mean_sf).any() else None,
        "share_resamples_with_same_set": float(
            np.mean([np.array_equal(cand[o], dims) for o in out_r])
        ),
        "_seq_frac_ci": seq_ci,
        "_layer_frac_ci": lf_ci,
    }


def jaccard(a: set[int], b: set[int]) -> float:
    """|A ∩ B| / |A ∪ B|; two empty sets agree perfectly (1.0)."""
    union = a | b
    return 1.0 if not union else len(a & b) / len(union)


def cross_batch(
    stats: ActivationStats,
    *,
    k: int = 4,
    threshold: float = THRESHOLD,
    layer_pct: float = LAYER_FRAC,
    seq_pct: float = SEQ_FRAC,
    drop_pos0: bool = False,
) -> dict[str, Any]:
    """Detect separately in K disjoint, contiguous batches of sequences and compare the sets."""
    n_b = stats.tok_max.shape[0]
    if not 1 <= k <= n_b:
        raise ValueError(f"cross-batch K must be in [1, {n_b}] (number of sequences), got {k}")
    splits = np.array_split(np.arange(n_b), k)
    sets = [
        set(np.flatnonzero(detect(fractions(stats, threshold, drop_pos0=drop_pos0, seqs=s),
                                  layer_pct, seq_pct)).tolist())
        for s in splits
    ]
    hidden = stats.tok_max.shape[2]
    freq = np.zeros(hidden)
    for s in sets:
        freq[list(s)] += 1
    need = math.ceil(k / 2)
    pairs = [jaccard(a, b) for a, b in combinations(sets, 2)]
    # A dim can pass in half of the batches and still fail on the full data (e.g. 10 % of the
    # positions in two batches, none in the others: 5 % overall). The stable set is meant as the
    # reproducible part of the full-data result, so it only keeps dims the full data detects;
    # the others are listed with the reason instead of being dropped silently.
    full = set(
        np.flatnonzero(
            detect(fractions(stats, threshold, drop_pos0=drop_pos0), layer_pct, seq_pct)
        ).tolist()
    )
    often = set(np.flatnonzero(freq >= need).tolist())
    return {
        "k": k,
        "batch_sizes": [len(s) for s in splits],
        "n_dims_per_batch": [len(s) for s in sets],
        "pairwise_jaccard": pairs,
        # K = 1 compares nothing: no agreement figure rather than a perfect one.
        "mean_jaccard": float(np.mean(pairs)) if pairs else None,
        "min_jaccard": float(np.min(pairs)) if pairs else None,
        "stable_rule": f"detected in >= ceil(K/2) = {need} of {k} batches and on the full data",
        "stable_dims": sorted(often & full),
        "stable_excluded": {
            "dims": sorted(often - full),
            "reason": "detected in enough batches but failing the criteria on the full data",
        },
        "_detect_freq": freq / k,
    }


def sensitivity_grid(
    stats: ActivationStats,
    thresholds: Sequence[float] = GRID_THRESHOLDS,
    layer_pcts: Sequence[float] = GRID_LAYER_FRACS,
    seq_pcts: Sequence[float] = GRID_SEQ_FRACS,
    max_listed: int = 32,
) -> list[dict[str, Any]]:
    """Unique outlier-dim counts for every (threshold, layer %, position %) cell, ± position 0."""
    rows = []
    for t in thresholds:
        frs = {p0: fractions(stats, t, drop_pos0=p0) for p0 in (False, True)}
        for lp in layer_pcts:
            for sp in seq_pcts:
                d = np.flatnonzero(detect(frs[False], lp, sp))
                d1 = np.flatnonzero(detect(frs[True], lp, sp))
                rows.append({
                    "threshold": t, "layer_pct": lp, "seq_pct": sp,
                    "n_dims": int(d.size), "n_dims_without_pos0": int(d1.size),
                    "dims": d[:max_listed].tolist(), "dims_without_pos0": d1[:max_listed].tolist(),
                })
    return rows


def kurtosis_summary(stats: ActivationStats) -> dict[str, Any]:
    """Excess kurtosis across dims of the per-dim RMS, per block and site."""
    n = stats.tok_max.shape[0] * stats.tok_max.shape[1]
    rms = np.sqrt(stats.sumsq / n)  # [L, 2, H]
    k = sps.kurtosis(rms, axis=-1, fisher=True)
    out: dict[str, Any] = {"definition": "excess (Fisher) kurtosis over h of RMS_(b,s)(x[h]), "
                           "per block and site"}
    for si, name in enumerate(("attn_input", "ffn_input")):
        out[name] = {"per_layer": k[:, si].tolist(), "median": float(np.median(k[:, si])),
                     "max": float(np.max(k[:, si]))}
    return out


def massive_summary(stats: ActivationStats, top: int = 10) -> dict[str, Any]:
    """Massive activations on block outputs (Sun et al. 2024)."""
    per_dim = stats.massive_count.sum(axis=0)
    order = np.argsort(-per_dim, kind="stable")[:top]
    return {
        "definition": f"block output |x| > {MASSIVE_ABS:g} and >= {MASSIVE_RATIO:g} x the median "
        "|x| of the same token's hidden state",
        "n_dims": int((per_dim > 0).sum()),
        "top_dims": [{"dim": int(d), "count": int(per_dim[d])} for d in order if per_dim[d] > 0],
        "layers_with_massive": np.flatnonzero(stats.massive_count.sum(axis=1) > 0).tolist(),
        "block_output_absmax": stats.out_absmax.tolist(),
        "block_output_max_ratio_to_median": stats.out_max_ratio.tolist(),
    }


def analyze(
    stats: ActivationStats,
    *,
    threshold: float = THRESHOLD,
    layer_pct: float = LAYER_FRAC,
    seq_pct: float = SEQ_FRAC,
    n_resamples: int = 1000,
    k: int = 4,
    seed: int = 0,
) -> tuple[dict[str, Any], pd.DataFrame]:
    """Full analysis: summary dict (JSON-ready) and the per-dim table."""
    n_b, n_s, n_l, hidden = stats.shape
    main: dict[str, Any] = {}
    per_dim: dict[str, Any] = {"dim": np.arange(hidden)}
    for p0 in (False, True):
        tag = "without_pos0" if p0 else "with_pos0"
        fr = fractions(stats, threshold, drop_pos0=p0)
        dims = np.flatnonzero(detect(fr, layer_pct, seq_pct))
        boot = bootstrap(stats, threshold=threshold, layer_pct=layer_pct, seq_pct=seq_pct,
                         drop_pos0=p0, n_resamples=n_resamples, seed=seed)
        xb = cross_batch(stats, k=k, threshold=threshold, layer_pct=layer_pct,
                         seq_pct=seq_pct, drop_pos0=p0) if k >= 1 else None
        sfx = "" if not p0 else "_nopos0"
        per_dim[f"layer_frac{sfx}"] = fr.layer_frac
        per_dim[f"layer_frac_attn{sfx}"] = fr.layer_frac_site[0]
        per_dim[f"layer_frac_ffn{sfx}"] = fr.layer_frac_site[1]
        per_dim[f"seq_frac{sfx}"] = fr.seq_frac
        per_dim[f"is_outlier{sfx}"] = detect(fr, layer_pct, seq_pct)
        per_dim[f"layer_frac_ci_lo{sfx}"] = boot["_layer_frac_ci"][0]
        per_dim[f"layer_frac_ci_hi{sfx}"] = boot["_layer_frac_ci"][1]
        per_dim[f"seq_frac_ci_lo{sfx}"] = boot["_seq_frac_ci"][0]
        per_dim[f"seq_frac_ci_hi{sfx}"] = boot["_seq_frac_ci"][1]
        if xb is not None:
            per_dim[f"xbatch_detect_freq{sfx}"] = xb.pop("_detect_freq")
        main[tag] = {
            "n_dims": int(dims.size),
            "dims": dims.tolist(),
            "bootstrap": {k_: v for k_, v in boot.items() if not k_.startswith("_")},
            "cross_batch": xb,
        }
    n_rms = n_b * n_s
    rms = np.sqrt(stats.sumsq / n_rms)  # [L, 2, H]
    per_dim["max_abs"] = stats.seq_max.max(axis=(0, 2)).max(axis=0)
    per_dim["max_abs_layer"] = np.array(stats.layer_indices)[
        stats.seq_max.max(axis=(0, 2)).argmax(axis=0)]
    per_dim["rms_mean"] = rms.mean(axis=(0, 1))
    per_dim["massive_count"] = stats.massive_count.sum(axis=0)
    table = pd.DataFrame(per_dim)
    summary = {
        "criteria": {"threshold": threshold, "layer_pct": layer_pct, "seq_pct": seq_pct},
        "denominators": {
            **DENOMINATORS,
            "values": {"B_sequences": n_b, "S_positions": n_s, "L_blocks": n_l,
                       "sites_per_block": 2, "H_hidden": hidden,
                       "positions_total": n_b * n_s, "positions_without_pos0": n_b * (n_s - 1)},
        },
        "results": main,
        "sensitivity_grid": sensitivity_grid(stats),
        "massive_activations": massive_summary(stats),
        "kurtosis": kurtosis_summary(stats),
        "max_abs_overall": float(stats.seq_max.max()),
    }
    return summary, table
