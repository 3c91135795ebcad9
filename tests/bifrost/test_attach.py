"""`bifrost attach`: the job's tmux session on the box, driven through a real pseudo-terminal,
and the fallback to following the log where tmux is not usable."""

from __future__ import annotations

import fcntl
import os
import select
import shutil
import struct
import subprocess
import sys
import tempfile
import termios
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from bifrost import Host
from bifrost.testing import SSHServer, ensure_user

pytestmark = pytest.mark.skipif(
    subprocess.run(["which", "tmux"], capture_output=True).returncode != 0,
    reason="tmux is not installed (apt-get install -y tmux)",
)


def _poll(fn: Callable[[], object], timeout: float = 30.0, interval: float = 0.05) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError("condition not met before the deadline")


class PtyCLI:
    """``bifrost ...`` in a subprocess whose stdin/stdout/stderr are a pseudo-terminal."""

    def __init__(self, *args: str) -> None:
        self.master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 120, 0, 0))
        env = {**os.environ, "TERM": "xterm", "COLUMNS": "120", "LINES": "30"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bifrost.cli", *args],
            stdin=slave, stdout=slave, stderr=slave, env=env, start_new_session=True,
        )  # fmt: skip
        os.close(slave)
        self.output = b""

    def _read(self, timeout: float) -> bool:
        ready, _, _ = select.select([self.master], [], [], timeout)
        if not ready:
            return True
        try:
            data = os.read(self.master, 65536)
        except OSError:  # EIO: every writer of the terminal has gone
            return False
        self.output += data
        return bool(data)

    def expect(self, text: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while text.encode() not in self.output:
            left = deadline - time.monotonic()
            if left <= 0 or not self._read(min(left, 0.5)):
                if text.encode() in self.output:
                    return
                raise AssertionError(f"{text!r} not seen; output so far: {self.output[-2000:]!r}")

    def wait(self, timeout: float = 30.0) -> int:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            self._read(0.1)
        while self._read(0.05):  # drain what the child wrote last
            pass
        return self.proc.wait(max(0.1, deadline - time.monotonic()))

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        os.close(self.master)


@pytest.fixture
def pty_cli() -> Iterator[Callable[..., PtyCLI]]:
    made: list[PtyCLI] = []

    def start(*args: str) -> PtyCLI:
        made.append(PtyCLI(*args))
        return made[-1]

    yield start
    for p in made:
        p.close()


@pytest.fixture
def box(sshd_nonroot: SSHServer) -> Iterator[tuple[Host, SSHServer]]:
    """A non-root login: its own tmux server, and no slow root ~/.bashrc on every command."""
    with Host(sshd_nonroot.target, identity_file=sshd_nonroot.client_key) as h:
        yield h, sshd_nonroot


def _tmux(h: Host, *args: str) -> subprocess.CompletedProcess[str]:
    r = h.exec("tmux -L bifrost " + " ".join(args), warn=True)
    return subprocess.CompletedProcess(args, r.exit_code, r.stdout, r.stderr)


def test_job_gets_a_tmux_session_showing_its_output(box: tuple[Host, SSHServer]) -> None:
    host, _ = box
    job = host.run("for i in $(seq 1 3000); do echo tick-$i; sleep 0.1; done", name="tmux.view")
    session = f"bifrost-{job.id.replace('.', '_')}"  # tmux does not allow '.' in names
    try:
        # the session exists as soon as `run` returns, and its pane shows the job's output
        assert _tmux(host, "has-session", "-t", session).returncode == 0
        _poll(lambda: "tick-2" in _tmux(host, "capture-pane", "-p", "-t", session).stdout)
        st, name = job.attach_info()
        assert (st.state, name) == ("running", session)
    finally:
        job.kill(grace=1)
    # nobody is watching: the session goes away with the job
    _poll(lambda: _tmux(host, "has-session", "-t", session).returncode != 0)


@pytest.mark.skipif(
    os.geteuid() != 0,
    reason="ssh -t needs sshd running as root (a non-root sshd cannot chown the pty)",
)
def test_attach_opens_the_session_in_a_terminal(
    host: Host, sshd: SSHServer, pty_cli: Callable[..., PtyCLI]
) -> None:
    job = host.run("echo first-line; for i in $(seq 1 3000); do echo tick-$i; sleep 0.1; done")
    session = f"bifrost-{job.id}"
    attach = ("attach", "-i", str(sshd.client_key), sshd.target, job.id)
    try:
        for round_ in ("existing session", "session lost with the tmux server"):
            if round_ != "existing session":
                assert _tmux(host, "kill-session", "-t", session).returncode == 0
            cli = pty_cli(*attach)
            cli.expect("tick-")  # tmux drew the pane through ssh -t: its client is attached
            assert _tmux(host, "detach-client", "-s", session).returncode == 0
            assert cli.wait() == 0, round_  # detaching ends ssh; the job is untouched
            assert job.status().state == "running"
    finally:
        job.kill(grace=1)


@pytest.fixture(scope="module")
def sshd_without_tmux(bifrost_home: Path) -> Iterator[SSHServer]:
    """A box where `tmux` on PATH is broken, as if it were not installed."""
    # not under pytest's 0700 basetemp: the login user may not be us
    fakebin = Path(tempfile.mkdtemp(prefix="bifrost-notmux-"))
    fakebin.chmod(0o755)
    (fakebin / "tmux").write_text("#!/bin/sh\necho 'tmux: not here' >&2\nexit 127\n")
    (fakebin / "tmux").chmod(0o755)
    path = f"{fakebin}:/usr/local/bin:/usr/bin:/bin"
    run_as = ensure_user("bifrost-test") if os.geteuid() == 0 else None
    try:
        with SSHServer(run_as=run_as, extra_config=f'SetEnv "PATH={path}"\n') as server:
            yield server
    finally:
        shutil.rmtree(fakebin, ignore_errors=True)


def test_attach_without_tmux_follows_the_log(
    sshd_without_tmux: SSHServer, pty_cli: Callable[..., PtyCLI]
) -> None:
    srv = sshd_without_tmux
    with Host(srv.target, identity_file=srv.client_key) as h:
        go = f"/tmp/bifrost-attach-go-{time.monotonic_ns()}"
        job = h.run(f"echo first; while [ ! -e {go} ]; do sleep 0.05; done; echo second; exit 3")
        try:
            st, session = job.attach_info()
            assert (st.state, session) == ("running", None)
            assert not h.exec(f"ls ~/.bifrost/jobs/{job.id}").stdout.count("tmux")
            cli = pty_cli("attach", "-i", str(srv.client_key), srv.target, job.id)
            cli.expect("following the log instead")
            cli.expect("first")
            h.exec(f"touch {go}")
            assert cli.wait() == 3  # the job's exit code, like `logs -f`
            assert b"second" in cli.output
        finally:
            h.exec(f"rm -f {go}")


def test_attach_to_a_finished_job_prints_its_log(
    box: tuple[Host, SSHServer], capsys: pytest.CaptureFixture[str]
) -> None:
    host, sshd = box
    from bifrost.cli import main

    job = host.run("echo all done; exit 4")
    job.wait(timeout=30)
    assert main(["attach", "-i", str(sshd.client_key), sshd.target, job.id]) == 4
    captured = capsys.readouterr()
    assert captured.out == "all done\n"
    assert "already ended (failed, exit code 4)" in captured.err


def test_attach_on_the_local_target(local_home: Path, pty_cli: Callable[..., PtyCLI]) -> None:
    def tmux(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["tmux", "-L", "bifrost", *args], capture_output=True, text=True)

    with Host("local") as h:
        job = h.run("for i in $(seq 1 3000); do echo local-tick-$i; sleep 0.1; done")
        session = f"bifrost-{job.id}"
        try:
            cli = pty_cli("attach", "local", job.id)  # no ssh: tmux directly
            cli.expect("local-tick-")
            assert tmux("detach-client", "-s", session).returncode == 0
            assert cli.wait() == 0
        finally:
            job.kill(grace=1)
