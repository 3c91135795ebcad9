"""Connection reuse across CLI invocations (bifrost.holder), against the real sshd."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bifrost import Host, holder
from bifrost.hostkeys import KnownHosts
from bifrost.testing import SSHServer


def _poll(fn, timeout: float = 30.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("condition not met before the deadline")


@pytest.fixture
def held(sshd: SSHServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Holders on for this test; yields the socket path of sshd's holder and kills whatever
    holder is left afterwards."""
    monkeypatch.setenv("BIFROST_HOLD", "1")
    monkeypatch.setenv("BIFROST_HOLD_IDLE", "60")
    h = Host(sshd.target, identity_file=sshd.client_key)
    path = holder.socket_path(h.target, h.identity_file, KnownHosts().path)
    assert path is not None
    yield path
    for pid in _holder_pids(path):
        os.kill(pid, signal.SIGCONT)
        os.kill(pid, signal.SIGKILL)
    _poll(lambda: not _holder_pids(path))


def _holder_pids(path: Path) -> list[int]:
    r = subprocess.run(
        ["pgrep", "-f", f"bifrost.holder.*{path.name}"], capture_output=True, text=True
    )
    return [int(p) for p in r.stdout.split()]


def _hello(path: Path) -> int | None:
    """The pid of the holder answering on ``path``, or None."""
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(1)
            s.connect(str(path))
            s.sendall(b'{"op": "hello"}\n')
            data = b""
            while len(data) < 5 or len(data) < 5 + int.from_bytes(data[1:5], "big"):
                chunk = s.recv(4096)
                if not chunk:
                    return None
                data += chunk
            return int(json.loads(data[5:])["pid"])
    except OSError:
        return None


