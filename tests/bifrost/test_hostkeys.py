from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from bifrost import AuthError, ConnectError, Host, HostKeyChangedError, KnownHosts
from bifrost.testing import SSHServer, free_port
from bifrost.testing.sshd import keygen


def test_tofu_pins_the_key(sshd: SSHServer, bifrost_home: Path) -> None:
    kh = KnownHosts(bifrost_home / "kh_tofu")
    with Host(sshd.target, identity_file=sshd.client_key, known_hosts=kh) as h:
        h.exec("true")
    lines = kh.lookup("127.0.0.1", sshd.port)
    assert lines == [f"[127.0.0.1]:{sshd.port} {sshd.host_key_line}"]
    # OpenSSH accepts the file too (rsync and `bifrost ssh` rely on that)
    r = subprocess.run(
        ["ssh", "-p", str(sshd.port), "-i", str(sshd.client_key), "-o", "BatchMode=yes",
         "-o", "StrictHostKeyChecking=yes", "-o", f"UserKnownHostsFile={kh.path}",
         f"{sshd.user}@127.0.0.1", "true"],
        capture_output=True, timeout=30,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr


def test_changed_host_key_is_loud_and_not_retried(sshd: SSHServer, tmp_path: Path) -> None:
    kh = KnownHosts(tmp_path / "kh")
    keygen(tmp_path / "other")
    other = " ".join((tmp_path / "other.pub").read_text().split()[:2])
    kh.path.write_text(f"[127.0.0.1]:{sshd.port} {other}\n")
    started = time.monotonic()
    with pytest.raises(HostKeyChangedError) as info:
        Host(sshd.target, identity_file=sshd.client_key, known_hosts=kh).connect()
    assert time.monotonic() - started < 10
    msg = str(info.value)
    assert "HOST KEY CHANGED" in msg and "bifrost forget" in msg and "SHA256:" in msg
    assert kh.forget("127.0.0.1", sshd.port) == 1
    with Host(sshd.target, identity_file=sshd.client_key, known_hosts=kh) as h:
        assert h.exec("echo ok").stdout == "ok\n"


def test_auth_failure_is_not_retried(sshd: SSHServer, tmp_path: Path) -> None:
    keygen(tmp_path / "wrong")
    started = time.monotonic()
    with pytest.raises(AuthError) as info:
        Host(sshd.target, identity_file=tmp_path / "wrong", retries=5).connect()
    assert info.value.attempts == 1
    assert time.monotonic() - started < 10
    assert "authentication failed" in str(info.value)


def test_refused_is_retried_then_reported(bifrost_home: Path) -> None:
    port = free_port()
    with pytest.raises(ConnectError) as info:
        Host(f"root@127.0.0.1:{port}", retries=3, connect_timeout=2).connect()
    assert info.value.attempts == 3
    assert not isinstance(info.value, AuthError)
    assert "after 3 attempt" in str(info.value)


def test_forget_cli(sshd: SSHServer) -> None:
    from bifrost.cli import main

    with Host(sshd.target, identity_file=sshd.client_key) as h:
        h.exec("true")
    assert main(["forget", f"127.0.0.1:{sshd.port}"]) == 0
    assert KnownHosts().lookup("127.0.0.1", sshd.port) == []
    assert main(["forget", f"127.0.0.1:{sshd.port}"]) == 1


def test_host_key_hint_for_ipv6_is_bracketed(bifrost_home: Path) -> None:
    from bifrost.hostkeys import host_port

    assert host_port("::1", 2222) == "[::1]:2222"
    assert host_port("10.0.0.1", 22) == "10.0.0.1:22"
    from bifrost import parse_target

    t = parse_target(host_port("::1", 2222))
    assert (t.host, t.port) == ("::1", 2222)


def test_forget_uses_the_target_parser(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from bifrost.cli import main

    monkeypatch.setenv("BIFROST_HOME", str(tmp_path / "bh"))
    kh = KnownHosts()
    kh.path.parent.mkdir(parents=True, exist_ok=True)
    key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl"
    kh.path.write_text(
        f"[::1]:2222 {key}\n[::1]:2223 {key}\n::1 {key}\n"
        f"[127.0.0.1]:4001 {key}\n[127.0.0.1]:4002 {key}\n"
    )
    cfg = tmp_path / "ssh_config"
    cfg.write_text("Host myalias\n  HostName 127.0.0.1\n  Port 4001\n")
    monkeypatch.setenv("BIFROST_SSH_CONFIG", str(cfg))
    assert main(["forget", "[::1]:2222"]) == 0
    assert "[::1]:2222" in capsys.readouterr().out
    assert main(["forget", "::1"]) == 0  # bare IPv6, no port: every port, and says which
    printed = capsys.readouterr().out
    assert "[::1]:2223" in printed and "::1" in printed
    assert main(["forget", "myalias"]) == 0  # only the alias's host:port
    assert kh.lookup("127.0.0.1", 4001) == []
    assert kh.lookup("127.0.0.1", 4002) != []
    assert main(["forget", "bad$(x)@h"]) == 2
