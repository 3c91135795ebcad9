"""The one intermediate representation of a query, shared by the builder and the string form.

Nodes are frozen dataclasses compared by value, so ``parse("gpus>=2") == (c.gpu_count >= 2)``.
Values are normalised here, once, whichever face built them: sizes in GB, prices in US$/h,
manufacturers as :class:`broker.types.Manufacturer` values, versions as dotted strings.
"""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass
from typing import Literal, TypeAlias, Union

from broker.catalog import normalize_manufacturer
from broker.errors import QueryError
from broker.query.fields import NUMERIC, ORDERED, FieldSpec, Kind
from broker.types import Manufacturer

Op = Literal["==", "!=", "<", "<=", ">", ">="]
OPS: tuple[Op, ...] = ("==", "!=", "<", "<=", ">", ">=")
Value: TypeAlias = int | float | str | bool

_VERSION = re.compile(r"^\d+(\.\d+)*$")
_TRUE = {"true", "yes", "1", "on"}
_FALSE = {"false", "no", "0", "off"}


class _ExprOps:
    """``&``, ``|`` and ``~`` on every node; ``and``/``or``/``not`` are refused (they'd misfire)."""

    def __and__(self, other: object) -> Expr:
        return and_(self._coerce(self), self._coerce(other))

    def __rand__(self, other: object) -> Expr:
        return and_(self._coerce(other), self._coerce(self))

    def __or__(self, other: object) -> Expr:
        return or_(self._coerce(self), self._coerce(other))

    def __ror__(self, other: object) -> Expr:
        return or_(self._coerce(other), self._coerce(self))

    def __invert__(self) -> Expr:
        return not_(self._coerce(self))

    def __bool__(self) -> bool:
        raise QueryError(
            "a query expression has no truth value: combine with & | ~ (not and/or/not), "
            "and wrap comparisons in parentheses: (c.gpu_count >= 2) & (c.vram_gb >= 80)"
        )

    @staticmethod
    def _coerce(x: object) -> Expr:
        from broker.query.builder import FieldRef

        if isinstance(x, FieldRef):
            return x.as_expr()
        if isinstance(x, Cmp | Contains | In | Between | Flag | Not | And | Or):
            return x
        raise QueryError(f"cannot combine a query with {type(x).__name__} {x!r}")


@dataclass(frozen=True, eq=True)
class Cmp(_ExprOps):
    """``field op value``."""

    field: str
    op: Op
    value: Value


@dataclass(frozen=True, eq=True)
class Contains(_ExprOps):
    """``field~text``: case-insensitive containment (through the catalog for GPU names)."""

    field: str
    value: str


@dataclass(frozen=True, eq=True)
class In(_ExprOps):
    """``field in [a, b]``: equal to any of the values."""

    field: str
    values: tuple[Value, ...]


@dataclass(frozen=True, eq=True)
class Between(_ExprOps):
    """``field=lo..hi``: inclusive range."""

    field: str
    lo: Value
    hi: Value


@dataclass(frozen=True, eq=True)
class Flag(_ExprOps):
    """A boolean field that must be true (``spot``)."""

    field: str


@dataclass(frozen=True, eq=True)
class Not(_ExprOps):
    """Negation (unknown stays unknown)."""

    expr: Expr


@dataclass(frozen=True, eq=True)
class And(_ExprOps):
    """All items hold."""

    items: tuple[Expr, ...]


@dataclass(frozen=True, eq=True)
class Or(_ExprOps):
    """At least one item holds."""

    items: tuple[Expr, ...]


Expr: TypeAlias = Union[Cmp, Contains, In, Between, Flag, Not, And, Or]  # noqa: UP007


@dataclass(frozen=True)
class SortKey:
    """Sort by ``field``; missing values always sort last."""

    field: str
    descending: bool = False


@dataclass(frozen=True)
class Query:
    """A filter plus ordering and a limit: what ``search`` takes."""

    where: Expr | None = None
    sort: tuple[SortKey, ...] = ()
    limit: int | None = None

    def __post_init__(self) -> None:
        if self.limit is not None and self.limit < 1:
            raise QueryError(f"limit must be a positive integer, got {self.limit}")

    def and_where(self, expr: Expr | None) -> Query:
        """This query with ``expr`` added as one more condition."""
        if expr is None:
            return self
        where = expr if self.where is None else and_(self.where, expr)
        return Query(where, self.sort, self.limit)

    def sorted_by(self, *keys: str | SortKey) -> Query:
        """This query ordered by ``keys`` (``"-vram"`` or ``SortKey`` for descending)."""
        return Query(self.where, tuple(sort_key(k) for k in keys), self.limit)

    def take(self, n: int | None) -> Query:
        """This query with at most ``n`` results."""
        return Query(self.where, self.sort, n)

    def __str__(self) -> str:
        from broker.query.parser import to_text

        return to_text(self)


def and_(*items: Expr) -> Expr:
    """Conjunction, flattened (``And(And(a, b), c)`` is ``And(a, b, c)``)."""
    flat: list[Expr] = []
    for it in items:
        flat.extend(it.items if isinstance(it, And) else (it,))
    return flat[0] if len(flat) == 1 else And(tuple(flat))


def or_(*items: Expr) -> Expr:
    """Disjunction, flattened."""
    flat: list[Expr] = []
    for it in items:
        flat.extend(it.items if isinstance(it, Or) else (it,))
    return flat[0] if len(flat) == 1 else Or(tuple(flat))


