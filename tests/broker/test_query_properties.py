"""Property tests: the compiled evaluator equals a plain Python filter; the string form round-trips."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from broker import catalog
from broker.query import filter_offers, parse, to_text
from broker.query.fields import BY_NAME
from broker.query.ir import And, Between, Cmp, Contains, Expr, Flag, In, Not, Or, Query, SortKey
from broker.types import CloudType, GPUOffer, Manufacturer, StockLevel

GPU_NAMES = ["H100 SXM 80GB", "H100 PCIe 80GB", "A100 SXM 80GB", "RTX 4090 24GB", "Odd GPU"]
QUERY_GPU_NAMES = ["H100", "A100", "a100 80gb", "RTX 4090", "NVIDIA H100 80GB HBM3", "odd"]
PROVIDERS = ["runpod", "vast", "lambdalabs", "primeintellect"]
REGIONS = ["us-east", "eu-west", "CA"]

maybe = st.none

offers_st = st.builds(
    GPUOffer,
    provider=st.sampled_from(PROVIDERS),
    offer_id=st.text("abc123", min_size=1, max_size=4),
    gpu_type=st.sampled_from(GPU_NAMES),
    gpu_provider_name=st.sampled_from(["x", "NVIDIA H100 80GB HBM3", "A100 SXM4"]),
    manufacturer=st.sampled_from(list(Manufacturer)),
    gpu_known=st.booleans(),
    gpu_count=st.integers(0, 8),
    vram_gb=maybe() | st.sampled_from([24.0, 40.0, 48.0, 80.0, 141.0]),
    vcpus=maybe() | st.integers(1, 64).map(float),
    ram_gb=maybe() | st.floats(1, 2000, allow_nan=False),
    disk_gb=maybe() | st.floats(1, 5000, allow_nan=False),
    price_per_hour=st.floats(0, 50, allow_nan=False),
    spot=st.booleans(),
    cloud_type=maybe() | st.sampled_from(list(CloudType)),
    region=maybe() | st.sampled_from(REGIONS),
    cuda_version=maybe() | st.sampled_from(["11.8", "12.4", "12.10", "13.0"]),
    compute_capability=maybe() | st.sampled_from(["8.0", "8.6", "9.0"]),
    stock=maybe() | st.sampled_from(list(StockLevel)),
    source=st.just("hypothesis"),
)

NUM_FIELDS = {
    "gpu_count": st.integers(0, 8),
    "vram_gb": st.sampled_from([24.0, 40.0, 80.0, 100.5]),
    "total_vram_gb": st.sampled_from([80.0, 160.0, 320.0]),
    "price_per_hour": st.floats(0, 50, allow_nan=False).map(lambda x: round(x, 3)),
    "price_per_gpu_hour": st.sampled_from([0.5, 1.0, 2.25]),
    "vcpus": st.sampled_from([4.0, 16.0, 32.0]),
    "ram_gb": st.sampled_from([16.0, 128.0, 1024.0]),
    "disk_gb": st.sampled_from([50.0, 500.0]),
}
OPS = st.sampled_from(["==", "!=", "<", "<=", ">", ">="])


@st.composite
def atoms(draw: st.DrawFn) -> Expr:
    kind = draw(st.integers(0, 9))
    if kind <= 2:
        f = draw(st.sampled_from(sorted(NUM_FIELDS)))
        v = draw(NUM_FIELDS[f])
        return Cmp(f, draw(OPS), v)
    if kind == 3:
        f = draw(st.sampled_from(sorted(NUM_FIELDS)))
        a, b = sorted([draw(NUM_FIELDS[f]), draw(NUM_FIELDS[f])])
        return Between(f, a, b)
    if kind == 4:
        return Cmp(
            "gpu_type", draw(st.sampled_from(["==", "!="])), draw(st.sampled_from(QUERY_GPU_NAMES))
        )
    if kind == 5:
        return Contains(
            draw(st.sampled_from(["gpu_type", "region"])),
            draw(st.sampled_from(["H1", "us", "rtx", "4090"])),
        )
    if kind == 6:
        return In(
            "provider", tuple(draw(st.lists(st.sampled_from(PROVIDERS), min_size=1, max_size=3)))
        )
    if kind == 7:
        return Cmp("manufacturer", "==", draw(st.sampled_from([m.value for m in Manufacturer])))
    if kind == 8:
        return Cmp(
            draw(st.sampled_from(["cuda_version", "compute_capability"])),
            draw(OPS),
            draw(st.sampled_from(["8.0", "9.0", "12.4", "12.10"])),
        )
    return Flag("spot")


exprs = st.recursive(
    atoms(),
    lambda sub: st.one_of(
        sub.map(lambda e: e if isinstance(e, Not) else Not(e)),
        st.lists(sub, min_size=2, max_size=3).map(lambda xs: And(tuple(_flat(xs, And)))),
        st.lists(sub, min_size=2, max_size=3).map(lambda xs: Or(tuple(_flat(xs, Or)))),
    ),
    max_leaves=8,
)


def _flat(xs: list[Expr], cls: type) -> list[Expr]:
    out: list[Expr] = []
    for x in xs:
        out.extend(x.items if isinstance(x, cls) else [x])  # type: ignore[attr-defined]
    return out


# -- a deliberately plain reference evaluator (Kleene logic spelled out) --------------------------


def _ver(v: str) -> tuple[int, ...]:
    return tuple(int(p) for p in v.split("."))


def _value(o: GPUOffer, field: str) -> Any:
    return getattr(o, field)


def ref(e: Expr, o: GPUOffer) -> bool | None:
    if isinstance(e, Cmp):
        if e.field == "gpu_type":
            m = catalog.name_matches(str(e.value), o.gpu_type, o.gpu_provider_name)
            return m if e.op == "==" else not m
        v = _value(o, e.field)
        if v is None:
            return None
        c: Any = e.value
        if e.field in ("cuda_version", "compute_capability"):
            v, c = _ver(v), _ver(str(c))
        if e.field == "manufacturer":
            v = v.value
        if e.op == "==":
            return bool(v == c)
        if e.op == "!=":
            return bool(v != c)
        if e.op == "<":
            return bool(v < c)
        if e.op == "<=":
            return bool(v <= c)
        if e.op == ">":
            return bool(v > c)
        return bool(v >= c)
    if isinstance(e, Between):
        v = _value(o, e.field)
        return None if v is None else bool(e.lo <= v <= e.hi)  # type: ignore[operator]
    if isinstance(e, Contains):
        if e.field == "gpu_type":
            return catalog.name_contains(e.value, o.gpu_type, o.gpu_provider_name)
        v = _value(o, e.field)
        return None if v is None else e.value.lower() in v.lower()
    if isinstance(e, In):
        return o.provider in e.values
    if isinstance(e, Flag):
        return bool(_value(o, e.field))
    if isinstance(e, Not):
        r = ref(e.expr, o)
        return None if r is None else not r
    if isinstance(e, And):
        rs = [ref(x, o) for x in e.items]
        if False in rs:
            return False
        return None if None in rs else True
    if isinstance(e, Or):
        rs = [ref(x, o) for x in e.items]
        if True in rs:
            return True
        return None if None in rs else False
    raise AssertionError(e)


@settings(max_examples=300, deadline=None)
@given(expr=exprs, offers=st.lists(offers_st, max_size=12))
def test_evaluator_equals_plain_python_filter(expr: Expr, offers: list[GPUOffer]) -> None:
    expected = [o for o in offers if ref(expr, o) is True]
    assert filter_offers(expr, offers) == expected


@settings(max_examples=300, deadline=None)
@given(
    expr=exprs,
    sort=st.lists(st.sampled_from(sorted(BY_NAME)), max_size=2, unique=True),
    desc=st.booleans(),
    limit=st.none() | st.integers(1, 50),
)
def test_string_form_round_trips(
    expr: Expr, sort: list[str], desc: bool, limit: int | None
) -> None:
    q = Query(expr, tuple(SortKey(f, desc) for f in sort), limit)
    text = to_text(q)
    again = parse(text)
    assert again == q, text
    assert to_text(again) == text


# -- exact round trip, any number ----------------------------------------------------------------

FLOAT_FIELDS = sorted(f for f, s in BY_NAME.items() if s.kind.value == "float")
any_float = st.floats(allow_nan=False, allow_infinity=False, width=64)
TEXT = st.text(st.sampled_from("aZ09 _-.:/\"'\\~!=<>()[],|&$"), min_size=1, max_size=12).filter(
    lambda t: t.strip() == t and t != ""
)


@st.composite
def exact_atoms(draw: st.DrawFn) -> Expr:
    kind = draw(st.integers(0, 4))
    if kind == 0:
        return Cmp(draw(st.sampled_from(FLOAT_FIELDS)), draw(OPS), draw(any_float))
    if kind == 1:
        f = draw(st.sampled_from(FLOAT_FIELDS))
        lo, hi = sorted([draw(any_float), draw(any_float)])
        return Between(f, lo, hi)
    if kind == 2:
        return Cmp("gpu_count", draw(OPS), draw(st.integers(-(10**30), 10**30)))
    if kind == 3:
        return Cmp(draw(st.sampled_from(["region", "datacenter", "gpu_type"])), "==", draw(TEXT))
    return Contains(draw(st.sampled_from(["region", "gpu_type"])), draw(TEXT))


exact_exprs = st.recursive(
    exact_atoms(),
    lambda sub: st.one_of(
        sub.map(lambda e: e if isinstance(e, Not) else Not(e)),
        st.lists(sub, min_size=2, max_size=3).map(lambda xs: And(tuple(_flat(xs, And)))),
        st.lists(sub, min_size=2, max_size=3).map(lambda xs: Or(tuple(_flat(xs, Or)))),
    ),
    max_leaves=5,
)


@settings(max_examples=300, deadline=None)
@given(expr=exact_exprs)
def test_round_trip_is_exact_for_any_number_and_text(expr: Expr) -> None:
    """Floats of any size and precision (1e-05, 0.1+0.2, -3.5, 1e300), huge integers, quotes."""
    q = Query(expr)
    text = to_text(q)
    assert parse(text) == q, text


def test_round_trip_examples_from_the_audit() -> None:
    for v in (1e-05, 0.1 + 0.2, 1e300, -2.5, 5e-324, 123456789.123456789):
        q = Query(Cmp("price_per_hour", "<=", v))
        assert parse(to_text(q)) == q, to_text(q)


def _reference_sort(offers: list[GPUOffer], keys: list[SortKey]) -> list[GPUOffer]:
    """Stable sorts from the last key to the first, unknown values last in either direction."""
    out = list(offers)
    for k in reversed(keys):
        get = (lambda o, f=k.field: o.gpu_type.lower()) if k.field == "gpu_type" else None
        if get is None:

            def get(o: GPUOffer, f: str = k.field) -> Any:
                v = getattr(o, f)
                if f == "stock" and v is not None:
                    return v.rank
                if f in ("cuda_version", "compute_capability") and v is not None:
                    return _ver(v)
                return v.lower() if isinstance(v, str) and f in ("provider", "region") else v

        known = [o for o in out if get(o) is not None]
        unknown = [o for o in out if get(o) is None]
        known.sort(key=get, reverse=k.descending)
        out = known + unknown
    return out


@settings(max_examples=200, deadline=None)
@given(
    offers=st.lists(offers_st, max_size=15),
    fields=st.lists(
        st.sampled_from(
            ["price_per_hour", "vram_gb", "gpu_count", "ram_gb", "stock", "provider", "region"]
        ),
        min_size=1,
        max_size=3,
        unique=True,
    ),
    desc=st.lists(st.booleans(), min_size=3, max_size=3),
    limit=st.none() | st.integers(1, 20),
)
def test_sort_equals_the_reference(
    offers: list[GPUOffer], fields: list[str], desc: list[bool], limit: int | None
) -> None:
    from broker.query import sort_offers

    keys = [SortKey(f, d) for f, d in zip(fields, desc, strict=False)]
    expected = _reference_sort(offers, keys)
    if limit is not None:
        expected = expected[:limit]
    assert sort_offers(offers, keys, limit) == expected
