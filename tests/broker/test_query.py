"""The query language: string form, builder, evaluation semantics, errors."""

from __future__ import annotations

import pytest

from broker import GPUClient, QueryError
from broker.query import F as c
from broker.query import Query, SortKey, hints, parse, run_query, to_text
from broker.query.ir import And, Between, Cmp, Contains, Flag, In, Not, Or
from broker.types import GPUOffer, Manufacturer


def offer(**kw: object) -> GPUOffer:
    base: dict[str, object] = {
        "provider": "runpod",
        "offer_id": "x",
        "gpu_type": "H100 SXM 80GB",
        "gpu_provider_name": "NVIDIA H100 80GB HBM3",
        "manufacturer": Manufacturer.NVIDIA,
        "gpu_known": True,
        "gpu_count": 1,
        "vram_gb": 80.0,
        "price_per_hour": 2.5,
        "source": "test",
    }
    base.update(kw)
    return GPUOffer(**base)  # type: ignore[arg-type]


CANONICAL = [
    "gpu~H100 gpus>=2 vram>=80GB manufacturer=nvidia price<=6/h !spot",
    "vram=40GB..80GB",
    "gpu in [A100, H100]",
    "(gpu~H100 or gpu~A100) gpus>=2 sort=price,-vram limit=10",
    'gpu="A100 80GB" gpus=2 price<=4/h',
    "cuda>=12.4 cc>=8.0 stock>=medium cloud=secure",
    "gpu!~4090 provider not in [vast]",
    "!(gpus=1 spot) region~us",
    "gpu_price<=1.5/h total_vram>=160GB ram>=64GB disk>=200GB vcpus>=16",
    "spot",
]


@pytest.mark.parametrize("text", CANONICAL)
def test_canonical_text_round_trips(text: str) -> None:
    q = parse(text)
    assert to_text(q) == text
    assert parse(to_text(q)) == q


def test_builder_and_string_give_the_same_ir() -> None:
    built = (
        c.gpu_type.contains("H100")
        & (c.gpu_count >= 2)
        & (c.vram_gb >= 80)
        & (c.manufacturer == "nvidia")
        & (c.price_per_hour <= 6)
        & ~c.spot
    )
    assert parse("gpu~H100 gpus>=2 vram>=80GB manufacturer=nvidia price<=6/h !spot").where == built
    assert parse("gpu in [A100, H100]").where == c.gpu_type.isin(["A100", "H100"])
    assert parse("vram=40..80").where == c.vram_gb.between(40, 80)
    assert parse("spot or gpus>=8").where == (c.spot | (c.gpu_count >= 8))
    # The client exposes the same fields.
    client = GPUClient.__new__(GPUClient)
    assert (client.gpu_count >= 2) == (c.gpu_count >= 2)


def test_ir_shapes_and_normalisation() -> None:
    assert parse("gpus>=2").where == Cmp("gpu_count", ">=", 2)
    assert parse("spot=false").where == Not(Flag("spot"))
    assert parse("spot=true").where == Flag("spot")
    assert parse("!!spot").where == Flag("spot")
    assert parse("manufacturer=NVIDIA").where == Cmp("manufacturer", "==", "nvidia")
    assert parse("vendor=Nvidia").where == Cmp("manufacturer", "==", "nvidia")
    assert parse("provider=RunPod").where == Cmp("provider", "==", "runpod")
    assert parse("gpus=1 and gpus=2 & gpus=3").where == And(
        (Cmp("gpu_count", "==", 1), Cmp("gpu_count", "==", 2), Cmp("gpu_count", "==", 3))
    )
    assert parse("gpus=1 | gpus=2 or gpus=3").where == Or(
        (Cmp("gpu_count", "==", 1), Cmp("gpu_count", "==", 2), Cmp("gpu_count", "==", 3))
    )
    assert parse("gpu~'RTX 4090'").where == Contains("gpu_type", "RTX 4090")
    assert parse("gpus in [1, 2]").where == In("gpu_count", (1, 2))
    assert parse("cc=8.0..9.0").where == Between("compute_capability", "8.0", "9.0")
    assert parse("sort=-price,vram").sort == (
        SortKey("price_per_hour", True),
        SortKey("vram_gb", False),
    )


