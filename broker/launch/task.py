"""The task spec: what to rent, what to push, what to run, what to bring back.

A :class:`Task` is built in Python or loaded from YAML (:func:`load_task`); every field is checked
before anything is rented, and an unknown key is an error naming the key with a did-you-mean.
``docs/launch.md`` documents the schema.
"""

from __future__ import annotations

import difflib
import posixpath
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from broker.errors import ConfigError, QueryError

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
#: Operators a builder-form value may start with (``vram: ">=80GB"``).
_OPS = ("~", ">=", "<=", "!=", ">", "<", "=")
#: Keys whose --set value is taken as text, never parsed as YAML.
_TEXT_KEYS = {"name", "run", "setup", "workdir", "expected_duration", "resources.ttl"}


def _inside(path: str, item: str, where: str) -> str:
    """``path`` normalised; a ValueError when it is empty, absolute or climbs out with ``..``."""
    if not path.strip():
        raise ValueError(f"output {item!r} has an empty path")
    if path.startswith(("/", "~")):
        raise ValueError(f"{item!r} is absolute: outputs are paths inside the {where}")
    norm = posixpath.normpath(path)
    if norm == ".." or norm.startswith("../"):
        raise ValueError(f"{item!r} escapes the {where}: outputs are paths inside it")
    return norm


def split_output(item: str) -> tuple[str, str]:
    """``"remote"`` → (remote, remote); ``"remote:local"`` → (remote, local); ``local`` is
    relative to ``<results>/<task>/`` (``.`` = the folder itself)."""
    src, sep, dest = item.partition(":")
    return src, (dest if sep else src)


