"""pytest fixtures for testing your own scripts against broker's local test doubles.

Enable it in a test module or your root ``conftest.py``::

    pytest_plugins = ["broker.testing.pytest_plugin"]

Fixtures:

- ``bifrost_home``: an isolated ``BIFROST_HOME`` for the session, so the host keys that
  simulated pods pin (their ports are new each run) and the job index never touch your own
  ``~/.bifrost``.
- ``runpod_sim``: a :class:`~broker.testing.RunPodSimulator` for the test module (API key
  ``"test"``), stopped (every pod's sshd killed) when the module's tests are done.

Both need OpenSSH's ``sshd`` only when pods are created (``apt-get install openssh-server``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from broker.testing.runpod_sim import RunPodSimulator


@pytest.fixture(scope="session")
def bifrost_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """An isolated ``BIFROST_HOME`` (known_hosts, job index) for the whole session."""
    path = tmp_path_factory.mktemp("bifrost-home")
    old = os.environ.get("BIFROST_HOME")
    os.environ["BIFROST_HOME"] = str(path)
    try:
        yield path
    finally:
        if old is None:
            os.environ.pop("BIFROST_HOME", None)
        else:
            os.environ["BIFROST_HOME"] = old


@pytest.fixture(scope="module")
def runpod_sim(bifrost_home: Path) -> Iterator[RunPodSimulator]:
    """A RunPod simulator on 127.0.0.1 for the module; its API key is ``"test"``."""
    from broker.testing.runpod_sim import RunPodSimulator

    with RunPodSimulator(api_key="test") as sim:
        yield sim