@pytest.mark.parametrize(
    ("text", "gb"),
    [
        ("vram>=80GB", 80),
        ("vram>=80", 80),
        ("vram>=1TB", 1000),
        ("vram>=512MB", 0.512),
        ("vram>=80GiB", 85.89934592),
        ("ram>=2TiB", 2199.023255552),
        ("disk>=0.5tb", 500),
    ],
)
def test_size_units_normalise_to_gb(text: str, gb: float) -> None:
    where = parse(text).where
    assert isinstance(where, Cmp)
    assert where.value == pytest.approx(gb)


@pytest.mark.parametrize(
    "text", ["price<=6/h", "price<=$6", "price<=$6/h", "price<=6", "price<=6/hr"]
)
def test_price_units(text: str) -> None:
    assert parse(text).where == Cmp("price_per_hour", "<=", 6.0)


def test_precedence_not_then_and_then_or() -> None:
    q = parse("!spot gpus=1 or gpus=8")
    assert q.where == Or(
        (And((Not(Flag("spot")), Cmp("gpu_count", "==", 1))), Cmp("gpu_count", "==", 8))
    )


MALFORMED = [
    ("vrma>=80", "unknown field 'vrma' at column 1; did you mean 'vram'?"),
    ("gpus>=2 prcie<=3", "unknown field 'prcie' at column 9; did you mean 'price'?"),
    ("vram>=80XB", "unknown unit 'XB' for vram at column 9"),
    ("price<=6GB", "unit 'GB' does not apply to price (use a price unit such as /h or $/h)"),
    ("vram>=6/h", "unit '/h' does not apply to vram (use a size unit such as GB, GiB or TB)"),
    ("gpus>=2.5", "gpus needs a whole number, got '2.5' at column 7"),
    ("gpus>=two", "gpus needs a number, got 'two' at column 7"),
    ("(gpu~H100", "missing ')' to close the '(' at column 1; found end of query at column 10"),
    ("gpu~H100)", "unbalanced ')' at column 9"),
    ("gpu in [A100", "missing ']' to close the list at column 8; found end of query"),
    ("gpu in []", "gpu in [] is empty; give at least one value"),
    (
        "manufacturer=nvdia",
        "unknown manufacturer 'nvdia' (one of: nvidia, amd, intel, none, unknown) at column 14; did you mean 'nvidia'?",
    ),
    ("vram=80..40", "vram range is empty: 80..40 (low end above high end) at column 6"),
    ("vram>=40..80", "a range lo..hi needs '=', not '>=' at column 5"),
    ("spot>=1", "spot is true or false; use spot or !spot at column 7"),
    ("gpus>=", "gpus>= needs a value, found end of query at column 7"),
    (
        "gpus",
        "gpus needs an operator (= != < <= > >= ~ in) and a value; found end of query at column 5",
    ),
    ("sort=prcie", "unknown sort field 'prcie' at column 6; did you mean 'price'?"),
    ("limit=0", "limit needs a positive whole number, got '0' at column 7"),
    ("limit=3 limit=4", "limit= given twice at column 9"),
    ("gpu~H100 or", "'or' needs a condition on both sides at column 10"),
    ("and gpus>=1", "'and' needs a condition on both sides at column 1"),
    (
        "stock>=lots",
        "unknown stock 'lots' (one of: none, low, medium, high) at column 8; did you mean 'low'?",
    ),
    ("gpu>H100", "gpu cannot be compared with '>'; use = != ~ or in [...] at column 5"),
    ('gpu="H100', "unclosed quote at column 5"),
    ("vram~80", "vram is not text; '~' works on gpu, provider, region, ... at column 6"),
    ("()", "empty parentheses at column 2"),
    ("(gpus=1 sort=price)", "sort= must be at the top level, not inside ( ) at column 9"),
    ("cuda>=twelve", "cuda needs a version like 12.4, got 'twelve' at column 7"),
    (
        "cloud=secrue",
        "unknown cloud 'secrue' (one of: secure, community, local) at column 7; did you mean 'secure'?",
    ),
]


@pytest.mark.parametrize(("text", "message"), MALFORMED)
def test_malformed_queries_get_specific_errors(text: str, message: str) -> None:
    with pytest.raises(QueryError) as ei:
        parse(text)
    assert message in str(ei.value)
    assert ei.value.column is not None


