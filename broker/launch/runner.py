"""Run a :class:`~broker.launch.task.Task`: plan → rent → push → setup → run → follow → pull →
terminate, with every exit path (error, Ctrl-C, SIGTERM, SIGHUP, a cancelled sweep) ending in the
same cleanup.

One :class:`Launch` drives one task on ``task.nodes`` boxes. Stages report through
``on_event(stage, detail)`` (one line each) and the job's log through ``on_log(line)``; the CLI
renders both. Everything a later process needs to re-attach (boxes, job ids, workspace) is
written to the launch records (:mod:`broker.launch.records`) as soon as it is known.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, Field

from broker.errors import BrokerError, ConfigError, NoCapacityError, NotFoundError, ProvisionError
from broker.launch.records import LaunchRecord, LaunchStore
from broker.launch.task import Task, TaskError, split_output
from broker.types import GPUOffer, InstanceStatus

if TYPE_CHECKING:
    from bifrost import Host, Job, JobStatus
    from broker.client import GPUClient
    from broker.lifecycle import ManagedInstance

EventFn = Callable[[str, str], None]
LogFn = Callable[[str], None]

#: Exit statuses of a launch that did not end with the job's own exit code.
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_NO_OFFER = 3
EXIT_LAUNCH_FAILED = 4
#: How long a lost box may stay unreachable before the launch gives up on it (seconds).
LOST_AFTER_S = 60.0
#: Default rendezvous port for multi-node tasks.
MASTER_PORT = 29500


class LaunchError(BrokerError):
    """A launch that could not finish; ``exit_code`` is what the CLI exits with."""

    def __init__(self, message: str, *, exit_code: int = EXIT_LAUNCH_FAILED, state: str = "failed"):
        super().__init__(message)
        self.exit_code = exit_code
        self.state = state


class Cancelled(KeyboardInterrupt):
    """The launch was cancelled from another thread (a sweep being stopped)."""


class _Retryable(Exception):
    """Start over on a new box: no capacity, preempted, or lost."""

    def __init__(self, message: str, *, capacity: bool = False) -> None:
        super().__init__(message)
        self.capacity = capacity


class Plan(BaseModel):
    """What a launch will rent and roughly what it will cost (``--dry-run`` prints this)."""

    task: str
    query: str
    offers: list[GPUOffer] = Field(default_factory=list)
    nodes: int = 1
    ttl: str | None = None
    ttl_seconds: int | None = None
    expected_seconds: float | None = None
    est_hours: float | None = None
    est_cost: float | None = None
    push_files: int = 0
    push_bytes: int = 0
    workdir: str | None = None
    errors: list[str] = Field(default_factory=list)

    @property
    def offer(self) -> GPUOffer | None:
        """The offer the launch will try first."""
        return self.offers[0] if self.offers else None

    def offer_text(self) -> str:
        """``runpod A100-80GB x2 $3.58/h (on-demand, secure)`` or ``no offer``."""
        o = self.offer
        if o is None:
            return "no offer"
        kind = "spot" if o.spot else "on-demand"
        cloud = getattr(o.cloud_type, "value", o.cloud_type) if o.cloud_type else None
        gpus = f"{o.gpu_type} x{o.gpu_count}" if o.gpu_count else "CPU only"
        return (
            f"{o.provider} {gpus} ${o.price_per_hour:.2f}/h"
            + (f" x{self.nodes} nodes" if self.nodes > 1 else "")
            + f" ({kind}{', ' + str(cloud) if cloud else ''})"
        )

    def summary(self) -> str:
        """One line: offer, $/h, estimate, TTL, what is pushed."""
        parts = [self.offer_text()]
        if self.est_cost is not None and self.est_hours is not None:
            parts.append(f"est {self.est_hours:.2f} h ≈ ${self.est_cost:.2f}")
        parts.append(f"ttl {self.ttl}" if self.ttl else "no ttl")
        if self.workdir:
            parts.append(
                f"push {self.push_files} files ({_size(self.push_bytes)}) from {self.workdir}"
            )
        return " · ".join(parts)


class LaunchResult(BaseModel):
    """How a launch ended."""

    name: str
    state: str
    exit_code: int
    record_id: int | None = None
    sweep: str | None = None
    instances: list[str] = Field(default_factory=list)
    provider: str | None = None
    job_ids: list[str] = Field(default_factory=list)
    results_dir: str | None = None
    missing_outputs: list[str] = Field(default_factory=list)
    cost: float = 0.0
    attempts: int = 0
    error: str | None = None
    failed_node: int | None = None
    timings_s: dict[str, float] = Field(default_factory=dict)


def _size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{n} B"


def _ws_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "-", text)[:100] or "task"


@dataclass
class _Node:
    rank: int
    inst: ManagedInstance
    host: Host
    local: bool
    workspace: str
    job: Job | None = None
    ip: str = "127.0.0.1"


@dataclass
class _State:
    nodes: list[_Node] = field(default_factory=list)
    created: list[ManagedInstance] = field(default_factory=list)
    started_at: float = 0.0


class Launch:
    """Drive one task end to end. Use :meth:`run` (or :meth:`attach` for a detached one)."""

    def __init__(
        self,
        client: GPUClient,
        task: Task,
        *,
        results_dir: str | Path = "results",
        keep: bool = False,
        sweep: str | None = None,
        on_event: EventFn | None = None,
        on_log: LogFn | None = None,
        cancel: threading.Event | None = None,
        store: LaunchStore | None = None,
        stream: bool = True,
    ) -> None:
        self.client = client
        self.task = task
        self.results_dir = Path(results_dir)
        self.keep = keep
        self.sweep = sweep
        self.on_event: EventFn = on_event or (lambda s, d: None)
        self.on_log: LogFn = on_log or (lambda line: None)
        self.cancel = cancel or threading.Event()
        self.store = store or LaunchStore.default(client.settings.state_dir)
        self.stream = stream
        self.record: LaunchRecord | None = None
        self._state = _State()
        self._tail: deque[str] = deque(maxlen=20)
        #: Seconds between provider checks while a job runs (preemption, a lost box).
        self.provider_poll_s = float(os.environ.get("BROKER_PROVIDER_POLL", "15"))
        self.cancel_reason: str | None = None
        self._port: int | None = None
        self._timings: dict[str, float] = {}
        #: Every box rented by any attempt (costs add up across retries).
        self._all_created: list[ManagedInstance] = []

    # -- planning -------------------------------------------------------------------------------
    def secrets(self) -> dict[str, str]:
        """The task's secrets from this environment; a missing one is a TaskError."""
        missing = [k for k in self.task.secrets if k not in os.environ]
        if missing:
            raise TaskError(
                f"task {self.task.name!r}: secrets {', '.join(missing)} are not set in this "
                "environment; export them (their values are sent to the box in a 0600 file, "
                "never in argv)"
            )
        return {k: os.environ[k] for k in self.task.secrets}

    def plan(self) -> Plan:
        """Search offers and estimate the cost; rents nothing."""
        from broker.lifecycle import parse_ttl

        t, r = self.task, self.task.resources
        self.secrets()
        wd = t.workdir_path()
        files: list[str] = []
        size = 0
        if wd is not None:
            if not wd.is_dir():
                raise TaskError(f"task {t.name!r}: workdir {wd} is not a directory")
            from bifrost import list_files

            files = list_files(wd)
            for f in files:
                with contextlib.suppress(OSError):
                    size += (wd / f).lstat().st_size
        ttl = r.ttl if r.ttl is not None else self.client.settings.default_ttl
        ttl_s = parse_ttl(ttl)
        q = r.query_text()
        filters: dict[str, Any] = {}
        if r.gpus is not None:
            filters["gpu_count"] = r.gpus
        if r.spot is not None:
            filters["spot"] = r.spot
        cap = r.max_price if r.max_price is not None else self.client.max_price_per_hour
        if cap is not None:
            filters["max_price_per_hour"] = cap
        client = self.client
        if r.providers:
            from broker.client import GPUClient

            client = GPUClient(
                self.client.settings,
                providers=r.providers,
                journal=self.client.journal,
                budget=self.client.budget,
                max_price_per_hour=self.client.max_price_per_hour,
            )
        result = client.search(q or None, **filters)
        errors = [
            f"{rep.provider}: {(rep.error or {}).get('message', rep.status)}"
            for rep in result.failed
        ]
        offers = list(result.offers)[: max(r.n_offers, 1)]
        exp = t.expected_seconds()
        hours = (exp / 3600.0) if exp is not None else (ttl_s / 3600.0 if ttl_s else None)
        cost = None
        if offers and hours is not None:
            cost = offers[0].price_per_hour * hours * t.nodes
        return Plan(
            task=t.name,
            query=q,
            offers=offers,
            nodes=t.nodes,
            ttl=str(ttl) if ttl is not None else None,
            ttl_seconds=ttl_s,
            expected_seconds=exp,
            est_hours=hours,
            est_cost=cost,
            push_files=len(files),
            push_bytes=size,
            workdir=str(wd) if wd is not None else None,
            errors=errors,
        )

    # -- the run --------------------------------------------------------------------------------
    def _event(self, stage: str, detail: str) -> None:
        self.on_event(stage, detail)

    def _check_cancel(self) -> None:
        if self.cancel.is_set():
            raise Cancelled("cancelled")

    def _set(self, **fields: Any) -> None:
        if self.record is not None:
            self.record = self.store.update(self.record.id, **fields)

    def run(self, plan: Plan | None = None, *, detach: bool = False) -> LaunchResult:
        """Rent, run, pull and terminate (or with ``detach``, return once the job runs).

        Raises :class:`LaunchError` for a launch that could not finish (after cleaning up), and
        lets KeyboardInterrupt (also SIGTERM/SIGHUP under ``broker.signals``) through after
        cleaning up. A job that ran returns normally with its exit code.
        """
        if self.record is None:
            self.record = self.store.new(
                self.task.name, self.task.model_dump_json(), sweep=self.sweep
            )
        attempts = 0
        plan_now = plan
        while True:
            attempts += 1
            self._set(attempts=attempts, state="provisioning", error=None)
            try:
                if plan_now is None:
                    plan_now = self.plan()
                if not plan_now.offers:
                    raise LaunchError(
                        f"no offer matches task {self.task.name!r}"
                        + (f" (query {plan_now.query!r})" if plan_now.query else "")
                        + (
                            f"; provider errors: {'; '.join(plan_now.errors)}"
                            if plan_now.errors
                            else ""
                        ),
                        exit_code=EXIT_NO_OFFER,
                        state="no_offer",
                    )
                return self.finalize(self._attempt(plan_now, attempts, detach=detach))
            except _Retryable as e:
                if attempts > self.task.retries.max:
                    self._finish_state("failed", error=str(e))
                    raise LaunchError(
                        f"{e}; gave up after {attempts} attempt(s) (retries.max = "
                        f"{self.task.retries.max})"
                    ) from None
                # Capacity comes back with time (and offers that just failed sit out broker's
                # cooldown): wait before renting again; a lost box is replaced at once.
                wait = (
                    min(self.client.settings.capacity_cooldown_s, 30.0 * attempts)
                    if e.capacity
                    else 0.0
                )
                self._event(
                    "retry",
                    f"{e}; attempt {attempts + 1} of {self.task.retries.max + 1}"
                    + (f" in {wait:.0f}s" if wait else ""),
                )
                if wait and self.cancel.wait(wait):
                    raise Cancelled("cancelled") from None
                plan_now = None
            except LaunchError as e:
                self._finish_state(e.state, error=str(e))
                raise
            except ConfigError as e:
                self._finish_state("bad_input", error=str(e))
                raise LaunchError(str(e), exit_code=EXIT_BAD_INPUT, state="bad_input") from None
            except KeyboardInterrupt:
                self._finish_state("cancelled", error="interrupted")
                raise

    def _finish_state(self, state: str, *, error: str | None = None) -> None:
        if self.record is not None:
            self._set(state=state, error=error, cost=round(self._cost(), 6))

    def _cost(self) -> float:
        total = 0.0
        for inst in self._all_created:
            entry = self.client.journal.get(inst.name) if inst.name else None
            if entry is not None:
                total += entry.cost_so_far()
        return total

    def _attempt(self, plan: Plan, attempt: int, *, detach: bool) -> LaunchResult:
        self._state = _State()
        self._port = None
        self.cancel_reason = None
        t0 = time.monotonic()
        ok = False
        interrupted = False
        try:
            self._rent(plan)
            self._timings["rent_s"] = round(time.monotonic() - t0, 2)
            self._check_cancel()
            self._prepare()
            self._check_cancel()
            self._start()
            if detach:
                for n in self._state.nodes:
                    n.inst.detach()
                self._set(state="detached", holder_pid=None)
                ok = True
                self._event(
                    "detached",
                    f"job running; follow, pull and terminate later with "
                    f"`broker launch --attach {self.task.name}`",
                )
                return self._result("detached", 0, attempt)
            result = self._follow_and_finish(attempt)
            ok = True
            return result
        except KeyboardInterrupt:
            interrupted = True
            raise
        finally:
            if not ok or not detach:
                self._cleanup(interrupted=interrupted, failed=not ok)

    # -- stages ---------------------------------------------------------------------------------
    def _rent(self, plan: Plan) -> None:
        t, r = self.task, self.task.resources
        self._set(
            state="provisioning", price_per_hour=plan.offer.price_per_hour if plan.offer else None
        )
        self._event("plan", plan.summary())

        def progress_for(rank: int) -> Callable[[str, str], None]:
            def progress(stage: str, detail: str) -> None:
                if self.cancel.is_set():
                    raise Cancelled("cancelled")
                prefix = f"node {rank} " if t.nodes > 1 else ""
                self._event("rent", f"{prefix}{stage}: {detail}")

            return progress

        offers = list(plan.offers)
        if t.nodes > 1 and offers:
            # Every node from the first offer's provider and region: one network, one bill.
            first = offers[0]
            offers = [
                o for o in offers if o.provider == first.provider and o.region == first.region
            ]

        def create_one(rank: int) -> ManagedInstance:
            inst = self.client.create(
                offers,
                gpu_count=r.gpus,
                ttl=plan.ttl,
                max_price_per_hour=r.max_price,
                image=r.image,
                disk_gb=r.disk or 50,
                n_offers=r.n_offers,
                ready_timeout=r.ready_timeout,
                sweep=self.sweep,
                tag=t.name,
                name=f"{t.name}-{rank}" if t.nodes > 1 else t.name,
                on_progress=progress_for(rank),
            )
            self._state.created.append(inst)
            self._all_created.append(inst)
            self._set(
                instances=[i.name for i in self._state.created if i.name],
                provider=inst.provider,
            )
            return inst

        try:
            insts = [create_one(0)] if t.nodes == 1 else self._create_all(create_one)
        except (NoCapacityError, ProvisionError) as e:
            if self._only_capacity(e):
                raise _Retryable(f"no capacity: {e}", capacity=True) from None
            raise LaunchError(f"could not rent a box for {t.name!r}: {e}") from None
        except ConfigError:
            raise
        except BrokerError as e:
            raise LaunchError(f"could not rent a box for {t.name!r}: {e}") from None
        nodes = []
        for rank, inst in enumerate(insts):
            local = inst.target == "local"
            # `local` boxes all share this machine; own hosts in one multi-node task may share
            # a file system (NFS homes): one workspace per box or node, never shared.
            if local:
                ws = _ws_name(f"{t.name}-{inst.name}")
            elif t.nodes > 1:
                ws = _ws_name(f"{t.name}-node{rank}")
            else:
                ws = _ws_name(t.name)
            host = inst.host()
            ip = inst.ssh.host if inst.ssh is not None else "127.0.0.1"
            nodes.append(_Node(rank=rank, inst=inst, host=host, local=local, workspace=ws, ip=ip))
            self._event(
                "rent",
                f"{'node ' + str(rank) + ' ' if t.nodes > 1 else ''}rented {inst.name} "
                f"({inst.provider} {inst.instance_id}) at {inst.target} "
                f"${inst.price_per_hour or 0:.2f}/h",
            )
        self._state.nodes = nodes
        self._state.started_at = time.monotonic()
        self._set(
            targets=[n.inst.target for n in nodes],
            workspace=nodes[0].workspace,
        )

    def _create_all(self, create_one: Callable[[int], ManagedInstance]) -> list[ManagedInstance]:
        """All nodes at once; all or nothing (the caller's cleanup terminates the created)."""
        n = self.task.nodes
        with ThreadPoolExecutor(max_workers=n, thread_name_prefix="broker-node") as pool:
            futures = [pool.submit(create_one, rank) for rank in range(n)]
            errors: list[tuple[int, BaseException]] = []
            out: list[ManagedInstance] = []
            for rank, f in enumerate(futures):
                try:
                    out.append(f.result())
                except BaseException as e:
                    errors.append((rank, e))
        if errors:
            rank, err = errors[0]
            if isinstance(err, KeyboardInterrupt):
                raise err
            if isinstance(err, BrokerError):
                raise LaunchError(
                    f"node {rank} of {n} did not come up ({type(err).__name__}): {err}; "
                    "terminating every node"
                ) from None
            raise err
        return out

    @staticmethod
    def _only_capacity(e: BrokerError) -> bool:
        if isinstance(e, NoCapacityError):
            return True
        if not getattr(e, "attempts", None) and "failed for capacity recently" in str(e):
            return True  # every offer is sitting out its capacity cooldown
        attempts = getattr(e, "attempts", None) or []
        reasons = [getattr(a, "error_type", None) or "" for a in attempts]
        return bool(reasons) and all("Capacity" in str(x) or "Stale" in str(x) for x in reasons)

    def _bootstrap(self, node: _Node) -> bool:
        b = self.task.bootstrap
        if b == "auto":
            wd = self.task.workdir_path()
            return (not node.local) and wd is not None and (wd / "uv.lock").is_file()
        return bool(b)

    def _prepare(self) -> None:
        """Push the workdir and run the setup on every node (in parallel)."""
        from bifrost import BifrostError

        t = self.task
        wd = t.workdir_path()
        self._set(state="pushing")

        def one(node: _Node) -> None:
            label = f"node {node.rank} " if t.nodes > 1 else ""
            if wd is not None:
                t1 = time.monotonic()
                pushed = node.host.push(
                    wd,
                    name=node.workspace,
                    bootstrap=self._bootstrap(node),
                    extras=tuple(t.extras) if self._bootstrap(node) else (),
                )
                self._event(
                    "push",
                    f"{label}{pushed.files} files → {pushed.workspace} ({pushed.method}"
                    + (f", env {pushed.bootstrapped}" if pushed.bootstrapped else "")
                    + f", {time.monotonic() - t1:.1f}s)",
                )
            if t.setup:
                self._setup(node, label)

        try:
            self._parallel(one)
        except BifrostError as e:
            raise self._transport_failure("push/setup", e) from None

    def _setup(self, node: _Node, label: str) -> None:
        import hashlib

        from bifrost import BifrostError

        assert self.task.setup is not None
        key = hashlib.sha256((node.workspace + "\0" + self.task.setup).encode()).hexdigest()[:16]
        marker = f"$HOME/.broker/setup/{_ws_name(node.workspace)}-{key}.done"
        r = node.host.exec(f'test -f "{marker}"', warn=True)
        if r.exit_code == 0:
            self._event("setup", f"{label}cached (same setup already ran on this box)")
            return
        self._set(state="setup")
        t1 = time.monotonic()
        job = node.host.run(
            self.task.setup,
            name=f"{self.task.name}-setup",
            workspace=node.workspace if self.task.workdir is not None else None,
            env=self.task.env,
        )
        status = self._wait_job(job, stream_to=None)
        if status.state != "succeeded":
            log = ""
            with contextlib.suppress(BifrostError):
                log = job.logs(tail=10)
            raise LaunchError(
                f"{label}setup {status.state} (exit code {status.exit_code}); last lines:\n{log}",
                exit_code=EXIT_LAUNCH_FAILED,
            )
        node.host.exec(f'mkdir -p "$HOME/.broker/setup" && touch "{marker}"')
        self._event("setup", f"{label}done in {time.monotonic() - t1:.1f}s")

    def _node_env(self, node: _Node) -> dict[str, str]:
        t = self.task
        env = dict(t.env)
        n = len(self._state.nodes)
        gpus = node.inst.gpu_count or 0
        master = self._state.nodes[0].ip
        env.update(
            {
                "BROKER_TASK": t.name,
                "BROKER_NODE_RANK": str(node.rank),
                "BROKER_NUM_NODES": str(n),
                "BROKER_NODE_IPS": "\n".join(x.ip for x in self._state.nodes),
                "BROKER_GPUS_PER_NODE": str(gpus),
                "BROKER_MASTER_ADDR": master,
                "BROKER_MASTER_PORT": str(self._master_port()),
            }
        )
        if node.local and not self._bootstrap(node):
            # `local` is this machine and nothing was synced: the job's `python` is the one
            # broker runs under (its environment has the project's dependencies).
            env["PATH"] = os.pathsep.join(
                [str(Path(sys.executable).parent), os.environ.get("PATH", os.defpath)]
            )
        if n > 1 or t.engine == "torchrun":
            nproc = t.nproc_per_node or max(gpus, 1)
            env.update(
                {
                    "MASTER_ADDR": master,
                    "MASTER_PORT": str(self._master_port()),
                    "NNODES": str(n),
                    "NODE_RANK": str(node.rank),
                    "WORLD_SIZE": str(n * nproc),
                }
            )
        return env

    def _master_port(self) -> int:
        """The rendezvous port: the task's ``MASTER_PORT``, a free local port when every node
        is this machine (several launches may share it), else the torch default 29500."""
        if self._port is None:
            port = self.task.env.get("MASTER_PORT")
            if port and port.isdigit():
                self._port = int(port)
            elif all(n.ip in ("127.0.0.1", "::1", "localhost") for n in self._state.nodes):
                import socket

                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", 0))
                    self._port = int(sock.getsockname()[1])
            else:
                self._port = MASTER_PORT
        return self._port

    def command_for(self, node: _Node) -> str:
        """The job's command line on one node (torchrun composed when the engine says so)."""
        t = self.task
        if t.engine != "torchrun":
            return t.run
        nproc = t.nproc_per_node or max(node.inst.gpu_count or 0, 1)
        script = t.run.strip()
        for prefix in ("python3 ", "python "):
            if script.startswith(prefix):
                script = script[len(prefix) :].lstrip()
        args = [
            "torchrun",
            f"--nnodes={len(self._state.nodes)}",
            f"--nproc_per_node={nproc}",
            f"--node_rank={node.rank}",
            f"--master_addr={self._state.nodes[0].ip}",
            f"--master_port={self._master_port()}",
        ]
        return " ".join(shlex.quote(a) for a in args) + " " + script

    def _start(self) -> None:
        from bifrost import BifrostError

        secrets = self.secrets()
        self._set(state="running")
        self._master_port()  # chosen once, before the nodes start in parallel

        def one(node: _Node) -> None:
            node.job = node.host.run(
                self.command_for(node),
                name=self.task.name,
                workspace=node.workspace if self.task.workdir is not None else None,
                env=self._node_env(node),
                secrets=secrets,
                outputs=[split_output(o)[0] for o in self.task.outputs],
            )

        try:
            self._parallel(one)
        except BifrostError as e:
            raise self._transport_failure("job start", e) from None
        self._set(job_ids=[n.job.id for n in self._state.nodes if n.job])
        for n in self._state.nodes:
            assert n.job is not None
            label = f"node {n.rank} " if len(self._state.nodes) > 1 else ""
            self._event("run", f"{label}job {n.job.id}: {self.command_for(n)}")

    def _parallel(self, fn: Callable[[_Node], None]) -> None:
        nodes = self._state.nodes
        if len(nodes) == 1:
            fn(nodes[0])
            return
        with ThreadPoolExecutor(max_workers=len(nodes), thread_name_prefix="broker-node") as pool:
            futures = [pool.submit(fn, n) for n in nodes]
            first: BaseException | None = None
            for f in futures:
                try:
                    f.result()
                except BaseException as e:
                    first = first or e
        if first is not None:
            raise first

    # -- following ------------------------------------------------------------------------------
    def _wait_job(self, job: Job, *, stream_to: LogFn | None) -> JobStatus:
        """Wait for a job, streaming its log or polling; cancellable from another thread."""
        if stream_to is not None and not self.cancel.is_set():
            return job.follow(stream_to)
        delay = 0.3
        while True:
            st = job.status()
            if st.done:
                return st
            if self.cancel.wait(delay):
                raise Cancelled("cancelled")
            delay = min(delay * 1.5, 3.0)

    def _line(self, line: str) -> None:
        self._tail.append(line)
        self.on_log(line)

    def _follow_and_finish(self, attempt: int) -> LaunchResult:
        from bifrost import BifrostError

        nodes = self._state.nodes
        t2 = time.monotonic()
        statuses: dict[int, JobStatus] = {}
        failed: tuple[int, JobStatus] | None = None
        try:
            if len(nodes) == 1:
                statuses[0] = self._follow_one(nodes[0])
            else:
                statuses, failed = self._follow_many()
        except BifrostError as e:
            raise self._lost_or_failure(e) from None
        self._timings["run_s"] = round(time.monotonic() - t2, 2)
        for rank, st in sorted(statuses.items()):
            if failed is None and (
                st.state == "lost" or (st.state == "died" and self._box_gone(nodes[rank]))
            ):
                raise _Retryable(
                    f"node {rank} lost its job ({st.state}): the box rebooted or went away"
                )
        if failed is None:
            bad = [(r, s) for r, s in sorted(statuses.items()) if s.state != "succeeded"]
            failed = bad[0] if bad else None
        rank0 = statuses.get(0)
        exit_code = 0
        if failed is not None:
            rank, st = failed
            exit_code = st.exit_code if st.exit_code not in (None, 0) else EXIT_FAILED
            where = f"node {rank}'s " if len(nodes) > 1 else ""
            self._event("job", f"{where}job {st.id} {st.state} (exit code {st.exit_code})")
            if self.task.retries.on_job_failure and attempt <= self.task.retries.max:
                raise _Retryable(f"{where}job {st.state} (exit code {st.exit_code})")
        else:
            assert rank0 is not None
            exit_code = rank0.exit_code or 0
            self._event("job", f"succeeded in {self._timings['run_s']:.1f}s")
        # Outputs and logs come back whatever the exit code: a failed run's partial results
        # and its log are what the user needs to see why.
        t3 = time.monotonic()
        self._set(state="pulling")
        results, missing = self._pull(exit_code, failed)
        self._timings["pull_s"] = round(time.monotonic() - t3, 2)
        state = "succeeded" if failed is None else "failed"
        error = None
        if failed is not None:
            rank, st = failed
            error = (
                f"node {rank}: " if len(nodes) > 1 else ""
            ) + f"job {st.state} (exit code {st.exit_code})"
        result = self._result(
            state, exit_code, attempt, error=error, results=results, missing=missing
        )
        if failed is not None and len(nodes) > 1:
            result.failed_node = failed[0]
        return result

    def _provider_check_due(self, last: list[float]) -> bool:
        now = time.monotonic()
        if now - last[0] < self.provider_poll_s:
            return False
        last[0] = now
        return True

    def _gone_nodes(self) -> list[_Node]:
        """Nodes whose box the provider reports terminated or stopped (preempted, lost)."""
        return [n for n in self._state.nodes if self._box_gone(n)]

    def _follow_one(self, node: _Node) -> JobStatus:
        """Follow one job while asking the provider every ``provider_poll_s`` whether the box
        still exists: a preempted or lost box ends the follow at once (and is retried), even
        when its SSH would keep a follower waiting."""
        assert node.job is not None
        job = node.job
        box: dict[str, Any] = {}

        def work() -> None:
            try:
                box["status"] = self._wait_job(job, stream_to=self._line if self.stream else None)
            except BaseException as e:
                box["error"] = e

        follower = threading.Thread(target=work, name="broker-follow", daemon=True)
        follower.start()
        last = [time.monotonic()]
        while follower.is_alive():
            follower.join(0.2)
            if not follower.is_alive():
                break
            if self.cancel.is_set():
                raise Cancelled("cancelled")
            if self._provider_check_due(last) and self._gone_nodes():
                raise _Retryable(f"box {node.inst.name} was preempted or lost during the run")
        if "error" in box:
            raise box["error"]
        status: JobStatus = box["status"]
        return status

    def _follow_many(self) -> tuple[dict[int, JobStatus], tuple[int, JobStatus] | None]:
        """Stream rank 0 with a ``[node 0]`` prefix; poll the others; stop all when one fails."""
        nodes = self._state.nodes
        statuses: dict[int, JobStatus] = {}
        failed: list[tuple[int, JobStatus]] = []
        stop = threading.Event()
        lock = threading.Lock()

        def watch(node: _Node) -> None:
            assert node.job is not None
            delay = 0.3
            while not stop.is_set():
                st = node.job.status()
                if st.done:
                    with lock:
                        statuses[node.rank] = st
                        if st.state != "succeeded" and not failed:
                            failed.append((node.rank, st))
                            stop.set()
                    return
                if self.cancel.wait(delay):
                    return
                delay = min(delay * 1.5, 2.0)

        def stream0() -> None:
            node = nodes[0]
            assert node.job is not None
            if self.stream:
                st = node.job.follow(lambda line: self._line(f"[node 0] {line}"))
            else:
                st = self._wait_job(node.job, stream_to=None)
            with lock:
                statuses[0] = st
                if st.state != "succeeded" and not failed:
                    failed.append((0, st))
                    stop.set()

        with ThreadPoolExecutor(max_workers=len(nodes), thread_name_prefix="broker-watch") as pool:
            futures = [pool.submit(stream0)] + [pool.submit(watch, n) for n in nodes[1:]]
            last = [time.monotonic()]
            while not all(f.done() for f in futures):
                gone = self._gone_nodes() if self._provider_check_due(last) else []
                if gone:
                    # A box preempted or lost mid-run: the job cannot finish; stop the rest.
                    stop.set()
                    self.cancel_reason = f"node {gone[0].rank}'s box {gone[0].inst.name} was lost"
                if stop.is_set() or self.cancel.is_set():
                    # One node failed (or we are cancelled): stop the others' jobs, which
                    # ends rank 0's follow and the watchers.
                    for n in nodes:
                        if n.job is not None and n.rank not in statuses:
                            with contextlib.suppress(Exception):
                                n.job.kill(grace=2.0)
                    stop.set()
                    break
                time.sleep(0.1)
            for f in futures:
                if self.cancel_reason:
                    with contextlib.suppress(Exception):  # the lost box's follower errs
                        f.result()
                else:
                    f.result()
        self._check_cancel()
        if self.cancel_reason:
            raise _Retryable(self.cancel_reason)
        return statuses, (failed[0] if failed else None)

    def _box_gone(self, node: _Node) -> bool:
        try:
            node.inst.refresh()
        except NotFoundError:
            return True
        except BrokerError:
            return False
        return node.inst.status in (InstanceStatus.TERMINATED, InstanceStatus.STOPPED)

    def _lost_or_failure(self, e: BaseException) -> BaseException:
        for n in self._state.nodes:
            if self._box_gone(n):
                return _Retryable(f"node {n.rank}'s box {n.inst.name} was lost ({e})")
        return LaunchError(f"lost contact with the job: {e}")

    def _transport_failure(self, stage: str, e: BaseException) -> BaseException:
        for n in self._state.nodes:
            if self._box_gone(n):
                return _Retryable(f"box {n.inst.name} went away during {stage} ({e})")
        return LaunchError(f"{stage} failed: {e}")

    # -- results --------------------------------------------------------------------------------
    def _pull(
        self, exit_code: int, failed: tuple[int, JobStatus] | None
    ) -> tuple[str | None, list[str]]:
        """Pull outputs (rank 0, or every node) and each job's log into ``<results>/<task>/``."""
        from bifrost import BifrostError

        t = self.task
        final = self.results_dir / t.name
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{t.name}.", suffix=".part", dir=final.parent))
        missing: list[str] = []
        try:
            nodes = self._state.nodes
            pull_from = nodes if (t.outputs_from == "all" and len(nodes) > 1) else nodes[:1]
            for node in nodes:
                sub = tmp / f"node-{node.rank}" if len(pull_from) > 1 else tmp
                sub.mkdir(parents=True, exist_ok=True)
                if node.job is not None:
                    name = "job.log" if len(nodes) == 1 else f"job-node-{node.rank}.log"
                    try:
                        (tmp / name).write_text(node.job.logs())
                    except BifrostError as e:
                        self._event("pull", f"could not read node {node.rank}'s log: {e}")
                if node not in pull_from:
                    continue
                base = f"~/.bifrost/workspaces/{node.workspace}" if t.workdir is not None else "~"
                for out in t.outputs:
                    src, dst = split_output(out)
                    try:
                        _pull_into(node.host, f"{base}/{src}", sub, dst)
                    except BifrostError as e:
                        if "does not exist" in str(e):
                            where = src if len(pull_from) == 1 else f"node-{node.rank}/{src}"
                            missing.append(where)
                            continue
                        raise LaunchError(f"pulling {src} failed: {e}") from None
            record = self._result(
                "succeeded" if failed is None else "failed", exit_code, 0, results=str(final)
            ).model_dump(mode="json")
            record["task"] = json.loads(t.model_dump_json())
            record["missing_outputs"] = missing
            (tmp / "launch.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
            _replace_dir(tmp, final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        if missing:
            self._event("pull", f"missing outputs (not created by the job): {', '.join(missing)}")
        self._event("pull", f"results in {final}")
        self._set(results_dir=str(final))
        return str(final), missing

    def _result(
        self,
        state: str,
        exit_code: int,
        attempt: int,
        *,
        error: str | None = None,
        results: str | None = None,
        missing: Sequence[str] = (),
    ) -> LaunchResult:
        nodes = self._state.nodes
        return LaunchResult(
            name=self.task.name,
            state=state,
            exit_code=exit_code,
            record_id=self.record.id if self.record else None,
            sweep=self.sweep,
            instances=[n.inst.name for n in nodes if n.inst.name],
            provider=nodes[0].inst.provider if nodes else None,
            job_ids=[n.job.id for n in nodes if n.job],
            results_dir=results,
            missing_outputs=list(missing),
            cost=round(self._cost(), 6),
            attempts=attempt or (self.record.attempts if self.record else 0),
            error=error,
            timings_s=dict(self._timings),
        )

    # -- cleanup --------------------------------------------------------------------------------
    def _cleanup(self, *, interrupted: bool, failed: bool) -> None:
        """Stop jobs (when interrupted or failed) and terminate every box (unless ``keep``)."""
        from bifrost import BifrostError

        state = self._state
        if interrupted or failed:
            for n in state.nodes:
                if n.job is not None:
                    with contextlib.suppress(BifrostError, BrokerError):
                        if not n.job.status().done:
                            n.job.kill(grace=2.0)
        for n in state.nodes:
            if n.local and not self.keep:
                with contextlib.suppress(BifrostError, BrokerError):
                    n.host.exec(
                        f"rm -rf -- ~/.bifrost/workspaces/{shlex.quote(n.workspace)} "
                        f"~/.bifrost/venvs/{shlex.quote(n.workspace)}",
                        warn=True,
                    )
            with contextlib.suppress(Exception):
                n.host.close()
        if self.keep:
            for inst in state.created:
                inst.detach()
                self._event(
                    "keep",
                    f"{inst.name} left running at {inst.target} (--keep); "
                    f"`broker instances terminate {inst.name}` when done",
                )
            return
        self._terminate_all(state.created)

    def _terminate_all(self, insts: Sequence[ManagedInstance]) -> None:
        if not insts:
            return
        if self.record is not None and not self.record.final:
            self._set(state="terminating")
        errors: list[str] = []

        def one(inst: ManagedInstance) -> None:
            try:
                inst.terminate()
                self._event("terminate", f"{inst.name} terminated, confirmed gone")
            except BrokerError as e:
                errors.append(f"{inst.name}: {e}")

        with ThreadPoolExecutor(max_workers=max(len(insts), 1)) as pool:
            list(pool.map(one, insts))
        if errors:
            msg = (
                "could not confirm termination of "
                + "; ".join(errors)
                + " — it may still be billing: run `broker instances terminate` or "
                "`broker instances reconcile`"
            )
            self._event("terminate", msg)
            self._set(error=msg)
            raise LaunchError(msg)
        self._event("cost", f"≈ ${self._cost():.4f} for {len(insts)} box(es)")

    # -- attach ---------------------------------------------------------------------------------
    def attach(self, record: LaunchRecord) -> LaunchResult:
        """Follow a launch started elsewhere (``--detach``, or a killed sweep), then pull and
        terminate as :meth:`run` would."""

        self.record = self.store.update(record.id, holder_pid=os.getpid())
        if not record.instances or not record.job_ids:
            raise LaunchError(
                f"launch {record.name!r} has no running job to attach to (state {record.state})",
                exit_code=EXIT_BAD_INPUT,
                state=record.state,
            )
        nodes: list[_Node] = []
        try:
            for rank, (name, job_id) in enumerate(
                zip(record.instances, record.job_ids, strict=False)
            ):
                inst = self.client.instance(name)
                host: Host = inst.host()
                local = inst.target == "local"
                ip = inst.ssh.host if inst.ssh is not None else "127.0.0.1"
                node = _Node(
                    rank=rank,
                    inst=inst,
                    host=host,
                    local=local,
                    workspace=record.workspace or _ws_name(self.task.name),
                    ip=ip,
                )
                node.job = host.job(job_id)
                nodes.append(node)
                self._state.created.append(inst)
                self._all_created.append(inst)
        except NotFoundError as e:
            self._finish_state("failed", error=f"box gone: {e}")
            raise LaunchError(f"launch {record.name!r}: its box is gone ({e})") from None
        self._state.nodes = nodes
        self._set(state="running")
        self._event("attach", f"following job {record.job_ids[0]} on {nodes[0].inst.target}")
        ok = False
        interrupted = False
        try:
            result = self._follow_and_finish(record.attempts or 1)
            ok = True
        except _Retryable as e:
            self._finish_state("failed", error=str(e))
            raise LaunchError(str(e)) from None
        except LaunchError as e:
            self._finish_state(e.state, error=str(e))
            raise
        except KeyboardInterrupt:
            interrupted = True
            self._finish_state("cancelled", error="interrupted")
            raise
        finally:
            self._cleanup(interrupted=interrupted, failed=not ok)
        return self.finalize(result)

    def finalize(self, result: LaunchResult) -> LaunchResult:
        """Write the final state of a finished launch to its record (cost included)."""
        if self.record is not None and result.state != "detached":
            result.cost = round(self._cost(), 6)
            self._set(
                state=result.state,
                exit_code=result.exit_code,
                error=result.error,
                cost=result.cost,
                holder_pid=None,
            )
        return result


def _pull_into(host: Host, remote: str, root: Path, dest: str) -> None:
    """Pull ``remote`` to ``root/dest``; ``dest`` ``.`` merges its contents into ``root``."""
    if dest != ".":
        target = root / dest
        target.parent.mkdir(parents=True, exist_ok=True)
        host.pull(remote, target)
        return
    staging = Path(tempfile.mkdtemp(prefix=".pull-", dir=root))
    try:
        got = host.pull(remote, staging / "x")
        if got.is_dir():
            for child in got.iterdir():
                final = root / child.name
                if final.is_dir() and not final.is_symlink():
                    shutil.rmtree(final)
                elif final.exists() or final.is_symlink():
                    final.unlink()
                child.rename(final)
        else:
            got.rename(root / Path(remote).name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _replace_dir(new: Path, final: Path) -> None:
    """Put ``new`` at ``final`` (replacing an older result) without a moment of neither."""
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        if old.exists():
            shutil.rmtree(old)
        final.rename(old)
        new.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        new.rename(final)


def launch(
    client: GPUClient,
    task: Task,
    *,
    results_dir: str | Path = "results",
    keep: bool = False,
    detach: bool = False,
    on_event: EventFn | None = None,
    on_log: LogFn | None = None,
) -> LaunchResult:
    """Run ``task`` end to end; see :class:`Launch`. Returns the result (its ``exit_code`` is
    the job's); raises :class:`LaunchError` when the launch itself fails."""
    run = Launch(client, task, results_dir=results_dir, keep=keep, on_event=on_event, on_log=on_log)
    return run.run(detach=detach)
