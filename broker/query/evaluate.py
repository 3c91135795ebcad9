"""Evaluate the IR over offers: compile once to closures, then filter, sort and limit.

Three-valued logic: a comparison on a value the provider did not report (None) is *unknown*;
``and``/``or``/``not`` follow Kleene's rules and an offer is kept only when the whole filter is
*true*. So ``vram>=80`` and ``!(vram>=80)`` both drop an offer whose VRAM is unknown.
"""

from __future__ import annotations

import heapq
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


# -- the fast path: one generated predicate per filter ---------------------------------------------
#
# filter_offers only needs "is the filter *true* for this offer". Kleene's logic gives that exactly
# from two two-valued functions per node: T(e) "e is certainly true" and F(e) "e is certainly
# false" (T(not e) = F(e), T(a and b) = T(a) and T(b), F(a and b) = F(a) or F(b), ...), where an
# atom on an unknown (None) value is neither. Both are emitted as one Python expression over the
# offer's attributes and compiled once, so filtering 100k offers costs one call per offer instead
# of a tree of closures. Constants travel in the evaluation namespace, never in the source text.

#: Fields a GPUOffer always has (no None check needed).
_ALWAYS = frozenset(
    {
        "provider",
        "gpu_type",
        "gpu_count",
        "manufacturer",
        "price_per_hour",
        "price_per_gpu_hour",
        "spot",
    }
)
_PY_OPS = {"==": "==", "!=": "!=", "<": "<", "<=": "<=", ">": ">", ">=": ">="}


class _Gen:
    def __init__(self) -> None:
        self.env: dict[str, Any] = {"_vt": version_tuple, "_rank": _STOCK_RANK}
        self.n = 0

    def const(self, value: Any) -> str:
        self.n += 1
        name = f"_c{self.n}"
        self.env[name] = value
        return name

    def var(self) -> str:
        self.n += 1
        return f"_v{self.n}"

    def gpu_test(self, text: str, contains: bool, negate: bool = False) -> str:
        """A name test memoised per (gpu_type, provider name): offers repeat a few GPU names.

        The source looks the pair up inline; only a pair not seen yet calls ``fill`` (the dict's
        default), which computes and stores the answer. No Python call per offer otherwise.
        """
        test = catalog.name_contains if contains else catalog.name_matches
        memo: dict[tuple[str, str], bool] = {}

        def fill(o: GPUOffer) -> bool:
            hit = memo[(o.gpu_type, o.gpu_provider_name)] = test(
                text, o.gpu_type, o.gpu_provider_name
            )
            return hit

        m, f, r = self.const(memo), self.const(fill), self.var()
        lookup = f"({r} := {m}.get((o.gpu_type, o.gpu_provider_name), {f}))"
        if negate:
            return f"({lookup} is False or ({r} is {f} and not {f}(o)))"
        return f"({lookup} is True or ({r} is {f} and {f}(o)))"

    # An atom: (source of the known value's test, source of "value is known" or None).
    def atom(self, e: Expr) -> tuple[str, str, str | None]:
        """(T source, F source) pieces: the test on the value, its negation, the known-check."""
        if isinstance(e, Cmp | Contains | In | Between | Flag):
            f = e.field
        else:  # pragma: no cover - callers pass atoms only
            raise TypeError(e)
        kind = BY_NAME[f].kind
        if kind is Kind.GPU_NAME:
            if isinstance(e, Cmp | Contains):
                text, contains = str(e.value), isinstance(e, Contains)
                yes = self.gpu_test(text, contains)
                no = self.gpu_test(text, contains, negate=True)
                if isinstance(e, Cmp) and e.op == "!=":
                    return no, yes, None
                return yes, no, None
            if isinstance(e, In):
                yes = " or ".join(self.gpu_test(str(v), False) for v in e.values)
                no = " and ".join(self.gpu_test(str(v), False, negate=True) for v in e.values)
                return f"({yes})", f"({no})", None
            raise TypeError(e)  # pragma: no cover - parser/builder refuse other GPU conditions
        v = self.var()
        raw = f"({v} := o.{f})"
        known = None if f in _ALWAYS else f"{raw} is not None"
        ref = v if known is not None else f"o.{f}"
        if kind is Kind.VERSION:
            val = f"_vt({ref})"
        elif kind is Kind.ORDERED_ENUM:
            val = f"_rank[{ref}]"
        elif kind is Kind.TEXT:
            val = f"{ref}.lower()"
        else:
            val = ref
        if isinstance(e, Flag):
            return f"bool({val})", f"(not {val})", known
        if isinstance(e, Contains):
            c = self.const(e.value.lower())
            return f"({c} in {val})", f"({c} not in {val})", known
        if isinstance(e, Cmp):
            c = self.const(_const(f, e.value))
            test = f"({val} {_PY_OPS[e.op]} {c})"
            return test, f"(not {test})", known
        if isinstance(e, In):
            c = self.const(frozenset(_const(f, x) for x in e.values))
            return f"({val} in {c})", f"({val} not in {c})", known
        if isinstance(e, Between):
            lo, hi = self.const(_const(f, e.lo)), self.const(_const(f, e.hi))
            test = f"({lo} <= {val} <= {hi})"
            return test, f"(not {test})", known
        raise TypeError(e)  # pragma: no cover

    def tf(self, e: Expr) -> tuple[str, str]:
        """(T(e), F(e)) as Python expression sources over ``o``."""
        if isinstance(e, Not):
            t, f = self.tf(e.expr)
            return f, t
        if isinstance(e, And | Or):
            parts = [self.tf(x) for x in _cheap_first(e.items)]
            ts, fs = [p[0] for p in parts], [p[1] for p in parts]
            if isinstance(e, And):
                return "(" + " and ".join(ts) + ")", "(" + " or ".join(fs) + ")"
            return "(" + " or ".join(ts) + ")", "(" + " and ".join(fs) + ")"
        test, neg, known = self.atom(e)
        if known is None:
            return test, neg
        # The walrus in `known` binds the value that test/neg then read.
        return f"({known} and {test})", f"({known} and {neg})"


