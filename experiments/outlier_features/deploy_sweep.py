"""Deploy the outlier analysis of several models in parallel, one ``deploy.py`` worker per model.

Examples:
    python deploy_sweep.py --dry-run                 # offers and cost estimate; rents nothing
    python deploy_sweep.py                           # all 7 MoE models (asks first)
    python deploy_sweep.py --models 01 03 06 --max-concurrent 2 -y
    python deploy_sweep.py --status                  # the latest sweep: instances, jobs, cost
    python deploy_sweep.py --provider local --models tiny-moe tiny-moe-planted -y

Every instance of a sweep carries the sweep id (``sweep=``) and the model id (``tag=``) in the
broker journal. Before launching: per model the chosen offer, $/h, estimated hours and $, and the
total, then a confirmation (``-y`` skips it). Each worker is a ``deploy.py`` subprocess in its own
session (so one Ctrl-C reaches each worker exactly once, forwarded by this process), which
terminates its instance in ``finally``. Failed models are retried (``--retries``). At the end:
the cost from the journal (actual $/h x time) and a check that no instance of the sweep is
still open (any found is reported and terminated).

Files: ``<results-dir>/sweeps/<sweep id>/`` holds ``sweep.json``, ``logs/deploy_<model>_<n>.log``
and ``state/<model>.json`` (what ``--status`` reads); results land in ``<results-dir>/<model>/``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file (python experiments/outlier_features/deploy_sweep.py)
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bifrost import BifrostError, Host
from broker import BrokerError, GPUClient
from experiments.common.io import atomic_write_json
from experiments.outlier_features.configs import DENSE, SWEEP, ModelSpec
from experiments.outlier_features.deploy import (
    DEFAULT_RESULTS,
    EXIT_BAD_INPUT,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_NO_OFFER,
    EXIT_OK,
    BadInput,
    DeployOptions,
    Plan,
    options_from_args,
    plan_deploy,
    preflight,
    resolve_model,
)
from experiments.outlier_features.deploy import build_parser as deploy_parser

DEPLOY = Path(__file__).resolve().parent / "deploy.py"
SWEEP_PREFIX = "outlier-"
#: deploy.py exit codes that another attempt cannot fix.
NO_RETRY = {EXIT_OK, EXIT_BAD_INPUT, EXIT_NO_OFFER, EXIT_INTERRUPTED}
DEFAULT_DELAY_S = 30.0


SWEEP_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,79}")


def check_sweep_id(sweep_id: str) -> str:
    """A sweep id names a folder and tags journal entries: letters, digits, ``._-`` only."""
    if not SWEEP_ID_RE.fullmatch(sweep_id) or ".." in sweep_id:
        raise ValueError(
            f"--sweep-id {sweep_id!r}: use 1-80 letters, digits, '.', '_' or '-', starting with "
            "a letter or digit (for example outlier-run2)"
        )
    return sweep_id


def new_sweep_id() -> str:
    """``outlier-<utc time>-<random>``: sortable, unique, safe as a folder name."""
    return f"{SWEEP_PREFIX}{datetime.now(UTC):%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"


def resolve_models(keys: list[str]) -> list[ModelSpec]:
    """Model keys (ids, names, ``all``, ``dense``) -> specs, order kept, duplicates dropped."""
    out: list[ModelSpec] = []
    for key in keys:
        group = {"all": SWEEP, "moe": SWEEP, "dense": DENSE}.get(key.lower())
        for spec in group or (resolve_model(key),):
            if spec not in out:
                out.append(spec)
    return out


# -- output --------------------------------------------------------------------------------------

_print_lock = threading.Lock()


def say(line: str = "") -> None:
    """Print from any worker thread without interleaving within a line."""
    with _print_lock:
        print(line, flush=True)


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join(fmt.format(*r).rstrip() for r in [header, *rows])


def _money(x: float | None) -> str:
    return "-" if x is None else f"${x:,.2f}"


def _gpu_text(plan: Plan) -> str:
    o = plan.offer
    if o is None:
        return plan.wanted
    return "CPU only" if o.gpu_count == 0 else f"{o.gpu_count}x {o.gpu_type}"


def _where(o: Any) -> str:
    return o.provider + (f" ({o.region})" if o.region and o.region != o.provider else "")


def plan_table(plans: list[Plan]) -> str:
    """Per model: offer, $/h, estimated hours and $; the total; a line per model without one."""
    rows = []
    for p in plans:
        o = p.offer
        rows.append(
            [
                p.spec.id,
                p.spec.name,
                _gpu_text(p),
                _where(o) if o else "NO OFFER",
                f"{o.price_per_hour:.2f}" if o else "-",
                f"{p.est_hours:.2f}",
                _money(p.est_cost),
            ]
        )
    total = sum(p.est_cost or 0.0 for p in plans)
    rows.append(
        [
            "",
            "total",
            "",
            "",
            "",
            f"{sum(p.est_hours for p in plans if p.offer):.2f}",
            _money(total),
        ]
    )
    text = _table(rows, ["id", "model", "gpus", "offer", "$/h", "est h", "est $"])
    notes = [f"  {p.spec.id}: {p.no_offer_message()}" for p in plans if p.offer is None]
    return text + ("\n" + "\n".join(notes) if notes else "")


# -- workers -------------------------------------------------------------------------------------


@dataclass
class SweepOptions:
    """The sweep's settings (the CLI flags)."""

    sweep_id: str
    providers: list[str] | None
    results_dir: Path
    max_concurrent: int
    delay_s: float
    retries: int
    keep_running: bool = False
    passthrough: list[str] = field(default_factory=list)

    @property
    def sweep_dir(self) -> Path:
        return self.results_dir / "sweeps" / self.sweep_id


