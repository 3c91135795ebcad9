"""Prime Intellect adapter against recorded-shape fixtures (respx)."""

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
from broker.providers.primeintellect import PrimeIntellectProvider, map_status, parse_ssh
from broker.query import parse
from broker.types import CloudType, CreateRequest, GPUOffer, InstanceStatus, StockLevel

FIXTURES = Path(__file__).parent.parent / "fixtures" / "primeintellect"
KEY = "pit_SECRET-99887766554433"
API = "https://api.primeintellect.ai/api/v1"


def fx(name: str) -> Any:
    return json.loads((FIXTURES / name).read_text())


def body_of(call: Any) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(call.request.content)
    return out


def pages(request: httpx.Request) -> httpx.Response:
    page = request.url.params["page"]
    return httpx.Response(
        200, json=fx("availability_page1.json" if page == "1" else "availability_page2.json")
    )


@pytest.fixture
def sleeps() -> list[float]:
    return []


@pytest.fixture
def prime(sleeps: list[float]) -> PrimeIntellectProvider:
    return PrimeIntellectProvider(SecretStr(KEY), sleep=sleeps.append)


def offers_of(prime: PrimeIntellectProvider, text: str = "gpus>=1") -> list[GPUOffer]:
    with respx.mock:
        respx.get(f"{API}/availability/gpus").mock(side_effect=pages)
        return prime.search(parse(text))


def test_registered() -> None:
    assert get_provider_class("primeintellect") is PrimeIntellectProvider
    s = Settings(_env_file=None, prime_api_key=SecretStr(KEY))
    assert PrimeIntellectProvider.is_configured(s)
    assert KEY not in repr(PrimeIntellectProvider.from_settings(s))


@respx.mock
def test_search_paginates_until_exhausted(prime: PrimeIntellectProvider) -> None:
    route = respx.get(f"{API}/availability/gpus").mock(side_effect=pages)
    offers = prime.search(parse("gpus>=1"))
    assert route.call_count == 2
    assert [c.request.url.params["page"] for c in route.calls] == ["1", "2"]
    assert all(c.request.url.params["page_size"] == "100" for c in route.calls)
    assert route.calls[0].request.headers["Authorization"] == f"Bearer {KEY}"
    assert len(offers) == 102  # 103 listed, one out of stock
    by = {o.provider_data["cloud_id"]: o for o in offers}
    pcie = by["NVIDIA H100 PCIe"]
    assert pcie.gpu_type == "H100 PCIe 80GB"
    assert pcie.price_per_hour == pytest.approx(2.69 + 80 * 0.00014)  # GPU + default disk
    assert pcie.ram_gb == 251
    assert pcie.vcpus == 16
    assert pcie.provider_data["provider_type"] == "runpod"  # underlying cloud, not manufacturer
    assert pcie.manufacturer.value == "nvidia"
    assert pcie.stock is StockLevel.HIGH
    a100 = by["gpu_8x_a100"]
    assert a100.gpu_type == "A100 SXM 80GB"
    assert a100.gpu_count == 8
    assert a100.price_per_hour == pytest.approx(14.32)  # disk included in price
    comm = by["comm-4090"]
    assert comm.cloud_type is CloudType.COMMUNITY
    assert comm.spot is True
    assert comm.price_per_hour == pytest.approx(0.35)
    assert comm.gpu_type == "RTX 4090 24GB"
    assert "cloud-3" not in by
    weird = by["cloud-4"]
    assert weird.gpu_known is False
    assert weird.vram_gb == 77
    assert len({o.key for o in offers}) == len(offers)


@respx.mock
def test_search_pushdown(prime: PrimeIntellectProvider) -> None:
    route = respx.get(f"{API}/availability/gpus").mock(
        return_value=httpx.Response(200, json={"items": [], "totalCount": 0})
    )
    prime.search(parse("gpu='H100 SXM' gpus=2 cloud=secure"))
    p = route.calls.last.request.url.params
    assert p["gpu_type"] == "H100_80GB"
    assert p["gpu_count"] == "2"
    assert p["security"] == "secure_cloud"
    prime.search(parse("gpus>=2 gpu=H100"))
    p = route.calls.last.request.url.params
    assert "gpu_count" not in p  # a range is not an exact count
    assert "gpu_type" not in p  # H100 also means H100 NVL, which has no Prime type


