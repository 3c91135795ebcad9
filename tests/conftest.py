"""Shared fixtures: real OpenSSH servers on loopback (session-scoped, reused by broker tests)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from bifrost.testing import SSHServer, ensure_user
from tests import system_tools

# Nothing here can reach the Hugging Face Hub: with the `fineweb` extra installed, corpus
# "auto" and hub lookups must take their offline paths at once instead of timing out.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def pytest_configure(config: pytest.Config) -> None:
    """Before anything is collected: sshd, rsync, tmux and zsh are there, or get installed
    (root / passwordless sudo, apt-get), or the run stops with one line saying what to install."""
    problem = system_tools.ensure()
    if problem:
        pytest.exit(problem, returncode=4)


@pytest.fixture(scope="session")
def bifrost_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """An isolated BIFROST_HOME (known_hosts, job index) for the whole session."""
    path = tmp_path_factory.mktemp("bifrost-home")
    old = os.environ.get("BIFROST_HOME")
    os.environ["BIFROST_HOME"] = str(path)
    yield path
    if old is None:
        os.environ.pop("BIFROST_HOME", None)
    else:
        os.environ["BIFROST_HOME"] = old


@pytest.fixture(scope="session")
def sshd(bifrost_home: Path) -> Iterator[SSHServer]:
    """A real sshd on 127.0.0.1 (as root when the tests run as root, logging in as root)."""
    with SSHServer() as server:
        yield server


@pytest.fixture(scope="session")
def sshd_nonroot(bifrost_home: Path) -> Iterator[SSHServer]:
    """A real sshd run by an unprivileged user (created with useradd when we are root)."""
    run_as = ensure_user("bifrost-test") if os.geteuid() == 0 else None
    with SSHServer(run_as=run_as) as server:
        yield server


@pytest.fixture(scope="session")
def sshd_many(bifrost_home: Path) -> Iterator[list[SSHServer]]:
    """Twenty distinct "hosts" 127.0.0.2 … 127.0.0.21: two sshd processes with ten
    ListenAddress lines each (sshd accepts at most 16 listen sockets per process)."""
    a = SSHServer(listen=[f"127.0.0.{i}" for i in range(2, 12)]).start()
    try:
        b = SSHServer(listen=[f"127.0.0.{i}" for i in range(12, 22)]).start()
    except BaseException:
        a.stop()
        raise
    try:
        yield [a, b]
    finally:
        a.stop()
        b.stop()
