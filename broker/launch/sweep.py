"""Sweeps: one task template over a parameter matrix, many launches under one sweep id.

A :class:`Sweep` expands into tasks (``{{ param }}`` placeholders filled from each matrix row),
runs them with at most ``max_parallel`` at a time, and can be resumed after its own process was
killed: finished tasks are not run again, tasks whose job still runs on a box are re-attached
(not started twice), and boxes a killed sweep left without a job are terminated before their
task starts over. Every instance carries the sweep id in the journal; the sweep ends with a cost
summary and a leak check.
"""

from __future__ import annotations

import contextlib
import itertools
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from broker.errors import BrokerError, NotFoundError
from broker.launch.records import ACTIVE, LaunchRecord, LaunchStore
from broker.launch.runner import EXIT_FAILED, Launch, LaunchError, LaunchResult
from broker.launch.task import (
    Task,
    TaskError,
    apply_overrides,
    explain_validation,
    read_yaml,
    task_from_dict,
)
from broker.types import InstanceStatus

if TYPE_CHECKING:
    from broker.client import GPUClient

Scalar = str | int | float | bool
_PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


class Sweep(BaseModel):
    """A task template, a parameter matrix, and how many tasks may run at once."""

    model_config = ConfigDict(extra="forbid")

    name: str
    task: dict[str, Any]
    matrix: dict[str, list[Scalar]] = Field(default_factory=dict)
    include: list[dict[str, Scalar]] = Field(default_factory=list)
    exclude: list[dict[str, Scalar]] = Field(default_factory=list)
    max_parallel: int = Field(default=4, ge=1, le=256)
    #: Where the file was loaded from (the template's relative workdir resolves against it).
    base_dir: str | None = Field(default=None, exclude=True)
    #: Tasks given one by one (:meth:`of_tasks`) instead of a template and a matrix.
    explicit: list[Task] | None = Field(default=None, exclude=True)

    @classmethod
    def of_tasks(cls, name: str, tasks: Sequence[Task], *, max_parallel: int = 4) -> Sweep:
        """A sweep over tasks built in Python (each may rent something different)."""
        if not _NAME.match(name):
            raise TaskError(
                f"sweep name {name!r} is not usable: use 1-63 letters, digits, '.', '_' or '-'"
            )
        names = [t.name for t in tasks]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise TaskError(f"sweep {name}: task names must be unique; repeated: {', '.join(dup)}")
        return cls(name=name, task={}, max_parallel=max_parallel, explicit=list(tasks))

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError(f"{v!r} is not a usable sweep name (letters, digits, '.', '_', '-')")
        return v

    @field_validator("matrix")
    @classmethod
    def _matrix(cls, v: dict[str, list[Scalar]]) -> dict[str, list[Scalar]]:
        for k, vals in v.items():
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", k):
                raise ValueError(f"parameter name {k!r}: use letters, digits and '_'")
            if not vals:
                raise ValueError(f"parameter {k!r} has no values")
        return v

    def combinations(self) -> list[dict[str, Scalar]]:
        """Matrix rows after ``exclude`` (rows matching every key of an entry) and ``include``
        (extra rows, or extra keys merged into the rows they match)."""
        keys = list(self.matrix)
        rows: list[dict[str, Scalar]] = (
            [
                dict(zip(keys, vals, strict=True))
                for vals in itertools.product(*self.matrix.values())
            ]
            if keys
            else []
        )
        rows = [r for r in rows if not any(_matches(r, ex) for ex in self.exclude)]
        for inc in self.include:
            base = {k: v for k, v in inc.items() if k in self.matrix}
            hits = [r for r in rows if base and _matches(r, base)]
            if hits and len(base) == len(inc):
                continue  # already present
            if hits and len(base) < len(inc):
                for r in hits:
                    r.update(inc)
            else:
                rows.append(dict(inc))
        return rows or [{}]

    def tasks(self) -> list[Task]:
        """One task per combination, names unique (checked)."""
        if self.explicit is not None:
            return list(self.explicit)
        out: list[Task] = []
        seen: dict[str, dict[str, Scalar]] = {}
        template_name = str(self.task.get("name", self.name))
        for params in self.combinations():
            data = _fill(self.task, params, f"sweep {self.name}")
            if "name" not in data or _PLACEHOLDER.search(template_name) is None:
                suffix = "-".join(_slug(v) for v in params.values())
                data["name"] = f"{data.get('name', self.name)}" + (f"-{suffix}" if suffix else "")
            data.setdefault("env", {})
            if isinstance(data["env"], dict):
                for k, v in params.items():
                    data["env"].setdefault(f"SWEEP_{k.upper()}", str(v))
            task = task_from_dict(
                data, source=f"sweep {self.name} ({_fmt(params)})", base_dir=self.base_dir
            )
            if task.name in seen:
                raise TaskError(
                    f"sweep {self.name}: rows {_fmt(seen[task.name])} and {_fmt(params)} both "
                    f"give the task name {task.name!r}; put the parameters in the name, e.g. "
                    "name: train-{{ lr }}"
                )
            seen[task.name] = params
            out.append(task)
        return out


