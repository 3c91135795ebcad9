"""Model and tokenizer loading: hub ids, local checkpoints, and the in-code ``tiny-moe``.

Real models go through ``from_pretrained`` (via nnsight's ``TransformersModel`` or plain
transformers for the hooks backend) with ``use_cache=False``; on several GPUs the weights are
split with ``device_map="balanced"`` and a per-GPU ``max_memory`` cap that leaves room for the
CUDA context. ``tiny-moe`` is a random OLMoE built from a config in code, optionally with
planted outlier dims (RMSNorm gain on chosen dims in every layer).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .configs import ConfigError, ModelSpec

TORCH_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}

#: Site names relative to a decoder block, in forward order (nnsight requires that order).
SITES: tuple[str, str] = ("input_layernorm", "post_attention_layernorm")


@dataclass
class LoadedModel:
    """A loaded causal LM: the raw module, the nnsight wrapper (if any) and its tokenizer."""

    module: nn.Module
    tokenizer: Any
    wrapper: Any | None  # nnsight TransformersModel, or None for the hooks backend
    dtype: torch.dtype
    device_map: Any

    @property
    def input_device(self) -> torch.device:
        """Device the token ids must live on (that of the input embedding)."""
        emb = self.module.get_input_embeddings()
        return next(emb.parameters()).device


#: Vocabulary of ``tiny_tokenizer`` (ByT5: 3 special ids, 256 bytes, 125 extra ids).
TINY_VOCAB = 384


def tiny_tokenizer() -> Any:
    """Byte-level tokenizer that needs no files (ids 0-2 special, 3-258 bytes, vocab 384)."""
    from transformers import ByT5Tokenizer

    return ByT5Tokenizer()


def build_tiny_moe(spec: ModelSpec, *, seed: int = 0) -> nn.Module:
    """A random OLMoE with the spec's hidden size / layers / experts, planted dims applied."""
    from transformers import OlmoeConfig, OlmoeForCausalLM

    heads = spec.num_heads or 4
    if spec.hidden_size % heads:
        raise ConfigError(
            f"hidden size {spec.hidden_size} must be divisible by the {heads} attention heads"
        )
    if spec.vocab_size and spec.vocab_size < TINY_VOCAB:
        raise ConfigError(f"vocab size must be at least {TINY_VOCAB} (the byte tokenizer's ids)")
    cfg = OlmoeConfig(
        vocab_size=spec.vocab_size or TINY_VOCAB,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size or max(32, spec.hidden_size // 2),
        num_hidden_layers=spec.num_layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        num_experts=spec.num_experts,
        num_experts_per_tok=spec.top_k,
        max_position_embeddings=max(4096, spec.seq_len),
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
        use_cache=False,
    )
    torch.manual_seed(seed)
    model = OlmoeForCausalLM(cfg).eval()
    if spec.plant_dims:
        plant_outlier_dims(model, spec.plant_dims, spec.plant_gain)
    return model


def decoder_layers(module: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a HF causal LM (``model.model.layers``), checked for both sites."""
    inner = getattr(module, "model", None)
    layers = getattr(inner, "layers", None) if inner is not None else None
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise ConfigError(f"{type(module).__name__}: no model.layers ModuleList found")
    for name in SITES:
        if not hasattr(layers[0], name):
            raise ConfigError(
                f"{type(module).__name__}: decoder block has no '{name}'; "
                "only pre-norm blocks with input_layernorm/post_attention_layernorm are supported"
            )
    return layers


def plant_outlier_dims(module: nn.Module, dims: Sequence[int], gain: float) -> None:
    """Set the RMSNorm gain of ``dims`` to ``gain`` at both sites of every block."""
    layers = decoder_layers(module)
    hidden = layers[0].input_layernorm.weight.shape[0]
    bad = [d for d in dims if not 0 <= d < hidden]
    if bad:
        raise ConfigError(f"planted dims {bad} outside hidden size {hidden}")
    idx = torch.tensor(list(dims), dtype=torch.long)
    with torch.no_grad():
        for layer in layers:
            for name in SITES:
                getattr(layer, name).weight[idx] = gain


def max_memory_map(gpu_count: int, per_gpu_gib: float, cpu_gib: float | None = None) -> dict:
    """``max_memory`` for accelerate: the same cap on each GPU (optionally a CPU allowance)."""
    mm: dict[Any, str] = {i: f"{per_gpu_gib:g}GiB" for i in range(gpu_count)}
    if cpu_gib:
        mm["cpu"] = f"{cpu_gib:g}GiB"
    return mm


def load_model(
    spec: ModelSpec,
    *,
    device: str,
    backend: str = "nnsight",
    dtype: str | None = None,
    max_memory_per_gpu_gib: float | None = None,
    seed: int = 0,
) -> LoadedModel:
    """Load (or build) the model once, with the KV cache off.

    ``device``: "cpu", "cuda" (all visible GPUs; balanced split when more than one), or
    "cuda:N". ``spec.hf_id`` may be a hub id or a local directory written by
    ``save_pretrained``; the loading code is the same for both.
    """
    tdtype = TORCH_DTYPES[dtype or spec.dtype]
    if spec.is_tiny:
        module = build_tiny_moe(spec, seed=seed).to(dtype=tdtype, device=_single(device))
        tok = tiny_tokenizer()
        wrapper = _wrap(module, tok) if backend == "nnsight" else None
        return LoadedModel(module, tok, wrapper, tdtype, str(_single(device)))

    from transformers import AutoModelForCausalLM, AutoTokenizer

    device_map: Any
    load_kw: dict[str, Any] = {"dtype": tdtype}
    n_gpu = torch.cuda.device_count() if device == "cuda" else 0
    if n_gpu > 1:
        device_map = "balanced"
        per = max_memory_per_gpu_gib
        if per is None:
            total = torch.cuda.get_device_properties(0).total_memory / 1024**3
            per = max(1.0, total - 3.0)  # leave the per-GPU reserve of configs.plan_gpus
        load_kw["max_memory"] = max_memory_map(n_gpu, per)
    else:
        device_map = {"": str(_single(device))}
    load_kw["device_map"] = device_map
    try:
        tok = AutoTokenizer.from_pretrained(spec.hf_id)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot load tokenizer for {spec.hf_id!r}: {e}") from e
    try:
        if backend == "nnsight":
            from nnsight.modeling.transformers import TransformersModel

            # dispatch=True loads real weights now; transformers 5 needs the tokenizer passed in
            # (the lazy meta path cannot find it for a local directory).
            wrapper = TransformersModel(
                spec.hf_id, task="text-generation", tokenizer=tok, dispatch=True, **load_kw
            )
            module = wrapper._module
        else:
            module = AutoModelForCausalLM.from_pretrained(spec.hf_id, **load_kw)
            wrapper = None
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot load model {spec.hf_id!r}: {e}") from e
    module.eval()
    module.config.use_cache = False
    return LoadedModel(module, tok, wrapper, tdtype, device_map)


def _single(device: str) -> torch.device:
    if device == "cuda":
        return torch.device("cuda", 0)
    return torch.device(device)


def _wrap(module: nn.Module, tokenizer: Any) -> Any:
    """nnsight wrapper around an in-memory module (no loading)."""
    from nnsight.modeling.transformers import TransformersModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return TransformersModel(module, tokenizer=tokenizer, task="text-generation")


def count_params(module: nn.Module) -> int:
    """Number of parameters (every expert included)."""
    return sum(p.numel() for p in module.parameters())
