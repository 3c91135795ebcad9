"""Router adapters: put the BH selector (or top-k) in place of a transformers 5.x MoE router.

transformers 5.x MoE blocks call ``mlp.gate`` (``mlp.router`` for GPT-OSS), which returns
``(router_logits, weights (T, k), indices (T, k))``, and hand weights and indices to
``mlp.experts``. Replacing the router's ``forward`` on the instance is therefore the one place that
changes expert selection without touching attention, shared experts or the experts kernels. Patch
right after loading, before any wrapping (torch.compile, nnsight, PEFT): wrappers capture
``forward`` when they are built. If accelerate already hooked the router (``device_map``), its hook
calls ``_old_forward``, so that is the attribute replaced there.

Unused slots carry index ``E`` (the sentinel) with weight 0. The eager experts loop skips index E.
The ``grouped_mm`` and ``batched_mm`` kernels only mask sentinels when
``experts._is_expert_parallel`` is set, so the adapter sets it whenever the active config can leave
slots empty. GPT-OSS eager cannot take the sentinel (one_hot over E classes), so there the slot is
padded with the token's best expert and weight 0.

What the p-values are computed on (per family):
- softmax routers (OLMoE, Qwen3-MoE, Qwen3-Next, Mixtral): the softmax probabilities for the
  empirical-type nulls (``empirical``, ``unselected``: a rank statistic, so this equals using
  log-probabilities, i.e. logits minus a per-token constant that softmax ignores);
  log-probabilities for the Gaussian z. GPT-OSS: centred logits ``l - mean(l)`` (same idea).
- GLM-4.5 (sigmoid router): ``sigmoid(l) + e_score_correction_bias``, the score GLM itself ranks by;
  experts outside the token's selected groups get p = 1 (group-limited routing is kept).
- ``probability``: ``log softmax(l / T)`` over all E (every family), tested against the same
  quantity of the experts the native router skipped on calibration text, calibrated at that T.
- ``seed_probability``: ``1 - softmax(l / T)`` (the seed's formula).

Temperature always rescales the logits that build the mixing weights. It changes which experts are
selected only under ``probability`` and ``seed_probability``; under ``empirical``, ``unselected``
and ``gaussian`` the p-values use untempered scores (and the z-score is invariant to rescaling), so
there temperature never changes the selection for a given hidden state.

Calibration (:meth:`RoutingController.begin_calibration`) runs the native router and keeps, per
layer, the p-value scores of every expert (the ``empirical`` null), of the experts the native
router did not select (``unselected``), and the logits with the not-selected mask, from which the
``probability`` null is built for each temperature a config asks for.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from experiments.bh_routing.selector import (
    NULL_METHODS,
    BHSelector,
    EmpiricalNull,
    RoutingConfig,
    Selection,
    seed_probability_pvalues,
    select_pvalues_in_key_order,
    select_topk,
    select_with_sort_key,
)

RouterOutput = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass
class Scored:
    """Router quantities a family computes once per call."""

    logits: torch.Tensor  # what the router returns as router_logits
    sort_key: torch.Tensor  # what the native router ranks experts by (higher = better)
    excluded: torch.Tensor | None  # bool (T, E): experts that may not be chosen (GLM groups)


class Family:
    """How one architecture's router scores experts and turns a selection into mixing weights.

    The base class is the general path: p-values on centred float32 logits, experts ranked by the
    family's sort key. Families whose p-value scores are their ranking key override
    :meth:`select_bh` to skip the gather (and :meth:`calibration_scores` to match).
    """

    name = "base"
    router_attr = "gate"
    #: whether the eager experts loop of this family skips sentinel index E
    eager_takes_sentinel = True

    def num_experts(self, router: nn.Module) -> int:
        """Number of routed experts E."""
        return int(router.num_experts)

    def native_k(self, router: nn.Module) -> int:
        """The model's own top-k."""
        return int(router.top_k)

    def native_renormalize(self, router: nn.Module) -> bool:
        """Whether the native router renormalises the selected weights."""
        return bool(getattr(router, "norm_topk_prob", False))

    def score(self, router: nn.Module, hidden: torch.Tensor) -> Scored:
        """Compute logits and ranking key for ``hidden`` (any leading shape)."""
        raise NotImplementedError

    def pvalue_scores(self, scored: Scored) -> torch.Tensor:
        """Scores the p-values use, ``(T, E)``: centred float32 logits unless a family says
        otherwise."""
        lf = scored.logits.float()
        return lf - lf.mean(dim=-1, keepdim=True)

    def calibration_scores(self, scored: Scored) -> torch.Tensor:
        """The quantity the empirical null is built from: exactly what :meth:`select_bh` tests."""
        ps = self.pvalue_scores(scored)
        return ps[~scored.excluded] if scored.excluded is not None else ps

    def tempered_scores(self, scored: Scored, temperature: float) -> torch.Tensor:
        """``log softmax(logits / T)`` over all E, -inf for excluded experts (``probability``).

        The same quantity for every family: the temperature-scaled router probabilities the seed
        meant, on a log scale (a monotone map, so the empirical p-values are unchanged by it).
        """
        lp = torch.log_softmax(scored.logits.float() / temperature, dim=-1)
        if scored.excluded is not None:
            lp = lp.masked_fill(scored.excluded, float("-inf"))
        return lp

    def select_bh(self, selector: BHSelector, scored: Scored) -> Selection:
        """BH selection for this family (general path: rank by the sort key, test the p-scores)."""
        ps = self.pvalue_scores(scored)
        if scored.excluded is not None:
            # Excluded experts sort last (key -inf); give them a score no null exceeds -> p = 1.
            ps = ps.masked_fill(scored.excluded, float("-inf"))
        return select_with_sort_key(selector, ps, scored.sort_key)

    def weights(
        self,
        router: nn.Module,
        scored: Scored,
        sel: Selection,
        temperature: float,
        renormalize: bool,
    ) -> torch.Tensor:
        """Mixing weights ``(T, width)`` for the selected slots, 0 in empty slots."""
        raise NotImplementedError


