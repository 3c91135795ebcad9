"""Model configurations for the outlier-feature sweep and the VRAM / GPU-count plan.

Sizes come from the models' published configs and model cards. ``total_params`` counts every
weight (all experts are resident in GPU memory, so VRAM follows the total, not the active
count); ``active_params`` is what one token touches.

The sweep IDs ``01``–``07`` follow the seed's ``sweep_configs/`` numbering; dense Qwen3 baselines
are ``d1``–``d5``. ``tiny-moe`` / ``tiny-moe-planted`` build a random OLMoE in code (no download).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

GIB = 1024**3

#: Bytes per parameter for the dtypes we load weights in.
DTYPE_BYTES: dict[str, int] = {"float32": 4, "bfloat16": 2, "float16": 2}

#: GPU counts a provider can actually rent as one instance.
RENTABLE_GPU_COUNTS: tuple[int, ...] = (1, 2, 4, 8)


class ConfigError(ValueError):
    """A model id, config or size request that cannot be honoured."""


@dataclass(frozen=True)
class ModelSpec:
    """One model in the sweep: identity, real sizes and the run/hardware plan."""

    id: str
    name: str
    hf_id: str
    family: str  # "moe" or "dense"
    total_params: float  # every weight, including all experts and embeddings
    active_params: float  # per token
    hidden_size: int
    num_layers: int
    num_experts: int = 0  # routed experts per MoE layer (0 for dense)
    top_k: int = 0
    shared_experts: int = 0
    dtype: str = "bfloat16"
    num_sequences: int = 16
    seq_len: int = 2048
    batch_size: int = 1
    # Layers observed per traced forward. The in-trace reduction keeps only O(S·H) state per
    # sequence regardless of how many layers are observed, so one chunk covering every layer
    # is the cheapest choice (each extra chunk re-runs the forward up to its last layer).
    chunk_layers: int = 0  # 0 = all layers in one chunk
    gpu_type: str = "A100"  # catalog name used in the broker query
    vram_per_gpu_gb: int = 80
    max_price_per_gpu_hour: float = 2.5  # USD; cap handed to the broker query
    disk_gb: int = 0  # 0 = derived from the weight size (see ``disk_gb_needed``)
    notes: str = ""
    # In-code models only (``hf_id == ""``): build a random model with these planted dims.
    plant_dims: tuple[int, ...] = field(default=())
    plant_gain: float = 8.0
    # In-code models only: shape details a real checkpoint carries in its config (0 = the
    # small defaults of ``build_tiny_moe``); set to build a random model at a real size.
    num_heads: int = 0
    intermediate_size: int = 0
    vocab_size: int = 0

    @property
    def is_tiny(self) -> bool:
        """True for configs that build a random model in code instead of loading weights."""
        return self.hf_id == ""

    @property
    def dtype_bytes(self) -> int:
        """Bytes per parameter in the load dtype."""
        return DTYPE_BYTES[self.dtype]

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for JSON output (tuples become lists)."""
        d = asdict(self)
        d["plant_dims"] = list(self.plant_dims)
        return d


def _moe(**kw: Any) -> ModelSpec:
    return ModelSpec(family="moe", **kw)


def _dense(**kw: Any) -> ModelSpec:
    return ModelSpec(family="dense", **kw)


