"""A sweep harness: run a matrix of experiment configs, one subprocess (and process group) each.

Shape of one run::

    matrix = expand_matrix({"model": ["ast", "htsat"], "lr": [1e-3, 1e-4]},
                           filters={"model": ["ast"]})
    specs = [ExperimentSpec(key=..., config=cfg, command=[...]) for cfg in matrix]
    summary = run_sweep(specs, SweepOptions(output_dir=Path("results/sweep"), timeout_s=7200))

Contract with the child command: the harness sets ``SWEEP_METRICS_FILE`` (and substitutes
``{metrics_file}`` in the command) to a path where the child writes
``{"metrics": {...}, "efficiency": {...}}`` as JSON. Exit status 0 plus a readable metrics file is
``completed``; anything else is ``failed`` (or ``timeout`` when the hard limit killed the group).

Every experiment gets ``<output_dir>/logs/<experiment_id>.log`` (stdout and stderr); a failure also
gets ``<output_dir>/errors/<experiment_id>_error.log``; the result JSON goes to
``<output_dir>/runs/<key>.json``, written atomically, in the format of the PEFT sweep seed
(experiment_id, config, metrics, efficiency, status, error, timestamp, git_commit).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

from experiments.common.io import atomic_write_json, atomic_write_text

RESULT_KEYS = (
    "experiment_id",
    "config",
    "metrics",
    "efficiency",
    "status",
    "error",
    "timestamp",
    "git_commit",
)
STATUSES = ("completed", "failed", "timeout")
METRICS_ENV = "SWEEP_METRICS_FILE"
# Seconds between SIGTERM and SIGKILL when a group is stopped: enough for a trainer to flush logs.
KILL_GRACE_S = 5.0


class SweepError(Exception):
    """A problem with the sweep's inputs (bad matrix, clashing results); shown without traceback."""


# --------------------------------------------------------------------------- matrix


def expand_matrix(
    axes: Mapping[str, Sequence[Any]],
    filters: Mapping[str, Iterable[Any]] | None = None,
    where: Callable[[dict[str, Any]], bool] | None = None,
) -> list[dict[str, Any]]:
    """Cartesian product of ``axes`` (in the given axis order), keeping only allowed values.

    ``filters`` maps an axis to the values to keep; a value not on the axis is an error so that a
    typo (``--models asst``) fails loudly instead of silently running nothing. ``where`` is an
    optional predicate over a whole config for combinations that make no sense.
    """
    filters = dict(filters or {})
    unknown_axes = set(filters) - set(axes)
    if unknown_axes:
        raise SweepError(f"filter on unknown axis {sorted(unknown_axes)}; axes are {list(axes)}")
    kept: dict[str, list[Any]] = {}
    for name, values in axes.items():
        values = list(values)
        if not values:
            raise SweepError(f"axis {name!r} has no values")
        if name in filters:
            wanted = list(filters[name])
            bad = [v for v in wanted if v not in values]
            if bad:
                raise SweepError(f"{name}: unknown value(s) {bad}; choose from {values}")
            values = [v for v in values if v in wanted]
        kept[name] = values
    names = list(kept)
    configs = [dict(zip(names, combo, strict=True)) for combo in itertools.product(*kept.values())]
    if where is not None:
        configs = [c for c in configs if where(c)]
    return configs


def parse_bool(text: str) -> bool:
    """Parse ``true/false/yes/no/1/0/on/off`` (for CLI flags such as ``--augmentation true``)."""
    t = text.strip().lower()
    if t in {"true", "yes", "1", "on", "aug"}:
        return True
    if t in {"false", "no", "0", "off", "noaug"}:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


# --------------------------------------------------------------------------- specs and results


@dataclass(frozen=True)
class ExperimentSpec:
    """One experiment: a stable ``key`` (names the result file), its config and its command."""

    key: str
    config: dict[str, Any]
    command: list[str]
    env: dict[str, str] = field(default_factory=dict)
    cwd: Path | None = None


@dataclass
class SweepOptions:
    """How to run a sweep (what the CLI flags of a sweep script map onto)."""

    output_dir: Path
    timeout_s: float = 7200.0
    resume: bool = False
    force: bool = False
    workers: int = 1
    dry_run: bool = False
    stream: TextIO | None = None  # progress lines; None means sys.stdout


