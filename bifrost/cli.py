"""``bifrost`` command line: exec, push, run, jobs, status, logs, wait, kill, pull, upload, gpus,
forget, ssh, attach, completion. Exit codes mirror the remote command; bad input is one line,
no traceback.

Built on argparse with every heavy import deferred to the command that needs it: a CLI call is
a new process each time, and importing typer/rich (~0.2 s) or asyncssh (~0.4 s) on every
``bifrost status`` would make it slower than the ``ssh`` it replaces.

Argument rules (`exec`, `run`, `ssh`): options may come before or after TARGET, and option
parsing stops at the first word of the command, so ``bifrost exec HOST ls -la`` and
``bifrost run HOST python train.py -w x`` pass ``-la`` / ``-w x`` on. One command argument is a
shell command line (``bifrost exec HOST 'tail -n 5 log | grep x'``); several are an exact argv,
quoted for the remote shell (``bifrost exec HOST -- printf '[%s]\\n' 'a b'`` prints ``[a b]``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from bifrost.errors import (
    BifrostError,
    CommandError,
    ConnectError,
    JobError,
    JobTimeout,
    TargetError,
)

# `typing` costs ~5 ms at import; every CLI call imports this module, and mypy treats a
# local TYPE_CHECKING like typing's.
TYPE_CHECKING = False

if TYPE_CHECKING:
    from typing import Any, NoReturn

    from bifrost.group import Group, HostOutcome
    from bifrost.host import Host
    from bifrost.jobs import JobStatus

MAX_TAIL = 1_000_000_000  # far more lines than any log; beyond it `tail -n` itself may refuse
PROG = "bifrost"


class _Exit(Exception):
    def __init__(self, code: int) -> None:
        self.code = code


def _fail(message: str, code: int = 2) -> NoReturn:
    sys.stderr.write(f"error: {message}\n")
    raise _Exit(code)


def _print(text: str = "") -> None:
    sys.stdout.write(text + "\n")


def _print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def _color(text: str, color: str) -> str:
    """ANSI colour on a terminal only (and never with NO_COLOR): pipes get plain text."""
    codes = {"red": 31, "green": 32, "yellow": 33, "magenta": 35, "cyan": 36}
    if not sys.stdout.isatty() or os.environ.get("NO_COLOR") or color not in codes:
        return text
    return f"\033[{codes[color]}m{text}\033[0m"


def _table(
    headers: Sequence[str], rows: Sequence[Sequence[str]], colors: Sequence[str] = ()
) -> str:
    """Columns padded to their widest cell; nothing is ever cut or wrapped, so each row stays
    one line for `grep` and `awk` whatever the terminal width. ``colors`` (one per row, or
    empty) colours the second column on a terminal."""
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]
    lines = []
    for i, row in enumerate([list(headers), *[list(r) for r in rows]]):
        cells = [c.ljust(w) for c, w in zip(row, widths, strict=True)]
        if i > 0 and colors and len(cells) > 1:
            cells[1] = _color(cells[1], colors[i - 1])
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


# -- option values ------------------------------------------------------------------------------
def _identity(value: str | None, remembered: str | None = None) -> str | None:
    """The private key: ``-i``, else the one the job was started with, else
    ``$BIFROST_IDENTITY_FILE``, else ``$SSH_KEY_PATH`` (broker's setting, so one key serves both
    tools). A named file that does not exist is an error naming where it came from."""
    if value is not None:
        source = "--identity"
    elif remembered is not None and Path(remembered).expanduser().is_file():
        return remembered
    else:
        for var in ("BIFROST_IDENTITY_FILE", "SSH_KEY_PATH"):
            if os.environ.get(var):
                value, source = os.environ[var], var
                break
    if value is None:
        return None
    if not Path(value).expanduser().is_file():
        sep = " " if source.startswith("-") else "="
        _fail(f"{source}{sep}{value}: no such key file (give the path of a private key)")
    return str(Path(value).expanduser())


def _host(spec: str, identity: str | None, *, hold: bool = False) -> Host:
    """``hold``: reach the host through its connection holder (see ``bifrost.holder``): the
    commands a user repeats (exec, run, status, logs, wait, kill, jobs) skip the handshake."""
    from bifrost.host import Host

    return Host(spec, identity_file=identity, hold=hold)


def _group(targets: list[str], identity: str | None, concurrency: int = 16) -> Group:
    from bifrost.group import Group

    if len(targets) == 1:  # one host: the held connection, as for `status`
        return Group([_host(targets[0], identity, hold=True)], concurrency=concurrency)
    return Group(targets, concurrency=concurrency, identity_file=identity)


def _check_seconds(option: str, value: float | None) -> None:
    if value is not None and not (math.isfinite(value) and value > 0):
        _fail(f"{option} {value}: give a number of seconds greater than 0")


def _targets(spec: str) -> list[str]:
    """``a,b,c`` or ``@file`` (one target per line) → target strings."""
    from bifrost.target import parse_target

    if spec.startswith("@"):
        try:
            lines = Path(spec[1:]).read_text().splitlines()
        except OSError as exc:
            _fail(f"cannot read hosts file {spec[1:]!r}: {exc.strerror}")
        items = [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]
    else:
        items = [s.strip() for s in spec.split(",") if s.strip()] if "," in spec else [spec]
    for item in items:
        parse_target(item)  # fail fast with a clear message
    return items


def _env(pairs: list[str] | None) -> dict[str, str]:
    from bifrost._wire import check_env_name

    env: dict[str, str] = {}
    for pair in pairs or []:
        if "=" not in pair:
            _fail(f"--env {pair!r} must look like NAME=VALUE")
        k, v = pair.split("=", 1)
        try:
            check_env_name(k)
        except ValueError as exc:
            _fail(f"--env {pair!r}: {exc}")
        env[k] = v
    return env


def _secrets(names: list[str] | None) -> dict[str, str]:
    from bifrost._wire import check_env_name

    secrets: dict[str, str] = {}
    for name in names or []:
        try:
            check_env_name(name)
        except ValueError as exc:
            _fail(f"--secret-env {name!r}: {exc}")
        if name not in os.environ:
            _fail(f"--secret-env {name}: no such variable in your local environment")
        secrets[name] = os.environ[name]
    return secrets


def command_line(words: Sequence[str]) -> str:
    """The remote command for the words after TARGET: one word is a shell command line as
    typed; several are an exact argv, each word quoted for the remote shell."""
    if len(words) == 1:
        return words[0]
    return shlex.join(words)


def _command(words: list[str], what: str) -> str:
    cmd = command_line(words)
    if not cmd.strip():
        _fail(f"the command is empty: give the {what} to run")
    return cmd


def _job_args(a: str, b: str | None, identity: str | None) -> tuple[str, str, str | None]:
    """``TARGET JOB`` or just ``JOB`` (its target, and the key it was started with,
    remembered from `bifrost run`) → (target, job id, identity)."""
    from bifrost.jobs import remembered_job

    target, job_id = (a, b) if b is not None else (None, a)
    known_target, known_key = remembered_job(job_id)
    if target is None:
        if known_target is None:
            _fail(
                f"unknown job {job_id!r} on this machine: pass the target too "
                f"(bifrost ... TARGET {job_id})"
            )
        target = known_target
    elif known_target != target:
        known_key = None  # the key of the job's own host only
    return target, job_id, _identity(identity, known_key)


# -- commands -----------------------------------------------------------------------------------
def cmd_exec(a: argparse.Namespace) -> None:
    """Run a command and stream its output; exit with its exit code."""
    cmd = _command(a.command, "shell command")
    _check_seconds("--timeout", a.timeout)
    envs, secrets = _env(a.env), _secrets(a.secret_env)
    targets = _targets(a.target)
    identity = _identity(a.identity)
    if len(targets) > 1:
        group = _group(targets, identity, concurrency=a.concurrency)
        outcomes = group.exec(
            cmd, env=envs, secrets=secrets, cwd=a.cwd, timeout=a.timeout, merge_stderr=a.merge,
            echo=not a.json,
        )  # fmt: skip
        _report_outcomes(outcomes, a.json)
        raise _Exit(0 if all(o.ok for o in outcomes) else 1)
    if _exec_held(targets[0], identity, cmd, envs, secrets, a):
        return
    host = _host(targets[0], identity)
    try:
        result = host.exec(
            cmd, env=envs, secrets=secrets, cwd=a.cwd, timeout=a.timeout, warn=True,
            merge_stderr=a.merge, echo=not a.json, capture=a.json,
        )  # fmt: skip
    except CommandError as exc:  # a timeout
        if a.json:
            _print_json({**exc.result.to_dict(), "error": str(exc)})
        else:
            sys.stderr.write(f"error: {exc}\n")
        raise _Exit(124) from None
    if a.json:
        _print_json(result.to_dict())
    raise _Exit(result.exit_code)


def _exec_held(
    spec: str,
    identity: str | None,
    cmd: str,
    envs: dict[str, str],
    secrets: dict[str, str],
    a: argparse.Namespace,
) -> bool:
    """`exec` through the host's connection holder: no asyncio/asyncssh import, no handshake.
    Exits (raises _Exit) when the holder ran the command; False when there is no usable holder
    (one is started for next time) and the caller connects directly."""
    from bifrost import holder

    if not holder.enabled():
        return False
    from bifrost.paths import known_hosts_path
    from bifrost.target import parse_target

    target = parse_target(spec)
    if target.is_local:
        return False
    if identity is not None:
        target = target.with_identity(str(Path(identity).expanduser().absolute()))
        identity = target.identity_files[0]
    out: list[bytes] = []
    err: list[bytes] = []

    def sink(stream: Any, parts: list[bytes]) -> Callable[[bytes], None]:
        def write(data: bytes) -> None:
            if a.json:
                parts.append(data)  # printed in the JSON answer
            else:
                stream.buffer.write(data)  # streamed only: output may be larger than memory
                stream.flush()

        return write

    request = {"command": cmd, "env": envs, "secrets": secrets, "cwd": a.cwd,
               "timeout": a.timeout, "merge": a.merge}  # fmt: skip
    answer = holder.exec_via_holder(
        target, spec, identity, known_hosts_path(), request,
        sink(sys.stdout, out), sink(sys.stderr, err),
    )  # fmt: skip
    if answer is None:
        return False
    result = {
        "target": target.display, "command": cmd, "exit_code": answer["exit_code"],
        "stdout": b"".join(out).decode("utf-8", "replace"),
        "stderr": b"".join(err).decode("utf-8", "replace"),
        "duration": round(float(answer.get("duration", 0.0)), 4),
    }  # fmt: skip
    if answer.get("timed_out"):
        message = f"command timed out after {a.timeout:g}s on {target.display}: {cmd!r}"
        if a.json:
            _print_json({**result, "error": message})
        else:
            sys.stderr.write(f"error: {message}\n")
        raise _Exit(124)
    if a.json:
        _print_json(result)
    raise _Exit(int(answer["exit_code"]))


def _report_outcomes(outcomes: list[HostOutcome[Any]], as_json: bool) -> None:
    if as_json:
        rows = []
        for o in outcomes:
            value = (
                o.value.to_dict()
                if o.value is not None and hasattr(o.value, "to_dict")
                else o.value
            )
            rows.append({"host": o.host, "ok": o.ok, "error": o.reason, "result": value})
        _print_json(rows)
        return
    failed = [o for o in outcomes if not o.ok]
    for o in failed:
        sys.stderr.write(f"[{o.host}] FAILED: {o.reason}\n")
    sys.stderr.write(f"{len(outcomes) - len(failed)}/{len(outcomes)} hosts ok\n")


def cmd_push(a: argparse.Namespace) -> None:
    """Sync a project (git-tracked + untracked-not-ignored files) to ~/.bifrost/workspaces/NAME."""
    path = Path(a.path)
    if a.extra and not a.bootstrap:
        _fail("--extra only applies to --bootstrap: add --bootstrap (or drop --extra)")
    if a.bootstrap and not (path / "uv.lock").is_file():
        _fail(f"--bootstrap needs a uv.lock in {path} (run `uv lock` there, or drop --bootstrap)")
    res = _host(a.target, _identity(a.identity)).push(
        path, name=a.name, bootstrap=a.bootstrap, extras=a.extra or [],
        progress=sys.stderr.isatty(), submodules=a.submodules, force=a.force,
    )  # fmt: skip
    if a.json:
        _print_json(res.to_dict())
        return
    git = f" git {res.git_sha[:10]}{'+dirty' if res.dirty else ''}" if res.git_sha else ""
    env = f", env {res.bootstrapped}" if res.bootstrapped else ""
    env += " (uv installed)" if res.uv_installed else ""
    _print(
        f"pushed {res.files} files ({res.deleted} deleted) to {res.target}:{res.workspace} "
        f"via {res.method} in {res.duration:.1f}s{git}{env}"
    )


def cmd_run(a: argparse.Namespace) -> None:
    """Start a detached job; prints its id (one round trip)."""
    cmd = _command(a.command, "job's command")
    opts: dict[str, Any] = {
        "name": a.name, "cwd": a.cwd, "workspace": a.workspace, "env": _env(a.env),
        "secrets": _secrets(a.secret_env), "outputs": a.output or [],
    }  # fmt: skip
    targets = _targets(a.target)
    identity = _identity(a.identity)
    if len(targets) > 1 and a.follow:
        _fail("--follow needs a single target: follow each job with `bifrost logs -f JOB`")
    if len(targets) > 1:
        outcomes = _group(targets, identity).run(cmd, **opts)
        if a.json:
            _print_json(
                [
                    {"host": o.host, "job": o.value.id if o.value else None, "error": o.error}
                    for o in outcomes
                ]
            )
        else:
            for o in outcomes:
                _print(f"[{o.host}] {o.value.id if o.value else 'FAILED: ' + str(o.error)}")
        raise _Exit(0 if all(o.ok for o in outcomes) else 1)
    host = _host(targets[0], identity, hold=True)
    job = host.run(cmd, **opts)
    if a.json:
        _print_json({"job": job.id, "target": host.spec})
    else:
        _print(job.id)
    sys.stdout.flush()
    if a.follow:
        raise _Exit(_ended(job.follow(_emit_line)))


def _emit_line(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _status_code(st: JobStatus) -> int:
    if st.exit_code is not None:
        return st.exit_code
    return {"cancelled": 130, "lost": 255, "died": 255}.get(st.state, 1)


def _ended(st: JobStatus) -> int:
    """Exit code for a follow that ended, saying so on stderr when the job did not finish."""
    why = {
        "lost": "the box rebooted since it started",
        "died": "its wrapper process is gone without an exit code",
    }
    if st.state in why:
        sys.stderr.write(f"bifrost: job {st.id} {st.state}: {why[st.state]}\n")
    return _status_code(st)


_STATE_COLORS = {"running": "cyan", "succeeded": "green", "failed": "red", "cancelled": "yellow"}


def _status_table(rows: list[JobStatus], with_host: bool = False) -> str:
    headers = (["host"] if with_host else []) + ["job", "state", "code", "started", "ended"]
    cells = [
        [*([s.target] if with_host else []), s.id, s.state,
         "" if s.exit_code is None else str(s.exit_code), s.started_at or "", s.ended_at or "",
         " ".join((s.command or "").split())]
        for s in rows
    ]  # fmt: skip
    colors = [] if with_host else [_STATE_COLORS.get(s.state, "magenta") for s in rows]
    return _table([*headers, "command"], cells, colors)


def cmd_jobs(a: argparse.Namespace) -> None:
    """List jobs on a host (or several)."""
    targets = _targets(a.target)
    outcomes = _group(targets, _identity(a.identity)).status(None)
    rows = [s for o in outcomes for s in (o.value or [])]
    if a.json:
        _print_json([s.to_dict() for s in rows])
    else:
        _print(_status_table(rows, with_host=len(targets) > 1))
    for o in outcomes:
        if o.error:
            sys.stderr.write(f"[{o.host}] {o.error}\n")
    raise _Exit(0 if all(o.ok for o in outcomes) else 1)


def cmd_status(a: argparse.Namespace) -> None:
    """Show a job's state: running, succeeded, failed, cancelled, lost (reboot) or died."""
    target, job_id, identity = _job_args(a.target_or_job, a.job, a.identity)
    st = _host(target, identity, hold=True).job(job_id).status()
    if a.json:
        _print_json(st.to_dict())
    else:
        _print(_status_table([st]))


