"""Lambda Cloud adapter against recorded-shape fixtures (respx)."""

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
from broker.providers.lambdalabs import LambdaProvider, map_status
from broker.query import parse
from broker.types import CloudType, CreateRequest, GPUOffer, InstanceStatus, Manufacturer

FIXTURES = Path(__file__).parent.parent / "fixtures" / "lambdalabs"
KEY = "secret_lambda-KEY-00112233445566"
API = "https://cloud.lambda.ai/api/v1"
PUBKEY = "ssh-ed25519 AAAAC3NzaLAMBDAKEY user@host"


def fx(name: str) -> Any:
    return json.loads((FIXTURES / name).read_text())


def body_of(call: Any) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(call.request.content)
    return out


@pytest.fixture
def sleeps() -> list[float]:
    return []


@pytest.fixture
def lam(sleeps: list[float]) -> LambdaProvider:
    return LambdaProvider(SecretStr(KEY), ssh_public_key=PUBKEY, sleep=sleeps.append)


def h100(lam: LambdaProvider) -> GPUOffer:
    with respx.mock:
        respx.get(f"{API}/instance-types").mock(
            return_value=httpx.Response(200, json=fx("instance_types.json"))
        )
        offers = lam.search(parse("gpu=H100"))
    return next(o for o in offers if o.region == "us-east-1")


def test_registered() -> None:
    assert get_provider_class("lambdalabs") is LambdaProvider
    s = Settings(_env_file=None, lambda_api_key=SecretStr(KEY))
    assert LambdaProvider.is_configured(s)
    assert KEY not in repr(LambdaProvider.from_settings(s))


@respx.mock
def test_search_one_offer_per_type_and_region(lam: LambdaProvider) -> None:
    route = respx.get(f"{API}/instance-types").mock(
        return_value=httpx.Response(200, json=fx("instance_types.json"))
    )
    offers = lam.search(parse("gpus>=1"))
    assert route.calls.last.request.headers["Authorization"] == f"Bearer {KEY}"
    assert sorted(o.offer_id for o in offers) == [
        "us-east-1/gpu_1x_h100_sxm5",
        "us-midwest-1/gpu_8x_a100_80gb_sxm4",
        "us-south-2/gpu_1x_b300_sxm6",
        "us-west-3/gpu_1x_h100_sxm5",
    ]  # the A6000 has no region with capacity
    by = {o.offer_id: o for o in offers}
    h = by["us-east-1/gpu_1x_h100_sxm5"]
    assert h.gpu_type == "H100 SXM 80GB"
    assert h.price_per_hour == pytest.approx(3.29)  # cents, whole instance
    assert h.ram_gb == 225
    assert h.vram_gb == 80
    assert h.vcpus == 26
    assert h.cloud_type is CloudType.SECURE
    assert h.manufacturer is Manufacturer.NVIDIA
    a = by["us-midwest-1/gpu_8x_a100_80gb_sxm4"]
    assert a.gpu_count == 8
    assert a.gpu_type == "A100 SXM 80GB"
    assert a.price_per_gpu_hour == pytest.approx(1.79)
    b = by["us-south-2/gpu_1x_b300_sxm6"]
    assert b.gpu_known is False
    assert b.vram_gb == 288
    assert len({o.key for o in offers}) == len(offers)


@respx.mock
def test_search_errors(lam: LambdaProvider, sleeps: list[float]) -> None:
    route = respx.get(f"{API}/instance-types")
    route.mock(return_value=httpx.Response(401, json=fx("unauthorized.json")))
    with pytest.raises(AuthError, match="invalid, expired"):
        lam.search(parse("gpus>=1"))
    route.mock(return_value=httpx.Response(200, text=(FIXTURES / "malformed.json").read_text()))
    with pytest.raises(ProviderUnavailableError):
        lam.search(parse("gpus>=1"))
    route.mock(
        side_effect=[
            httpx.Response(429, headers={"Retry-After": "5"}, json=fx("rate_limited.json")),
            httpx.Response(500, json=fx("server_error.json")),
            httpx.Response(200, json=fx("instance_types.json")),
        ]
    )
    assert lam.search(parse("gpus>=1"))
    assert sleeps[0] >= 5
    assert len(sleeps) == 2


