"""Pushdown never changes a result: for random queries against every adapter's fixtures,
(server-side filters + the local filter) == (no server-side filters + the local filter).

The fixtures are served by fakes that apply the filters the adapters send the way each API
documents them (``tests/broker/provider_fakes.py``); "no pushdown" is the adapter's search for the
empty query, i.e. everything it can list.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import respx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import SecretStr

from broker.providers.base import Provider, provider_classes
from broker.providers.lambdalabs import LambdaProvider
from broker.providers.primeintellect import PrimeIntellectProvider
from broker.providers.runpod import RunPodProvider
from broker.providers.vast import VastProvider
from broker.query import Query, parse, run_query
from broker.query.ir import And, Between, Cmp, Contains, Expr, Flag, In, Not, Or
from broker.types import GPUOffer
from tests.broker.provider_fakes import prime_availability, runpod_gpu_types, vast_bundles

FIXTURES = Path(__file__).parent.parent / "fixtures"


def fx(path: str) -> Any:
    return json.loads((FIXTURES / path).read_text())


PRIME_ITEMS = (
    fx("primeintellect/availability_page1.json")["items"]
    + fx("primeintellect/availability_page2.json")["items"]
    + fx("primeintellect/availability_mixed.json")["items"]
)


def _no_sleep(_: float) -> None:
    return None


def _mock_runpod(router: respx.MockRouter) -> Provider:
    router.post("https://api.runpod.io/graphql").mock(
        side_effect=runpod_gpu_types(fx("runpod/gpu_types.json"))
    )
    return RunPodProvider(SecretStr("k"), sleep=_no_sleep)


def _mock_prime(router: respx.MockRouter) -> Provider:
    router.get(f"{PrimeIntellectProvider.api_url}/availability/gpus").mock(
        side_effect=prime_availability(PRIME_ITEMS)
    )
    return PrimeIntellectProvider(SecretStr("k"), sleep=_no_sleep)


def _mock_vast(router: respx.MockRouter) -> Provider:
    router.post(f"{VastProvider.api_url}/bundles/").mock(
        side_effect=vast_bundles(
            fx("vast/bundles_on_demand.json")["offers"], fx("vast/bundles_bid.json")["offers"]
        )
    )
    return VastProvider(SecretStr("k"), sleep=_no_sleep)


def _mock_lambda(router: respx.MockRouter) -> Provider:
    router.get(f"{LambdaProvider.api_url}/instance-types").mock(
        return_value=httpx.Response(200, json=fx("lambdalabs/instance_types.json"))
    )
    return LambdaProvider(SecretStr("k"), sleep=_no_sleep)


ADAPTERS: dict[str, Callable[[respx.MockRouter], Provider]] = {
    "runpod": _mock_runpod,
    "primeintellect": _mock_prime,
    "vast": _mock_vast,
    "lambdalabs": _mock_lambda,
}


def _ident(offers: list[GPUOffer]) -> list[str]:
    """Offers as comparable text. The quote time differs between two searches, and so may
    ``provider_data`` (Vast records the disk the price was quoted for: the query's disk>=)."""
    return sorted(o.model_dump_json(exclude={"observed_at", "provider_data"}) for o in offers)


def _both(name: str, q: Query) -> tuple[list[str], list[str]]:
    with respx.mock(assert_all_called=False) as router:
        p = ADAPTERS[name](router)
        pushed = run_query(q, p.search(q))
        everything = run_query(q, p.search(Query()))
    return _ident(pushed), _ident(everything)


# -- queries ------------------------------------------------------------------------------------

GPU_NAMES = ["L4", "L40", "A40", "H100", "H100 SXM", "A100 80GB", "RTX 4090", "A4000", "X9000_77GB"]
GPU_TEXT = ["L4", "A40", "H100", "4090", "A100", "RTX", "SXM", "80GB", "X9", "mi300"]
NUMERIC: dict[str, st.SearchStrategy[Any]] = {
    "gpu_count": st.integers(0, 10),
    "vram_gb": st.sampled_from([16.0, 24.0, 40.0, 48.0, 80.0, 100.0, 141.0, 192.0]),
    "total_vram_gb": st.sampled_from([24.0, 48.0, 80.0, 160.0, 640.0]),
    "ram_gb": st.sampled_from([41.0, 64.0, 125.0, 128.876, 251.0, 1000.0]),
    "vcpus": st.sampled_from([6.0, 8.0, 16.0, 32.0, 64.0]),
    "disk_gb": st.sampled_from([50.0, 100.0, 500.0, 1000.0]),
    "price_per_hour": st.sampled_from([0.2, 0.35, 0.712, 1.0, 2.69, 5.98, 20.0]),
    "price_per_gpu_hour": st.sampled_from([0.3, 1.0, 2.5]),
}
OPS = st.sampled_from(["==", "!=", "<", "<=", ">", ">="])


@st.composite
def atoms(draw: st.DrawFn) -> Expr:
    kind = draw(st.integers(0, 11))
    if kind <= 3:
        f = draw(st.sampled_from(sorted(NUMERIC)))
        # gpu_count gets extra weight: RunPod's and Prime's pushdown depend on it.
        f = "gpu_count" if kind == 0 else f
        return Cmp(f, draw(OPS), draw(NUMERIC[f]))
    if kind == 4:
        f = draw(st.sampled_from(sorted(NUMERIC)))
        lo, hi = sorted([draw(NUMERIC[f]), draw(NUMERIC[f])])
        return Between(f, lo, hi)
    if kind == 5:
        vals = draw(st.lists(st.integers(0, 10), min_size=1, max_size=3, unique=True))
        return In("gpu_count", tuple(vals))
    if kind == 6:
        return Cmp(
            "gpu_type", draw(st.sampled_from(["==", "!="])), draw(st.sampled_from(GPU_NAMES))
        )
    if kind == 7:
        return Contains("gpu_type", draw(st.sampled_from(GPU_TEXT)))
    if kind == 8:
        vals = draw(st.lists(st.sampled_from(GPU_NAMES), min_size=1, max_size=3, unique=True))
        return In("gpu_type", tuple(vals))
    if kind == 9:
        return Cmp("cloud_type", "==", draw(st.sampled_from(["secure", "community"])))
    if kind == 10:
        return Cmp("manufacturer", "==", draw(st.sampled_from(["nvidia", "amd"])))
    return Flag("spot")


exprs = st.recursive(
    atoms(),
    lambda sub: st.one_of(
        sub.map(lambda e: e.expr if isinstance(e, Not) else Not(e)),
        st.lists(sub, min_size=2, max_size=3).map(lambda xs: Or(tuple(xs))),
    ),
    max_leaves=4,
)
#: Top level: a conjunction, where pushdown hints come from.
queries = st.lists(exprs, min_size=1, max_size=4).map(
    lambda xs: Query(xs[0] if len(xs) == 1 else And(tuple(xs)))
)


@pytest.mark.parametrize("name", sorted(ADAPTERS))
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(q=queries)
def test_pushdown_never_changes_a_result(name: str, q: Query) -> None:
    pushed, everything = _both(name, q)
    assert pushed == everything, str(q)


@pytest.mark.parametrize(
    ("name", "text"),
    [
        # Prime: gpu~ is a substring, never pushed as an exact type.
        ("primeintellect", "gpu~L4"),
        ("primeintellect", "gpu~A40"),
        ("primeintellect", 'gpu="H100 SXM" gpus=8'),
        ("primeintellect", "gpu=L4 cloud=secure"),
        # RunPod: every count the query can match is fetched.
        ("runpod", "gpus in [8]"),
        ("runpod", "gpus=1 or gpus=8"),
        ("runpod", "gpus>=2 gpus!=2"),
        ("vast", "gpus>=2 ram>=128GB"),
    ],
)
def test_pushdown_cases_from_the_audit(name: str, text: str) -> None:
    pushed, everything = _both(name, parse(text))
    assert pushed == everything
    assert everything, f"{text} should match something in the {name} fixtures"


def test_prime_pushes_only_exact_types() -> None:
    p = PrimeIntellectProvider(SecretStr("k"))
    assert "gpu_type" not in p.availability_params(parse("gpu~L4"))
    assert "gpu_type" not in p.availability_params(parse("gpu~A40"))
    assert p.availability_params(parse("gpu=L4"))["gpu_type"] == "L4_24GB"
    assert p.availability_params(parse('gpu="H100 SXM"'))["gpu_type"] == "H100_80GB"
    assert "gpu_type" not in p.availability_params(parse("gpu=H100"))  # also H100 NVL
    assert "gpu_type" not in p.availability_params(parse("gpu in [L4, L40]"))


def test_adapters_without_pushdown_declare_none() -> None:
    """local, ssh and Lambda list everything; the property above covers Lambda's fixtures."""
    for name in ("local", "ssh", "lambdalabs"):
        assert provider_classes()[name].capabilities.pushdown == ()
