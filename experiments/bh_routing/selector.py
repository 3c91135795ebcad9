"""Vectorised Benjamini–Hochberg expert selection in torch.

Per token there are m = E hypotheses, one per expert ("this expert's router score is no larger than
a typical score"). The selector turns router scores into p-values, finds the BH cut-off
k* = max{k : p_(k) <= alpha * k / m} (0 if none), clamps it to [min_k, max_k] and returns
fixed-width ``(T, max_k)`` tensors: the first k slots of a row hold the selected experts ordered by
score, the remaining slots hold a sentinel index and weight 0.

Experts are sorted by score first and the p-values are computed on the sorted scores, so the
selected set is always a prefix of top-k-by-score; with min_k = max_k = k the selector is exactly
top-k.

Routing runs once per MoE layer per decoding step on a handful of tokens, so the fixed cost of each
tensor op dominates there. :class:`BHSelector` therefore builds everything that does not depend on
the scores once (thresholds, rank tables, the sentinel) and the per-call work is one comparison
plus a short, fixed sequence of ops with no host sync. For the empirical null even the p-values
disappear: ``p(s) <= t_r`` is rewritten exactly as ``s > tau_r`` for a per-rank score threshold
``tau_r`` read off the sorted null (see :meth:`EmpiricalNull.score_thresholds`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

PValueMethod = Literal["empirical", "gaussian", "unselected", "probability", "seed_probability"]
Correction = Literal["bh", "by"]

#: Every p-value model a config may name (docs/experiments/bh_routing.md explains each):
#: - ``empirical``: per-layer null of the router scores of *every* (token, expert) on calibration
#:   text. A test score is drawn from that same pool, so BH almost never rejects (kept as the
#:   audit's reference; it collapses to min_k).
#: - ``gaussian``: per-token z-score of the scores, Gaussian upper tail.
#: - ``unselected``: per-layer null of the scores of the experts the native router did *not*
#:   select on calibration text: "this expert is as weak as an expert the model itself skips".
#: - ``probability``: as ``unselected``, but on temperature-scaled log-probabilities
#:   ``log softmax(logits / T)``, with the null calibrated at the same T, so T changes selection.
#: - ``seed_probability``: the seed's ``p = 1 - softmax(logits / T)``; not a p-value (see docs).
PVALUE_METHODS: tuple[str, ...] = (
    "empirical",
    "gaussian",
    "unselected",
    "probability",
    "seed_probability",
)
#: Methods whose p-values come from an :class:`EmpiricalNull` (one per layer, and per T for
#: ``probability``): the selector compares scores with precomputed per-rank thresholds.
NULL_METHODS: tuple[str, ...] = ("empirical", "unselected", "probability")
#: Methods whose scores depend on the config's temperature.
TEMPERED_METHODS: tuple[str, ...] = ("probability", "seed_probability")


class Selection:
    """Result of a selection: fixed-width routing tensors plus the number of experts per token.

    Attributes:
        indices: ``(T, width)`` int64 expert ids; unused slots hold the sentinel.
        mask: ``(T, width)`` bool, True where a slot holds a selected expert.
        k: ``(T,)`` int64 number of selected experts per token.
        values: ``(T, width)`` the ranking key at each slot, 0 in empty slots, or None; lets a
            softmax router use its sorted probabilities as mixing weights without a gather.
    """

    __slots__ = ("_empty", "_k", "_mask", "indices", "values")

    def __init__(
        self,
        indices: torch.Tensor,
        empty: torch.Tensor | None,
        k: torch.Tensor | None,
        values: torch.Tensor | None = None,
    ) -> None:
        # ``empty`` (True where a slot is unused) and k are None for top-k, where every slot is
        # used: building them costs tensor ops per layer per step that only recording needs, so
        # they, and the mask, are materialised on first access.
        self.indices = indices
        self._empty = empty
        self._mask: torch.Tensor | None = None
        self._k = k
        self.values = values

    @property
    def all_used(self) -> bool:
        """True when every slot holds a selected expert by construction (top-k)."""
        return self._empty is None

    @property
    def mask(self) -> torch.Tensor:
        """``(T, width)`` bool, True where a slot holds a selected expert."""
        if self._mask is None:
            if self._empty is None:
                self._mask = torch.ones_like(self.indices, dtype=torch.bool)
            else:
                self._mask = ~self._empty
        return self._mask

    @property
    def k(self) -> torch.Tensor:
        """``(T,)`` int64 number of selected experts per token."""
        k = self._k
        if k is None:
            width = self.indices.shape[-1]
            k = torch.full(
                self.indices.shape[:-1], width, dtype=torch.long, device=self.indices.device
            )
            self._k = k
        elif k.dim() == self.indices.dim():
            # The step-up keeps a trailing dim so the slot mask is one broadcast compare.
            k = k.squeeze(-1)
        return k


class EmpiricalNull:
    """Per-layer empirical null distribution of router scores from held-out calibration text.

    p(s) = (1 + #{null >= s}) / (n + 1): the standard finite-sample-valid permutation-style
    p-value, so p is never 0 and the smallest attainable p is 1 / (n + 1).
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

    def _null_on(self, layer: int, device: torch.device) -> torch.Tensor:
        if layer not in self._sorted:
            raise KeyError(f"no empirical null calibrated for layer {layer}")
        key = (layer, str(device))
        null = self._device_cache.get(key)
        if null is None:
            # Cache a copy per device so repeated calls do not copy the null every time.
            null = self._sorted[layer].to(device)
            self._device_cache[key] = null
        return null

    def pvalues(self, layer: int, scores: torch.Tensor) -> torch.Tensor:
        """Upper-tail empirical p-values (float64) of ``scores`` (any shape) under ``layer``'s null.

        Selection never calls this (it compares scores with :meth:`score_thresholds`); it is for
        reports and for checking the selector against reference implementations.
        """
        null = self._null_on(layer, scores.device)
        n = null.numel()
        flat = scores.detach().float().contiguous().reshape(-1)
        # searchsorted(left) counts null values strictly below s, so n - that counts null >= s.
        below = torch.searchsorted(null, flat, right=False)
        p = (1.0 + (n - below).to(torch.float64)) / (n + 1.0)
        return p.reshape(scores.shape)

    def count_cutoffs(self, layer: int, thresholds: torch.Tensor) -> torch.Tensor:
        """Per-rank integer cut-offs c_r with ``p(s) <= t_r  <=>  #{null < s} >= c_r``.

        p = (1 + n - below) / (n + 1) <= t  <=>  below >= (n + 1)(1 - t). Working with the integer
        count avoids the float rounding of p near a threshold; the 1e-9 absorbs float64 error in
        (n + 1)(1 - t) when that product is mathematically an integer.
        """
        n = self.size(layer)
        return torch.ceil((n + 1) - thresholds.double().cpu() * (n + 1) - 1e-9).to(torch.long)

    def score_thresholds(self, layer: int, thresholds: torch.Tensor) -> torch.Tensor:
        """Per-rank score thresholds: ``p(s) <= t_r  <=>  not (s <= tau_r)`` exactly (CPU float32).

        With the null sorted ascending, ``#{null < s} >= c  <=>  null[c - 1] < s`` for 1 <= c <= n,
        so tau_r = null[c_r - 1]. c_r <= 0 means every score passes (t_r >= 1): tau_r = NaN, and
        ``s <= NaN`` is False for every s, -inf included. c_r > n means no score can pass:
        tau_r = +inf. The comparison is the same float32 comparison searchsorted makes, so the
        decision matches :meth:`pvalues` followed by an exact ``p <= t_r`` test.
        """
        null = self._sorted[layer]
        n = null.numel()
        c = self.count_cutoffs(layer, thresholds)
        tau = null[(c - 1).clamp(0, n - 1)].clone()
        tau[c <= 0] = float("nan")
        tau[c > n] = float("inf")
        return tau

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


def seed_probability_pvalues(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """The seed's p-values ``1 - softmax(logits / T)`` along the last dimension (float32).

    Not a p-value in any testing sense: the E values of a token sum to E - 1, so at most one expert
    can have p < 0.5 and BH can keep at most one expert (rank 1 passes only when that expert's
    tempered probability is >= 1 - alpha/E). Kept because the seed used it; temperature does
    enter it (T < 1 sharpens the top probability, T > 1 flattens it).
    """
    return 1.0 - torch.softmax(logits.float() / temperature, dim=-1)


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


class BHSelector:
    """BH/BY selection for one (m, alpha, correction, min_k, max_k, p-value method, null layer).

    Everything that does not depend on the scores is built here once, on ``device``; the select
    methods then run a fixed sequence of small tensor ops with no host sync and no Python loop:
    one comparison against the per-rank thresholds, then the step-up (largest passing rank, clamped,
    as a ``where`` + ``amax`` over precomputed rank tables), the slot mask and the sentinel fill.
    """

    def __init__(
        self,
        m: int,
        *,
        alpha: float,
        min_k: int,
        max_k: int,
        method: PValueMethod | None = "empirical",
        null: EmpiricalNull | None = None,
        layer: int = 0,
        correction: Correction = "bh",
        sentinel: int | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        """``method=None`` builds a selector for given p-values (:meth:`select_sorted_pvalues`)."""
        validate_params(alpha, min_k, max_k, m)
        if method is not None and method not in PVALUE_METHODS:
            raise ValueError(
                f"unknown p-value method {method!r}; use one of {', '.join(PVALUE_METHODS)}"
            )
        dev = torch.device("cpu") if device is None else torch.device(device)
        self.m = m
        self.width = min(max_k, m)
        self.min_k = min(min_k, m)
        self.method = method
        self.device = dev
        # The step-up as one reduction: rank r (capped at width) where rank r passes, min_k where it
        # fails; the row maximum is then clamp(k*, min_k, width), since min_k <= width.
        ranks = torch.arange(1, m + 1, dtype=torch.long).clamp(max=self.width)
        self._rank_if_pass = ranks.to(dev)
        self._kmin = torch.full((m,), self.min_k, dtype=torch.long, device=dev)
        self._slots = torch.arange(self.width, dtype=torch.long, device=dev)
        self._sentinel_int = m if sentinel is None else sentinel
        self._sentinel = torch.tensor(self._sentinel_int, dtype=torch.long, device=dev)
        self._thr64 = bh_thresholds(m, alpha, correction, dtype=torch.float64)
        self._thr_by_dtype: dict[torch.dtype, torch.Tensor] = {}
        self._tau: torch.Tensor | None = None
        if method in NULL_METHODS:
            if null is None:
                raise ValueError(f"p_value={method!r} needs a calibrated EmpiricalNull")
            if layer not in null.layers:
                raise KeyError(f"no empirical null calibrated for layer {layer}")
            self._tau = null.score_thresholds(layer, self._thr64).to(dev)

    def thresholds(self, dtype: torch.dtype) -> torch.Tensor:
        """The p-value thresholds alpha·r/m (BY-adjusted) in ``dtype`` on this selector's device."""
        thr = self._thr_by_dtype.get(dtype)
        if thr is None:
            thr = self._thr64.to(device=self.device, dtype=dtype)
            self._thr_by_dtype[dtype] = thr
        return thr

    def count_sorted_scores(self, sorted_scores: torch.Tensor) -> torch.Tensor:
        """Clamped BH count ``(T, 1)`` for scores sorted descending along the last dimension."""
        if self._tau is not None:
            s = sorted_scores if sorted_scores.dtype == torch.float32 else sorted_scores.float()
            # Rank r fails exactly when p(s_r) > t_r (see EmpiricalNull.score_thresholds).
            failing = s <= self._tau
            return torch.where(failing, self._kmin, self._rank_if_pass).amax(dim=-1, keepdim=True)
        if self.method != "gaussian":
            raise ValueError(
                f"this selector ({self.method}) needs p-values: use count_sorted_pvalues"
            )
        return self.count_sorted_pvalues(gaussian_pvalues(sorted_scores))

    def count_sorted_pvalues(self, sorted_pvalues: torch.Tensor) -> torch.Tensor:
        """Clamped BH count ``(T, 1)`` for p-values sorted ascending along the last dimension."""
        dtype = sorted_pvalues.dtype if sorted_pvalues.is_floating_point() else torch.float32
        passing = sorted_pvalues <= self.thresholds(dtype)
        # Step-up: the largest passing rank; every expert before it is selected too, even when its
        # own p-value is above its own threshold.
        return torch.where(passing, self._rank_if_pass, self._kmin).amax(dim=-1, keepdim=True)

    def finish(
        self,
        k: torch.Tensor,
        top_indices: torch.Tensor,
        top_values: torch.Tensor | None = None,
        *,
        inplace: bool = False,
    ) -> Selection:
        """Keep the first k of the best-first ``top_indices`` (and ``top_values``), fill the rest.

        Unused slots get the sentinel index and value 0. ``inplace=True`` fills the given tensors
        themselves (fresh outputs of a sort or topk that nothing else holds), which saves an
        allocation and a copy per tensor in the per-step path. Inputs wider than ``width`` are cut.
        """
        w = self.width
        if top_indices.shape[-1] != w:
            top_indices = top_indices[..., :w]
            inplace = False  # a view of a wider tensor: filling it would not make it contiguous
            if top_values is not None:
                top_values = top_values[..., :w]
        empty = self._slots >= k
        if inplace:
            indices = top_indices.masked_fill_(empty, self._sentinel_int)
            values = None if top_values is None else top_values.masked_fill_(empty, 0.0)
        else:
            indices = top_indices.masked_fill(empty, self._sentinel)
            values = None if top_values is None else top_values.masked_fill(empty, 0.0)
        return Selection(indices, empty, k, values)

    def select_sorted_scores(
        self,
        sorted_scores: torch.Tensor,
        order: torch.Tensor,
        values: torch.Tensor | None = None,
    ) -> Selection:
        """BH on scores sorted descending (higher = stronger); ``order`` maps position to expert.

        ``values`` (sorted like the scores), when given, come back cut to the slots with 0 in empty
        ones.
        """
        return self.finish(self.count_sorted_scores(sorted_scores), order, values)

    def select_sorted_pvalues(self, sorted_pvalues: torch.Tensor, order: torch.Tensor) -> Selection:
        """BH on p-values already sorted ascending; ``order`` maps position to expert."""
        return self.finish(self.count_sorted_pvalues(sorted_pvalues), order)

    def select_topk_scores(
        self, scores: torch.Tensor, *, values: bool = True, log_for_gaussian: bool = False
    ) -> Selection:
        """BH on unsorted scores ``(T, m)`` whose ranking key is the scores themselves.

        The per-step path of softmax routers: the test needs the scores in descending order but
        not which expert holds each, and the output needs only the best ``width`` experts, so
        this asks ``topk`` for exactly that (full-width values, then the ``width`` best with ids)
        instead of a full sort plus slicing, and fills the unused slots in place. The ``width``
        best come from the same ``topk(scores, width)`` call the native router makes, so with
        min_k = max_k = k the ids match it even on exact ties.
        """
        w = self.width
        # Positional arguments throughout: this runs per layer per decoding step, where parsing
        # keyword arguments is a measurable share of each small op's cost.
        top_values, top_indices = scores.topk(w)
        full = top_values if w == self.m else scores.topk(self.m)[0]
        tau = self._tau
        if tau is not None and values and scores.dtype == torch.float32:
            # The empirical fast path, inlined: compare, step-up, fill; 6 small ops after topk.
            k = torch.where(full <= tau, self._kmin, self._rank_if_pass).amax(-1, True)
            empty = self._slots >= k
            return Selection(
                top_indices.masked_fill_(empty, self._sentinel_int),
                empty,
                k,
                top_values.masked_fill_(empty, 0.0),
            )
        if log_for_gaussian and self.method == "gaussian":
            # The z-score needs a location-scale quantity: probabilities -> log-probabilities.
            full = full.log()
        k = self.count_sorted_scores(full)
        return self.finish(k, top_indices, top_values if values else None, inplace=True)


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
    sel = BHSelector(
        sorted_pvalues.shape[-1],
        alpha=alpha,
        min_k=min_k,
        max_k=max_k,
        method=None,
        correction=correction,
        sentinel=sentinel,
        device=sorted_pvalues.device,
    )
    return sel.select_sorted_pvalues(sorted_pvalues, order)


def select_from_pvalues(
    pvalues: torch.Tensor,
    *,
    alpha: float,
    min_k: int = 0,
    max_k: int | None = None,
    correction: Correction = "bh",
    sentinel: int | None = None,
) -> Selection:
    """BH selection on arbitrary p-values ``(T, m)``: keep the k* smallest, clamped to
    [min_k, max_k].

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


def select_with_sort_key(
    selector: BHSelector, scores: torch.Tensor, sort_key: torch.Tensor | None = None
) -> Selection:
    """BH on scores ``(T, E)`` with experts ranked by ``sort_key`` (default: the scores).

    When the ranking key differs from the scores (GPT-OSS ranks by raw logits, tests on centred
    ones) the two agree up to float rounding; the scores are made non-increasing along the sorted
    axis (p non-decreasing) so the BH prefix logic stays valid on near-ties. For the empirical null
    that is a running minimum of the scores, which is exactly the running maximum of their p-values.
    """
    if sort_key is None:
        sorted_scores, order = torch.sort(scores, dim=-1, descending=True, stable=True)
        return selector.select_sorted_scores(sorted_scores, order)
    _, order = torch.sort(sort_key, dim=-1, descending=True, stable=True)
    if selector.method == "gaussian":
        # z uses the token's own mean and sd, so it must see the scores unmodified.
        p = torch.cummax(gaussian_pvalues(scores).gather(-1, order), dim=-1).values
        return selector.select_sorted_pvalues(p, order)
    sorted_scores = torch.cummin(scores.gather(-1, order), dim=-1).values
    return selector.select_sorted_scores(sorted_scores, order)


def select_pvalues_in_key_order(
    selector: BHSelector, pvalues: torch.Tensor, sort_key: torch.Tensor
) -> Selection:
    """BH on p-values ``(T, E)`` with experts ranked by ``sort_key`` (the native ranking).

    The p-values are put in the key's order and made non-decreasing along it (running maximum), so
    the selection stays a prefix of the native top-k order even where the p-values rank two experts
    differently from the key (float ties, or a p-value model on another score than the key).
    """
    _, order = torch.sort(sort_key, dim=-1, descending=True, stable=True)
    p = torch.cummax(pvalues.gather(-1, order), dim=-1).values
    return selector.select_sorted_pvalues(p, order)


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
    native router ranks by) and p-values are computed on the scores in that order, so the selection
    is a prefix of the native top-k order and min_k = max_k = k reproduces it.
    """
    e = scores.shape[-1]
    selector = BHSelector(
        e,
        alpha=alpha,
        min_k=min_k,
        max_k=max_k,
        method=method,
        null=null,
        layer=layer,
        correction=correction,
        sentinel=e if sentinel is None else sentinel,
        device=scores.device,
    )
    return select_with_sort_key(selector, scores, sort_key)


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
    """BH on scores already sorted descending (so p-values are already ascending).

    One-off convenience around :class:`BHSelector`; code that selects repeatedly with the same
    parameters should build the selector once.
    """
    selector = BHSelector(
        sorted_scores.shape[-1],
        alpha=alpha,
        min_k=min_k,
        max_k=max_k,
        method=method,
        null=null,
        layer=layer,
        correction=correction,
        sentinel=sentinel,
        device=sorted_scores.device,
    )
    return selector.select_sorted_scores(sorted_scores, order)


def select_topk(scores: torch.Tensor, k: int) -> Selection:
    """Plain top-k with the same output type as the BH selector (every slot used).

    ``values`` are the top-k scores, so a softmax router takes its mixing weights from them without
    a gather, exactly as the native router does.
    """
    values, idx = torch.topk(scores, min(k, scores.shape[-1]), dim=-1)
    return Selection(idx, None, None, values)


Method = Literal["topk", "bh"]


@dataclass(frozen=True)
class RoutingConfig:
    """One routing configuration of the experiment (the seed's ``ROUTING_CONFIGS`` entries).

    ``renormalize=None`` keeps the model's native behaviour (OLMoE: no renormalisation, Mixtral:
    always); True/False forces it. ``temperature`` divides the router logits before the mixing
    weights are computed; it enters the p-values only for ``p_value`` ``probability`` and
    ``seed_probability`` (see module docs of ``adapters``).

    The dataclass default ``p_value="empirical"`` keeps the API stable for existing callers (the
    benchmark, tests); the experiment runner fills configs that name none with ``--p-value``
    (default ``unselected``), because ``empirical`` collapses to min_k.
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
        if self.p_value not in PVALUE_METHODS:
            raise ValueError(
                f"config {self.name!r}: p_value must be one of {', '.join(PVALUE_METHODS)}, "
                f"got {self.p_value!r}"
            )
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
