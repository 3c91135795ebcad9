"""Canonical GPU identities and the many names providers give them.

Providers spell the same card differently ("NVIDIA H100 80GB HBM3", "H100 SXM",
"1x H100 (80 GB SXM5)", "H100_80GB" + socket "SXM5"). :func:`resolve` maps any of them, plus
the VRAM and form factor the provider reports, to one :class:`GPUModel`. A name the catalog
does not know keeps the provider's string and is flagged (``known=False``); it is never dropped.

Names are compared as *token sets* after normalisation (case, punctuation, vendor words, ``80 GB`` →
``80gb``, ``SXM5`` → ``sxm``), so word order and spacing never matter.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from functools import cache
from importlib import resources

from broker.types import Manufacturer

#: Reported VRAM within this fraction of a model's nominal size counts as that model.
VRAM_TOLERANCE = 0.07


@dataclass(frozen=True)
class GPUModel:
    """One canonical GPU identity with its published specs (approximate)."""

    name: str
    vendor: Manufacturer
    family: str
    arch: str
    vram_gb: float
    form_factor: str
    compute_capability: str | None = None
    memory_bandwidth_gbps: float | None = None
    bf16_tflops: float | None = None
    aliases: tuple[str, ...] = ()
    tokens: frozenset[str] = field(default=frozenset(), compare=False)


@dataclass(frozen=True)
class Resolved:
    """What :func:`resolve` learned about a provider's GPU name."""

    name: str  # canonical name, a family-level name, or the provider's own string
    provider_name: str
    manufacturer: Manufacturer
    known: bool
    model: GPUModel | None = None
    vram_gb: float | None = None
    form_factor: str | None = None
    compute_capability: str | None = None


_VENDOR_WORDS = {"nvidia", "geforce", "tesla", "amd", "instinct", "generation", "corporation"}
_FORM_FACTORS = {
    "sxm": "sxm",
    "sxm2": "sxm",
    "sxm3": "sxm",
    "sxm4": "sxm",
    "sxm5": "sxm",
    "sxm6": "sxm",
    "pcie": "pcie",
    "pci": "pcie",
    "nvl": "nvl",
    "oam": "oam",
}
_COUNT_PREFIX = re.compile(r"^\s*\d+\s*x\s+", re.IGNORECASE)
_SPLIT = re.compile(r"[\s_\-(),/]+")
_MEM = re.compile(r"(\d+)\s*(gb|gib|g)\b", re.IGNORECASE)


# Provider spellings without spaces ("RTX4090", "RTXA6000", "H100SXM", "A100PCIE", "RTX6000Ada"):
# a series prefix glued to a model number, and a form factor (or "Ada") glued to its end.
_GLUED_PREFIX = re.compile(r"^(rtx|gtx)(?=[a-z]?\d)")
_GLUED_SUFFIX = re.compile(r"^(.*\d[a-z]?)(sxm\d?|pcie|nvl|oam|ada)$")


def _unglue(word: str) -> list[str]:
    out: list[str] = []
    m = _GLUED_PREFIX.match(word)
    if m:
        out.append(m.group(1))
        word = word[m.end() :]
    m = _GLUED_SUFFIX.match(word)
    if m:
        return [*out, m.group(1), m.group(2)]
    return [*out, word]


def tokens(name: str) -> frozenset[str]:
    """Normalised token set of a GPU name (case, punctuation and vendor words removed)."""
    s = _COUNT_PREFIX.sub("", name)
    s = _MEM.sub(lambda m: f" {m.group(1)}gb ", s)
    out = set()
    for raw in _SPLIT.split(s.lower()):
        if not raw or raw in _VENDOR_WORDS or raw == "hbm3" or raw == "hbm3e":
            continue
        for word in _unglue(raw):
            out.add(_FORM_FACTORS.get(word, word))
    return frozenset(out)


