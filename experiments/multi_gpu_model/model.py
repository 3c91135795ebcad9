"""Analytical model of MoE decode serving on a multi-GPU box.

Formulas and assumptions: docs/experiments/multi_gpu_model.md.

Per decode step every GPU advances ``sequences_per_gpu`` sequences by one token. A step is
``layers`` times (local work + exposed all-to-all) plus the LM head, where local work is the
roofline maximum of compute time and HBM time. Three placements:

- expert parallel (EP = G): experts sharded over all G GPUs, attention replicated (each GPU runs
  attention for its own sequences), two all-to-alls (dispatch, combine) per MoE layer;
- data parallel (DP = G): every GPU holds the whole model; no communication, G x one GPU;
- hybrid (EP = e, DP = d, e*d = G): d replicas of an e-GPU expert-parallel group.

Each placement is evaluated for the baseline and for an expert-prediction/prefetch strategy whose
accuracy and communication reduction are parameters (nothing here measures them).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

DTYPE_BYTES = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "fp8": 1.0, "int8": 1.0, "int4": 0.5}
DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "default.json"


class ConfigError(ValueError):
    """The config file is missing something or holds a value that makes no sense."""


# --------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class GPU:
    """Datasheet numbers and a dated price for one GPU type."""

    name: str
    memory_gb: float
    hbm_tb_s: float
    bf16_tflops: float
    price_per_gpu_hour_usd: float
    price_as_of: str
    price_source: str = ""


@dataclass(frozen=True)
class Interconnect:
    """Per-GPU bandwidth each way, the share of it an all-to-all achieves, and per-call latency."""

    name: str
    per_gpu_gb_s_each_way: float
    alltoall_efficiency: float
    latency_us: float
    note: str = ""

    @property
    def effective_bytes_per_s(self) -> float:
        """Bytes per second one GPU can push into an all-to-all."""
        return self.per_gpu_gb_s_each_way * 1e9 * self.alltoall_efficiency


@dataclass(frozen=True)
class System:
    """A box: ``count`` GPUs of one type on one interconnect; ``hybrid`` is (EP, DP)."""

    name: str
    gpu: GPU
    count: int
    interconnect: Interconnect
    hybrid: tuple[int, int]


@dataclass(frozen=True)
class MoEModel:
    """Shape of a decoder-only MoE transformer (every layer MoE unless ``dense_ffn`` > 0)."""

    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    experts: int
    top_k: int
    expert_ffn: int
    tied_embeddings: bool = False
    dense_ffn: int = 0

    @property
    def attn_params_per_layer(self) -> int:
        """q, k, v, o projections (no biases) plus the two RMSNorm gains."""
        h, hd = self.hidden, self.head_dim
        return h * self.heads * hd * 2 + h * self.kv_heads * hd * 2 + 2 * h

    @property
    def expert_params(self) -> int:
        """One SwiGLU expert: gate, up and down projections."""
        return 3 * self.hidden * self.expert_ffn

    @property
    def router_params_per_layer(self) -> int:
        """The linear router, hidden -> experts."""
        return self.hidden * self.experts

    @property
    def dense_params_per_layer(self) -> int:
        """Everything in a layer that is not an expert (replicated on every GPU)."""
        return (
            self.attn_params_per_layer
            + self.router_params_per_layer
            + 3 * self.hidden * self.dense_ffn
        )

    @property
    def embedding_params(self) -> int:
        """Input embedding plus LM head (one matrix if tied) plus the final norm."""
        return self.vocab * self.hidden * (1 if self.tied_embeddings else 2) + self.hidden

    @property
    def total_params(self) -> int:
        """All parameters."""
        per_layer = self.dense_params_per_layer + self.experts * self.expert_params
        return self.layers * per_layer + self.embedding_params

    @property
    def active_params_per_token(self) -> int:
        """Parameters a token multiplies through (top-k experts, not all)."""
        per_layer = self.dense_params_per_layer + self.top_k * self.expert_params
        return self.layers * per_layer + self.vocab * self.hidden

    def kv_bytes_per_token_layer(self, kv_bytes: float) -> float:
        """K and V of one token in one layer."""
        return 2 * self.kv_heads * self.head_dim * kv_bytes


@dataclass(frozen=True)
class Workload:
    """What is served and how hard the hardware is assumed to be driven."""

    model: MoEModel
    weight_bytes: float
    kv_bytes: float
    dispatch_bytes: float
    combine_bytes: float
    dedup_per_gpu: bool
    sequences_per_gpu: int
    context_tokens: int
    mfu: float
    hbm_efficiency: float
    usable_memory_fraction: float


@dataclass(frozen=True)
class Prefetch:
    """Expert prediction + prefetch: accuracy p, bytes divided by r for hits, predictor cost."""

    name: str
    prediction_accuracy: float
    comm_reduction: float
    predictor_overhead: float


@dataclass(frozen=True)
class Config:
    """Everything the model reads from the config file."""

    systems: list[System]
    workload: Workload
    prefetch: Prefetch
    tokens_per_month: float
    models: dict[str, MoEModel]
    validation: dict[str, Any] = field(default_factory=dict)


def _need(d: dict[str, Any], key: str, where: str) -> Any:
    if key not in d:
        raise ConfigError(f"{where}: missing key {key!r}")
    return d[key]


def _pos(x: Any, what: str) -> float:
    try:
        v = float(x)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{what} must be a number, got {x!r}") from e
    if not v > 0 or math.isinf(v):
        raise ConfigError(f"{what} must be positive and finite, got {x!r}")
    return v


def _dtype(name: Any, what: str) -> float:
    if name not in DTYPE_BYTES:
        raise ConfigError(f"{what}: unknown dtype {name!r}; choose from {sorted(DTYPE_BYTES)}")
    return DTYPE_BYTES[name]


def load_config(path: Path | str = DEFAULT_CONFIG, model: str | None = None) -> Config:
    """Read and validate the JSON config; ``model`` overrides ``workload.model``."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise ConfigError(f"config file not found: {path}") from e
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read config {path}: {e}") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a JSON object")
    try:
        return _parse_config(raw, model)
    except (TypeError, AttributeError) as e:
        raise ConfigError(f"{path}: malformed config ({e})") from e


