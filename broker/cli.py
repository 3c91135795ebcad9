"""The ``broker`` command line (typer + rich). Every command has ``--json`` where output is data.

Exit codes: 0 success; 1 an operation failed (e.g. every provider errored); 2 bad input (a query,
a flag, the config, a provider asked for by name without its API key).

Output meant for pipes is never cut or wrapped: when stdout is not a terminal, tables are as wide
as their widest row (``broker providers | grep primeintellect`` works), and errors are one line
on stderr whatever its width.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console, ConsoleDimensions
from rich.markup import escape
from rich.table import Table

from broker.client import GPUClient, SearchResult
from broker.config import (
    api_key_hint,
    default_config_path,
    load_settings,
    write_config_template,
)
from broker.errors import BrokerError, ConfigError, QueryError
from broker.lifecycle import format_duration
from broker.providers.base import provider_classes
from broker.types import GPUOffer

app = typer.Typer(
    name="broker",
    help="Find and rent the cheapest GPU box that fits, across clouds.",
    no_args_is_help=True,
    # typer's completion: `broker --install-completion` for the shell it is run from (bash, zsh,
    # fish), `broker --show-completion` to print that script, `_BROKER_COMPLETE=source_fish
    # broker` to print a given shell's.
    add_completion=True,
    pretty_exceptions_enable=False,
    # Plain click help, like bifrost's: flags show no `<bool>` type that invites `--json true`.
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)

# Wider than any row a table or message of ours can have; a pipe then gets whole lines.
PIPE_WIDTH = 100_000


class PipeConsole(Console):
    """A rich console that neither cuts nor wraps when its stream is not a terminal.

    Rich takes the width from whichever std stream is a terminal (so ``broker providers | grep``
    run from a terminal got an 80-column table with ``primeintell…``) or 80 columns. A pipe or
    file has no width: lines are as long as their content.
    """

    @property
    def size(self) -> ConsoleDimensions:
        """The terminal's size, or an unbounded width when the stream is not a terminal."""
        dims = super().size
        if self.is_terminal:
            return dims
        return ConsoleDimensions(PIPE_WIDTH, dims.height)

    @size.setter
    def size(self, new_size: tuple[int, int]) -> None:
        self._width, self._height = new_size


out = PipeConsole()
# Errors are soft-wrapped: a terminal folds a long line itself, and a log or a test keeps the
# message (and a path in it) whole, whatever the width.
err = PipeConsole(stderr=True, soft_wrap=True)

T = TypeVar("T")


def print_error(message: str) -> None:
    """Print ``error: <message>`` to stderr as one line (never wrapped; markup in it is literal)."""
    err.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)


