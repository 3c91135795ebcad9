"""Evaluate the IR over offers: compile once to closures, then filter, sort and limit.

Three-valued logic: a comparison on a value the provider did not report (None) is *unknown*;
``and``/``or``/``not`` follow Kleene's rules and an offer is kept only when the whole filter is
*true*. So ``vram>=80`` and ``!(vram>=80)`` both drop an offer whose VRAM is unknown.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable
from functools import lru_cache
from typing import Any

from broker import catalog
from broker.query.fields import BY_NAME, Kind
from broker.query.ir import (
    And,
    Between,
    Cmp,
    Contains,
    Expr,
    Flag,
    In,
    Not,
    Or,
    Query,
    SortKey,
    as_expr,
)
from broker.types import STOCK_RANK as _STOCK_RANK
from broker.types import GPUOffer

Tri = bool | None
Pred = Callable[[GPUOffer], Tri]

_OPS: dict[str, Callable[[Any, Any], bool]] = {
    "==": operator.eq,
    "!=": operator.ne,
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
}


@lru_cache(maxsize=4096)
def version_tuple(v: str) -> tuple[int, ...]:
    """``"12.4"`` → ``(12, 4)`` so that 12.10 > 12.4; trailing zeros do not count (12.4.0 ==
    12.4, 12.0 == 12)."""
    parts = [int(p) for p in v.split(".")]
    while len(parts) > 1 and parts[-1] == 0:
        parts.pop()
    return tuple(parts)


def _getter(field: str) -> Callable[[GPUOffer], Any]:
    """A function returning the field's comparable value (None when unknown)."""
    kind = BY_NAME[field].kind
    get = operator.attrgetter(field)
    if kind is Kind.VERSION:
        return lambda o: None if (v := get(o)) is None else version_tuple(v)
    if kind is Kind.ORDERED_ENUM:
        return lambda o: None if (v := get(o)) is None else _STOCK_RANK[v]
    if kind is Kind.TEXT:
        return lambda o: None if (v := get(o)) is None else v.lower()
    if kind is Kind.ENUM:
        return lambda o: None if (v := get(o)) is None else str(v)
    return get


def _const(field: str, value: Any) -> Any:
    kind = BY_NAME[field].kind
    if kind is Kind.VERSION:
        return version_tuple(value)
    if kind is Kind.ORDERED_ENUM:
        return _STOCK_RANK[value]
    if kind is Kind.TEXT:
        return value.lower()
    return value


def _gpu_eq(text: str) -> Pred:
    return lambda o: catalog.name_matches(text, o.gpu_type, o.gpu_provider_name)


def compile_expr(expr: Expr) -> Pred:
    """Turn an expression into a function offer → True / False / None (unknown)."""
    if not isinstance(expr, Cmp | Contains | In | Between | Flag | Not | And | Or):
        expr = as_expr(expr)  # a bare boolean field such as F.spot
    if isinstance(expr, Cmp):
        if BY_NAME[expr.field].kind is Kind.GPU_NAME:
            eq = _gpu_eq(str(expr.value))
            return eq if expr.op == "==" else (lambda o: not eq(o))
        get, op, c = _getter(expr.field), _OPS[expr.op], _const(expr.field, expr.value)

        def cmp_pred(o: GPUOffer) -> Tri:
            v = get(o)
            return None if v is None else op(v, c)

        return cmp_pred
    if isinstance(expr, Contains):
        text = expr.value
        if BY_NAME[expr.field].kind is Kind.GPU_NAME:
            return lambda o: catalog.name_contains(text, o.gpu_type, o.gpu_provider_name)
        get, low = _getter(expr.field), text.lower()
        return lambda o: None if (v := get(o)) is None else low in v
    if isinstance(expr, In):
        return compile_expr(Or(tuple(Cmp(expr.field, "==", v) for v in expr.values)))
    if isinstance(expr, Between):
        get = _getter(expr.field)
        lo, hi = _const(expr.field, expr.lo), _const(expr.field, expr.hi)
        return lambda o: None if (v := get(o)) is None else lo <= v <= hi
    if isinstance(expr, Flag):
        get = _getter(expr.field)
        return lambda o: None if (v := get(o)) is None else bool(v)
    if isinstance(expr, Not):
        inner = compile_expr(expr.expr)
        return lambda o: None if (r := inner(o)) is None else not r
    if isinstance(expr, And):
        preds = [compile_expr(e) for e in expr.items]

        def and_pred(o: GPUOffer) -> Tri:
            result: Tri = True
            for p in preds:
                r = p(o)
                if r is False:
                    return False
                if r is None:
                    result = None
            return result

        return and_pred
    if isinstance(expr, Or):
        preds = [compile_expr(e) for e in expr.items]

        def or_pred(o: GPUOffer) -> Tri:
            result: Tri = False
            for p in preds:
                r = p(o)
                if r is True:
                    return True
                if r is None:
                    result = None
            return result

        return or_pred
    raise TypeError(f"not a query expression: {expr!r}")


def matches(expr: Expr | None, offer: GPUOffer) -> bool:
    """Whether one offer satisfies the filter (unknown counts as no)."""
    return expr is None or compile_expr(expr)(offer) is True


def filter_offers(expr: Expr | None, offers: Iterable[GPUOffer]) -> list[GPUOffer]:
    """Offers for which the filter is true."""
    if expr is None:
        return list(offers)
    pred = compile_expr(expr)
    return [o for o in offers if pred(o) is True]


DEFAULT_SORT = (SortKey("price_per_hour"),)


def sort_offers(offers: list[GPUOffer], keys: Iterable[SortKey]) -> list[GPUOffer]:
    """Stable multi-key sort; unknown values go last whatever the direction."""
    out = list(offers)
    for key in reversed(tuple(keys)):
        get = _getter(key.field)
        if BY_NAME[key.field].kind is Kind.GPU_NAME:
            get = lambda o: o.gpu_type.lower()  # noqa: E731
        known = [o for o in out if get(o) is not None]
        unknown = [o for o in out if get(o) is None]
        known.sort(key=get, reverse=key.descending)
        out = known + unknown
    return out


def run_query(query: Query | Expr | None, offers: Iterable[GPUOffer]) -> list[GPUOffer]:
    """Filter, sort (by price when no order is given) and limit."""
    if not isinstance(query, Query):
        query = Query(query)
    kept = filter_offers(query.where, offers)
    kept = sort_offers(kept, query.sort or DEFAULT_SORT)
    return kept[: query.limit] if query.limit is not None else kept