def _matches(row: Mapping[str, Scalar], pattern: Mapping[str, Scalar]) -> bool:
    return all(k in row and str(row[k]) == str(v) for k, v in pattern.items())


def _slug(v: Scalar) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", str(v)).strip("-") or "x"


def _fmt(params: Mapping[str, Scalar]) -> str:
    return ", ".join(f"{k}={v}" for k, v in params.items()) or "no parameters"


def _fill(value: Any, params: Mapping[str, Scalar], source: str) -> Any:
    if isinstance(value, str):

        def sub(m: re.Match[str]) -> str:
            key = m.group(1)
            if key not in params:
                raise TaskError(
                    f"{source}: placeholder {{{{ {key} }}}} is not a matrix parameter "
                    f"(have: {', '.join(params) or 'none'})"
                )
            return str(params[key])

        return _PLACEHOLDER.sub(sub, value)
    if isinstance(value, dict):
        return {k: _fill(v, params, source) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill(v, params, source) for v in value]
    return value


def load_sweep(path: str | Path, overrides: Sequence[str] = ()) -> Sweep:
    """Load a sweep file. ``task`` is an inline template or the path of a task file;
    ``overrides`` (``--set``) apply to the task template."""
    p = Path(path)
    data = read_yaml(p)
    task = data.get("task")
    base = p.resolve().parent
    if isinstance(task, str):
        tpath = (base / task).resolve()
        data["task"] = read_yaml(tpath)
        base = tpath.parent
    if isinstance(data.get("task"), dict):
        data["task"] = apply_overrides(data["task"], overrides, str(p))
    try:
        sweep = Sweep.model_validate(data)
    except ValidationError as e:
        raise explain_validation(e, Sweep, str(p)) from None
    sweep.base_dir = str(base)
    sweep.tasks()  # every row must give a valid task before anything is rented
    return sweep


# -- running ----------------------------------------------------------------------------------


class SweepRow(BaseModel):
    """One task of a sweep, as ``--status`` and the summary show it."""

    task: str
    state: str
    instance: str | None = None
    provider: str | None = None
    job: str | None = None
    exit_code: int | None = None
    cost: float = 0.0
    attempts: int = 0
    error: str | None = None
    results_dir: str | None = None


class SweepResult(BaseModel):
    """How a sweep ended: one row per task, the total cost, and what leaked (nothing, we hope)."""

    sweep: str
    rows: list[SweepRow]
    total_cost: float
    leaked: list[str] = Field(default_factory=list)
    skipped: list[str] = Field(default_factory=list)

    @property
    def exit_code(self) -> int:
        """0 when every task succeeded and nothing leaked."""
        if self.leaked:
            return 5
        return 0 if all(r.state == "succeeded" for r in self.rows) else EXIT_FAILED