@respx.mock
def test_search_errors(prime: PrimeIntellectProvider, sleeps: list[float]) -> None:
    route = respx.get(f"{API}/availability/gpus")
    route.mock(return_value=httpx.Response(401, json=fx("unauthorized.json")))
    with pytest.raises(AuthError, match="Invalid API key"):
        prime.search(parse("gpus>=1"))
    route.mock(return_value=httpx.Response(200, text=(FIXTURES / "malformed.json").read_text()))
    with pytest.raises(ProviderUnavailableError):
        prime.search(parse("gpus>=1"))
    route.mock(
        side_effect=[
            httpx.Response(429, headers={"Retry-After": "6"}, json=fx("rate_limited.json")),
            httpx.Response(500, json=fx("server_error.json")),
            httpx.Response(200, json={"items": [], "totalCount": 0}),
        ]
    )
    assert prime.search(parse("gpus>=1")) == []
    assert sleeps[0] >= 6
    route.mock(return_value=httpx.Response(422, json={"detail": "bad gpu_type"}))
    n = route.call_count
    with pytest.raises(InvalidRequestError):
        prime.search(parse("gpus>=1"))
    assert route.call_count == n + 1


def test_create_sends_offer_wire_values(prime: PrimeIntellectProvider) -> None:
    offer = next(o for o in offers_of(prime) if o.provider_data["cloud_id"] == "NVIDIA H100 PCIe")
    with respx.mock:
        route = respx.post(f"{API}/pods").mock(
            return_value=httpx.Response(200, json=fx("create_ok.json"))
        )
        inst = prime.create(CreateRequest(offer=offer, name="broker-0001", env={"A": "1"}))
    b = body_of(route.calls.last)
    assert b["provider"] == {"type": "runpod"}
    pod = b["pod"]
    assert pod["cloudId"] == "NVIDIA H100 PCIe"
    assert pod["gpuType"] == "H100_80GB"
    assert pod["socket"] == "PCIe"
    assert pod["gpuCount"] == 1
    assert pod["name"] == "broker-0001"
    assert pod["diskSize"] == 80  # raised to the offer's minimum
    assert pod["dataCenterId"] == "US-KS-2"
    assert pod["security"] == "secure_cloud"
    assert pod["image"] == "cuda_12_4_pytorch_2_5"  # Prime's image, not the RunPod default
    assert pod["envVars"] == [{"key": "A", "value": "1"}]
    assert inst.instance_id == "pod-7f3a"
    assert inst.status is InstanceStatus.PROVISIONING


def test_create_unknown_image_refused(prime: PrimeIntellectProvider) -> None:
    offer = offers_of(prime)[0]
    with pytest.raises(InvalidRequestError, match="not offered"):
        prime.create(CreateRequest(offer=offer, name="b", image="my/own:image"))


def test_create_capacity(prime: PrimeIntellectProvider) -> None:
    offer = offers_of(prime)[0]
    with respx.mock:
        route = respx.post(f"{API}/pods").mock(
            return_value=httpx.Response(400, json=fx("capacity_error.json"))
        )
        with pytest.raises(NoCapacityError):
            prime.create(CreateRequest(offer=offer, name="broker-0001"))
    assert route.call_count == 1


def test_create_timeout_then_found(prime: PrimeIntellectProvider) -> None:
    offer = offers_of(prime)[0]
    with respx.mock:
        post = respx.post(f"{API}/pods").mock(side_effect=httpx.ReadTimeout("slow"))
        lst = respx.get(f"{API}/pods").mock(return_value=httpx.Response(200, json=fx("pods.json")))
        inst = prime.create(CreateRequest(offer=offer, name="broker-0001"))
    assert post.call_count == 1
    assert lst.called
    assert inst.instance_id == "pod-7f3a"


