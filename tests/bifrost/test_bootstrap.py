"""push(bootstrap=True): `uv sync --locked` on the box, skipped while lock, python pin and extras
are unchanged. The project has no dependencies and forbids network use, so nothing is
downloaded; installing uv (which needs the network) is exercised with a stand-in installer."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from bifrost import Host
from bifrost import sync as sync_mod
from bifrost.testing import SSHServer

PYPROJECT = """[project]
name = "tinyproj"
version = "{version}"
requires-python = ">=3.8"
dependencies = []

[project.optional-dependencies]
dev = []

[tool.uv]
package = false
offline = true
python-downloads = "never"
"""


def _real_uv() -> Path | None:
    """The uv binary itself (`uv run` exports it as $UV; a pyenv shim is only a script)."""
    for cand in (os.environ.get("UV"), shutil.which("uv")):
        if cand and Path(cand).is_file():
            with open(cand, "rb") as fh:
                if fh.read(4) == b"\x7fELF":
                    return Path(cand).resolve()
    return None


UV = _real_uv()
needs_uv = pytest.mark.skipif(UV is None, reason="no uv binary on this machine")


def _lock(root: Path, version: str) -> None:
    assert UV is not None
    (root / "pyproject.toml").write_text(PYPROJECT.format(version=version))
    subprocess.run(
        [str(UV), "lock", "--offline", "--no-cache"], cwd=root, check=True, capture_output=True
    )


@pytest.fixture
def uv_box(sshd_nonroot: SSHServer) -> Iterator[tuple[Host, str, bool]]:
    """(host, path of a uv binary staged on the box, uv was already installed there)."""
    assert UV is not None
    with Host(sshd_nonroot.target, identity_file=sshd_nonroot.client_key) as h:
        had_uv = h.exec("command -v uv", warn=True).ok
        staged = h.upload(UV, "~/.cache/bifrost-tests/uv")
        try:
            yield h, staged, had_uv
        finally:
            if not had_uv:
                h.exec('rm -f "$HOME/.local/bin/uv"')
            h.exec(f"rm -f {staged}")


@needs_uv
def test_push_bootstrap_syncs_then_skips(
    uv_box: tuple[Host, str, bool], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    h, staged, had_uv = uv_box
    # Stands in for astral's installer (network): it must run exactly when uv is missing.
    monkeypatch.setattr(
        sync_mod,
        "UV_INSTALLER",
        f'mkdir -p "$HOME/.local/bin" && cp {staged} "$HOME/.local/bin/uv" && echo fake-installer',
    )
    root = tmp_path / "tinyproj"
    root.mkdir()
    _lock(root, "0.1.0")
    (root / "main.py").write_text("import sys; print(sys.prefix)\n")
    name = f"tiny-{secrets.token_hex(3)}"
    venv = f"{h.home()}/.bifrost/venvs/{name}"
    try:
        first = h.push(root, name=name, bootstrap=True)
        assert (first.bootstrapped, first.uv_installed) == ("synced", not had_uv)
        assert (
            h.exec(f"{venv}/bin/python -c 'import sys; print(sys.prefix)'").stdout.strip() == venv
        )

        again = h.push(root, name=name, bootstrap=True)
        assert (again.bootstrapped, again.uv_installed) == ("skipped", False)

        _lock(root, "0.2.0")  # a changed lock
        assert h.push(root, name=name, bootstrap=True).bootstrapped == "synced"
        assert h.push(root, name=name, bootstrap=True).bootstrapped == "skipped"
        assert h.push(root, name=name, bootstrap=True, extras=["dev"]).bootstrapped == "synced"
        assert h.push(root, name=name, bootstrap=True, extras=["dev"]).bootstrapped == "skipped"
        assert h.push(root, name=name).bootstrapped is None  # no bootstrap asked

        job = h.run("python main.py", workspace=name)  # jobs in the workspace use its venv
        assert job.wait(timeout=30).state == "succeeded"
        assert job.logs().strip() == venv
    finally:
        h.exec(f'rm -rf "$HOME/.bifrost/venvs/{name}" "$HOME/.bifrost/workspaces/{name}" '
               f'"$HOME/.bifrost/state/{name}"')  # fmt: skip


def _run_local(script: str, home: Path, path: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "--norc", "--noprofile", "-c", script],
        env={"HOME": str(home), "PATH": path}, capture_output=True, text=True, timeout=30,
    )  # fmt: skip


def test_uv_install_is_chosen_only_when_uv_is_absent(tmp_path: Path) -> None:
    """The decision logic of the bootstrap script, run here with a stub uv: no network."""
    home = tmp_path / "home"
    (home / ".bifrost/workspaces/w").mkdir(parents=True)
    (home / ".bifrost/state/w").mkdir(parents=True)
    calls = tmp_path / "calls"
    stub = tmp_path / "stub-uv"
    stub.write_text(f'#!/bin/sh\necho "$*" >> {calls}\nmkdir -p "$UV_PROJECT_ENVIRONMENT"\n')
    stub.chmod(0o755)
    installer = f'mkdir -p "$HOME/.local/bin" && cp {stub} "$HOME/.local/bin/uv" && echo ran >&2'
    system = "/usr/bin:/bin"  # coreutils, no uv
    if shutil.which("uv", path=system) is not None:
        pytest.skip("uv is installed system-wide: cannot make it absent")

    def script(stamp: str, install: bool) -> str:
        return sync_mod.bootstrap_script(
            "w", stamp, ["gpu"], install_uv=install, installer=installer
        )

    r = _run_local(script("s1", install=False), home, system)  # `local`: never installs
    assert r.returncode == 5 and "uv not found" in r.stderr
    r = _run_local(script("s1", install=True), home, system)
    assert (r.returncode, r.stdout.split()) == (0, ["uv=installed", "synced"]), r.stderr
    assert "ran" in r.stderr
    assert calls.read_text() == "sync --locked --extra gpu\n"
    r = _run_local(script("s1", install=True), home, system)  # same stamp, venv there
    assert (r.returncode, r.stdout.split()) == (0, ["skipped"])
    r = _run_local(script("s2", install=True), home, system)  # uv present now: no install
    assert (r.returncode, r.stdout.split()) == (0, ["synced"]) and "ran" not in r.stderr
    assert calls.read_text().count("sync --locked") == 2
    assert "astral.sh/uv/install.sh" in sync_mod.bootstrap_script("w", "s", [], install_uv=True)
