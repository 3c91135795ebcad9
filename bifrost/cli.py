"""``bifrost`` command line: exec, push, run, jobs, status, logs, wait, kill, pull, upload, gpus,
forget, ssh, attach. Exit codes mirror the remote command; bad input is one line, no traceback."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.table import Table

from bifrost.errors import (
    BifrostError,
    CommandError,
    ConnectError,
    JobError,
    JobTimeout,
    TargetError,
)
from bifrost.exec import check_env_name
from bifrost.group import Group, HostOutcome
from bifrost.host import Host
from bifrost.hostkeys import KnownHosts, host_port
from bifrost.jobs import JobStatus, remembered_target
from bifrost.target import parse_target

app = typer.Typer(
    name="bifrost",
    help="Run commands, sync code and manage detached jobs on any SSH box (or `local`).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

IdentityOpt = Annotated[
    str | None,
    typer.Option("--identity", "-i", envvar="BIFROST_IDENTITY_FILE", help="Private key file."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]


MAX_TAIL = 1_000_000_000  # far more lines than any log; beyond it `tail -n` itself may refuse


class _Exit(Exception):
    def __init__(self, code: int) -> None:
        self.code = code


def _fail(message: str, code: int = 2) -> NoReturn:
    err.print(f"error: {message}", markup=False)
    raise _Exit(code)


def _host(spec: str, identity: str | None) -> Host:
    _check_identity(identity)
    return Host(spec, identity_file=identity)


def _check_seconds(option: str, value: float | None) -> None:
    if value is not None and not (math.isfinite(value) and value > 0):
        _fail(f"{option} {value}: give a number of seconds greater than 0")


def _group(targets: list[str], identity: str | None, concurrency: int = 16) -> Group:
    _check_identity(identity)
    return Group(targets, concurrency=concurrency, identity_file=identity)


def _check_identity(identity: str | None) -> None:
    if identity is not None and not Path(identity).expanduser().is_file():
        _fail(f"--identity {identity}: no such key file (give the path of a private key)")


def _targets(spec: str) -> list[str]:
    """``a,b,c`` or ``@file`` (one target per line) → target strings."""
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


def _job_args(a: str, b: str | None) -> tuple[str, str]:
    """``TARGET JOB`` or just ``JOB`` (its target remembered from `bifrost run`)."""
    if b is not None:
        return a, b
    target = remembered_target(a)
    if target is None:
        _fail(f"unknown job {a!r} on this machine: pass the target too (bifrost ... TARGET {a})")
    return target, a


def _print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


# --------------------------------------------------------------------------------------------
@app.command("exec")
def exec_(
    target: Annotated[
        str, typer.Argument(help="user@host[:port], alias, 'local', or a,b,c / @file")
    ],
    command: Annotated[list[str], typer.Argument(help="The shell command (quote it).")],
    env: Annotated[list[str] | None, typer.Option("--env", "-e", help="NAME=VALUE")] = None,
    secret_env: Annotated[
        list[str] | None,
        typer.Option("--secret-env", help="Send this local env var via a 0600 file."),
    ] = None,
    cwd: Annotated[str | None, typer.Option(help="Remote working directory.")] = None,
    timeout: Annotated[
        float | None, typer.Option(help="Seconds; kills the remote process group.")
    ] = None,
    merge: Annotated[bool, typer.Option("--merge", help="Merge stderr into stdout.")] = False,
    concurrency: Annotated[int, typer.Option(help="Hosts at a time.")] = 16,
    identity: IdentityOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Run a command and stream its output; exit with its exit code. stdin is not forwarded
    (the command reads /dev/null-like EOF): upload input files, or use Host.exec(stdin=)."""
    cmd = " ".join(command)
    if not cmd.strip():
        _fail("the command is empty: give the shell command to run (quote it)")
    _check_seconds("--timeout", timeout)
    envs, secrets = _env(env), _secrets(secret_env)
    targets = _targets(target)
    if len(targets) > 1:
        group = _group(targets, identity, concurrency=concurrency)
        outcomes = group.exec(
            cmd, env=envs, secrets=secrets, cwd=cwd, timeout=timeout, merge_stderr=merge,
            echo=not as_json,
        )  # fmt: skip
        _report_outcomes(outcomes, as_json)
        raise _Exit(0 if all(o.ok for o in outcomes) else 1)
    host = _host(targets[0], identity)
    try:
        result = host.exec(
            cmd, env=envs, secrets=secrets, cwd=cwd, timeout=timeout, warn=True,
            merge_stderr=merge, echo=not as_json,
        )  # fmt: skip
    except CommandError as exc:  # a timeout
        if as_json:
            _print_json({**exc.result.to_dict(), "error": str(exc)})
        else:
            err.print(f"error: {exc}", markup=False)
        raise _Exit(124) from None
    if as_json:
        _print_json(result.to_dict())
    raise _Exit(result.exit_code)


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
        err.print(f"[{o.host}] FAILED: {o.reason}", markup=False)
    err.print(f"{len(outcomes) - len(failed)}/{len(outcomes)} hosts ok", markup=False)