@contextmanager
def _errors() -> Iterator[None]:
    """Turn broker errors into one clear line and an exit code, never a traceback.

    :class:`QueryError` and :class:`ConfigError` exit 2 (bad input); any other
    :class:`BrokerError` exits 1. Other CLI modules wrap their commands in it too.
    """
    try:
        yield
    except QueryError as e:
        print_error(str(e))
        if caret := e.caret():
            err.print(caret, markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    except ConfigError as e:
        print_error(str(e))
        raise typer.Exit(2) from None
    except BrokerError as e:
        print_error(str(e))
        raise typer.Exit(1) from None


def _dump(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def _num(v: float | None, fmt: str = "{:g}") -> str:
    return "-" if v is None else fmt.format(v)


def offers_table(offers: list[GPUOffer]) -> Table:
    """The search table: one row per offer."""
    t = Table(show_lines=False, header_style="bold")
    for col, just in [
        ("provider", "left"),
        ("GPU", "left"),
        ("n", "right"),
        ("VRAM GB", "right"),
        ("vCPU", "right"),
        ("RAM GB", "right"),
        ("disk GB", "right"),
        ("$/h", "right"),
        ("$/GPU/h", "right"),
        ("market", "left"),
        ("region", "left"),
        ("stock", "left"),
        ("age", "right"),
    ]:
        t.add_column(col, justify=just)  # type: ignore[arg-type]
    for o in offers:
        cloud = getattr(o.cloud_type, "value", o.cloud_type) if o.cloud_type else None
        kind = ("spot" if o.spot else "on-demand") + (f", {cloud}" if cloud else "")
        gpu = o.gpu_type if o.gpu_known else f"{o.gpu_type} [yellow](?)[/yellow]"
        if o.spot:
            gpu += " [cyan]spot[/cyan]"
        t.add_row(
            o.provider,
            gpu,
            str(o.gpu_count),
            _num(o.vram_gb),
            _num(o.vcpus),
            _num(o.ram_gb, "{:.0f}"),
            _num(o.disk_gb, "{:.0f}"),
            f"{o.price_per_hour:.3f}",
            f"{o.price_per_gpu_hour:.3f}",
            kind,
            o.region or o.country or "-",
            o.stock.value if o.stock else "-",
            format_duration(max(0.0, o.age_seconds)),
        )
    return t


def _report_lines(result: SearchResult) -> list[str]:
    lines = []
    for r in result.reports:
        if r.status == "ok":
            lines.append(
                f"[green]ok[/green] {r.provider}: {r.offers} offers, {r.matched} shown "
                f"({r.latency_s:.2f}s)"
            )
        elif r.status == "skipped":
            # Skipped because the query excludes it, or (with a message) not configured.
            why = (r.error or {}).get("message") or "excluded by the query"
            lines.append(f"[dim]skipped {r.provider}: {escape(str(why))}[/dim]")
        else:
            msg = (r.error or {}).get("message", "")
            kind = (r.error or {}).get("type", r.status)
            lines.append(f"[red]{r.status}[/red] {r.provider}: {kind}: {escape(str(msg))}")
    return lines


@app.command()
def search(
    query: Annotated[
        str | None,
        typer.Argument(help="Query, e.g. 'gpu~H100 gpus>=2 vram>=80GB price<=6/h !spot'."),
    ] = None,
    gpu_type: Annotated[
        str | None, typer.Option("--gpu-type", "-g", help="GPU name (aliases ok).")
    ] = None,
    gpu_count: Annotated[
        int | None, typer.Option("--gpu-count", "-n", min=1, help="Exact GPU count.")
    ] = None,
    min_vram: Annotated[
        float | None, typer.Option("--min-vram", min=0, help="Minimum VRAM per GPU, GB.")
    ] = None,
    max_price: Annotated[
        float | None, typer.Option("--max-price", min=0, help="Max US$/h for the instance.")
    ] = None,
    manufacturer: Annotated[
        str | None, typer.Option("--manufacturer", help="nvidia, amd, intel.")
    ] = None,
    provider: Annotated[
        list[str] | None, typer.Option("--provider", "-p", help="Only these providers.")
    ] = None,
    spot: Annotated[
        bool | None, typer.Option("--spot/--on-demand", help="Only spot / only on-demand.")
    ] = None,
    sort: Annotated[str | None, typer.Option("--sort", help="Sort keys, e.g. price,-vram.")] = None,
    limit: Annotated[int | None, typer.Option("--limit", min=1, help="At most N offers.")] = 20,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    explain: Annotated[
        bool, typer.Option("--explain", help="Show the parsed query and the plan; no search.")
    ] = False,
) -> None:
    """Search offers across providers; cheapest first."""
    with _errors():
        client = GPUClient(providers=provider or None)
        kwargs: dict[str, Any] = {
            "gpu_type": gpu_type,
            "gpu_count": gpu_count,
            "min_vram_gb": min_vram,
            "max_price_per_hour": max_price,
            "manufacturer": manufacturer,
            "spot": spot,
            "sort": [s.strip() for s in sort.split(",") if s.strip()] if sort else None,
        }
        from broker.query import parse

        # A limit= in the query text wins over the default --limit.
        if query is not None and parse(query).limit is not None and limit == 20:
            limit = None
        kwargs["limit"] = limit
        if explain:
            plan = client.explain(query, **kwargs)
            if as_json:
                _dump(plan)
                return
            out.print(f"[bold]query[/bold]  {plan['query'] or '(everything)'}", highlight=False)
            out.print(f"[bold]sort[/bold]   {', '.join(plan['sort'])}", highlight=False)
            out.print(f"[bold]limit[/bold]  {plan['limit']}", highlight=False)
            out.print("[bold]IR[/bold]     ", end="")
            out.print(plan["ir"], highlight=False, markup=False)
            for p in plan["providers"]:
                if not p["queried"]:
                    out.print(f"  {p['provider']}: not asked ({p['reason']})", markup=False)
                else:
                    pushed = ", ".join(p["server_side"]) or "nothing (all filtering local)"
                    out.print(
                        f"  {p['provider']}: server-side {pushed}; every condition re-checked "
                        "locally",
                        highlight=False,
                    )
            return
        with err.status("searching providers...", spinner="dots"):
            result = client.search(query, **kwargs)
        client.close()
        if as_json:
            _dump(
                {
                    "query": result.query,
                    "offers": [o.model_dump(mode="json") for o in result.offers],
                    "providers": [r.model_dump(mode="json") for r in result.reports],
                }
            )
        else:
            if result.offers:
                out.print(offers_table(result.offers))
            else:
                out.print("no offers match" + (f": {result.query}" if result.query else ""))
            for line in _report_lines(result):
                err.print(line, highlight=False, soft_wrap=True)
        unconfigured = [
            r.provider
            for r in result.reports
            if r.status == "error" and (r.error or {}).get("type") == "ConfigError"
        ]
        for name in unconfigured:
            if hint := api_key_hint(name):
                err.print(f"  {name}: {hint}", markup=False, highlight=False, soft_wrap=True)
        # A provider asked for by name without its key is a config error (exit 2, as documented),
        # not a provider failure (1).
        if unconfigured:
            raise typer.Exit(2)
        if result.all_failed:
            raise typer.Exit(1)


@app.command("providers")
def providers_cmd(
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """List providers, whether they are configured, and what they can do."""
    with _errors():
        settings = load_settings()
        rows: list[dict[str, Any]] = []
        for name, cls in provider_classes().items():
            caps = cls.capabilities
            rows.append(
                {
                    "provider": name,
                    "name": cls.display_name,
                    "configured": cls.is_configured(settings),
                    "capabilities": caps.to_dict(),
                }
            )
        if as_json:
            _dump(rows)
            return
        t = Table(header_style="bold")
        for c in ("provider", "configured", "stop/resume", "spot", "provider TTL", "pushdown"):
            t.add_column(c)
        for r in rows:
            c = r["capabilities"]
            t.add_row(
                r["provider"],
                "[green]yes[/green]" if r["configured"] else "[dim]no[/dim]",
                "yes" if c["stop_resume"] else "-",
                "yes" if c["spot"] else "-",
                "yes" if c["provider_ttl"] else "-",
                ", ".join(c["pushdown"]) or "-",
            )
        out.print(t)


@app.command()
def init(
    path: Annotated[
        Path | None, typer.Option("--path", help="Where to write (default: platform config dir).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Write a commented config file (mode 0600). Never overwrites an existing one."""
    with _errors():
        target = path or default_config_path()
        written = write_config_template(target)
        if as_json:
            _dump({"path": str(written), "mode": "0600"})
            return
        out.print(
            f"wrote {written} (mode 0600); put your API keys there or in the environment",
            markup=False,
            highlight=False,
        )


def version() -> str:
    """The installed package's version (the source tree's when it is not installed)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("gpu-broker")
    except PackageNotFoundError:
        from broker import __version__

        return __version__


def _print_version(value: bool) -> None:
    if value:
        out.print(f"broker {version()}", markup=False, highlight=False)
        raise typer.Exit(0)


@app.callback()
def _root(
    ctx: typer.Context,
    show_version: Annotated[
        bool,
        typer.Option(
            "--version",
            "-V",
            callback=_print_version,
            is_eager=True,
            help="Print the version and exit.",
        ),
    ] = False,
) -> None:
    """Find and rent the cheapest GPU box that fits, across clouds."""
    # Every command that may touch instances first terminates those past their TTL, so a
    # forgotten box dies the next time anyone uses broker, even without `reap` in cron.
    if ctx.resilient_parsing or ctx.invoked_subcommand in (None, "init"):
        return
    from broker.permissions import default_config_warning

    if (warning := default_config_warning()) is not None:
        err.print(f"warning: {warning}", markup=False, highlight=False, soft_wrap=True)
    if ctx.invoked_subcommand == "providers":
        return
    try:
        load_settings()
    except ConfigError:
        return  # the command itself reports the bad setting, once, and exits 2
    from broker.cli_instances import auto_reap

    auto_reap()


def main() -> None:
    """Console-script entry point."""
    app()


# Register `create`, `instances ...`, `list` and `terminate` (cli_instances), and `launch` and
# `sweep` (cli_launch) on `app`.
from broker import cli_instances, cli_launch  # noqa: E402, F401

if __name__ == "__main__":
    main()