def _parse_config(raw: dict[str, Any], model_override: str | None) -> Config:
    gpus: dict[str, GPU] = {}
    for name, g in _need(raw, "gpus", "config").items():
        gpus[name] = GPU(
            name=name,
            memory_gb=_pos(_need(g, "memory_gb", name), f"{name}.memory_gb"),
            hbm_tb_s=_pos(_need(g, "hbm_tb_s", name), f"{name}.hbm_tb_s"),
            bf16_tflops=_pos(_need(g, "bf16_tflops", name), f"{name}.bf16_tflops"),
            price_per_gpu_hour_usd=_pos(
                _need(g, "price_per_gpu_hour_usd", name), f"{name}.price_per_gpu_hour_usd"
            ),
            price_as_of=str(_need(g, "price_as_of", name)),
            price_source=str(g.get("price_source", "")),
        )
    links: dict[str, Interconnect] = {}
    for name, c in _need(raw, "interconnects", "config").items():
        eff = _pos(_need(c, "alltoall_efficiency", name), f"{name}.alltoall_efficiency")
        if eff > 1:
            raise ConfigError(f"{name}.alltoall_efficiency must be <= 1, got {eff}")
        links[name] = Interconnect(
            name=name,
            per_gpu_gb_s_each_way=_pos(
                _need(c, "per_gpu_gb_s_each_way", name), f"{name}.per_gpu_gb_s_each_way"
            ),
            alltoall_efficiency=eff,
            latency_us=float(_need(c, "latency_us", name)),
            note=str(c.get("note", "")),
        )
    models = {
        name: MoEModel(name=name, **{k: v for k, v in m.items() if not k.startswith("_")})
        for name, m in _need(raw, "models", "config").items()
    }
    for m in models.values():
        if m.top_k > m.experts or m.top_k < 1:
            raise ConfigError(f"{m.name}: top_k must be in [1, experts]")
    w = _need(raw, "workload", "config")
    model_name = model_override or _need(w, "model", "workload")
    if model_name not in models:
        raise ConfigError(f"unknown model {model_name!r}; choose from {sorted(models)}")
    workload = Workload(
        model=models[model_name],
        weight_bytes=_dtype(w.get("weight_dtype", "bf16"), "workload.weight_dtype"),
        kv_bytes=_dtype(w.get("kv_dtype", "bf16"), "workload.kv_dtype"),
        dispatch_bytes=_dtype(w.get("dispatch_dtype", "bf16"), "workload.dispatch_dtype"),
        combine_bytes=_dtype(w.get("combine_dtype", "bf16"), "workload.combine_dtype"),
        dedup_per_gpu=bool(w.get("dedup_per_gpu", False)),
        sequences_per_gpu=int(_pos(_need(w, "sequences_per_gpu", "workload"), "sequences_per_gpu")),
        context_tokens=int(_pos(_need(w, "context_tokens", "workload"), "context_tokens")),
        mfu=_pos(_need(w, "mfu", "workload"), "workload.mfu"),
        hbm_efficiency=_pos(_need(w, "hbm_efficiency", "workload"), "workload.hbm_efficiency"),
        usable_memory_fraction=_pos(
            w.get("usable_memory_fraction", 0.9), "workload.usable_memory_fraction"
        ),
    )
    for frac, what in (
        (workload.mfu, "mfu"),
        (workload.hbm_efficiency, "hbm_efficiency"),
        (workload.usable_memory_fraction, "usable_memory_fraction"),
    ):
        if frac > 1:
            raise ConfigError(f"workload.{what} must be <= 1, got {frac}")
    p = _need(raw, "prefetch", "config")
    acc = float(_need(p, "prediction_accuracy", "prefetch"))
    if not 0 <= acc <= 1:
        raise ConfigError(f"prefetch.prediction_accuracy must be in [0, 1], got {acc}")
    red = _pos(_need(p, "comm_reduction", "prefetch"), "prefetch.comm_reduction")
    if red < 1:
        raise ConfigError(f"prefetch.comm_reduction must be >= 1, got {red}")
    prefetch = Prefetch(
        name=str(p.get("name", "prefetch")),
        prediction_accuracy=acc,
        comm_reduction=red,
        predictor_overhead=float(p.get("predictor_overhead", 0.0)),
    )
    systems = []
    for s in _need(raw, "systems", "config"):
        name = _need(s, "name", "system")
        gpu_name, link_name = _need(s, "gpu", name), _need(s, "interconnect", name)
        if gpu_name not in gpus:
            raise ConfigError(f"system {name}: unknown gpu {gpu_name!r}")
        if link_name not in links:
            raise ConfigError(f"system {name}: unknown interconnect {link_name!r}")
        count = int(_need(s, "count", name))
        ep, dp = (int(x) for x in s.get("hybrid", [count, 1]))
        if count < 1 or ep * dp != count:
            raise ConfigError(f"system {name}: hybrid EP x DP = {ep}x{dp} must equal count {count}")
        systems.append(System(name, gpus[gpu_name], count, links[link_name], (ep, dp)))
    cost = raw.get("cost", {})
    return Config(
        systems=systems,
        workload=workload,
        prefetch=prefetch,
        tokens_per_month=_pos(cost.get("tokens_per_month", 1e9), "cost.tokens_per_month"),
        models=models,
        validation=dict(raw.get("validation", {})),
    )


