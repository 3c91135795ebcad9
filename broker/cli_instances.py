"""``broker create`` and ``broker instances ...`` (with ``broker list``/``terminate`` aliases)."""

from __future__ import annotations

import os
import shlex
import sys
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from broker.cli import _dump, _errors, app, err, out
from broker.client import GPUClient
from broker.errors import BrokerError, ConfigError, ProvisionError
from broker.journal import JournalEntry
from broker.lifecycle import format_duration
from broker.types import InstanceStatus, ProvisionAttempt, utcnow

instances_app = typer.Typer(
    help="Your instances: list, status, ssh, terminate, reconcile, reap, forget.",
    no_args_is_help=True,
)
app.add_typer(instances_app, name="instances")


def _wide() -> Console:
    # Piped output gets a wide table rather than one squeezed into 80 columns.
    return out if out.is_terminal else Console(width=200)


def _gpu(e: JournalEntry) -> str:
    if e.gpu_type is None:
        return "-"
    return f"{e.gpu_count or 0}x {e.gpu_type}" if e.gpu_count else e.gpu_type


def entry_dict(e: JournalEntry) -> dict[str, Any]:
    """JSON form of a journal entry with the derived columns."""
    ttl = e.ttl_left()
    d = e.model_dump(mode="json")
    d["age_s"] = round((utcnow() - e.created_at).total_seconds(), 1)
    d["cost_so_far"] = round(e.cost_so_far(), 4)
    d["ttl_left_s"] = round(ttl.total_seconds(), 1) if ttl is not None else None
    return d


def instances_table(entries: list[JournalEntry]) -> Table:
    """provider, id, name, GPU, status, age, $/h, cost so far, TTL left."""
    t = Table(header_style="bold")
    for col, just in [
        ("provider", "left"),
        ("id", "left"),
        ("name", "left"),
        ("GPU", "left"),
        ("status", "left"),
        ("age", "right"),
        ("$/h", "right"),
        ("cost", "right"),
        ("TTL left", "right"),
    ]:
        t.add_column(col, justify=just)  # type: ignore[arg-type]
    now = utcnow()
    for e in entries:
        ttl = e.ttl_left(now)
        ttl_s = "-" if ttl is None else format_duration(ttl.total_seconds())
        if ttl is not None and ttl.total_seconds() <= 0:
            ttl_s = f"[red]{ttl_s}[/red]"
        status = e.status
        if status == InstanceStatus.RUNNING.value:
            status = f"[green]{status}[/green]"
        elif status in ("error", "intent", "terminating"):
            status = f"[yellow]{status}[/yellow]"
        t.add_row(
            e.provider,
            e.instance_id or "-",
            e.name,
            _gpu(e),
            status,
            format_duration((now - e.created_at).total_seconds()),
            "-" if e.price_per_hour is None else f"{e.price_per_hour:.3f}",
            f"{e.cost_so_far(now):.2f}",
            ttl_s,
        )
    return t


def _attempt_line(a: ProvisionAttempt) -> str:
    if a.ok:
        return f"[green]ok[/green] {a.provider} {a.gpu_type} ${a.price_per_hour:.3f}/h"
    return f"[red]failed[/red] {a.provider} {a.gpu_type} ${a.price_per_hour:.3f}/h: {a.error_type}"


# -- create ---------------------------------------------------------------------------------------


