"""RunPod adapter against recorded-shape GraphQL fixtures (respx)."""

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
    ConfigError,
    InvalidRequestError,
    NoCapacityError,
    NotFoundError,
    ProviderUnavailableError,
    RateLimitedError,
)
from broker.providers.base import get_provider_class
from broker.providers.runpod import RunPodProvider, map_status
from broker.query import parse
from broker.types import CloudType, CreateRequest, InstanceStatus, Manufacturer, StockLevel
from tests.broker.provider_fakes import runpod_gpu_types

FIXTURES = Path(__file__).parent.parent / "fixtures" / "runpod"
KEY = "rp-SECRET-abcdef0123456789"
URL = "https://api.runpod.io/graphql"
PUBKEY = "ssh-ed25519 AAAAC3NzaTESTKEY user@host"


def fx(name: str) -> Any:
    return json.loads((FIXTURES / name).read_text())


def raw(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


#: RunPod's answer to a gpuTypes query, whatever lowestPrice selections it holds.
GPU_TYPES = runpod_gpu_types(fx("gpu_types.json"))


def then(first: httpx.Response) -> Any:
    """A side effect answering ``first`` once, then like RunPod's gpuTypes."""
    calls = iter([first])

    def handle(request: httpx.Request) -> httpx.Response:
        return next(calls, None) or GPU_TYPES(request)

    return handle


def sent(call: Any) -> dict[str, Any]:
    body: dict[str, Any] = json.loads(call.request.content)
    return body


@pytest.fixture
def sleeps() -> list[float]:
    return []


@pytest.fixture
def rp(sleeps: list[float]) -> RunPodProvider:
    return RunPodProvider(SecretStr(KEY), ssh_public_key=PUBKEY, sleep=sleeps.append)


def offer(rp: RunPodProvider, spot: bool = False) -> Any:
    with respx.mock:
        respx.post(URL).mock(side_effect=GPU_TYPES)
        offers = rp.search(parse("gpu=H100"))
    return next(
        o for o in offers if o.gpu_provider_name.startswith("NVIDIA H100") and o.spot is spot
    )


def test_registered_and_configured() -> None:
    assert get_provider_class("runpod") is RunPodProvider
    assert not RunPodProvider.is_configured(Settings(_env_file=None, runpod_api_key=None))
    s = Settings(_env_file=None, runpod_api_key=SecretStr(KEY))
    assert RunPodProvider.is_configured(s)
    p = RunPodProvider.from_settings(s)
    assert KEY not in repr(p)
    assert KEY not in str(p)
    with pytest.raises(ConfigError):
        RunPodProvider.from_settings(Settings(_env_file=None, runpod_api_key=None))


@respx.mock
def test_search_sends_variables_and_normalises(rp: RunPodProvider) -> None:
    route = respx.post(URL).mock(side_effect=GPU_TYPES)
    offers = rp.search(parse("gpus>=2"))
    req = route.calls.last.request
    assert req.headers["Authorization"] == f"Bearer {KEY}"
    body = sent(route.calls.last)
    # Every count the query can match (2..8), each priced by its own aliased selection.
    assert body["variables"] == {
        f"{cloud}_{n}": {"gpuCount": n, "secureCloud": cloud == "secure"}
        for n in range(2, 9)
        for cloud in ("secure", "community")
    }
    assert "$secure_2: GpuLowestPriceInput!" in body["query"]
    assert "community_8: lowestPrice(input: $community_8)" in body["query"]
    assert {o.gpu_count for o in offers} == set(range(2, 9))
    by = {(o.gpu_provider_name, o.cloud_type, o.spot): o for o in offers if o.gpu_count == 2}
    h100 = by[("NVIDIA H100 80GB HBM3", CloudType.SECURE, False)]
    assert h100.gpu_type == "H100 SXM 80GB"
    assert h100.manufacturer is Manufacturer.NVIDIA
    assert h100.gpu_count == 2
    assert h100.price_per_hour == pytest.approx(5.98)  # per GPU x count
    assert h100.price_per_gpu_hour == pytest.approx(2.99)
    assert h100.ram_gb == 250  # minMemory for 2 GPUs
    assert h100.vram_gb == 80
    assert h100.stock is StockLevel.HIGH
    assert h100.source.startswith("runpod")
    spot = by[("NVIDIA H100 80GB HBM3", CloudType.SECURE, True)]
    assert spot.price_per_hour == pytest.approx(3.5)  # minimumBidPrice x 2
    # community H100 has stockStatus null: skipped
    assert ("NVIDIA H100 80GB HBM3", CloudType.COMMUNITY, False) not in by
    # RTX 4090: secure lowestPrice null -> only community
    assert ("NVIDIA GeForce RTX 4090", CloudType.SECURE, False) not in by
    assert by[("NVIDIA GeForce RTX 4090", CloudType.COMMUNITY, False)].stock is StockLevel.MEDIUM
    # MI300X has one free GPU: it is offered for 1 GPU only (stockStatus null above that).
    assert not any(o.gpu_provider_name.startswith("AMD") for o in offers)
    offers = rp.search(parse("gpus=1"))
    by = {(o.gpu_provider_name, o.cloud_type, o.spot): o for o in offers}
    mi = by[("AMD Instinct MI300X OAM", CloudType.SECURE, False)]
    assert mi.manufacturer is Manufacturer.AMD
    assert mi.gpu_type == "MI300X 192GB"
    assert ("AMD Instinct MI300X OAM", CloudType.SECURE, True) not in by  # no bid price
    unknown = by[("NVIDIA Future X1", CloudType.SECURE, False)]
    assert unknown.gpu_known is False
    assert unknown.gpu_type == "NVIDIA Future X1"
    assert unknown.manufacturer is Manufacturer.NVIDIA
    assert len({o.key for o in offers}) == len(offers)


@respx.mock
def test_search_spot_pushdown_and_default_count(rp: RunPodProvider) -> None:
    route = respx.post(URL).mock(side_effect=GPU_TYPES)
    offers = rp.search(parse("spot"))
    assert offers
    assert all(o.spot for o in offers)
    assert sorted(v["gpuCount"] for v in sent(route.calls.last)["variables"].values()) == sorted(
        2 * list(range(1, 9))
    )


@pytest.mark.parametrize(
    ("text", "counts"),
    [
        ("gpus in [8]", [8]),
        ("gpus=1 or gpus=8", [1, 8]),
        ("gpus>=2 gpus!=2", [3, 4, 5, 6, 7, 8]),
        ("!(gpus<4) gpus<=5 or gpu=H100 gpus=2", [2, 4, 5]),
        ("gpus=10", [10]),
        ("gpus=2..3", [2, 3]),
    ],
)
def test_search_fetches_each_needed_count(rp: RunPodProvider, text: str, counts: list[int]) -> None:
    with respx.mock:
        route = respx.post(URL).mock(side_effect=GPU_TYPES)
        offers = rp.search(parse(text))
    asked = sorted({v["gpuCount"] for v in sent(route.calls.last)["variables"].values()})
    assert asked == counts
    assert {o.gpu_count for o in offers} <= set(counts)
    if counts != [10]:  # the fixture's types hold at most 8 GPUs
        assert {o.gpu_count for o in offers} & set(counts)


def test_search_that_no_count_satisfies_sends_nothing(rp: RunPodProvider) -> None:
    with respx.mock:
        route = respx.post(URL).mock(side_effect=GPU_TYPES)
        assert rp.search(parse("gpus>=2 gpus<2")) == []
        assert rp.search(parse("gpus=0")) == []
    assert route.call_count == 0


@respx.mock
def test_search_errors_are_raised_not_empty(rp: RunPodProvider, sleeps: list[float]) -> None:
    respx.post(URL).mock(return_value=httpx.Response(401, json=fx("unauthorized.json")))
    with pytest.raises(AuthError):
        rp.search(parse("gpus>=1"))
    respx.post(URL).mock(return_value=httpx.Response(200, json=fx("graphql_unauthorized.json")))
    with pytest.raises(AuthError):
        rp.search(parse("gpus>=1"))
    respx.post(URL).mock(return_value=httpx.Response(200, content=raw("malformed.json")))
    with pytest.raises(ProviderUnavailableError):
        rp.search(parse("gpus>=1"))
    respx.post(URL).mock(return_value=httpx.Response(200, json={"data": {"gpuTypes": [{}]}}))
    with pytest.raises(ProviderUnavailableError, match="shape"):
        rp.search(parse("gpus>=1"))


@respx.mock
def test_search_429_then_ok(rp: RunPodProvider, sleeps: list[float]) -> None:
    route = respx.post(URL).mock(
        side_effect=then(
            httpx.Response(429, headers={"Retry-After": "3"}, json=fx("rate_limited.json"))
        )
    )
    assert rp.search(parse("gpus>=1"))
    assert route.call_count == 2
    assert sleeps
    assert sleeps[0] >= 3


@respx.mock
def test_search_500_then_ok(rp: RunPodProvider, sleeps: list[float]) -> None:
    route = respx.post(URL).mock(
        side_effect=then(httpx.Response(500, json=fx("server_error.json")))
    )
    assert rp.search(parse("gpus>=1"))
    assert route.call_count == 2


@respx.mock
def test_400_not_retried(rp: RunPodProvider) -> None:
    route = respx.post(URL).mock(return_value=httpx.Response(400, json={"error": "bad query"}))
    with pytest.raises(InvalidRequestError, match="bad query"):
        rp.search(parse("gpus>=1"))
    assert route.call_count == 1


def test_create_on_demand_sends_matching_mutation(rp: RunPodProvider) -> None:
    o = offer(rp, spot=False)
    with respx.mock:
        route = respx.post(URL).mock(return_value=httpx.Response(200, json=fx("deploy_ok.json")))
        req = CreateRequest(offer=o, name="broker-0001", env={"HF_TOKEN": "hf_x"}, ttl_seconds=3600)
        inst = rp.create(req)
    body = sent(route.calls.last)
    assert "podFindAndDeployOnDemand(input: $input)" in body["query"]
    inp = body["variables"]["input"]
    assert inp["gpuTypeId"] == "NVIDIA H100 80GB HBM3"
    assert inp["cloudType"] == "SECURE"
    assert inp["gpuCount"] == 1
    assert inp["name"] == "broker-0001"
    assert inp["startSsh"] is True
    assert inp["supportPublicIp"] is True
    assert "22/tcp" in inp["ports"].split(",")
    assert {"key": "PUBLIC_KEY", "value": PUBKEY} in inp["env"]
    assert {"key": "HF_TOKEN", "value": "hf_x"} in inp["env"]
    assert inp["terminateAfter"].endswith("Z")
    assert "bidPerGpu" not in inp
    assert "volumeMountPath" not in inp
    assert inst.instance_id == "abc123xyz"
    assert inst.status is InstanceStatus.STARTING  # RUNNING intent, runtime null
    assert inst.ssh is None
    assert inst.offer == o


def test_create_spot_uses_bid(rp: RunPodProvider) -> None:
    o = offer(rp, spot=True)
    with respx.mock:
        route = respx.post(URL).mock(
            return_value=httpx.Response(200, json=fx("deploy_spot_ok.json"))
        )
        inst = rp.create(CreateRequest(offer=o, name="broker-0002", volume_gb=20))
    body = sent(route.calls.last)
    assert "podRentInterruptable(input: $input)" in body["query"]
    inp = body["variables"]["input"]
    assert inp["bidPerGpu"] == pytest.approx(1.75)
    assert inp["volumeInGb"] == 20
    assert inp["volumeMountPath"] == "/workspace"
    assert inst.spot is True
    assert inst.instance_id == "spot777"


def test_bid_on_on_demand_offer_refused(rp: RunPodProvider) -> None:
    o = offer(rp, spot=False)
    with pytest.raises(InvalidRequestError):
        rp.create(CreateRequest(offer=o, name="b", bid_per_gpu=1.0))


def test_create_capacity_error(rp: RunPodProvider) -> None:
    o = offer(rp)
    with respx.mock:
        route = respx.post(URL).mock(
            return_value=httpx.Response(200, json=fx("capacity_error.json"))
        )
        with pytest.raises(NoCapacityError, match="no longer any instances"):
            rp.create(CreateRequest(offer=o, name="broker-0001"))
    assert route.call_count == 1


def test_create_timeout_after_send_finds_by_name_without_resending(rp: RunPodProvider) -> None:
    o = offer(rp)
    with respx.mock:

        def handler(request: httpx.Request) -> httpx.Response:
            q = json.loads(request.content)["query"]
            if "podFindAndDeployOnDemand" in q:
                raise httpx.ReadTimeout("timed out", request=request)
            return httpx.Response(200, json=fx("pods.json"))

        route = respx.post(URL).mock(side_effect=handler)
        inst = rp.create(CreateRequest(offer=o, name="broker-0001"))
    queries = [sent(c)["query"] for c in route.calls]
    assert sum("podFindAndDeployOnDemand" in q for q in queries) == 1
    assert any("myself" in q for q in queries)
    assert inst.instance_id == "abc123xyz"
    assert inst.name == "broker-0001"


def test_create_5xx_not_found_by_name_raises(rp: RunPodProvider) -> None:
    o = offer(rp)
    with respx.mock:

        def handler(request: httpx.Request) -> httpx.Response:
            q = json.loads(request.content)["query"]
            if "podFindAndDeployOnDemand" in q:
                return httpx.Response(502, text="bad gateway")
            return httpx.Response(200, json=fx("pods.json"))

        route = respx.post(URL).mock(side_effect=handler)
        with pytest.raises(ProviderUnavailableError, match="no instance with that name"):
            rp.create(CreateRequest(offer=o, name="broker-9999"))
    deploys = [c for c in route.calls if "podFindAndDeployOnDemand" in sent(c)["query"]]
    assert len(deploys) == 1


@respx.mock
def test_get_status_and_ssh(rp: RunPodProvider) -> None:
    route = respx.post(URL).mock(return_value=httpx.Response(200, json=fx("pod_starting.json")))
    inst = rp.get("abc123xyz")
    assert sent(route.calls.last)["variables"] == {"input": {"podId": "abc123xyz"}}
    assert inst.status is InstanceStatus.STARTING
    assert inst.ssh is None
    assert inst.provider_status == "RUNNING"
    route.mock(return_value=httpx.Response(200, json=fx("pod_ready.json")))
    inst = rp.get("abc123xyz")
    assert inst.status is InstanceStatus.RUNNING
    assert inst.ssh is not None
    assert (inst.ssh.host, inst.ssh.port, inst.ssh.user, inst.ssh.direct) == (
        "203.0.113.7",
        40122,
        "root",
        True,
    )
    assert inst.gpu_type == "H100 SXM 80GB"
    route.mock(return_value=httpx.Response(200, json=fx("pod_proxy_only.json")))
    inst = rp.get("comm555")
    assert inst.ssh is not None
    assert inst.ssh.direct is False
    assert inst.ssh.host == "ssh.runpod.io"
    assert inst.ssh.user == "comm555-99aa"
    route.mock(return_value=httpx.Response(200, json=fx("pod_null.json")))
    with pytest.raises(NotFoundError):
        rp.get("nope")


@respx.mock
def test_list_and_find_by_name(rp: RunPodProvider) -> None:
    respx.post(URL).mock(return_value=httpx.Response(200, json=fx("pods.json")))
    insts = rp.list_instances()
    assert [i.status for i in insts] == [
        InstanceStatus.STARTING,
        InstanceStatus.STOPPED,
        InstanceStatus.TERMINATED,
    ]
    found = rp.find_by_name("broker-0001")
    assert found is not None
    assert found.instance_id == "abc123xyz"
    assert rp.find_by_name("absent") is None


@respx.mock
def test_terminate_stop_resume(rp: RunPodProvider) -> None:
    route = respx.post(URL).mock(return_value=httpx.Response(200, json=fx("terminate_ok.json")))
    rp.terminate("abc123xyz")
    body = sent(route.calls.last)
    assert "podTerminate(input: $input)" in body["query"]
    assert body["variables"] == {"input": {"podId": "abc123xyz"}}
    route.mock(return_value=httpx.Response(200, json=fx("terminate_not_found.json")))
    rp.terminate("gone")  # already gone is fine
    route.mock(return_value=httpx.Response(200, json=fx("stop_ok.json")))
    rp.stop("abc123xyz")
    assert "podStop" in sent(route.calls.last)["query"]
    route.mock(
        side_effect=[
            httpx.Response(200, json=fx("pod_ready.json")),
            httpx.Response(200, json=fx("resume_ok.json")),
        ]
    )
    rp.resume("abc123xyz")
    body = sent(route.calls.last)
    assert "podResume" in body["query"]
    assert body["variables"] == {"input": {"podId": "abc123xyz", "gpuCount": 1}}


@respx.mock
def test_rate_limit_exhausted(rp: RunPodProvider) -> None:
    respx.post(URL).mock(
        return_value=httpx.Response(429, headers={"Retry-After": "1"}, json=fx("rate_limited.json"))
    )
    with pytest.raises(RateLimitedError) as ei:
        rp.list_instances()
    assert ei.value.retry_after == 1.0


def test_status_map() -> None:
    assert map_status("RUNNING", None) is InstanceStatus.STARTING
    assert map_status("EXITED", None) is InstanceStatus.STOPPED
    assert map_status("TERMINATED", None) is InstanceStatus.TERMINATED
    assert map_status("WHATEVER", None) is InstanceStatus.UNKNOWN


def test_key_absent_from_logs_and_errors(
    rp: RunPodProvider, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    echo = {"errors": [{"message": f"bad key {KEY}"}]}
    with respx.mock:
        respx.post(URL).mock(
            side_effect=[
                httpx.Response(500, json={"error": f"Authorization: Bearer {KEY}"}),
                httpx.Response(200, json=echo),
            ]
        )
        with pytest.raises(Exception) as ei:
            rp.list_instances()
    assert KEY not in str(ei.value)
    assert KEY not in repr(ei.value)
    assert KEY not in caplog.text
    assert KEY not in repr(rp)