@respx.mock
def test_get_list_delete(prime: PrimeIntellectProvider) -> None:
    route = respx.get(f"{API}/pods/pod-7f3a")
    route.mock(return_value=httpx.Response(200, json=fx("pod_provisioning.json")))
    inst = prime.get("pod-7f3a")
    assert inst.status is InstanceStatus.PROVISIONING
    assert inst.ssh is None
    route.mock(return_value=httpx.Response(200, json=fx("pod_ready.json")))
    inst = prime.get("pod-7f3a")
    assert inst.status is InstanceStatus.RUNNING
    assert inst.ssh is not None
    assert inst.ssh.target == "root@203.0.113.50:1234"
    assert inst.gpu_type == "H100 PCIe 80GB"
    respx.get(f"{API}/pods/pod-multi").mock(
        return_value=httpx.Response(200, json=fx("pod_multinode.json"))
    )
    multi = prime.get("pod-multi")
    assert multi.ssh is not None
    assert multi.ssh.target == "ubuntu@198.51.100.1:22"
    assert len(multi.extra["ssh_connections"]) == 2
    respx.get(f"{API}/pods/nope").mock(return_value=httpx.Response(404, json=fx("not_found.json")))
    with pytest.raises(NotFoundError):
        prime.get("nope")
    lst = respx.get(f"{API}/pods").mock(return_value=httpx.Response(200, json=fx("pods.json")))
    assert [i.status for i in prime.list_instances()] == [
        InstanceStatus.PROVISIONING,
        InstanceStatus.RUNNING,
        InstanceStatus.TERMINATED,
    ]
    assert lst.calls.last.request.url.params["limit"] == "100"
    d = respx.delete(f"{API}/pods/pod-7f3a").mock(return_value=httpx.Response(200, json={}))
    prime.terminate("pod-7f3a")
    assert d.call_count == 1
    respx.delete(f"{API}/pods/gone").mock(return_value=httpx.Response(404, json={}))
    prime.terminate("gone")


@respx.mock
def test_rate_limited_exhausted(prime: PrimeIntellectProvider) -> None:
    respx.get(f"{API}/pods").mock(
        return_value=httpx.Response(429, headers={"Retry-After": "1"}, json=fx("rate_limited.json"))
    )
    with pytest.raises(RateLimitedError):
        prime.list_instances()


def test_parse_ssh_forms() -> None:
    e = parse_ssh("ssh root@1.2.3.4 -p 22")
    assert e is not None
    assert e.target == "root@1.2.3.4:22"
    e = parse_ssh("ssh -p 2222 ubuntu@host.example")
    assert e is not None
    assert e.target == "ubuntu@host.example:2222"
    e = parse_ssh(["", "ssh root@5.6.7.8 -p 40000"])
    assert e is not None
    assert e.port == 40000
    assert parse_ssh(None) is None
    assert parse_ssh("") is None


def test_status_map() -> None:
    assert map_status("ACTIVE") is InstanceStatus.RUNNING
    assert map_status("PROVISIONING") is InstanceStatus.PROVISIONING
    assert map_status("TERMINATED") is InstanceStatus.TERMINATED
    assert map_status(None) is InstanceStatus.UNKNOWN


def test_no_stop(prime: PrimeIntellectProvider) -> None:
    with pytest.raises(InvalidRequestError):
        prime.stop("x")


def test_key_absent(prime: PrimeIntellectProvider, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    with respx.mock:
        respx.get(f"{API}/pods").mock(
            side_effect=[
                httpx.Response(500, json={"detail": f"Authorization: Bearer {KEY}"}),
                httpx.Response(401, json={"detail": f"bad key {KEY}"}),
            ]
        )
        with pytest.raises(AuthError) as ei:
            prime.list_instances()
    assert KEY not in str(ei.value)
    assert KEY not in repr(ei.value)
    assert KEY not in caplog.text