def test_create_uses_matching_key_not_first(lam: LambdaProvider) -> None:
    offer = h100(lam)
    with respx.mock:
        respx.get(f"{API}/ssh-keys").mock(
            return_value=httpx.Response(200, json=fx("ssh_keys.json"))
        )
        reg = respx.post(f"{API}/ssh-keys")
        launch = respx.post(f"{API}/instance-operations/launch").mock(
            return_value=httpx.Response(200, json=fx("launch_ok.json"))
        )
        inst = lam.create(CreateRequest(offer=offer, name="broker-0001"))
    assert not reg.called
    assert body_of(launch.calls.last) == {
        "region_name": "us-east-1",
        "instance_type_name": "gpu_1x_h100_sxm5",
        "ssh_key_names": ["my-laptop"],  # matched by key, not by position
        "name": "broker-0001",
        "quantity": 1,
    }
    assert inst.instance_id == "0920582c7ff041399e34823a0be62549"
    assert inst.status is InstanceStatus.PROVISIONING


def test_create_registers_missing_key(lam: LambdaProvider) -> None:
    offer = h100(lam)
    with respx.mock:
        respx.get(f"{API}/ssh-keys").mock(
            return_value=httpx.Response(200, json=fx("ssh_keys_other.json"))
        )
        reg = respx.post(f"{API}/ssh-keys").mock(
            return_value=httpx.Response(200, json=fx("ssh_key_created.json"))
        )
        launch = respx.post(f"{API}/instance-operations/launch").mock(
            return_value=httpx.Response(200, json=fx("launch_ok.json"))
        )
        lam.create(CreateRequest(offer=offer, name="broker-0001"))
    sent = body_of(reg.calls.last)
    assert sent["public_key"] == PUBKEY
    assert sent["name"].startswith("broker-")
    assert body_of(launch.calls.last)["ssh_key_names"] == ["broker-0123456789ab"]


def test_create_without_key_is_config_error(sleeps: list[float]) -> None:
    lam = LambdaProvider(SecretStr(KEY), ssh_public_key=None, sleep=sleeps.append)
    with pytest.raises(ConfigError):
        lam.create(CreateRequest(offer=h100(lam), name="b"))


def test_create_capacity_error_not_retried(lam: LambdaProvider) -> None:
    offer = h100(lam)
    with respx.mock:
        respx.get(f"{API}/ssh-keys").mock(
            return_value=httpx.Response(200, json=fx("ssh_keys.json"))
        )
        launch = respx.post(f"{API}/instance-operations/launch").mock(
            return_value=httpx.Response(400, json=fx("capacity_error.json"))
        )
        with pytest.raises(NoCapacityError, match="Not enough capacity"):
            lam.create(CreateRequest(offer=offer, name="broker-0001"))
    assert launch.call_count == 1


def test_create_429_is_backed_off_then_sent(lam: LambdaProvider, sleeps: list[float]) -> None:
    # 429 means the launch was refused, not performed: safe to send again after Retry-After.
    offer = h100(lam)
    with respx.mock:
        respx.get(f"{API}/ssh-keys").mock(
            return_value=httpx.Response(200, json=fx("ssh_keys.json"))
        )
        launch = respx.post(f"{API}/instance-operations/launch").mock(
            side_effect=[
                httpx.Response(429, headers={"Retry-After": "10"}, json=fx("rate_limited.json")),
                httpx.Response(200, json=fx("launch_ok.json")),
            ]
        )
        lam.create(CreateRequest(offer=offer, name="broker-0001"))
    assert launch.call_count == 2
    assert sleeps[-1] >= 10


