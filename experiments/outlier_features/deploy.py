"""Deploy the outlier analysis of one model: rent a box (broker), run it there (bifrost), pull.

Examples:
    uv run --extra experiments python experiments/outlier_features/deploy.py \\
        --provider local --model tiny-moe                     # this machine, $0, < 1 minute
    uv run --extra experiments python experiments/outlier_features/deploy.py --model 03
    uv run --extra experiments python experiments/outlier_features/deploy.py --model 06 \\
        --gpu-filter H100 --max-price 12 --ttl 3h --keep-running

Steps: search offers with the config's GPU filter, GPU count (from the VRAM plan) and price cap
-> create with a TTL (returns once SSH works and nvidia-smi shows the GPUs paid for) -> push
this project (plus ``uv sync --extra experiments`` on a rented box; on ``local`` the current
environment is used) -> ``run.py`` as a detached bifrost job -> follow its log -> pull the
results into ``<results-dir>/<model>/`` (to a temp dir, then renamed) -> terminate, in a
``finally`` that Ctrl-C also reaches, unless ``--keep-running``.

Only the public APIs of ``broker`` and ``bifrost`` are used.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import re
import shlex
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

if __package__ in (None, ""):  # run as a file (python experiments/outlier_features/deploy.py)
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bifrost import BifrostError, Host, Job, JobStatus
from broker import BrokerError, ConfigError, F, GPUClient, GPUOffer, QueryError, parse_ttl
from experiments.common.io import atomic_write_json
from experiments.outlier_features import run as run_script
from experiments.outlier_features.configs import (
    ALL_SPECS,
    ModelSpec,
    disk_gb_needed,
    get_spec,
    plan_gpus,
    spec_for_unknown,
    with_overrides,
)
from experiments.outlier_features.configs import ConfigError as SpecError

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_RESULTS = Path(__file__).resolve().parent / "results"
EXTRAS = ("experiments",)
#: Workspace (and venv) name on a rented box.
WORKSPACE = "outlier-features"

#: Minutes of analysis per model: the seed's runtimes (upper end of each range); dense
#: baselines scaled by size. Used for the cost estimate and the default TTL only.
RUN_MINUTES: dict[str, float] = {
    "01": 20,
    "02": 30,
    "03": 35,
    "04": 40,
    "05": 50,
    "06": 60,
    "07": 70,
    "d1": 10,
    "d2": 10,
    "d3": 15,
    "d4": 20,
    "d5": 25,
}
#: Provisioning, ``uv sync`` (torch + CUDA wheels) and the checkpoint download on a fresh box.
SETUP_MINUTES = 15.0
TINY_MINUTES = 2.0
#: Instance price cap for the in-code tiny models, which need no particular GPU.
TINY_MAX_PRICE = 1.0

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_NO_OFFER, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


class DeployError(Exception):
    """A deploy that cannot go on; the message is meant for a human (no traceback)."""

    exit_code = EXIT_FAILED
    status = "failed"


class BadInput(DeployError):
    """The request itself is wrong (unknown model, bad flag value, unknown provider)."""

    exit_code = EXIT_BAD_INPUT
    status = "bad_input"


class NoOffer(DeployError):
    """Nothing to rent under the price cap."""

    exit_code = EXIT_NO_OFFER
    status = "no_offer"


@dataclass
class DeployOptions:
    """Everything one deploy needs (the CLI flags of this script)."""

    model: str
    providers: list[str] | None = None
    gpu_filter: str | None = None
    gpu_count: int | None = None
    min_vram_gb: float | None = None
    max_price: float | None = None
    ttl: str | None = None
    disk_gb: int | None = None
    ready_timeout: float | None = None
    results_dir: Path = DEFAULT_RESULTS
    keep_running: bool = False
    sweep: str | None = None
    tag: str | None = None
    num_sequences: int | None = None
    seq_len: int | None = None
    corpus: str | None = None
    device: str = "auto"
    state_file: Path | None = None
    min_cpu_ram_gb: float | None = None


# -- model and offers ----------------------------------------------------------------------------


def known_models() -> str:
    """``01 OLMoE-1B-7B, 02 GPT-OSS-20B, ...`` for error messages and --help."""
    return ", ".join(s.id if s.id == s.name else f"{s.id} ({s.name})" for s in ALL_SPECS)


def resolve_model(key: str) -> ModelSpec:
    """A config by number (``3`` or ``03``), name or HF id, or any other Hugging Face id
    (``owner/name``; its size is unknown, so ``--min-vram`` must say what to rent)."""
    if not key.strip():
        raise BadInput(f"--model is empty; choose one of: {known_models()}, or a Hugging Face id")
    spec = get_spec(key)
    if spec is not None:
        return spec
    if re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", key.strip()):
        return spec_for_unknown(key.strip())
    raise BadInput(
        f"unknown model {key!r}; choose one of: {known_models()}, or a Hugging Face id (owner/name)"
    )


def slug(spec: ModelSpec) -> str:
    """The results folder name of a model, as ``run.py`` names it."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in spec.name).lower()


