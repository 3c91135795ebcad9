"""``broker launch`` and ``broker sweep``: a task spec in, results out, no box forgotten.

Both commands handle Ctrl-C, SIGTERM and SIGHUP alike: the job is stopped and every box is
terminated and confirmed gone (unless ``--keep``), then the process exits 130/143/129.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from broker.cli import PipeConsole, _dump, _errors, app, print_error
from broker.client import GPUClient
from broker.errors import ConfigError
from broker.launch.records import LaunchStore
from broker.launch.runner import Launch, LaunchError, LaunchResult, Plan
from broker.launch.script import confirm_rent
from broker.launch.sweep import SweepResult, SweepRow, SweepRunner, load_sweep, sweep_status
from broker.launch.task import Task, load_task
from broker.signals import exit_code, interrupts_as_keyboard
from broker.types import GPUOffer

SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a task key: --set resources.gpus=2 (repeatable)."),
]
YesOpt = Annotated[bool, typer.Option("--yes", "-y", help="Do not ask before renting.")]
DryOpt = Annotated[bool, typer.Option("--dry-run", help="Show the plan; rent nothing.")]
KeepOpt = Annotated[
    bool, typer.Option("--keep", help="Leave the box(es) running at the end (you terminate).")
]
ResultsOpt = Annotated[
    Path, typer.Option("--results", help="Outputs land in RESULTS/<task name>/.")
]
ProviderOpt = Annotated[
    list[str] | None,
    typer.Option("--provider", "-p", help="Only these providers (overrides resources.providers)."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable result on stdout.")]


def _console() -> PipeConsole:
    return PipeConsole(highlight=False)


class _Printer:
    """Stage lines and log lines, one per line; colour only on a terminal."""

    def __init__(self, *, quiet_log: bool = False, to_stderr: bool = False) -> None:
        self.console = PipeConsole(highlight=False, stderr=to_stderr)
        self.quiet_log = quiet_log

    def event(self, stage: str, detail: str) -> None:
        if self.console.is_terminal:
            self.console.print(f"[bold cyan]{escape(stage)}[/] {escape(detail)}", soft_wrap=True)
        else:
            self.console.print(f"{stage}: {detail}", markup=False, soft_wrap=True)

    def log(self, line: str) -> None:
        if not self.quiet_log:
            self.console.print(f"  | {line}", markup=False, soft_wrap=True)


def _client(providers: list[str] | None) -> GPUClient:
    return GPUClient(providers=providers) if providers else GPUClient()


def _apply_providers(task: Task, providers: list[str] | None) -> Task:
    if providers:
        task.resources.providers = list(providers)
    return task


def _confirm(offers: list[GPUOffer], yes: bool, what: str) -> None:
    """Ask before spending money (a non-interactive run must say -y); no means exit 1."""
    if not confirm_rent(offers, yes=yes, what=what, ask=lambda q: typer.confirm(q, default=False)):
        raise typer.Exit(1)


def _result_json(result: LaunchResult, plan: Plan | None = None) -> dict[str, Any]:
    data = result.model_dump(mode="json")
    if plan is not None:
        data["plan"] = json.loads(plan.model_dump_json())
    return data


def plan_dict(plan: Plan) -> dict[str, Any]:
    """The plan as JSON-ready data."""
    d: dict[str, Any] = json.loads(plan.model_dump_json())
    d["summary"] = plan.summary()
    return d


@app.command()
def launch(
    task_file: Annotated[
        Path | None, typer.Argument(help="The task YAML (see docs/launch.md).", show_default=False)
    ] = None,
    set_: SetOpt = None,
    yes: YesOpt = False,
    dry_run: DryOpt = False,
    detach: Annotated[
        bool, typer.Option("--detach", help="Return once the job runs; `--attach NAME` later.")
    ] = False,
    attach: Annotated[
        str | None,
        typer.Option("--attach", help="Follow a detached launch NAME: follow, pull, terminate."),
    ] = None,
    keep: KeepOpt = False,
    results: ResultsOpt = Path("results"),
    provider: ProviderOpt = None,
    nodes: Annotated[
        int | None, typer.Option("--nodes", min=1, max=64, help="Boxes for one job (torchrun).")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Rent a box for TASK_FILE, push the workdir, run setup and the job, stream its log, pull
    the outputs, terminate. Exits with the job's exit code."""
    printer = _Printer(quiet_log=as_json, to_stderr=as_json)
    code = 0
    with _errors():
        try:
            with interrupts_as_keyboard():
                if attach is not None:
                    if task_file is not None:
                        raise ConfigError("give either a task file or --attach NAME, not both")
                    code = _attach(attach, provider, results, keep, printer, as_json)
                    raise typer.Exit(code)
                if task_file is None:
                    raise ConfigError(
                        "missing TASK_FILE: broker launch task.yaml (or --attach NAME)"
                    )
                sets = [*(set_ or []), *([f"nodes={nodes}"] if nodes is not None else [])]
                task = _apply_providers(load_task(task_file, sets), provider)
                client = _client(task.resources.providers)
                run = Launch(
                    client,
                    task,
                    results_dir=results,
                    keep=keep,
                    on_event=printer.event,
                    on_log=printer.log,
                )
                plan = run.plan()
                if dry_run:
                    printer.event("plan", plan.summary())
                    if as_json:
                        _dump(plan_dict(plan))
                    code = 0 if plan.offers else 3
                    if not plan.offers:
                        print_error(f"no offer matches task {task.name!r}")
                    raise typer.Exit(code)
                ttl_note = (
                    "" if plan.ttl else " (no TTL: it runs until the job ends or you stop it)"
                )
                _confirm(plan.offers, yes, f"{plan.offer_text()}{ttl_note} for task {task.name!r}")
                try:
                    result = run.run(plan, detach=detach)
                except LaunchError as e:
                    print_error(str(e))
                    if as_json:
                        _dump(
                            {
                                "name": task.name,
                                "state": e.state,
                                "exit_code": e.exit_code,
                                "error": str(e),
                            }
                        )
                    raise typer.Exit(e.exit_code) from None
                if as_json:
                    _dump(_result_json(result, plan))
                _final_line(printer, result)
                code = result.exit_code
        except KeyboardInterrupt as e:
            print_error(f"interrupted ({e or 'Ctrl-C'}): cleaned up")
            raise typer.Exit(exit_code(e)) from None
    raise typer.Exit(code)


