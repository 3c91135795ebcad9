"""The system tools the test suite needs, installed when missing (the README's test command).

The suite runs real OpenSSH servers (``sshd``, ``ssh``, ``ssh-keygen``), syncs with ``rsync``,
keeps jobs in ``tmux`` and checks a ``zsh`` login shell. On a fresh Debian/Ubuntu machine with
only Python and pip, ``tests/conftest.py`` calls :func:`ensure` before collecting anything:

* as root, or with passwordless ``sudo``, the missing packages are installed with ``apt-get``;
* otherwise (or with ``BROKER_TESTS_NO_INSTALL=1``, or without ``apt-get``) the run stops at
  once with one line saying what to install, instead of dozens of fixture errors.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

#: tool → (Debian package, extra places to look besides PATH). sshd lives in /usr/sbin, which
#: is not on every user's PATH.
TOOLS: dict[str, tuple[str, tuple[str, ...]]] = {
    "sshd": ("openssh-server", ("/usr/sbin/sshd",)),
    "ssh": ("openssh-client", ()),
    "ssh-keygen": ("openssh-client", ()),
    "rsync": ("rsync", ()),
    "tmux": ("tmux", ()),
    "zsh": ("zsh", ()),
}
NO_INSTALL_ENV = "BROKER_TESTS_NO_INSTALL"

Which = Callable[[str], str | None]
Run = Callable[[Sequence[str]], int]


def missing_packages(which: Which = shutil.which) -> list[str]:
    """Debian packages whose tools are absent, in a stable order, each once."""
    out: list[str] = []
    for tool, (pkg, extra) in TOOLS.items():
        found = which(tool) is not None or any(os.access(p, os.X_OK) for p in extra)
        if not found and pkg not in out:
            out.append(pkg)
    return out


@dataclass(frozen=True)
class Plan:
    """Either commands to run (install) or a one-line reason to stop."""

    commands: tuple[tuple[str, ...], ...] = ()
    stop: str | None = None


def plan(packages: Sequence[str], *, euid: int, sudo_ok: bool, apt_ok: bool, allowed: bool) -> Plan:
    """What to do about ``packages`` given who we are and what this machine has."""
    if not packages:
        return Plan()
    pkgs = " ".join(packages)
    how = f"apt-get install {pkgs}"
    if not allowed:
        return Plan(stop=f"the tests need {pkgs}: install them (`{how}`); {NO_INSTALL_ENV} is set")
    if not apt_ok:
        return Plan(
            stop=f"the tests need {pkgs} (Debian names): install them with your system's "
            "package manager"
        )
    if euid == 0:
        prefix: tuple[str, ...] = ()
    elif sudo_ok:
        prefix = ("sudo", "-n")
    else:
        return Plan(
            stop=f"the tests need {pkgs}: install them with `sudo {how}` (as root or with "
            "passwordless sudo the test run installs them itself)"
        )
    return Plan(
        commands=(
            (*prefix, "env", "DEBIAN_FRONTEND=noninteractive", "apt-get", "update", "-qq"),
            (
                *prefix,
                "env",
                "DEBIAN_FRONTEND=noninteractive",
                "apt-get",
                "install",
                "-y",
                "-qq",
                "--no-install-recommends",
                *packages,
            ),
        )
    )


def _run(cmd: Sequence[str]) -> int:
    # Output goes to the terminal: installing takes a while and the user should see why.
    return subprocess.run(list(cmd), stdout=sys.stderr, stderr=sys.stderr, check=False).returncode


def _sudo_ok(which: Which) -> bool:
    if which("sudo") is None:
        return False
    probe = subprocess.run(["sudo", "-n", "true"], capture_output=True, check=False)
    return probe.returncode == 0


def ensure(*, which: Which = shutil.which, run: Run = _run) -> str | None:
    """Install what is missing when allowed; return a one-line reason to stop, or None."""
    packages = missing_packages(which)
    if not packages:
        return None
    p = plan(
        packages,
        euid=os.geteuid(),
        sudo_ok=_sudo_ok(which) if os.geteuid() != 0 else False,
        apt_ok=which("apt-get") is not None,
        allowed=os.environ.get(NO_INSTALL_ENV, "") in ("", "0"),
    )
    if p.stop is not None:
        return p.stop
    print(f"installing system packages for the tests: {' '.join(packages)}", file=sys.stderr)
    for cmd in p.commands:
        if run(cmd) != 0:
            return (
                f"the tests need {' '.join(packages)}, and `{' '.join(cmd)}` failed: install "
                "them by hand (`apt-get install " + " ".join(packages) + "`)"
            )
    still = missing_packages(which)
    if still:
        return f"the tests need {' '.join(still)}: installing did not provide them"
    return None


if __name__ == "__main__":
    problem = ensure()
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(4)
