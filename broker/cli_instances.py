"""``broker create`` and ``broker instances ...`` (with ``broker list``/``terminate`` aliases)."""

from __future__ import annotations

import math
import os
import shlex
import sys
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from broker.cli import _dump, _errors, app, err, out
from broker.client import MAX_DISK_GB, MAX_READY_TIMEOUT_S, GPUClient
from broker.errors import BrokerError, ConfigError, ProvisionError
from broker.journal import JournalEntry, offer_of
from broker.lifecycle import ABANDONED, format_duration, owner_alive, parse_ttl
from broker.signals import exit_code, interrupts_as_keyboard
from broker.types import GPUOffer, InstanceStatus, ProvisionAttempt, utcnow

#: Exit status of `broker create` when it stopped with a box that may still bill.
EXIT_ABANDONED = 3

instances_app = typer.Typer(
    help="Your instances: list, status, ssh, terminate, reconcile, reap, forget.",
    no_args_is_help=True,
)
app.add_typer(instances_app, name="instances")


def _wide() -> Console:
    # Piped output gets a table wide enough that nothing is cut or wrapped (grep, awk).
    return out if out.is_terminal else Console(width=1000, no_color=True)


def market(spot: bool, cloud_type: str | None) -> str:
    """``spot`` or ``on-demand``, plus ``secure``/``community`` when the provider says."""
    if cloud_type == "local":
        return "local"  # this machine or your own: neither rented nor interruptible
    kind = "spot" if spot else "on-demand"
    return f"{kind} {cloud_type}" if cloud_type in ("secure", "community") else kind


def _cloud_type(e: JournalEntry) -> str | None:
    try:
        offer = offer_of(e.offer_json)
    except ValueError:
        return None
    return offer.cloud_type.value if offer is not None and offer.cloud_type else None


def _holder(e: JournalEntry) -> str | None:
    """``dead`` / ``abandoned`` for an open entry nobody holds any more, else None."""
    if not e.is_open or e.owner is None:
        return None
    if e.owner == ABANDONED:
        return "abandoned"
    return "dead" if owner_alive(e.owner) is False else None


def _gpu(e: JournalEntry) -> str:
    if e.gpu_type is None:
        return "-"
    return f"{e.gpu_count or 0}x {e.gpu_type}" if e.gpu_count else e.gpu_type


def entry_dict(e: JournalEntry) -> dict[str, Any]:
    """JSON form of a journal entry with the derived columns."""
    ttl = e.ttl_left() if e.is_open else None
    d = e.model_dump(mode="json")
    d["state"] = e.state
    d["age_s"] = round((utcnow() - e.created_at).total_seconds(), 1)
    d["cost_so_far"] = round(e.cost_so_far(), 4)
    d["ttl_left_s"] = round(ttl.total_seconds(), 1) if ttl is not None else None
    d["cloud_type"] = _cloud_type(e)
    d["market"] = market(e.spot, d["cloud_type"])
    holder = _holder(e)
    d["holder_alive"] = None if e.owner is None or not e.is_open else holder is None
    d["holder"] = holder
    return d