@dataclass
class SweepSummary:
    """Counts after a sweep; ``results`` holds the result dicts written in this call."""

    total: int
    completed: int = 0
    failed: int = 0
    skipped: int = 0
    results: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when nothing failed or timed out."""
        return self.failed == 0


def result_path(output_dir: Path, key: str) -> Path:
    """Where the result JSON of experiment ``key`` lives."""
    return Path(output_dir) / "runs" / f"{key}.json"


def git_commit(cwd: Path | None = None) -> str | None:
    """Short commit hash of the project (``cwd``: another repository), so a result names the code
    it ran; taken from the project's own checkout whatever the process's working directory."""
    from experiments.common.provenance import REPO_ROOT
    from experiments.common.provenance import git_commit as _commit

    return _commit(Path(cwd) if cwd is not None else REPO_ROOT)


def load_result(path: Path) -> dict[str, Any] | None:
    """Read one result JSON; None if it is missing, unreadable or lacks the required keys."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or any(k not in data for k in RESULT_KEYS):
        return None
    return data


def load_results(output_dir: Path) -> tuple[list[dict[str, Any]], list[Path]]:
    """All readable result JSONs under ``output_dir/runs`` and the paths that could not be read.

    Partial sweeps are normal: the analyzers work with whatever is there.
    """
    runs = Path(output_dir) / "runs"
    good: list[dict[str, Any]] = []
    bad: list[Path] = []
    if not runs.is_dir():
        return good, bad
    for p in sorted(runs.glob("*.json")):
        r = load_result(p)
        if r is None:
            bad.append(p)
        else:
            good.append(r)
    return good, bad


def make_experiment_id(key: str, when: datetime | None = None) -> str:
    """``<key>_<YYYYmmdd_HHMMSS>`` as in the seed (``ast_lora_aug_tiny_20260201_103000``)."""
    return f"{key}_{(when or datetime.now()).strftime('%Y%m%d_%H%M%S')}"


# --------------------------------------------------------------------------- running one experiment


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the child's whole process group, then SIGKILL what is left after a grace period.

    The child was started with ``start_new_session=True`` so its pgid is its pid; killing the group
    also takes down data-loader workers and shells the trainer spawned.
    """
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=KILL_GRACE_S)
    # Even if the leader exited, grandchildren may still hold the group: SIGKILL it regardless.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=KILL_GRACE_S)


class _Runner:
    """Runs specs, tracks live process groups so an interrupt can kill them all."""

    def __init__(self, opts: SweepOptions, commit: str | None) -> None:
        self.opts = opts
        self.commit = commit
        self.live: dict[int, subprocess.Popen[bytes]] = {}
        self.lock = threading.Lock()
        self.stopping = threading.Event()

    def run_one(self, spec: ExperimentSpec) -> dict[str, Any]:
        out = Path(self.opts.output_dir)
        started = datetime.now()
        exp_id = make_experiment_id(spec.key, started)
        log_path = out / "logs" / f"{exp_id}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        metrics_file = out / "tmp" / f"{exp_id}.metrics.json"
        metrics_file.parent.mkdir(parents=True, exist_ok=True)
        metrics_file.unlink(missing_ok=True)
        cmd = [c.replace("{metrics_file}", str(metrics_file)) for c in spec.command]
        env = {**os.environ, **spec.env, METRICS_ENV: str(metrics_file)}
        status, error, rc = "failed", None, None
        payload: dict[str, Any] = {}
        t0 = time.monotonic()
        with open(log_path, "wb") as log:
            header = f"# command: {json.dumps(cmd)}\n# config: {json.dumps(spec.config)}\n"
            log.write(header.encode())
            log.flush()
            try:
                proc = subprocess.Popen(
                    cmd,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    env=env,
                    cwd=spec.cwd,
                    start_new_session=True,
                )
            except OSError as e:
                proc = None
                error = f"could not start command: {e}"
            if proc is not None:
                with self.lock:
                    self.live[proc.pid] = proc
                try:
                    rc = proc.wait(timeout=self.opts.timeout_s)
                except subprocess.TimeoutExpired:
                    _kill_group(proc)
                    status = "timeout"
                    error = f"timed out after {self.opts.timeout_s:g} s; process group killed"
                finally:
                    with self.lock:
                        self.live.pop(proc.pid, None)
                if self.stopping.is_set() and status != "timeout":
                    status, error = "failed", "sweep interrupted"
                elif status != "timeout":
                    if rc != 0:
                        error = f"exit status {rc}" + _tail_hint(log_path)
                    else:
                        payload, perr = _read_payload(metrics_file)
                        if perr:
                            error = perr
                        else:
                            status = "completed"
        wall = time.monotonic() - t0
        metrics_file.unlink(missing_ok=True)
        result: dict[str, Any] = {
            "experiment_id": exp_id,
            "config": spec.config,
            "metrics": payload.get("metrics", {}) if status == "completed" else {},
            "efficiency": payload.get("efficiency", {}) if status == "completed" else {},
            "status": status,
            "error": error,
            "timestamp": started.isoformat(timespec="seconds"),
            "git_commit": self.commit,
            "wall_time_seconds": round(wall, 3),
            "log_file": str(log_path),
        }
        if status != "completed":
            self._write_error_log(exp_id, cmd, result, log_path)
        if not self.stopping.is_set() or status == "completed":
            # An interrupted run leaves no result so that --resume reruns it.
            atomic_write_json(result_path(out, spec.key), result)
        return result

    def _write_error_log(
        self, exp_id: str, cmd: list[str], result: dict[str, Any], log_path: Path
    ) -> None:
        try:
            body = log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            body = "(log unreadable)\n"
        head = (
            f"experiment: {exp_id}\nstatus: {result['status']}\nerror: {result['error']}\n"
            f"command: {json.dumps(cmd)}\nconfig: {json.dumps(result['config'])}\n"
            f"full log: {log_path}\n{'-' * 72}\n"
        )
        atomic_write_text(
            Path(self.opts.output_dir) / "errors" / f"{exp_id}_error.log", head + body
        )

    def kill_all(self) -> None:
        self.stopping.set()
        with self.lock:
            procs = list(self.live.values())
        for p in procs:
            _kill_group(p)


def _tail_hint(log_path: Path, n: int = 3) -> str:
    """Last non-empty lines of a log, appended to the error message (a traceback's last line)."""
    try:
        lines = [ln for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    tail = [ln for ln in lines[-n:] if not ln.startswith("# ")]
    return (": " + " | ".join(tail))[:500] if tail else ""


def _read_payload(path: Path) -> tuple[dict[str, Any], str | None]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}, f"command exited 0 but wrote no metrics file (${METRICS_ENV})"
    except (OSError, ValueError) as e:
        return {}, f"unreadable metrics file: {e}"
    if not isinstance(data, dict) or not isinstance(data.get("metrics"), dict):
        return {}, "metrics file must be a JSON object with a 'metrics' object"
    if not isinstance(data.get("efficiency", {}), dict):
        return {}, "'efficiency' in the metrics file must be an object"
    return data, None


def write_metrics(metrics: Mapping[str, Any], efficiency: Mapping[str, Any]) -> Path | None:
    """For child commands: write the payload to ``$SWEEP_METRICS_FILE`` (no-op outside a sweep)."""
    target = os.environ.get(METRICS_ENV)
    if not target:
        return None
    return atomic_write_json(target, {"metrics": dict(metrics), "efficiency": dict(efficiency)})


# --------------------------------------------------------------------------- the sweep


def _fmt_duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} minutes"
    return f"{seconds / 3600:.2f} hours"


