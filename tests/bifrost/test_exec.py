from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bifrost import CommandError, CommandTimeout, Host, Result
from bifrost.testing import SSHServer


def test_exit_code_and_streams_kept_apart(host: Host) -> None:
    r = host.exec("echo out; echo err >&2; exit 3", warn=True)
    assert isinstance(r, Result)
    assert (r.exit_code, r.stdout, r.stderr) == (3, "out\n", "err\n")
    assert r.command == "echo out; echo err >&2; exit 3"
    assert r.target == host.name and r.duration > 0


def test_nonzero_raises_typed_error_with_result(host: Host) -> None:
    with pytest.raises(CommandError) as info:
        host.exec("echo boom >&2; exit 42")
    assert info.value.result.exit_code == 42
    assert info.value.result.stderr == "boom\n"


def test_merged_stderr(host: Host) -> None:
    r = host.exec("echo a; echo b >&2; echo c", merge_stderr=True)
    assert sorted(r.stdout.split()) == ["a", "b", "c"] and r.stderr == ""


def test_streaming_callbacks(host: Host) -> None:
    chunks: list[bytes] = []
    host.exec("for i in 1 2 3; do echo $i; done", on_stdout=chunks.append)
    assert b"".join(chunks) == b"1\n2\n3\n"


def test_a_plain_writer_is_a_sink_and_a_slow_sink_holds_the_command_back(host: Host) -> None:
    """A file's write (returns a count) works as a sink; a sink that returns an awaitable
    pauses the channel until it is done: the command's later output waits for it."""
    import asyncio
    import io

    buf = io.BytesIO()
    host.exec("echo plain", on_stdout=buf.write, capture=False)
    assert buf.getvalue() == b"plain\n"

    seen: list[tuple[float, bytes]] = []
    gate: list[asyncio.Future[None]] = []

    def slow(chunk: bytes) -> asyncio.Future[None] | None:
        seen.append((time.monotonic(), chunk))
        if len(seen) == 1:  # the first chunk: hold the channel for 1 s
            loop = asyncio.get_running_loop()
            fut: asyncio.Future[None] = loop.create_future()
            loop.call_later(1.0, fut.set_result, None)
            gate.append(fut)
            return fut
        return None

    start = time.monotonic()
    r = host.exec("echo first; sleep 0.2; echo second", on_stdout=slow)
    assert r.stdout == "first\nsecond\n"
    assert gate and gate[0].done()
    second_at = next(t for t, c in seen if b"second" in c)
    assert second_at - start >= 1.0  # delivered only after the sink caught up


def test_ten_mib_of_output_does_not_deadlock(host: Host) -> None:
    r = host.exec(
        "head -c 10485760 /dev/zero | tr '\\0' x; head -c 1048576 /dev/zero >&2", timeout=60
    )
    assert len(r.stdout) == 10 * 1024 * 1024
    assert len(r.stderr) == 1024 * 1024


def test_stdin(host: Host) -> None:
    assert host.exec("wc -c", stdin=b"x" * 100000).stdout.strip() == "100000"


ATTACKS = ["'; rm -rf ~; echo '", "$(touch /tmp/pwned)", "`id`", "a\nb", 'q"uo\\te', "$HOME", "*"]


@pytest.mark.parametrize("value", ATTACKS)
def test_env_values_arrive_verbatim(host: Host, value: str) -> None:
    r = host.exec('printf %s "$V"', env={"V": value, "W": "x y"})
    assert r.stdout == value


def test_bad_env_name_rejected(host: Host) -> None:
    with pytest.raises(ValueError, match="invalid environment variable name"):
        host.exec("true", env={"A;rm -rf ~": "x"})


def test_cwd_quoted(host: Host) -> None:
    weird = "~/bifrost test dir/'; $(id) `x`"
    host.exec('mkdir -p "$HOME/bifrost test dir/\'; \\$(id) \\`x\\`"')
    r = host.exec("pwd", cwd=weird)
    assert r.stdout.strip().endswith("/bifrost test dir/'; $(id) `x`")


def test_secrets_never_in_the_command_line(host: Host, monkeypatch: pytest.MonkeyPatch) -> None:
    from bifrost.transport import ssh as ssh_mod

    seen: list[str] = []
    real = ssh_mod.SSHTransport.run

    async def spy(self, command, **kw):  # type: ignore[no-untyped-def]
        seen.append(command)
        return await real(self, command, **kw)

    monkeypatch.setattr(ssh_mod.SSHTransport, "run", spy)
    secret = "s3cr3t-'$(x)-value"
    # Compared with what was there before: the login user's real home is shared with others.
    before = host.exec("ls ~/.bifrost/secrets 2>/dev/null | sort", warn=True).stdout
    r = host.exec('printf %s "$TOKEN"; ls ~/.bifrost/secrets | sort', secrets={"TOKEN": secret})
    assert r.stdout.startswith(secret)
    assert r.stdout[len(secret) :] == before  # the 0600 file is gone afterwards
    assert seen and not any(secret in c for c in seen)


def test_unbuffered_python_and_path(host: Host) -> None:
    r = host.exec('echo "$PYTHONUNBUFFERED:$PATH"')
    assert r.stdout.startswith("1:") and "/.local/bin" in r.stdout


