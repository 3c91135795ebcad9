"""The Python face of the query language: field references on :class:`broker.GPUClient`.

``c.gpu_type.contains("H100") & (c.gpu_count >= 2) & ~c.spot`` builds the same IR as the string
``gpu~H100 gpus>=2 !spot``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import ClassVar

from broker.errors import QueryError
from broker.query import ir
from broker.query.fields import BY_NAME, FieldSpec, Kind


class FieldRef:
    """A reference to one offer field; comparisons build query expressions."""

    __slots__ = ("spec",)

    def __init__(self, spec: FieldSpec) -> None:
        self.spec = spec

    def __eq__(self, value: object) -> ir.Expr:  # type: ignore[override]
        return ir.cmp(self.spec, "==", value)

    def __ne__(self, value: object) -> ir.Expr:  # type: ignore[override]
        return ir.cmp(self.spec, "!=", value)

    def __lt__(self, value: object) -> ir.Expr:
        return ir.cmp(self.spec, "<", value)

    def __le__(self, value: object) -> ir.Expr:
        return ir.cmp(self.spec, "<=", value)

    def __gt__(self, value: object) -> ir.Expr:
        return ir.cmp(self.spec, ">", value)

    def __ge__(self, value: object) -> ir.Expr:
        return ir.cmp(self.spec, ">=", value)

    __hash__ = None  # type: ignore[assignment]

    def contains(self, text: str) -> ir.Expr:
        """Case-insensitive containment; GPU names also match through the catalog's aliases."""
        return ir.contains(self.spec, text)

    def isin(self, values: Iterable[object]) -> ir.Expr:
        """Equal to any of ``values``."""
        return ir.isin(self.spec, list(values))

    def between(self, lo: object, hi: object) -> ir.Expr:
        """Inclusive range ``lo <= field <= hi``."""
        return ir.between(self.spec, lo, hi)

    def as_expr(self) -> ir.Expr:
        """A bare boolean field (``c.spot``) used as a condition."""
        if self.spec.kind is not Kind.BOOL:
            raise QueryError(
                f"{self.spec.name} is not a true/false field; compare it, e.g. "
                f"(c.{self.spec.name} >= ...)"
            )
        return ir.Flag(self.spec.name)

    def __invert__(self) -> ir.Expr:
        return ir.not_(self.as_expr())

    def __and__(self, other: object) -> ir.Expr:
        return self.as_expr() & other

    def __rand__(self, other: object) -> ir.Expr:
        return ir.and_(ir._ExprOps._coerce(other), self.as_expr())

    def __or__(self, other: object) -> ir.Expr:
        return self.as_expr() | other

    def __ror__(self, other: object) -> ir.Expr:
        return ir.or_(ir._ExprOps._coerce(other), self.as_expr())

    def __bool__(self) -> bool:
        raise QueryError(
            f"c.{self.spec.name} has no truth value here: use & | ~ to combine query conditions"
        )

    def asc(self) -> ir.SortKey:
        """Sort ascending on this field."""
        return ir.SortKey(self.spec.name, False)

    def desc(self) -> ir.SortKey:
        """Sort descending on this field."""
        return ir.SortKey(self.spec.name, True)

    def __repr__(self) -> str:
        return f"<field {self.spec.name}>"


def _f(name: str) -> FieldRef:
    return FieldRef(BY_NAME[name])


class QueryFields:
    """Mixin giving :class:`broker.GPUClient` one attribute per queryable field."""

    gpu_type: ClassVar[FieldRef] = _f("gpu_type")
    gpu_count: ClassVar[FieldRef] = _f("gpu_count")
    vram_gb: ClassVar[FieldRef] = _f("vram_gb")
    total_vram_gb: ClassVar[FieldRef] = _f("total_vram_gb")
    manufacturer: ClassVar[FieldRef] = _f("manufacturer")
    price_per_hour: ClassVar[FieldRef] = _f("price_per_hour")
    price_per_gpu_hour: ClassVar[FieldRef] = _f("price_per_gpu_hour")
    vcpus: ClassVar[FieldRef] = _f("vcpus")
    ram_gb: ClassVar[FieldRef] = _f("ram_gb")
    disk_gb: ClassVar[FieldRef] = _f("disk_gb")
    provider: ClassVar[FieldRef] = _f("provider")
    region: ClassVar[FieldRef] = _f("region")
    country: ClassVar[FieldRef] = _f("country")
    datacenter: ClassVar[FieldRef] = _f("datacenter")
    spot: ClassVar[FieldRef] = _f("spot")
    cloud_type: ClassVar[FieldRef] = _f("cloud_type")
    cuda_version: ClassVar[FieldRef] = _f("cuda_version")
    compute_capability: ClassVar[FieldRef] = _f("compute_capability")
    stock: ClassVar[FieldRef] = _f("stock")


#: A standalone field namespace: ``from broker.query import F; F.gpu_count >= 2``.
F = QueryFields
