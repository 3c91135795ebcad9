"""Vast.ai adapter against recorded-shape fixtures (respx)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import httpx
import pytest
import respx
from pydantic import SecretStr

from broker.config import Settings
from broker.errors import (
    AuthError,
    InvalidRequestError,
    NoCapacityError,
    NotFoundError,
    ProviderUnavailableError,
    RateLimitedError,
)
from broker.providers.base import get_provider_class
from broker.providers.vast import VastProvider, map_status
from broker.query import parse
from broker.types import CreateRequest, GPUOffer, InstanceStatus, Manufacturer

FIXTURES = Path(__file__).parent.parent / "fixtures" / "vast"
KEY = "vast-SECRET-fedcba9876543210"
API = "https://console.vast.ai/api/v0"
PUBKEY = "ssh-ed25519 AAAAC3NzaVASTKEY user@host"


def fx(name: str) -> Any:
    return json.loads((FIXTURES / name).read_text())


def body_of(call: Any) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(call.request.content)
    return out


@pytest.fixture
def sleeps() -> list[float]:
    return []


@pytest.fixture
def vast(sleeps: list[float]) -> VastProvider:
    return VastProvider(SecretStr(KEY), ssh_public_key=PUBKEY, sleep=sleeps.append)


def bundles_handler(request: httpx.Request) -> httpx.Response:
    kind = json.loads(request.content)["type"]
    return httpx.Response(
        200, json=fx("bundles_bid.json" if kind == "bid" else "bundles_on_demand.json")
    )


def search(vast: VastProvider, text: str) -> list[GPUOffer]:
    with respx.mock:
        respx.post(f"{API}/bundles/").mock(side_effect=bundles_handler)
        return vast.search(parse(text))


def test_registered() -> None:
    assert get_provider_class("vast") is VastProvider
    s = Settings(_env_file=None, vast_api_key=SecretStr(KEY))
    assert VastProvider.is_configured(s)
    assert KEY not in repr(VastProvider.from_settings(s))


@respx.mock
def test_search_wire_units_and_defaults(vast: VastProvider) -> None:
    route = respx.post(f"{API}/bundles/").mock(side_effect=bundles_handler)
    offers = vast.search(parse("gpus>=2 vram>=24 ram>=64 price<=1"))
    assert route.call_count == 2
    assert route.calls[0].request.headers["Authorization"] == f"Bearer {KEY}"
    od, bid = (body_of(c) for c in route.calls)
    assert od["type"] == "on-demand"
    assert bid["type"] == "bid"
    for b in (od, bid):
        assert b["verified"] == {"eq": True}
        assert b["rentable"] == {"eq": True}
        assert b["rented"] == {"eq": False}
        assert b["order"] == [["dph_total", "asc"]]
        assert b["num_gpus"] == {"gte": 2}
        # MB on the wire, loosened by the VRAM tolerance so a 24564 MB RTX 4090 still matches
        assert 22000 < b["gpu_ram"]["gte"] <= 24564
        # cpu_ram is MB with 1000 per GB (Vast's CLI): ram>=64GB is 64000 MB, less the tolerance
        assert 64000 * 0.9 < b["cpu_ram"]["gte"] <= 64000
        assert "cuda_max_good" not in b
        assert b["allocated_storage"] == 50
    assert od["dph_total"] == {"lte": 1.0}
    assert "dph_total" not in bid  # a bid's price is min_bid, which dph_total does not bound
    by = {(o.offer_id, o.spot): o for o in offers}
    r = by[("9123456", False)]
    assert r.gpu_type == "RTX 4090 24GB"
    assert r.vram_gb == 24
    assert r.gpu_count == 2
    assert r.price_per_hour == pytest.approx(0.712)
    assert r.ram_gb == pytest.approx(128.876)  # system RAM: cpu_ram MB / 1000
    assert r.compute_capability == "8.9"
    assert r.cuda_version == "12.4"
    assert r.country == "SE"
    assert r.manufacturer is Manufacturer.NVIDIA
    s = by[("9123456", True)]
    assert s.price_per_hour == pytest.approx(0.41)  # spot = min_bid
    assert by[("9777001", False)].gpu_type == "H100 SXM 80GB"
    q = by[("9888002", False)]
    assert q.gpu_known is False
    assert q.manufacturer is Manufacturer.AMD
    assert ("9888002", True) not in by  # no min_bid: not offered as spot
    assert len({o.key for o in offers}) == len(offers)


def test_search_spot_pushdown(vast: VastProvider) -> None:
    with respx.mock:
        route = respx.post(f"{API}/bundles/").mock(side_effect=bundles_handler)
        offers = vast.search(parse("spot"))
    assert route.call_count == 1
    assert body_of(route.calls[0])["type"] == "bid"
    assert all(o.spot for o in offers)
    with respx.mock:
        route = respx.post(f"{API}/bundles/").mock(side_effect=bundles_handler)
        vast.search(parse("!spot"))
    assert [body_of(c)["type"] for c in route.calls] == ["on-demand"]


@respx.mock
def test_search_errors(vast: VastProvider, sleeps: list[float]) -> None:
    route = respx.post(f"{API}/bundles/")
    route.mock(return_value=httpx.Response(401, json=fx("unauthorized.json")))
    with pytest.raises(AuthError, match="Invalid or missing API key"):
        vast.search(parse("spot"))
    assert route.call_count == 1
    route.mock(return_value=httpx.Response(200, text=(FIXTURES / "malformed.json").read_text()))
    with pytest.raises(ProviderUnavailableError):
        vast.search(parse("spot"))
    route.mock(
        side_effect=[
            httpx.Response(429, headers={"Retry-After": "4"}, json=fx("rate_limited.json")),
            httpx.Response(500, json=fx("server_error.json")),
            httpx.Response(200, json=fx("bundles_bid.json")),
        ]
    )
    assert vast.search(parse("spot"))
    assert sleeps[0] >= 4
    route.mock(return_value=httpx.Response(400, json={"msg": "bad filter"}))
    n = route.call_count
    with pytest.raises(InvalidRequestError):
        vast.search(parse("spot"))
    assert route.call_count == n + 1


def test_create_on_demand(vast: VastProvider) -> None:
    offer = next(o for o in search(vast, "gpus>=1") if o.offer_id == "9123456" and not o.spot)
    with respx.mock:
        route = respx.put(f"{API}/asks/9123456/").mock(
            return_value=httpx.Response(200, json=fx("create_ok.json"))
        )
        inst = vast.create(CreateRequest(offer=offer, name="broker-0001", image="img:1"))
    b = body_of(route.calls.last)
    assert b["client_id"] == "me"
    assert b["image"] == "img:1"
    assert b["disk"] == 50
    assert b["label"] == "broker-0001"
    assert b["runtype"] == "ssh"
    assert b["env"]["PUBLIC_KEY"] == PUBKEY
    assert "price" not in b  # no price: on demand, not a bid
    assert inst.instance_id == "13370001"
    assert inst.status is InstanceStatus.PROVISIONING


def test_create_spot_sends_bid(vast: VastProvider) -> None:
    offer = next(o for o in search(vast, "spot") if o.offer_id == "9123456")
    with respx.mock:
        route = respx.put(f"{API}/asks/9123456/").mock(
            return_value=httpx.Response(200, json=fx("create_ok.json"))
        )
        inst = vast.create(CreateRequest(offer=offer, name="broker-0002"))
    assert body_of(route.calls.last)["price"] == pytest.approx(0.41)
    assert inst.spot is True


@pytest.mark.parametrize("status", [200, 400])
def test_create_capacity(vast: VastProvider, status: int) -> None:
    offer = next(o for o in search(vast, "!spot") if o.offer_id == "9123456")
    with respx.mock:
        route = respx.put(f"{API}/asks/9123456/").mock(
            return_value=httpx.Response(status, json=fx("capacity_error.json"))
        )
        with pytest.raises(NoCapacityError):
            vast.create(CreateRequest(offer=offer, name="broker-0001"))
    assert route.call_count == 1


def test_create_timeout_consults_find_by_name(vast: VastProvider) -> None:
    offer = next(o for o in search(vast, "!spot") if o.offer_id == "9123456")
    with respx.mock:
        put = respx.put(f"{API}/asks/9123456/").mock(side_effect=httpx.ReadTimeout("slow"))
        lst = respx.get(f"{API}/instances/").mock(
            return_value=httpx.Response(200, json=fx("instances.json"))
        )
        inst = vast.create(CreateRequest(offer=offer, name="broker-0001"))
    assert put.call_count == 1
    assert lst.call_count == 1
    assert lst.calls.last.request.url.params["owner"] == "me"
    assert inst.instance_id == "13370001"


@respx.mock
def test_get_and_ssh(vast: VastProvider) -> None:
    route = respx.get(f"{API}/instances/13370001/")
    route.mock(return_value=httpx.Response(200, json=fx("instance_loading.json")))
    inst = vast.get("13370001")
    assert inst.status is InstanceStatus.STARTING
    assert inst.ssh is not None
    assert inst.ssh.direct is False  # only the proxy so far
    assert (inst.ssh.host, inst.ssh.port) == ("ssh5.vast.ai", 30001)
    route.mock(return_value=httpx.Response(200, json=fx("instance_ready.json")))
    inst = vast.get("13370001")
    assert inst.status is InstanceStatus.RUNNING
    assert inst.ssh is not None
    assert (inst.ssh.host, inst.ssh.port, inst.ssh.user, inst.ssh.direct) == (
        "198.51.100.20",
        41022,
        "root",
        True,
    )
    assert inst.name == "broker-0001"
    assert inst.created_at is not None
    route.mock(return_value=httpx.Response(200, json=fx("instance_null.json")))
    with pytest.raises(NotFoundError):
        vast.get("13370001")


@respx.mock
def test_list_terminate_stop(vast: VastProvider) -> None:
    respx.get(f"{API}/instances/").mock(return_value=httpx.Response(200, json=fx("instances.json")))
    insts = vast.list_instances()
    assert [i.status for i in insts] == [
        InstanceStatus.PROVISIONING,
        InstanceStatus.STOPPED,
        InstanceStatus.RUNNING,
    ]
    assert insts[2].spot is True
    d = respx.delete(f"{API}/instances/13370001/").mock(
        return_value=httpx.Response(200, json=fx("destroy_ok.json"))
    )
    vast.terminate("13370001")
    assert d.call_count == 1
    respx.delete(f"{API}/instances/404/").mock(return_value=httpx.Response(404, json={}))
    vast.terminate("404")
    p = respx.put(f"{API}/instances/13370001/").mock(
        return_value=httpx.Response(200, json={"success": True})
    )
    vast.stop("13370001")
    assert body_of(p.calls.last) == {"state": "stopped"}
    vast.resume("13370001")
    assert body_of(p.calls.last) == {"state": "running"}


@respx.mock
def test_rate_limited_exhausted(vast: VastProvider) -> None:
    respx.get(f"{API}/instances/").mock(
        return_value=httpx.Response(429, headers={"Retry-After": "2"}, json=fx("rate_limited.json"))
    )
    with pytest.raises(RateLimitedError):
        vast.list_instances()


def test_status_map() -> None:
    assert map_status(None, "running") is InstanceStatus.PROVISIONING
    assert map_status("loading", "running") is InstanceStatus.STARTING
    assert map_status("offline", "running") is InstanceStatus.ERROR
    assert map_status("exited", "stopped") is InstanceStatus.STOPPED
    assert map_status("weird", None) is InstanceStatus.UNKNOWN


def test_key_absent_from_logs(vast: VastProvider, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    with respx.mock:
        respx.get(f"{API}/instances/").mock(
            side_effect=[
                httpx.Response(503, json={"msg": f"key {KEY} rejected"}),
                httpx.Response(403, json={"msg": f"key {KEY} rejected"}),
            ]
        )
        with pytest.raises(AuthError) as ei:
            vast.list_instances()
    assert KEY not in str(ei.value)
    assert KEY not in repr(ei.value)
    assert KEY not in caplog.text
