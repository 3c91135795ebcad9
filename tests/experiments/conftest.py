"""Fixtures for the experiment deploy tests: isolated broker, bifrost and $HOME state."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

_KEYS = ("RUNPOD_API_KEY", "RUNPOD_API_URL", "PRIME_API_KEY", "PRIME_INTELLECT_API_KEY",
         "LAMBDA_API_KEY", "VAST_API_KEY", "BROKER_PROVIDERS", "SSH_KEY_PATH", "HF_TOKEN")


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Isolated broker + bifrost state and $HOME; returns the results dir."""
    for k in _KEYS:
        monkeypatch.delenv(k, raising=False)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("BROKER_CONFIG", str(tmp_path / "broker" / "config.toml"))
    monkeypatch.setenv("BROKER_STATE_DIR", str(tmp_path / "broker" / "state"))
    monkeypatch.setenv("BROKER_ENV_FILE", str(tmp_path / "broker" / "no.env"))
    monkeypatch.setenv("BIFROST_HOME", str(tmp_path / "bifrost"))
    return tmp_path / "results"


@pytest.fixture
def journal(env: Path) -> Callable[[], list[Any]]:
    """Reads every entry of the (isolated) broker journal."""

    # Imported here so the experiment tests that never touch the broker do not depend on it.
    from broker import GPUClient

    def entries() -> list[Any]:
        with GPUClient(providers=["local"]) as c:
            return c.journal.all_entries()

    return entries
