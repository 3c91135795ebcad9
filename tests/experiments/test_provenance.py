"""git_commit in result files comes from the project's repository, whatever the working directory."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from experiments.common import provenance, sweep

REPO = Path(__file__).resolve().parents[2]


def _head() -> str:
    return subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()


def test_git_commit_ignores_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # not a git checkout
    provenance.git_commit.cache_clear()
    try:
        assert provenance.git_commit() == _head()
        assert sweep.git_commit() == _head()
    finally:
        provenance.git_commit.cache_clear()


def test_git_commit_outside_a_checkout_uses_the_env_or_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("EXPERIMENTS_GIT_COMMIT", raising=False)
    provenance.git_commit.cache_clear()
    try:
        assert provenance.git_commit(tmp_path) is None
        provenance.git_commit.cache_clear()
        monkeypatch.setenv("EXPERIMENTS_GIT_COMMIT", "abc1234")
        assert provenance.git_commit(tmp_path) == "abc1234"
    finally:
        provenance.git_commit.cache_clear()