def test_create_timeout_finds_by_name_no_resend(lam: LambdaProvider) -> None:
    offer = h100(lam)
    with respx.mock:
        respx.get(f"{API}/ssh-keys").mock(
            return_value=httpx.Response(200, json=fx("ssh_keys.json"))
        )
        launch = respx.post(f"{API}/instance-operations/launch").mock(
            side_effect=httpx.ReadTimeout("timed out")
        )
        lst = respx.get(f"{API}/instances").mock(
            return_value=httpx.Response(200, json=fx("instances.json"))
        )
        inst = lam.create(CreateRequest(offer=offer, name="broker-0001"))
    assert launch.call_count == 1
    assert lst.called
    assert inst.instance_id == "0920582c7ff041399e34823a0be62549"


def test_spot_refused(lam: LambdaProvider) -> None:
    offer = h100(lam).model_copy(update={"spot": True})
    with pytest.raises(InvalidRequestError):
        lam.create(CreateRequest(offer=offer, name="b"))


@respx.mock
def test_get_list_terminate(lam: LambdaProvider) -> None:
    route = respx.get(f"{API}/instances/0920582c7ff041399e34823a0be62549")
    route.mock(return_value=httpx.Response(200, json=fx("instance_booting.json")))
    inst = lam.get("0920582c7ff041399e34823a0be62549")
    assert inst.status is InstanceStatus.STARTING
    assert inst.ssh is None
    route.mock(return_value=httpx.Response(200, json=fx("instance_active.json")))
    inst = lam.get("0920582c7ff041399e34823a0be62549")
    assert inst.status is InstanceStatus.RUNNING
    assert inst.ssh is not None
    assert inst.ssh.target == "ubuntu@192.0.2.44:22"
    assert "53968f128c4a4489b688c2c0a181d083" not in inst.model_dump_json()  # jupyter token
    respx.get(f"{API}/instances/nope").mock(
        return_value=httpx.Response(404, json=fx("not_found.json"))
    )
    with pytest.raises(NotFoundError):
        lam.get("nope")
    respx.get(f"{API}/instances").mock(return_value=httpx.Response(200, json=fx("instances.json")))
    assert [i.status for i in lam.list_instances()] == [
        InstanceStatus.STARTING,
        InstanceStatus.ERROR,
        InstanceStatus.TERMINATED,
    ]
    term = respx.post(f"{API}/instance-operations/terminate").mock(
        return_value=httpx.Response(200, json=fx("terminate_ok.json"))
    )
    lam.terminate("0920582c7ff041399e34823a0be62549")
    assert body_of(term.calls.last) == {"instance_ids": ["0920582c7ff041399e34823a0be62549"]}
    term.mock(return_value=httpx.Response(404, json=fx("not_found.json")))
    lam.terminate("gone")


def test_no_stop(lam: LambdaProvider) -> None:
    assert not lam.capabilities.stop_resume
    with pytest.raises(InvalidRequestError):
        lam.stop("x")


@respx.mock
def test_rate_limited_exhausted(lam: LambdaProvider) -> None:
    respx.get(f"{API}/instances").mock(
        return_value=httpx.Response(429, headers={"Retry-After": "1"}, json=fx("rate_limited.json"))
    )
    with pytest.raises(RateLimitedError):
        lam.list_instances()


def test_status_map() -> None:
    assert map_status("booting") is InstanceStatus.STARTING
    assert map_status("terminating") is InstanceStatus.TERMINATING
    assert map_status("??") is InstanceStatus.UNKNOWN


def test_key_absent(lam: LambdaProvider, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    with respx.mock:
        respx.get(f"{API}/instances").mock(
            side_effect=[
                httpx.Response(502, text=f"upstream said Bearer {KEY}"),
                httpx.Response(401, json={"error": {"message": f"bad key {KEY}"}}),
            ]
        )
        with pytest.raises(AuthError) as ei:
            lam.list_instances()
    assert KEY not in str(ei.value)
    assert KEY not in repr(ei.value)
    assert KEY not in caplog.text
