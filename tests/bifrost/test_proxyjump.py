"""Everything through a real jump host: an ssh_config alias with ProxyJump, two sshd processes
on different loopback addresses, and a counting TCP proxy in front of the jump host that proves
the traffic (rsync's included) took that path."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from bifrost import Host, parse_target
from bifrost.testing import SSHServer, ensure_user
from bifrost.transport.openssh import hop_chain, ssh_argv

from .conftest import CuttableProxy


@pytest.fixture(scope="module")
def jump_net(
    bifrost_home: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Path, CuttableProxy, SSHServer]]:
    """(ssh config, proxy in front of the jump host, target server)."""
    jump = SSHServer(listen=["127.0.0.22", "127.0.0.24"]).start()
    try:
        # the target as a plain user: the commands run there, and that keeps them cheap
        run_as = ensure_user("bifrost-test") if os.geteuid() == 0 else None
        target = SSHServer(run_as=run_as, listen=["127.0.0.23"]).start()
    except BaseException:
        jump.stop()
        raise
    proxy = CuttableProxy(jump.port, upstream_host="127.0.0.22")
    cfg = tmp_path_factory.mktemp("sshcfg") / "config"
    cfg.write_text(
        f"Host bf-jump\n  HostName 127.0.0.1\n  Port {proxy.port}\n  User {jump.user}\n"
        f"  IdentityFile {jump.client_key}\n\n"
        f"Host bf-jump2\n  HostName 127.0.0.24\n  Port {jump.port}\n  User {jump.user}\n"
        f"  IdentityFile {jump.client_key}\n\n"
        f"Host bf-behind bf-behind2\n  HostName 127.0.0.23\n  Port {target.port}\n"
        f"  User {target.user}\n  IdentityFile {target.client_key}\n\n"
        "Host bf-behind\n  ProxyJump bf-jump\n\n"
        "Host bf-behind2\n  ProxyJump bf-jump,bf-jump2\n"
    )
    try:
        yield cfg, proxy, target
    finally:
        proxy.close()
        target.stop()
        jump.stop()


@pytest.fixture
def via_jump(
    jump_net: tuple[Path, CuttableProxy, SSHServer], monkeypatch: pytest.MonkeyPatch
) -> tuple[Path, CuttableProxy, SSHServer]:
    monkeypatch.setenv("BIFROST_SSH_CONFIG", str(jump_net[0]))
    return jump_net


def _project(root: Path, payload: bytes) -> Path:
    (root / "pkg").mkdir(parents=True)
    (root / "pkg" / "main.py").write_text("print('behind the jump')\n")
    (root / "blob.bin").write_bytes(payload)
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    return root


def test_exec_push_job_pull_through_the_jump(
    via_jump: tuple[Path, CuttableProxy, SSHServer],
    tmp_path: Path,
    workspace: Callable[[Host, str], str],
) -> None:
    _cfg, proxy, target = via_jump
    payload = os.urandom(256 * 1024)  # incompressible: rsync -z cannot shrink it
    root = _project(tmp_path / "jp", payload)
    with Host("bf-behind") as h:
        assert [j.display for j in h.target.proxy_jump] == ["bf-jump"]
        # the target sees its own address 127.0.0.23: we reached it, through the jump
        assert h.exec("echo $SSH_CONNECTION").stdout.split()[2] == "127.0.0.23"
        before = proxy.bytes
        name = workspace(h, "jumpproj")
        res = h.push(root, name=name)
        assert res.method == "rsync" and res.files == 2
        assert proxy.bytes - before > len(payload)
        job = h.run("sha256sum blob.bin; python3 pkg/main.py", workspace=name)
        assert job.wait(timeout=30).state == "succeeded"
        digest = hashlib.sha256(payload).hexdigest()
        assert job.logs().splitlines() == [f"{digest}  blob.bin", "behind the jump"]
        back = h.pull(f"~/.bifrost/workspaces/{name}/blob.bin", tmp_path / "back.bin")
        assert back.read_bytes() == payload
        # rsync rode bifrost's own connection through the jump (the bytes above prove it)
        assert proxy.connections >= 1
    assert h.target.ssh_destination() == f"{target.user}@127.0.0.23"


def test_two_hops_nested_proxy_command(
    via_jump: tuple[Path, CuttableProxy, SSHServer],
    tmp_path: Path,
    workspace: Callable[[Host, str], str],
) -> None:
    t = parse_target("bf-behind2")
    assert [j.display for j in hop_chain(t)] == ["bf-jump", "bf-jump2"]
    argv, _dest = ssh_argv(t, Path("/kh"))
    proxy_command = next(a for a in argv if a.startswith("ProxyCommand="))
    # the inner hop's tokens are escaped once, so the outer ssh leaves them for the inner one
    assert "[%%h]:%%p" in proxy_command and "[%h]:%p" in proxy_command
    (tmp_path / "two").mkdir()
    (tmp_path / "two" / "f.txt").write_text("two hops\n")
    with Host("bf-behind2") as h:
        assert h.exec("echo $SSH_CONNECTION").stdout.split()[2] == "127.0.0.23"
        name = workspace(h, "twohops")
        assert h.push(tmp_path / "two", name=name).method == "rsync"
        assert h.exec(f"cat ~/.bifrost/workspaces/{name}/f.txt").stdout == "two hops\n"


def test_cli_exec_and_openssh_through_the_jump(
    via_jump: tuple[Path, CuttableProxy, SSHServer], capsys: pytest.CaptureFixture[str]
) -> None:
    from bifrost.cli import main

    assert main(["exec", "bf-behind2", "echo via-bifrost"]) == 0
    assert capsys.readouterr().out == "via-bifrost\n"
    # `bifrost ssh` hands over to OpenSSH (exec) with the same two hops and pinned keys, strictly
    r = subprocess.run(
        [sys.executable, "-m", "bifrost.cli", "ssh", "bf-behind2", "echo", "via-openssh"],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert (r.returncode, r.stdout) == (0, "via-openssh\n"), r.stderr


RELAY = """
import os, socket, sys, threading
host, port, mark = sys.argv[1], int(sys.argv[2]), sys.argv[3]
with open(mark, "a") as f:
    f.write(f"{host}:{port}\\n")