def test_timeout_kills_the_remote_process_group(host: Host) -> None:
    marker = f"bifrost-timeout-{time.monotonic_ns()}"
    started = time.monotonic()
    with pytest.raises(CommandTimeout):
        host.exec(f"bash -c 'sleep 300; echo {marker}' & sleep 300; wait", timeout=1)
    assert time.monotonic() - started < 15
    r = host.exec(f"ps -eo args | grep -c '[s]leep 300; echo {marker}'", warn=True)
    assert r.stdout.strip() == "0"


def test_connection_reused_and_fast(host: Host) -> None:
    host.exec("true")
    started = time.monotonic()
    for _ in range(3):
        host.exec("true")
    assert (time.monotonic() - started) / 3 < 2.0


def test_local_target_same_semantics(local_home: Path) -> None:
    with Host("local") as h:
        r = h.exec("echo out; echo err >&2; exit 5", warn=True, env={"X": "'; rm -rf ~"})
        assert (r.exit_code, r.stdout, r.stderr) == (5, "out\n", "err\n")
        assert h.exec('printf %s "$X"', env={"X": "$(id)"}).stdout == "$(id)"
        assert h.exec("pwd").stdout.strip() == str(local_home)
        with pytest.raises(CommandTimeout):
            h.exec("sleep 30", timeout=0.5)


def test_nonroot_server_home_is_resolved(sshd_nonroot: SSHServer) -> None:
    with Host(sshd_nonroot.target, identity_file=sshd_nonroot.client_key) as h:
        home = h.home()
        assert home == h.exec("echo $HOME").stdout.strip()
        if sshd_nonroot.user != "root":
            assert home != "/root"
        assert h.exec("id -un").stdout.strip() == sshd_nonroot.user


@pytest.mark.parametrize(
    "login_shell",
    [
        ["bash", "-c"],
        ["sh", "-c"],
        ["bash", "--posix", "-c"],
        ["zsh", "-c"],
        ["env", "BASH_VERSION=exported-by-someone", "sh", "-c"],
    ],
)
def test_wire_command_gets_bash_as_the_session_leader(login_shell: list[str]) -> None:
    """Whatever the login shell, the script runs in bash (no second bash when the login shell
    already is one) and $$ is the process sshd started, i.e. the process group leader."""
    import shutil
    import subprocess

    from bifrost.exec import build_command

    if shutil.which(login_shell[0]) is None:
        pytest.skip(f"{login_shell[0]} is not installed")
    script = 'arr=(a b); [[ ${arr[1]} == b ]] && echo "bash:$$"; shopt -oq posix || echo normal'
    proc = subprocess.Popen(
        [*login_shell, build_command(script, env={"X": "'; exit 9"})],
        stdout=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    out, _ = proc.communicate(timeout=30)
    assert (proc.returncode, out) == (0, f"bash:{proc.pid}\nnormal\n")


def test_bad_env_name_leaves_no_secret_file_behind(host: Host) -> None:
    before = host.exec("ls ~/.bifrost/secrets 2>/dev/null | sort", warn=True).stdout
    with pytest.raises(ValueError, match="invalid environment variable name"):
        host.exec("true", env={"BAD-NAME": "1"}, secrets={"MYSEC": "hush"})
    assert host.exec("ls ~/.bifrost/secrets 2>/dev/null | sort", warn=True).stdout == before


def test_cli_bad_env_name_is_exit_2(sshd: SSHServer, monkeypatch: pytest.MonkeyPatch) -> None:
    from bifrost.cli import main

    monkeypatch.setenv("MYSEC", "hush")
    args = ["exec", "-i", str(sshd.client_key), sshd.target, "--secret-env", "MYSEC"]
    assert main([*args, "-e", "BAD-NAME=1", "true"]) == 2


def test_sync_and_async_api_on_different_loops(host: Host) -> None:
    """The same Host from the caller's own event loops and from the synchronous facade, in
    turn: an asyncssh connection belongs to the loop that opened it, so each loop gets its own
    (before, the second loop reused the first loop's connection and failed or hung)."""
    import asyncio

    async def from_user_loop() -> str:
        return (await host.aexec("echo async")).stdout

    assert host.exec("echo sync").stdout == "sync\n"
    assert asyncio.run(asyncio.wait_for(from_user_loop(), 30)) == "async\n"
    assert host.exec("echo sync-again").stdout == "sync-again\n"
    assert asyncio.run(asyncio.wait_for(from_user_loop(), 30)) == "async\n"  # a new loop
    assert host.job(host.run("true").id).wait(timeout=30).state == "succeeded"


def test_command_that_exits_before_its_stdin_ends_returns(host: Host) -> None:
    """rsync's server ends the protocol while its client still holds the pipe open: waiting for
    stdin to end before waiting for the exit would wait forever."""
    import asyncio

    from bifrost._loop import run_sync

    async def endless() -> AsyncIterator[bytes]:
        yield b"x"
        await asyncio.Event().wait()  # never ends
        yield b""  # pragma: no cover

    async def go() -> str:
        return (await host.aexec("head -c 1", stdin=endless())).stdout

    assert run_sync(asyncio.wait_for(go(), 20)) == "x"
