"""Real responses parse: instance listings entry by entry, Prime's ``gpuName``, Prime's price.

One malformed entry in a listing (a Lambda instance without ``price_cents_per_hour``, a Vast one
with a text GPU count...) used to fail the whole listing and so ``find_by_name`` and reconcile.
Now the odd entry keeps its id, name and status (a live instance is never hidden), the rest is
unknown, and a warning says so.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any

import httpx
import pytest
import respx
from pydantic import SecretStr

from broker.errors import NoCapacityError, ProviderUnavailableError
from broker.providers.base import is_capacity_message
from broker.providers.lambdalabs import LambdaProvider
from broker.providers.primeintellect import PrimeIntellectProvider, PrimeOffer, offer_price
from broker.providers.runpod import RunPodProvider
from broker.providers.vast import VastProvider
from broker.types import InstanceStatus

FIXTURES = Path(__file__).parent.parent / "fixtures"


def fx(path: str) -> Any:
    return json.loads((FIXTURES / path).read_text())


def _no_sleep(_: float) -> None:
    return None


def test_lambda_listing_keeps_an_entry_without_a_price(caplog: pytest.LogCaptureFixture) -> None:
    body = fx("lambdalabs/instances.json")
    del body["data"][0]["instance_type"]["price_cents_per_hour"]
    lam = LambdaProvider(SecretStr("k"), sleep=_no_sleep)
    with respx.mock, caplog.at_level(logging.WARNING):
        respx.get(f"{LambdaProvider.api_url}/instances").mock(
            return_value=httpx.Response(200, json=body)
        )
        insts = lam.list_instances()
        found = lam.find_by_name("broker-0001")
    assert [i.instance_id for i in insts] == [e["id"] for e in body["data"]]
    odd = insts[0]
    assert (odd.name, odd.status, odd.provider_status) == (
        "broker-0001",
        InstanceStatus.STARTING,
        "booting",
    )
    assert odd.price_per_hour is None and "unparsed" in odd.extra
    assert insts[1].price_per_hour == 14.32  # the others are parsed as before
    assert found is not None and found.instance_id == odd.instance_id
    assert "did not parse" in caplog.text and odd.instance_id in caplog.text


def test_vast_listing_keeps_an_odd_entry(caplog: pytest.LogCaptureFixture) -> None:
    body = fx("vast/instances.json")
    first = body["instances"][0]
    first["num_gpus"] = "two"
    vast = VastProvider(SecretStr("k"), sleep=_no_sleep)
    with respx.mock, caplog.at_level(logging.WARNING):
        respx.get(f"{VastProvider.api_url}/instances/").mock(
            return_value=httpx.Response(200, json=body)
        )
        insts = vast.list_instances()
    assert len(insts) == len(body["instances"])
    odd = insts[0]
    assert odd.instance_id == str(first["id"]) and odd.name == first.get("label")
    assert odd.extra.get("unparsed")
    assert "did not parse" in caplog.text


def test_runpod_listing_keeps_an_odd_pod() -> None:
    body = copy.deepcopy(fx("runpod/pods.json"))
    pods = body["data"]["myself"]["pods"]
    pods[0]["gpuCount"] = {"unexpected": True}
    rp = RunPodProvider(SecretStr("k"), sleep=_no_sleep)
    with respx.mock:
        respx.post("https://api.runpod.io/graphql").mock(
            return_value=httpx.Response(200, json=body)
        )
        insts = rp.list_instances()
    assert [i.instance_id for i in insts] == [p["id"] for p in pods]
    assert insts[0].name == pods[0]["name"] and insts[0].extra.get("unparsed")
    assert insts[0].status is not InstanceStatus.UNKNOWN or pods[0]["desiredStatus"] is None


def test_entry_without_an_id_is_left_out_and_a_non_list_is_an_error() -> None:
    body = fx("lambdalabs/instances.json")
    body["data"].append({"name": "no id"})
    lam = LambdaProvider(SecretStr("k"), sleep=_no_sleep)
    with respx.mock:
        route = respx.get(f"{LambdaProvider.api_url}/instances")
        route.mock(return_value=httpx.Response(200, json=body))
        assert len(lam.list_instances()) == len(body["data"]) - 1
        route.mock(return_value=httpx.Response(200, json={"data": {"oops": 1}}))
        with pytest.raises(ProviderUnavailableError, match="not a list"):
            lam.list_instances()


def test_prime_pod_gpu_from_gpuname_as_its_cli_reads_it() -> None:
    """Prime's pods carry ``gpuName`` (prime-cli's Pod model); ``gpuType`` is still accepted."""
    body = fx("primeintellect/pods.json")
    for p in body["data"]:
        p["gpuName"] = p.pop("gpuType")
    prime = PrimeIntellectProvider(SecretStr("k"), sleep=_no_sleep)
    with respx.mock:
        respx.get(f"{PrimeIntellectProvider.api_url}/pods").mock(
            return_value=httpx.Response(200, json=body)
        )
        insts = prime.list_instances()
    assert insts[0].gpu_type == "H100 PCIe 80GB"
    assert all(i.gpu_type for i in insts)


def test_prime_price_is_the_offers_own_cloud_price() -> None:
    base = fx("primeintellect/availability_page1.json")["items"][0]
    both = {**base, "prices": {"onDemand": 2.0, "communityPrice": 1.5, "currency": "USD"}}
    both["disk"] = {}
    secure = PrimeOffer.model_validate({**both, "security": "secure_cloud"})
    community = PrimeOffer.model_validate({**both, "security": "community_cloud"})
    assert offer_price(secure) == 2.0
    assert offer_price(community) == 1.5
    only = PrimeOffer.model_validate(
        {**both, "security": "secure_cloud", "prices": {"communityPrice": 1.5}}
    )
    assert offer_price(only) == 1.5


def test_one_capacity_vocabulary_for_every_adapter() -> None:
    for text in (
        "There are no longer any instances available with the requested specifications",
        "insufficient-capacity: Not enough capacity to fulfill launch request",
        "no_such_ask: the offer is no longer available",
        "GPU out of stock",
    ):
        assert is_capacity_message(text), text
    # Money problems are not capacity: trying the next offer would not help.
    assert not is_capacity_message("Insufficient balance to deploy this pod")
    assert issubclass(NoCapacityError, Exception)


def test_adapter_helpers_are_defined_once() -> None:
    """One Wire base, one capacity vocabulary, one CPU-only offer, one stock rank."""
    root = Path(__file__).resolve().parents[2] / "broker"
    for mod in (root / "providers").glob("*.py"):
        text = mod.read_text()
        if mod.name != "base.py":
            assert "class _Wire" not in text and "_CAPACITY_PHRASES" not in text, mod.name
            assert 'gpu_type="CPU only"' not in text, mod.name
    assert "_STOCK_RANK = {" not in (root / "query" / "evaluate.py").read_text()
    for mod in ("vast.py", "lambdalabs.py"):  # the create tail, shared
        assert "created_instance(" in (root / "providers" / mod).read_text()