def normalize_manufacturer(value: str | Manufacturer | None) -> Manufacturer:
    """Map a provider's spelling ("Nvidia", "NVIDIA Corporation", "AMD") to a Manufacturer."""
    if isinstance(value, Manufacturer):
        return value
    if not value:
        return Manufacturer.UNKNOWN
    v = value.strip().lower()
    if v.startswith("nvidia") or v in {"nv", "geforce", "tesla"}:
        return Manufacturer.NVIDIA
    if v.startswith("amd") or v.startswith("advanced micro") or v in {"radeon", "instinct"}:
        return Manufacturer.AMD
    if v.startswith("intel"):
        return Manufacturer.INTEL
    if v in {"none", "cpu"}:
        return Manufacturer.NONE
    return Manufacturer.UNKNOWN


def _guess_vendor(name: str) -> Manufacturer:
    low = name.lower()
    if any(w in low for w in ("nvidia", "geforce", "tesla", "rtx", "gtx", "quadro")):
        return Manufacturer.NVIDIA
    if any(w in low for w in ("amd", "radeon", "instinct")) or re.search(r"\bmi\d{3}", low):
        return Manufacturer.AMD
    if any(w in low for w in ("intel", "gaudi", "arc ")):
        return Manufacturer.INTEL
    return Manufacturer.UNKNOWN


@cache
def models() -> tuple[GPUModel, ...]:
    """Every GPU the catalog knows, from the packaged ``data/gpus.toml``."""
    raw = tomllib.loads(resources.files("broker").joinpath("data/gpus.toml").read_text("utf-8"))
    out = []
    for g in raw["gpu"]:
        out.append(
            GPUModel(
                name=g["name"],
                vendor=Manufacturer(g["vendor"]),
                family=g["family"],
                arch=g["arch"],
                vram_gb=float(g["vram_gb"]),
                form_factor=g["form_factor"],
                compute_capability=g.get("compute_capability"),
                memory_bandwidth_gbps=g.get("memory_bandwidth_gbps"),
                bf16_tflops=g.get("bf16_tflops"),
                aliases=tuple(g.get("aliases", ())),
                tokens=tokens(g["name"]),
            )
        )
    return tuple(out)


@cache
def _exact_index() -> dict[frozenset[str], tuple[GPUModel, ...]]:
    idx: dict[frozenset[str], list[GPUModel]] = {}
    for m in models():
        for name in (m.name, *m.aliases):
            bucket = idx.setdefault(tokens(name), [])
            if m not in bucket:
                bucket.append(m)
    return {k: tuple(v) for k, v in idx.items()}


def find(name: str) -> GPUModel | None:
    """The model a canonical name or exact alias denotes, or None (also when it is ambiguous)."""
    hit = _exact_index().get(tokens(name), ())
    return hit[0] if len(hit) == 1 else None


def _vram_fits(reported: float, nominal: float) -> bool:
    return abs(reported - nominal) <= VRAM_TOLERANCE * nominal


def candidates(name: str) -> tuple[GPUModel, ...]:
    """Models a (possibly partial) name can denote: an exact alias, else a token-subset match."""
    toks = tokens(name)
    if not toks:
        return ()
    exact = _exact_index().get(toks)
    if exact:
        return exact
    return tuple(m for m in models() if toks <= m.tokens)