def estimated_minutes(spec: ModelSpec) -> float:
    """Wall minutes one deploy should take, setup included (drives the estimate and TTL)."""
    if spec.is_tiny:
        return TINY_MINUTES
    return RUN_MINUTES.get(spec.id, 30.0) + SETUP_MINUTES


def default_ttl(spec: ModelSpec) -> str:
    """Twice the estimate, at least an hour: a hung job is reaped, a slow one is not."""
    return f"{max(60, math.ceil(2 * estimated_minutes(spec)))}m"


@dataclass
class Plan:
    """What a deploy would rent: the search, the offers under the cap, and the estimate."""

    spec: ModelSpec
    query: str
    providers: list[str]
    gpu_count: int | None
    max_price: float
    offers: list[GPUOffer]
    est_hours: float
    ttl: str
    disk_gb: int
    cheapest_over_cap: GPUOffer | None = None
    provider_errors: list[str] = field(default_factory=list)
    #: What was asked for, e.g. ``2x A100 >=80GB`` (``any`` for the tiny models).
    wanted: str = "any"

    @property
    def offer(self) -> GPUOffer | None:
        """The offer a create would try first."""
        return self.offers[0] if self.offers else None

    @property
    def est_cost(self) -> float | None:
        """US$ for the estimated hours at the chosen offer's price."""
        return self.offer.price_per_hour * self.est_hours if self.offer else None

    def no_offer_message(self) -> str:
        """What was searched, and the cheapest match over the cap (or why nothing matched)."""
        where = ", ".join(self.providers)
        head = f"no offer for {self.spec.id} ({self.spec.name}): searched `{self.query}` on {where}"
        o = self.cheapest_over_cap
        if o is not None:
            return (
                f"{head}; the cheapest match is {o.provider} {o.gpu_count}x {o.gpu_type} at "
                f"${o.price_per_hour:.2f}/h, over the cap ${self.max_price:.2f}/h "
                f"(raise --max-price to {math.ceil(o.price_per_hour * 100) / 100:.2f} to take it)"
            )
        if self.provider_errors:
            return f"{head}; providers failed: {'; '.join(self.provider_errors)}"
        return f"{head}; nothing matches at any price"

    def offer_text(self) -> str:
        """``runpod 1x A100 SXM 80GB $1.89/h`` (or ``-``)."""
        o = self.offer
        if o is None:
            return "-"
        gpu = "CPU only" if o.gpu_count == 0 else f"{o.gpu_count}x {o.gpu_type}"
        return f"{o.provider} {gpu} ${o.price_per_hour:.2f}/h"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (for --dry-run --json and the sweep's records)."""
        o = self.offer
        return {
            "model": self.spec.id,
            "name": self.spec.name,
            "query": self.query,
            "providers": self.providers,
            "gpu_count": self.gpu_count,
            "max_price_per_hour": self.max_price,
            "offer": _offer_dict(o) if o else None,
            "est_hours": round(self.est_hours, 3),
            "est_cost": None if self.est_cost is None else round(self.est_cost, 2),
            "ttl": self.ttl,
            "disk_gb": self.disk_gb,
            "no_offer": None if o else self.no_offer_message(),
        }


def _offer_dict(o: GPUOffer) -> dict[str, Any]:
    return {
        "provider": o.provider,
        "offer_id": o.offer_id,
        "gpu_type": o.gpu_type,
        "gpu_count": o.gpu_count,
        "price_per_hour": o.price_per_hour,
        "region": o.region,
    }


def _errors_of(result: Any) -> list[str]:
    return [f"{r.provider}: {(r.error or {}).get('message', r.status)}" for r in result.failed]


def plan_deploy(client: GPUClient, spec: ModelSpec, opts: DeployOptions) -> Plan:
    """Search offers for ``spec`` (ranked, under the cap); never raises for an empty result."""
    filters: dict[str, Any] = {}
    gpu_count = opts.gpu_count
    if spec.is_tiny:
        # The random in-code models run anywhere (a CPU too): only what the user asked for.
        if opts.gpu_filter:
            filters["gpu_type"] = opts.gpu_filter
        if opts.min_vram_gb is not None:
            filters["min_vram_gb"] = opts.min_vram_gb
        cap = opts.max_price if opts.max_price is not None else TINY_MAX_PRICE
    elif spec.family == "unknown":
        # A hub id outside the tables: its size is unknown until it is loaded on the box.
        if opts.min_vram_gb is None:
            raise BadInput(
                f"{spec.hf_id} is not one of the configs, so its size is unknown: say how much "
                "GPU memory to rent with --min-vram GB (and --gpu-count N, default 1)"
            )
        gpu_count = gpu_count or 1
        filters["min_vram_gb"] = opts.min_vram_gb
        filters["manufacturer"] = "nvidia"
        if opts.gpu_filter:
            filters["gpu_type"] = opts.gpu_filter
        cap = (
            opts.max_price
            if opts.max_price is not None
            else spec.max_price_per_gpu_hour * gpu_count
        )
    else:
        vram = opts.min_vram_gb if opts.min_vram_gb is not None else spec.vram_per_gpu_gb
        try:
            need = plan_gpus(with_overrides(spec, seq_len=opts.seq_len), vram)
        except SpecError as e:
            raise BadInput(str(e)) from None
        gpu_count = gpu_count or need.gpu_count
        filters.update(
            gpu_type=opts.gpu_filter or spec.gpu_type, min_vram_gb=vram, manufacturer="nvidia"
        )
        cap = (
            opts.max_price
            if opts.max_price is not None
            else spec.max_price_per_gpu_hour * gpu_count
        )
    if gpu_count is not None:
        filters["gpu_count"] = gpu_count
    wanted = " ".join(
        x
        for x in (
            f"{gpu_count}x" if gpu_count is not None else "",
            filters.get("gpu_type", ""),
            f">={filters['min_vram_gb']:g}GB" if "min_vram_gb" in filters else "",
        )
        if x
    )
    query = F.ram_gb >= opts.min_cpu_ram_gb if opts.min_cpu_ram_gb is not None else None
    if query is not None:
        wanted += f" ram>={opts.min_cpu_ram_gb:g}GB"
    try:
        names = client.provider_names()
        result = client.search(query, max_price_per_hour=cap, **filters)
        over = None
        if not result.offers:
            wider = client.search(query, **filters)
            over = wider.offers[0] if wider.offers else None
            errors = _errors_of(wider) or _errors_of(result)
        else:
            errors = _errors_of(result)
    except (ConfigError, QueryError) as e:
        raise BadInput(str(e)) from None
    return Plan(
        spec=spec,
        query=result.query,
        providers=names,
        gpu_count=gpu_count,
        max_price=cap,
        offers=list(result.offers[:3]),
        est_hours=estimated_minutes(spec) / 60,
        ttl=opts.ttl or default_ttl(spec),
        disk_gb=opts.disk_gb or (50 if spec.is_tiny else disk_gb_needed(spec)),
        cheapest_over_cap=over,
        provider_errors=errors,
        wanted=wanted or "any",
    )


# -- output --------------------------------------------------------------------------------------


class LogPrinter:
    """Job log lines -> the terminal; tqdm bars redrawn in place on a TTY, else every 25 %."""

    _BAR = re.compile(r"(\d{1,3})%\|")

    def __init__(self, out: Callable[[str], None], *, tty: bool, prefix: str = "  | ") -> None:
        self.out = out
        self.tty = tty
        self.prefix = prefix
        self.tail: deque[str] = deque(maxlen=15)
        self._bar_open = False
        self._last_pct = -1
        self.muted = False

    def __call__(self, line: str) -> None:
        if self.muted or not line.strip():
            return  # tqdm opens with a bare \r: an empty "line"
        self.tail.append(line)
        m = self._BAR.search(line)
        if m:
            pct = int(m.group(1))
            if self.tty:
                cols = shutil.get_terminal_size((100, 20)).columns
                sys.stdout.write("\r\x1b[K" + (self.prefix + line)[: cols - 1])
                sys.stdout.flush()
                self._bar_open = True
                return
            # Piped output (a sweep's log file): one line per quarter, not one per update.
            if pct < self._last_pct:
                self._last_pct = -1
            if self._last_pct >= 0 and pct // 25 == self._last_pct // 25 and pct != 100:
                return
            if pct == self._last_pct:
                return
            self._last_pct = pct
        elif self._bar_open:
            sys.stdout.write("\n")
            self._bar_open = False
        self.out(self.prefix + line)

    def close(self) -> None:
        """End an in-place bar with a newline."""
        if self._bar_open:
            sys.stdout.write("\n")
            sys.stdout.flush()
            self._bar_open = False


class _State:
    """The deploy's record: returned, written to ``deploy.json``, and (for a sweep) kept
    up to date in ``--state-file`` so ``deploy_sweep.py --status`` can find the job."""

    def __init__(self, path: Path | None, **fields: Any) -> None:
        self.path = path
        self.data: dict[str, Any] = dict(fields)

    def update(self, **fields: Any) -> None:
        self.data.update(fields)
        self.data["updated_at"] = _now()
        if self.path is not None:
            atomic_write_json(self.path, self.data)


T = TypeVar("T")


def _interruptible(fn: Callable[[], T]) -> T:
    """Run a long bifrost call in a helper thread while the main thread waits in short slices.

    Workaround: bifrost's synchronous calls block in ``Future.result()`` without a timeout, so a
    SIGINT that the kernel hands to another thread (bifrost's event-loop thread) is only seen
    when the call returns, for ``job.follow()`` when the job ends. Waiting in slices here lets
    Ctrl-C through at once; the cleanup then kills the job, which ends the helper's call.
    """
    if threading.current_thread() is not threading.main_thread():
        return fn()
    box: dict[str, Any] = {}
    done = threading.Event()

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:
            box["error"] = e
        finally:
            done.set()

    threading.Thread(target=target, name="deploy-call", daemon=True).start()
    while not done.wait(0.2):
        pass
    if "error" in box:
        raise box["error"]
    return box["value"]  # type: ignore[no-any-return]


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@contextlib.contextmanager
def _cleanup_shield(out: Callable[[str], None]) -> Iterator[None]:
    """A second Ctrl-C (or a TERM) must not cut a terminate short: note it and carry on."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def note(signum: int, frame: object) -> None:
        out("  (cleanup in progress: the instance is being terminated, please wait)")

    old_int = signal.signal(signal.SIGINT, note)
    old_term = signal.signal(signal.SIGTERM, note)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old_int)
        signal.signal(signal.SIGTERM, old_term)


# -- the deploy ----------------------------------------------------------------------------------


def _run_args(spec: ModelSpec, opts: DeployOptions, out_rel: str) -> list[str]:
    """The flags handed to ``run.py`` on the box (checked here before anything is rented)."""
    device = opts.device
    if device == "auto" and not spec.is_tiny:
        # A real model on a box rented for its GPUs: fail loudly if torch cannot see them
        # (a driver older than torch's CUDA) instead of running on the CPU until the TTL.
        device = "cuda"
    argv = ["--model", spec.id, "--output-dir", out_rel, "--device", device]
    if opts.num_sequences is not None:
        argv += ["--num-sequences", str(opts.num_sequences)]
        # run.py's default K=4 disjoint batches needs at least 4 sequences.
        argv += ["--xbatch-k", str(max(1, min(4, opts.num_sequences)))]
    if opts.seq_len is not None:
        argv += ["--seq-len", str(opts.seq_len)]
    argv += ["--corpus", _corpus(spec, opts)]
    return argv


def preflight(spec: ModelSpec, opts: DeployOptions) -> None:
    """Refuse, before renting, what would fail on the box: the job's own flags (through
    ``run.py``'s validation), the TTL and the timeouts. BadInput (exit 2) names the fix."""
    try:
        if opts.ttl is not None:
            parse_ttl(opts.ttl)
    except ConfigError as e:
        raise BadInput(f"--ttl: {e}") from None
    for flag, count in (
        ("--gpu-count", opts.gpu_count),
        ("--num-sequences", opts.num_sequences),
        ("--seq-len", opts.seq_len),
        ("--disk", opts.disk_gb),
    ):
        if count is not None and count < 1:
            raise BadInput(f"{flag} must be >= 1, got {count}")
    if opts.max_price is not None and not (math.isfinite(opts.max_price) and opts.max_price >= 0):
        raise BadInput(f"--max-price must be >= 0, got {opts.max_price}")
    for flag, value in (
        ("--ready-timeout", opts.ready_timeout),
        ("--min-vram", opts.min_vram_gb),
        ("--min-cpu-ram", opts.min_cpu_ram_gb),
    ):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise BadInput(f"{flag} must be a number > 0, got {value}")
    argv = _run_args(spec, opts, f"experiments/outlier_features/results/{slug(spec)}")
    try:
        run_script.validate(run_script.build_parser().parse_args(argv), root=ROOT)
    except SpecError as e:
        raise BadInput(str(e)) from None


def _run_command(spec: ModelSpec, opts: DeployOptions, *, local: bool, out_rel: str) -> str:
    # On `local`: this interpreter, whose environment has the extra already. On a rented box:
    # the workspace venv's python (the job runs with that venv on PATH).
    python = sys.executable if local else "python"
    argv = [python, "experiments/outlier_features/run.py", *_run_args(spec, opts, out_rel)]
    return shlex.join(argv)


def _extras(spec: ModelSpec, opts: DeployOptions) -> tuple[str, ...]:
    """Extras synced on a rented box: FineWeb-Edu streaming needs the locked `fineweb` one."""
    if _corpus(spec, opts) in ("auto", "fineweb-edu"):
        return (*EXTRAS, "fineweb")
    return EXTRAS


def _corpus(spec: ModelSpec, opts: DeployOptions) -> str:
    # The random in-code models read any text the same way: the offline corpus keeps them
    # independent of the hub (and of a 30 s hub timeout on a machine without network).
    return opts.corpus or ("packaged" if spec.is_tiny else "auto")


def _replace_dir(new: Path, final: Path) -> None:
    """Put ``new`` at ``final``; a previous result is moved aside first and removed after."""
    aside = None
    if final.exists():
        aside = final.with_name(f".{final.name}.old-{os.getpid()}-{time.monotonic_ns()}")
        final.rename(aside)
    new.rename(final)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def pull_results(job: Job, spec: ModelSpec, results_dir: Path, record: dict[str, Any]) -> Path:
    """Job outputs + log -> ``results_dir/<model>/``, never half-written: assembled in a temp
    dir beside it, then renamed into place."""
    results_dir.mkdir(parents=True, exist_ok=True)
    name = slug(spec)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.pull-", dir=results_dir))
    try:
        got = job.pull_results(tmp)
        outputs = got / "outputs" / name
        if not (outputs / "summary.json").is_file():
            raise DeployError(f"job {job.id} succeeded but its output has no summary.json")
        log_file = got / "job" / "log"
        if log_file.is_file():
            shutil.copyfile(log_file, outputs / "job.log")
        final = results_dir / name
        atomic_write_json(outputs / "deploy.json", {**record, "results_dir": str(final)})
        _replace_dir(outputs, final)
        return final
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def deploy(
    opts: DeployOptions,
    *,
    client: GPUClient | None = None,
    out: Callable[[str], None] = print,
    tty: bool | None = None,
) -> dict[str, Any]:
    """Rent, push, run, follow, pull, terminate. Returns the deploy record; raises DeployError
    (or KeyboardInterrupt) after cleaning up."""
    tty = sys.stdout.isatty() if tty is None else tty
    state = _State(
        opts.state_file,
        model=opts.model,
        status="planning",
        sweep=opts.sweep,
        started_at=_now(),
        keep_running=opts.keep_running,
    )
    own_client = client is None
    inst = None
    host: Host | None = None
    job: Job | None = None
    final: JobStatus | None = None
    workspace: str | None = None
    t0 = time.monotonic()
    timings: dict[str, float] = {}
    try:
        try:
            spec = resolve_model(opts.model)
            preflight(spec, opts)
            state.update(model=spec.id, name=spec.name)
            if client is None:
                client = GPUClient(providers=opts.providers)
            plan = plan_deploy(client, spec, opts)
        except BrokerError as e:
            raise BadInput(str(e)) from None
        offer = plan.offer
        if offer is None:
            raise NoOffer(plan.no_offer_message())
        out(
            f"{spec.id} {spec.name}: {plan.offer_text()} (searched `{plan.query}`, cap "
            f"${plan.max_price:.2f}/h); estimate {plan.est_hours:.2f} h "
            f"~ ${plan.est_cost or 0:.2f}; ttl {plan.ttl}"
        )
        state.update(status="provisioning", plan=plan.to_dict())

        def progress(stage: str, detail: str) -> None:
            out(f"  {stage}: {detail}")

        try:
            inst = client.create(
                plan.offers,
                gpu_count=plan.gpu_count,
                ttl=plan.ttl,
                max_price_per_hour=plan.max_price,
                disk_gb=plan.disk_gb,
                ready_timeout=opts.ready_timeout,
                sweep=opts.sweep,
                tag=opts.tag or spec.id,
                name=f"outlier-{spec.id}",
                on_progress=progress,
            )
        except ConfigError as e:  # a request the broker refuses as such (e.g. the TTL)
            raise BadInput(f"could not rent a box: {e}") from None
        except BrokerError as e:
            raise DeployError(f"could not rent a box: {e}") from None
        timings["provision_s"] = time.monotonic() - t0
        local = inst.target == "local"
        state.update(
            status="pushing",
            instance=inst.name,
            instance_id=inst.instance_id,
            provider=inst.provider,
            target=inst.target,
            price_per_hour=inst.price_per_hour,
            offer=_offer_dict(inst.offer) if inst.offer else None,
        )
        out(f"  rented {inst.name} ({inst.provider} {inst.instance_id}) at {inst.target}")

        host = inst.host()
        # On `local` every "instance" is this machine and concurrent sweep workers must not
        # sync into one tree: one workspace each, removed at the end. A remote box is held by
        # one deploy at a time, and a fixed name lets a box that outlives the run (your own
        # machine via the `ssh` provider) reuse its venv instead of growing one per deploy.
        workspace = (
            re.sub(r"[^A-Za-z0-9._-]", "-", inst.name or inst.instance_id)[:100]
            if local
            else WORKSPACE
        )
        t1 = time.monotonic()
        try:
            # On `local` the job uses this interpreter (its env already has the extras):
            # bootstrapping would build a second copy of torch under ~/.bifrost/venvs.
            pushed = _interruptible(
                lambda: host.push(
                    ROOT,
                    name=workspace,
                    bootstrap=not local,
                    extras=() if local else _extras(spec, opts),
                    progress=tty,
                )
            )
        except BifrostError as e:
            raise DeployError(f"push to {inst.target} failed: {e}") from None
        timings["push_s"] = time.monotonic() - t1
        out(
            f"  pushed {pushed.files} files to {pushed.workspace} ({pushed.method}"
            + (f", env {pushed.bootstrapped}" if pushed.bootstrapped else "")
            + f", {timings['push_s']:.1f}s)"
        )

        out_rel = f"experiments/outlier_features/results/{slug(spec)}"
        command = _run_command(spec, opts, local=local, out_rel=out_rel)
        secrets = {k: os.environ[k] for k in ("HF_TOKEN",) if os.environ.get(k)}
        try:
            job = host.run(
                command,
                name=f"outlier-{spec.id}",
                workspace=workspace,
                outputs=[out_rel],
                env={"TOKENIZERS_PARALLELISM": "false"},
                secrets=secrets,
            )
        except BifrostError as e:
            raise DeployError(f"could not start the job on {inst.target}: {e}") from None
        state.update(status="running", job_id=job.id, workspace=workspace)
        out(f"  job {job.id}: {command}")

        printer = LogPrinter(out, tty=tty)
        t2 = time.monotonic()
        try:
            final = _interruptible(lambda: job.follow(printer))
        except BifrostError as e:
            raise DeployError(f"lost the job's log on {inst.target}: {e}") from None
        except KeyboardInterrupt:
            printer.muted = True  # the helper thread follows on until the cleanup kills the job
            raise
        finally:
            printer.close()
        timings["run_s"] = time.monotonic() - t2
        state.update(job_state=final.state, exit_code=final.exit_code)
        if final.state != "succeeded":
            tail = "\n".join(f"    {ln}" for ln in printer.tail)
            # The cause goes on the first line: a sweep's table shows only that one.
            cause = next(
                (
                    ln.strip()
                    for ln in reversed(printer.tail)
                    if ln.lstrip().lower().startswith("error")
                ),
                None,
            )
            msg = (
                f"job {job.id} {final.state} (exit code {final.exit_code})"
                + (f": {cause}" if cause else "")
                + f"; last log lines:\n{tail}"
            )
            if final.exit_code == EXIT_BAD_INPUT:
                # run.py's "bad input" (a flag or the corpus): the same on any box, so a
                # sweep must not rent another one for it.
                raise BadInput(msg)
            raise DeployError(msg)

        t3 = time.monotonic()
        record = {
            **state.data,
            "status": "succeeded",
            "timings_s": {k: round(v, 2) for k, v in timings.items()},
        }
        try:
            where = _interruptible(lambda: pull_results(job, spec, opts.results_dir, record))
        except BifrostError as e:
            raise DeployError(f"pulling the results failed: {e}") from None
        timings["pull_s"] = time.monotonic() - t3
        state.update(status="succeeded", results_dir=str(where))
        out(f"  results: {where}")
        return state.data
    except DeployError as e:
        state.update(status=e.status, error=str(e))
        raise
    except KeyboardInterrupt:
        state.update(status="cancelled", error="interrupted")
        raise
    except BaseException as e:
        state.update(status="failed", error=f"{type(e).__name__}: {e}")
        raise
    finally:
        with _cleanup_shield(out):
            _cleanup(inst, host, job, final, workspace, opts, state, out)
            timings["total_s"] = time.monotonic() - t0
            state.update(timings_s={k: round(v, 2) for k, v in timings.items()}, ended_at=_now())
            if own_client and client is not None:
                client.close()


def _cleanup(
    inst: Any,
    host: Host | None,
    job: Job | None,
    final: JobStatus | None,
    workspace: str | None,
    opts: DeployOptions,
    state: _State,
    out: Callable[[str], None],
) -> None:
    try:
        if inst is None:
            return
        if opts.keep_running:
            inst.detach()
            state.update(instance_state="kept")
            _print_keep_hints(inst, job, out)
            return
        local = inst.target == "local"
        if job is not None and final is None and host is not None:
            # On a rented box the terminate ends the job too; on `local` nothing else would.
            with contextlib.suppress(BifrostError):
                job.kill(grace=2.0)
        if local and workspace is not None and host is not None:
            with contextlib.suppress(BifrostError):
                host.exec(
                    f"rm -rf ~/.bifrost/workspaces/{workspace} ~/.bifrost/state/{workspace}",
                    warn=True,
                )
        try:
            inst.terminate()
        except BrokerError as e:
            state.update(instance_state="terminate_failed")
            out(
                f"  WARNING: could not confirm that {inst.name} is gone: {e}\n"
                f"  run `broker instances terminate {inst.name}`"
            )
            return
        state.update(instance_state="terminated")
        out(f"  terminated {inst.name}")
    finally:
        if host is not None:
            with contextlib.suppress(BifrostError):
                host.close()


def _print_keep_hints(inst: Any, job: Job | None, out: Callable[[str], None]) -> None:
    key = inst.client.settings.ssh_key_path
    ident = f" -i {shlex.quote(str(key))}" if key and inst.target != "local" else ""
    out(
        f"  kept running (detached): {inst.name} ({inst.provider} {inst.instance_id}); "
        f"its TTL still applies"
    )
    if job is not None:
        out(f"    follow the job:  bifrost logs -f{ident} {inst.target} {job.id}")
        out(f"    pull results:    bifrost pull{ident} {inst.target} --job {job.id} ./results")
    if inst.target != "local":
        out(f"    log in:          {inst.ssh_command()}")
    out(f"    terminate:       broker instances terminate {inst.name}")


# -- CLI -----------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The CLI of ``deploy.py``."""
    p = argparse.ArgumentParser(
        prog="deploy.py",
        description="Run the outlier analysis of one model on a rented GPU box (broker + "
        "bifrost) and pull the results back; the box is terminated at the end, on errors "
        "and on Ctrl-C unless --keep-running.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 2)[1] if __doc__ else None,
    )
    p.add_argument(
        "--model",
        required=True,
        help=f"config: {known_models()} (number, name or HF id), or any Hugging Face id "
        "(then --min-vram is needed)",
    )
    p.add_argument(
        "--provider",
        action="append",
        dest="providers",
        metavar="NAME",
        help="cloud to rent from (repeatable; default: every configured one, or "
        "`local` when none is); `local` runs everything on this machine",
    )
    p.add_argument(
        "--gpu-filter", help="GPU type substring, e.g. A100 or H100 (default: the config's)"
    )
    p.add_argument("--gpu-count", type=int, help="GPUs per instance (default: the VRAM plan's)")
    p.add_argument(
        "--min-vram", type=float, dest="min_vram_gb", help="GB per GPU (default: the config's)"
    )
    p.add_argument(
        "--max-price",
        type=float,
        help="instance price cap in $/h (default: the config's $/GPU/h x GPUs; "
        f"${TINY_MAX_PRICE:g}/h for tiny models)",
    )
    p.add_argument(
        "--ttl",
        help="instance lifetime, e.g. 90m or 3h (default: 2x the estimate, "
        ">= 1h); the box is reaped after it even if this script dies",
    )
    p.add_argument("--disk", type=int, dest="disk_gb", help="disk GB (default: from the config)")
    p.add_argument(
        "--min-cpu-ram",
        type=float,
        dest="min_cpu_ram_gb",
        help="system RAM in GB the box must have (offers that do not list RAM are left out)",
    )
    p.add_argument(
        "--ready-timeout",
        type=float,
        help="seconds to wait for SSH + GPU probe (default: broker's setting)",
    )
    p.add_argument(
        "--results-dir",
        type=Path,
        default=DEFAULT_RESULTS,
        help="results go to <results-dir>/<model>/ (default: %(default)s)",
    )
    p.add_argument(
        "--keep-running",
        action="store_true",
        help="leave the instance up (detached) at the end and print how to reattach / terminate",
    )
    p.add_argument("--num-sequences", type=int, help="passed to run.py (default: config's, 16)")
    p.add_argument("--seq-len", type=int, help="passed to run.py (default: config's)")
    p.add_argument("--corpus", help="passed to run.py: auto, packaged, fineweb-edu or a file")
    p.add_argument("--device", default="auto", help="passed to run.py: auto (default), cpu, cuda")
    p.add_argument("--sweep", help="sweep id recorded in the broker journal (deploy_sweep.py)")
    p.add_argument("--tag", help="tag recorded in the broker journal (default: the model id)")
    p.add_argument(
        "--state-file",
        type=Path,
        help="keep a JSON record of the deploy here (deploy_sweep.py reads it)",
    )
    p.add_argument("--debug", action="store_true", help="tracebacks for unexpected errors")
    return p


def options_from_args(args: argparse.Namespace) -> DeployOptions:
    """Options from parsed flags; ``preflight`` checks their values (for the API too)."""
    return DeployOptions(
        model=args.model,
        providers=args.providers,
        gpu_filter=args.gpu_filter,
        gpu_count=args.gpu_count,
        min_vram_gb=args.min_vram_gb,
        max_price=args.max_price,
        ttl=args.ttl,
        disk_gb=args.disk_gb,
        ready_timeout=args.ready_timeout,
        results_dir=args.results_dir,
        keep_running=args.keep_running,
        sweep=args.sweep,
        tag=args.tag,
        num_sequences=args.num_sequences,
        seq_len=args.seq_len,
        corpus=args.corpus,
        device=args.device,
        state_file=args.state_file,
        min_cpu_ram_gb=args.min_cpu_ram_gb,
    )


def _term_as_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """Entry point: 0 done, 1 failed, 2 bad input, 3 no offer under the cap, 130 interrupted."""
    args = build_parser().parse_args(argv)

    def out(line: str) -> None:
        print(line, flush=True)

    old_term = None
    if threading.current_thread() is threading.main_thread():
        # `kill PID` (a sweep stopping, a CI timeout) cleans up exactly like Ctrl-C.
        old_term = signal.signal(signal.SIGTERM, _term_as_interrupt)
    try:
        opts = options_from_args(args)
        record = deploy(opts, out=out)
    except DeployError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    except Exception as e:
        if args.debug:
            raise
        print(
            f"error: {type(e).__name__}: {e} (run with --debug for the traceback)",
            file=sys.stderr,
            flush=True,
        )
        return EXIT_FAILED
    finally:
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
    t = record.get("timings_s", {})
    print(f"done in {t.get('total_s', 0):.1f}s: {record['results_dir']}", flush=True)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