# --------------------------------------------------------------------------- formulas


def alltoall_bytes_per_token(
    hidden: int,
    top_k: int,
    elem_bytes: float,
    ep: int,
    experts: int | None = None,
    dedup: bool = False,
    count_local: bool = False,
) -> float:
    """Bytes one token sends in one all-to-all (dispatch or combine) across ``ep`` GPUs.

    Without dedup each of the k copies leaves the GPU unless its expert is local, which happens
    with probability 1/G: ``k*h*b*(G-1)/G``. With per-GPU dedup one copy goes to every remote GPU
    that holds at least one of the token's k experts: ``h*b*(G-1)*(1 - C(E-E/G, k)/C(E, k))``.
    ``count_local`` counts all k copies (``k*h*b``), which is how DeepEP reports its bandwidth.
    """
    if ep < 1:
        raise ValueError("ep must be >= 1")
    if count_local:
        return top_k * hidden * elem_bytes
    if ep == 1:
        return 0.0
    if not dedup:
        return top_k * hidden * elem_bytes * (ep - 1) / ep
    if experts is None:
        raise ValueError("dedup needs the expert count")
    if experts < ep:
        # Some GPUs would hold no expert at all; the per-GPU formula assumes E/G >= 1.
        raise ValueError(f"dedup needs experts >= ep (got {experts} < {ep})")
    local = experts / ep
    # P(a given remote GPU holds none of the k experts) = C(E - E/G, k) / C(E, k); E/G may be
    # fractional when E is not divisible by G, so use the gamma-function form of the binomial.
    p_none = math.exp(_log_comb(experts - local, top_k) - _log_comb(experts, top_k))
    return hidden * elem_bytes * (ep - 1) * (1.0 - p_none)


