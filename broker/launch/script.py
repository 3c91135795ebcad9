"""What a thin deployment script does with a task or a sweep, in one call each.

An experiment's ``deploy.py`` builds a :class:`~broker.launch.task.Task` from its own config and
hands it to :func:`launch_task`, which plans (and prints the plan), asks before renting (unless
``yes`` or the offer is free), runs with SIGTERM/SIGHUP handled like Ctrl-C, and turns every
failure into one line on stderr and an exit status. :func:`run_sweep` does the same for many tasks
and :func:`print_sweep_status` shows a sweep. Exit statuses are those of ``broker launch``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from broker.errors import BrokerError, ConfigError
from broker.launch.records import LaunchStore
from broker.launch.runner import EXIT_BAD_INPUT, EXIT_NO_OFFER, Launch, LaunchError, LaunchResult
from broker.launch.sweep import Sweep, SweepResult, SweepRunner, sweep_status
from broker.launch.task import Task
from broker.signals import exit_code, interrupts_as_keyboard
from broker.types import GPUOffer

Out = Callable[[str], None]


def _err(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def confirm_rent(
    offers: Sequence[GPUOffer], *, yes: bool, what: str, ask: Callable[[str], bool] | None = None
) -> bool:
    """True when renting ``what`` may go ahead: ``yes``, only free offers, or the user said so.

    Without a terminal (and without ``yes``) a paid rent is a :class:`ConfigError` saying
    "pass -y"; ``ask`` puts the question (default: ``input``)."""
    if yes or all(o.price_per_hour == 0 for o in offers):
        return True
    if not sys.stdin.isatty():
        raise ConfigError(f"{what} would rent paid instances: pass -y to confirm (no terminal)")
    if ask is None:
        return input(f"Rent {what}? [y/N] ").strip().lower() == "y"
    return ask(f"Rent {what}?")


def launch_task(
    task: Task,
    *,
    providers: Sequence[str] | None = None,
    yes: bool = False,
    dry_run: bool = False,
    results_dir: str | Path = "results",
    keep: bool = False,
    out: Out = print,
) -> tuple[int, LaunchResult | None]:
    """Plan, confirm and run ``task``; returns (exit status, result when the job ran)."""
    from broker.client import GPUClient

    try:
        client = GPUClient(providers=list(providers) if providers else None)
        run = Launch(
            client,
            task,
            results_dir=results_dir,
            keep=keep,
            on_event=lambda stage, detail: out(f"{stage}: {detail}"),
            on_log=lambda line: out(f"  | {line}"),
        )
        plan = run.plan()
        if dry_run or not plan.offers:
            out(f"{task.name}: {plan.summary()}")
        if not plan.offers:
            _err(f"error: no offer for {task.name} (query {plan.query!r}) {'; '.join(plan.errors)}")
            return EXIT_NO_OFFER, None
        if dry_run:
            return 0, None
        if not confirm_rent(plan.offers, yes=yes, what=plan.offer_text()):
            return EXIT_BAD_INPUT, None
        with interrupts_as_keyboard():
            result = run.run(plan)
        return result.exit_code, result
    except ConfigError as e:
        _err(f"error: {e}")
        return EXIT_BAD_INPUT, None
    except LaunchError as e:
        _err(f"error: {e}")
        return e.exit_code, None
    except BrokerError as e:
        _err(f"error: {e}")
        return 1, None
    except KeyboardInterrupt as e:
        _err(f"interrupted ({e or 'Ctrl-C'}): the job was stopped and its box terminated")
        return exit_code(e), None


def run_sweep(
    sweep: Sweep,
    *,
    providers: Sequence[str] | None = None,
    yes: bool = False,
    dry_run: bool = False,
    results_dir: str | Path = "results",
    retry_failed: bool = False,
    keep: bool = False,
    delay: float = 0.0,
    out: Out = print,
) -> tuple[int, SweepResult | None]:
    """Plan every task (a line each and the total), confirm, run the sweep, print the summary;
    returns (exit status, result). A dry run exits 3 when some task has no offer."""
    from broker.client import GPUClient

    try:
        client = GPUClient(providers=list(providers) if providers else None)
        store = LaunchStore.default(client.settings.state_dir)
        tasks = sweep.tasks()
        with ThreadPoolExecutor(max_workers=min(8, len(tasks))) as pool:
            plans = list(pool.map(lambda t: Launch(client, t, store=store).plan(), tasks))
        for task, plan in zip(tasks, plans, strict=True):
            out(f"{task.name:<24} {plan.summary()}")
        total = sum(p.est_cost or 0.0 for p in plans)
        with_offer = sum(1 for p in plans if p.offers)
        out(f"sweep {sweep.name}: {len(tasks)} tasks, estimated total ${total:.2f}")
        if with_offer == 0:
            _err("error: no task has an offer under its price cap")
            return EXIT_NO_OFFER, None
        if dry_run:
            return (0 if with_offer == len(tasks) else EXIT_NO_OFFER), None
        offers = [o for p in plans for o in p.offers]
        if not confirm_rent(offers, yes=yes, what=f"sweep {sweep.name}"):
            return EXIT_BAD_INPUT, None
        runner = SweepRunner(
            client,
            sweep,
            results_dir=results_dir,
            retry_failed=retry_failed,
            keep=keep,
            start_delay=delay,
            store=store,
            on_event=lambda task, stage, detail: out(f"[{task}] {stage}: {detail}"),
        )
        with interrupts_as_keyboard():
            result = runner.run()
    except ConfigError as e:
        _err(f"error: {e}")
        return EXIT_BAD_INPUT, None
    except BrokerError as e:
        _err(f"error: {e}")
        return 1, None
    except KeyboardInterrupt as e:
        _err(
            f"interrupted ({e or 'Ctrl-C'}): every task stopped and its box terminated; "
            f"run it again with the same sweep name ({sweep.name}) to resume"
        )
        return exit_code(e), None
    for r in result.rows:
        out(f"  {r.task:<24} {r.state:<10} exit={r.exit_code} ${r.cost:.4f} {r.error or ''}")
    ok = sum(r.state == "succeeded" for r in result.rows)
    out(
        f"sweep {sweep.name}: {ok}/{len(result.rows)} succeeded, cost ${result.total_cost:.4f}; "
        + ("LEAKED: " + "; ".join(result.leaked) if result.leaked else "nothing leaked")
    )
    return result.exit_code, result


def print_sweep_status(sweep_id: str | None = None, *, out: Out = print) -> int:
    """One line per task of ``sweep_id`` (the latest sweep when None); exit status 2 if none."""
    from broker.client import GPUClient

    try:
        store = LaunchStore.default(GPUClient().settings.state_dir)
    except ConfigError as e:
        _err(f"error: {e}")
        return EXIT_BAD_INPUT
    sid = sweep_id or next(iter(store.sweeps()), None)
    if sid is None:
        _err("error: no sweep has run yet")
        return EXIT_BAD_INPUT
    out(f"sweep {sid}")
    for r in sweep_status(store, sid):
        out(
            f"  {r.task:<24} {r.state:<22} {r.instance or '-':<40} {r.job or '-':<36} "
            f"exit={'' if r.exit_code is None else r.exit_code} ${r.cost:.4f}"
        )
    return 0