def plan_sweep(
    specs: Sequence[ExperimentSpec], opts: SweepOptions
) -> tuple[list[ExperimentSpec], list[ExperimentSpec]]:
    """Split specs into (to run, to skip) according to ``--resume``/``--force``.

    - ``--force``: run everything, replacing old results.
    - ``--resume``: skip specs whose result is ``completed``; rerun failed/timed-out ones.
    - neither: refuse if any result exists, so an old sweep is never silently overwritten.
    """
    if opts.resume and opts.force:
        raise SweepError("--resume and --force contradict each other; pass one")
    keys = [s.key for s in specs]
    dup = sorted({k for k in keys if keys.count(k) > 1})
    if dup:
        raise SweepError(f"duplicate experiment keys: {dup}")
    if opts.force:
        return list(specs), []
    existing = {s.key: load_result(result_path(opts.output_dir, s.key)) for s in specs}
    if not opts.resume:
        present = [
            k for k in keys if existing[k] is not None or result_path(opts.output_dir, k).exists()
        ]
        if present:
            shown = ", ".join(present[:5]) + (" ..." if len(present) > 5 else "")
            raise SweepError(
                f"{len(present)} result(s) already exist in {opts.output_dir}/runs ({shown}); "
                "pass --resume to skip completed ones or --force to rerun everything"
            )
        return list(specs), []
    run, skip = [], []
    for s in specs:
        r = existing[s.key]
        (skip if r is not None and r.get("status") == "completed" else run).append(s)
    return run, skip