class SoftmaxFamily(Family):
    """Softmax over all experts, top-k, optional renormalisation (OLMoE, Qwen3-MoE, Qwen3-Next).

    The empirical p-values are computed on the softmax probabilities themselves: p(s) depends on s
    only through its rank among the null scores, so probabilities, log-probabilities and logits
    minus any per-token constant give the same p-values, and the probabilities are already what
    the native router ranks and weights by (no log, no gather). The per-token Gaussian z needs a
    location-scale quantity, so it uses log-probabilities (z of logits up to rounding).
    """

    name = "softmax"
    #: OLMoE/Qwen3 cast weights back to the logits dtype; Mixtral keeps float32.
    cast_to_logits_dtype = True

    def score(self, router: nn.Module, hidden: torch.Tensor) -> Scored:
        """Same linear and softmax as the native router, so top-k ranks identically."""
        hidden = hidden.reshape(-1, router.hidden_dim)
        logits = F.linear(hidden, router.weight)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float)
        return Scored(logits=logits, sort_key=probs, excluded=None)

    def pvalue_scores(self, scored: Scored) -> torch.Tensor:
        """Softmax probabilities (see the class docs)."""
        return scored.sort_key

    def select_bh(self, selector: BHSelector, scored: Scored) -> Selection:
        """The probabilities are ranking key, p-value scores and weights: no sort, no gather."""
        return selector.select_topk_scores(scored.sort_key, log_for_gaussian=True)

    def weights(
        self,
        router: nn.Module,
        scored: Scored,
        sel: Selection,
        temperature: float,
        renormalize: bool,
    ) -> torch.Tensor:
        """softmax(logits / T) over all E at the selected experts (as the native router)."""
        if temperature == 1.0 and sel.values is not None:
            # The selection already holds the probabilities at its slots (0 in empty ones): the
            # same numbers the native router takes from topk, so no gather.
            w = sel.values
        else:
            probs = torch.softmax(scored.logits / temperature, dim=-1, dtype=torch.float)
            w = probs.gather(-1, sel.indices.clamp(max=probs.shape[-1] - 1))
            if not sel.all_used:
                w = w * sel.mask
        if renormalize:
            w = w / w.sum(dim=-1, keepdim=True).clamp_min(1e-20)
        return w.to(scored.logits.dtype) if self.cast_to_logits_dtype else w


