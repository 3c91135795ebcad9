"""Model loading: real checkpoints via ``from_pretrained`` and tiny random models built in code.

``--model tiny-olmoe`` (and the other ``tiny-*`` names) build a small random model from a config
plus
a byte-level tokenizer, so the whole pipeline runs offline on a CPU. Any other name is a Hugging
Face
model id or a local directory and goes through ``AutoModelForCausalLM.from_pretrained``; the tests
save
a tiny model with ``save_pretrained`` and load that directory through the same path.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

TINY_VOCAB = 260  # 256 byte tokens + 4 specials
BOS, EOS, PAD, UNK = 256, 257, 258, 259


def tiny_tokenizer() -> Any:
    """A byte-level BPE tokenizer with no merges (one token per byte), built without any
    download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_map = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(byte_map))}
    specials = {"<s>": BOS, "</s>": EOS, "<pad>": PAD, "<unk>": UNK}
    vocab.update(specials)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
    )


def _common(hidden: int = 64, layers: int = 2, experts: int = 16, k: int = 8) -> dict[str, Any]:
    return {
        "vocab_size": TINY_VOCAB,
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": hidden // 4,
        "max_position_embeddings": 512,
        "bos_token_id": BOS,
        "eos_token_id": EOS,
        "pad_token_id": PAD,
        "num_experts_per_tok": k,
        "tie_word_embeddings": False,
    }


def tiny_config(name: str) -> Any:
    """Config of a tiny random model: ``tiny-olmoe``, ``tiny-qwen3-moe``, ``tiny-mixtral``,
    ``tiny-gpt-oss``, ``tiny-glm4-moe`` or ``tiny-qwen3-next`` (16 experts, top-8 unless noted)."""
    import transformers as tf

    c = _common()
    if name == "tiny-olmoe":
        return tf.OlmoeConfig(**c, intermediate_size=32, num_experts=16)
    if name == "tiny-qwen3-moe":
        return tf.Qwen3MoeConfig(
            **c,
            intermediate_size=64,
            moe_intermediate_size=32,
            num_experts=16,
            norm_topk_prob=True,
            decoder_sparse_step=1,
        )
    if name == "tiny-mixtral":
        c.update(num_experts_per_tok=2)
        return tf.MixtralConfig(**c, intermediate_size=32, num_local_experts=8)
    if name == "tiny-gpt-oss":
        c.update(num_experts_per_tok=4)
        return tf.GptOssConfig(
            **c,
            intermediate_size=32,
            num_local_experts=16,
            layer_types=["full_attention"] * c["num_hidden_layers"],
        )
    if name == "tiny-glm4-moe":
        return tf.Glm4MoeConfig(
            **c,
            intermediate_size=64,
            moe_intermediate_size=32,
            n_routed_experts=16,
            n_shared_experts=1,
            n_group=2,
            topk_group=2,
            first_k_dense_replace=0,
            norm_topk_prob=True,
        )
    if name == "tiny-qwen3-next":
        return tf.Qwen3NextConfig(
            **c,
            intermediate_size=64,
            moe_intermediate_size=32,
            num_experts=16,
            shared_expert_intermediate_size=32,
            norm_topk_prob=True,
            decoder_sparse_step=1,
            layer_types=["full_attention"] * 2,
        )
    raise ValueError(f"unknown tiny model {name!r}; choose from {', '.join(TINY_MODELS)}")


TINY_MODELS = (
    "tiny-olmoe",
    "tiny-qwen3-moe",
    "tiny-mixtral",
    "tiny-gpt-oss",
    "tiny-glm4-moe",
    "tiny-qwen3-next",
)


@dataclass
class LoadedModel:
    """A model, its tokenizer and where it lives."""

    model: nn.Module
    tokenizer: Any
    device: torch.device
    dtype: torch.dtype
    model_id: str


def resolve_device(device: str) -> torch.device:
    """``auto`` -> cuda if available else cpu; raise ``ValueError`` for an unusable device."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ValueError(f"--device must be cuda, cpu or auto (got {device!r})")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(
            "--device cuda requested but no CUDA device is available; use --device cpu"
        )
    return torch.device(device)


def build_tiny(name: str, seed: int = 0, experts_implementation: str | None = None) -> nn.Module:
    """Instantiate a tiny random model (deterministic for a given seed)."""
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(name)
    torch.manual_seed(seed)
    kwargs: dict[str, Any] = {}
    if experts_implementation:
        kwargs["experts_implementation"] = experts_implementation
    model = AutoModelForCausalLM.from_config(cfg, **kwargs)
    with torch.no_grad():
        # Random init gives near-uniform routers (std 0.02); a larger spread makes routing decisions
        # depend on the input like a trained router does, which is what the experiment measures.
        for mod in model.modules():
            if type(mod).__name__.endswith(("TopKRouter", "TopkRouter")):
                mod.weight.normal_(0.0, 0.5)
    return model


def load_model(
    model_id: str,
    device: str = "auto",
    fp16: bool = True,
    experts_implementation: str | None = None,
    seed: int = 0,
) -> LoadedModel:
    """Load ``model_id`` (hub id, local dir, or ``tiny-*``) in eval mode on ``device``.

    ``fp16=True`` means bfloat16 on CUDA (the seed's ``--no-fp16`` switches to float32); CPU always
    uses float32 because bf16 matmuls there are slow and change numerics for no gain.
    """
    dev = resolve_device(device)
    dtype = torch.bfloat16 if (fp16 and dev.type == "cuda") else torch.float32
    if model_id.startswith("tiny-"):
        model = build_tiny(model_id, seed=seed, experts_implementation=experts_implementation)
        tok = tiny_tokenizer()
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        kwargs: dict[str, Any] = {"dtype": dtype}
        if experts_implementation:
            kwargs["experts_implementation"] = experts_implementation
        try:
            tok = AutoTokenizer.from_pretrained(model_id)
            model = AutoModelForCausalLM.from_pretrained(model_id, **kwargs)
        except (OSError, ValueError) as exc:
            raise ValueError(
                f"cannot load model {model_id!r}: {str(exc).splitlines()[0]}"
            ) from None
    model = model.to(device=dev, dtype=dtype).eval()
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return LoadedModel(model=model, tokenizer=tok, device=dev, dtype=dtype, model_id=model_id)