@app.command()
def create(
    query: Annotated[
        str | None, typer.Argument(help="Query, e.g. 'gpu~A100 vram>=80GB price<=4/h'.")
    ] = None,
    gpu_count: Annotated[
        int | None, typer.Option("--gpu-count", "-n", min=0, help="Exact GPU count.")
    ] = None,
    gpu_type: Annotated[
        str | None, typer.Option("--gpu-type", "-g", help="GPU name (aliases ok).")
    ] = None,
    min_vram: Annotated[
        float | None, typer.Option("--min-vram", min=0, help="Minimum VRAM per GPU, GB.")
    ] = None,
    max_price: Annotated[
        float | None, typer.Option("--max-price", min=0, help="Max US$/h for the instance.")
    ] = None,
    provider: Annotated[
        list[str] | None, typer.Option("--provider", "-p", help="Only these providers.")
    ] = None,
    spot: Annotated[
        bool | None, typer.Option("--spot/--on-demand", help="Only spot / only on-demand.")
    ] = None,
    image: Annotated[str | None, typer.Option("--image", help="Container image.")] = None,
    disk: Annotated[int, typer.Option("--disk", min=1, help="Disk, GB.")] = 50,
    ttl: Annotated[
        str | None, typer.Option("--ttl", help="Terminate after this long, e.g. 3h, 90m.")
    ] = None,
    name: Annotated[str | None, typer.Option("--name", help="A label added to the name.")] = None,
    n_offers: Annotated[int, typer.Option("--n-offers", min=1, help="Offers to try.")] = 3,
    keep_on_failure: Annotated[
        bool, typer.Option("--keep-on-failure", help="Keep an instance that never got ready.")
    ] = False,
    wait: Annotated[
        bool, typer.Option("--wait/--no-wait", help="Wait until SSH and the GPUs answer.")
    ] = True,
    ready_timeout: Annotated[
        float | None, typer.Option("--ready-timeout", min=1, help="Readiness deadline, s.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Rent the cheapest matching instance, wait until it is usable, and print how to SSH in.

    The instance is detached from this command: it runs until `broker instances terminate` or
    its --ttl. Ctrl-C while creating terminates it.
    """
    with _errors():
        from broker.client import build_query

        q = build_query(
            query,
            gpu_type=gpu_type,
            min_vram_gb=min_vram,
            manufacturer=None,
        )
        client = GPUClient(providers=provider or None)
        if ttl is None and client.settings.default_ttl is None and not as_json:
            err.print(
                "[yellow]note:[/yellow] no --ttl: the instance bills until you terminate it",
                highlight=False,
            )
        status = err.status("searching offers...", spinner="dots")
        status.start()

        def progress(stage: str, detail: str) -> None:
            status.update(f"[bold]{stage}[/bold]: {detail}")

        def attempt(a: ProvisionAttempt) -> None:
            if not as_json:
                err.print(_attempt_line(a), highlight=False)
            status.update("trying the next offer..." if not a.ok else "created")

        try:
            inst = client.create(
                q,
                gpu_count=gpu_count,
                image=image,
                disk_gb=disk,
                name=name,
                n_offers=n_offers,
                ttl=ttl,
                max_price_per_hour=max_price,
                keep_on_failure=keep_on_failure,
                wait=wait,
                ready_timeout=ready_timeout,
                spot=spot,
                detach=True,
                on_progress=progress,
                on_attempt=attempt,
            )
        except KeyboardInterrupt:
            status.stop()
            err.print(
                "interrupted: cleanup attempted; `broker instances reconcile` confirms "
                "nothing is left",
                highlight=False,
            )
            raise typer.Exit(130) from None
        except BrokerError as e:
            status.stop()
            if as_json:
                d = e.to_dict()
                if isinstance(e, ProvisionError):
                    d["attempts"] = [a.model_dump(mode="json") for a in e.attempts]
                _dump({"ok": False, "error": d})
                raise typer.Exit(2 if isinstance(e, ConfigError) else 1) from None
            raise
        finally:
            status.stop()
        entry = client.journal.get(inst.name or "")
        if as_json:
            _dump(
                {
                    "ok": True,
                    "instance": inst.model_dump(mode="json"),
                    "ssh_command": inst.ssh_command() if inst.ssh else None,
                    "target": inst.target if inst.ssh or inst.provider == "local" else None,
                    "journal": entry_dict(entry) if entry else None,
                }
            )
            return
        if entry is not None:
            _wide().print(instances_table([entry]))
        if inst.ssh is not None:
            out.print(f"ssh:     {inst.ssh_command()}", highlight=False, markup=False)
            out.print(f"bifrost: bifrost exec {inst.ssh.target} 'nvidia-smi'", highlight=False)
        out.print(f"stop it: broker instances terminate {inst.name}", highlight=False)


# -- list / status ----------------------------------------------------------------------------


def _list(include_all: bool, refresh: bool, sweep: str | None, as_json: bool) -> None:
    with _errors():
        client = GPUClient()
        entries = client.instances(include_closed=include_all, refresh=refresh)
        if sweep is not None:
            entries = [e for e in entries if e.sweep == sweep]
        if as_json:
            _dump([entry_dict(e) for e in entries])
            return
        if not entries:
            out.print("no instances" + ("" if include_all else " (use --all for past ones)"))
            return
        _wide().print(instances_table(entries))
        total = sum(e.price_per_hour or 0 for e in entries if e.is_open)
        err.print(
            f"{sum(1 for e in entries if e.is_open)} open, ${total:.2f}/h; "
            f"estimated spend of all journal entries ${client.spend():.2f}",
            highlight=False,
        )


AllOpt = Annotated[bool, typer.Option("--all", "-a", help="Include terminated ones.")]
RefreshOpt = Annotated[
    bool, typer.Option("--refresh/--no-refresh", help="Re-read status from providers.")
]
SweepOpt = Annotated[str | None, typer.Option("--sweep", help="Only this sweep's instances.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]


@instances_app.command("list")
def list_cmd(
    include_all: AllOpt = False,
    refresh: RefreshOpt = True,
    sweep: SweepOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Our instances: provider, id, name, GPU, status, age, $/h, cost so far, TTL left."""
    _list(include_all, refresh, sweep, as_json)


app.command("list", help="Alias of `broker instances list`.")(list_cmd)


@instances_app.command("status")
def status_cmd(
    ref: Annotated[str, typer.Argument(help="Name, provider id, or a unique prefix.")],
    as_json: JsonOpt = False,
) -> None:
    """One instance: current provider state, SSH endpoint and its journal history."""
    with _errors():
        client = GPUClient()
        from broker.lifecycle import resolve_entry

        entry = resolve_entry(client.journal, ref)
        live: dict[str, Any] | None = None
        live_error: str | None = None
        if entry.is_open and entry.instance_id is not None:
            try:
                live = client.instance(entry.name).model_dump(mode="json")
            except BrokerError as e:
                live_error = str(e)
        entry = client.journal.get(entry.name) or entry
        events = client.journal.events(entry.name)
        if as_json:
            _dump(
                {
                    "journal": entry_dict(entry),
                    "provider_view": live,
                    "provider_error": live_error,
                    "events": [
                        {"at": a.isoformat(), "status": s, "detail": d} for a, s, d in events
                    ],
                }
            )
            return
        _wide().print(instances_table([entry]))
        if live is not None and live.get("ssh"):
            ssh = live["ssh"]
            out.print(f"ssh: {ssh['user']}@{ssh['host']}:{ssh['port']}", highlight=False)
        if live_error:
            err.print(f"[yellow]provider:[/yellow] {escape(live_error)}", highlight=False)
        for at, s, d in events:
            out.print(f"  {at:%Y-%m-%d %H:%M:%S}  {s:<14} {d or ''}", highlight=False)


@instances_app.command("ssh")
def ssh_cmd(
    ref: Annotated[str, typer.Argument(help="Name, provider id, or a unique prefix.")],
    print_only: Annotated[
        bool, typer.Option("--print", help="Print the ssh command instead of running it.")
    ] = False,
) -> None:
    """Open an SSH session to the instance (or print the command)."""
    with _errors():
        client = GPUClient()
        inst = client.instance(ref)
        if inst.provider == "local" or inst.extra.get("target") == "local":
            out.print("this instance is the local machine: no SSH needed")
            return
        command = inst.ssh_command()
        if print_only or not sys.stdin.isatty():
            out.print(command, highlight=False, markup=False)
            return
    argv = shlex.split(command)
    os.execvp(argv[0], argv)  # noqa: S606 - replaces this process with the user's ssh session


# -- terminate --------------------------------------------------------------------------------


def _terminate(
    refs: list[str] | None,
    all_: bool,
    provider: list[str] | None,
    yes: bool,
    wait: bool,
    as_json: bool,
) -> None:
    with _errors():
        client = GPUClient()
        from broker.lifecycle import resolve_entry

        if not refs and not all_ and not provider:
            raise typer.BadParameter("name instances to terminate, or use --all / --provider")
        if refs:
            targets = [resolve_entry(client.journal, r) for r in refs]
        else:
            targets = client.journal.open_entries()
        if provider:
            targets = [e for e in targets if e.provider in provider]
        targets = [e for e in targets if e.is_open]
        if not targets:
            if as_json:
                _dump([])
            else:
                out.print("nothing to terminate")
            return
        if not as_json:
            _wide().print(instances_table(targets))
        if not yes and not typer.confirm(f"Terminate {len(targets)} instance(s)?", err=True):
            raise typer.Exit(1)
        results: list[dict[str, Any]] = []
        failed = 0
        for e in targets:
            try:
                with err.status(f"terminating {e.name}...", spinner="dots"):
                    done = client.terminate(e.name, wait=wait)
                results.append({"name": e.name, "ok": True, "status": done.status})
                if not as_json:
                    out.print(f"[green]terminated[/green] {e.name} ({e.provider} {e.instance_id})")
            except BrokerError as ex:
                failed += 1
                results.append({"name": e.name, "ok": False, "error": ex.to_dict()})
                if not as_json:
                    err.print(f"[red]failed[/red] {e.name}: {escape(str(ex))}", highlight=False)
        if as_json:
            _dump(results)
        if failed:
            raise typer.Exit(1)


RefsArg = Annotated[
    list[str] | None, typer.Argument(help="Names, provider ids, or unique prefixes.")
]
AllTermOpt = Annotated[bool, typer.Option("--all", help="Every open instance.")]
ProviderOpt = Annotated[
    list[str] | None, typer.Option("--provider", "-p", help="Only instances at these providers.")
]
YesOpt = Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")]
WaitOpt = Annotated[
    bool, typer.Option("--wait/--no-wait", help="Confirm each instance is gone (default).")
]


@instances_app.command("terminate")
def terminate_cmd(
    refs: RefsArg = None,
    all_: AllTermOpt = False,
    provider: ProviderOpt = None,
    yes: YesOpt = False,
    wait: WaitOpt = True,
    as_json: JsonOpt = False,
) -> None:
    """Terminate instances and confirm they are gone."""
    _terminate(refs, all_, provider, yes, wait, as_json)


app.command("terminate", help="Alias of `broker instances terminate`.")(terminate_cmd)


# -- reconcile / reap -------------------------------------------------------------------------


@instances_app.command("reconcile")
def reconcile_cmd(
    provider: ProviderOpt = None,
    yes: YesOpt = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only report.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Find orphans (billing at a provider, held by nobody) and ghosts (journal only); fix them.

    Orphans are instances named broker-... that the journal does not know, that it believes
    terminated, whose TTL passed, or whose creating process died. They are terminated. Ghosts
    are journal entries whose instance is gone; they are closed.
    """
    with _errors():
        client = GPUClient()
        from broker.lifecycle import fix

        with err.status("asking providers...", spinner="dots"):
            report = client.reconcile(provider)
        if as_json and (dry_run or not report.findings):
            _dump(
                {
                    "findings": [f.to_dict() for f in report.findings],
                    "unreachable": report.unreachable,
                    "fixed": [],
                }
            )
            if report.unreachable:
                raise typer.Exit(1)
            return
        for p, msg in report.unreachable.items():
            err.print(f"[yellow]could not ask {p}:[/yellow] {escape(msg)}", highlight=False)
        if not report.findings:
            out.print(
                "no orphans, no ghosts"
                + (" at the providers that answered" if report.unreachable else "")
            )
            if report.unreachable:
                raise typer.Exit(1)
            return
        if not as_json:
            t = Table(header_style="bold")
            for c in ("kind", "provider", "id", "name", "status", "$/h", "reason"):
                t.add_column(c)
            for f in report.findings:
                t.add_row(
                    f"[red]{f.kind}[/red]" if f.kind == "orphan" else f.kind,
                    f.provider,
                    f.instance_id or "-",
                    f.name or "-",
                    f.status or "-",
                    "-" if f.price_per_hour is None else f"{f.price_per_hour:.3f}",
                    f.reason,
                )
            out.print(t)
        if dry_run:
            return
        prompt = (
            f"Terminate {len(report.orphans)} orphan(s) and close {len(report.ghosts)} "
            "ghost entry(ies)?"
        )
        if not yes and not typer.confirm(prompt, err=True):
            raise typer.Exit(1)
        fixed: list[dict[str, Any]] = []
        failed = 0
        for f in report.findings:
            try:
                what = fix(client, f)
                fixed.append(f.to_dict() | {"fixed": what})
                if not as_json:
                    out.print(f"{what}: {f.name or f.instance_id}", highlight=False)
            except BrokerError as e:
                failed += 1
                fixed.append(f.to_dict() | {"error": e.to_dict()})
                err.print(
                    f"[red]failed[/red] {f.name or f.instance_id}: {escape(str(e))}",
                    highlight=False,
                )
        if as_json:
            _dump(
                {
                    "findings": [f.to_dict() for f in report.findings],
                    "unreachable": report.unreachable,
                    "fixed": fixed,
                }
            )
        if failed or report.unreachable:
            raise typer.Exit(1)


@instances_app.command("forget")
def forget_cmd(
    refs: Annotated[list[str], typer.Argument(help="Names, provider ids, or unique prefixes.")],
    yes: YesOpt = False,
) -> None:
    """Close journal entries without asking the provider (e.g. its account or key is gone).

    Use only when you know the instance no longer bills: broker stops tracking its cost and
    its budget share. `reconcile` still terminates it if it ever shows up at a provider.
    """
    with _errors():
        client = GPUClient()
        from broker.lifecycle import resolve_entry

        targets = [e for e in (resolve_entry(client.journal, r) for r in refs) if e.is_open]
        if not targets:
            out.print("nothing open to forget")
            return
        _wide().print(instances_table(targets))
        if not yes and not typer.confirm(
            f"Close {len(targets)} entry(ies) without asking the provider?", err=True
        ):
            raise typer.Exit(1)
        for e in targets:
            client.journal.record_event(e.name, "forgotten", "closed by `broker instances forget`")
            client.journal.record_status(e.name, InstanceStatus.TERMINATED, detail="forgotten")
            out.print(f"forgot {e.name}", highlight=False)


@instances_app.command("reap")
def reap_cmd(as_json: JsonOpt = False) -> None:
    """Terminate every instance whose TTL has passed (every broker command also does this)."""
    with _errors():
        client = GPUClient()
        done = client.reap()
        if as_json:
            _dump(
                [
                    {
                        "name": e.name,
                        "ok": error is None,
                        "error": error.to_dict() if error else None,
                    }
                    for e, error in done
                ]
            )
        elif not done:
            out.print("no instance is past its TTL")
        for e, error in done:
            if not as_json:
                if error is None:
                    out.print(f"[green]terminated[/green] {e.name} (TTL passed)")
                else:
                    err.print(f"[red]failed[/red] {e.name}: {escape(str(error))}", highlight=False)
        if any(error is not None for _, error in done):
            raise typer.Exit(1)


def auto_reap() -> None:
    """Terminate instances past their TTL before any command (quietly when there are none)."""
    if os.environ.get("BROKER_NO_AUTO_REAP"):
        return
    try:
        from broker.config import load_settings

        settings = load_settings()
        if not (settings.state_dir / "journal.sqlite").exists():
            return
        from broker.journal import Journal
        from broker.lifecycle import expired_entries

        with Journal.default(settings.state_dir) as journal:
            if not expired_entries(journal):
                return
        client = GPUClient(settings)
        for e, error in client.reap(timeout=30.0):
            if error is None:
                err.print(f"[yellow]reaped[/yellow] {e.name}: its TTL had passed", highlight=False)
            else:
                err.print(
                    f"[red]could not reap[/red] {e.name}: {escape(str(error))}", highlight=False
                )
        client.close()
    except BrokerError as e:
        # A reap problem must not block the command the user asked for.
        err.print(f"[yellow]auto-reap skipped:[/yellow] {escape(str(e))}", highlight=False)
