"""GPUClient.search: concurrent fan-out, per-provider reports, local re-check."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import pytest

from broker import AuthError, GPUClient, load_settings
from broker.errors import ConfigError
from broker.providers.base import Capabilities, Provider, provider_classes
from broker.query import Query
from broker.types import CreateRequest, GPUOffer, Instance, Manufacturer


def mk(provider: str, gpu: str, n: int, price: float) -> GPUOffer:
    return GPUOffer(
        provider=provider,
        offer_id=f"{gpu}-{n}",
        gpu_type=gpu,
        gpu_provider_name=gpu,
        manufacturer=Manufacturer.NVIDIA,
        gpu_known=True,
        gpu_count=n,
        vram_gb=80.0,
        price_per_hour=price,
        source="fake",
    )


class Fake(Provider):
    name: ClassVar[str] = "fake"
    display_name: ClassVar[str] = "Fake"
    capabilities: ClassVar[Capabilities] = Capabilities(pushdown=("gpu_count",))

    def __init__(
        self,
        name: str,
        offers: list[GPUOffer] | None = None,
        *,
        error: Exception | None = None,
        block: threading.Event | None = None,
    ) -> None:
        self.name = name  # type: ignore[misc]
        self.offers = offers or []
        self.error = error
        self.block = block
        self.seen: list[Query] = []

    @classmethod
    def is_configured(cls, settings: object) -> bool:
        return True

    @classmethod
    def from_settings(cls, settings: object) -> Fake:
        return cls("fake")

    def search(self, query: Query) -> list[GPUOffer]:
        self.seen.append(query)
        if self.block is not None:
            self.block.wait(30)
        if self.error is not None:
            raise self.error
        return list(self.offers)

    def create(self, request: CreateRequest) -> Instance:
        raise NotImplementedError

    def get(self, instance_id: str) -> Instance:
        raise NotImplementedError

    def list_instances(self) -> list[Instance]:
        return []

    def terminate(self, instance_id: str) -> None:
        raise NotImplementedError


@pytest.fixture
def release() -> Iterator[threading.Event]:
    ev = threading.Event()
    yield ev
    ev.set()


def test_search_merges_filters_sorts_and_reports(release: threading.Event) -> None:
    a = Fake("a", [mk("a", "A100 SXM 80GB", 2, 3.0), mk("a", "A100 SXM 80GB", 1, 1.2)])
    b = Fake("b", [mk("b", "A100 PCIe 80GB", 2, 2.5), mk("b", "H100 SXM 80GB", 2, 5.0)])
    bad = Fake("bad", error=AuthError("invalid API key", provider="bad", status_code=401))
    slow = Fake("slow", [mk("slow", "A100 SXM 80GB", 2, 0.1)], block=release)
    c = GPUClient(load_settings(), providers=[a, b, bad, slow], search_timeout_s=0.5)
    t0 = time.monotonic()
    res = c.search(c.gpu_type.contains("A100") & (c.gpu_count == 2) & (c.price_per_hour <= 4))
    elapsed = time.monotonic() - t0
    assert elapsed < 5  # the slow provider did not hold the others up
    assert [(o.provider, o.price_per_hour) for o in res] == [("b", 2.5), ("a", 3.0)]
    by = {r.provider: r for r in res.reports}
    assert (by["a"].status, by["a"].offers, by["a"].matched) == ("ok", 2, 1)
    assert by["b"].status == "ok"
    assert by["bad"].status == "error"
    assert by["bad"].error == {
        "type": "AuthError",
        "provider": "bad",
        "status_code": 401,
        "message": "invalid API key",
    }
    assert by["slow"].status == "timeout"
    assert not res.all_failed and {r.provider for r in res.failed} == {"bad", "slow"}
    assert res.query == "gpu~A100 gpus=2 price<=4/h"
    # Every provider received the same full query (adapters push down what they can).
    assert a.seen[0] == b.seen[0]


def test_provider_filter_skips_excluded_providers() -> None:
    a = Fake("a", [mk("a", "A100 SXM 80GB", 1, 1.0)])
    b = Fake("b", [mk("b", "A100 SXM 80GB", 1, 0.5)])
    res = GPUClient(load_settings(), providers=[a, b]).search("provider=a")
    assert [o.provider for o in res] == ["a"]
    assert [(r.provider, r.status) for r in res.reports] == [("a", "ok"), ("b", "skipped")]
    assert b.seen == []


def test_keyword_filters_and_limit() -> None:
    a = Fake("a", [mk("a", "A100 SXM 80GB", n, float(n)) for n in (1, 2, 4, 8)])
    c = GPUClient(load_settings(), providers=[a])
    res = c.search(gpu_type="a100", min_vram_gb=80, max_price_per_hour=5, sort=["-price"], limit=2)
    assert [o.gpu_count for o in res] == [4, 2]
    assert res.query == "gpu~a100 vram>=80GB price<=5/h sort=-price limit=2"


def test_all_failed_is_reported() -> None:
    bad = Fake("bad", error=AuthError("nope", provider="bad", status_code=401))
    res = GPUClient(load_settings(), providers=[bad]).search()
    assert res.all_failed and len(res) == 0


def test_default_providers_local_only_without_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    assert GPUClient().provider_names() == ["local"]
    res = GPUClient().search()
    assert [o.provider for o in res] == ["local"]
    assert res[0].price_per_hour == 0.0


def test_unknown_provider_name_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="unknown provider 'lcoal'.*did you mean 'local'"):
        GPUClient(providers=["lcoal"]).search()


def test_registry_discovers_modules() -> None:
    assert "local" in provider_classes()


def test_offer_round_trips_through_json() -> None:
    """A dumped offer (computed fields included) reads back: journals and leases rely on it."""
    from broker.providers.local import LocalProvider

    offer = LocalProvider(Path("/nonexistent")).probe()
    again = GPUOffer.model_validate_json(offer.model_dump_json())
    assert again == offer
    assert "price_per_gpu_hour" in offer.model_dump()


def test_spot_offers_only_when_the_query_asks() -> None:
    """Spot (interruptible) is opt-in: `!spot` is the default, `spot` or spot=True opts in."""
    od = mk("a", "A100 SXM 80GB", 1, 2.0)
    sp = od.model_copy(update={"offer_id": "spot-1", "spot": True, "price_per_hour": 0.8})
    a = Fake("a", [od, sp])
    c = GPUClient(load_settings(), providers=[a])
    assert [o.spot for o in c.search()] == [False]
    assert [o.spot for o in c.search("gpus=1")] == [False]
    assert [o.spot for o in c.search("spot")] == [True]
    assert [o.spot for o in c.search(spot=True)] == [True]
    assert [o.spot for o in c.search(c.spot)] == [True]
    assert [o.spot for o in c.search("!spot")] == [False]
    assert [o.spot for o in c.search("spot or !spot")] == [True, False]
    # The shown query is the user's; the default only narrows what is searched.
    assert c.search().query == ""
    # Providers are asked for on-demand offers only (the default is pushed down too).
    assert a.seen[0].where is not None and "!spot" in str(a.seen[0])


def test_unconfigured_clouds_say_how_to_configure() -> None:
    """With no cloud key the default search covers key-less providers and says why."""
    res = GPUClient().search()
    skipped = {r.provider: r for r in res.reports if r.status == "skipped"}
    assert set(skipped) == {"runpod", "primeintellect", "lambdalabs", "vast"}
    msg = skipped["runpod"].error["message"]  # type: ignore[index]
    assert "RUNPOD_API_KEY" in msg and "runpod_api_key" in msg and "broker init" in msg
    assert "VAST_API_KEY" in skipped["vast"].error["message"]  # type: ignore[index]
    assert not res.all_failed and [o.provider for o in res] == ["local"]
    # Naming providers explicitly adds no such notes.
    assert [r.provider for r in GPUClient(providers=["local"]).search().reports] == ["local"]