def _log_comb(n: float, k: int) -> float:
    if k > n:
        return -math.inf
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)


def expected_experts_touched(
    experts: float, top_k: int, total_experts: int, tokens: float
) -> float:
    """Expected distinct experts (out of ``experts`` considered) hit by ``tokens`` routed tokens.

    Each token picks k of E; a given expert is missed by one token with probability 1 - k/E, by T
    independent tokens with probability (1 - k/E)^T.
    """
    if tokens <= 0:
        return 0.0
    return experts * (1.0 - (1.0 - top_k / total_experts) ** tokens)


@dataclass(frozen=True)
class MemoryCheck:
    """Does one GPU's share of weights plus its KV cache fit in the usable memory?"""

    fits: bool
    weights_gb: float
    kv_gb: float
    need_gb: float
    usable_gb: float

    @property
    def reason(self) -> str:
        """Empty when it fits, else a sentence for tables and summaries."""
        if self.fits:
            return ""
        return (
            f"needs {self.need_gb:.1f} GB per GPU (weights {self.weights_gb:.1f} + KV "
            f"{self.kv_gb:.1f}) but only {self.usable_gb:.1f} GB usable"
        )


def memory_check(w: Workload, gpu: GPU, ep: int) -> MemoryCheck:
    """Weights (dense replicated + ceil(E/ep) experts per layer) + KV of this GPU's sequences."""
    m = w.model
    local_experts = math.ceil(m.experts / ep)
    params = m.layers * (m.dense_params_per_layer + local_experts * m.expert_params)
    params += m.embedding_params
    weights = params * w.weight_bytes / 1e9
    kv = (
        w.sequences_per_gpu
        * w.context_tokens
        * m.layers
        * m.kv_bytes_per_token_layer(w.kv_bytes)
        / 1e9
    )
    usable = gpu.memory_gb * w.usable_memory_fraction
    return MemoryCheck(weights + kv <= usable, weights, kv, weights + kv, usable)


@dataclass(frozen=True)
class StepBreakdown:
    """Time of one decode step on one GPU of an EP group, split into its parts (seconds)."""

    compute_s: float
    hbm_s: float
    local_s: float
    comm_total_s: float
    comm_exposed_s: float
    step_s: float
    comm_bytes_per_gpu: float

    @property
    def comm_overhead(self) -> float:
        """Share of the step spent waiting on communication."""
        return self.comm_exposed_s / self.step_s if self.step_s > 0 else 0.0


def _alltoall_time(nbytes: float, link: Interconnect) -> float:
    """One all-to-all: fixed latency plus bytes over the effective per-GPU bandwidth."""
    if nbytes <= 0:
        return 0.0
    return link.latency_us * 1e-6 + nbytes / link.effective_bytes_per_s