# fmt: off
SWEEP: tuple[ModelSpec, ...] = (
    _moe(id="01", name="OLMoE-1B-7B", hf_id="allenai/OLMoE-1B-7B-0924",
         total_params=6.92e9, active_params=1.28e9, hidden_size=2048, num_layers=16,
         num_experts=64, top_k=8, gpu_type="A100", vram_per_gpu_gb=80,
         max_price_per_gpu_hour=2.5),
    _moe(id="02", name="GPT-OSS-20B", hf_id="openai/gpt-oss-20b",
         total_params=20.9e9, active_params=3.6e9, hidden_size=2880, num_layers=24,
         num_experts=32, top_k=4, gpu_type="A100", vram_per_gpu_gb=80,
         max_price_per_gpu_hour=2.5,
         notes="MXFP4 experts are dequantised to bf16 on load unless the triton kernels apply"),
    _moe(id="03", name="Qwen3-30B-A3B", hf_id="Qwen/Qwen3-30B-A3B",
         total_params=30.5e9, active_params=3.3e9, hidden_size=2048, num_layers=48,
         num_experts=128, top_k=8, gpu_type="A100", vram_per_gpu_gb=80,
         max_price_per_gpu_hour=2.5),
    _moe(id="04", name="Mixtral-8x7B", hf_id="mistralai/Mixtral-8x7B-v0.1",
         total_params=46.7e9, active_params=12.9e9, hidden_size=4096, num_layers=32,
         num_experts=8, top_k=2, gpu_type="A100", vram_per_gpu_gb=80,
         max_price_per_gpu_hour=2.5),
    _moe(id="05", name="Qwen3-Next-80B-A3B", hf_id="Qwen/Qwen3-Next-80B-A3B-Instruct",
         total_params=80.0e9, active_params=3.0e9, hidden_size=2048, num_layers=48,
         num_experts=512, top_k=10, shared_experts=1, gpu_type="H100", vram_per_gpu_gb=80,
         max_price_per_gpu_hour=3.5,
         notes="hybrid Gated DeltaNet / gated attention; RMSNorm gains are zero-centred"),
    _moe(id="06", name="GLM-4.5-Air", hf_id="zai-org/GLM-4.5-Air",
         total_params=106e9, active_params=12e9, hidden_size=4096, num_layers=46,
         num_experts=128, top_k=8, shared_experts=1, gpu_type="H100", vram_per_gpu_gb=80,
         max_price_per_gpu_hour=3.5, notes="first layer dense"),
    _moe(id="07", name="GPT-OSS-120B", hf_id="openai/gpt-oss-120b",
         total_params=117e9, active_params=5.1e9, hidden_size=2880, num_layers=36,
         num_experts=128, top_k=4, gpu_type="H100", vram_per_gpu_gb=80,
         max_price_per_gpu_hour=3.5,
         notes="MXFP4 experts are dequantised to bf16 on load unless the triton kernels apply"),
)

DENSE: tuple[ModelSpec, ...] = (
    _dense(id="d1", name="Qwen3-0.6B", hf_id="Qwen/Qwen3-0.6B", total_params=0.6e9,
           active_params=0.6e9, hidden_size=1024, num_layers=28, gpu_type="A100",
           vram_per_gpu_gb=40, max_price_per_gpu_hour=1.5),
    _dense(id="d2", name="Qwen3-1.7B", hf_id="Qwen/Qwen3-1.7B", total_params=1.7e9,
           active_params=1.7e9, hidden_size=2048, num_layers=28, gpu_type="A100",
           vram_per_gpu_gb=40, max_price_per_gpu_hour=1.5),
    _dense(id="d3", name="Qwen3-4B", hf_id="Qwen/Qwen3-4B", total_params=4.0e9,
           active_params=4.0e9, hidden_size=2560, num_layers=36, gpu_type="A100",
           vram_per_gpu_gb=40, max_price_per_gpu_hour=1.5),
    _dense(id="d4", name="Qwen3-8B", hf_id="Qwen/Qwen3-8B", total_params=8.2e9,
           active_params=8.2e9, hidden_size=4096, num_layers=36, gpu_type="A100",
           vram_per_gpu_gb=80, max_price_per_gpu_hour=2.5),
    _dense(id="d5", name="Qwen3-14B", hf_id="Qwen/Qwen3-14B", total_params=14.8e9,
           active_params=14.8e9, hidden_size=5120, num_layers=40, gpu_type="A100",
           vram_per_gpu_gb=80, max_price_per_gpu_hour=2.5),
)

