"""Result objects, command wrapping (env, cwd, secrets, PATH), streaming and timeouts."""

from __future__ import annotations

import asyncio
import contextlib
import re
import secrets as _secrets
import shlex
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field

from bifrost._wire import check_env_name, env_lines, quote_path
from bifrost.transport.base import OutputSink, StdinSource, Transport

__all__ = [
    "Result",
    "build_command",
    "capture",
    "check_env_name",
    "env_lines",
    "nul_join",
    "nul_split",
    "quote_path",
]

BASE_PATH = 'export PATH="$HOME/.local/bin:$PATH" PYTHONUNBUFFERED=1'


@dataclass(frozen=True)
class Result:
    """What a finished command left behind (Fabric-style)."""

    command: str
    target: str
    exit_code: int
    stdout: str = field(repr=False)
    stderr: str = field(repr=False)
    duration: float

    @property
    def ok(self) -> bool:
        """True when the exit code is 0."""
        return self.exit_code == 0

    @property
    def failed(self) -> bool:
        """True when the exit code is not 0."""
        return self.exit_code != 0

    def to_dict(self) -> dict[str, object]:
        """A JSON-friendly dict."""
        return {
            "target": self.target,
            "command": self.command,
            "exit_code": self.exit_code,
            "stdout": self.stdout,
            "stderr": self.stderr,
            "duration": round(self.duration, 4),
        }


def nul_join(items: Iterable[str]) -> bytes:
    """NUL-terminated listing (``xargs -0``/``--from0`` input); names keep undecodable bytes."""
    return b"".join(i.encode("utf-8", "surrogateescape") + b"\0" for i in items)


def nul_split(data: bytes) -> list[str]:
    """The inverse of :func:`nul_join` (empty names dropped)."""
    return [n for n in data.decode("utf-8", "surrogateescape").split("\0") if n]


async def capture(
    transport: Transport,
    command: str,
    *,
    stdin: StdinSource = None,
    on_stdout: OutputSink | None = None,
    check: bool = False,
) -> Result:
    """Run a raw command (no wrapping) and collect its output: the one helper behind every
    internal "run, collect stdout/stderr, check the exit code" call. ``check`` raises
    :class:`CommandError` on a non-zero exit; ``on_stdout`` streams instead of collecting."""
    from bifrost.errors import CommandError

    out: list[bytes] = []
    err: list[bytes] = []
    started = time.monotonic()
    rc = await transport.run(
        command, stdin=stdin, on_stdout=on_stdout or out.append, on_stderr=err.append
    )
    result = Result(
        command,
        transport.target.display,
        rc,
        b"".join(out).decode("utf-8", "surrogateescape"),
        b"".join(err).decode("utf-8", "replace"),
        time.monotonic() - started,
    )
    if check and rc != 0:
        raise CommandError(result)
    return result


def build_command(
    command: str,
    *,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    pid_token: str | None = None,
    secrets_token: str | None = None,
    exec_token: str | None = None,
) -> str:
    """The wire command: the script run by bash as sshd's session leader (so the process group
    leader is known), in the login shell itself when that is bash.

    ``exec_token`` is exported as ``BIFROST_EXEC_ID``: every process the command starts
    inherits it, so :func:`kill_remote_group` can find the command's process group after a
    Ctrl-C without a pid file (a builtin ``export``: no extra process per command)."""
    lines = [BASE_PATH]
    if exec_token:
        lines.append(f"export BIFROST_EXEC_ID={_check_token(exec_token)}")
    if pid_token:
        f = f'"$HOME/.bifrost/run/{_check_token(pid_token)}"'
        lines.append(f'mkdir -p "$HOME/.bifrost/run" && echo $$ > {f}; trap "rm -f {f}" EXIT')
    if secrets_token:
        f = f'"$HOME/.bifrost/secrets/{_check_token(secrets_token)}"'
        lines.append(f"set -a; . {f}; set +a; rm -f {f}")
    if env:
        lines.append(env_lines(env).rstrip("\n"))
    if cwd:
        lines.append(f"cd -- {quote_path(cwd)} || exit 1")
    lines.append(command)
    script = shlex.quote("\n".join(lines))
    # When the login shell sshd started is already a (non-POSIX-mode) bash, run the script in
    # it: a second bash costs ~1 ms of server CPU per command, a quarter of sshd's whole share.
    # Otherwise (sh, dash, zsh ...) exec bash so commands always get bash. Either way the
    # shell running the script is sshd's session leader, so $$ names its process group.
    return (
        f"__bf_cmd={script}; "
        'if [ -n "$BASH_VERSION" ] && { shopt -oq posix 2>/dev/null; [ $? = 1 ]; }; '
        'then eval "$__bf_cmd"; '
        'else exec bash --norc --noprofile -c "$__bf_cmd"; fi'
    )


_TOKEN = re.compile(r"^[0-9a-f]{8,64}$")


def _check_token(token: str) -> str:
    # Tokens are spliced into remote shell text unquoted: only ever our own hex.
    if not _TOKEN.match(token):
        raise ValueError(f"internal error: bad token {token!r}")
    return token