def cmd_logs(a: argparse.Namespace) -> None:
    """Print a job's log; with -f follow it and exit with the job's exit code."""
    if a.tail is not None and not 0 <= a.tail <= MAX_TAIL:
        _fail(f"--tail {a.tail}: give a number of lines between 0 and {MAX_TAIL}")
    target, job_id, identity = _job_args(a.target_or_job, a.job, a.identity)
    j = _host(target, identity, hold=True).job(job_id)
    if a.follow:
        if a.json:
            # JSON Lines: one object per log line as it comes, then the final status.
            st = j.follow(lambda line: _emit_line(json.dumps({"line": line})), tail=a.tail)
            _emit_line(json.dumps({"status": st.to_dict()}))
        else:
            st = j.follow(_emit_line, tail=a.tail)
        raise _Exit(_ended(st))
    text = j.logs(tail=a.tail)
    if a.json:
        _print_json({"job": job_id, "target": target, "log": text})
    else:
        sys.stdout.write(text)


def cmd_wait(a: argparse.Namespace) -> None:
    """Wait for a job to end; exit with its exit code."""
    _check_seconds("--timeout", a.timeout)
    target, job_id, identity = _job_args(a.target_or_job, a.job, a.identity)
    try:
        st = _host(target, identity, hold=True).job(job_id).wait(a.timeout)
    except JobTimeout as exc:
        _fail(str(exc), 124)
    if a.json:
        _print_json(st.to_dict())
    else:
        code = f" ({st.exit_code})" if st.exit_code is not None else ""
        sys.stderr.write(f"{st.id}: {st.state}{code}\n")
    raise _Exit(_status_code(st))