TINY: tuple[ModelSpec, ...] = (
    # A random OLMoE; 16 x 512 tokens keep a CPU run well under a minute (--seq-len 2048 works).
    _moe(id="tiny-moe", name="tiny-moe", hf_id="", total_params=0.0, active_params=0.0,
         hidden_size=128, num_layers=4, num_experts=8, top_k=2, dtype="float32", seq_len=512,
         gpu_type="", vram_per_gpu_gb=0, max_price_per_gpu_hour=0.0),
    _moe(id="tiny-moe-planted", name="tiny-moe-planted", hf_id="", total_params=0.0,
         active_params=0.0, hidden_size=128, num_layers=4, num_experts=8, top_k=2,
         dtype="float32", seq_len=512, gpu_type="", vram_per_gpu_gb=0, max_price_per_gpu_hour=0.0,
         plant_dims=(7, 42, 99), plant_gain=8.0),
)
# fmt: on

ALL_SPECS: tuple[ModelSpec, ...] = SWEEP + DENSE + TINY


def get_spec(key: str) -> ModelSpec | None:
    """Find a spec by sweep id (``"03"`` or ``"3"``), name or HF id, case-insensitively."""
    k = key.strip().lower()
    if not k:
        return None  # the in-code models have an empty hf_id: "" must not select them
    if k.isdigit() and len(k) == 1:
        k = "0" + k
    for spec in ALL_SPECS:
        if k in (spec.id.lower(), spec.name.lower(), spec.hf_id.lower()):
            return spec
    return None


def spec_for_unknown(model: str, *, hidden_size: int = 0, num_layers: int = 0) -> ModelSpec:
    """A spec for a HF id or local path that is not in the tables (sizes read after loading)."""
    return ModelSpec(
        id=model,
        name=model.rstrip("/").split("/")[-1] or model,
        hf_id=model,
        family="unknown",
        total_params=0.0,
        active_params=0.0,
        hidden_size=hidden_size,
        num_layers=num_layers,
    )


# --------------------------------------------------------------------------- VRAM plan
#: Working buffers of width ``hidden`` alive at the peak of one decoder layer's forward
#: (residual, two norm outputs, q/k/v/o, router logits, the expert inputs/outputs and the
#: fp32 upcasts inside RMSNorm/softmax). A deliberate over-estimate: a too-small count OOMs.
ACTIVATION_BUFFERS = 64
#: Per-GPU reserve for the CUDA context, cuBLAS workspaces and allocator fragmentation.
PER_GPU_RESERVE_GIB = 3.0
#: ``device_map="balanced"`` splits on whole layers, so one GPU can carry up to one layer more
#: than its share; 10 % of the weights covers that for every model in the sweep.
BALANCE_MARGIN = 0.10