def resolve(
    provider_name: str,
    *,
    vram_gb: float | None = None,
    form_factor: str | None = None,
    manufacturer: str | Manufacturer | None = None,
) -> Resolved:
    """Identify a provider's GPU name, using reported VRAM (GB) and form factor to disambiguate."""
    query = provider_name if not form_factor else f"{provider_name} {form_factor}"
    cands = list(candidates(query))
    if not cands and form_factor:
        cands = list(candidates(provider_name))
    if vram_gb is not None and len(cands) > 1:
        fitting = [m for m in cands if _vram_fits(vram_gb, m.vram_gb)]
        cands = fitting or cands
    vendor = normalize_manufacturer(manufacturer)
    if len(cands) == 1:
        m = cands[0]
        return Resolved(
            name=m.name,
            provider_name=provider_name,
            manufacturer=m.vendor,
            known=True,
            model=m,
            vram_gb=m.vram_gb,
            form_factor=m.form_factor,
            compute_capability=m.compute_capability,
        )
    if len(cands) > 1 and len({m.family for m in cands}) == 1:
        # Family known, variant not (e.g. Prime "A100_80GB" without a socket): keep what all share.
        fam = cands[0].family
        vrams = {m.vram_gb for m in cands}
        ccs = {m.compute_capability for m in cands}
        vram = vrams.pop() if len(vrams) == 1 else vram_gb
        return Resolved(
            name=f"{fam} {vram:g}GB" if vram is not None else fam,
            provider_name=provider_name,
            manufacturer=cands[0].vendor,
            known=True,
            model=None,
            vram_gb=vram,
            form_factor=None,
            compute_capability=ccs.pop() if len(ccs) == 1 else None,
        )
    if vendor is Manufacturer.UNKNOWN:
        vendor = _guess_vendor(provider_name)
    return Resolved(
        name=provider_name.strip(),
        provider_name=provider_name,
        manufacturer=vendor,
        known=False,
        vram_gb=vram_gb,
        form_factor=form_factor,
    )


@cache
def _name_tokens_cached(name: str) -> frozenset[str]:
    return tokens(name)


@cache
def query_tokens(text: str) -> frozenset[str]:
    """Tokens a user's GPU name stands for: an exact alias expands to its canonical name."""
    exact = _exact_index().get(tokens(text))
    if exact and len(exact) == 1:
        return exact[0].tokens
    return tokens(text)


_CONFUSABLE = str.maketrans({"o": "0", "O": "0", "I": "1", "l": "1"})


def typo_suggestion(name: str) -> str | None:
    """A catalog name for a GPU name that only a typo keeps from matching, else None.

    Only letter/digit look-alikes count (``A1OO`` → A100, ``H1OO`` → H100): a name the catalog
    does not know is otherwise legitimate (an offer's own spelling, a new GPU), so it is never
    refused on similarity alone (B300 is not a typo of B200).
    """
    if candidates(name):
        return None
    fixed = " ".join(
        w.translate(_CONFUSABLE) if any(c.isdigit() for c in w) else w for w in name.split()
    )
    if fixed == name:
        return None
    cands = candidates(fixed)
    if not cands:
        return None
    return fixed if len(cands) > 1 else cands[0].name


def name_matches(text: str, gpu_type: str, provider_name: str | None = None) -> bool:
    """Whether a user's GPU name (``gpu=TEXT``) denotes this offer's GPU.

    True when every token of the name (aliases expanded) is in the offer's canonical name, or in
    the provider's own name: ``H100`` matches every H100 variant, ``A100 80GB`` both A100 80GB form
    factors, ``NVIDIA H100 80GB HBM3`` only the H100 SXM.
    """
    q = query_tokens(text)
    if not q:
        return False
    if q <= _name_tokens_cached(gpu_type):
        return True
    return provider_name is not None and q <= _name_tokens_cached(provider_name)


def name_contains(text: str, gpu_type: str, provider_name: str | None = None) -> bool:
    """``gpu~TEXT``: a token match, or a case-insensitive substring of either name."""
    if name_matches(text, gpu_type, provider_name):
        return True
    t = text.lower()
    return t in gpu_type.lower() or (provider_name is not None and t in provider_name.lower())


__all__ = [
    "VRAM_TOLERANCE",
    "GPUModel",
    "Resolved",
    "candidates",
    "find",
    "models",
    "name_contains",
    "name_matches",
    "normalize_manufacturer",
    "query_tokens",
    "resolve",
    "tokens",
    "typo_suggestion",
]