def instances_table(
    entries: list[JournalEntry], doing: dict[str, dict[str, Any]] | None = None
) -> Table:
    """provider, id, name, GPU, market, status, age, $/h, cost so far, TTL left (and, when a
    `broker launch` used the box, the task and its state)."""
    doing = {k: v for k, v in (doing or {}).items() if any(e.name == k for e in entries)}
    t = Table(header_style="bold")
    for col, just in [
        ("provider", "left"),
        ("id", "left"),
        ("name", "left"),
        ("GPU", "left"),
        ("market", "left"),
        ("status", "left"),
        ("age", "right"),
        ("$/h", "right"),
        ("cost", "right"),
        ("TTL left", "right"),
    ]:
        t.add_column(col, justify=just, overflow="fold")  # type: ignore[arg-type]
    if doing:
        t.add_column("task", overflow="fold")
    now = utcnow()
    for e in entries:
        ttl = e.ttl_left(now) if e.is_open else None  # a closed box has no TTL left
        ttl_s = "-" if ttl is None else format_duration(ttl.total_seconds())
        if ttl is not None and ttl.total_seconds() <= 0:
            ttl_s = f"[red]{ttl_s}[/red]"
        status = e.status
        if e.is_open and e.state == "sent" and e.instance_id is None:
            status = "pending"  # a create that got no answer: may exist, counted in the budget
        if status == InstanceStatus.RUNNING.value:
            status = f"[green]{status}[/green]"
        elif status in ("error", "intent", "terminating", "pending"):
            status = f"[yellow]{status}[/yellow]"
        holder = _holder(e)
        if holder is not None:
            # Nobody will terminate it on exit: an orphan in the making (`reconcile` fixes it).
            status += (
                f" [red](holder {holder})[/red]" if holder == "dead" else " [red](abandoned)[/red]"
            )
        row = [
            e.provider,
            e.instance_id or "-",
            e.name,
            _gpu(e),
            market(e.spot, _cloud_type(e)),
            status,
            format_duration((now - e.created_at).total_seconds()),
            "-" if e.price_per_hour is None else f"{e.price_per_hour:.3f}",
            f"{e.cost_so_far(now):.2f}",
            ttl_s,
        ]
        if doing:
            d = doing.get(e.name)
            row.append(f"{d['task']}: {d['state']}" + (f" (job {d['job']})" if d["job"] else "")
                       if d else "-")
        t.add_row(*row)
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
    disk: Annotated[int, typer.Option("--disk", min=1, max=MAX_DISK_GB, help="Disk, GB.")] = 50,
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
        float | None,
        typer.Option(
            "--ready-timeout", min=1, max=MAX_READY_TIMEOUT_S, help="Readiness deadline, s."
        ),
    ] = None,
    yes: Annotated[
        bool, typer.Option("--yes", "-y", help="Rent without asking (needed when not a terminal).")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Rent the cheapest matching instance, wait until it is usable, and print how to SSH in.

    On a paid provider it first shows what it will rent (offer, $/h, spot or on-demand, TTL,
    estimated cost) and asks, unless -y. The instance is detached from this command: it runs
    until `broker instances terminate` or its --ttl. Ctrl-C, SIGTERM or SIGHUP while creating
    terminate it. Exit 3: stopped with an instance whose cleanup could not be confirmed.
    """
    with _errors(), interrupts_as_keyboard():
        _create(
            query, gpu_count, gpu_type, min_vram, max_price, provider, spot, image, disk, ttl,
            name, n_offers, keep_on_failure, wait, ready_timeout, yes, as_json,
        )  # fmt: skip


def _create(
    query: str | None,
    gpu_count: int | None,
    gpu_type: str | None,
    min_vram: float | None,
    max_price: float | None,
    provider: list[str] | None,
    spot: bool | None,
    image: str | None,
    disk: int,
    ttl: str | None,
    name: str | None,
    n_offers: int,
    keep_on_failure: bool,
    wait: bool,
    ready_timeout: float | None,
    yes: bool,
    as_json: bool,
) -> None:
    from broker.client import build_query
    if ready_timeout is not None and not math.isfinite(ready_timeout):
        raise ConfigError(f"--ready-timeout must be a number of seconds, not {ready_timeout}")
    q = build_query(query, gpu_type=gpu_type, min_vram_gb=min_vram, manufacturer=None)
    if spot is None and "spot" not in (query or "").lower():
        spot = False  # spot boxes can vanish mid-run: opt in with --spot or `spot` in the query
    client = GPUClient(providers=provider or None)
    ttl_s = parse_ttl(ttl if ttl is not None else client.settings.default_ttl)
    # Lines, not a spinner, when the output is not a terminal (CI logs, pipes): one per stage.
    live = out.is_terminal and err.is_terminal
    status = err.status("searching offers...", spinner="dots")
    last_stage = ""

    def say(text: str) -> None:
        if live:
            status.update(text)
        else:
            err.print(text, highlight=False, markup=False)

    def progress(stage: str, detail: str) -> None:
        nonlocal last_stage
        if live:
            status.update(f"[bold]{stage}[/bold]: {escape(detail)}")
        elif stage != last_stage:
            err.print(f"{stage}: {detail}", highlight=False, markup=False)
        last_stage = stage

    def attempt(a: ProvisionAttempt) -> None:
        nonlocal last_stage
        last_stage = ""  # the next offer's stages get their own lines
        if not as_json:
            err.print(_attempt_line(a), highlight=False)
        if not a.ok:
            say("trying the next offer...")

    if live:
        status.start()
    else:
        say("searching offers...")
    try:
        result = client.search(q, gpu_count=gpu_count, spot=spot)
        if not result.offers and result.all_failed:
            detail = "; ".join(
                f"{r.provider}: {(r.error or {}).get('message', r.status)}" for r in result.failed
            )
            raise ProvisionError(f"search failed at every provider ({detail})")
        offers = list(result.offers)
        status.stop()
        _confirm_rental(client, offers, max_price, ttl_s, n_offers, yes)
        if live:
            status.start()
        inst = client.create(
            offers,
            gpu_count=gpu_count,
            image=image,
            disk_gb=disk,
            name=name,
            n_offers=n_offers,
            ttl=ttl_s,
            max_price_per_hour=max_price,
            keep_on_failure=keep_on_failure,
            wait=wait,
            ready_timeout=ready_timeout,
            spot=spot,
            detach=True,
            on_progress=progress,
            on_attempt=attempt,
        )
    except KeyboardInterrupt as e:
        # Ctrl-C, SIGTERM and SIGHUP alike: the create already terminated what it made.
        status.stop()
        err.print(
            f"interrupted ({e or 'Ctrl-C'}): cleanup attempted; `broker instances reconcile` "
            "confirms nothing is left",
            highlight=False,
        )
        raise typer.Exit(exit_code(e)) from None
    except BrokerError as e:
        status.stop()
        abandoned = isinstance(e, ProvisionError) and bool(e.abandoned)
        code = 2 if isinstance(e, ConfigError) else EXIT_ABANDONED if abandoned else 1
        if as_json:
            d = e.to_dict()
            if isinstance(e, ProvisionError):
                d["attempts"] = [a.model_dump(mode="json") for a in e.attempts]
            _dump({"ok": False, "error": d, "abandoned": d.get("abandoned", [])})
            raise typer.Exit(code) from None
        if abandoned:
            err.print(f"[red]error:[/red] {escape(str(e))}", highlight=False)
            raise typer.Exit(code) from None
        raise
    finally:
        status.stop()
    _print_created(client, inst, as_json)


def _confirm_rental(
    client: GPUClient,
    offers: list[GPUOffer],
    max_price: float | None,
    ttl_s: int | None,
    n_offers: int,
    yes: bool,
) -> None:
    """Show what a paid create will rent and ask (unless -y); refuse to guess without a tty."""
    cap = max_price if max_price is not None else client.max_price_per_hour
    cooling = client.journal.cooling()
    first = next(
        (o for o in offers if (cap is None or o.price_per_hour <= cap) and o.key not in cooling),
        None,
    )
    if first is None or first.price_per_hour <= 0:
        return  # nothing to rent (create explains) or free (local, your own SSH hosts)
    kind = market(first.spot, first.cloud_type.value if first.cloud_type else None)
    lines = [
        f"will rent: {first.provider} {first.gpu_count}x {first.gpu_type} ({kind})"
        f"{' in ' + first.region if first.region else ''} at ${first.price_per_hour:.3f}/h",
    ]
    if first.spot:
        lines.append("  spot: the provider may stop it at any time (--on-demand avoids that)")
    if ttl_s is not None:
        lines.append(
            f"  TTL {format_duration(ttl_s)}: at most ${first.price_per_hour * ttl_s / 3600:.2f}"
        )
    elif client.budget is not None:
        left = max(0.0, client.budget - client.journal.committed_spend())
        hours = left / first.price_per_hour
        lines.append(
            f"  no --ttl: the budget (${left:.2f} left) sets one of about "
            f"{format_duration(hours * 3600)}: at most ${left:.2f}"
        )
    else:
        lines.append(
            f"  no TTL: it bills ${first.price_per_hour:.3f}/h "
            f"(${first.price_per_hour * 24:.2f}/day) until you terminate it"
        )
    if n_offers > 1 and len(offers) > 1:
        lines.append(f"  if it fails, up to {n_offers - 1} next offer(s) may be tried instead")
    for line in lines:
        err.print(escape(line), highlight=False)
    if yes:
        return
    if not sys.stdin.isatty():
        raise ConfigError("not a terminal: pass -y to rent without confirmation")
    if not typer.confirm("Rent it?", err=True):
        raise typer.Exit(1)


def _print_created(client: GPUClient, inst: Any, as_json: bool) -> None:
    entry = client.journal.get(inst.name or "")
    ttl_seconds = inst.extra.get("ttl_seconds")
    ttl_info = {
        "seconds": ttl_seconds,
        "from_budget": bool(inst.extra.get("ttl_from_budget")),
        "enforced_by": inst.extra.get("ttl_enforced_by"),
    }
    key = client.settings.ssh_key_path
    hint = None
    if inst.ssh is not None:
        ident = f"-i {shlex.quote(str(key))} " if key else ""
        hint = f"bifrost exec {ident}{shlex.quote(inst.ssh.target)} nvidia-smi"
    if as_json:
        _dump(
            {
                "ok": True,
                "instance": inst.model_dump(mode="json"),
                "ssh_command": inst.ssh_command() if inst.ssh else None,
                "bifrost_command": hint,
                "target": inst.target if inst.ssh or inst.provider == "local" else None,
                "ttl": ttl_info,
                "journal": entry_dict(entry) if entry else None,
            }
        )
        return
    if entry is not None:
        _wide().print(instances_table([entry]))
    if ttl_seconds:
        why = " (set by the budget)" if ttl_info["from_budget"] else ""
        by = (
            "the provider terminates it then"
            if ttl_info["enforced_by"] == "provider"
            else "broker terminates it at the next broker command after that "
            "(run `broker instances reap` from cron to be sure)"
        )
        out.print(f"ttl:     {format_duration(ttl_seconds)}{why}; {by}", highlight=False)
    else:
        out.print("ttl:     none: it bills until you terminate it", highlight=False)
    if inst.ssh is not None:
        out.print(f"ssh:     {inst.ssh_command()}", highlight=False, markup=False)
        out.print(f"bifrost: {hint}", highlight=False, markup=False)
    out.print(f"stop it: broker instances terminate {inst.name}", highlight=False)


# -- list / status ----------------------------------------------------------------------------


def _list(include_all: bool, refresh: bool, sweep: str | None, as_json: bool) -> None:
    with _errors():
        client = GPUClient()
        entries = client.instances(include_closed=include_all, refresh=refresh)
        if sweep is not None:
            entries = [e for e in entries if e.sweep == sweep]
        from broker.launch.records import activity

        doing = activity(client.settings.state_dir)
        if as_json:
            _dump([entry_dict(e) | {"launch": doing.get(e.name)} for e in entries])
            return
        if not entries:
            out.print("no instances" + ("" if include_all else " (use --all for past ones)"))
            return
        _wide().print(instances_table(entries, doing))
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
    as_json: Annotated[
        bool, typer.Option("--json", help="Print target and commands as JSON (no session).")
    ] = False,
) -> None:
    """Open an SSH session to the instance (or print the command)."""
    with _errors():
        client = GPUClient()
        inst = client.instance(ref)
        local = inst.provider == "local" or inst.extra.get("target") == "local"
        if as_json:
            key = client.settings.ssh_key_path
            _dump(
                {
                    "name": inst.name,
                    "local": local,
                    "target": inst.target if local or inst.ssh else None,
                    "ssh_command": None if local or inst.ssh is None else inst.ssh_command(),
                    "identity_file": str(key) if key and not local else None,
                }
            )
            return
        if local:
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
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Only report (exit 1 when something needs fixing).")
    ] = False,
    include_foreign: Annotated[
        bool,
        typer.Option(
            "--include-foreign",
            help="Also terminate broker-... instances named by another journal (a colleague's).",
        ),
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Find orphans (billing at a provider, held by nobody) and ghosts (journal only); fix them.

    Orphans are instances named by this journal that it does not know, believes terminated,
    whose TTL passed, or whose creating process died; they are terminated. Ghosts are journal
    entries whose instance is gone; they are closed. Foreign instances (named by another
    journal: another state dir, user or CI) are listed and touched only with
    --include-foreign. Pending creates (no answer yet, within the grace period) are listed.
    Exit 1 when a provider could not be asked, a fix failed, or (--dry-run) something needs
    fixing.
    """
    with _errors():
        client = GPUClient()
        from broker.lifecycle import fix

        with err.status("asking providers...", spinner="dots"):
            report = client.reconcile(provider)
        todo = report.fixable(include_foreign=include_foreign)
        if as_json and (dry_run or not todo):
            _dump(
                {
                    "findings": [f.to_dict() for f in report.findings],
                    "unreachable": report.unreachable,
                    "fixed": [],
                }
            )
            if report.unreachable or (dry_run and todo):
                raise typer.Exit(1)
            return
        for p, msg in report.unreachable.items():
            err.print(f"[yellow]could not ask {p}:[/yellow] {escape(msg)}", highlight=False)
        if report.findings and not as_json:
            t = Table(header_style="bold")
            for c in ("kind", "provider", "id", "name", "status", "$/h", "reason"):
                t.add_column(c, overflow="fold")
            for f in report.findings:
                t.add_row(
                    f"[red]{f.kind}[/red]" if f.kind == "orphan" else f.kind,
                    f.provider,
                    f.instance_id or "-",
                    f.name or "-",
                    f.status or "-",
                    "-" if f.price_per_hour is None else f"{f.price_per_hour:.3f}",
                    escape(f.reason),
                )
            _wide().print(t)
        if report.foreign and not include_foreign and not as_json:
            err.print(
                f"{len(report.foreign)} foreign instance(s) left alone (another journal's); "
                "--include-foreign terminates them",
                highlight=False,
            )
        if not todo:
            if not as_json:
                out.print(
                    "no orphans, no ghosts"
                    + (" at the providers that answered" if report.unreachable else "")
                )
            if report.unreachable:
                raise typer.Exit(1)
            return
        if dry_run:
            raise typer.Exit(1)
        n_term = sum(1 for f in todo if f.kind != "ghost")
        prompt = f"Terminate {n_term} instance(s) and close {len(report.ghosts)} ghost entry(ies)?"
        if not yes and not typer.confirm(prompt, err=True):
            raise typer.Exit(1)
        fixed: list[dict[str, Any]] = []
        failed = 0
        for f in todo:
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
    as_json: JsonOpt = False,
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
            if as_json:
                _dump([])
            else:
                out.print("nothing open to forget")
            return
        if not as_json:
            _wide().print(instances_table(targets))
        if not yes and not typer.confirm(
            f"Close {len(targets)} entry(ies) without asking the provider?", err=True
        ):
            raise typer.Exit(1)
        for e in targets:
            client.journal.record_event(e.name, "forgotten", "closed by `broker instances forget`")
            client.journal.record_status(e.name, InstanceStatus.TERMINATED, detail="forgotten")
            if not as_json:
                out.print(f"forgot {e.name}", highlight=False)
        if as_json:
            _dump([{"name": e.name, "forgotten": True} for e in targets])


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
        from broker.lifecycle import entries_to_reap, reap_reason

        now = utcnow()
        with Journal.default(settings.state_dir) as journal:
            todo = {e.name: reap_reason(e, now) for e in entries_to_reap(journal, now)}
            if not todo:
                return
        client = GPUClient(settings)
        for e, error in client.reap(timeout=30.0):
            if error is None:
                why = todo.get(e.name) or "TTL passed"
                err.print(f"[yellow]reaped[/yellow] {e.name}: {why}", highlight=False)
            else:
                err.print(
                    f"[red]could not reap[/red] {e.name}: {escape(str(error))}", highlight=False
                )
        client.close()
    except BrokerError as e:
        # A reap problem must not block the command the user asked for.
        err.print(f"[yellow]auto-reap skipped:[/yellow] {escape(str(e))}", highlight=False)