def _final_line(printer: _Printer, result: LaunchResult) -> None:
    if result.state == "detached":
        return
    printer.event(
        "done",
        f"{result.name} {result.state} (exit code {result.exit_code}), cost ≈ ${result.cost:.4f}"
        + (f", results in {result.results_dir}" if result.results_dir else ""),
    )


def _attach(
    name: str,
    providers: list[str] | None,
    results: Path,
    keep: bool,
    printer: _Printer,
    as_json: bool,
) -> int:
    client = _client(providers)
    store = LaunchStore.default(client.settings.state_dir)
    rec = store.latest(name)
    if rec is None:
        raise ConfigError(f"no launch named {name!r} in {store.path}")
    if rec.final:
        raise ConfigError(
            f"launch {name!r} already ended ({rec.state}); results: {rec.results_dir or 'none'}"
        )
    task = Task.model_validate_json(rec.task_json)
    run = Launch(
        client,
        task,
        results_dir=results,
        keep=keep,
        on_event=printer.event,
        on_log=printer.log,
        store=store,
        sweep=rec.sweep,
    )
    try:
        result = run.attach(rec)
    except LaunchError as e:
        print_error(str(e))
        return e.exit_code
    if as_json:
        _dump(_result_json(result))
    _final_line(printer, result)
    return result.exit_code


# -- sweep ------------------------------------------------------------------------------------


def _rows_table(rows: list[SweepRow], title: str) -> Table:
    t = Table(title=title, show_lines=False)
    for col in ("task", "state", "box", "job", "exit", "cost $", "error"):
        t.add_column(col, overflow="fold")
    for r in rows:
        t.add_row(
            r.task,
            r.state,
            r.instance or "",
            r.job or "",
            "" if r.exit_code is None else str(r.exit_code),
            f"{r.cost:.4f}",
            (r.error or "").splitlines()[0] if r.error else "",
        )
    return t