def step_time(
    w: Workload, gpu: GPU, link: Interconnect, ep: int, prefetch: Prefetch | None = None
) -> StepBreakdown:
    """Decode step time for an expert-parallel group of ``ep`` GPUs (ep = 1 is one whole GPU).

    Per MoE layer and GPU, with b = sequences per GPU, B = ep*b tokens in the group:
      compute = 2 * (dense + k*expert) params * b + 4*b*ctx*heads*head_dim (attention scores),
                over bf16 peak * MFU;
      hbm     = (dense weights + touched local experts * expert bytes + KV of b sequences),
                over HBM bandwidth * efficiency; touched = (E/ep) * (1 - (1 - k/E)^B);
      local   = max(compute, hbm)   (roofline);
      comm    = dispatch + combine all-to-all of b tokens (zero when ep = 1).
    Baseline: comm is on the critical path. Prefetch: the mispredicted share (1 - p) is sent as in
    the baseline; the predicted share goes at 1/r of the bytes, one layer early, and is exposed only
    where it exceeds the local work it overlaps; local work grows by the predictor's overhead.
    """
    m = w.model
    b = w.sequences_per_gpu
    flops_s = gpu.bf16_tflops * 1e12 * w.mfu
    hbm_bytes_s = gpu.hbm_tb_s * 1e12 * w.hbm_efficiency
    layer_flops = 2.0 * (m.dense_params_per_layer + m.top_k * m.expert_params) * b
    layer_flops += 4.0 * b * w.context_tokens * m.heads * m.head_dim
    touched = expected_experts_touched(m.experts / ep, m.top_k, m.experts, ep * b)
    layer_bytes = (m.dense_params_per_layer + touched * m.expert_params) * w.weight_bytes
    layer_bytes += b * w.context_tokens * m.kv_bytes_per_token_layer(w.kv_bytes)
    compute = layer_flops / flops_s
    hbm = layer_bytes / hbm_bytes_s
    local = max(compute, hbm)

    per_token = alltoall_bytes_per_token(
        m.hidden, m.top_k, w.dispatch_bytes, ep, m.experts, w.dedup_per_gpu
    ) + alltoall_bytes_per_token(m.hidden, m.top_k, w.combine_bytes, ep, m.experts, w.dedup_per_gpu)
    share_d = w.dispatch_bytes / (w.dispatch_bytes + w.combine_bytes)
    layer_comm_bytes = per_token * b

    def a2a_pair(nbytes: float) -> float:
        return _alltoall_time(nbytes * share_d, link) + _alltoall_time(nbytes * (1 - share_d), link)

    comm_full = a2a_pair(layer_comm_bytes)
    if prefetch is None or ep == 1:
        comm_bytes, comm_total, exposed = layer_comm_bytes, comm_full, comm_full
        if prefetch is not None:
            local *= 1.0 + prefetch.predictor_overhead
    else:
        p, r = prefetch.prediction_accuracy, prefetch.comm_reduction
        miss = a2a_pair(layer_comm_bytes * (1.0 - p))
        hit = a2a_pair(layer_comm_bytes * p / r)
        local *= 1.0 + prefetch.predictor_overhead
        comm_bytes = layer_comm_bytes * ((1.0 - p) + p / r)
        comm_total = miss + hit
        exposed = miss + max(0.0, hit - local)

    # LM head: read the vocab x hidden matrix once per step, b tokens through it.
    head_flops = 2.0 * m.vocab * m.hidden * b
    head_bytes = m.vocab * m.hidden * w.weight_bytes
    head = max(head_flops / flops_s, head_bytes / hbm_bytes_s)
    L = m.layers
    step = L * (local + exposed) + head
    return StepBreakdown(
        compute_s=L * compute + head_flops / flops_s,
        hbm_s=L * hbm + head_bytes / hbm_bytes_s,
        local_s=L * local + head,
        comm_total_s=L * comm_total,
        comm_exposed_s=L * exposed,
        step_s=step,
        comm_bytes_per_gpu=L * comm_bytes,
    )


def cost_per_million_tokens(gpus: int, price_per_gpu_hour: float, tokens_per_s: float) -> float:
    """G * price / (tokens/s * 3600) * 1e6: dollars to serve one million tokens at this rate."""
    if tokens_per_s <= 0:
        return math.inf
    return gpus * price_per_gpu_hour / (tokens_per_s * 3600.0) * 1e6


def annual_cost(cost_per_1m: float, tokens_per_month: float) -> float:
    """Dollars per year to serve ``tokens_per_month`` (GPU-hours bought as needed)."""
    return cost_per_1m * tokens_per_month * 12.0 / 1e6


# --------------------------------------------------------------------------- evaluation


def strategies_for(system: System) -> list[tuple[str, int, int]]:
    """(name, EP, DP) for expert parallel, data parallel and hybrid.

    The hybrid row is always there (the seed reports three strategies per system), also when its
    split equals pure EP or pure DP, as on 2 GPUs (2x1); :func:`strategy_note` says so in the row.
    """
    g = system.count
    ep_h, dp_h = system.hybrid
    return [
        ("expert_parallel", g, 1),
        ("data_parallel", 1, g),
        (f"hybrid_{ep_h}x{dp_h}", ep_h, dp_h),
    ]


