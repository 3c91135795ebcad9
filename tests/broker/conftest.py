"""Fixtures for broker tests: an isolated config and state dir for every test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

_KEYS = (
    "RUNPOD_API_KEY",
    "RUNPOD_API_URL",
    "PRIME_API_KEY",
    "PRIME_INTELLECT_API_KEY",
    "LAMBDA_API_KEY",
    "VAST_API_KEY",
    "BROKER_PROVIDERS",
    "SSH_KEY_PATH",
    "BROKER_SSH_HOSTS",
)


@pytest.fixture(autouse=True)
def isolated_broker_env(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Path]:
    """No real keys, config or journal leak into a test (or out of it)."""
    home = tmp_path_factory.mktemp("broker-home")
    for k in _KEYS:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("BROKER_CONFIG", str(home / "config.toml"))
    monkeypatch.setenv("BROKER_STATE_DIR", str(home / "state"))
    monkeypatch.setenv("BROKER_ENV_FILE", str(home / "no.env"))  # no developer's .env
    yield home