@app.command()
def sweep(
    spec: Annotated[
        str | None,
        typer.Argument(help="The sweep YAML; with --status also a sweep name.", show_default=False),
    ] = None,
    set_: SetOpt = None,
    yes: YesOpt = False,
    dry_run: DryOpt = False,
    status: Annotated[
        bool, typer.Option("--status", help="One row per task of the sweep (the latest if none).")
    ] = False,
    retry_failed: Annotated[
        bool, typer.Option("--retry-failed", help="Run failed tasks again (done ones never).")
    ] = False,
    max_parallel: Annotated[
        int | None, typer.Option("--max-parallel", min=1, max=256, help="Tasks at once.")
    ] = None,
    delay: Annotated[
        float, typer.Option("--delay", min=0, max=3600, help="Seconds between task starts.")
    ] = 0.0,
    keep: KeepOpt = False,
    results: ResultsOpt = Path("results"),
    provider: ProviderOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Run a task template over a parameter matrix (resumable: run it again to continue)."""
    console = _console()
    with _errors():
        if status:
            _sweep_status(spec, provider, as_json)
            return
        if spec is None:
            raise ConfigError("missing SWEEP_FILE: broker sweep sweep.yaml")
        sw = load_sweep(spec, set_ or [])
        if provider:
            sw.task.setdefault("resources", {})["providers"] = list(provider)
        client = _client(provider)
        tasks = sw.tasks()
        # Plans in parallel: each is a search across every provider (seconds each on clouds).
        store = LaunchStore.default(client.settings.state_dir)
        with ThreadPoolExecutor(max_workers=min(8, len(tasks))) as pool:
            found = list(pool.map(lambda t: Launch(client, t, store=store).plan(), tasks))
        plans: list[tuple[Task, Plan]] = list(zip(tasks, found, strict=True))
        total = sum(p.est_cost or 0 for _, p in plans)
        if as_json and dry_run:
            _dump(
                {
                    "sweep": sw.name,
                    "tasks": [plan_dict(p) for _, p in plans],
                    "total_est_cost": round(total, 4),
                }
            )
        elif not as_json:
            table = Table(title=f"sweep {sw.name}: {len(tasks)} tasks")
            for col in ("task", "offer", "$/h", "est cost $"):
                table.add_column(col, overflow="fold")
            for t, p in plans:
                table.add_row(
                    t.name,
                    p.offer_text(),
                    f"{p.offer.price_per_hour:.2f}" if p.offer else "-",
                    f"{p.est_cost:.2f}" if p.est_cost is not None else "-",
                )
            console.print(table)
            console.print(
                f"total estimate ≈ ${total:.2f} (max parallel {max_parallel or sw.max_parallel})",
                markup=False,
            )
        missing = [t.name for t, p in plans if not p.offers]
        if dry_run:
            if missing:
                print_error(f"no offer for: {', '.join(missing)}")
                raise typer.Exit(3)
            return
        if missing and len(missing) == len(plans):
            print_error(f"no task of sweep {sw.name} has an offer")
            raise typer.Exit(3)
        _confirm([o for _, p in plans for o in p.offers], yes, f"sweep {sw.name!r}")

        def event(task: str, stage: str, detail: str) -> None:
            line = f"[{task}] {stage}: {detail}"
            (PipeConsole(stderr=True) if as_json else console).print(
                line, markup=False, soft_wrap=True, highlight=False
            )

        runner = SweepRunner(
            client,
            sw,
            results_dir=results,
            max_parallel=max_parallel,
            retry_failed=retry_failed,
            keep=keep,
            on_event=event,
            start_delay=delay,
        )
        try:
            with interrupts_as_keyboard():
                result = runner.run()
        except KeyboardInterrupt as e:
            print_error(
                f"sweep {sw.name} interrupted ({e or 'Ctrl-C'}): tasks stopped, boxes "
                "terminated; run the same command again to resume"
            )
            raise typer.Exit(exit_code(e)) from None
        _sweep_summary(result, as_json)
        raise typer.Exit(result.exit_code)


def _sweep_summary(result: SweepResult, as_json: bool) -> None:
    if as_json:
        _dump(result.model_dump(mode="json") | {"exit_code": result.exit_code})
        return
    console = _console()
    console.print(_rows_table(result.rows, f"sweep {result.sweep}"))
    ok = sum(r.state == "succeeded" for r in result.rows)
    console.print(
        f"{ok}/{len(result.rows)} succeeded · total cost ≈ ${result.total_cost:.4f}", markup=False
    )
    if result.leaked:
        print_error("LEAK CHECK FAILED: " + "; ".join(result.leaked))
    else:
        console.print("leak check: every instance of the sweep is closed and gone", markup=False)


def _sweep_status(spec: str | None, providers: list[str] | None, as_json: bool) -> None:
    client = _client(providers)
    store = LaunchStore.default(client.settings.state_dir)
    names: list[str] | None = None
    if spec is not None and Path(spec).is_file():
        sw = load_sweep(spec)
        sweep_id, names = sw.name, [t.name for t in sw.tasks()]
    elif spec is not None:
        sweep_id = spec
    else:
        ids = store.sweeps()
        if not ids:
            raise ConfigError(f"no sweep has run yet (records: {store.path})")
        sweep_id = ids[0]
    rows = sweep_status(store, sweep_id, names)
    if not rows:
        raise ConfigError(
            f"no sweep named {sweep_id!r} (known: {', '.join(store.sweeps()) or 'none'})"
        )
    if as_json:
        _dump({"sweep": sweep_id, "rows": [r.model_dump(mode="json") for r in rows]})
        return
    _console().print(_rows_table(rows, f"sweep {sweep_id}"))