def strategy_note(system: System, ep: int, dp: int, name: str) -> str:
    """Why a hybrid row repeats another strategy's numbers (empty when it does not)."""
    if not name.startswith("hybrid_"):
        return ""
    if (ep, dp) == (system.count, 1):
        return (
            f"same split as expert_parallel: {system.count} GPUs allow no EP x DP split other "
            "than pure EP and pure DP"
            if system.count <= 3
            else "same split as expert_parallel (set another hybrid split in the config)"
        )
    if (ep, dp) == (1, system.count):
        return "same split as data_parallel"
    return ""


def evaluate(
    system: System, w: Workload, prefetch: Prefetch, tokens_per_month: float
) -> list[dict[str, Any]]:
    """Rows (one per strategy x {baseline, prefetch}) with throughput, overheads and costs."""
    rows: list[dict[str, Any]] = []
    single = step_time(w, system.gpu, system.interconnect, 1)
    single_mem = memory_check(w, system.gpu, 1)
    single_tps = w.sequences_per_gpu / single.step_s if single_mem.fits else math.nan
    for strat, ep, dp in strategies_for(system):
        mem = memory_check(w, system.gpu, ep)
        for variant, pf in (("baseline", None), (prefetch.name, prefetch)):
            row: dict[str, Any] = {
                "system": system.name,
                "gpu": system.gpu.name,
                "num_gpus": system.count,
                "strategy": strat,
                "ep": ep,
                "dp": dp,
                "variant": variant,
                "model": w.model.name,
                "fits_memory": mem.fits,
                "memory_need_gb_per_gpu": round(mem.need_gb, 3),
                "memory_usable_gb_per_gpu": round(mem.usable_gb, 3),
                "memory_note": mem.reason,
                "strategy_note": strategy_note(system, ep, dp, strat),
            }
            if not mem.fits:
                row.update({k: math.nan for k in _NUMERIC})
                rows.append(row)
                continue
            st = step_time(w, system.gpu, system.interconnect, ep, pf)
            tps = dp * ep * w.sequences_per_gpu / st.step_s
            c1m = cost_per_million_tokens(system.count, system.gpu.price_per_gpu_hour_usd, tps)
            row.update(
                {
                    "throughput_tok_s": tps,
                    "step_ms": st.step_s * 1e3,
                    "compute_ms": st.compute_s * 1e3,
                    "hbm_ms": st.hbm_s * 1e3,
                    "local_ms": st.local_s * 1e3,
                    "comm_total_ms": st.comm_total_s * 1e3,
                    "comm_exposed_ms": st.comm_exposed_s * 1e3,
                    "comm_overhead": st.comm_overhead,
                    "comm_mb_per_gpu_step": st.comm_bytes_per_gpu / 1e6,
                    "scaling_efficiency": tps / (system.count * single_tps),
                    "cost_per_1m_tokens_usd": c1m,
                    "annual_cost_usd": annual_cost(c1m, tokens_per_month),
                }
            )
            rows.append(row)
    # Speedup and savings of each prefetch row over the baseline row of the same strategy.
    base = {r["strategy"]: r for r in rows if r["variant"] == "baseline"}
    for r in rows:
        b = base[r["strategy"]]
        r["speedup_vs_baseline"] = r["throughput_tok_s"] / b["throughput_tok_s"]
        r["annual_savings_usd"] = b["annual_cost_usd"] - r["annual_cost_usd"]
    return rows


_NUMERIC = (
    "throughput_tok_s",
    "step_ms",
    "compute_ms",
    "hbm_ms",
    "local_ms",
    "comm_total_ms",
    "comm_exposed_ms",
    "comm_overhead",
    "comm_mb_per_gpu_step",
    "scaling_efficiency",
    "cost_per_1m_tokens_usd",
    "annual_cost_usd",
)