def cmd_kill(a: argparse.Namespace) -> None:
    """Cancel a job: TERM its whole process group, KILL after --grace seconds."""
    target, job_id, identity = _job_args(a.target_or_job, a.job, a.identity)
    result = _host(target, identity, hold=True).job(job_id).kill(a.grace)
    if a.json:
        _print_json({"job": job_id, "target": target, "result": result})
    else:
        _print(f"{job_id}: {result}")


def cmd_pull(a: argparse.Namespace) -> None:
    """Download a file or tree (`~` is the remote home), or a finished job's results."""
    items: list[str] = a.paths
    if a.job is None and (not items or len(items) > 2):
        _fail(
            "usage: bifrost pull TARGET REMOTE [LOCAL]  or  bifrost pull TARGET --job JOB [LOCAL]"
        )
    if a.job is not None and len(items) > 1:
        _fail("with --job give at most one LOCAL directory")
    host = _host(a.target, _identity(a.identity))
    progress = sys.stderr.isatty()
    if a.job is not None:
        dest = host.job(a.job).pull_results(Path(items[0] if items else "."), progress=progress)
        source = f"job {a.job}"
    else:
        dest = host.pull(items[0], Path(items[1] if len(items) > 1 else "."), progress=progress)
        source = items[0]
    if a.json:
        _print_json({"target": a.target, "source": source, "dest": str(dest)})
    else:
        _print(f"pulled {a.job if a.job is not None else source} to {dest}")


