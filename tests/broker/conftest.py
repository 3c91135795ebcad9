"""Fixtures for broker tests: an isolated config and state dir for every test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from broker.testing import RunPodSimulator

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


# -- the RunPod simulator, for the modules that drive real creates -----------------------------

SIM_KEY = "sim-test-key-0123456789"


@pytest.fixture(scope="module")
def user_key(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The SSH key broker logs in with (every simulated pod accepts it)."""
    from bifrost.testing.sshd import keygen

    path = tmp_path_factory.mktemp("sim-key") / "id_ed25519"
    keygen(path)
    return path


@pytest.fixture(scope="module")
def sim(bifrost_home: Path) -> Iterator[RunPodSimulator]:
    """One simulator per test module (a test that moves its clock uses its own)."""
    from broker.testing import RunPodSimulator

    with RunPodSimulator(api_key=SIM_KEY) as s:
        yield s


@pytest.fixture
def env(
    sim: RunPodSimulator, user_key: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[RunPodSimulator]:
    """Point broker at the simulator with our key; leave no pod or fault for the next test."""
    monkeypatch.setenv("RUNPOD_API_KEY", SIM_KEY)
    monkeypatch.setenv("RUNPOD_API_URL", sim.url)
    monkeypatch.setenv("SSH_KEY_PATH", str(user_key))
    monkeypatch.setenv("BROKER_PROVIDERS", "runpod")
    yield sim
    sim.clear_faults()
    sim.release_late()
    for p in sim.pods(include_terminated=False):
        sim.terminate_pod(p.id)
    sim.clear_requests()
