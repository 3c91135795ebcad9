"""Launch records: which box each launch rented, which job runs there, where its results went.

A small SQLite table beside the instance journal (``<state dir>/launches.sqlite``). It is what
lets ``broker launch --attach NAME`` and a resumed sweep pick up a job from another process, and
what ``broker instances list`` reads to show what each box is doing. The instance journal stays
the authority on what may bill; these records only point into it (by instance name).
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from broker.errors import ConfigError
from broker.types import utcnow

_SCHEMA = """
CREATE TABLE IF NOT EXISTS launches (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    name         TEXT NOT NULL,
    sweep        TEXT,
    state        TEXT NOT NULL,
    task_json    TEXT NOT NULL,
    instances    TEXT NOT NULL DEFAULT '[]',
    provider     TEXT,
    targets      TEXT NOT NULL DEFAULT '[]',
    workspace    TEXT,
    job_ids      TEXT NOT NULL DEFAULT '[]',
    exit_code    INTEGER,
    results_dir  TEXT,
    error        TEXT,
    attempts     INTEGER NOT NULL DEFAULT 0,
    cost         REAL NOT NULL DEFAULT 0,
    price_per_hour REAL,
    holder_pid   INTEGER,
    created_at   TEXT NOT NULL,
    updated_at   TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS launches_name ON launches(name);
CREATE INDEX IF NOT EXISTS launches_sweep ON launches(sweep);
"""

#: States after which a launch holds no box and will not change by itself.
FINAL = {"succeeded", "failed", "cancelled", "no_offer", "bad_input"}
#: States in which a launch may hold a box.
ACTIVE = {
    "planned",
    "provisioning",
    "pushing",
    "setup",
    "running",
    "pulling",
    "terminating",
    "detached",
}

_LIST_FIELDS = ("instances", "targets", "job_ids")


class LaunchRecord(BaseModel):
    """One launch of one task (one row)."""

    id: int
    name: str
    sweep: str | None = None
    state: str
    task_json: str
    instances: list[str] = Field(default_factory=list)
    provider: str | None = None
    targets: list[str] = Field(default_factory=list)
    workspace: str | None = None
    job_ids: list[str] = Field(default_factory=list)
    exit_code: int | None = None
    results_dir: str | None = None
    error: str | None = None
    attempts: int = 0
    cost: float = 0.0
    price_per_hour: float | None = None
    holder_pid: int | None = None
    created_at: str
    updated_at: str

    @property
    def final(self) -> bool:
        """True once the launch is over (nothing to attach to, nothing billing)."""
        return self.state in FINAL

    @property
    def holder_alive(self) -> bool:
        """True when the process that holds this launch is still running on this machine."""
        if self.holder_pid is None:
            return False
        try:
            os.kill(self.holder_pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


class LaunchStore:
    """The launch records table. Thread-safe; several processes may share the file (WAL)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._conn = sqlite3.connect(
                str(self.path), timeout=30.0, check_same_thread=False, isolation_level=None
            )
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.executescript(_SCHEMA)
        except (OSError, sqlite3.Error) as e:
            raise ConfigError(f"cannot open the launch records at {self.path}: {e}") from None
        self._lock = threading.RLock()

    @classmethod
    def default(cls, state_dir: str | Path) -> LaunchStore:
        """The store in broker's state directory."""
        return cls(Path(state_dir) / "launches.sqlite")

    def close(self) -> None:
        """Close the database connection."""
        self._conn.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                self._conn.execute("BEGIN IMMEDIATE")
                yield self._conn
                self._conn.execute("COMMIT")
            except sqlite3.Error as e:
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                raise ConfigError(f"launch records at {self.path}: {e}") from None
            except BaseException:
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                raise

    def _row(self, row: sqlite3.Row | tuple[Any, ...] | None, cols: list[str]) -> LaunchRecord:
        assert row is not None
        data = dict(zip(cols, row, strict=True))
        for f in _LIST_FIELDS:
            data[f] = json.loads(data[f] or "[]")
        return LaunchRecord.model_validate(data)

    def _query(self, sql: str, args: tuple[Any, ...] = ()) -> list[LaunchRecord]:
        with self._lock:
            try:
                cur = self._conn.execute(sql, args)
            except sqlite3.Error as e:
                raise ConfigError(f"launch records at {self.path}: {e}") from None
            cols = [d[0] for d in cur.description]
            return [self._row(r, cols) for r in cur.fetchall()]

    def new(self, name: str, task_json: str, *, sweep: str | None = None) -> LaunchRecord:
        """Record a planned launch; returns it (with its id)."""
        now = utcnow().isoformat()
        with self._tx() as c:
            cur = c.execute(
                "INSERT INTO launches (name, sweep, state, task_json, holder_pid, created_at,"
                " updated_at) VALUES (?, ?, 'planned', ?, ?, ?, ?)",
                (name, sweep, task_json, os.getpid(), now, now),
            )
            rid = int(cur.lastrowid or 0)
        return self.get(rid)

    def update(self, rid: int, **fields: Any) -> LaunchRecord:
        """Set fields of a record (lists are stored as JSON)."""
        if not fields:
            return self.get(rid)
        cols, args = [], []
        for k, v in fields.items():
            if k not in LaunchRecord.model_fields or k in ("id", "created_at"):
                raise ValueError(f"unknown launch record field {k!r}")
            cols.append(f"{k} = ?")
            args.append(json.dumps(v) if k in _LIST_FIELDS else v)
        cols.append("updated_at = ?")
        args.append(utcnow().isoformat())
        with self._tx() as c:
            c.execute(f"UPDATE launches SET {', '.join(cols)} WHERE id = ?", (*args, rid))  # noqa: S608
        return self.get(rid)

    def get(self, rid: int) -> LaunchRecord:
        """The record with this id."""
        rows = self._query("SELECT * FROM launches WHERE id = ?", (rid,))
        if not rows:
            raise ConfigError(f"no launch record {rid}")
        return rows[0]

    def latest(self, name: str, *, sweep: str | None = None) -> LaunchRecord | None:
        """The newest launch of ``name`` (within ``sweep`` when given)."""
        if sweep is None:
            rows = self._query(
                "SELECT * FROM launches WHERE name = ? ORDER BY id DESC LIMIT 1", (name,)
            )
        else:
            rows = self._query(
                "SELECT * FROM launches WHERE name = ? AND sweep = ? ORDER BY id DESC LIMIT 1",
                (name, sweep),
            )
        return rows[0] if rows else None

    def of_sweep(self, sweep: str) -> list[LaunchRecord]:
        """Every launch of a sweep, oldest first."""
        return self._query("SELECT * FROM launches WHERE sweep = ? ORDER BY id", (sweep,))

    def sweeps(self) -> list[str]:
        """Sweep ids, most recent first."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT sweep, MAX(id) FROM launches WHERE sweep IS NOT NULL GROUP BY sweep "
                "ORDER BY MAX(id) DESC"
            ).fetchall()
        return [str(r[0]) for r in rows]

    def all(self) -> list[LaunchRecord]:
        """Every record, oldest first."""
        return self._query("SELECT * FROM launches ORDER BY id")

    def by_instance(self) -> dict[str, LaunchRecord]:
        """The newest launch that used each instance name."""
        out: dict[str, LaunchRecord] = {}
        for r in self.all():
            for name in r.instances:
                out[name] = r
        return out


def activity(state_dir: str | Path) -> dict[str, dict[str, Any]]:
    """What each instance (by journal name) is doing for a launch: task, sweep, state, job.

    Empty when no launch ever ran (the records file is not created just to look)."""
    path = Path(state_dir) / "launches.sqlite"
    if not path.exists():
        return {}
    try:
        store = LaunchStore(path)
    except ConfigError:
        return {}
    try:
        out: dict[str, dict[str, Any]] = {}
        for name, r in store.by_instance().items():
            rank = r.instances.index(name)  # by_instance only maps names the record holds
            out[name] = {
                "task": r.name,
                "sweep": r.sweep,
                "state": r.state,
                "job": r.job_ids[rank] if rank < len(r.job_ids) else None,
            }
        return out
    finally:
        store.close()