def cmd_upload(a: argparse.Namespace) -> None:
    """Upload a file or directory tree."""
    dest = _host(a.target, _identity(a.identity)).upload(
        Path(a.local), a.remote, progress=sys.stderr.isatty()
    )
    if a.json:
        _print_json({"target": a.target, "local": a.local, "remote": dest})
    else:
        _print(f"uploaded {a.local} to {dest}")


def cmd_gpus(a: argparse.Namespace) -> None:
    """nvidia-smi summary: name, memory used/total, utilisation, processes."""
    from bifrost._loop import run_sync
    from bifrost.gpus import GPUReport, agpus

    all_targets = [t for spec in a.targets for t in _targets(spec)]
    group = _group(all_targets, _identity(a.identity))
    outcomes: list[HostOutcome[GPUReport]] = run_sync(group._each(agpus))
    if a.json:
        _print_json(
            [o.value.to_dict() if o.value else {"host": o.host, "error": o.error} for o in outcomes]
        )
        raise _Exit(0 if all(o.ok for o in outcomes) else 1)
    rows: list[list[str]] = []
    for o in outcomes:
        if o.value is None:
            rows.append([o.host, "", str(o.error), "", "", ""])
        elif not o.value.available:
            rows.append([o.host, "-", o.value.message, "", "", ""])
        for g in o.value.gpus if o.value else []:
            procs = ", ".join(f"{p.name}({p.pid}) {p.memory_mib or '?'}MiB" for p in g.processes)
            rows.append([
                o.host, str(g.index), g.name, f"{g.memory_used_mib}/{g.memory_total_mib} MiB",
                f"{g.utilization_pct}%", procs or "-",
            ])  # fmt: skip
    _print(_table(["host", "gpu", "name", "memory", "util", "processes"], rows))
    raise _Exit(0 if all(o.ok for o in outcomes) else 1)