def not_(expr: Expr) -> Expr:
    """Negation; a double negation cancels."""
    return expr.expr if isinstance(expr, Not) else Not(expr)


def sort_key(key: str | SortKey) -> SortKey:
    """``"price"`` / ``"-vram"`` / a field alias → :class:`SortKey` on the canonical field."""
    from broker.query.fields import LOOKUP

    if isinstance(key, SortKey):
        return key
    desc = key.startswith("-")
    name = key[1:] if desc or key.startswith("+") else key
    spec = LOOKUP.get(name.lower())
    if spec is None:
        raise QueryError(f"unknown sort field {name!r}", suggestion=closest_field(name))
    return SortKey(spec.name, desc)


def closest_field(name: str) -> str | None:
    """The nearest string-form field name, for "did you mean" hints."""
    from broker.query.fields import FIELDS, LOOKUP

    hit = difflib.get_close_matches(name.lower(), list(LOOKUP), n=1, cutoff=0.6)
    if not hit:
        return None
    spec = LOOKUP[hit[0]]
    return spec.short if spec in FIELDS else hit[0]


def normalize_value(spec: FieldSpec, value: object) -> Value:
    """Check and normalise one value for ``spec`` (raises QueryError naming what was expected)."""
    k = spec.kind
    if k is Kind.INT:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise QueryError(f"{spec.short} needs a whole number, got {value!r}")
        if isinstance(value, float) and not value.is_integer():
            raise QueryError(f"{spec.short} needs a whole number, got {value!r}")
        return int(value)
    if k is Kind.FLOAT:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise QueryError(f"{spec.short} needs a number, got {value!r}")
        if not math.isfinite(value):
            raise QueryError(f"{spec.short} needs a finite number, got {value!r}")
        return float(value)
    if k is Kind.BOOL:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        raise QueryError(f"{spec.short} is true or false, got {value!r}")
    if not isinstance(value, str) or not value.strip():
        raise QueryError(f"{spec.short} needs a non-empty text value, got {value!r}")
    v = value.strip()
    if k is Kind.VERSION:
        if not _VERSION.match(v):
            raise QueryError(f"{spec.short} needs a version like 12.4, got {value!r}")
        return v
    if k is Kind.ENUM or k is Kind.ORDERED_ENUM:
        low = v.lower()
        if spec.name == "manufacturer":
            m = normalize_manufacturer(v)
            if m is not Manufacturer.UNKNOWN or low == "unknown":
                return m.value
        elif low in spec.choices:
            return low
        close = difflib.get_close_matches(low, list(spec.choices), n=1, cutoff=0.5)
        raise QueryError(
            f"unknown {spec.short} {value!r} (one of: {', '.join(spec.choices)})",
            suggestion=close[0] if close else None,
        )
    if spec.name == "provider":
        return v.lower()
    return v


def check_op(spec: FieldSpec, op: str) -> None:
    """Refuse orderings on fields that have no order (``gpu>H100``)."""
    if op in ("<", "<=", ">", ">=") and spec.kind not in ORDERED:
        raise QueryError(f"{spec.short} cannot be compared with {op!r}; use = != ~ or in [...]")


def cmp(spec: FieldSpec, op: Op, value: object) -> Expr:
    """Build a comparison; booleans become :class:`Flag` so builder and text agree."""
    if spec.kind is Kind.BOOL and op not in ("==", "!="):
        raise QueryError(f"{spec.short} is true or false; use {spec.short} or !{spec.short}")
    check_op(spec, op)
    v = normalize_value(spec, value)
    if spec.kind is Kind.BOOL:
        positive = (op == "==") == bool(v)
        return Flag(spec.name) if positive else Not(Flag(spec.name))
    return Cmp(spec.name, op, v)


def contains(spec: FieldSpec, text: object) -> Expr:
    """Build ``field~text`` (text fields and GPU names only)."""
    if spec.kind not in (Kind.TEXT, Kind.GPU_NAME):
        raise QueryError(f"{spec.short} is not text; '~' works on gpu, provider, region, ...")
    if not isinstance(text, str) or not text.strip():
        raise QueryError(f"{spec.short}~ needs a non-empty text value, got {text!r}")
    return Contains(spec.name, text.strip())


def isin(spec: FieldSpec, values: object) -> Expr:
    """Build ``field in [...]`` from a non-empty list."""
    if isinstance(values, str) or not hasattr(values, "__iter__"):
        raise QueryError(f"{spec.short} in [...] needs a list, got {values!r}")
    vals = tuple(normalize_value(spec, v) for v in values)
    if not vals:
        raise QueryError(f"{spec.short} in [] is empty; give at least one value")
    if spec.kind is Kind.BOOL:
        raise QueryError(f"{spec.short} is true or false; use {spec.short} or !{spec.short}")
    return In(spec.name, vals)


def between(spec: FieldSpec, lo: object, hi: object) -> Expr:
    """Build an inclusive range on an ordered field."""
    if spec.kind not in ORDERED:
        raise QueryError(f"{spec.short} has no order; a range lo..hi needs a number or version")
    a, b = normalize_value(spec, lo), normalize_value(spec, hi)
    if spec.kind in NUMERIC and isinstance(a, int | float) and isinstance(b, int | float) and a > b:
        raise QueryError(f"{spec.short} range is empty: {a:g}..{b:g} (low end above high end)")
    return Between(spec.name, a, b)