s = socket.create_connection((host, port))
def up():
    while data := os.read(0, 65536):
        s.sendall(data)
    s.shutdown(socket.SHUT_WR)
threading.Thread(target=up, daemon=True).start()
while data := s.recv(65536):
    os.write(1, data)
"""


def test_proxycommand_is_used_by_bifrost_and_rsync(
    sshd: SSHServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    workspace: Callable[[Host, str], str],
) -> None:
    relay, mark = tmp_path / "relay.py", tmp_path / "relayed"
    relay.write_text(RELAY)
    cfg = tmp_path / "config"
    cfg.write_text(
        f"Host bf-pc\n  HostName 127.0.0.1\n  Port {sshd.port}\n  User {sshd.user}\n"
        f"  IdentityFile {sshd.client_key}\n"
        f"  ProxyCommand {sys.executable} {relay} %h %p {mark}\n"
    )
    monkeypatch.setenv("BIFROST_SSH_CONFIG", str(cfg))
    with Host("bf-pc") as h:
        assert h.exec("echo through-proxy").stdout == "through-proxy\n"
        assert mark.read_text().splitlines() == [f"127.0.0.1:{sshd.port}"]
        proj = tmp_path / "pcproj"
        proj.mkdir()
        (proj / "f.txt").write_text("f\n")
        res = h.push(proj, name=workspace(h, "pc"))
        assert res.method == "rsync"
        # rsync rode the same connection (one relayed connection in all), not a new ssh
        assert len(mark.read_text().splitlines()) == 1