def _cost(e: Expr) -> int:
    """Rough evaluation cost, so that cheap numeric tests run first (the result is the same)."""
    if isinstance(e, Not):
        return _cost(e.expr)
    if isinstance(e, And | Or):
        return sum(_cost(x) for x in e.items)
    field = e.field
    kind = BY_NAME[field].kind
    if kind is Kind.GPU_NAME:
        return 8
    if kind in (Kind.VERSION, Kind.TEXT):
        return 4
    return 2 if field in ("total_vram_gb", "price_per_gpu_hour") else 1


def _cheap_first(items: tuple[Expr, ...]) -> list[Expr]:
    return sorted(items, key=_cost)


def _generate(expr: Expr, template: str) -> Any:
    gen = _Gen()
    true_src, _ = gen.tf(expr)
    namespace = dict(gen.env)
    # Our own source: field names from the field table, constants only by name in `namespace`.
    exec(template.format(cond=true_src), namespace)  # noqa: S102
    return namespace["_fn"]


@lru_cache(maxsize=256)
def compile_filter(expr: Expr) -> Callable[[GPUOffer], bool]:
    """One function offer → "the filter is true" (unknown counts as no), generated once."""
    fn: Callable[[GPUOffer], bool] = _generate(expr, "def _fn(o):\n    return bool({cond})\n")
    return fn


@lru_cache(maxsize=256)
def compile_selector(expr: Expr) -> Callable[[Iterable[GPUOffer]], list[GPUOffer]]:
    """One function offers → the offers the filter is true for: the condition is inlined in a
    list comprehension, so no Python call is made per offer."""
    fn: Callable[[Iterable[GPUOffer]], list[GPUOffer]] = _generate(
        expr, "def _fn(offers):\n    return [o for o in offers if {cond}]\n"
    )
    return fn


def matches(expr: Expr | None, offer: GPUOffer) -> bool:
    """Whether one offer satisfies the filter (unknown counts as no)."""
    return expr is None or compile_filter(as_expr(expr))(offer) is True