def deepep_check(spec: dict[str, Any]) -> dict[str, float]:
    """Reproduce DeepEP's low-latency dispatch/combine times from its published bandwidths.

    DeepEP counts every top-k copy (``count_local``), so time = T * k * h * bytes / bandwidth.
    Returns predicted times (µs) and relative errors against the published times.
    """
    pub = spec["published"]
    t = spec["tokens_per_rank"]
    out: dict[str, float] = {}
    for phase, key in (
        ("dispatch", "dispatch_bytes_per_elem"),
        ("combine", "combine_bytes_per_elem"),
    ):
        per_tok = alltoall_bytes_per_token(
            spec["hidden"], spec["top_k"], spec[key], spec["ep"], count_local=True
        )
        pred_us = t * per_tok / (pub[f"{phase}_gb_s"] * 1e9) * 1e6
        out[f"{phase}_pred_us"] = pred_us
        out[f"{phase}_pub_us"] = float(pub[f"{phase}_us"])
        out[f"{phase}_rel_err"] = (pred_us - pub[f"{phase}_us"]) / pub[f"{phase}_us"]
    return out


def config_as_dict(cfg: Config) -> dict[str, Any]:
    """A JSON-able echo of the parsed config (written next to the results)."""
    return {
        "systems": [asdict(s) for s in cfg.systems],
        "workload": asdict(cfg.workload),
        "prefetch": asdict(cfg.prefetch),
        "tokens_per_month": cfg.tokens_per_month,
    }


# --------------------------------------------------------------------------- DeepEP out of sample


def _deepep_elem_bytes(phase: str, spec: dict[str, Any]) -> float:
    """Bytes per hidden element on the wire: FP8 dispatch carries one float32 scale per 128
    channels (DeepEP's FP8 format, counted in its own bandwidth figures), BF16 combine 2 B."""
    if phase == "dispatch":
        return spec["dispatch_bytes_per_elem"] + 4.0 / spec["scale_block"]
    return float(spec["combine_bytes_per_elem"])


def _row_id(table: str, ep: int, kind: str = "") -> str:
    return f"{table}/{kind + '/' if kind else ''}EP{ep}"