def test_error_caret_points_at_the_column() -> None:
    with pytest.raises(QueryError) as ei:
        parse("gpus>=2 vrma>=80")
    assert ei.value.caret().splitlines() == ["gpus>=2 vrma>=80", "        ^"]


def test_builder_errors_are_specific() -> None:
    with pytest.raises(QueryError, match="gpus needs a whole number, got 'two'"):
        _ = c.gpu_count >= "two"
    with pytest.raises(QueryError, match="no truth value"):
        _ = (c.gpu_count >= 2) and (c.vram_gb >= 80)
    with pytest.raises(QueryError, match="not a true/false field"):
        _ = ~c.vram_gb
    with pytest.raises(QueryError, match="in \\[\\] is empty"):
        c.gpu_type.isin([])


# -- evaluation semantics ------------------------------------------------------------------------


def test_unknown_values_never_match_either_way() -> None:
    o = offer(vram_gb=None)
    assert run_query(parse("vram>=80"), [o]) == []
    assert run_query(parse("!(vram>=80)"), [o]) == []
    assert run_query(parse("vram>=80 or gpus=1"), [o]) == [o]


def test_gpu_names_match_through_aliases_case_insensitively() -> None:
    h100 = offer()
    pcie = offer(gpu_type="H100 PCIe 80GB", gpu_provider_name="NVIDIA H100 PCIe", offer_id="p")
    a100 = offer(gpu_type="A100 SXM 80GB", gpu_provider_name="A100 SXM4", offer_id="a")
    odd = offer(
        gpu_type="Mystery X1", gpu_provider_name="Mystery X1", gpu_known=False, offer_id="m"
    )
    offers = [h100, pcie, a100, odd]
    assert run_query(parse("gpu=h100"), offers) == [h100, pcie]
    assert run_query(parse("gpu='NVIDIA H100 80GB HBM3'"), offers) == [h100]
    assert run_query(parse("gpu='H100 pcie'"), offers) == [pcie]
    assert run_query(parse("gpu=a100-80gb"), offers) == [a100]
    assert run_query(parse("gpu~mystery"), offers) == [odd]
    assert run_query(parse("gpu!=H100"), offers) == [a100, odd]


def test_manufacturer_is_normalised_once() -> None:
    nv = offer()
    amd = offer(gpu_type="MI300X 192GB", manufacturer=Manufacturer.AMD, offer_id="amd")
    for spelling in ("nvidia", "NVIDIA", "Nvidia"):
        assert run_query(parse(f"manufacturer={spelling}"), [nv, amd]) == [nv]
    assert run_query(c.manufacturer == "AMD", [nv, amd]) == [amd]  # type: ignore[arg-type]


def test_price_per_gpu_vs_per_instance() -> None:
    o = offer(gpu_count=4, price_per_hour=8.0)
    assert o.price_per_gpu_hour == 2.0
    assert run_query(parse("gpu_price<=2/h"), [o]) == [o]
    assert run_query(parse("price<=2/h"), [o]) == []


def test_versions_compare_numerically() -> None:
    old = offer(cuda_version="12.4", offer_id="old")
    new = offer(cuda_version="12.10", offer_id="new")
    assert run_query(parse("cuda>=12.5"), [old, new]) == [new]


def test_stock_is_ordered() -> None:
    from broker.types import StockLevel

    lo = offer(stock=StockLevel.LOW, offer_id="lo")
    hi = offer(stock=StockLevel.HIGH, offer_id="hi")
    unknown = offer(stock=None, offer_id="u")
    assert run_query(parse("stock>=medium"), [lo, hi, unknown]) == [hi]


def test_sort_and_limit_with_unknowns_last() -> None:
    a = offer(offer_id="a", price_per_hour=3.0, vram_gb=40)
    b = offer(offer_id="b", price_per_hour=1.0, vram_gb=None)
    d = offer(offer_id="d", price_per_hour=2.0, vram_gb=80)
    assert run_query(parse(""), [a, b, d]) == [b, d, a]  # default: cheapest first
    assert run_query(parse("sort=-vram"), [a, b, d]) == [d, a, b]
    assert run_query(parse("sort=vram"), [a, b, d]) == [a, d, b]
    assert run_query(parse("sort=-price limit=2"), [a, b, d]) == [a, d]