@app.command()
def push(
    target: Annotated[str, typer.Argument(help="Where to push.")],
    path: Annotated[Path, typer.Argument(help="Project directory.")] = Path("."),
    name: Annotated[
        str | None, typer.Option(help="Workspace name (default: directory name).")
    ] = None,
    bootstrap: Annotated[
        bool, typer.Option(help="uv sync --locked into a venv on the box.")
    ] = False,
    extra: Annotated[list[str] | None, typer.Option(help="uv extras for --bootstrap.")] = None,
    identity: IdentityOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Sync a project (git-tracked + untracked-not-ignored files) to ~/.bifrost/workspaces/NAME."""
    if extra and not bootstrap:
        _fail("--extra only applies to --bootstrap: add --bootstrap (or drop --extra)")
    if bootstrap and not (path / "uv.lock").is_file():
        _fail(f"--bootstrap needs a uv.lock in {path} (run `uv lock` there, or drop --bootstrap)")
    res = _host(target, identity).push(
        path, name=name, bootstrap=bootstrap, extras=extra or [], progress=sys.stderr.isatty()
    )
    if as_json:
        _print_json(res.to_dict())
        return
    git = f" git {res.git_sha[:10]}{'+dirty' if res.dirty else ''}" if res.git_sha else ""
    env = f", env {res.bootstrapped}" if res.bootstrapped else ""
    env += " (uv installed)" if res.uv_installed else ""
    out.print(
        f"pushed {res.files} files ({res.deleted} deleted) to {res.target}:{res.workspace} "
        f"via {res.method} in {res.duration:.1f}s{git}{env}",
        markup=False,
    )


@app.command()
def run(
    target: Annotated[str, typer.Argument(help="Where to run (a,b,c for several hosts).")],
    command: Annotated[list[str], typer.Argument(help="Command, after `--`.")],
    name: Annotated[str | None, typer.Option(help="Job name (free text).")] = None,
    workspace: Annotated[
        str | None, typer.Option("--workspace", "-w", help="Run in this pushed workspace.")
    ] = None,
    cwd: Annotated[str | None, typer.Option(help="Remote working directory.")] = None,
    env: Annotated[list[str] | None, typer.Option("--env", "-e", help="NAME=VALUE")] = None,
    secret_env: Annotated[
        list[str] | None, typer.Option("--secret-env", help="Local env var to pass secretly.")
    ] = None,
    output: Annotated[
        list[str] | None, typer.Option("--output", "-o", help="Result path for `pull --job`.")
    ] = None,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Follow the log until the job ends.")
    ] = False,
    identity: IdentityOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Start a detached job; prints its id (one round trip). Survives disconnects and reboots of
    your laptop; `bifrost logs -f JOB` later."""
    cmd = " ".join(command) if len(command) > 1 else command[0]
    if not cmd.strip():
        _fail("the command is empty: give the job's command after `--`")
    opts: dict[str, Any] = {
        "name": name, "cwd": cwd, "workspace": workspace, "env": _env(env),
        "secrets": _secrets(secret_env), "outputs": output or [],
    }  # fmt: skip
    targets = _targets(target)
    if len(targets) > 1 and follow:
        _fail("--follow needs a single target: follow each job with `bifrost logs -f JOB`")
    if len(targets) > 1:
        outcomes = _group(targets, identity).run(cmd, **opts)
        if as_json:
            _print_json(
                [
                    {"host": o.host, "job": o.value.id if o.value else None, "error": o.error}
                    for o in outcomes
                ]
            )
        else:
            for o in outcomes:
                out.print(
                    f"[{o.host}] {o.value.id if o.value else 'FAILED: ' + str(o.error)}",
                    markup=False,
                )
        raise _Exit(0 if all(o.ok for o in outcomes) else 1)
    host = _host(targets[0], identity)
    job = host.run(cmd, **opts)
    if as_json:
        _print_json({"job": job.id, "target": host.spec})
    else:
        out.print(job.id, markup=False)
    sys.stdout.flush()
    if follow:
        st = job.follow(lambda line: out.print(line, markup=False))
        raise _Exit(_status_code(st))


def _status_code(st: JobStatus) -> int:
    if st.exit_code is not None:
        return st.exit_code
    return {"cancelled": 130, "lost": 255, "died": 255}.get(st.state, 1)


def _status_table(rows: list[JobStatus], with_host: bool = False) -> Table:
    table = Table(box=None, pad_edge=False)
    for col in (["host"] if with_host else []) + [
        "job",
        "state",
        "code",
        "started",
        "ended",
        "command",
    ]:
        table.add_column(col, overflow="fold")
    colors = {"running": "cyan", "succeeded": "green", "failed": "red", "cancelled": "yellow"}
    for s in rows:
        state = f"[{colors.get(s.state, 'magenta')}]{s.state}[/]"
        cmd = (s.command or "")[:60]
        table.add_row(
            *([s.target] if with_host else []), s.id, state,
            "" if s.exit_code is None else str(s.exit_code),
            s.started_at or "", s.ended_at or "", cmd.replace("[", r"\["),
        )  # fmt: skip
    return table


@app.command()
def jobs(
    target: Annotated[str, typer.Argument(help="Host(s) to list jobs on.")],
    identity: IdentityOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """List jobs on a host (or several)."""
    targets = _targets(target)
    outcomes = _group(targets, identity).status(None)
    rows = [s for o in outcomes for s in (o.value or [])]
    if as_json:
        _print_json([s.to_dict() for s in rows])
    else:
        out.print(_status_table(rows, with_host=len(targets) > 1))
    for o in outcomes:
        if o.error:
            err.print(f"[{o.host}] {o.error}", markup=False)
    raise _Exit(0 if all(o.ok for o in outcomes) else 1)


@app.command()
def status(
    target_or_job: Annotated[str, typer.Argument(metavar="[TARGET] JOB")],
    job: Annotated[str | None, typer.Argument(hidden=True)] = None,
    identity: IdentityOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show a job's state: running, succeeded, failed, cancelled, lost (reboot) or died."""
    target, job_id = _job_args(target_or_job, job)
    st = _host(target, identity).job(job_id).status()
    if as_json:
        _print_json(st.to_dict())
    else:
        out.print(_status_table([st]))


@app.command()
def logs(
    target_or_job: Annotated[str, typer.Argument(metavar="[TARGET] JOB")],
    job: Annotated[str | None, typer.Argument(hidden=True)] = None,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep following until the job ends.")
    ] = False,
    tail: Annotated[int | None, typer.Option("--tail", "-n", help="Only the last N lines.")] = None,
    identity: IdentityOpt = None,
) -> None:
    """Print a job's log; with -f follow it (resumes across dropped connections) and exit with
    the job's exit code."""
    if tail is not None and not 0 <= tail <= MAX_TAIL:
        _fail(f"--tail {tail}: give a number of lines between 0 and {MAX_TAIL}")
    target, job_id = _job_args(target_or_job, job)
    j = _host(target, identity).job(job_id)

    def emit(line: str) -> None:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()

    if follow:
        raise _Exit(_status_code(j.follow(emit, tail=tail)))
    sys.stdout.write(j.logs(tail=tail))


@app.command()
def wait(
    target_or_job: Annotated[str, typer.Argument(metavar="[TARGET] JOB")],
    job: Annotated[str | None, typer.Argument(hidden=True)] = None,
    timeout: Annotated[
        float | None, typer.Option(help="Give up after this many seconds (exit 124).")
    ] = None,
    identity: IdentityOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Wait for a job to end; exit with its exit code."""
    _check_seconds("--timeout", timeout)
    target, job_id = _job_args(target_or_job, job)
    try:
        st = _host(target, identity).job(job_id).wait(timeout)
    except JobTimeout as exc:
        _fail(str(exc), 124)
    if as_json:
        _print_json(st.to_dict())
    else:
        err.print(
            f"{st.id}: {st.state}" + (f" ({st.exit_code})" if st.exit_code is not None else ""),
            markup=False,
        )
    raise _Exit(_status_code(st))


@app.command()
def kill(
    target_or_job: Annotated[str, typer.Argument(metavar="[TARGET] JOB")],
    job: Annotated[str | None, typer.Argument(hidden=True)] = None,
    grace: Annotated[float, typer.Option(help="Seconds between TERM and KILL.")] = 5.0,
    identity: IdentityOpt = None,
) -> None:
    """Cancel a job: TERM its whole process group, KILL after --grace seconds."""
    target, job_id = _job_args(target_or_job, job)
    out.print(f"{job_id}: {_host(target, identity).job(job_id).kill(grace)}", markup=False)


@app.command()
def pull(
    target: Annotated[str, typer.Argument(help="Source host.")],
    paths: Annotated[list[str] | None, typer.Argument(metavar="[REMOTE] [LOCAL]")] = None,
    job: Annotated[
        str | None, typer.Option("--job", help="Pull this job's dir and outputs.")
    ] = None,
    identity: IdentityOpt = None,
) -> None:
    """Download a file or tree (`~` is the remote home), or a finished job's results."""
    host = _host(target, identity)
    items = paths or []
    progress = sys.stderr.isatty()
    if job is not None:
        if len(items) > 1:
            _fail("with --job give at most one LOCAL directory")
        dest = host.job(job).pull_results(Path(items[0] if items else "."), progress=progress)
        out.print(f"pulled {job} to {dest}", markup=False)
        return
    if not items or len(items) > 2:
        _fail(
            "usage: bifrost pull TARGET REMOTE [LOCAL]  or  bifrost pull TARGET --job JOB [LOCAL]"
        )
    dest = host.pull(items[0], Path(items[1] if len(items) > 1 else "."), progress=progress)
    out.print(f"pulled {items[0]} to {dest}", markup=False)


@app.command()
def upload(
    target: Annotated[str, typer.Argument(help="Destination host.")],
    local: Annotated[Path, typer.Argument(help="Local file or directory.")],
    remote: Annotated[str, typer.Argument(help="Remote path (`~` is the remote home).")] = "~",
    identity: IdentityOpt = None,
) -> None:
    """Upload a file or directory tree."""
    dest = _host(target, identity).upload(local, remote, progress=sys.stderr.isatty())
    out.print(f"uploaded {local} to {dest}", markup=False)


@app.command()
def gpus(
    targets: Annotated[list[str], typer.Argument(help="One or more hosts.")],
    identity: IdentityOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """nvidia-smi summary: name, memory used/total, utilisation, processes."""
    from bifrost._loop import run_sync
    from bifrost.gpus import GPUReport, agpus

    all_targets = [t for spec in targets for t in _targets(spec)]
    group = _group(all_targets, identity)
    outcomes: list[HostOutcome[GPUReport]] = run_sync(group._each(agpus))
    if as_json:
        _print_json(
            [o.value.to_dict() if o.value else {"host": o.host, "error": o.error} for o in outcomes]
        )
        raise _Exit(0 if all(o.ok for o in outcomes) else 1)
    table = Table(box=None, pad_edge=False)
    for col in ["host", "gpu", "name", "memory", "util", "processes"]:
        table.add_column(col, overflow="fold")
    for o in outcomes:
        if o.value is None:
            table.add_row(o.host, "", f"[red]{o.error}[/]", "", "", "")
        elif not o.value.available:
            table.add_row(o.host, "-", o.value.message, "", "", "")
        for g in o.value.gpus if o.value else []:
            procs = ", ".join(f"{p.name}({p.pid}) {p.memory_mib or '?'}MiB" for p in g.processes)
            table.add_row(
                o.host, str(g.index), g.name, f"{g.memory_used_mib}/{g.memory_total_mib} MiB",
                f"{g.utilization_pct}%", procs or "-",
            )  # fmt: skip
    out.print(table)
    raise _Exit(0 if all(o.ok for o in outcomes) else 1)


@app.command()
def forget(
    host: Annotated[str, typer.Argument(help="host, host:port, [v6]:port or a target string.")],
) -> None:
    """Forget a pinned host key (after a box was legitimately re-imaged). Without a port
    (and not an ssh_config alias, which names one port) every port of the host is forgotten."""
    t = parse_target(host)  # the one target parser: host:port, [v6]:port, ::1, alias, ssh -p
    if t.is_local:
        _fail("`local` has no host key to forget")
    kh = KnownHosts()
    removed = kh.forget_entries(t.host, t.port if t.explicit_port else None)
    if not removed:
        where = host_port(t.host, t.port) if t.explicit_port else f"{t.host} (any port)"
        _fail(f"no pinned key for {where} in {kh.path}", 1)
    out.print(f"forgot {len(removed)} key(s): {', '.join(removed)}", markup=False)


def _ssh_argv(spec: str, identity: str | None, tty: bool) -> list[str]:
    host = _host(spec, identity)
    if host.target.is_local:
        _fail("`local` needs no ssh: just run the command")
    from bifrost.transport.openssh import ssh_argv

    # The exact options rsync uses (pinned keys, hops), minus BatchMode: a human is typing.
    argv, dest = ssh_argv(host.target, host.known_hosts.path, batch=False)
    if tty:
        argv.append("-t")
    return [*argv, dest.replace("[", "").replace("]", "")]


@app.command()
def ssh(
    target: Annotated[str, typer.Argument(help="Host to log in to.")],
    command: Annotated[list[str] | None, typer.Argument(help="Optional command.")] = None,
    identity: IdentityOpt = None,
) -> None:
    """Interactive ssh with bifrost's pinned host keys."""
    _host(target, identity).connect()  # pins the key (TOFU) before ssh checks it
    argv = _ssh_argv(target, identity, tty=sys.stdin.isatty())
    os.execvp("ssh", [*argv, *(command or [])])  # noqa: S606 - hand the terminal to ssh


@app.command()
def attach(
    target_or_job: Annotated[str, typer.Argument(metavar="[TARGET] JOB")],
    job: Annotated[str | None, typer.Argument(hidden=True)] = None,
    no_tmux: Annotated[
        bool, typer.Option("--no-tmux", help="Follow the log here instead of in tmux.")
    ] = False,
    identity: IdentityOpt = None,
) -> None:
    """Watch a running job in its tmux session on the box (detach: tmux prefix + d; the job
    keeps running). Without tmux there, or off a terminal, follows the log like `logs -f`."""
    target, job_id = _job_args(target_or_job, job)
    j = _host(target, identity).job(job_id)
    st, session = j.attach_info()
    if st.done:
        code = "" if st.exit_code is None else f", exit code {st.exit_code}"
        err.print(f"{job_id} has already ended ({st.state}{code}); its log:", markup=False)
        sys.stdout.write(j.logs())
        raise _Exit(_status_code(st))
    reason = None
    if session is None:
        reason = f"tmux is not available on {j.host.name}"
    elif not (sys.stdin.isatty() and sys.stdout.isatty()):
        reason = "not on a terminal"
    if no_tmux or session is None or reason is not None:
        if not no_tmux:
            err.print(
                f"{reason}: following the log instead "
                "(Ctrl-C stops following; the job keeps running)",
                markup=False,
            )

        def emit(line: str) -> None:
            sys.stdout.write(line + "\n")
            sys.stdout.flush()

        raise _Exit(_status_code(j.follow(emit)))
    j.host.close()
    if j.host.target.is_local:
        os.execvp("bash", ["bash", "--norc", "--noprofile", "-c", j.tmux_command(session)])  # noqa: S606
    argv = _ssh_argv(target, identity, tty=True)
    os.execvp("ssh", [*argv, j.tmux_command(session)])  # noqa: S606 - hand the terminal over


def main(argv: list[str] | None = None) -> int:
    """Console entry point: one-line errors, exit codes mirroring the remote side."""
    try:
        # Without standalone mode typer turns a KeyboardInterrupt into *returning* 130 (and
        # an explicit typer.Exit into returning its code): that must not end as exit 0.
        rv = app(args=argv, standalone_mode=False)
        if rv == 130:
            err.print("interrupted", markup=False)
            return _finish(130)
        if isinstance(rv, int) and not isinstance(rv, bool) and rv != 0:
            return _finish(rv)
    except _Exit as exc:
        return _finish(exc.code)
    except TargetError as exc:
        err.print(f"error: {exc}", markup=False)
        return _finish(2)
    except ConnectError as exc:
        err.print(f"error: {exc}", markup=False)
        return _finish(255)
    except JobError as exc:
        err.print(f"error: {exc}", markup=False)
        return _finish(1)
    except CommandError as exc:
        err.print(f"error: {exc}", markup=False)
        return _finish(exc.result.exit_code or 1)
    except (BifrostError, ValueError) as exc:
        err.print(f"error: {exc}", markup=False)
        return _finish(1)
    except KeyboardInterrupt:
        err.print("interrupted", markup=False)
        return _finish(130)
    except typer.Exit as exc:
        return _finish(exc.exit_code)
    except typer.Abort:
        return _finish(130)
    except Exception as exc:
        # typer vendors click; its usage errors have show() and exit_code
        show = getattr(exc, "show", None)
        if callable(show) and isinstance(getattr(exc, "exit_code", None), int):
            show()
            return _finish(int(getattr(exc, "exit_code", 2)))
        raise
    return _finish(0)


def _finish(code: int) -> int:
    if __name__ != "__main__" and "pytest" not in sys.modules:
        sys.exit(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