@dataclass
class Outcome:
    """How one model ended (after its retries)."""

    model: str
    status: str = "pending"
    attempts: list[dict[str, Any]] = field(default_factory=list)

    @property
    def last(self) -> dict[str, Any]:
        return self.attempts[-1] if self.attempts else {}


class _Gate:
    """Spaces worker starts by ``delay`` seconds; gives up at once when the sweep is stopped."""

    def __init__(self, delay: float, stop: threading.Event) -> None:
        self.delay = delay
        self.stop = stop
        self._lock = threading.Lock()
        self._next = 0.0

    def turn(self) -> bool:
        with self._lock:
            left = self._next - time.monotonic()
            if left > 0 and self.stop.wait(left):
                return False
            if self.stop.is_set():
                return False
            self._next = time.monotonic() + self.delay
            return True


class Sweep:
    """Runs the workers, forwards Ctrl-C to them, and collects their outcomes."""

    def __init__(self, opts: SweepOptions, out: Callable[[str], None] = say) -> None:
        self.opts = opts
        self.out = out
        self.stop = threading.Event()
        self.gate = _Gate(opts.delay_s, self.stop)
        self._procs: dict[str, subprocess.Popen[str]] = {}
        self._lock = threading.Lock()

    def command(self, model: str, state_file: Path) -> list[str]:
        """The worker's command line: deploy.py for one model, tagged with the sweep."""
        cmd = [
            sys.executable,
            str(DEPLOY),
            "--model",
            model,
            "--sweep",
            self.opts.sweep_id,
            "--tag",
            model,
            "--state-file",
            str(state_file),
            "--results-dir",
            str(self.opts.results_dir),
        ]
        for p in self.opts.providers or []:
            cmd += ["--provider", p]
        if self.opts.keep_running:
            cmd.append("--keep-running")
        return cmd + self.opts.passthrough

    def run_model(self, spec: ModelSpec) -> Outcome:
        """One model, retried up to ``retries`` times on a failure another attempt may fix."""
        result = Outcome(spec.id)
        state_file = self.opts.sweep_dir / "state" / f"{spec.id}.json"
        for attempt in range(1, self.opts.retries + 2):
            if not self.gate.turn():
                result.status = "cancelled" if result.attempts else "not started"
                return result
            log = self.opts.sweep_dir / "logs" / f"deploy_{spec.id}_{attempt}.log"
            rc = self._run_child(spec.id, self.command(spec.id, state_file), log)
            try:
                state = json.loads(state_file.read_text())
            except (OSError, ValueError):
                status = "cancelled" if rc == EXIT_INTERRUPTED else "failed"
                state = {"status": status, "error": f"deploy.py exited {rc} before it started"}
            state.update(attempt=attempt, exit_code_deploy=rc, log=str(log))
            result.attempts.append(state)
            status = state.get("status") or "failed"
            result.status = "failed" if rc != 0 and status == "succeeded" else status
            if rc in NO_RETRY or self.stop.is_set():
                break
            if attempt <= self.opts.retries:
                self.out(
                    f"[{spec.id}] attempt {attempt} failed (exit {rc}): "
                    f"{_first_line(state.get('error'))}; retrying"
                )
        return result

    def _run_child(self, model: str, cmd: list[str], log: Path) -> int:
        log.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with log.open("w") as f:
            # Own session: a terminal's Ctrl-C reaches this process only, which forwards one
            # SIGINT per worker; two would cut short the worker's terminate.
            proc = subprocess.Popen(
                cmd,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                bufsize=1,
                env=env,
                start_new_session=True,
            )
            with self._lock:
                self._procs[model] = proc
            if self.stop.is_set():  # stopped between the gate and the start
                proc.send_signal(signal.SIGINT)
            assert proc.stdout is not None
            for line in proc.stdout:
                f.write(line)
                f.flush()
                self.out(f"[{model}] {line.rstrip()}")
            rc = proc.wait()
            with self._lock:
                self._procs.pop(model, None)
        return rc

    def interrupt(self) -> int:
        """Stop launching; ask every running worker to clean up. Returns how many run."""
        self.stop.set()
        with self._lock:
            procs = list(self._procs.values())
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGINT)
        return len(procs)

    @staticmethod
    def _collect(
        done: set[Future[Outcome]], futures: dict[Future[Outcome], str], into: dict[str, Outcome]
    ) -> None:
        for f in done:
            try:
                into[futures[f]] = f.result()
            except Exception as e:  # a bug in one worker thread must not hide the others
                into[futures[f]] = Outcome(futures[f], "failed", [{"error": f"{e!r}"}])

    def run(self, specs: list[ModelSpec]) -> dict[str, Outcome]:
        """All models, at most ``max_concurrent`` at a time; Ctrl-C stops them cleanly."""
        outcomes: dict[str, Outcome] = {}
        pool = ThreadPoolExecutor(max_workers=self.opts.max_concurrent, thread_name_prefix="sweep")
        futures: dict[Future[Outcome], str] = {pool.submit(self.run_model, s): s.id for s in specs}
        pending = set(futures)
        interrupts = 0
        while pending:
            try:
                done, pending = wait(pending, timeout=1.0, return_when=FIRST_COMPLETED)
                self._collect(done, futures, outcomes)
            except KeyboardInterrupt:
                interrupts += 1
                if interrupts == 1:
                    n = self.interrupt()
                    self.out(
                        f"interrupted: stopping; {n} worker(s) are terminating their "
                        "instances (Ctrl-C again to stop waiting)"
                    )
                    continue
                self.out("not waiting any more: the workers still finish their cleanup")
                break
        pool.shutdown(wait=interrupts < 2, cancel_futures=True)
        for s in specs:
            outcomes.setdefault(s.id, Outcome(s.id, "cancelled" if self.stop.is_set() else "?"))
        return outcomes


