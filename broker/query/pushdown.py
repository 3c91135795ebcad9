"""What a provider may filter server-side: bounds read off the query's top-level conditions.

Only conditions that every match must satisfy (the top-level ``and``) become hints, so a provider
that applies them can never lose a matching offer. Adapters use what their API supports and ignore
the rest; the client re-checks the whole query on every offer afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from broker import catalog
from broker.query.ir import And, Between, Cmp, Contains, Expr, Flag, In, Not, Query


@dataclass
class Hints:
    """Server-side filter hints; None means "no constraint"."""

    gpu_count_min: int | None = None
    gpu_count_max: int | None = None
    vram_gb_min: float | None = None
    total_vram_gb_min: float | None = None
    price_per_hour_max: float | None = None
    price_per_gpu_hour_max: float | None = None
    vcpus_min: float | None = None
    ram_gb_min: float | None = None
    disk_gb_min: float | None = None
    cuda_version_min: str | None = None
    spot: bool | None = None
    gpu_names: tuple[str, ...] | None = None  # user's names; see canonical_gpus()
    manufacturers: tuple[str, ...] | None = None
    regions: tuple[str, ...] | None = None
    cloud_types: tuple[str, ...] | None = None
    providers: tuple[str, ...] | None = None
    used: list[str] = field(default_factory=list)  # human-readable, for --explain

    def canonical_gpus(self) -> tuple[str, ...] | None:
        """Canonical catalog names the GPU names can denote (None: unconstrained or unknown)."""
        if self.gpu_names is None:
            return None
        names: list[str] = []
        for n in self.gpu_names:
            cands = catalog.candidates(n)
            if not cands:
                return None  # an unknown name: the provider must not filter on it
            names.extend(m.name for m in cands if m.name not in names)
        return tuple(names)

    def allows_provider(self, name: str) -> bool:
        """Whether the query can match offers of this provider at all."""
        return self.providers is None or name.lower() in self.providers


def _max(a: float | None, b: float) -> float:
    return b if a is None else max(a, b)


def _min(a: float | None, b: float) -> float:
    return b if a is None else min(a, b)


def hints(query: Query | Expr | None) -> Hints:
    """Hints implied by the top-level conjunction of ``query``."""
    where = query.where if isinstance(query, Query) else query
    h = Hints()
    if where is None:
        return h
    items = where.items if isinstance(where, And) else (where,)
    for e in items:
        _apply(h, e)
    return h


def _apply(h: Hints, e: Expr) -> None:
    if isinstance(e, Cmp) and isinstance(e.value, int | float) and not isinstance(e.value, bool):
        v = e.value
        lower = e.op in (">=", ">", "==")
        upper = e.op in ("<=", "<", "==")
        if e.field == "gpu_count":
            n = int(v)
            if lower:
                h.gpu_count_min = int(_max(h.gpu_count_min, n + (1 if e.op == ">" else 0)))
            if upper:
                h.gpu_count_max = int(_min(h.gpu_count_max, n - (1 if e.op == "<" else 0)))
        elif e.field in ("vram_gb", "total_vram_gb", "vcpus", "ram_gb", "disk_gb") and lower:
            attr = f"{e.field}_min"
            setattr(h, attr, _max(getattr(h, attr), float(v)))
        elif e.field in ("price_per_hour", "price_per_gpu_hour") and upper:
            attr = f"{e.field}_max"
            setattr(h, attr, _min(getattr(h, attr), float(v)))
        else:
            return
        h.used.append(f"{e.field} {e.op} {v}")
    elif isinstance(e, Between) and isinstance(e.lo, int | float):
        _apply(h, Cmp(e.field, ">=", e.lo))
        _apply(h, Cmp(e.field, "<=", e.hi))
    elif isinstance(e, Cmp) and e.op == "==" and isinstance(e.value, str):
        _apply(h, In(e.field, (e.value,)))
    elif isinstance(e, In):
        vals = tuple(str(v) for v in e.values)
        target = {
            "gpu_type": "gpu_names",
            "manufacturer": "manufacturers",
            "region": "regions",
            "cloud_type": "cloud_types",
            "provider": "providers",
        }.get(e.field)
        if target is None:
            return
        if target == "providers":
            vals = tuple(v.lower() for v in vals)
        setattr(h, target, vals)
        h.used.append(f"{e.field} in {list(vals)}")
    elif isinstance(e, Contains) and e.field == "gpu_type":
        h.gpu_names = (e.value,)
        h.used.append(f"gpu_type ~ {e.value}")
    elif isinstance(e, Cmp) and e.field == "cuda_version" and e.op in (">=", "=="):
        h.cuda_version_min = str(e.value)
        h.used.append(f"cuda_version >= {e.value}")
    elif isinstance(e, Flag) and e.field == "spot":
        h.spot = True
        h.used.append("spot")
    elif isinstance(e, Not) and isinstance(e.expr, Flag) and e.expr.field == "spot":
        h.spot = False
        h.used.append("not spot")
