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

from broker.catalog import normalize_manufacturer, typo_suggestion
from broker.errors import QueryError
from broker.query.fields import BY_NAME, FIELDS, LOOKUP, NUMERIC, ORDERED, FieldSpec, Kind, Unit
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
        if isinstance(x, Cmp | Contains | In | Between | Flag | Not | And | Or):
            return x
        # A field reference of the builder (``c.spot``) turns itself into a condition; checked by
        # duck type so this module never imports the builder (which imports this one).
        as_expr = getattr(x, "as_expr", None)
        if callable(as_expr):
            e = as_expr()
            if isinstance(e, Cmp | Contains | In | Between | Flag | Not | And | Or):
                return e
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
        if self.where is not None and not isinstance(self.where, _NODES):
            # A bare boolean field (Query(c.spot)) is a condition like everywhere else.
            object.__setattr__(self, "where", as_expr(self.where))
        if self.limit is not None and self.limit < 1:
            raise QueryError(f"limit must be a positive integer, got {self.limit}")

    def and_where(self, expr: Expr | None) -> Query:
        """This query with ``expr`` added as one more condition (a bare ``c.spot`` too)."""
        if expr is None:
            return self
        expr = as_expr(expr)
        where = expr if self.where is None else and_(self.where, expr)
        return Query(where, self.sort, self.limit)

    def sorted_by(self, *keys: str | SortKey) -> Query:
        """This query ordered by ``keys`` (``"-vram"`` or ``SortKey`` for descending)."""
        return Query(self.where, tuple(sort_key(k) for k in keys), self.limit)

    def take(self, n: int | None) -> Query:
        """This query with at most ``n`` results."""
        return Query(self.where, self.sort, n)

    def __str__(self) -> str:
        return to_text(self)


_NODES = (Cmp, Contains, In, Between, Flag, Not, And, Or)


def as_expr(x: object) -> Expr:
    """An expression from an expression or a builder field (``c.spot`` → ``Flag("spot")``)."""
    return _ExprOps._coerce(x)


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
    if k is Kind.GPU_NAME:
        check_gpu_name(v)
    return v


def check_gpu_name(name: str) -> None:
    """Refuse a GPU name that is a look-alike typo of a known one (``A1OO``): did you mean?"""
    fix = typo_suggestion(name)
    if fix is not None:
        raise QueryError(f"unknown GPU {name!r}", suggestion=fix)


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
    if spec.kind is Kind.GPU_NAME:
        check_gpu_name(text.strip())
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


#: Words of the string form that a bare text value must not be (they are quoted when printed).
KEYWORDS = frozenset({"and", "or", "not", "in"})

# -- printing: here, not in the parser, so Query.__str__ needs no import cycle ------------------

_BARE = re.compile(r"^[^\s()\[\],!|&<>=~\"'.$]+(?:\.[^\s()\[\],!|&<>=~\"'.]+)*$")


def _fmt_text(v: str) -> str:
    if _BARE.match(v) and v.lower() not in KEYWORDS and ".." not in v:
        return v
    return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _fmt_value(field: str, v: Value) -> str:
    spec = BY_NAME[field]
    if spec.kind is Kind.BOOL:
        return "true" if v else "false"
    if isinstance(v, int | float) and not isinstance(v, bool):
        num = repr(int(v)) if float(v).is_integer() else repr(float(v))
        if spec.unit is Unit.SIZE_GB:
            return f"{num}GB"
        if spec.unit is Unit.PRICE_PER_HOUR:
            return f"{num}/h"
        return num
    s = str(v)
    if spec.kind in (Kind.VERSION,):
        return s
    return _fmt_text(s)


def _expr_text(e: Expr, parent: str = "") -> str:
    if isinstance(e, Cmp):
        spec = BY_NAME[e.field]
        op = "=" if e.op == "==" else e.op
        return f"{spec.short}{op}{_fmt_value(e.field, e.value)}"
    if isinstance(e, Contains):
        return f"{BY_NAME[e.field].short}~{_fmt_text(e.value)}"
    if isinstance(e, In):
        vals = ", ".join(_fmt_value(e.field, v) for v in e.values)
        return f"{BY_NAME[e.field].short} in [{vals}]"
    if isinstance(e, Between):
        lo, hi = _fmt_value(e.field, e.lo), _fmt_value(e.field, e.hi)
        return f"{BY_NAME[e.field].short}={lo}..{hi}"
    if isinstance(e, Flag):
        return BY_NAME[e.field].short
    if isinstance(e, Not):
        inner = e.expr
        if isinstance(inner, Contains):
            return f"{BY_NAME[inner.field].short}!~{_fmt_text(inner.value)}"
        if isinstance(inner, In):
            return _expr_text(inner).replace(" in [", " not in [", 1)
        if isinstance(inner, And | Or):
            return f"!({_expr_text(inner)})"
        return f"!{_expr_text(inner, 'not')}"
    if isinstance(e, And):
        body = " ".join(_expr_text(i, "and") for i in e.items)
        return f"({body})" if parent in ("or", "not") else body
    if isinstance(e, Or):
        body = " or ".join(_expr_text(i, "or") for i in e.items)
        return f"({body})" if parent in ("and", "not") else body
    raise TypeError(f"not a query expression: {e!r}")


def to_text(query: Query | Expr | None) -> str:
    """The canonical string form; ``parse(to_text(q)) == q``."""
    if query is None:
        return ""
    q = query if isinstance(query, Query) else Query(query)
    parts = []
    if q.where is not None:
        parts.append(_expr_text(q.where))
    if q.sort:
        keys = ",".join(("-" if k.descending else "") + BY_NAME[k.field].short for k in q.sort)
        parts.append(f"sort={keys}")
    if q.limit is not None:
        parts.append(f"limit={q.limit}")
    return " ".join(parts)