class TaskError(ConfigError):
    """A task or sweep file (or a ``--set`` override) is invalid; the message names the key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False, validate_assignment=True)


def _query_text(q: str | dict[str, Any] | None) -> str:
    if q is None:
        return ""
    if isinstance(q, str):
        return q
    parts: list[str] = []
    for key, value in q.items():
        if isinstance(value, bool):
            parts.append(key if value else f"!{key}")
        elif isinstance(value, list | tuple):
            parts.append(f"{key} in [{', '.join(str(x) for x in value)}]")
        elif isinstance(value, str) and value.strip().startswith(_OPS):
            parts.append(f"{key}{value.strip()}")
        else:
            parts.append(f"{key}={value}")
    return " ".join(parts)


class Resources(_Strict):
    """What to rent. ``query`` is a query string (``docs/query.md``) or its builder form: a
    mapping of field to value or condition, e.g. ``{gpu: "~A100", vram: ">=80GB", spot: false}``.
    """

    query: str | dict[str, Any] | None = None
    gpus: int | None = Field(default=None, ge=1, le=64)
    ttl: str | None = None
    max_price: float | None = Field(default=None, gt=0, le=10_000)
    providers: list[str] | None = None
    image: str | None = None
    disk: int | None = Field(default=None, ge=1, le=65_536, description="disk in GB")
    spot: bool | None = None
    n_offers: int = Field(default=3, ge=1, le=20)
    ready_timeout: float | None = Field(default=None, gt=0, le=86_400)

    @field_validator("ttl", mode="before")
    @classmethod
    def _ttl(cls, v: object) -> object:
        if v is None:
            return None
        from broker.lifecycle import parse_ttl

        try:
            parse_ttl(v if isinstance(v, int | float | str) else str(v))
        except ConfigError as e:
            raise ValueError(e.message) from None
        return str(v)

    @field_validator("query", mode="before")
    @classmethod
    def _query(cls, v: object) -> object:
        if v is None or isinstance(v, str | dict):
            return v
        from broker.query import Query, to_text
        from broker.query.builder import FieldRef
        from broker.query.ir import And, Between, Cmp, Contains, Flag, In, Not, Or

        if isinstance(v, FieldRef):
            v = v.as_expr()
        if isinstance(v, Cmp | Contains | In | Between | Flag | Not | And | Or):
            v = Query(v)
        if isinstance(v, Query):
            return to_text(v)
        raise ValueError("must be a query string, a mapping of field to condition, or a Query")

    @field_validator("query", mode="after")
    @classmethod
    def _parses(cls, v: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
        text = _query_text(v)
        if text:
            from broker.query import parse

            try:
                parse(text)
            except QueryError as e:
                raise ValueError(f"bad query {text!r}: {e}") from None
        return v

    def query_text(self) -> str:
        """The query in the string language (the builder form rendered)."""
        return _query_text(self.query)


class Retries(_Strict):
    """When to rent another box and start over.

    ``max`` new boxes at most, after: no capacity anywhere, the box being preempted, or the box
    being lost (unreachable and gone at the provider, or rebooted under the job). The job's own
    non-zero exit is retried only with ``on_job_failure``.
    """

    max: int = Field(default=2, ge=0, le=20)
    on_job_failure: bool = False


class Task(_Strict):
    """One job on one rented box (or ``nodes`` boxes).

    Launching it rents, pushes ``workdir``, runs ``setup`` once per box, runs ``run`` as a
    detached job, pulls ``outputs`` back and terminates.
    """

    name: str
    resources: Resources = Field(default_factory=Resources)
    workdir: str | None = "."
    bootstrap: bool | Literal["auto"] = "auto"
    extras: list[str] = Field(default_factory=list)
    setup: str | None = None
    run: str
    env: dict[str, str] = Field(default_factory=dict)
    secrets: list[str] = Field(default_factory=list)
    #: Paths (relative to the workdir) pulled back after the run; ``src:dest`` puts ``src``
    #: at ``<results>/<task>/<dest>`` (``dest`` ``.``: its contents right in that folder).
    outputs: list[str] = Field(default_factory=list)
    retries: Retries = Field(default_factory=Retries)
    expected_duration: str | None = None
    nodes: int = Field(default=1, ge=1, le=64)
    engine: Literal["shell", "torchrun"] = "shell"
    nproc_per_node: int | None = Field(default=None, ge=1, le=64)
    outputs_from: Literal["rank0", "all"] = "rank0"
    #: Where the file was loaded from (relative workdirs resolve against it); not a YAML key.
    base_dir: str | None = Field(default=None, exclude=True)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError(
                f"{v!r} is not a usable name: use 1-63 letters, digits, '.', '_' or '-', "
                "starting with a letter or digit"
            )
        return v

    @field_validator("run")
    @classmethod
    def _run(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("is empty: give the command the job runs")
        return v

    @field_validator("retries", mode="before")
    @classmethod
    def _retries(cls, v: object) -> object:
        return {"max": v} if isinstance(v, int) and not isinstance(v, bool) else v

    @field_validator("env", mode="before")
    @classmethod
    def _env(cls, v: object) -> object:
        if isinstance(v, Mapping):
            out: dict[str, str] = {}
            for k, val in v.items():
                if not isinstance(k, str) or not _ENV_NAME.match(k):
                    raise ValueError(f"{k!r} is not an environment variable name")
                if isinstance(val, bool | dict | list) or val is None:
                    raise ValueError(f"{k}: give a string or number, not {val!r}")
                out[k] = str(val)
            return out
        return v

    @field_validator("secrets")
    @classmethod
    def _secrets(cls, v: list[str]) -> list[str]:
        for k in v:
            if not _ENV_NAME.match(k):
                raise ValueError(f"{k!r} is not an environment variable name")
        return v

    @field_validator("outputs")
    @classmethod
    def _outputs(cls, v: list[str]) -> list[str]:
        clean = []
        for item in v:
            src, sep, dest = item.partition(":")
            src_n = _inside(src, item, "workdir")
            if src_n == ".":
                raise ValueError(
                    f"{item!r} is the whole workdir: name the files or folders to pull"
                )
            if sep:
                clean.append(f"{src_n}:{_inside(dest, item, 'results folder')}")
            else:
                clean.append(src_n)
        return clean

    @field_validator("expected_duration")
    @classmethod
    def _duration(cls, v: str | None) -> str | None:
        if v is not None:
            from broker.lifecycle import parse_ttl

            try:
                parse_ttl(v)
            except ConfigError as e:
                raise ValueError(e.message) from None
        return v

    @model_validator(mode="after")
    def _checks(self) -> Task:
        if self.nproc_per_node is not None and self.engine != "torchrun":
            raise ValueError("nproc_per_node is only used with engine: torchrun")
        return self

    # -- derived --------------------------------------------------------------------------------
    def workdir_path(self) -> Path | None:
        """The local project directory to push (None: push nothing)."""
        if self.workdir is None:
            return None
        p = Path(self.workdir).expanduser()
        if not p.is_absolute():
            p = Path(self.base_dir or ".") / p
        return p.resolve()

    def expected_seconds(self) -> float | None:
        """The expected run time in seconds, if the task says."""
        from broker.lifecycle import parse_ttl

        return None if self.expected_duration is None else parse_ttl(self.expected_duration)

    def to_yaml(self) -> str:
        """The task as YAML (what :func:`load_task` reads back)."""
        data = self.model_dump(mode="json", exclude_defaults=True)
        data["name"], data["run"] = self.name, self.run
        return yaml.safe_dump(data, sort_keys=False)


# -- loading ----------------------------------------------------------------------------------


def _fields_of(model: type[BaseModel], loc: Sequence[int | str]) -> list[str]:
    """The field names valid at ``loc`` (for did-you-mean on an unknown key)."""
    current: Any = model
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        info = current.model_fields.get(part) if hasattr(current, "model_fields") else None
        ann = getattr(info, "annotation", None)
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            current = ann
        else:
            return []
    return list(getattr(current, "model_fields", {}))


def explain_validation(err: ValidationError, model: type[BaseModel], source: str) -> TaskError:
    """One line for a pydantic error's first problem: the key, what was wrong, what is right."""
    e = err.errors()[0]
    loc = [p for p in e["loc"] if not (isinstance(p, str) and p.startswith("function-"))]
    key = ".".join(str(p) for p in loc) or "(top level)"
    kind = e["type"]
    if kind == "extra_forbidden":
        valid = [f for f in _fields_of(model, loc) if f != "base_dir"]
        close = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.5)
        parent = ".".join(str(p) for p in loc[:-1] if isinstance(p, str))
        full = [f"{parent}.{c}" if parent else c for c in close]
        hint = f"; did you mean {full[0]!r}?" if full else f"; valid keys: {', '.join(valid)}"
        return TaskError(f"{source}: unknown key {key!r}{hint}")
    if kind == "missing":
        return TaskError(f"{source}: {key!r} is required")
    msg = str(e["msg"]).removeprefix("Value error, ")
    return TaskError(f"{source}: {key}: {msg}")