def row_of(rec: LaunchRecord | None, task: str) -> SweepRow:
    """A status row from a launch record (``pending`` when the task never started)."""
    if rec is None:
        return SweepRow(task=task, state="pending")
    state = rec.state
    if state in ACTIVE and not rec.holder_alive and state != "detached":
        state = f"{state} (orphaned)"
    return SweepRow(
        task=task,
        state=state,
        instance=rec.instances[0] if rec.instances else None,
        provider=rec.provider,
        job=rec.job_ids[0] if rec.job_ids else None,
        exit_code=rec.exit_code,
        cost=rec.cost,
        attempts=rec.attempts,
        error=rec.error,
        results_dir=rec.results_dir,
    )


def sweep_status(
    store: LaunchStore, sweep: str, tasks: Sequence[str] | None = None
) -> list[SweepRow]:
    """One row per task of ``sweep`` (the newest launch of each)."""
    latest: dict[str, LaunchRecord] = {}
    for rec in store.of_sweep(sweep):
        latest[rec.name] = rec
    names = list(tasks) if tasks is not None else list(latest)
    return [row_of(latest.get(n), n) for n in names]


EventFn = Callable[[str, str, str], None]


class SweepRunner:
    """Run (or resume) a sweep. ``on_event(task, stage, detail)`` gets every stage line."""

    def __init__(
        self,
        client: GPUClient,
        sweep: Sweep,
        *,
        results_dir: str | Path = "results",
        max_parallel: int | None = None,
        retry_failed: bool = False,
        keep: bool = False,
        on_event: EventFn | None = None,
        store: LaunchStore | None = None,
        start_delay: float = 0.0,
    ) -> None:
        self.client = client
        self.sweep = sweep
        self.results_dir = Path(results_dir)
        self.max_parallel = max_parallel or sweep.max_parallel
        self.retry_failed = retry_failed
        self.keep = keep
        self.on_event: EventFn = on_event or (lambda t, s, d: None)
        self.store = store or LaunchStore.default(client.settings.state_dir)
        self.start_delay = start_delay
        self.cancel = threading.Event()

    def _decide(self, task: Task, rec: LaunchRecord | None) -> str:
        """run | attach | skip-done | skip-failed | skip-held."""
        if rec is None:
            return "run"
        if rec.state == "succeeded":
            return "skip-done"
        if rec.state in ("failed", "no_offer", "bad_input"):
            return "run" if self.retry_failed else "skip-failed"
        if rec.state == "cancelled":
            return "run"
        if rec.holder_alive and rec.state != "detached":
            return "skip-held"
        if rec.job_ids and rec.state in ("running", "pulling", "detached"):
            return "attach"
        return "run"

    def _close_leftovers(self, task: Task) -> None:
        """Terminate boxes a killed sweep rented for ``task`` but never started a job on."""
        for e in self.client.journal.open_entries():
            if e.sweep == self.sweep.name and e.tag == task.name:
                self.on_event(task.name, "resume", f"terminating leftover box {e.name}")
                try:
                    self.client.terminate(e.name)
                except BrokerError as err:
                    self.on_event(task.name, "resume", f"could not terminate {e.name}: {err}")

    def _one(self, task: Task, action: str, rec: LaunchRecord | None) -> LaunchResult:
        launch = Launch(
            self.client,
            task,
            results_dir=self.results_dir,
            keep=self.keep,
            sweep=self.sweep.name,
            on_event=lambda stage, detail: self.on_event(task.name, stage, detail),
            cancel=self.cancel,
            store=self.store,
            stream=False,
        )
        if action == "attach" and rec is not None:
            try:
                return launch.attach(rec)
            except LaunchError as e:
                self.on_event(task.name, "attach", f"{e}; starting over")
        self._close_leftovers(task)
        return launch.run()

    def run(self) -> SweepResult:
        """Run every task that is not done; returns the summary (leak check included)."""
        tasks = self.sweep.tasks()
        latest = {r.name: r for r in self.store.of_sweep(self.sweep.name)}
        plan = [(t, self._decide(t, latest.get(t.name))) for t in tasks]
        skipped = []
        todo = []
        for t, action in plan:
            if action.startswith("skip"):
                why = {
                    "skip-done": "done",
                    "skip-failed": "failed (use --retry-failed)",
                    "skip-held": "running in another process",
                }[action]
                self.on_event(t.name, "skip", why)
                skipped.append(t.name)
            else:
                todo.append((t, action))
        futures: dict[str, Future[LaunchResult]] = {}
        errors: dict[str, str] = {}
        try:
            with ThreadPoolExecutor(
                max_workers=self.max_parallel, thread_name_prefix="broker-sweep"
            ) as pool:
                for i, (t, action) in enumerate(todo):
                    if i and self.start_delay > 0 and self.cancel.wait(self.start_delay):
                        break
                    futures[t.name] = pool.submit(self._one, t, action, latest.get(t.name))
                # A timed wait keeps the main thread returning to Python, so Ctrl-C/SIGTERM
                # reach it promptly.
                while not all(f.done() for f in futures.values()):
                    time.sleep(0.2)
                for name, f in futures.items():
                    try:
                        res = f.result()
                        self.on_event(name, "done", f"{res.state} (exit {res.exit_code})")
                    except LaunchError as e:
                        errors[name] = str(e)
                        self.on_event(name, "failed", str(e).splitlines()[0])
                    except BrokerError as e:
                        errors[name] = str(e)
                        self.on_event(name, "failed", str(e).splitlines()[0])
        except KeyboardInterrupt:
            self.cancel.set()
            self.on_event("sweep", "interrupted", "stopping every task and terminating its box")
            self._drain(futures)
            raise
        return self.summary([t.name for t in tasks], skipped)

    def _drain(self, futures: Mapping[str, Future[LaunchResult]]) -> None:
        """After a cancel: let workers clean up, then terminate whatever is still open."""
        deadline = time.monotonic() + 120.0
        while time.monotonic() < deadline and not all(f.done() for f in futures.values()):
            with contextlib.suppress(KeyboardInterrupt):
                time.sleep(0.2)
        if not self.keep:
            for e in self.client.journal.open_entries():
                if e.sweep == self.sweep.name:
                    with contextlib.suppress(BrokerError):
                        self.client.terminate(e.name)

    def summary(self, names: Sequence[str], skipped: Sequence[str] = ()) -> SweepResult:
        """Rows, total cost and the leak check for this sweep."""
        rows = sweep_status(self.store, self.sweep.name, names)
        return SweepResult(
            sweep=self.sweep.name,
            rows=rows,
            total_cost=round(sum(r.cost for r in rows), 6),
            leaked=leak_check(self.client, self.sweep.name),
            skipped=list(skipped),
        )


def leak_check(client: GPUClient, sweep: str) -> list[str]:
    """Instances of ``sweep`` still open in the journal or still alive at their provider.

    Detached launches are not leaks: their boxes are meant to outlive the sweep process."""
    leaked: list[str] = []
    for e in client.journal.all_entries():
        if e.sweep != sweep:
            continue
        if e.is_open:
            if e.owner is None and e.instance_id is not None:
                continue  # detached on purpose (--detach); `broker launch --attach` ends it
            leaked.append(f"{e.name} (open in the journal: {e.status})")
            continue
        if e.instance_id is None:
            continue
        try:
            inst = client.get_provider(e.provider).get(e.instance_id)
        except NotFoundError:
            continue
        except BrokerError as err:
            leaked.append(f"{e.name} (could not check at {e.provider}: {err})")
            continue
        if inst.status is not InstanceStatus.TERMINATED:
            leaked.append(f"{e.name} ({e.provider} says {inst.status.value})")
    return leaked