def _cli(sshd: SSHServer, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bifrost.cli", args[0], "-i", str(sshd.client_key), *args[1:]],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def _port(r: subprocess.CompletedProcess[str]) -> str:
    assert r.returncode == 0, r.stderr
    return r.stdout.split()[1]  # $SSH_CONNECTION: client ip, client port, server ip, port


def test_cli_calls_share_one_held_connection(sshd: SSHServer, held: Path) -> None:
    first = _port(_cli(sshd, "exec", sshd.target, "echo $SSH_CONNECTION"))  # direct; spawns
    _poll(lambda: _hello(held))
    assert oct(held.parent.stat().st_mode & 0o777) == "0o700"
    assert oct(held.stat().st_mode & 0o777) == "0o600"
    second = _port(_cli(sshd, "exec", sshd.target, "echo $SSH_CONNECTION"))
    third = _port(_cli(sshd, "exec", sshd.target, "--", "sh", "-c", "echo $SSH_CONNECTION"))
    assert second == third != first
    # Exit codes, stderr, env and --json come through the holder unchanged.
    r = _cli(sshd, "exec", sshd.target, "-e", "A=x y", "--json", 'echo "$A"; echo e >&2; exit 3')
    assert r.returncode == 3
    assert (json.loads(r.stdout)["stdout"], json.loads(r.stdout)["stderr"]) == ("x y\n", "e\n")
    r = _cli(sshd, "exec", "--timeout", "0.5", sshd.target, "sleep 5")
    assert r.returncode == 124 and "timed out after 0.5s" in r.stderr, r.stderr
    # Jobs started and inspected through it too: the job's shell inherited its connection.
    r = _cli(sshd, "run", sshd.target, "echo $SSH_CONNECTION")
    job = r.stdout.strip()
    assert _cli(sshd, "wait", job).returncode == 0
    assert _port(_cli(sshd, "logs", job)) == second


def test_hung_stale_or_dead_holder_never_fails_a_call(sshd: SSHServer, held: Path) -> None:
    _cli(sshd, "exec", sshd.target, "true")
    pid = _poll(lambda: _hello(held))
    held_port = _port(_cli(sshd, "exec", sshd.target, "echo $SSH_CONNECTION"))
    os.kill(pid, signal.SIGSTOP)  # hung: accepts connections, never answers
    try:
        started = time.monotonic()
        r = _cli(sshd, "exec", sshd.target, "echo $SSH_CONNECTION")
        assert _port(r) != held_port and time.monotonic() - started < 15
        assert _cli(sshd, "status", sshd.target, "no-such-job").returncode == 1  # not a hang
    finally:
        os.kill(pid, signal.SIGCONT)
    os.kill(pid, signal.SIGKILL)  # dead: its socket file stays behind, nobody listening
    _poll(lambda: not _holder_pids(held))
    assert held.exists()
    assert _cli(sshd, "exec", sshd.target, "true").returncode == 0  # direct, and respawns
    new = _poll(lambda: _hello(held))
    assert new != pid


def test_ctrl_c_through_the_holder_kills_the_remote_group(
    sshd: SSHServer, held: Path, tmp_path: Path
) -> None:
    _cli(sshd, "exec", sshd.target, "true")
    _poll(lambda: _hello(held))
    pgid_file = tmp_path / "pgid"
    proc = subprocess.Popen(
        [sys.executable, "-m", "bifrost.cli", "exec", "-i", str(sshd.client_key), sshd.target,
         f"sleep 30 & ps -o pgid= -p $$ > {pgid_file}.tmp; mv {pgid_file}.tmp {pgid_file}; wait"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    _poll(pgid_file.exists)
    pgid = pgid_file.read_text().strip()
    with Host(sshd.target, identity_file=sshd.client_key) as h:
        assert h.exec(f"pgrep -g {pgid}", warn=True).ok
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 130 and "interrupted" in err, err
        _poll(lambda: not h.exec(f"pgrep -g {pgid}", warn=True).ok, timeout=10)


def test_api_host_with_hold_uses_the_holder(sshd: SSHServer, held: Path) -> None:
    with Host(sshd.target, identity_file=sshd.client_key, hold=True) as h:
        direct = h.exec("echo $SSH_CONNECTION").stdout.split()[1]  # spawns one
    _poll(lambda: _hello(held))
    with Host(sshd.target, identity_file=sshd.client_key, hold=True) as h:
        via = h.exec("echo $SSH_CONNECTION").stdout.split()[1]
        assert via != direct
        job = h.run("echo from-job; exit 2")
        assert job.wait(timeout=30).exit_code == 2
        assert job.logs() == "from-job\n"
        assert asyncio.run(h.ahome()).startswith("/")


def test_holder_started_from_the_api_stops_on_sigterm(sshd: SSHServer, held: Path) -> None:
    """The API spawns holders from bifrost's loop thread, which blocks TERM for itself."""
    with Host(sshd.target, identity_file=sshd.client_key, hold=True) as h:
        h.exec("true")
    pid = _poll(lambda: _hello(held))
    os.kill(pid, signal.SIGTERM)
    _poll(lambda: not _holder_pids(held), timeout=10)


def test_a_long_lived_host_outlives_its_holder(sshd: SSHServer, held: Path, tmp_path: Path) -> None:
    """A holder that idles out (here: is killed) between two calls of one Host: the next call
    connects directly instead of failing; file transfers always go directly."""
    with Host(sshd.target, identity_file=sshd.client_key, hold=True) as h:
        h.exec("true")  # direct; starts a holder
    pid = _poll(lambda: _hello(held))
    with Host(sshd.target, identity_file=sshd.client_key, hold=True) as h:
        via = h.exec("echo $SSH_CONNECTION").stdout.split()[1]
        os.kill(pid, signal.SIGKILL)
        _poll(lambda: not _holder_pids(held))
        after = h.exec("echo $SSH_CONNECTION").stdout.split()[1]
        assert after != via
        (tmp_path / "up.txt").write_text("up")
        assert h.upload(tmp_path / "up.txt", "~/bf-holder-up.txt").endswith("bf-holder-up.txt")


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


def test_a_reader_that_stops_reading_pauses_the_remote_output(
    sshd: SSHServer, held: Path
) -> None:
    """Flow control end to end: a CLI whose stdout nobody reads stops reading the holder's
    socket; the holder then pauses the SSH channel instead of buffering the output, so its
    memory stays flat while the remote command is held back; every byte arrives in the end."""
    _cli(sshd, "exec", sshd.target, "true")
    pid = _poll(lambda: _hello(held))
    before = _rss_mib(pid)
    size = 192 * 1024 * 1024
    p = subprocess.Popen(
        [sys.executable, "-m", "bifrost.cli", "exec", "-i", str(sshd.client_key), sshd.target,
         f"head -c {size} /dev/zero"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        peak = before
        deadline = time.monotonic() + 6  # the output takes ~1-2 s unthrottled on loopback
        while time.monotonic() < deadline:
            peak = max(peak, _rss_mib(pid))
            time.sleep(0.1)
        assert p.poll() is None  # held back by the reader, not finished
        assert peak - before < 48, f"holder grew {peak - before:.0f} MiB with a stalled reader"
        assert p.stdout is not None
        got = 0
        while chunk := p.stdout.read(1 << 20):
            got += len(chunk)
        assert p.wait(timeout=60) == 0
        assert got == size
    finally:
        p.kill()
        p.wait()