class MixtralFamily(SoftmaxFamily):
    """Mixtral: softmax, top-k, always renormalised, weights stay float32."""

    name = "mixtral"
    cast_to_logits_dtype = False

    def native_renormalize(self, router: nn.Module) -> bool:
        """Mixtral always renormalises."""
        return True


class GptOssFamily(Family):
    """GPT-OSS: top-k on biased logits, softmax over the k selected logits only."""

    name = "gpt_oss"
    router_attr = "router"
    eager_takes_sentinel = False

    def native_renormalize(self, router: nn.Module) -> bool:
        """The softmax over the selected logits always sums to one."""
        return True

    def score(self, router: nn.Module, hidden: torch.Tensor) -> Scored:
        """Biased logits, as the native router."""
        hidden = hidden.reshape(-1, router.hidden_dim)
        logits = F.linear(hidden, router.weight, router.bias)
        return Scored(logits=logits, sort_key=logits, excluded=None)

    def weights(
        self,
        router: nn.Module,
        scored: Scored,
        sel: Selection,
        temperature: float,
        renormalize: bool,
    ) -> torch.Tensor:
        """Softmax over the selected logits / T; renormalisation is inherent, the flag is
        ignored."""
        vals = scored.logits.gather(-1, sel.indices.clamp(max=scored.logits.shape[-1] - 1))
        if temperature != 1.0:
            vals = vals / temperature
        if sel.all_used:
            return torch.softmax(vals, dim=1, dtype=vals.dtype)
        vals = vals.masked_fill(~sel.mask, float("-inf"))
        w = torch.softmax(vals, dim=1, dtype=vals.dtype)
        # A token with k = 0 has all -inf and softmax gives NaN; it contributes nothing instead.
        return torch.where(sel.mask, w, torch.zeros_like(w))