def _first_line(text: Any) -> str:
    return str(text or "").strip().splitlines()[0] if text else "no error recorded"


# -- after the sweep -----------------------------------------------------------------------------


def _hours(entry: Any) -> float:
    end = entry.ended_at or datetime.now(UTC)
    return max(0.0, (end - entry.created_at).total_seconds() / 3600)


def cost_summary(client: GPUClient, sweep_id: str) -> tuple[str, float]:
    """Per instance of the sweep (journal): $/h x time so far; and the total."""
    entries = client.journal.all_entries(sweep=sweep_id)
    if not entries:
        return "no instance was created", 0.0
    rows = []
    total = 0.0
    for e in entries:
        cost = e.cost_so_far()
        total += cost
        gpus = f"{e.gpu_count}x {e.gpu_type}" if e.gpu_count else (e.gpu_type or "-")
        rows.append(
            [
                e.tag or "-",
                e.name,
                e.provider,
                gpus,
                "-" if e.price_per_hour is None else f"{e.price_per_hour:.2f}",
                f"{_hours(e):.3f}",
                _money(cost),
                e.status,
            ]
        )
    rows.append(["", "total", "", "", "", "", _money(total), ""])
    return _table(
        rows, ["model", "instance", "provider", "gpus", "$/h", "hours", "$", "status"]
    ), total


