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

from broker import ConfigError
from broker.launch.script import print_sweep_status, run_sweep
from broker.launch.sweep import Sweep
from experiments.outlier_features.configs import SWEEP
from experiments.outlier_features.deploy import (
    EXIT_BAD_INPUT,
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
    if a.status:
        return print_sweep_status(a.sweep_id)
    try:
        if a.parallel < 1 or a.delay < 0:
            raise BadInput("--max-concurrent must be >= 1 and --delay >= 0")
        tasks = [build_task(resolve_model(m), a) for m in dict.fromkeys(a.models)]
        sid = a.sweep_id or f"outlier-{datetime.now(UTC):%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"
        sweep = Sweep.of_tasks(sid, tasks, max_parallel=a.parallel)
    except (BadInput, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return run_sweep(
        sweep,
        providers=a.providers,
        yes=a.yes,
        dry_run=a.dry_run,
        results_dir=a.results_dir,
        retry_failed=a.retry_failed,
        keep=a.keep_running,
        delay=a.delay,
    )[0]


if __name__ == "__main__":
    sys.exit(main())