def test_pushdown_hints_only_from_top_level_conjuncts() -> None:
    h = hints(parse("gpu~A100 gpus>=2 vram>=80GB price<=4/h !spot"))
    assert (h.gpu_count_min, h.vram_gb_min, h.price_per_hour_max, h.spot) == (2, 80.0, 4.0, False)
    # gpu~ is a substring match (gpu~L4 is also L40S): kept apart from exact names.
    assert h.gpu_names is None and h.gpu_substrings == ("A100",)
    assert set(hints(parse("gpu=A100")).canonical_gpus() or ()) == {
        "A100 SXM 80GB",
        "A100 PCIe 80GB",
        "A100 SXM 40GB",
        "A100 PCIe 40GB",
    }
    # Inside an 'or' nothing may be pushed down: each branch could match without it.
    h2 = hints(parse("gpus>=2 or vram>=80"))
    assert h2.gpu_count_min is None and h2.vram_gb_min is None
    assert hints(parse("gpus=2")).gpu_count_max == 2
    assert hints(parse("gpus<4")).gpu_count_max == 3
    assert not hints(parse("provider=vast")).allows_provider("runpod")


def test_query_object_helpers() -> None:
    q = Query().and_where(c.gpu_count >= 2).sorted_by("-vram", "price").take(3)
    assert to_text(q) == "gpus>=2 sort=-vram,price limit=3"
    with pytest.raises(QueryError, match="limit must be a positive integer"):
        Query(limit=0)


def test_versions_compare_numerically_ignoring_trailing_zeros() -> None:
    a = offer(offer_id="a", cuda_version="12.4")
    b = offer(offer_id="b", cuda_version="12.10")
    d = offer(offer_id="d", cuda_version="12.4.0")
    assert run_query(parse("cuda=12.4.0"), [a, b, d]) == [a, d]
    assert run_query(parse("cuda=12.4"), [a, b, d]) == [a, d]
    assert run_query(parse("cuda>12.4.0"), [a, b, d]) == [b]
    assert run_query(parse("cuda in [12.4.0]"), [a, b]) == [a]


def test_bare_boolean_field_is_a_query_everywhere() -> None:
    from broker.query import filter_offers, matches

    s = offer(offer_id="s", spot=True)
    o = offer(offer_id="o", spot=False)
    assert Query(c.spot) == Query(Flag("spot")) == parse("spot")
    assert run_query(c.spot, [s, o]) == [s]
    assert filter_offers(c.spot, [s, o]) == [s]
    assert matches(c.spot, s) and not matches(c.spot, o)
    assert to_text(c.spot) == "spot" and str(Query(c.spot)) == "spot"
    assert hints(c.spot).spot is True
    assert Query().and_where(c.spot) == Query(Flag("spot"))  # type: ignore[arg-type]
    assert Query(c.gpu_count >= 2).and_where(c.spot).where == And(  # type: ignore[arg-type]
        (Cmp("gpu_count", ">=", 2), Flag("spot"))
    )
    with pytest.raises(QueryError, match="not a true/false field"):
        Query(c.gpu_count)  # type: ignore[arg-type]


def test_gpu_name_typo_gets_a_did_you_mean() -> None:
    with pytest.raises(QueryError) as e:
        parse("gpu=A1OO")
    assert e.value.suggestion == "A100" and "did you mean 'A100'" in str(e.value)
    assert e.value.column == 5
    with pytest.raises(QueryError, match="did you mean 'H100'"):
        parse("gpu~H1OO")
    with pytest.raises(QueryError, match="did you mean 'A100'"):
        c.gpu_type == "A1OO"  # noqa: B015 - the builder checks the name too
    # Names the catalog does not know are still fine (new GPUs, providers' own spellings).
    assert parse("gpu=B300").where == Cmp("gpu_type", "==", "B300")
    assert parse("gpu='Quantum Q1'").where == Cmp("gpu_type", "==", "Quantum Q1")


def test_ir_imports_neither_builder_nor_parser() -> None:
    """The IR is the bottom layer: builder and parser import it, never the other way round."""
    import ast
    import inspect

    from broker.query import ir

    tree = ast.parse(inspect.getsource(ir))
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module} | {
        a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names
    }
    assert not {
        m for m in imported if m.startswith(("broker.query.builder", "broker.query.parser"))
    }