def leak_check(
    client: GPUClient, sweep_id: str, *, keep_running: bool, out: Callable[[str], None]
) -> list[str]:
    """Open journal entries of the sweep; terminated here unless they were kept on purpose.
    Returns the names still open afterwards."""
    still: list[str] = []
    open_entries = [e for e in client.journal.all_entries(sweep=sweep_id) if e.is_open]
    if not open_entries:
        n = len(client.journal.all_entries(sweep=sweep_id))
        out(f"leak check: all {n} instance(s) of {sweep_id} are closed in the journal")
        return still
    if keep_running:
        out(
            f"kept running (--keep-running): {', '.join(e.name for e in open_entries)}; "
            "`broker instances terminate NAME` ends one"
        )
        return [e.name for e in open_entries]
    out(f"LEAK CHECK: {len(open_entries)} instance(s) of {sweep_id} still open; terminating")
    for e in open_entries:
        try:
            client.terminate(e.name)
            out(f"  terminated {e.name} ({e.provider} {e.instance_id}, status was {e.status})")
        except BrokerError as err:
            still.append(e.name)
            out(
                f"  could NOT terminate {e.name} ({e.provider} {e.instance_id}): {err}; "
                "run `broker instances reconcile`"
            )
    return still


# -- status --------------------------------------------------------------------------------------


def latest_sweep(client: GPUClient, results_dir: Path) -> str | None:
    """The most recently started sweep: from the journal and the sweep folders."""
    started: dict[str, str] = {}
    sweeps = results_dir / "sweeps"
    for e in client.journal.all_entries():
        sweep, t = e.sweep or "", e.created_at.isoformat()
        # A custom --sweep-id has no prefix, but it has its folder.
        if sweep.startswith(SWEEP_PREFIX) or (sweep and (sweeps / sweep).is_dir()):
            started[sweep] = min(started.get(sweep, t), t)
    for p in sweeps.iterdir() if sweeps.is_dir() else []:
        with contextlib.suppress(OSError, ValueError, AttributeError):
            started.setdefault(p.name, json.loads((p / "sweep.json").read_text())["created_at"])
    return max(started, key=lambda k: started[k]) if started else None


def _job_state(client: GPUClient, target: str, job_id: str) -> str:
    key = client.settings.ssh_key_path
    try:
        with Host(
            target, identity_file=key if target != "local" else None, connect_timeout=5.0, retries=0
        ) as h:
            st = h.job(job_id).status()
    except BifrostError as e:
        return f"unreachable ({type(e).__name__})"
    return st.state + (f" (exit {st.exit_code})" if st.exit_code not in (None, 0) else "")


