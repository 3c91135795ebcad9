"""Ctrl-C reaches the caller promptly while a synchronous bifrost call waits on its loop thread."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import bifrost._loop as loop_mod
from bifrost import Host
from bifrost.testing import SSHServer


def test_loop_thread_blocks_process_signals() -> None:
    Host("local").exec("true")
    thread = loop_mod._thread
    assert thread is not None and thread.native_id is not None
    status = Path(f"/proc/self/task/{thread.native_id}/status").read_text()
    blocked = int(next(ln for ln in status.splitlines() if ln.startswith("SigBlk:")).split()[1], 16)
    for sig in (signal.SIGINT, signal.SIGTERM):
        assert blocked & (1 << (sig - 1)), f"{sig.name} not blocked in the loop thread"


def test_ctrl_c_interrupts_a_running_exec_at_once() -> None:
    host = Host("local")
    timer = threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        host.exec("sleep 20")
    assert time.monotonic() - started < 10  # not after the command's 20 s
    timer.cancel()


def test_timeout_error_from_a_coroutine_is_raised_not_retried() -> None:
    """In 3.11 builtin TimeoutError is concurrent.futures.TimeoutError: the loop's wait slices
    must not mistake the coroutine's own TimeoutError for an elapsed slice (and spin)."""

    async def boom() -> None:
        raise TimeoutError("from the coroutine")

    result: list[BaseException] = []

    def call() -> None:
        try:
            loop_mod.run_sync(boom())
        except BaseException as exc:
            result.append(exc)

    t = threading.Thread(target=call, daemon=True)
    t.start()
    t.join(10)
    assert not t.is_alive(), "run_sync spun on the coroutine's TimeoutError"
    assert isinstance(result[0], TimeoutError) and "from the coroutine" in str(result[0])


def _poll(fn, timeout: float = 30.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if fn():
            return
        time.sleep(0.05)
    raise AssertionError("condition not met before the deadline")


def _cli_proc(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "bifrost.cli", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip


def test_ctrl_c_on_ssh_exec_exits_130_and_kills_the_remote_group(
    sshd: SSHServer, bifrost_home: Path, tmp_path: Path
) -> None:
    # The sshd runs on this machine: a marker in the command line would also match the local
    # CLI process itself (pgrep -f), so the remote side reports its process group in a file.
    pgid_file = tmp_path / "pgid"
    env = {**os.environ, "BIFROST_HOME": str(bifrost_home)}
    proc = _cli_proc(
        "exec", "-i", str(sshd.client_key), sshd.target,
        f"sleep 30 & sleep 31 & ps -o pgid= -p $$ > {pgid_file}.tmp; mv {pgid_file}.tmp {pgid_file}; wait",
        env=env,
    )  # fmt: skip
    _poll(pgid_file.exists)
    pgid = pgid_file.read_text().strip()
    with Host(sshd.target, identity_file=sshd.client_key) as h:
        assert h.exec(f"pgrep -g {pgid}", warn=True).ok
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 130, err
        assert "interrupted" in err and "Traceback" not in err
        # The remote process group went with it (best effort with a short deadline).
        _poll(lambda: not h.exec(f"pgrep -g {pgid}", warn=True).ok, timeout=10)


def test_ctrl_c_on_local_exec_exits_130(tmp_path: Path) -> None:
    env = {**os.environ, "HOME": str(tmp_path), "BIFROST_HOME": str(tmp_path / "bf")}
    flag = tmp_path / "started"
    proc = _cli_proc("exec", "local", f"touch {flag}; sleep 30", env=env)
    _poll(flag.exists)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert "interrupted" in err


def test_interrupted_command_is_not_exit_0(monkeypatch: pytest.MonkeyPatch) -> None:
    """typer (standalone_mode=False) returns 130 on KeyboardInterrupt instead of raising."""
    from bifrost.cli import main

    def boom(*args: object, **kwargs: object) -> Path:
        raise KeyboardInterrupt

    monkeypatch.setattr(Host, "pull", boom)
    assert main(["pull", "local", "~/x", "."]) == 130


def test_ctrl_c_in_the_api_kills_the_remote_group(host: Host) -> None:
    """The connection stays open after a Ctrl-C in a script, and sshd does not stop a command
    without a pty when its channel closes: bifrost must kill the remote process group."""
    marker = f"bf-api-int-{time.monotonic_ns()}"
    running = f"pgrep -f '[s]leep 40; echo {marker}'"
    with Host(host.target) as probe:
        timer = threading.Thread(
            target=lambda: (_poll(lambda: probe.exec(running, warn=True).ok),
                            os.kill(os.getpid(), signal.SIGINT)),
            daemon=True,
        )  # fmt: skip
        timer.start()
        with pytest.raises(KeyboardInterrupt):
            host.exec(f"bash -c 'sleep 40; echo {marker}' & sleep 41; wait")
        timer.join(10)
        _poll(lambda: not probe.exec(running, warn=True).ok, timeout=10)