def cmd_forget(a: argparse.Namespace) -> None:
    """Forget a pinned host key (after a box was legitimately re-imaged)."""
    from bifrost.hostkeys import KnownHosts, host_port
    from bifrost.target import parse_target

    t = parse_target(a.host)  # the one target parser: host:port, [v6]:port, ::1, alias, ssh -p
    if t.is_local:
        _fail("`local` has no host key to forget")
    kh = KnownHosts()
    removed = kh.forget_entries(t.host, t.port if t.explicit_port else None)
    if not removed:
        where = host_port(t.host, t.port) if t.explicit_port else f"{t.host} (any port)"
        _fail(f"no pinned key for {where} in {kh.path}", 1)
    _print(f"forgot {len(removed)} key(s): {', '.join(removed)}")


def _ssh_argv(host: Host, tty: bool) -> list[str]:
    if host.target.is_local:
        _fail("`local` needs no ssh: just run the command")
    from bifrost.transport.openssh import ssh_argv

    # The exact options rsync uses (pinned keys, hops), minus BatchMode: a human is typing.
    argv, dest = ssh_argv(host.target, host.known_hosts.path, batch=False)
    if tty:
        argv.append("-t")
    return [*argv, dest.replace("[", "").replace("]", "")]


def cmd_ssh(a: argparse.Namespace) -> None:
    """Interactive ssh with bifrost's pinned host keys."""
    host = _host(a.target, _identity(a.identity))
    if host.target.is_local:
        _fail("`local` needs no ssh: just run the command")
    host.connect()  # pins the key (TOFU) before ssh checks it
    host.close()
    argv = _ssh_argv(host, tty=sys.stdin.isatty())
    os.execvp("ssh", [*argv, *a.command])  # noqa: S606 - hand the terminal to ssh


def cmd_attach(a: argparse.Namespace) -> None:
    """Watch a running job in its tmux session on the box (detach: tmux prefix + d)."""
    target, job_id, identity = _job_args(a.target_or_job, a.job, a.identity)
    host = _host(target, identity)
    j = host.job(job_id)
    st, session = j.attach_info()
    if st.done:
        code = "" if st.exit_code is None else f", exit code {st.exit_code}"
        sys.stderr.write(f"{job_id} has already ended ({st.state}{code}); its log:\n")
        sys.stdout.write(j.logs())
        raise _Exit(_status_code(st))
    reason = None
    if session is None:
        reason = f"tmux is not available on {j.host.name}"
    elif not (sys.stdin.isatty() and sys.stdout.isatty()):
        reason = "not on a terminal"
    if a.no_tmux or session is None or reason is not None:
        if not a.no_tmux:
            sys.stderr.write(
                f"{reason}: following the log instead "
                "(Ctrl-C stops following; the job keeps running)\n"
            )
        raise _Exit(_ended(j.follow(_emit_line)))
    host.close()
    if host.target.is_local:
        os.execvp("bash", ["bash", "--norc", "--noprofile", "-c", j.tmux_command(session)])  # noqa: S606
    argv = _ssh_argv(host, tty=True)
    os.execvp("ssh", [*argv, j.tmux_command(session)])  # noqa: S606 - hand the terminal over