def show_status(
    client: GPUClient, sweep_id: str, results_dir: Path, out: Callable[[str], None] = say
) -> int:
    """The sweep's instances (journal, refreshed from providers) and jobs (asked on the box)."""
    sweep_dir = results_dir / "sweeps" / sweep_id
    meta: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        meta = json.loads((sweep_dir / "sweep.json").read_text())
    states: dict[str, dict[str, Any]] = {}
    for p in sorted((sweep_dir / "state").glob("*.json")) if sweep_dir.is_dir() else []:
        with contextlib.suppress(OSError, ValueError):
            states[p.stem] = json.loads(p.read_text())
    entries = client.journal.all_entries(sweep=sweep_id)
    if not entries and not meta:
        out(f"no sweep {sweep_id!r} in the journal or under {results_dir / 'sweeps'}")
        return EXIT_BAD_INPUT
    for e in entries:
        if e.is_open and e.instance_id is not None:
            with contextlib.suppress(BrokerError):
                client.instance(e.name)  # re-reads the provider and records the status
    entries = client.journal.all_entries(sweep=sweep_id)
    head = f"sweep {sweep_id}"
    if meta:
        head += (
            f": started {meta.get('created_at')}, models {' '.join(meta.get('models', []))}"
            f", providers {', '.join(meta.get('providers') or ['default'])}"
        )
    out(head)
    rows = []
    seen: set[str] = set()
    for e in entries:
        st = states.get(e.tag or "", {})
        same = st.get("instance") == e.name
        job_id = st.get("job_id") if same else None
        target = st.get("target") or e.ssh_target
        if e.is_open and job_id and target:
            job = f"{job_id}: {_job_state(client, target, job_id)}"
        elif job_id:
            job = f"{job_id}: {st.get('job_state') or st.get('status')}"
        else:
            job = "-"
        seen.add(e.tag or "")
        gpus = f"{e.gpu_count}x {e.gpu_type}" if e.gpu_count else (e.gpu_type or "-")
        rows.append(
            [
                e.tag or "-",
                (st.get("status") if same else "") or "-",
                e.name,
                e.provider,
                gpus,
                e.status,
                f"{_hours(e):.2f}",
                _money(e.cost_so_far()),
                job,
            ]
        )
    for model, st in states.items():
        if model not in seen:  # never got an instance (no offer, bad input, create failed)
            rows.append(
                [
                    model,
                    st.get("status", "?"),
                    "-",
                    "-",
                    "-",
                    "-",
                    "-",
                    "-",
                    _first_line(st.get("error")) if st.get("error") else "-",
                ]
            )
    out(
        _table(
            rows,
            [
                "model",
                "deploy",
                "instance",
                "provider",
                "gpus",
                "instance status",
                "hours",
                "cost",
                "job",
            ],
        )
    )
    total = sum(e.cost_so_far() for e in entries)
    n_open = sum(1 for e in entries if e.is_open)
    out(f"{len(entries)} instance(s), {n_open} open; cost so far {_money(total)}")
    return EXIT_OK


# -- CLI -----------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The CLI of ``deploy_sweep.py``."""
    p = argparse.ArgumentParser(
        prog="deploy_sweep.py",
        description="Run the outlier analysis of several models in parallel, one rented box "
        "each (deploy.py per model), with a cost estimate first, retries, a cost summary and a "
        "check that no instance is left running.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 2)[1] if __doc__ else None,
    )
    p.add_argument(
        "--models",
        nargs="+",
        default=[s.id for s in SWEEP],
        metavar="ID",
        help="config ids/names (01 03 06, tiny-moe, d1 ...) or `all` / `dense`",
    )
    p.add_argument(
        "--dry-run", action="store_true", help="show offers and the cost estimate, rent nothing"
    )
    p.add_argument(
        "--status",
        action="store_true",
        help="show a sweep's instances, jobs and cost (the latest unless --sweep-id)",
    )
    p.add_argument("-y", "--yes", action="store_true", help="launch without asking")
    p.add_argument(
        "--delay",
        type=float,
        default=None,
        help=f"seconds between worker starts (default {DEFAULT_DELAY_S:g}; 0 on local)",
    )
    p.add_argument(
        "--max-concurrent",
        type=int,
        default=None,
        help="instances at a time (default: all models at once)",
    )
    p.add_argument(
        "--retries",
        type=int,
        default=1,
        help="extra attempts for a model whose deploy failed (default: 1)",
    )
    p.add_argument(
        "--provider",
        action="append",
        dest="providers",
        metavar="NAME",
        help="cloud(s) to rent from (repeatable); `local` = this machine",
    )
    p.add_argument("--sweep-id", help="name the sweep (default: outlier-<utc time>-<random>)")
    p.add_argument(
        "--results-dir",
        type=Path,
        default=DEFAULT_RESULTS,
        help="results go to <results-dir>/<model>/, logs to <results-dir>/sweeps/ "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--keep-running", action="store_true", help="leave every instance up at the end (detached)"
    )
    p.add_argument("--ttl", help="instance TTL for every model (default: per model)")
    p.add_argument("--num-sequences", type=int, help="passed to run.py")
    p.add_argument("--seq-len", type=int, help="passed to run.py")
    p.add_argument("--corpus", help="passed to run.py")
    return p