class GlmFamily(Family):
    """GLM-4.5 (Air): sigmoid scores + correction bias, group-limited, scaled.

    p-values are on ``sigmoid(l) + e_score_correction_bias``, the score GLM ranks by, with experts
    outside the token's groups at -inf (p = 1): that is the sort key itself, so no gather.
    """

    name = "glm4_moe"

    def score(self, router: nn.Module, hidden: torch.Tensor) -> Scored:
        """Native GLM scoring including the group limit; excluded experts are marked."""
        hidden = hidden.reshape(-1, router.hidden_dim)
        logits = F.linear(hidden.float(), router.weight.float())
        scores = logits.sigmoid()
        choice = scores + router.e_score_correction_bias
        e, g = router.num_experts, router.num_group
        group_scores = choice.view(-1, g, e // g).topk(2, dim=-1)[0].sum(dim=-1)
        group_idx = torch.topk(group_scores, k=router.topk_group, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1.0)
        allowed = group_mask.unsqueeze(-1).expand(-1, g, e // g).reshape(-1, e).bool()
        key = choice.masked_fill(~allowed, float("-inf"))
        return Scored(logits=logits, sort_key=key, excluded=~allowed)

    def pvalue_scores(self, scored: Scored) -> torch.Tensor:
        """sigmoid + correction bias, -inf outside the token's groups (the sort key)."""
        return scored.sort_key

    def select_bh(self, selector: BHSelector, scored: Scored) -> Selection:
        """The scores are the sort key: one sort, no gather."""
        return select_with_sort_key(selector, scored.sort_key)

    def weights(
        self,
        router: nn.Module,
        scored: Scored,
        sel: Selection,
        temperature: float,
        renormalize: bool,
    ) -> torch.Tensor:
        """sigmoid(logits / T) at the selected experts, optional normalisation, routed scaling."""
        scores = (
            (scored.logits / temperature).sigmoid()
            if temperature != 1.0
            else scored.logits.sigmoid()
        )
        w = scores.gather(-1, sel.indices.clamp(max=scores.shape[-1] - 1))
        if not sel.all_used:
            w = w * sel.mask
        if renormalize:
            w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
        return w * router.routed_scaling_factor


#: router class name -> family; the class names are those of transformers 5.23.
FAMILIES: dict[str, Family] = {
    "OlmoeTopKRouter": SoftmaxFamily(),
    "Qwen3MoeTopKRouter": SoftmaxFamily(),
    "Qwen3NextTopKRouter": SoftmaxFamily(),
    "MixtralTopKRouter": MixtralFamily(),
    "GptOssTopKRouter": GptOssFamily(),
    "Glm4MoeTopkRouter": GlmFamily(),
}


@dataclass
class RoutingRecord:
    """Per-layer routing statistics accumulated on device while recording is on."""

    k_hist: dict[int, torch.Tensor] = field(default_factory=dict)
    expert_counts: dict[int, torch.Tensor] = field(default_factory=dict)
    first_call_k: dict[int, torch.Tensor] = field(default_factory=dict)
    #: k of every token at the first patched MoE layer, over all calls, when ``keep_first_layer``
    #: is on: identical inputs across configs there, so it compares selection rules directly.
    first_layer_k: list[torch.Tensor] = field(default_factory=list)
    keep_first_layer: bool = False

    def to_plain(self) -> dict[str, Any]:
        """Move everything to CPU lists (one sync at the end instead of one per step)."""
        return {
            "first_layer_k": torch.cat(self.first_layer_k).cpu().tolist()
            if self.first_layer_k
            else [],
            "k_hist": {str(k): v.cpu().tolist() for k, v in sorted(self.k_hist.items())},
            "expert_counts": {
                str(k): v.cpu().tolist() for k, v in sorted(self.expert_counts.items())
            },
            "first_call_k": {
                str(k): v.cpu().tolist() for k, v in sorted(self.first_call_k.items())
            },
        }


@dataclass
class PatchedLayer:
    """One patched MoE layer, plus what the active config precomputed for it."""

    layer: int
    router: nn.Module
    experts: nn.Module | None
    family: Family
    original_forward: Callable[..., RouterOutput]
    attr: str  # "forward" or "_old_forward"
    patched_forward: Callable[..., RouterOutput] | None = None
    num_experts: int = 0
    #: the experts' ``_is_expert_parallel`` before patching (restored on unpatch)
    original_expert_parallel: bool = False
    # Per-config state, rebuilt by RoutingController.set_config so the per-call path reads
    # attributes instead of re-deriving them every layer of every decoding step.
    selector: BHSelector | None = None
    #: selectors built so far, by (alpha, min_k, max_k, p_value, correction, device), so switching
    #: configs back and forth (the benchmark's interleaved arms) does not rebuild them
    selectors: dict[tuple[Any, ...], BHSelector] = field(default_factory=dict)
    renormalize: bool = False
    pad_sentinel: bool = False  # GPT-OSS eager: empty slots get a real index at weight 0


def _sentinels_possible(cfg: RoutingConfig | None, e: int) -> bool:
    """Whether ``cfg`` can leave empty slots (variable k) on a layer with ``e`` experts."""
    return cfg is not None and cfg.method == "bh" and min(cfg.min_k, e) < min(cfg.max_k, e)


class RoutingController:
    """Holds the active routing config and shared state for every patched router of one model.

    ``config=None`` runs the native router through the patch; :meth:`detach` takes the patch out
    of the call path altogether (the benchmark's ``native`` arm).
    """

    def __init__(self, experts_implementation: str) -> None:
        self.config: RoutingConfig | None = None
        self._null: EmpiricalNull | None = None
        self.experts_implementation = experts_implementation
        self.recording = False
        self.record = RoutingRecord()
        self.calibrating = False
        self.calibration: dict[int, list[torch.Tensor]] = {}
        self.calibration_unselected: dict[int, list[torch.Tensor]] = {}
        self.calibration_logits: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        #: ``unselected`` null, and the per-layer (logits, not-selected mask) the ``probability``
        #: nulls are built from, with those nulls cached by temperature.
        self._unselected: EmpiricalNull | None = None
        self._prob_source: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._prob_nulls: dict[float, EmpiricalNull] = {}
        self.layers: list[PatchedLayer] = []

    def _forget_selectors(self) -> None:
        for pl in self.layers:
            # Their thresholds came from the old null; rebuilt on next use.
            pl.selector = None
            pl.selectors.clear()

    @property
    def null(self) -> EmpiricalNull | None:
        """The calibrated ``empirical`` null (None until calibrated)."""
        return self._null

    @null.setter
    def null(self, value: EmpiricalNull | None) -> None:
        self._null = value
        self._forget_selectors()

    @property
    def unselected_null(self) -> EmpiricalNull | None:
        """The calibrated ``unselected`` null (None until calibrated)."""
        return self._unselected

    @unselected_null.setter
    def unselected_null(self, value: EmpiricalNull | None) -> None:
        self._unselected = value
        self._forget_selectors()

    def probability_null(self, temperature: float) -> EmpiricalNull | None:
        """The ``probability`` null at ``temperature`` (built on first use; None if uncalibrated).

        Built from the calibration logits of the experts the native router did not select, scaled
        by the same T the config uses: comparing tempered test scores with an untempered null
        would make T shift every p-value rather than change what is compared.
        """
        if not self._prob_source:
            return None
        null = self._prob_nulls.get(temperature)
        if null is None:
            samples = {}
            for layer, (logits, unselected) in self._prob_source.items():
                samples[layer] = torch.log_softmax(logits / temperature, dim=-1)[unselected]
            null = EmpiricalNull(samples)
            self._prob_nulls[temperature] = null
        return null

    def null_for(self, cfg: RoutingConfig) -> EmpiricalNull | None:
        """The null a BH config's p-value model uses (None for models without one)."""
        if cfg.p_value == "empirical":
            return self._null
        if cfg.p_value == "unselected":
            return self._unselected
        if cfg.p_value == "probability":
            return self.probability_null(cfg.temperature)
        return None

    def null_sizes(self) -> dict[str, dict[str, int]]:
        """Samples per layer of each calibrated null (``probability`` at T = 1)."""
        out: dict[str, dict[str, int]] = {}
        for name, null in (
            ("empirical", self._null),
            ("unselected", self._unselected),
            ("probability", self.probability_null(1.0)),
        ):
            if null is not None:
                out[name] = {str(layer): null.size(layer) for layer in null.layers}
        return out

    # -- state switches -------------------------------------------------------------------------
    def set_config(self, config: RoutingConfig | None) -> None:
        """Switch all layers to ``config`` (no re-patching needed)."""
        if (
            config is not None
            and config.method == "bh"
            and config.p_value in NULL_METHODS
            and self.null_for(config) is None
        ):
            raise ValueError(
                f"config {config.name!r} uses the {config.p_value} null but none is calibrated"
            )
        self.config = config
        for pl in self.layers:
            pl.selector = None
            if config is not None:
                pl.renormalize = (
                    pl.family.native_renormalize(pl.router)
                    if config.renormalize is None
                    else config.renormalize
                )
            sentinels = _sentinels_possible(config, pl.num_experts)
            pl.pad_sentinel = (
                sentinels
                and not pl.family.eager_takes_sentinel
                and self.experts_implementation == "eager"
            )
            if pl.experts is not None and self.experts_implementation in (
                "grouped_mm",
                "batched_mm",
            ):
                # These kernels only mask the sentinel index E when running expert-parallel, and
                # the masking costs a few ops per layer; set the flag only when empty slots can
                # occur, so top-k and fixed-k BH run exactly the native experts path.
                pl.experts._is_expert_parallel = pl.original_expert_parallel or sentinels
            if config is not None and config.method == "bh":
                # Build the selector now rather than inside the first routed forward (which a
                # caller may be timing); route() rebuilds it only if the device differs.
                weight = getattr(pl.router, "weight", None)
                if isinstance(weight, torch.Tensor) and weight.device.type != "meta":
                    self._selector(pl, config, weight.device)

    def _selector(self, pl: PatchedLayer, cfg: RoutingConfig, device: torch.device) -> BHSelector:
        sel = pl.selector
        if sel is None or sel.device != device:
            # The probability null depends on T; the other models' thresholds do not.
            t_key = cfg.temperature if cfg.p_value == "probability" else None
            key = (cfg.alpha, cfg.min_k, cfg.max_k, cfg.p_value, cfg.correction, t_key, str(device))
            sel = pl.selectors.get(key)
            if sel is None:
                sel = BHSelector(
                    pl.num_experts,
                    alpha=cfg.alpha,
                    min_k=cfg.min_k,
                    max_k=cfg.max_k,
                    method=cfg.p_value,
                    null=self.null_for(cfg),
                    layer=pl.layer,
                    correction=cfg.correction,
                    sentinel=pl.num_experts,
                    device=device,
                )
                pl.selectors[key] = sel
            pl.selector = sel
        return sel

    def detach(self) -> None:
        """Put the original router forwards and experts flags back, keeping config, null and
        built selectors, so :meth:`attach` re-enables routing without rebuilding anything."""
        for pl in self.layers:
            setattr(pl.router, pl.attr, pl.original_forward)
            if pl.experts is not None and hasattr(pl.experts, "_is_expert_parallel"):
                pl.experts._is_expert_parallel = pl.original_expert_parallel

    def attach(self) -> None:
        """Undo :meth:`detach`."""
        for pl in self.layers:
            setattr(pl.router, pl.attr, pl.patched_forward)
        self.set_config(self.config)  # re-applies the experts flags

    def start_recording(self, keep_first_layer: bool = False) -> None:
        """Reset and start accumulating per-layer k histograms and expert counts (and, with
        ``keep_first_layer``, the k of every token at the first MoE layer)."""
        self.record = RoutingRecord(keep_first_layer=keep_first_layer)
        self.recording = True

    def stop_recording(self) -> dict[str, Any]:
        """Stop recording and return the statistics as plain lists."""
        self.recording = False
        return self.record.to_plain()

    # -- the patched forward --------------------------------------------------------------------
    def route(self, pl: PatchedLayer, hidden_states: torch.Tensor) -> RouterOutput:
        """Replacement for the router's forward.

        Top-k and BH share everything but the selection step (and BH's masking of empty slots),
        so the benchmark's top-k arm measures the same code around a different selector.
        """
        cfg = self.config
        if self.calibrating:
            scored = pl.family.score(pl.router, hidden_states)
            out = pl.original_forward(hidden_states)
            self._collect_calibration(pl, scored, out[2])
            return out
        if cfg is None:
            out = pl.original_forward(hidden_states)
            if self.recording:
                idx = out[2]
                self._record(
                    pl,
                    torch.full(idx.shape[:-1], idx.shape[-1], device=idx.device),
                    idx,
                    idx.shape[-1],
                )
            return out
        fam = pl.family
        scored = fam.score(pl.router, hidden_states)
        if cfg.method == "topk":
            sel = select_topk(scored.sort_key, cfg.k)
        elif cfg.p_value == "probability":
            sel = select_with_sort_key(
                self._selector(pl, cfg, hidden_states.device),
                fam.tempered_scores(scored, cfg.temperature),
                scored.sort_key,
            )
        elif cfg.p_value == "seed_probability":
            p = seed_probability_pvalues(scored.logits, cfg.temperature)
            if scored.excluded is not None:
                p = p.masked_fill(scored.excluded, 1.0)
            sel = select_pvalues_in_key_order(
                self._selector(pl, cfg, hidden_states.device), p, scored.sort_key
            )
        else:
            sel = fam.select_bh(self._selector(pl, cfg, hidden_states.device), scored)
        weights = fam.weights(pl.router, scored, sel, cfg.temperature, pl.renormalize)
        indices = sel.indices
        if pl.pad_sentinel:
            # GPT-OSS eager one_hot has no sentinel class: pad with the best expert at weight 0.
            # (Unconditional torch.where: checking mask.all() first would sync the device.)
            best = scored.sort_key.argmax(dim=-1, keepdim=True)
            indices = torch.where(sel.mask, indices, best.expand_as(indices))
        if self.recording:
            self._record(pl, sel.k, sel.indices, sel.indices.shape[-1])
        return scored.logits, weights, indices

    def _record(self, pl: PatchedLayer, k: torch.Tensor, indices: torch.Tensor, width: int) -> None:
        e = pl.num_experts
        kh = torch.bincount(k.reshape(-1), minlength=width + 1)
        ec = torch.bincount(indices.reshape(-1), minlength=e + 1)[:e]
        rec = self.record
        if rec.keep_first_layer and pl is self.layers[0]:
            rec.first_layer_k.append(k.reshape(-1).detach().clone())
        if pl.layer in rec.k_hist:
            prev = rec.k_hist[pl.layer]
            if prev.numel() < kh.numel():
                prev = F.pad(prev, (0, kh.numel() - prev.numel()))
            elif kh.numel() < prev.numel():
                kh = F.pad(kh, (0, prev.numel() - kh.numel()))
            rec.k_hist[pl.layer] = prev + kh
            rec.expert_counts[pl.layer] += ec
        else:
            rec.k_hist[pl.layer] = kh
            rec.expert_counts[pl.layer] = ec
            rec.first_call_k[pl.layer] = k.reshape(-1).detach().clone()

    # -- calibration ----------------------------------------------------------------------------
    def _collect_calibration(
        self, pl: PatchedLayer, scored: Scored, native_indices: torch.Tensor
    ) -> None:
        fam = pl.family
        ps = fam.calibration_scores(scored)
        self.calibration.setdefault(pl.layer, []).append(ps.detach().reshape(-1).float().cpu())
        logits = scored.logits.detach().float().reshape(-1, pl.num_experts)
        idx = native_indices.reshape(logits.shape[0], -1).long()
        selected = torch.zeros_like(logits, dtype=torch.bool)
        # Clamp: a sentinel-padded index (never from a native router, but cheap to guard) must not
        # index out of range; its weight-0 slot counts as selected, which only shrinks the null.
        selected.scatter_(1, idx.clamp(0, pl.num_experts - 1), True)
        unselected = ~selected
        if scored.excluded is not None:
            # Experts outside GLM's chosen groups are never tested (p = 1): not part of the null.
            unselected &= ~scored.excluded.reshape_as(unselected)
        pscores = fam.pvalue_scores(scored).detach().float().reshape_as(logits)
        self.calibration_unselected.setdefault(pl.layer, []).append(pscores[unselected].cpu())
        self.calibration_logits.setdefault(pl.layer, []).append((logits.cpu(), unselected.cpu()))

    def begin_calibration(self) -> None:
        """Collect p-value scores under native routing until :meth:`end_calibration`."""
        self.calibration = {}
        self.calibration_unselected = {}
        self.calibration_logits = {}
        self.calibrating = True

    def end_calibration(self, max_samples_per_layer: int = 400_000, seed: int = 0) -> EmpiricalNull:
        """Build (and install) the per-layer empirical null from the collected scores."""
        self.calibrating = False
        if not self.calibration:
            raise ValueError("calibration collected no router scores (empty calibration text?)")
        gen = torch.Generator().manual_seed(seed)

        def _cap(flat: torch.Tensor) -> torch.Tensor:
            if flat.numel() > max_samples_per_layer:
                # Subsample to bound memory and searchsorted cost; fixed seed keeps runs repeatable.
                keep = torch.randperm(flat.numel(), generator=gen)[:max_samples_per_layer]
                flat = flat[keep]
            return flat

        samples = {layer: _cap(torch.cat(c)) for layer, c in self.calibration.items()}
        unselected = {layer: _cap(torch.cat(c)) for layer, c in self.calibration_unselected.items()}
        source: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for layer, pairs in self.calibration_logits.items():
            logits = torch.cat([p[0] for p in pairs])
            mask = torch.cat([p[1] for p in pairs])
            rows = max(1, max_samples_per_layer // max(1, logits.shape[1]))
            if logits.shape[0] > rows:
                keep = torch.randperm(logits.shape[0], generator=gen)[:rows]
                logits, mask = logits[keep], mask[keep]
            source[layer] = (logits, mask)
        self.calibration, self.calibration_unselected, self.calibration_logits = {}, {}, {}
        self._prob_source, self._prob_nulls = source, {}
        self._unselected = EmpiricalNull(unselected)
        self.null = EmpiricalNull(samples)  # the setter also drops selectors built on old nulls
        return self.null


def find_model_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers of a causal LM (``model.model.layers``)."""
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise ValueError(
            f"{type(model).__name__} has no model.layers; not a supported decoder model"
        )
    return list(layers)


def experts_implementation_of(model: nn.Module) -> str:
    """The experts implementation the model actually runs (``config._experts_implementation``)."""
    cfg = getattr(model, "config", None)
    impl = getattr(cfg, "_experts_implementation", None)
    return str(impl) if impl else "eager"


def patch_model(model: nn.Module) -> RoutingController:
    """Patch every supported MoE router of ``model`` in place and return the shared controller.

    Raises ``ValueError`` when no supported router is found or the model is already patched.
    """
    if getattr(model, "_bh_routing_controller", None) is not None:
        raise ValueError("model is already patched for BH routing")
    impl = experts_implementation_of(model)
    ctl = RoutingController(impl)
    for i, layer in enumerate(find_model_layers(model)):
        mlp = getattr(layer, "mlp", None)
        if mlp is None:
            continue
        for attr in ("gate", "router"):
            router = getattr(mlp, attr, None)
            fam = FAMILIES.get(type(router).__name__) if router is not None else None
            if fam is not None:
                break
        else:
            continue  # dense layer (Qwen3-MoE sparse step, GLM first_k_dense_replace)
        experts = getattr(mlp, "experts", None)
        hook_attr = "_old_forward" if hasattr(router, "_old_forward") else "forward"
        pl = PatchedLayer(
            layer=i,
            router=router,
            experts=experts,
            family=fam,
            original_forward=getattr(router, hook_attr),
            attr=hook_attr,
            num_experts=fam.num_experts(router),
            original_expert_parallel=bool(getattr(experts, "_is_expert_parallel", False)),
        )

        def _fwd(
            hidden_states: torch.Tensor, *_a: Any, _pl: PatchedLayer = pl, **_k: Any
        ) -> RouterOutput:
            return ctl.route(_pl, hidden_states)

        pl.patched_forward = _fwd
        setattr(router, hook_attr, _fwd)
        ctl.layers.append(pl)
    if not ctl.layers:
        raise ValueError(
            f"no supported MoE router found in {type(model).__name__}; supported router "
            f"classes: {', '.join(sorted(FAMILIES))}"
        )
    model._bh_routing_controller = ctl
    return ctl


def unpatch_model(model: nn.Module) -> None:
    """Restore the original router forwards (and the experts' expert-parallel flag)."""
    ctl: RoutingController | None = getattr(model, "_bh_routing_controller", None)
    if ctl is None:
        return
    ctl.detach()
    model._bh_routing_controller = None


def model_summary(model: nn.Module, ctl: RoutingController) -> dict[str, Any]:
    """Facts recorded with every result: architecture, experts, native k, experts implementation."""
    pl = ctl.layers[0]
    return {
        "architecture": type(model).__name__,
        "router_family": pl.family.name,
        "num_moe_layers": len(ctl.layers),
        "moe_layers": [p.layer for p in ctl.layers],
        "num_experts": pl.family.num_experts(pl.router),
        "native_top_k": pl.family.native_k(pl.router),
        "native_renormalize": pl.family.native_renormalize(pl.router),
        "experts_implementation": ctl.experts_implementation,
    }
