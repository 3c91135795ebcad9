"""Vectorised Benjamini–Hochberg expert selection in torch.

Per token there are m = E hypotheses, one per expert ("this expert's router score is no larger than
a typical score"). The selector turns router scores into p-values, finds the BH cut-off
k* = max{k : p_(k) <= alpha * k / m} (0 if none), clamps it to [min_k, max_k] and returns
fixed-width
``(T, max_k)`` tensors: the first k slots of a row hold the selected experts ordered by score, the
remaining slots hold a sentinel index and weight 0.

Experts are sorted by score first and the p-values are computed on the sorted scores, so the
selected
set is always a prefix of top-k-by-score; with min_k = max_k = k the selector is exactly top-k.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

PValueMethod = Literal["empirical", "gaussian"]
Correction = Literal["bh", "by"]


@dataclass(frozen=True)
class Selection:
    """Result of a selection: fixed-width routing tensors plus the number of experts per token.

    Attributes:
        indices: ``(T, width)`` int64 expert ids; unused slots hold the sentinel.
        mask: ``(T, width)`` bool, True where a slot holds a selected expert.
        k: ``(T,)`` int64 number of selected experts per token.
    """

    indices: torch.Tensor
    mask: torch.Tensor
    k: torch.Tensor


class EmpiricalNull:
    """Per-layer empirical null distribution of router scores from held-out calibration text.

    p(s) = (1 + #{null >= s}) / (n + 1): the standard finite-sample-valid permutation-style
    p-value, so
    p is never 0 and the smallest attainable p is 1 / (n + 1).
    """

    def __init__(self, samples: dict[int, torch.Tensor]) -> None:
        """Build from ``{layer_index: 1-D tensor of null scores}`` (any order, any device)."""
        if not samples:
            raise ValueError("empirical null needs samples for at least one layer")
        self._sorted: dict[int, torch.Tensor] = {}
        for layer, values in samples.items():
            flat = values.detach().reshape(-1).float()
            flat = flat[torch.isfinite(flat)]
            if flat.numel() == 0:
                raise ValueError(f"empirical null for layer {layer} has no finite samples")
            self._sorted[int(layer)] = torch.sort(flat).values.cpu()
        self._device_cache: dict[tuple[int, str], torch.Tensor] = {}
        self._count_cache: dict[tuple[int, str, int], torch.Tensor] = {}

    @property
    def layers(self) -> list[int]:
        """Layer indices that have a null."""
        return sorted(self._sorted)

    def size(self, layer: int) -> int:
        """Number of null samples for ``layer``."""
        return int(self._sorted[layer].numel())

    def min_pvalue(self, layer: int) -> float:
        """Smallest p-value the null can produce for ``layer`` (its resolution)."""
        return 1.0 / (self.size(layer) + 1)

    def sorted_samples(self, layer: int) -> torch.Tensor:
        """The sorted null samples (CPU float32) for ``layer``."""
        return self._sorted[layer]

    def pvalues(self, layer: int, scores: torch.Tensor) -> torch.Tensor:
        """Upper-tail empirical p-values of ``scores`` (any shape) under ``layer``'s null."""
        if layer not in self._sorted:
            raise KeyError(f"no empirical null calibrated for layer {layer}")
        key = (layer, str(scores.device))
        null = self._device_cache.get(key)
        if null is None:
            # Cache a copy per device so decoding does not copy the null every step.
            null = self._sorted[layer].to(scores.device)
            self._device_cache[key] = null
        n = null.numel()
        flat = scores.detach().float().contiguous().reshape(-1)
        # searchsorted(left) counts null values strictly below s, so n - that counts null >= s.
        below = torch.searchsorted(null, flat, right=False)
        p = (1.0 + (n - below).to(torch.float32)) / (n + 1.0)
        return p.reshape(scores.shape)

    def count_thresholds(self, layer: int, thresholds: torch.Tensor) -> torch.Tensor:
        """Per-rank integer cut-offs c_r with p <= t_r  <=>  #{null < s} >= c_r.

        p = (1 + n - below) / (n + 1) <= t  <=>  below >= n + 1 - t (n + 1). Comparing the integer
        count skips computing p at all, which matters when this runs for every layer and token.
        """
        key = (layer, str(thresholds.device), thresholds.data_ptr())
        c = self._count_cache.get(key)
        if c is None:
            n = self.size(layer)
            c = torch.ceil((n + 1) - thresholds.double() * (n + 1) - 1e-9).to(torch.long)
            self._count_cache[key] = c
        return c

    def below(self, layer: int, scores: torch.Tensor) -> torch.Tensor:
        """#{null < s} for each score (any shape)."""
        key = (layer, str(scores.device))
        null = self._device_cache.get(key)
        if null is None:
            null = self._sorted[layer].to(scores.device)
            self._device_cache[key] = null
        return torch.searchsorted(null, scores.float().contiguous(), right=False)

    def state(self) -> dict[str, list[float]]:
        """Serialisable form (used to cache a calibration next to results)."""
        return {str(k): v.tolist() for k, v in self._sorted.items()}

    @classmethod
    def from_state(cls, state: dict[str, list[float]]) -> EmpiricalNull:
        """Inverse of :meth:`state`."""
        return cls({int(k): torch.tensor(v) for k, v in state.items()})


def gaussian_pvalues(scores: torch.Tensor) -> torch.Tensor:
    """Per-token z-score of the scores with a Gaussian upper tail, along the last dimension.

    z is invariant to shifting and scaling a token's scores, so logit temperature cannot change it.
    """
    x = scores.float()
    mean = x.mean(dim=-1, keepdim=True)
    std = x.std(dim=-1, keepdim=True, unbiased=False).clamp_min(1e-12)
    z = (x - mean) / std
    return torch.special.ndtr(-z)


def bh_thresholds(
    m: int,
    alpha: float,
    correction: Correction,
    *,
    device: torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """BH (or BY) step-up thresholds ``alpha * k / m`` (divided by sum 1/i for BY), k = 1..m.

    Computed as ``(k / m) * alpha`` in the same order statsmodels uses, so float64 inputs agree with
    ``multipletests`` bit for bit.
    """
    if correction not in ("bh", "by"):
        raise ValueError(f"unknown correction {correction!r}; use 'bh' or 'by'")
    ecdf = torch.arange(1, m + 1, device=device, dtype=torch.float64) / m
    if correction == "by":
        ecdf = ecdf / sum(1.0 / i for i in range(1, m + 1))
    return (ecdf * alpha).to(dtype)


_THRESHOLDS: dict[tuple[int, float, str, str, torch.dtype], torch.Tensor] = {}


def _cached_thresholds(
    m: int, alpha: float, correction: Correction, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    # Built once per (m, alpha, correction, device, dtype): decoding calls this every layer and
    # every step.
    key = (m, alpha, correction, str(device), dtype)
    thr = _THRESHOLDS.get(key)
    if thr is None:
        thr = bh_thresholds(m, alpha, correction, device=device, dtype=dtype)
        _THRESHOLDS[key] = thr
    return thr


def bh_count(
    sorted_pvalues: torch.Tensor, alpha: float, correction: Correction = "bh"
) -> torch.Tensor:
    """Number of BH rejections per row, given p-values sorted ascending along the last dimension."""
    m = sorted_pvalues.shape[-1]
    dtype = sorted_pvalues.dtype if sorted_pvalues.is_floating_point() else torch.float32
    thr = _cached_thresholds(m, alpha, correction, sorted_pvalues.device, dtype)
    ranks = _cached_arange(m + 1, sorted_pvalues.device)[1:]
    # Step-up: the largest rank whose p-value is under its threshold; every expert before it is
    # rejected too, even when its own p-value is above its own threshold.
    return torch.where(sorted_pvalues <= thr, ranks, 0).amax(dim=-1)


_ARANGE: dict[tuple[int, str], torch.Tensor] = {}


def _cached_arange(n: int, device: torch.device) -> torch.Tensor:
    key = (n, str(device))
    t = _ARANGE.get(key)
    if t is None:
        t = torch.arange(n, device=device)
        _ARANGE[key] = t
    return t


def validate_params(alpha: float, min_k: int, max_k: int, num_experts: int) -> None:
    """Raise ``ValueError`` with a readable message for out-of-range selector parameters."""
    if not (0.0 < alpha <= 1.0) or math.isnan(alpha):
        raise ValueError(f"alpha must be in (0, 1], got {alpha}")
    if min_k < 0 or max_k < 1 or min_k > max_k:
        raise ValueError(
            f"need 0 <= min_k <= max_k and max_k >= 1, got min_k={min_k}, max_k={max_k}"
        )
    if num_experts < 1:
        raise ValueError(f"num_experts must be positive, got {num_experts}")


def select_from_sorted(
    sorted_pvalues: torch.Tensor,
    order: torch.Tensor,
    *,
    alpha: float,
    min_k: int,
    max_k: int,
    correction: Correction = "bh",
    sentinel: int,
) -> Selection:
    """BH selection when experts are already sorted best-first and p-values follow that order.

    ``sorted_pvalues`` must be non-decreasing along the last dimension (true when they come from a
    monotone decreasing function of scores sorted descending). ``order`` maps sorted position to
    expert id.
    """
    m = sorted_pvalues.shape[-1]
    validate_params(alpha, min_k, max_k, m)
    width = min(max_k, m)
    k = bh_count(sorted_pvalues, alpha, correction).clamp(min=min(min_k, m), max=width)
    mask = _cached_arange(width, order.device) < k.unsqueeze(-1)
    indices = order[..., :width].masked_fill(~mask, sentinel)
    return Selection(indices=indices, mask=mask, k=k)


def select_from_pvalues(
    pvalues: torch.Tensor,
    *,
    alpha: float,
    min_k: int = 0,
    max_k: int | None = None,
    correction: Correction = "bh",
    sentinel: int | None = None,
) -> Selection:
    """BH selection on arbitrary p-values ``(T, m)``: keep the k* smallest, clamped to [min_k,
    max_k].

    This is the textbook procedure; it is what the tests compare with statsmodels.
    """
    m = pvalues.shape[-1]
    max_k = m if max_k is None else max_k
    sorted_p, order = torch.sort(pvalues, dim=-1, stable=True)
    return select_from_sorted(
        sorted_p,
        order,
        alpha=alpha,
        min_k=min_k,
        max_k=max_k,
        correction=correction,
        sentinel=m if sentinel is None else sentinel,
    )


def select_from_scores(
    scores: torch.Tensor,
    *,
    alpha: float,
    min_k: int,
    max_k: int,
    method: PValueMethod = "empirical",
    null: EmpiricalNull | None = None,
    layer: int = 0,
    correction: Correction = "bh",
    sentinel: int | None = None,
    sort_key: torch.Tensor | None = None,
) -> Selection:
    """BH selection on router scores ``(T, E)``, higher score = stronger expert.

    Experts are sorted descending by ``sort_key`` (default: the scores; adapters pass the tensor the
    native router ranks by, e.g. softmax probabilities) and p-values are computed on the scores in
    that
    order, so the selection is a prefix of the native top-k order and min_k = max_k = k reproduces
    it.
    """
    e = scores.shape[-1]
    key = scores if sort_key is None else sort_key
    _, order = torch.sort(key, dim=-1, descending=True, stable=True)
    sorted_scores = scores.gather(-1, order)
    if method == "empirical":
        if null is None:
            raise ValueError("p_value='empirical' needs a calibrated EmpiricalNull")
        p = null.pvalues(layer, sorted_scores)
    elif method == "gaussian":
        p = gaussian_pvalues(scores).gather(-1, order)
    else:
        raise ValueError(f"unknown p-value method {method!r}; use 'empirical' or 'gaussian'")
    # The sort key and the scores rank experts identically up to float rounding; cummax keeps the
    # p-values non-decreasing along the sorted axis so the BH prefix logic stays valid on near-ties.
    p = torch.cummax(p, dim=-1).values
    return select_from_sorted(
        p,
        order,
        alpha=alpha,
        min_k=min_k,
        max_k=max_k,
        correction=correction,
        sentinel=e if sentinel is None else sentinel,
    )


def select_sorted_scores(
    sorted_scores: torch.Tensor,
    order: torch.Tensor,
    *,
    alpha: float,
    min_k: int,
    max_k: int,
    method: PValueMethod = "empirical",
    null: EmpiricalNull | None = None,
    layer: int = 0,
    correction: Correction = "bh",
    sentinel: int,
) -> Selection:
    """Fast path: BH on scores already sorted descending (so p-values are already ascending).

    Same result as :func:`select_from_scores`; the empirical method compares integer null counts
    with precomputed per-rank cut-offs instead of forming p-values.
    """
    m = sorted_scores.shape[-1]
    width = min(max_k, m)
    if method == "empirical":
        if null is None:
            raise ValueError("p_value='empirical' needs a calibrated EmpiricalNull")
        thr = _cached_thresholds(m, alpha, correction, sorted_scores.device, torch.float64)
        cut = null.count_thresholds(layer, thr)
        passing = null.below(layer, sorted_scores) >= cut
    elif method == "gaussian":
        p = gaussian_pvalues(sorted_scores)
        passing = p <= _cached_thresholds(m, alpha, correction, p.device, p.dtype)
    else:
        raise ValueError(f"unknown p-value method {method!r}; use 'empirical' or 'gaussian'")
    ranks = _cached_arange(m + 1, sorted_scores.device)[1:]
    k = torch.where(passing, ranks, 0).amax(dim=-1).clamp(min=min(min_k, m), max=width)
    mask = _cached_arange(width, order.device) < k.unsqueeze(-1)
    indices = order[..., :width].masked_fill(~mask, sentinel)
    return Selection(indices=indices, mask=mask, k=k)


def select_topk(scores: torch.Tensor, k: int, *, sentinel: int | None = None) -> Selection:
    """Plain top-k with the same output layout as the BH selector (all slots used)."""
    e = scores.shape[-1]
    k = min(k, e)
    _, idx = torch.topk(scores, k, dim=-1)
    mask = torch.ones_like(idx, dtype=torch.bool)
    kk = torch.full(idx.shape[:-1], k, dtype=torch.long, device=idx.device)
    del sentinel  # every slot is used; accepted for a uniform call signature
    return Selection(indices=idx, mask=mask, k=kk)


Method = Literal["topk", "bh"]


@dataclass(frozen=True)
class RoutingConfig:
    """One routing configuration of the experiment (the seed's ``ROUTING_CONFIGS`` entries).

    ``renormalize=None`` keeps the model's native behaviour (OLMoE: no renormalisation, Mixtral:
    always);
    True/False forces it. ``temperature`` divides the router logits before the mixing weights are
    computed; it never enters the p-values (see module docs of ``adapters``).
    """

    name: str
    method: Method = "bh"
    k: int = 8
    alpha: float = 0.05
    temperature: float = 1.0
    min_k: int = 1
    max_k: int = 8
    p_value: PValueMethod = "empirical"
    correction: Correction = "bh"
    renormalize: bool | None = None
    description: str = ""

    @classmethod
    def from_dict(cls, name: str, spec: dict[str, object]) -> RoutingConfig:
        """Build and validate from a seed-style dict; raises ``ValueError`` on bad input."""
        if not isinstance(spec, dict):
            raise ValueError(f"config {name!r}: expected an object, got {type(spec).__name__}")
        known = {f for f in cls.__dataclass_fields__ if f != "name"}
        unknown = set(spec) - known
        if unknown:
            raise ValueError(
                f"config {name!r}: unknown keys {sorted(unknown)}; allowed {sorted(known)}"
            )
        kwargs: dict[str, object] = dict(spec)
        try:
            cfg = cls(name=name, **kwargs)  # type: ignore[arg-type]
        except TypeError as exc:
            raise ValueError(f"config {name!r}: {exc}") from None
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Raise ``ValueError`` if a field is out of range or of the wrong type."""

        def _num(v: object, what: str) -> float:
            if isinstance(v, bool) or not isinstance(v, int | float):
                raise ValueError(f"config {self.name!r}: {what} must be a number, got {v!r}")
            return float(v)

        def _int(v: object, what: str) -> int:
            if isinstance(v, bool) or not isinstance(v, int):
                raise ValueError(f"config {self.name!r}: {what} must be an integer, got {v!r}")
            return v

        if self.method not in ("topk", "bh"):
            raise ValueError(
                f"config {self.name!r}: method must be 'topk' or 'bh', got {self.method!r}"
            )
        if self.p_value not in ("empirical", "gaussian"):
            raise ValueError(f"config {self.name!r}: p_value must be 'empirical' or 'gaussian'")
        if self.correction not in ("bh", "by"):
            raise ValueError(f"config {self.name!r}: correction must be 'bh' or 'by'")
        if self.renormalize is not None and not isinstance(self.renormalize, bool):
            raise ValueError(f"config {self.name!r}: renormalize must be true, false or null")
        if _int(self.k, "k") < 1:
            raise ValueError(f"config {self.name!r}: k must be >= 1")
        t = _num(self.temperature, "temperature")
        if not (t > 0 and math.isfinite(t)):
            raise ValueError(f"config {self.name!r}: temperature must be > 0, got {t}")
        a = _num(self.alpha, "alpha")
        if not (0.0 < a <= 1.0):
            raise ValueError(f"config {self.name!r}: alpha must be in (0, 1], got {a}")
        lo, hi = _int(self.min_k, "min_k"), _int(self.max_k, "max_k")
        if lo < 0 or hi < 1 or lo > hi:
            raise ValueError(
                f"config {self.name!r}: need 0 <= min_k <= max_k, max_k >= 1 (got {lo}, {hi})"
            )

    @property
    def width(self) -> int:
        """Fixed width of the routing tensors this config produces (before clamping to E)."""
        return self.k if self.method == "topk" else self.max_k

    def as_dict(self) -> dict[str, object]:
        """Plain dict for JSON output."""
        return {f: getattr(self, f) for f in self.__dataclass_fields__}