def _passthrough(args: argparse.Namespace) -> list[str]:
    out: list[str] = []
    for flag, value in (
        ("--ttl", args.ttl),
        ("--num-sequences", args.num_sequences),
        ("--seq-len", args.seq_len),
        ("--corpus", args.corpus),
    ):
        if value is not None:
            out += [flag, str(value)]
    return out


def _plans(client: GPUClient, specs: list[ModelSpec], args: argparse.Namespace) -> list[Plan]:
    for name in client.provider_names():  # build adapters once, before threads share them
        client.get_provider(name)

    def options(spec: ModelSpec) -> DeployOptions:
        # Exactly the flags each worker's deploy.py will get, checked by deploy.py's own
        # rules before anything is rented: a bad value fails the sweep now, not per box.
        argv = ["--model", spec.id, *_passthrough(args)]
        for prov in args.providers or []:
            argv += ["--provider", prov]
        opts = options_from_args(deploy_parser().parse_args(argv))
        preflight(spec, opts)
        return opts

    checked = [options(spec) for spec in specs]
    with ThreadPoolExecutor(max_workers=min(8, len(specs))) as pool:
        return list(pool.map(lambda so: plan_deploy(client, *so), zip(specs, checked, strict=True)))


def _confirm(n: int, total: float) -> bool:
    if not sys.stdin.isatty():
        say("error: not a terminal, cannot ask for confirmation: rerun with -y to launch")
        return False
    try:
        answer = input(f"launch {n} instance(s), estimated {_money(total)}? [y/N] ")
    except EOFError:
        return False
    return answer.strip().lower() in ("y", "yes")


def main(argv: list[str] | None = None) -> int:
    """Entry point: 0 all succeeded; 1 a model failed or an instance stayed open; 2 bad input;
    3 no model had an offer; 130 interrupted."""
    args = build_parser().parse_args(argv)
    old_term = None
    if threading.current_thread() is threading.main_thread():
        # A TERM (CI timeout, `kill`) stops the workers cleanly, exactly like Ctrl-C.
        old_term = signal.signal(signal.SIGTERM, _term_as_interrupt)
    try:
        return _main(args)
    except KeyboardInterrupt:  # before any worker started: nothing to clean up
        say("interrupted")
        return EXIT_INTERRUPTED
    finally:
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)