def deepep_validation(spec: dict[str, Any], fit_rows: list[str] | None = None) -> dict[str, Any]:
    """Predict DeepEP's published tables from the model's own all-to-all parameters.

    The model's all-to-all is ``time = latency + bytes / bandwidth`` (``_alltoall_time``) with the
    model's byte count (``alltoall_bytes_per_token``). Three hardware parameters are fitted on at
    most two published rows and every other row is predicted:

    - RDMA bandwidth and per-call latency: from one low-latency row (its dispatch and combine
      times give two equations; bytes = T * k * copy bytes * (G-1)/G, the model's no-dedup count:
      low-latency kernels send one message per (token, expert)).
    - NVLink bandwidth: from the intranode normal row, given that latency (normal kernels send a
      token once per destination GPU: the model's per-GPU dedup count).

    Predictions: low-latency rows -> time and DeepEP-style bandwidth (DeepEP divides
    T * k * copy bytes, every copy, by the time); internode normal rows -> RDMA bottleneck
    bandwidth, with RDMA bytes = one copy per remote *node* holding one of the token's experts
    (the model's dedup formula over nodes; DeepSeek-V3's limit of 4 nodes per token is not
    modelled). Returns the fitted parameters and one dict per (row, phase) with % errors.
    """
    ll, normal = spec["low_latency"], spec["normal"]
    fit_rows = list(fit_rows or spec["fit_rows"])
    if len(fit_rows) > 2:
        raise ValueError(f"fit on at most two rows, got {fit_rows}")
    h, k = spec["hidden"], spec["top_k"]
    elem = {ph: _deepep_elem_bytes(ph, spec) for ph in ("dispatch", "combine")}
    copy = {ph: h * elem[ph] for ph in elem}  # bytes of one token copy
    ll_fit = [r for r in ll["rows"] if _row_id("low_latency", r["ep"]) in fit_rows]
    nv_fit = [
        r
        for r in normal["rows"]
        if r["kind"] == "intranode" and _row_id("normal", r["ep"], r["kind"]) in fit_rows
    ]
    if len(ll_fit) != 1 or len(nv_fit) != 1:
        raise ValueError(
            "fit_rows must name one low_latency row and the intranode normal row, e.g. "
            "['low_latency/EP16', 'normal/intranode/EP8']"
        )
    t_ll = ll["tokens_per_rank"]

    def ll_bytes(ep: int, phase: str) -> float:
        return t_ll * alltoall_bytes_per_token(h, k, elem[phase], ep)

    r0 = ll_fit[0]
    bd, bc = ll_bytes(r0["ep"], "dispatch"), ll_bytes(r0["ep"], "combine")
    td, tc = r0["dispatch_us"] * 1e-6, r0["combine_us"] * 1e-6
    if tc <= td:
        raise ValueError("the low-latency fit row needs combine slower than dispatch")
    rdma_bw = (bc - bd) / (tc - td)
    latency = td - bd / rdma_bw
    if latency < 0:
        raise ValueError(f"fit gives a negative latency ({latency * 1e6:.1f} µs)")
    rdma = Interconnect("rdma-fit", rdma_bw / 1e9, 1.0, latency * 1e6)

    t_n, e, gpn = normal["tokens_per_rank"], normal["experts"], normal["gpus_per_node"]

    def nvl_bytes(ep: int, phase: str) -> float:
        return t_n * alltoall_bytes_per_token(h, k, elem[phase], ep, e, dedup=True)

    n0 = nv_fit[0]
    busy = sum(
        nvl_bytes(n0["ep"], ph) / (n0[f"{ph}_gb_s"] * 1e9) - latency
        for ph in ("dispatch", "combine")
    )
    nvl_bw = sum(nvl_bytes(n0["ep"], ph) for ph in ("dispatch", "combine")) / busy
    nvlink = Interconnect("nvlink-fit", nvl_bw / 1e9, 1.0, latency * 1e6)

    rows: list[dict[str, Any]] = []
    for r in ll["rows"]:
        rid = _row_id("low_latency", r["ep"])
        for ph in ("dispatch", "combine"):
            t = _alltoall_time(ll_bytes(r["ep"], ph), rdma)
            bw = t_ll * k * copy[ph] / t / 1e9
            rows.append(
                {
                    "row": rid,
                    "phase": ph,
                    "ep": r["ep"],
                    "used_for_fit": rid in fit_rows,
                    "published_us": r[f"{ph}_us"],
                    "predicted_us": t * 1e6,
                    "time_err_pct": 100 * (t * 1e6 - r[f"{ph}_us"]) / r[f"{ph}_us"],
                    "published_gb_s": r[f"{ph}_gb_s"],
                    "predicted_gb_s": bw,
                    "bw_err_pct": 100 * (bw - r[f"{ph}_gb_s"]) / r[f"{ph}_gb_s"],
                }
            )
    for r in normal["rows"]:
        rid = _row_id("normal", r["ep"], r["kind"])
        for ph in ("dispatch", "combine"):
            if r["kind"] == "intranode":
                nbytes, link = nvl_bytes(r["ep"], ph), nvlink
            else:
                nodes = max(1, r["ep"] // gpn)
                nbytes = t_n * alltoall_bytes_per_token(h, k, elem[ph], nodes, e, dedup=True)
                link = rdma
            bw = nbytes / _alltoall_time(nbytes, link) / 1e9
            rows.append(
                {
                    "row": rid,
                    "phase": ph,
                    "ep": r["ep"],
                    "used_for_fit": rid in fit_rows,
                    "published_us": None,
                    "predicted_us": None,
                    "time_err_pct": None,
                    "published_gb_s": r[f"{ph}_gb_s"],
                    "predicted_gb_s": bw,
                    "bw_err_pct": 100 * (bw - r[f"{ph}_gb_s"]) / r[f"{ph}_gb_s"],
                }
            )
    out_of_sample = [abs(r["bw_err_pct"]) for r in rows if not r["used_for_fit"]]
    return {
        "fit_rows": fit_rows,
        "params": {
            "rdma_gb_s": rdma_bw / 1e9,
            "nvlink_gb_s": nvl_bw / 1e9,
            "latency_us": latency * 1e6,
        },
        "rows": rows,
        "median_abs_err_pct_out_of_sample": sorted(out_of_sample)[len(out_of_sample) // 2]
        if out_of_sample
        else None,
        "source": spec.get("source", ""),
    }