def _set_dotted(data: dict[str, Any], key: str, value: Any, source: str) -> None:
    parts = key.split(".")
    if not all(parts):
        raise TaskError(f"{source}: cannot read --set key {key!r}; use e.g. resources.gpus=2")
    cur = data
    for p in parts[:-1]:
        nxt = cur.get(p)
        if nxt is None:
            nxt = cur[p] = {}
        if not isinstance(nxt, dict):
            raise TaskError(f"{source}: --set {key}: {p!r} is not a section")
        cur = nxt
    cur[parts[-1]] = value


def apply_overrides(data: dict[str, Any], overrides: Sequence[str], source: str) -> dict[str, Any]:
    """Apply ``key=value`` overrides (dotted keys, YAML values) to a task mapping."""
    out = dict(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise TaskError(f"--set {item!r}: use key=value, e.g. --set resources.gpus=2")
        key = key.strip()
        value: Any = raw
        if key not in _TEXT_KEYS:  # shell text stays text: `--set run=true` is the command
            try:
                value = yaml.safe_load(raw) if raw.strip() else ""
            except yaml.YAMLError:
                value = raw
        _set_dotted(out, key, value, source)
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML file's top-level mapping, with one-line errors for unreadable files."""
    p = Path(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise TaskError(f"{p}: no such file") from None
    except OSError as e:
        raise TaskError(f"{p}: cannot read it ({e.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or "invalid YAML"
        raise TaskError(f"{p}: not valid YAML{where}: {problem}") from None
    if not isinstance(data, dict):
        raise TaskError(f"{p}: expected a mapping of keys (name:, run:, ...) at the top level")
    return data


def task_from_dict(
    data: Mapping[str, Any], *, source: str = "task", base_dir: str | Path | None = None
) -> Task:
    """Validate a task mapping (as read from YAML); errors are :class:`TaskError` naming the key."""
    try:
        task = Task.model_validate(dict(data))
    except ValidationError as e:
        raise explain_validation(e, Task, source) from None
    task.base_dir = str(base_dir) if base_dir is not None else None
    return task


def load_task(path: str | Path, overrides: Sequence[str] = ()) -> Task:
    """Load a task file; ``overrides`` are ``key=value`` strings (the CLI's ``--set``)."""
    p = Path(path)
    data = apply_overrides(read_yaml(p), overrides, str(p))
    return task_from_dict(data, source=str(p), base_dir=p.resolve().parent)
