"""What a provider may filter server-side: bounds read off the query's top-level conditions.

Only conditions that every match must satisfy (the top-level ``and``) become hints, so a provider
that applies them can never lose a matching offer. Adapters use what their API supports and ignore
the rest; the client re-checks the whole query on every offer afterwards.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from broker import catalog
from broker.query.ir import And, Between, Cmp, Contains, Expr, Flag, In, Not, Or, Query


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
    #: Names from ``gpu=X`` / ``gpu in [...]`` (token matches; see canonical_gpus()).
    gpu_names: tuple[str, ...] | None = None
    #: Texts from ``gpu~X``: also substrings (``gpu~L4`` is L4, L40 and L40S), never exact types.
    gpu_substrings: tuple[str, ...] | None = None
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
    where = Query(query).where if not isinstance(query, Query) else query.where
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
        h.gpu_substrings = (e.value,)
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


# -- which values of one field can still match ------------------------------------------------

Tri = bool | None
_OPS: dict[str, Callable[[Any, Any], bool]] = {
    "==": operator.eq,
    "!=": operator.ne,
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
}


def _partial(e: Expr, fld: str, value: Any) -> Tri:
    """Kleene evaluation with only ``fld`` known (= ``value``); every other condition unknown.

    Kleene's logic is monotone: if the result is False with the other conditions unknown, it is
    False whatever they turn out to be, so no offer with ``fld == value`` can match.
    """
    if isinstance(e, Cmp):
        return _OPS[e.op](value, e.value) if e.field == fld else None
    if isinstance(e, Between):
        return bool(e.lo <= value <= e.hi) if e.field == fld else None
    if isinstance(e, In):
        return value in e.values if e.field == fld else None
    if isinstance(e, Contains | Flag):
        return None
    if isinstance(e, Not):
        r = _partial(e.expr, fld, value)
        return None if r is None else not r
    if isinstance(e, And):
        out: Tri = True
        for item in e.items:
            r = _partial(item, fld, value)
            if r is False:
                return False
            if r is None:
                out = None
        return out
    if isinstance(e, Or):
        out = False
        for item in e.items:
            r = _partial(item, fld, value)
            if r is True:
                return True
            if r is None:
                out = None
        return out
    raise TypeError(f"not a query expression: {e!r}")


def possible_values(query: Query | Expr | None, fld: str, candidates: Iterable[Any]) -> list[Any]:
    """The candidate values of a numeric field for which the query is not certainly false.

    Exact for any nesting of and/or/not (``gpus=1 or gpus=8`` → [1, 8]; ``gpus>=2 gpus!=2`` →
    3 and up), so an adapter that fetches only these values never loses a match.
    """
    where = query.where if isinstance(query, Query) else query
    if where is None:
        return list(candidates)
    return [v for v in candidates if _partial(where, fld, v) is not False]


def mentioned_values(query: Query | Expr | None, fld: str) -> set[Any]:
    """Every constant the query compares ``fld`` with (to widen a candidate range)."""
    where = query.where if isinstance(query, Query) else query
    out: set[Any] = set()

    def walk(e: Expr) -> None:
        if isinstance(e, Cmp) and e.field == fld:
            out.add(e.value)
        elif isinstance(e, Between) and e.field == fld:
            out.update((e.lo, e.hi))
        elif isinstance(e, In) and e.field == fld:
            out.update(e.values)
        elif isinstance(e, Not):
            walk(e.expr)
        elif isinstance(e, And | Or):
            for item in e.items:
                walk(item)

    if where is not None:
        walk(where)
    return out
