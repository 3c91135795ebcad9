"""The fields a query can filter and sort on, their kinds, units and string-form names."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from broker.types import CloudType, Manufacturer, StockLevel


class Kind(StrEnum):
    """How a field's values are compared."""

    GPU_NAME = "gpu_name"  # matched through the catalog's aliases
    TEXT = "text"  # case-insensitive string
    ENUM = "enum"  # a closed vocabulary (manufacturer, cloud type)
    ORDERED_ENUM = "ordered_enum"  # a closed vocabulary with an order (stock)
    INT = "int"
    FLOAT = "float"
    BOOL = "bool"
    VERSION = "version"  # dotted numbers compared numerically (12.4 < 12.10)


class Unit(StrEnum):
    """Which units a numeric field accepts in the string form."""

    NONE = "none"
    SIZE_GB = "size_gb"  # GB, GiB, TB, TiB, MB, MiB → GB
    PRICE_PER_HOUR = "price_per_hour"  # $, /h, $/h, /hr → US$ per hour


@dataclass(frozen=True)
class FieldSpec:
    """One queryable attribute of :class:`broker.types.GPUOffer`."""

    name: str  # the GPUOffer attribute, also the builder's attribute on GPUClient
    short: str  # the canonical name in the string form
    kind: Kind
    unit: Unit = Unit.NONE
    aliases: tuple[str, ...] = ()
    choices: tuple[str, ...] = ()
    doc: str = ""


FIELDS: tuple[FieldSpec, ...] = (
    FieldSpec(
        "gpu_type",
        "gpu",
        Kind.GPU_NAME,
        aliases=("gpu_type", "gpu_name", "type", "model"),
        doc="GPU model; matched through the catalog's aliases, case-insensitively",
    ),
    FieldSpec(
        "gpu_count",
        "gpus",
        Kind.INT,
        aliases=("gpu_count", "count", "num_gpus", "n_gpus", "ngpus"),
        doc="GPUs in the instance",
    ),
    FieldSpec(
        "vram_gb",
        "vram",
        Kind.FLOAT,
        Unit.SIZE_GB,
        aliases=("vram_gb", "gpu_memory", "gpu_ram", "vram_per_gpu"),
        doc="memory of one GPU, GB",
    ),
    FieldSpec(
        "total_vram_gb",
        "total_vram",
        Kind.FLOAT,
        Unit.SIZE_GB,
        aliases=("total_vram_gb", "total_gpu_memory"),
        doc="GPU memory of the whole instance, GB",
    ),
    FieldSpec(
        "manufacturer",
        "manufacturer",
        Kind.ENUM,
        aliases=("vendor", "make"),
        choices=tuple(m.value for m in Manufacturer),
        doc="GPU vendor",
    ),
    FieldSpec(
        "price_per_hour",
        "price",
        Kind.FLOAT,
        Unit.PRICE_PER_HOUR,
        aliases=("price_per_hour", "cost", "dph", "price_per_instance_hour"),
        doc="US$/h for the whole instance",
    ),
    FieldSpec(
        "price_per_gpu_hour",
        "gpu_price",
        Kind.FLOAT,
        Unit.PRICE_PER_HOUR,
        aliases=("price_per_gpu_hour", "price_per_gpu", "gpu_cost"),
        doc="US$/h for one GPU",
    ),
    FieldSpec("vcpus", "vcpus", Kind.FLOAT, aliases=("cpus", "cpu", "vcpu"), doc="virtual CPUs"),
    FieldSpec(
        "ram_gb",
        "ram",
        Kind.FLOAT,
        Unit.SIZE_GB,
        aliases=("ram_gb", "cpu_ram", "system_ram"),
        doc="system RAM (not VRAM), GB",
    ),
    FieldSpec(
        "disk_gb", "disk", Kind.FLOAT, Unit.SIZE_GB, aliases=("disk_gb", "storage"), doc="disk, GB"
    ),
    FieldSpec("provider", "provider", Kind.TEXT, aliases=("cloud_provider",), doc="registry name"),
    FieldSpec("region", "region", Kind.TEXT, aliases=("location",), doc="provider's region"),
    FieldSpec("country", "country", Kind.TEXT, doc="country code where known"),
    FieldSpec("datacenter", "datacenter", Kind.TEXT, aliases=("dc", "data_center"), doc="site"),
    FieldSpec(
        "spot",
        "spot",
        Kind.BOOL,
        aliases=("interruptible", "preemptible"),
        doc="interruptible (bid) pricing",
    ),
    FieldSpec(
        "cloud_type",
        "cloud",
        Kind.ENUM,
        aliases=("cloud_type",),
        choices=tuple(c.value for c in CloudType),
        doc="secure / community / local",
    ),
    FieldSpec(
        "cuda_version", "cuda", Kind.VERSION, aliases=("cuda_version",), doc="max CUDA version"
    ),
    FieldSpec(
        "compute_capability",
        "cc",
        Kind.VERSION,
        aliases=("compute_capability", "compute_cap", "sm"),
        doc="CUDA compute capability, e.g. 8.0",
    ),
    FieldSpec(
        "stock",
        "stock",
        Kind.ORDERED_ENUM,
        aliases=("stock_status", "availability"),
        choices=tuple(s.value for s in StockLevel),
        doc="none < low < medium < high",
    ),
)

BY_NAME: dict[str, FieldSpec] = {f.name: f for f in FIELDS}
LOOKUP: dict[str, FieldSpec] = {}
for _f in FIELDS:
    for _n in (_f.name, _f.short, *_f.aliases):
        LOOKUP[_n] = _f

NUMERIC = {Kind.INT, Kind.FLOAT}
ORDERED = {Kind.INT, Kind.FLOAT, Kind.VERSION, Kind.ORDERED_ENUM}


def field_spec(name: str) -> FieldSpec:
    """The spec for a field name or alias (KeyError when unknown)."""
    return LOOKUP[name.lower()]