def cmd_completion(a: argparse.Namespace) -> None:
    """Print a shell completion script: `source <(bifrost completion bash)` (zsh alike), or
    `bifrost completion fish | source`."""
    from bifrost._completion import script

    sys.stdout.write(script(a.shell, build_parser()))


# -- parser -------------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, like every other bad input; `-h` shows the full usage.
        _fail(f"{message} (see `{self.prog} -h`)")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gpu-broker")
    except PackageNotFoundError:
        return "unknown"


class _VersionAction(argparse.Action):
    def __init__(self, option_strings: list[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, help="Print the version and exit.")

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        _print(f"bifrost {_version()}")
        raise _Exit(0)


# Subcommands whose positional arguments end with a command: option parsing stops at its first
# word (after this many positionals).
_COMMAND_AFTER = {"exec": 1, "run": 1, "ssh": 1}


class _Skipped:
    """Stands in for the subparsers a call does not need: building all fifteen costs ~10 ms
    of CPU on every call, more than the holder's round trip."""

    def add_argument(self, *args: Any, **kwargs: Any) -> None:
        return None


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The whole command line (used for parsing, help and completion scripts); with ``only``,
    just that subcommand's parser is built."""
    p = _Parser(
        prog=PROG,
        description="Run commands, sync code and manage detached jobs on any SSH box (or "
        "`local`). TARGET is user@host[:port], ssh://..., 'ssh -p P user@host', [v6]:port, an "
        "~/.ssh/config alias or 'local'; a,b,c or @file for several hosts where allowed.",
    )
    p.add_argument("--version", action=_VersionAction)
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND", parser_class=_Parser)

    def add(name: str, func: Callable[[argparse.Namespace], None], text: str) -> Any:
        if only is not None and name != only:
            return _Skipped()
        doc = (func.__doc__ or "").strip()
        sp: _Parser = sub.add_parser(name, help=text, description=doc)
        sp.set_defaults(func=func)
        return sp

    def identity(sp: Any) -> None:
        sp.add_argument(
            "-i", "--identity", metavar="KEY",
            help="Private key file (default: $BIFROST_IDENTITY_FILE, else $SSH_KEY_PATH).",
        )  # fmt: skip

    def as_json(sp: Any) -> None:
        sp.add_argument("--json", action="store_true", help="Machine-readable output.")

    def command(sp: Any, what: str) -> None:
        sp.add_argument(
            "command", nargs="*", metavar="COMMAND",
            help=f"{what}: one argument is a shell command line, several an exact argv; "
            "options after its first word are the command's (`--` before it also works).",
        )  # fmt: skip

    def env_opts(sp: Any) -> None:
        sp.add_argument("-e", "--env", action="append", metavar="NAME=VALUE",
                        help="Set a variable (repeatable).")  # fmt: skip
        sp.add_argument("--secret-env", action="append", metavar="NAME",
                        help="Send this local variable via a 0600 file, never argv.")  # fmt: skip
        sp.add_argument("--cwd", metavar="DIR", help="Remote working directory.")

    def job_args(sp: Any) -> None:
        sp.add_argument("target_or_job", metavar="[TARGET] JOB")
        sp.add_argument("job", nargs="?", help=argparse.SUPPRESS)

    sp = add("exec", cmd_exec, "Run a command; exit with its exit code.")
    sp.add_argument("target", metavar="TARGET")
    command(sp, "The command")
    env_opts(sp)
    sp.add_argument("--timeout", type=float, metavar="SECONDS",
                    help="Kill the remote process group after this long (exit 124).")  # fmt: skip
    sp.add_argument("--merge", action="store_true", help="Merge stderr into stdout.")
    sp.add_argument("--concurrency", type=int, default=16, metavar="N",
                    help="Hosts at a time (default 16).")  # fmt: skip
    identity(sp)
    as_json(sp)

    sp = add("push", cmd_push, "Sync a project to ~/.bifrost/workspaces/NAME.")
    sp.add_argument("target", metavar="TARGET")
    sp.add_argument("path", nargs="?", default=".", metavar="PATH",
                    help="Project directory (default .).")  # fmt: skip
    sp.add_argument("--name", help="Workspace name (default: the directory's name).")
    sp.add_argument("--bootstrap", action="store_true",
                    help="uv sync --locked into a venv on the box.")  # fmt: skip
    sp.add_argument("--extra", action="append", metavar="EXTRA",
                    help="uv extra for --bootstrap (repeatable).")  # fmt: skip
    sp.add_argument("--submodules", action="store_true",
                    help="Push the files of git submodules too (refused without it).")  # fmt: skip
    sp.add_argument("--force", action="store_true",
                    help="Take over a workspace another local directory pushed to.")  # fmt: skip
    identity(sp)
    as_json(sp)

    sp = add("run", cmd_run, "Start a detached job; prints its id.")
    sp.add_argument("target", metavar="TARGET")
    command(sp, "The job's command")
    sp.add_argument("--name", help="Job name (free text).")
    sp.add_argument("-w", "--workspace", metavar="NAME", help="Run in this pushed workspace.")
    env_opts(sp)
    sp.add_argument("-o", "--output", action="append", metavar="PATH",
                    help="Result path for `pull --job` (repeatable).")  # fmt: skip
    sp.add_argument("-f", "--follow", action="store_true",
                    help="Follow the log until the job ends; exit with its code.")  # fmt: skip
    identity(sp)
    as_json(sp)

    sp = add("jobs", cmd_jobs, "List jobs on a host (or several).")
    sp.add_argument("target", metavar="TARGET")
    identity(sp)
    as_json(sp)

    sp = add("status", cmd_status, "A job's state.")
    job_args(sp)
    identity(sp)
    as_json(sp)

    sp = add("logs", cmd_logs, "Print or follow a job's log.")
    job_args(sp)
    sp.add_argument("-f", "--follow", action="store_true",
                    help="Follow until the job ends; exit with its code.")  # fmt: skip
    sp.add_argument("-n", "--tail", type=int, metavar="N", help="Only the last N lines.")
    identity(sp)
    as_json(sp)

    sp = add("wait", cmd_wait, "Wait for a job to end; exit with its code.")
    job_args(sp)
    sp.add_argument("--timeout", type=float, metavar="SECONDS",
                    help="Give up after this long (exit 124; the job keeps running).")  # fmt: skip
    identity(sp)
    as_json(sp)

    sp = add("kill", cmd_kill, "Cancel a job.")
    job_args(sp)
    sp.add_argument("--grace", type=float, default=5.0, metavar="SECONDS",
                    help="Seconds between TERM and KILL (default 5).")  # fmt: skip
    identity(sp)
    as_json(sp)

    sp = add("pull", cmd_pull, "Download a file or tree, or a job's results.")
    sp.add_argument("target", metavar="TARGET")
    sp.add_argument("paths", nargs="*", metavar="[REMOTE] [LOCAL]")
    sp.add_argument("--job", help="Pull this job's dir and outputs into LOCAL/JOB/.")
    identity(sp)
    as_json(sp)

    sp = add("upload", cmd_upload, "Upload a file or tree.")
    sp.add_argument("target", metavar="TARGET")
    sp.add_argument("local", metavar="LOCAL")
    sp.add_argument("remote", nargs="?", default="~", metavar="REMOTE",
                    help="Remote path (default ~, the remote home).")  # fmt: skip
    identity(sp)
    as_json(sp)

    sp = add("gpus", cmd_gpus, "nvidia-smi summary of one or more hosts.")
    sp.add_argument("targets", nargs="+", metavar="TARGET")
    identity(sp)
    as_json(sp)

    sp = add("forget", cmd_forget, "Forget a pinned host key.")
    sp.add_argument("host", metavar="HOST", help="host, host:port, [v6]:port or a target.")

    sp = add("ssh", cmd_ssh, "Interactive ssh with bifrost's pinned host keys.")
    sp.add_argument("target", metavar="TARGET")
    sp.add_argument("command", nargs="*", metavar="COMMAND", help="Optional remote command.")
    identity(sp)

    sp = add("attach", cmd_attach, "Watch a running job in its tmux session.")
    job_args(sp)
    sp.add_argument("--no-tmux", action="store_true",
                    help="Follow the log here instead of in tmux.")  # fmt: skip
    identity(sp)

    sp = add("completion", cmd_completion, "Print a shell completion script.")
    sp.add_argument("shell", choices=["bash", "zsh", "fish"])
    return p


def split_command(parser: argparse.ArgumentParser, args: Sequence[str], before: int) -> int:
    """Index in ``args`` where the command starts: after ``before`` positionals, at the first
    word that is not an option (or just after ``--``); options in between are parsed. Returns
    ``len(args)`` when there is no command."""
    takes_value: dict[str, bool] = {}
    for action in parser._actions:
        for opt in action.option_strings:
            takes_value[opt] = action.nargs != 0
    seen = 0
    i = 0
    while i < len(args):
        word = args[i]
        if word == "--":
            return i
        if word.startswith("-") and len(word) > 1 and seen <= before:
            name = word.split("=", 1)[0]
            if name in takes_value:
                i += 2 if takes_value[name] and "=" not in word else 1
            elif word[:2] in takes_value and not word.startswith("--"):
                i += 1  # -ikey: a short option with its value attached
            else:
                i += 1  # unknown: argparse reports it
            continue
        if seen == before:
            return i
        seen += 1
        i += 1
    return len(args)


# `exec`'s options for the fast parse below: option → (dest, takes a value, repeatable).
_EXEC_OPTS = {
    "-i": ("identity", True, False), "--identity": ("identity", True, False),
    "-e": ("env", True, True), "--env": ("env", True, True),
    "--secret-env": ("secret_env", True, True), "--cwd": ("cwd", True, False),
    "--timeout": ("timeout", True, False), "--concurrency": ("concurrency", True, False),
    "--merge": ("merge", False, False), "--json": ("json", False, False),
}  # fmt: skip


def _parse_exec_fast(rest: list[str]) -> argparse.Namespace | None:
    """`exec` parsed without building an argparse parser (~20 ms of a call that should take
    less than an ssh handshake). The same Namespace as argparse's; None for anything
    unusual (help, an unknown option, a bad number), which argparse then handles."""
    ns = argparse.Namespace(
        func=cmd_exec, target=None, command=[], env=None, secret_env=None, cwd=None,
        timeout=None, merge=False, concurrency=16, identity=None, json=False,
    )  # fmt: skip
    i = 0
    while i < len(rest):
        word = rest[i]
        if word == "--" or (ns.target is not None and not word.startswith("-")):
            if ns.target is None:
                return None
            ns.command = rest[i + 1 :] if word == "--" else rest[i:]
            return ns
        if not word.startswith("-") or word == "-":
            ns.target = word
            i += 1
            continue
        name, eq, value = word.partition("=")
        spec = _EXEC_OPTS.get(name)
        if spec is None:
            return None
        dest, takes, many = spec
        if not takes:
            if eq:
                return None
            setattr(ns, dest, True)
            i += 1
            continue
        if not eq:
            if i + 1 >= len(rest):
                return None
            value = rest[i + 1]
        i += 1 if eq else 2
        if dest in ("timeout", "concurrency"):
            try:
                setattr(ns, dest, float(value) if dest == "timeout" else int(value))
            except ValueError:
                return None
        elif many:
            setattr(ns, dest, [*(getattr(ns, dest) or []), value])
        else:
            setattr(ns, dest, value)
    return None  # no command: let argparse say what is missing


def _parse(argv: list[str]) -> argparse.Namespace:
    if argv[:1] == ["exec"] and (fast := _parse_exec_fast(argv[1:])) is not None:
        return fast
    parser = build_parser(argv[0] if argv and not argv[0].startswith("-") else None)
    if not argv or argv[0].startswith("-") or argv[0] not in _subcommands(parser):
        return build_parser().parse_args(argv)  # --version, -h, or an unknown command
    sub = _subcommands(parser)[argv[0]]
    rest = argv[1:]
    if argv[0] in _COMMAND_AFTER:
        at = split_command(sub, rest, _COMMAND_AFTER[argv[0]])
        head, words = rest[:at], rest[at:]
        if words[:1] == ["--"]:
            words = words[1:]
        ns = sub.parse_intermixed_args(head)
        ns.command = list(words)
        return ns
    # Options anywhere among the positionals (`pull HOST --job J DIR`).
    return sub.parse_intermixed_args(rest)


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            found: dict[str, argparse.ArgumentParser] = action.choices
            return found
    return {}  # pragma: no cover


def _dispatch(argv: list[str]) -> None:
    if not argv:
        build_parser().print_help()
        raise _Exit(2)
    ns = _parse(argv)
    if getattr(ns, "func", None) is None:
        build_parser().print_help()
        raise _Exit(2)
    ns.func(ns)


def main(argv: list[str] | None = None) -> int:
    """Console entry point: one-line errors, exit codes mirroring the remote side."""
    args = sys.argv[1:] if argv is None else list(argv)
    try:
        _dispatch(args)
    except _Exit as exc:
        return _finish(exc.code)
    except SystemExit as exc:  # argparse's -h
        return _finish(exc.code if isinstance(exc.code, int) else 0)
    except TargetError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return _finish(2)
    except ConnectError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return _finish(255)
    except JobError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return _finish(1)
    except CommandError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return _finish(exc.result.exit_code or 1)
    except (BifrostError, ValueError) as exc:
        sys.stderr.write(f"error: {exc}\n")
        return _finish(1)
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return _finish(130)
    except BrokenPipeError:
        # `bifrost jobs HOST | head`: the reader left; not an error worth a traceback.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return _finish(141)
    return _finish(0)


def _finish(code: int) -> int:
    if __name__ != "__main__" and "pytest" not in sys.modules:
        sys.stdout.flush()
        sys.exit(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