def _term_as_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _main(args: argparse.Namespace) -> int:
    if args.sweep_id is not None:
        try:
            check_sweep_id(args.sweep_id)
        except ValueError as e:
            say(f"error: {e}")
            return EXIT_BAD_INPUT
    if args.max_concurrent is not None and args.max_concurrent < 1:
        say("error: --max-concurrent must be >= 1")
        return EXIT_BAD_INPUT
    if args.retries < 0 or (args.delay is not None and args.delay < 0):
        say("error: --retries and --delay must be >= 0")
        return EXIT_BAD_INPUT
    try:
        client = GPUClient(providers=args.providers)
        providers = client.provider_names()
    except BrokerError as e:
        say(f"error: {e}")
        return EXIT_BAD_INPUT
    with client:
        if args.status:
            sweep_id = args.sweep_id or latest_sweep(client, args.results_dir)
            if sweep_id is None:
                say(f"no sweep found (journal or {args.results_dir / 'sweeps'})")
                return EXIT_BAD_INPUT
            return show_status(client, sweep_id, args.results_dir)
        try:
            specs = resolve_models(args.models)
            plans = _plans(client, specs, args)
        except BadInput as e:
            say(f"error: {e}")
            return EXIT_BAD_INPUT
        sweep_id = args.sweep_id or new_sweep_id()
        delay = (
            args.delay
            if args.delay is not None
            else (0.0 if providers == ["local"] else DEFAULT_DELAY_S)
        )
        conc = args.max_concurrent or len(specs)
        say(
            f"sweep {sweep_id}: {len(specs)} model(s) on {', '.join(providers)}; at most {conc}"
            f" at a time, {delay:g}s between starts, {args.retries} retr"
            f"{'y' if args.retries == 1 else 'ies'} per model"
        )
        say(plan_table(plans))
        launch = [p for p in plans if p.offer is not None]
        if args.dry_run:
            say("dry run: nothing rented")
            return EXIT_OK
        if not launch:
            say("error: no model has an offer under its price cap; nothing to launch")
            return EXIT_NO_OFFER
        total_est = sum(p.est_cost or 0.0 for p in launch)
        if not args.yes and not _confirm(len(launch), total_est):
            say("aborted: nothing rented")
            return EXIT_BAD_INPUT
        opts = SweepOptions(
            sweep_id=sweep_id,
            providers=args.providers,
            results_dir=args.results_dir,
            max_concurrent=conc,
            delay_s=delay,
            retries=args.retries,
            keep_running=args.keep_running,
            passthrough=_passthrough(args),
        )
        record: dict[str, Any] = {
            "id": sweep_id,
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "models": [s.id for s in specs],
            "providers": providers,
            "options": {
                "max_concurrent": conc,
                "delay_s": delay,
                "retries": args.retries,
                "keep_running": args.keep_running,
                "passthrough": opts.passthrough,
            },
            "plans": [p.to_dict() for p in plans],
        }
        atomic_write_json(opts.sweep_dir / "sweep.json", record)
        sweep = Sweep(opts)
        outcomes: dict[str, Outcome] = {}
        try:
            outcomes = sweep.run([p.spec for p in launch])
        finally:
            say("")
            for p in plans:
                if p.offer is None:
                    outcomes[p.spec.id] = Outcome(p.spec.id, "no_offer")
            rows = [
                [
                    m,
                    o.status,
                    str(len(o.attempts)),
                    o.last.get("instance") or "-",
                    o.last.get("results_dir") or _first_line(o.last.get("error"))
                    if o.attempts
                    else "-",
                ]
                for m, o in outcomes.items()
            ]
            say(_table(rows, ["model", "status", "attempts", "instance", "results / error"]))
            summary, total = cost_summary(client, sweep_id)
            say(f"\ncost (journal, actual $/h x time; estimate was {_money(total_est)}):")
            say(summary)
            left = leak_check(client, sweep_id, keep_running=args.keep_running, out=say)
            record.update(
                ended_at=datetime.now(UTC).isoformat(timespec="seconds"),
                outcomes={
                    m: {"status": o.status, "attempts": o.attempts} for m, o in outcomes.items()
                },
                cost_total=round(total, 4),
                left_open=left,
            )
            atomic_write_json(opts.sweep_dir / "sweep.json", record)
            say(
                f"sweep record: {opts.sweep_dir / 'sweep.json'}; "
                f"`deploy_sweep.py --status --sweep-id {sweep_id}`"
            )
        if sweep.stop.is_set():
            return EXIT_INTERRUPTED
        ok = all(o.status == "succeeded" for o in outcomes.values())
        leaked = bool(left) and not args.keep_running
        return EXIT_OK if ok and not leaked else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