@dataclass(frozen=True)
class VramPlan:
    """How much GPU memory a run needs and how many GPUs of a given size that takes."""

    weights_gib: float
    activation_gib: float
    reduction_gib: float
    total_gib: float
    gpu_count: int
    vram_per_gpu_gib: float
    max_memory_per_gpu_gib: float

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for JSON output."""
        return asdict(self)


def vram_need_gib(spec: ModelSpec) -> tuple[float, float, float]:
    """(weights, activation headroom, in-trace reduction state) in GiB for one run.

    weights    = total_params x dtype bytes            (every expert is resident)
    activation = batch x seq_len x hidden x dtype bytes x ACTIVATION_BUFFERS
    reduction  = batch x seq_len x hidden x 4 bytes     (running max |x| kept on the GPU)
    """
    weights = spec.total_params * spec.dtype_bytes / GIB
    tokens = spec.batch_size * spec.seq_len
    activation = tokens * spec.hidden_size * spec.dtype_bytes * ACTIVATION_BUFFERS / GIB
    reduction = tokens * spec.hidden_size * 4 / GIB
    return weights, activation, reduction


def plan_gpus(spec: ModelSpec, vram_per_gpu_gb: float | None = None) -> VramPlan:
    """Smallest rentable GPU count whose memory holds weights, headroom and per-GPU reserve.

    A count n fits when ``weights x (1 + BALANCE_MARGIN) + activation + reduction +
    n x PER_GPU_RESERVE_GIB <= n x vram``. Activations are counted once: with a layer-wise
    split only the GPU running the current layer holds them. ``vram_per_gpu_gb`` is the
    marketed size (80 for an "80GB" card), treated as GiB for safety (80 GiB > 80 GB).
    """
    vram = float(vram_per_gpu_gb if vram_per_gpu_gb is not None else spec.vram_per_gpu_gb)
    if not vram > PER_GPU_RESERVE_GIB:
        raise ConfigError(
            f"{spec.id}: GPU memory must be more than the {PER_GPU_RESERVE_GIB:g} GiB kept free "
            f"per GPU, got {vram:g} GB (for example 24, 48, 80 or 141)"
        )
    weights, act, red = vram_need_gib(spec)
    total = weights * (1 + BALANCE_MARGIN) + act + red
    for n in RENTABLE_GPU_COUNTS:
        if total + n * PER_GPU_RESERVE_GIB <= n * vram:
            # The cap handed to accelerate leaves the reserve free on every GPU.
            return VramPlan(
                weights_gib=round(weights, 2),
                activation_gib=round(act, 2),
                reduction_gib=round(red, 3),
                total_gib=round(total, 2),
                gpu_count=n,
                vram_per_gpu_gib=vram,
                max_memory_per_gpu_gib=round(vram - PER_GPU_RESERVE_GIB, 1),
            )
    raise ConfigError(
        f"{spec.id}: needs {total:.0f} GiB, more than {max(RENTABLE_GPU_COUNTS)} x {vram:.0f} GB"
    )


def disk_gb_needed(spec: ModelSpec) -> int:
    """Disk for the checkpoint (bf16 size or the stored size, whichever is larger) + 50 GB.

    The 50 GB covers the venv (torch + CUDA wheels ~ 15 GB), the HF cache's temp copies
    and the results. Rounded up to a multiple of 50 GB, the granularity providers sell.
    """
    if spec.disk_gb:
        return spec.disk_gb
    weights_gb = spec.total_params * 2 / 1e9
    return int(math.ceil((weights_gb * 1.1 + 50) / 50.0) * 50)


def gpu_filter(spec: ModelSpec, vram_per_gpu_gb: float | None = None) -> str:
    """Broker query string selecting the GPU type of this spec (count and price separate)."""
    vram = int(vram_per_gpu_gb if vram_per_gpu_gb is not None else spec.vram_per_gpu_gb)
    return f"gpu~{spec.gpu_type} vram>={vram}GB manufacturer=nvidia"


def broker_query(spec: ModelSpec) -> str:
    """Full broker query: GPU filter, the planned GPU count, price cap and disk."""
    plan = plan_gpus(spec)
    return (
        f"{gpu_filter(spec)} gpus={plan.gpu_count} "
        f"price_per_gpu_hour<={spec.max_price_per_gpu_hour:g} disk>={disk_gb_needed(spec)}GB"
    )


def with_overrides(spec: ModelSpec, **kw: Any) -> ModelSpec:
    """Copy of ``spec`` with the non-None keyword overrides applied."""
    return replace(spec, **{k: v for k, v in kw.items() if v is not None})


def sweep_table() -> list[dict[str, Any]]:
    """One row per real model: sizes plus the derived VRAM plan, disk and broker query."""
    rows = []
    for spec in SWEEP + DENSE:
        plan = plan_gpus(spec)
        rows.append(
            {
                **spec.to_dict(),
                "gpu_count": plan.gpu_count,
                "vram_total_gib": plan.total_gib,
                "disk_gb_needed": disk_gb_needed(spec),
                "broker_query": broker_query(spec),
            }
        )
    return rows
