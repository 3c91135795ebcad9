"""Every GPU name in providers.md resolves to its canonical identity."""

from __future__ import annotations

import pytest

from broker import catalog
from broker.types import Manufacturer

# (provider's name, reported VRAM GB or None, form factor/socket or None) -> canonical name
TABLE = [
    # RunPod ids
    ("NVIDIA H100 80GB HBM3", None, None, "H100 SXM 80GB"),
    ("NVIDIA H100 PCIe", None, None, "H100 PCIe 80GB"),
    ("NVIDIA H100 NVL", None, None, "H100 NVL 94GB"),
    ("NVIDIA H200", None, None, "H200 141GB"),
    ("NVIDIA A100-SXM4-80GB", None, None, "A100 SXM 80GB"),
    ("NVIDIA A100 80GB PCIe", None, None, "A100 PCIe 80GB"),
    ("NVIDIA RTX A6000", None, None, "RTX A6000 48GB"),
    ("NVIDIA GeForce RTX 4090", None, None, "RTX 4090 24GB"),
    ("NVIDIA RTX 6000 Ada Generation", None, None, "RTX 6000 Ada 48GB"),
    ("AMD Instinct MI300X OAM", None, None, "MI300X 192GB"),
    # Vast gpu_name (+ gpu_ram, which the adapter converts from MB)
    ("H100 SXM", 81.92, None, "H100 SXM 80GB"),
    ("H100 PCIE", 81.92, None, "H100 PCIe 80GB"),
    ("H100 NVL", 95.8, None, "H100 NVL 94GB"),
    ("H200", 143.7, None, "H200 141GB"),
    ("A100 SXM4", 81.92, None, "A100 SXM 80GB"),
    ("A100 SXM4", 40.96, None, "A100 SXM 40GB"),
    ("A100 PCIE", 81.92, None, "A100 PCIe 80GB"),
    ("A100 PCIE", 40.96, None, "A100 PCIe 40GB"),
    ("RTX A6000", 49.1, None, "RTX A6000 48GB"),
    ("RTX 4090", 24.5, None, "RTX 4090 24GB"),
    ("RTX 6000Ada", 49.1, None, "RTX 6000 Ada 48GB"),
    ("MI300X", 192.0, None, "MI300X 192GB"),
    # Lambda descriptions (any count prefix)
    ("1x H100 (80 GB SXM5)", None, None, "H100 SXM 80GB"),
    ("8x H100 (80 GB SXM5)", None, None, "H100 SXM 80GB"),
    ("1x H100 (80 GB PCIe)", None, None, "H100 PCIe 80GB"),
    ("1x A100 (80 GB SXM4)", None, None, "A100 SXM 80GB"),
    ("1x A6000 (48 GB)", None, None, "RTX A6000 48GB"),
    # Prime gpuType + socket
    ("H100_80GB", None, "SXM5", "H100 SXM 80GB"),
    ("H100_80GB", None, "PCIe", "H100 PCIe 80GB"),
    ("H200_141GB", None, None, "H200 141GB"),
    ("A100_80GB", None, "SXM4", "A100 SXM 80GB"),
    ("A100_80GB", None, "PCIe", "A100 PCIe 80GB"),
]


@pytest.mark.parametrize(("name", "vram", "socket", "canonical"), TABLE)
def test_alias_resolution(
    name: str, vram: float | None, socket: str | None, canonical: str
) -> None:
    r = catalog.resolve(name, vram_gb=vram, form_factor=socket)
    assert r.known
    assert r.name == canonical
    assert r.model is not None and r.model.name == canonical
    assert r.vram_gb == r.model.vram_gb  # snapped to the nominal size
    assert r.provider_name == name


def test_family_without_variant_keeps_what_is_certain() -> None:
    r = catalog.resolve("A100_80GB")  # Prime without a socket: SXM or PCIe
    assert r.known and r.model is None
    assert (r.name, r.vram_gb, r.manufacturer, r.compute_capability) == (
        "A100 80GB",
        80.0,
        Manufacturer.NVIDIA,
        "8.0",
    )