async def kill_remote_group(
    transport: Transport,
    token: str,
    grace: float = 2.0,
    *,
    secrets_token: str | None = None,
) -> None:
    """TERM then KILL the process group of the command started with ``token``: the pid its
    leader wrote to ``~/.bifrost/run/<token>`` (timeouts), plus the group of every process whose
    environment carries ``BIFROST_EXEC_ID=<token>`` (found through /proc, so it works with no
    pid file, e.g. after a Ctrl-C). Also removes the command's secrets file if it never ran."""
    tok = _check_token(token)
    f = f'"$HOME/.bifrost/run/{tok}"'
    steps = max(1, int(grace / 0.1))
    cleanup = f"rm -f {f}"
    if secrets_token:
        cleanup += f' "$HOME/.bifrost/secrets/{_check_token(secrets_token)}"'
    script = (
        f"gs=$(cat {f} 2>/dev/null); me=$(ps -o pgid= -p $$ 2>/dev/null | tr -d ' '); "
        f"for e in $(grep -lzx BIFROST_EXEC_ID={tok} /proc/[0-9]*/environ 2>/dev/null); do "
        's=$(cat "${e%/environ}/stat" 2>/dev/null) || continue; r=${s##*) }; set -- $r; '
        'gs="$gs $3"; done; '
        # Never signal group 0/1 or this cleanup command's own group.
        'live=""; for g in $gs; do case "$g" in ""|0|1|"$me") continue;; esac; '
        'kill -TERM -- -"$g" 2>/dev/null && live="$live $g"; done; '
        f'i=0; while [ -n "$live" ] && [ $i -lt {steps} ]; do n=""; '
        'for g in $live; do kill -0 -- -"$g" 2>/dev/null && n="$n $g"; done; live=$n; '
        '[ -n "$live" ] && sleep 0.1; i=$((i+1)); done; '
        'for g in $live; do kill -KILL -- -"$g" 2>/dev/null; done; '
        f"{cleanup}; true"
    )
    await transport.run(script)


class _Collector:
    def __init__(self, tee: OutputSink | None, *, keep: bool = True) -> None:
        self.parts: list[bytes] = []
        self.tee = tee
        self.keep = keep

    def __call__(self, chunk: bytes) -> Awaitable[None] | None:
        if self.keep:
            self.parts.append(chunk)
        return self.tee(chunk) if self.tee is not None else None  # the tee's backlog, if any

    def text(self) -> str:
        return b"".join(self.parts).decode("utf-8", errors="replace")


def echo_sink(stream: str) -> OutputSink:
    """A sink that writes raw bytes to this process's stdout or stderr."""
    out = sys.stdout if stream == "stdout" else sys.stderr

    def sink(chunk: bytes) -> None:
        out.buffer.write(chunk)
        out.flush()

    return sink


async def run_command(
    transport: Transport,
    command: str,
    *,
    env: Mapping[str, str] | None = None,
    secrets: Mapping[str, str] | None = None,
    cwd: str | None = None,
    timeout: float | None = None,
    stdin: StdinSource = None,
    merge_stderr: bool = False,
    on_stdout: OutputSink | None = None,
    on_stderr: OutputSink | None = None,
    on_timeout: Callable[[], None] | None = None,
    capture: bool = True,
) -> tuple[Result, bool]:
    """Run one command; returns (Result, timed_out). Never raises on a non-zero exit.

    ``capture=False`` passes output to the sinks only (the Result's stdout/stderr stay empty):
    for output that need not, or cannot, fit in memory.
    """
    target = transport.target.display
    started = time.monotonic()
    token = _secrets.token_hex(8)
    secrets_token = _secrets.token_hex(8) if secrets else None
    secret_lines = env_lines(secrets) if secrets else ""
    # Local commands die with their process group when cancelled (LocalTransport kills it);
    # on SSH the exported token lets a Ctrl-C find and kill the remote group.
    wire = build_command(
        command,
        env=env,
        cwd=cwd,
        pid_token=token if timeout is not None else None,
        secrets_token=secrets_token,
        exec_token=None if transport.target.is_local else token,
    )  # validates every name first: a bad one must not leave a secrets file behind
    out, err = _Collector(on_stdout, keep=capture), _Collector(on_stderr, keep=capture)
    timed_out = False
    try:
        if secrets_token is not None:
            # Secrets travel on stdin into a 0600 file: never argv, never sshd's environment.
            write = (
                'umask 077 && mkdir -p "$HOME/.bifrost/secrets" && '
                f'cat > "$HOME/.bifrost/secrets/{secrets_token}"'
            )
            await transport.run(write, stdin=secret_lines.encode())
        rc = await asyncio.wait_for(
            transport.run(
                wire, stdin=stdin, on_stdout=out, on_stderr=err, merge_stderr=merge_stderr
            ),
            timeout,
        )
    except TimeoutError:
        timed_out = True
        rc = 124
        if on_timeout is not None:
            on_timeout()
        await kill_remote_group(transport, token, secrets_token=secrets_token)
    except asyncio.CancelledError:
        if transport.target.is_local:
            raise
        # Ctrl-C: closing the channel does not stop a command that has no pty, so kill its
        # process group too; best effort and quick, the user is waiting for their prompt.
        # (LocalTransport has already killed the local group itself.)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(
                kill_remote_group(transport, token, 1.0, secrets_token=secrets_token), 3.0
            )
        raise
    result = Result(
        command=command,
        target=target,
        exit_code=rc,
        stdout=out.text(),
        stderr=err.text(),
        duration=time.monotonic() - started,
    )
    return result, timed_out
