"""The README's test command on a fresh machine: missing system tools are installed, or the run
stops at once with one line saying what to install (never dozens of fixture errors)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

from tests import system_tools
from tests.system_tools import NO_INSTALL_ENV, Plan, missing_packages, plan

ROOT = Path(__file__).resolve().parent.parent


def which_without(*hidden: str) -> system_tools.Which:
    return lambda tool: None if tool in hidden else f"/usr/bin/{tool}"


def test_missing_packages_maps_tools_to_debian_packages() -> None:
    assert missing_packages(which_without()) == []
    assert missing_packages(which_without("tmux", "ssh", "ssh-keygen")) == [
        "openssh-client",
        "tmux",
    ]


def test_plan_installs_as_root_or_with_passwordless_sudo() -> None:
    assert plan([], euid=1000, sudo_ok=False, apt_ok=False, allowed=True) == Plan()
    root = plan(["tmux", "zsh"], euid=0, sudo_ok=False, apt_ok=True, allowed=True)
    assert root.stop is None
    assert root.commands[0][-3:] == ("apt-get", "update", "-qq")
    assert root.commands[1][-2:] == ("tmux", "zsh") and root.commands[1][0] == "env"
    sudo = plan(["tmux"], euid=1000, sudo_ok=True, apt_ok=True, allowed=True)
    assert all(c[:2] == ("sudo", "-n") for c in sudo.commands)


@pytest.mark.parametrize(
    ("kw", "words"),
    [
        ({"euid": 1000, "sudo_ok": False, "apt_ok": True, "allowed": True}, "sudo apt-get install"),
        ({"euid": 0, "sudo_ok": False, "apt_ok": False, "allowed": True}, "package manager"),
        ({"euid": 0, "sudo_ok": False, "apt_ok": True, "allowed": False}, NO_INSTALL_ENV),
    ],
)
def test_plan_stops_with_one_line_when_it_cannot_install(kw: dict[str, object], words: str) -> None:
    p = plan(["openssh-server", "tmux"], **kw)  # type: ignore[arg-type]
    assert p.commands == ()
    assert p.stop is not None and "\n" not in p.stop
    assert "openssh-server tmux" in p.stop and words in p.stop


def test_ensure_installs_then_checks_again(monkeypatch: pytest.MonkeyPatch) -> None:
    installed: set[str] = set()
    ran: list[Sequence[str]] = []

    def which(tool: str) -> str | None:
        return None if tool == "tmux" and "tmux" not in installed else f"/usr/bin/{tool}"

    def run(cmd: Sequence[str]) -> int:
        ran.append(cmd)
        if "install" in cmd:
            installed.add("tmux")
        return 0

    monkeypatch.setattr(system_tools.os, "geteuid", lambda: 0)
    monkeypatch.delenv(NO_INSTALL_ENV, raising=False)
    assert system_tools.ensure(which=which, run=run) is None
    assert [c[-1] for c in ran] == ["-qq", "tmux"]
    # A failing apt-get is one line too.
    installed.clear()
    msg = system_tools.ensure(which=which, run=lambda cmd: 100)
    assert msg is not None and "failed" in msg and "apt-get install tmux" in msg


def test_readme_command_stops_at_once_naming_what_to_install(tmp_path: Path) -> None:
    """A real pytest run (the README's command) on a PATH without ssh, rsync, tmux and zsh."""
    bare = tmp_path / "bin"
    bare.mkdir()
    env = {**os.environ, "PATH": str(bare), NO_INSTALL_ENV: "1"}
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "tests/test_readme.py::test_readme_opens_with_two_commands",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert r.returncode == 4, r.stdout + r.stderr
    lines = [ln for ln in (r.stdout + r.stderr).splitlines() if ln.strip()]
    assert len(lines) == 1, lines
    assert "openssh-client rsync tmux zsh" in lines[0]
    assert "error" not in lines[0].lower()


@pytest.mark.skipif(os.geteuid() != 0, reason="the install path runs apt-get as root")
def test_readme_command_installs_what_is_missing_then_runs(tmp_path: Path) -> None:
    """The install path for real: rsync, tmux, zsh and the ssh client are missing from PATH, a
    stand-in apt-get "installs" them (links to this machine's binaries), the run goes on."""
    import shutil

    bare = tmp_path / "bin"
    bare.mkdir()
    (bare / "env").symlink_to(shutil.which("env") or "/usr/bin/env")
    log = tmp_path / "apt.log"
    tools = {t: shutil.which(t) for t in ("ssh", "ssh-keygen", "rsync", "tmux", "zsh")}
    ln = shutil.which("ln") or "/bin/ln"
    links = "\n".join(f'{ln} -sf "{p}" "{bare}/{t}"' for t, p in tools.items() if p)
    fake = bare / "apt-get"
    fake.write_text(f'#!/bin/sh\necho "$@" >> "{log}"\ncase "$1" in install) {links};; esac\n')
    fake.chmod(0o755)
    env = {**os.environ, "PATH": str(bare)}
    env.pop(NO_INSTALL_ENV, None)
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "tests/test_readme.py::test_readme_opens_with_two_commands",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "installing system packages for the tests: openssh-client rsync tmux zsh" in r.stderr
    calls = log.read_text().splitlines()
    assert calls[0] == "update -qq"
    assert calls[1].startswith("install -y -qq --no-install-recommends openssh-client rsync")