def run_sweep(specs: Sequence[ExperimentSpec], opts: SweepOptions) -> SweepSummary:
    """Run ``specs`` (skipping per ``--resume``), printing progress, counts and an ETA.

    Workers > 1 run that many experiments at once, each still in its own process group. Ctrl-C
    kills every live group, writes no result for the interrupted ones, and re-raises.
    """
    stream = opts.stream or sys.stdout
    if opts.workers < 1:
        raise SweepError("--workers must be at least 1")
    if opts.timeout_s <= 0:
        raise SweepError("--timeout must be positive")
    to_run, to_skip = plan_sweep(specs, opts)
    summary = SweepSummary(total=len(specs), skipped=len(to_skip))
    say_lock = threading.Lock()

    def say(msg: str) -> None:
        with say_lock:
            print(msg, file=stream, flush=True)

    for s in to_skip:
        say(f"Skipping {s.key} (completed result exists)")
    if opts.dry_run:
        for s in to_run:
            say(f"Would run {s.key}: {' '.join(s.command)}")
        return summary
    if not to_run:
        say(f"Nothing to run: {summary.skipped}/{summary.total} already completed")
        return summary
    Path(opts.output_dir).mkdir(parents=True, exist_ok=True)
    runner = _Runner(opts, git_commit())
    t_start = time.monotonic()
    durations: list[float] = []
    started = 0

    def report(result: dict[str, Any]) -> None:
        durations.append(float(result["wall_time_seconds"]))
        if result["status"] == "completed":
            summary.completed += 1
        else:
            summary.failed += 1
        summary.results.append(result)
        done = summary.completed + summary.failed + summary.skipped
        remaining = summary.total - done
        # ETA: mean duration of runs finished in this call, spread over the workers.
        eta = sum(durations) / len(durations) * remaining / min(opts.workers, max(remaining, 1))
        tag = "" if result["status"] == "completed" else f" [{result['status']}: {result['error']}]"
        say(
            f"Finished {result['experiment_id']} in {_fmt_duration(durations[-1])}{tag}\n"
            f"Progress: {done}/{summary.total} ({100.0 * done / summary.total:.1f}%)\n"
            f"Completed: {summary.completed}, Failed: {summary.failed}, "
            f"Skipped: {summary.skipped}\n"
            f"Estimated time remaining: {_fmt_duration(eta) if remaining else '0 s'}"
        )

    def announce(spec: ExperimentSpec) -> None:
        nonlocal started
        started += 1
        say(f"Experiment {summary.skipped + started}/{summary.total}: {spec.key}")

    try:
        if opts.workers == 1:
            for spec in to_run:
                announce(spec)
                report(runner.run_one(spec))
        else:
            with ThreadPoolExecutor(max_workers=opts.workers) as pool:
                pending: set[Future[dict[str, Any]]] = set()
                queue = list(to_run)
                while queue or pending:
                    while queue and len(pending) < opts.workers:
                        spec = queue.pop(0)
                        announce(spec)
                        pending.add(pool.submit(runner.run_one, spec))
                    done_set, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for fut in done_set:
                        report(fut.result())
    except KeyboardInterrupt:
        runner.kill_all()
        say("Interrupted: killed running experiments; rerun with --resume to continue")
        raise
    say(
        f"Sweep finished in {_fmt_duration(time.monotonic() - t_start)}: "
        f"{summary.completed} completed, {summary.failed} failed, {summary.skipped} skipped"
    )
    return summary


def add_sweep_arguments(parser: argparse.ArgumentParser, default_output: str) -> None:
    """The harness flags every sweep script shares."""
    g = parser.add_argument_group("sweep harness")
    g.add_argument(
        "--output-dir",
        type=Path,
        default=Path(default_output),
        help=f"where runs/, logs/ and errors/ go (default: {default_output})",
    )
    g.add_argument(
        "--resume",
        action="store_true",
        help="skip experiments that already have a completed result",
    )
    g.add_argument("--force", action="store_true", help="rerun everything, replacing old results")
    g.add_argument(
        "--timeout",
        type=float,
        default=7200.0,
        help="hard per-experiment limit in seconds; the process group is killed (default: 7200)",
    )
    g.add_argument(
        "--workers",
        type=int,
        default=1,
        help="experiments to run at once, each in its own process group (default: 1)",
    )
    g.add_argument("--dry-run", action="store_true", help="print what would run and exit")


def options_from_args(args: argparse.Namespace) -> SweepOptions:
    """SweepOptions from the flags added by :func:`add_sweep_arguments`."""
    return SweepOptions(
        output_dir=args.output_dir,
        timeout_s=args.timeout,
        resume=args.resume,
        force=args.force,
        workers=args.workers,
        dry_run=args.dry_run,
    )