def filter_offers(expr: Expr | None, offers: Iterable[GPUOffer]) -> list[GPUOffer]:
    """Offers for which the filter is true."""
    if expr is None:
        return list(offers)
    return compile_selector(as_expr(expr))(offers)


DEFAULT_SORT = (SortKey("price_per_hour"),)
_NUMERIC_SORT = frozenset({Kind.INT, Kind.FLOAT, Kind.ORDERED_ENUM})


@lru_cache(maxsize=256)
def _sort_key(keys: tuple[SortKey, ...]) -> Callable[[GPUOffer], Any] | None:
    """One generated key for a single stable sort, when every key is numeric (else None).

    Unknown values sort last in either direction: an optional field contributes (unknown?, ±v),
    a field every offer has just ±v; a single ascending key on such a field is a C attrgetter.
    """
    first = keys[0] if len(keys) == 1 else None
    numeric_first = first is not None and BY_NAME[first.field].kind in (Kind.INT, Kind.FLOAT)
    if first and numeric_first and not first.descending and first.field in _ALWAYS:
        return operator.attrgetter(first.field)
    gen = _Gen()
    parts: list[str] = []
    for k in keys:
        kind = BY_NAME[k.field].kind
        if kind not in _NUMERIC_SORT:
            return None
        sign = "-" if k.descending else ""
        if k.field in _ALWAYS:
            parts.append(f"{sign}o.{k.field}")
            continue
        v = gen.var()
        val = f"_rank[{v}]" if kind is Kind.ORDERED_ENUM else v
        parts.append(f"({v} := o.{k.field}) is None")
        parts.append(f"0 if {v} is None else {sign}{val}")
    namespace = dict(gen.env)
    exec(f"def _fn(o):\n    return ({', '.join(parts)},)\n", namespace)  # noqa: S102
    fn: Callable[[GPUOffer], Any] = namespace["_fn"]
    return fn


def sort_offers(
    offers: list[GPUOffer], keys: Iterable[SortKey], limit: int | None = None
) -> list[GPUOffer]:
    """Stable multi-key sort; unknown values go last whatever the direction; at most ``limit``."""
    keys = tuple(keys)
    key = _sort_key(keys)
    if key is not None:
        if limit is not None and limit < len(offers):
            first = keys[0]
            if first.field in _ALWAYS and BY_NAME[first.field].kind in (Kind.INT, Kind.FLOAT):
                # Only offers up to the limit-th first-key value can make the cut: find it with
                # a C attrgetter, then sort just those (ties included, original order kept, so
                # the result is exactly sorted(...)[:limit]).
                first_key = operator.attrgetter(first.field)
                if first.descending:
                    edge = first_key(heapq.nlargest(limit, offers, key=first_key)[-1])
                    cut = [o for o in offers if first_key(o) >= edge]
                else:
                    edge = first_key(heapq.nsmallest(limit, offers, key=first_key)[-1])
                    cut = [o for o in offers if first_key(o) <= edge]
                return sorted(cut, key=key)[:limit]
            # Same result as sorted(...)[:limit] (heapq documents it), in O(n log limit).
            return heapq.nsmallest(limit, offers, key=key)
        return sorted(offers, key=key)
    out = list(offers)
    for k in reversed(keys):
        get = _getter(k.field)
        if BY_NAME[k.field].kind is Kind.GPU_NAME:
            get = lambda o: o.gpu_type.lower()  # noqa: E731
        known = [o for o in out if get(o) is not None]
        unknown = [o for o in out if get(o) is None]
        known.sort(key=get, reverse=k.descending)
        out = known + unknown
    return out[:limit] if limit is not None else out


def run_query(query: Query | Expr | None, offers: Iterable[GPUOffer]) -> list[GPUOffer]:
    """Filter, sort (by price when no order is given) and limit."""
    if not isinstance(query, Query):
        query = Query(query)
    kept = filter_offers(query.where, offers)
    return sort_offers(kept, query.sort or DEFAULT_SORT, query.limit)
