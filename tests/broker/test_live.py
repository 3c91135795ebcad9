"""Opt-in, read-only checks against the real cloud APIs: ``uv run pytest -m live``.

Each test skips unless that provider's key is in the environment. Only search and list are called
(nothing is created or billed); the point is to catch wire-format drift: every response must still
validate against the adapter's wire models and produce well-formed offers and instances.
"""

from __future__ import annotations

import os

import pytest
from pydantic import SecretStr

from broker.providers.base import Provider, get_provider_class
from broker.query import parse
from broker.types import GPUOffer, Instance

# Read at import: the autouse fixture in conftest.py clears keys from the environment per test.
_KEYS = {
    "runpod": os.environ.get("RUNPOD_API_KEY"),
    "primeintellect": os.environ.get("PRIME_API_KEY") or os.environ.get("PRIME_INTELLECT_API_KEY"),
    "lambdalabs": os.environ.get("LAMBDA_API_KEY"),
    "vast": os.environ.get("VAST_API_KEY"),
}

pytestmark = pytest.mark.live


def _provider(name: str) -> Provider:
    key = _KEYS[name]
    if not key:
        pytest.skip(f"no API key for {name} in the environment")
    cls = get_provider_class(name)
    provider: Provider = cls(SecretStr(key))  # type: ignore[call-arg]
    return provider


@pytest.mark.parametrize("name", sorted(_KEYS))
def test_search_schema(name: str) -> None:
    with _provider(name) as p:
        offers = p.search(parse("gpus>=1"))
    assert isinstance(offers, list)
    for o in offers:
        assert isinstance(o, GPUOffer)
        assert o.provider == name
        assert o.price_per_hour >= 0
        assert o.gpu_count >= 0
        assert o.source
        assert o.gpu_provider_name
        if o.vram_gb is not None and o.ram_gb is not None and o.gpu_count:
            assert o.vram_gb < 1000  # VRAM per GPU in GB, never MB or system RAM
    unknown = sorted({o.gpu_provider_name for o in offers if not o.gpu_known})
    if unknown:
        print(f"{name}: GPU names the catalog does not know: {unknown}")


@pytest.mark.parametrize("name", sorted(_KEYS))
def test_list_schema(name: str) -> None:
    with _provider(name) as p:
        instances = p.list_instances()
    for i in instances:
        assert isinstance(i, Instance)
        assert i.provider == name
        assert i.instance_id
