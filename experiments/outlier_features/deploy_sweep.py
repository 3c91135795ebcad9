"""Deploy the outlier analysis of several models in parallel: a thin client of ``broker.launch``.

Examples:
    python deploy_sweep.py --dry-run                 # offers and cost estimate; rents nothing
    python deploy_sweep.py                           # all 7 MoE models (asks first)
    python deploy_sweep.py --models 01 03 06 --max-concurrent 2 -y
    python deploy_sweep.py --status                  # the latest sweep: state, box, job, cost
    python deploy_sweep.py --sweep-id outlier-x -y   # resume: done models are not run again
    python deploy_sweep.py --provider local --models tiny-moe tiny-moe-planted -y

Each model becomes a task (``deploy.build_task``); ``broker.launch.SweepRunner`` runs them under
one sweep id with a concurrency cap, re-attaches to jobs of a killed sweep instead of starting
them twice, and ends with the cost and a leak check. Results land in ``<results-dir>/<model>/``.
"""

from __future__ import annotations

import argparse
import secrets
import sys
from datetime import UTC, datetime
from pathlib import Path

if __package__ in (None, ""):  # run as a file (python experiments/outlier_features/deploy_sweep.py)
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from broker import BrokerError, ConfigError, GPUClient
from broker.launch import Launch, LaunchStore
from broker.launch.sweep import Sweep, SweepRunner, sweep_status
from broker.signals import exit_code, interrupts_as_keyboard
from experiments.outlier_features.configs import SWEEP
from experiments.outlier_features.deploy import (
    EXIT_BAD_INPUT,
    EXIT_NO_OFFER,
    BadInput,
    add_deploy_flags,
    build_task,
    resolve_model,
)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="deploy_sweep.py", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--models",
        nargs="+",
        default=[s.id for s in SWEEP],
        metavar="ID",
        help="models to run (default: the seven MoE configs 01-07)",
    )
    p.add_argument("--max-concurrent", "--max-parallel", type=int, default=7, dest="parallel")
    p.add_argument("--delay", type=float, default=0.0, help="seconds between launches")
    p.add_argument("--dry-run", action="store_true", help="plan and cost only; rent nothing")
    p.add_argument("--status", action="store_true", help="show the sweep (--sweep-id or latest)")
    p.add_argument("--retry-failed", action="store_true", help="run failed models again")
    p.add_argument("--sweep-id", help="name the sweep (reuse one to resume it)")
    add_deploy_flags(p)
    a = p.parse_args(argv)
    sid = a.sweep_id
    try:
        if a.parallel < 1 or a.delay < 0:
            raise BadInput("--max-concurrent must be >= 1 and --delay >= 0")
        client = GPUClient(providers=a.providers)
        store = LaunchStore.default(client.settings.state_dir)
        if a.status:
            sid = a.sweep_id or next(iter(store.sweeps()), None)
            if sid is None:
                raise BadInput("no sweep has run yet")
            rows = sweep_status(store, sid)
            print(f"sweep {sid}")
            for r in rows:
                print(
                    f"  {r.task:<24} {r.state:<22} {r.instance or '-':<40} {r.job or '-':<36} "
                    f"exit={'' if r.exit_code is None else r.exit_code} ${r.cost:.4f}"
                )
            return 0
        specs = [resolve_model(m) for m in dict.fromkeys(a.models)]
        tasks = [build_task(s, a) for s in specs]
        sid = a.sweep_id or f"outlier-{datetime.now(UTC):%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"
        sweep = Sweep.of_tasks(sid, tasks, max_parallel=a.parallel)
        total, offers = 0.0, 0
        for spec, task in zip(specs, tasks, strict=True):
            plan = Launch(client, task, store=store).plan()
            total += plan.est_cost or 0.0
            offers += bool(plan.offers)
            print(f"{spec.id:<16} {plan.summary()}")
        print(f"sweep {sid}: {len(tasks)} models, estimated total ${total:.2f}")
        if offers == 0:
            print("error: no model has an offer under its price cap", file=sys.stderr)
            return EXIT_NO_OFFER
        if a.dry_run:
            return 0 if offers == len(tasks) else EXIT_NO_OFFER
        if not a.yes and total > 0 and (not sys.stdin.isatty() or input("launch? [y/N] ") != "y"):
            print("error: not confirmed (pass -y)", file=sys.stderr)
            return EXIT_BAD_INPUT
        runner = SweepRunner(
            client,
            sweep,
            results_dir=a.results_dir,
            retry_failed=a.retry_failed,
            keep=a.keep_running,
            start_delay=a.delay,
            on_event=lambda t, s, d: print(f"[{t}] {s}: {d}", flush=True),
        )
        with interrupts_as_keyboard():
            result = runner.run()
    except (BadInput, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except BrokerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        print(
            f"interrupted ({e or 'Ctrl-C'}): every task stopped and its box terminated; "
            f"resume with --sweep-id {sid}",
            file=sys.stderr,
        )
        return exit_code(e)
    for r in result.rows:
        print(f"  {r.task:<24} {r.state:<10} exit={r.exit_code} ${r.cost:.4f} {r.error or ''}")
    print(
        f"sweep {sid}: {sum(r.state == 'succeeded' for r in result.rows)}/{len(result.rows)} "
        f"succeeded, cost ${result.total_cost:.4f}; "
        + ("LEAKED: " + "; ".join(result.leaked) if result.leaked else "nothing leaked")
    )
    return result.exit_code


if __name__ == "__main__":
    sys.exit(main())