def test_unknown_names_are_kept_and_flagged() -> None:
    r = catalog.resolve("Quantum Tensor 9000", vram_gb=33.0, manufacturer="Nvidia")
    assert not r.known
    assert r.name == "Quantum Tensor 9000"
    assert r.vram_gb == 33.0
    assert r.manufacturer is Manufacturer.NVIDIA
    assert catalog.resolve("Radeon Pro W9999").manufacturer is Manufacturer.AMD


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Nvidia", Manufacturer.NVIDIA),
        ("NVIDIA", Manufacturer.NVIDIA),
        ("nvidia", Manufacturer.NVIDIA),
        ("NVIDIA Corporation", Manufacturer.NVIDIA),
        ("AMD", Manufacturer.AMD),
        ("amd", Manufacturer.AMD),
        ("Intel", Manufacturer.INTEL),
        (None, Manufacturer.UNKNOWN),
        ("", Manufacturer.UNKNOWN),
    ],
)
def test_manufacturer_normalisation(raw: str | None, expected: Manufacturer) -> None:
    assert catalog.normalize_manufacturer(raw) is expected


def test_catalog_entries_are_complete_and_aliases_unambiguous() -> None:
    names = [m.name for m in catalog.models()]
    assert len(names) == len(set(names))
    for m in catalog.models():
        assert m.vram_gb > 0 and m.family and m.arch and m.form_factor
        assert m.memory_bandwidth_gbps
        if m.vendor is Manufacturer.NVIDIA:
            assert m.compute_capability
        for alias in m.aliases:
            assert catalog.find(alias) == m, alias


def test_name_matching_for_queries() -> None:
    assert catalog.name_matches("H100", "H100 NVL 94GB")
    assert catalog.name_matches("h100 sxm", "H100 SXM 80GB")
    assert not catalog.name_matches("H100 SXM", "H100 PCIe 80GB")
    assert catalog.name_matches("A6000", "RTX A6000 48GB")
    assert not catalog.name_matches("A6000", "RTX 6000 Ada 48GB")
    assert catalog.name_matches("NVIDIA GeForce RTX 4090", "RTX 4090 24GB")
    assert catalog.name_contains("409", "RTX 4090 24GB")


def _fixture_gpu_names() -> list[tuple[str, str, float | None, str | None]]:
    """(provider, name, VRAM GB, form factor) of every GPU in the providers' fixtures."""
    import json
    from pathlib import Path

    root = Path(__file__).parent.parent / "fixtures"

    def load(p: str) -> dict:  # type: ignore[type-arg]
        return json.loads((root / p).read_text())  # type: ignore[no-any-return]

    out: list[tuple[str, str, float | None, str | None]] = []
    for gt in load("runpod/gpu_types.json")["data"]["gpuTypes"]:
        out.append(("runpod", gt["id"], gt.get("memoryInGb"), None))
    for f in ("vast/bundles_on_demand.json", "vast/bundles_bid.json"):
        for o in load(f)["offers"]:
            out.append(("vast", o["gpu_name"], o["gpu_ram"] / 1024, None))
    for v in load("lambdalabs/instance_types.json")["data"].values():
        out.append(("lambdalabs", v["instance_type"]["gpu_description"], None, None))
    for f in ("availability_page1.json", "availability_mixed.json"):
        for i in load(f"primeintellect/{f}")["items"]:
            out.append(("primeintellect", i["gpuType"], i["gpuMemory"], i.get("socket")))
    return sorted(set(out), key=str)


# Deliberately unknown GPUs in the fixtures (they must stay unknown, never be guessed).
_UNKNOWN = {"NVIDIA Future X1", "Quantum Q1", "X9000_77GB", "B300 (288 GB SXM6)"}


@pytest.mark.parametrize(("provider", "name", "vram", "socket"), _fixture_gpu_names())
def test_every_fixture_gpu_name_resolves(
    provider: str, name: str, vram: float | None, socket: str | None
) -> None:
    r = catalog.resolve(name, vram_gb=vram, form_factor=socket)
    assert r.known is (name not in _UNKNOWN), (provider, name, r)


@pytest.mark.parametrize(
    ("name", "canonical"),
    [
        ("RTX4090", "RTX 4090 24GB"),
        ("RTX3090", "RTX 3090 24GB"),
        ("RTXA6000", "RTX A6000 48GB"),
        ("RTXA4000", "RTX A4000 16GB"),
        ("RTX6000Ada", "RTX 6000 Ada 48GB"),
        ("H100SXM", "H100 SXM 80GB"),
        ("H100SXM5", "H100 SXM 80GB"),
        ("H100PCIe", "H100 PCIe 80GB"),
        ("H100NVL", "H100 NVL 94GB"),
        ("A100SXM4 80GB", "A100 SXM 80GB"),
        ("A100PCIE 40GB", "A100 PCIe 40GB"),
        ("MI300X", "MI300X 192GB"),
    ],
)
def test_spellings_without_spaces_resolve(name: str, canonical: str) -> None:
    assert catalog.resolve(name).name == canonical
    assert catalog.name_matches(name, canonical)
