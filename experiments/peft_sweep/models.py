"""Audio classifiers for the sweep: AST, HTS-AT, BEATs, EfficientAT, each as backbone + head.

- AST: ``transformers.ASTModel`` (ViT over 16x16 fbank patches).
- HTS-AT: ``transformers.ClapAudioModel``, the HTS-AT Swin encoder used as CLAP's audio tower.
- BEATs: not in transformers. :class:`BEATsEncoder` is a compact re-implementation of its shape:
  16x16 conv patch embedding, LayerNorm, projection, convolutional positional embedding, post-LN
  transformer layers with a bucketed relative-position bias, mean pooling. The gated relative
  position bias and deep-norm scaling of the original are left out (documented).
- EfficientAT: not in transformers. :class:`EfficientATNet` is a MobileNetV3-style CNN (inverted
  residual blocks with squeeze-excitation, hard-swish) on the log-mel image, as EfficientAT's
  ``mn`` models are.

Sizes: ``tiny`` (random, CPU tests), ``base`` (the published architecture sizes, random init) and
``pretrained`` (``from_pretrained`` on a hub id or local dir for AST/HTS-AT; for BEATs/EfficientAT a
directory written by :func:`save_backbone`). Tests save a tiny model and reload it through the
same code path as a checkpoint.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

MODELS = ("ast", "htsat", "beats", "efficientat")
SIZES = ("tiny", "base", "pretrained")
DEFAULT_CHECKPOINTS = {
    "ast": "MIT/ast-finetuned-audioset-10-10-0.4593",
    "htsat": "laion/clap-htsat-unfused",
}

# PEFT targets per model (regexes, matched against full module names by peft). LoRA/AdaLoRA adapt
# the attention query and value projections (the LoRA paper's choice); IA3 rescales keys, values
# and the input of the FFN down-projection (the IA3 paper's choice). EfficientAT has no attention:
# all three adapt the linear layers of its squeeze-excitation blocks (AdaLoRA supports only Linear).
TARGETS: dict[str, dict[str, str]] = {
    "ast": {
        "lora": r".*\.attention\.(q_proj|v_proj)",
        "ia3": r".*\.(attention\.(k_proj|v_proj)|mlp\.fc2)",
        "ia3_ff": r".*\.mlp\.fc2",
    },
    "htsat": {
        "lora": r".*\.attention\.self\.(query|value)",
        "ia3": r".*\.(attention\.self\.(key|value)|blocks\.\d+\.output\.dense)",
        "ia3_ff": r".*blocks\.\d+\.output\.dense",
    },
    "beats": {
        "lora": r".*\.self_attn\.(q_proj|v_proj)",
        "ia3": r".*\.(self_attn\.(k_proj|v_proj)|fc2)",
        "ia3_ff": r".*\.fc2",
    },
    "efficientat": {
        "lora": r".*\.se\.(fc1|fc2)",
        "ia3": r".*\.se\.(fc1|fc2)",
        "ia3_ff": r".*\.se\.fc2",
    },
}


@dataclass(frozen=True)
class InputSpec:
    """The log-mel input a backbone expects: ``frames`` x ``n_mels``."""

    n_mels: int
    frames: int


# --------------------------------------------------------------------------- BEATs-style encoder


@dataclass
class BEATsConfig:
    """Sizes of :class:`BEATsEncoder` (base = the published BEATs_iter3 sizes)."""

    n_mels: int = 128
    frames: int = 1024
    patch: int = 16
    embed_dim: int = 512
    hidden: int = 768
    layers: int = 12
    heads: int = 12
    ffn: int = 3072
    conv_pos: int = 128
    conv_pos_groups: int = 16
    num_buckets: int = 320
    max_distance: int = 800
    dropout: float = 0.1


class _RelPosAttention(nn.Module):
    """Multi-head self-attention with a learned bias per (head, bucketed relative distance)."""

    def __init__(self, c: BEATsConfig) -> None:
        super().__init__()
        self.heads, self.c = c.heads, c
        self.q_proj = nn.Linear(c.hidden, c.hidden)
        self.k_proj = nn.Linear(c.hidden, c.hidden)
        self.v_proj = nn.Linear(c.hidden, c.hidden)
        self.out_proj = nn.Linear(c.hidden, c.hidden)
        self.rel_bias = nn.Embedding(c.num_buckets, c.heads)

    def _buckets(self, n: int, device: torch.device) -> torch.Tensor:
        # T5-style: exact buckets for small distances, log-spaced beyond, sign kept.
        pos = torch.arange(n, device=device)
        rel = pos[None, :] - pos[:, None]
        half = self.c.num_buckets // 2
        exact = half // 2
        sign = (rel > 0).long() * half
        a = rel.abs()
        log_b = (
            exact
            + (
                torch.log(a.float().clamp(min=1) / exact)
                / math.log(self.c.max_distance / exact)
                * (half - exact)
            ).long()
        )
        return sign + torch.where(a < exact, a, log_b.clamp(max=half - 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        h = self.heads

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, n, h, d // h).transpose(1, 2)

        bias = self.rel_bias(self._buckets(n, x.device)).permute(2, 0, 1)[None]
        out = F.scaled_dot_product_attention(
            split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x)), attn_mask=bias
        )
        return self.out_proj(out.transpose(1, 2).reshape(b, n, d))


class _BEATsLayer(nn.Module):
    def __init__(self, c: BEATsConfig) -> None:
        super().__init__()
        self.self_attn = _RelPosAttention(c)
        self.self_attn_layer_norm = nn.LayerNorm(c.hidden)
        self.fc1 = nn.Linear(c.hidden, c.ffn)
        self.fc2 = nn.Linear(c.ffn, c.hidden)
        self.final_layer_norm = nn.LayerNorm(c.hidden)
        self.dropout = nn.Dropout(c.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Post-LN residual blocks, as BEATs (layer_norm_first=False).
        x = self.self_attn_layer_norm(x + self.dropout(self.self_attn(x)))
        return self.final_layer_norm(x + self.dropout(self.fc2(F.gelu(self.fc1(x)))))


class BEATsEncoder(nn.Module):
    """Patch embedding + positional conv + transformer; returns the mean-pooled hidden state."""

    def __init__(self, c: BEATsConfig) -> None:
        super().__init__()
        self.config = c
        self.patch_embedding = nn.Conv2d(1, c.embed_dim, c.patch, stride=c.patch, bias=False)
        self.layer_norm = nn.LayerNorm(c.embed_dim)
        self.post_extract_proj = nn.Linear(c.embed_dim, c.hidden)
        k = c.conv_pos if c.conv_pos % 2 else c.conv_pos + 1  # odd kernel keeps the length
        self.pos_conv = nn.Conv1d(c.hidden, c.hidden, k, padding=k // 2, groups=c.conv_pos_groups)
        self.encoder_layer_norm = nn.LayerNorm(c.hidden)
        self.layers = nn.ModuleList(_BEATsLayer(c) for _ in range(c.layers))
        self.hidden_size = c.hidden

    def forward(self, fbank: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(fbank.unsqueeze(1))  # (B, E, T/16, F/16)
        x = x.flatten(2).transpose(1, 2)
        x = self.post_extract_proj(self.layer_norm(x))
        x = x + F.gelu(self.pos_conv(x.transpose(1, 2))).transpose(1, 2)
        x = self.encoder_layer_norm(x)
        for layer in self.layers:
            x = layer(x)
        return x.mean(dim=1)


# --------------------------------------------------------------------------- EfficientAT-style CNN


@dataclass
class EfficientATConfig:
    """MobileNetV3-large-like block table scaled by ``width`` (EfficientAT mn10 = width 1.0)."""

    n_mels: int = 128
    frames: int = 1000
    width: float = 1.0
    # (kernel, expanded, out, use_se, hardswish, stride) per block: MobileNetV3-large.
    blocks: tuple[tuple[int, int, int, bool, bool, int], ...] = (
        (3, 16, 16, False, False, 1),
        (3, 64, 24, False, False, 2),
        (3, 72, 24, False, False, 1),
        (5, 72, 40, True, False, 2),
        (5, 120, 40, True, False, 1),
        (5, 120, 40, True, False, 1),
        (3, 240, 80, False, True, 2),
        (3, 200, 80, False, True, 1),
        (3, 184, 80, False, True, 1),
        (3, 184, 80, False, True, 1),
        (3, 480, 112, True, True, 1),
        (3, 672, 112, True, True, 1),
        (5, 672, 160, True, True, 2),
        (5, 960, 160, True, True, 1),
        (5, 960, 160, True, True, 1),
    )
    last_channels: int = 960


def _ch(c: float) -> int:
    return max(8, int(c + 4) // 8 * 8)  # round to a multiple of 8 as MobileNet does


class _SE(nn.Module):
    """Squeeze-excitation with Linear layers (EfficientAT uses linear SE, adaptable by AdaLoRA)."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(ch, _ch(ch / 4))
        self.fc2 = nn.Linear(_ch(ch / 4), ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = F.relu(self.fc1(x.mean(dim=(2, 3))))
        return x * F.hardsigmoid(self.fc2(s))[:, :, None, None]


class _InvertedResidual(nn.Module):
    def __init__(self, cin: int, k: int, exp: int, cout: int, se: bool, hs: bool, s: int) -> None:
        super().__init__()
        act: type[nn.Module] = nn.Hardswish if hs else nn.ReLU
        layers: list[nn.Module] = []
        if exp != cin:
            layers += [nn.Conv2d(cin, exp, 1, bias=False), nn.BatchNorm2d(exp), act()]
        layers += [
            nn.Conv2d(exp, exp, k, s, k // 2, groups=exp, bias=False),
            nn.BatchNorm2d(exp),
            act(),
        ]
        self.expand_dw = nn.Sequential(*layers)
        self.se = _SE(exp) if se else None
        self.project = nn.Sequential(nn.Conv2d(exp, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.residual = s == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.expand_dw(x)
        if self.se is not None:
            y = self.se(y)
        y = self.project(y)
        return x + y if self.residual else y


class EfficientATNet(nn.Module):
    """MobileNetV3-style CNN over the (1, frames, mels) log-mel image; returns pooled features."""

    def __init__(self, c: EfficientATConfig) -> None:
        super().__init__()
        self.config = c
        cin = _ch(16 * c.width)
        self.stem = nn.Sequential(
            nn.Conv2d(1, cin, 3, 2, 1, bias=False), nn.BatchNorm2d(cin), nn.Hardswish()
        )
        blocks = []
        for k, exp, out, se, hs, s in c.blocks:
            e, o = _ch(exp * c.width), _ch(out * c.width)
            blocks.append(_InvertedResidual(cin, k, e, o, se, hs, s))
            cin = o
        self.features = nn.Sequential(*blocks)
        last = _ch(c.last_channels * c.width)
        self.head_conv = nn.Sequential(
            nn.Conv2d(cin, last, 1, bias=False), nn.BatchNorm2d(last), nn.Hardswish()
        )
        self.hidden_size = last

    def forward(self, fbank: torch.Tensor) -> torch.Tensor:
        x = self.head_conv(self.features(self.stem(fbank.unsqueeze(1))))
        return x.mean(dim=(2, 3))


# --------------------------------------------------------------------------- wrapper


class AudioClassifier(nn.Module):
    """Backbone + ``classifier`` head; ``forward(input_features, labels)`` -> output with loss.

    Returning an object with ``.loss`` lets AdaLoRA add its orthogonality regulariser, which
    peft does only when the wrapped model's output carries a loss.
    """

    def __init__(
        self, kind: str, backbone: nn.Module, hidden: int, num_labels: int, spec: InputSpec
    ) -> None:
        super().__init__()
        self.kind = kind
        self.backbone = backbone
        self.input_spec = spec
        self.classifier = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, num_labels))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "ast":
            return self.backbone(input_values=x).pooler_output
        if self.kind == "htsat":
            return self.backbone(input_features=x.unsqueeze(1)).pooler_output
        return self.backbone(x)

    def forward(self, input_features: torch.Tensor, labels: torch.Tensor | None = None) -> Any:
        from transformers.modeling_outputs import SequenceClassifierOutput

        logits = self.classifier(self.embed(input_features))
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)


def _hf_configs(kind: str, size: str, spec: InputSpec) -> Any:
    from transformers import ASTConfig, ClapAudioConfig

    if kind == "ast":
        if size == "tiny":
            return ASTConfig(
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=2,
                intermediate_size=64,
                num_mel_bins=spec.n_mels,
                max_length=spec.frames,
            )
        return ASTConfig(num_mel_bins=spec.n_mels, max_length=spec.frames)  # AST-base sizes
    if size == "tiny":
        return ClapAudioConfig(
            window_size=4,
            num_mel_bins=spec.n_mels,
            spec_size=64,
            patch_size=4,
            patch_stride=[4, 4],
            depths=[1, 1],
            num_attention_heads=[2, 4],
            hidden_size=64,
            patch_embeds_hidden_size=32,
            enable_fusion=False,
        )
    return ClapAudioConfig(num_mel_bins=spec.n_mels, enable_fusion=False)  # HTS-AT (CLAP) sizes


def default_input_spec(kind: str, size: str, frames: int) -> InputSpec:
    """Mel bins the architecture is built for; the frame count follows the clip length."""
    if size == "tiny":
        return InputSpec(
            n_mels=32 if kind in ("ast", "beats", "efficientat") else 16, frames=frames
        )
    return InputSpec(n_mels=64 if kind == "htsat" else 128, frames=frames)


def build_backbone(kind: str, size: str, spec: InputSpec) -> tuple[nn.Module, int]:
    """A randomly initialised backbone of ``size`` tiny/base and its output width."""
    if kind in ("ast", "htsat"):
        from transformers import ASTModel, ClapAudioModel

        cfg = _hf_configs(kind, size, spec)
        model = ASTModel(cfg) if kind == "ast" else ClapAudioModel(cfg)
        return model, cfg.hidden_size
    if kind == "beats":
        bc = (
            BEATsConfig(
                n_mels=spec.n_mels,
                frames=spec.frames,
                embed_dim=32,
                hidden=32,
                layers=2,
                heads=2,
                ffn=64,
                conv_pos=9,
                conv_pos_groups=4,
                num_buckets=32,
                max_distance=64,
            )
            if size == "tiny"
            else BEATsConfig(n_mels=spec.n_mels, frames=spec.frames)
        )
        enc = BEATsEncoder(bc)
        return enc, enc.hidden_size
    if kind == "efficientat":
        ec = (
            EfficientATConfig(
                n_mels=spec.n_mels,
                frames=spec.frames,
                width=0.25,
                blocks=EfficientATConfig.blocks[:6],
                last_channels=64,
            )
            if size == "tiny"
            else EfficientATConfig(n_mels=spec.n_mels, frames=spec.frames)
        )
        net = EfficientATNet(ec)
        return net, net.hidden_size
    raise ValueError(f"unknown model {kind!r}; choose from {MODELS}")


def save_backbone(backbone: nn.Module, path: Path) -> None:
    """Write a backbone so that ``size='pretrained'`` can load it (HF format or config+weights)."""
    path.mkdir(parents=True, exist_ok=True)
    if hasattr(backbone, "save_pretrained"):
        backbone.save_pretrained(path)
        return
    cfg = backbone.config
    kind = "beats" if isinstance(backbone, BEATsEncoder) else "efficientat"
    (path / "config.json").write_text(json.dumps({"kind": kind, **asdict(cfg)}, indent=2))
    torch.save(backbone.state_dict(), path / "model.pt")


#: Said in ``--help`` and in errors: what ``--size pretrained`` can and cannot load.
PRETRAINED_NOTE = (
    "Only AST and HTS-AT use published pretrained weights; BEATs and EfficientAT are this "
    "project's re-implementations (random init; --size pretrained loads only a directory written "
    "by save_backbone, not the official checkpoints)."
)


def load_pretrained_backbone(kind: str, source: str) -> tuple[nn.Module, int, InputSpec]:
    """Load from a hub id or a directory; returns the backbone, its width and its input shape.

    BEATs and EfficientAT load only this project's own format (``save_backbone``): the official
    checkpoints (BEATs' ``BEATs_iter3*.pt`` with ``cfg`` + ``model``, EfficientAT's ``mn*.pt``
    state dicts) are for architectures the re-implementations here do not match (BEATs: no gated
    relative position bias, no deep-norm; EfficientAT: a scaled block table), so their weights
    cannot be mapped onto them faithfully; such a source is refused with that reason.
    """
    if kind in ("ast", "htsat"):
        from transformers import ASTModel, ClapAudioModel

        cls = ASTModel if kind == "ast" else ClapAudioModel
        model = cls.from_pretrained(source)
        c = model.config
        frames = c.max_length if kind == "ast" else c.spec_size * (c.spec_size // c.num_mel_bins)
        return model, c.hidden_size, InputSpec(c.num_mel_bins, frames)
    root = Path(source)
    cfg_path = root / "config.json"
    if root.is_file() or not cfg_path.is_file():
        what = "a file" if root.is_file() else f"a directory without config.json ({root})"
        raise ValueError(
            f"{kind}: {source} is {what}; official {kind} checkpoints cannot be loaded. "
            + PRETRAINED_NOTE
        )
    raw = json.loads(cfg_path.read_text())
    raw.pop("kind", None)
    if kind == "beats":
        net: nn.Module = BEATsEncoder(BEATsConfig(**raw))
    else:
        raw["blocks"] = tuple(tuple(b) for b in raw["blocks"])
        net = EfficientATNet(EfficientATConfig(**raw))
    net.load_state_dict(torch.load(root / "model.pt", map_location="cpu", weights_only=True))
    spec = InputSpec(raw["n_mels"], raw["frames"])
    return net, net.hidden_size, spec


def build_classifier(
    kind: str, size: str, num_labels: int, frames: int, checkpoint: str | None = None
) -> AudioClassifier:
    """Backbone (tiny/base random, or pretrained from ``checkpoint``) plus a fresh head."""
    if kind not in MODELS:
        raise ValueError(f"unknown model {kind!r}; choose from {MODELS}")
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose from {SIZES}")
    if size == "pretrained":
        source = checkpoint or DEFAULT_CHECKPOINTS.get(kind)
        if source is None:
            raise ValueError(
                f"{kind}: pretrained needs --checkpoint {kind}=DIR "
                "(a directory written by save_backbone)"
            )
        backbone, hidden, spec = load_pretrained_backbone(kind, source)
    else:
        spec = default_input_spec(kind, size, frames)
        backbone, hidden = build_backbone(kind, size, spec)
    return AudioClassifier(kind, backbone, hidden, num_labels, spec)
