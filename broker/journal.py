"""The journal: a SQLite record of every instance we ever asked for.

The intent is written *before* the provider is called, under a unique name (``broker-<id>``) that
is also sent to the provider as the instance's name/label. So if the client dies at any point of a
create, ``reconcile`` can still find the instance at the provider by that name. WAL mode and a busy
timeout let several broker processes (a sweep) share one journal.

Each journal has a random id (``journal_id``, six hex digits) that is part of every name it hands
out: ``broker-<journal id>-<10 hex>[-label]``. ``reconcile`` treats only instances carrying its own
id as its orphans; others (a colleague's or CI's journal on the same account) are *foreign*.

Each entry walks one state machine, recorded in ``phase`` (and an event per transition)::

    intent → sent → created → ready → terminating → closed

``intent``: written before anything else, nothing sent; ``sent``: the create request is going out
(from here on the provider may have an instance, whatever the answer); ``created``: the provider
gave an id; ``ready``: readiness passed; ``terminating``: a terminate was requested (written
*before* the provider is called, so an interrupted or failed terminate is finished by ``reap`` or
``reconcile``); ``closed``: nothing can bill any more. Every recovery decision reads the phase.
"""

from __future__ import annotations

import contextlib
import json
import re
import secrets
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from broker.errors import BudgetExceededError, ConfigError, JournalError
from broker.types import GPUOffer, InstanceStatus, utcnow

NAME_PREFIX = "broker-"

#: ``broker-<journal id>-<10 hex>[-label]`` (names from before journal ids: ``broker-<10 hex>``).
_NAME_WITH_ID = re.compile(r"broker-([0-9a-f]{6})-[0-9a-f]{10}(?:-|$)")

#: A create that got no answer stays pending (open, counted in the budget) until a provider
#: listing taken this long after the request was sent still lacks it. Providers list a new
#: instance within seconds to a minute; 15 minutes leaves a wide margin.
AMBIGUOUS_GRACE_S = 900.0

#: The least TTL a budget may leave a create (below this the create is refused).
MIN_BUDGET_TTL_S = 300


class Phase:
    """The create/terminate state machine of an entry (``JournalEntry.phase``)."""

    INTENT = "intent"  # written, nothing sent to the provider
    SENT = "sent"  # the create request went out: the provider may have the instance
    CREATED = "created"  # the provider answered with an id
    READY = "ready"  # readiness passed
    TERMINATING = "terminating"  # a terminate was requested (maybe not yet confirmed)
    CLOSED = "closed"  # confirmed gone or never created: nothing bills

    ORDER = (INTENT, SENT, CREATED, READY, TERMINATING, CLOSED)


_SCHEMA = """
CREATE TABLE IF NOT EXISTS instances (
    name            TEXT PRIMARY KEY,
    provider        TEXT NOT NULL,
    instance_id     TEXT,
    status          TEXT NOT NULL,
    gpu_type        TEXT,
    gpu_count       INTEGER,
    price_per_hour  REAL,
    spot            INTEGER NOT NULL DEFAULT 0,
    offer_json      TEXT,
    ssh_target      TEXT,
    ttl_seconds     INTEGER,
    expires_at      TEXT,
    sweep           TEXT,
    tag             TEXT,
    created_at      TEXT NOT NULL,
    updated_at      TEXT NOT NULL,
    running_at      TEXT,
    ended_at        TEXT,
    owner           TEXT
);
CREATE INDEX IF NOT EXISTS instances_provider_id ON instances(provider, instance_id);
CREATE INDEX IF NOT EXISTS instances_status ON instances(status);
CREATE TABLE IF NOT EXISTS events (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    name    TEXT NOT NULL,
    at      TEXT NOT NULL,
    status  TEXT NOT NULL,
    detail  TEXT
);
CREATE INDEX IF NOT EXISTS events_name ON events(name);
CREATE TABLE IF NOT EXISTS cooldowns (
    offer_key   TEXT PRIMARY KEY,
    until       TEXT NOT NULL,
    reason      TEXT
);
CREATE TABLE IF NOT EXISTS meta (
    key     TEXT PRIMARY KEY,
    value   TEXT NOT NULL
);
"""

#: Columns added after the first release, with their SQL types (added on open when missing).
_MIGRATIONS = {"owner": "TEXT", "phase": "TEXT", "sent_at": "TEXT"}

#: Statuses after which an entry is closed (nothing can bill any more).
CLOSED = {InstanceStatus.TERMINATED.value}


class JournalEntry(BaseModel):
    """One instance as the journal knows it."""

    name: str
    provider: str
    instance_id: str | None
    status: str  # an InstanceStatus value, or "intent" before the provider answered
    gpu_type: str | None = None
    gpu_count: int | None = None
    price_per_hour: float | None = None
    spot: bool = False
    ssh_target: str | None = None
    ttl_seconds: int | None = None
    expires_at: datetime | None = None
    sweep: str | None = None
    tag: str | None = None
    created_at: datetime
    updated_at: datetime
    running_at: datetime | None = None
    ended_at: datetime | None = None
    owner: str | None = None
    phase: str | None = None
    sent_at: datetime | None = None
    #: The offer as JSON (see :func:`offer_of`); left out of dumps.
    offer_json: str | None = Field(default=None, exclude=True, repr=False)

    @property
    def state(self) -> str:
        """The entry's :class:`Phase` (derived for entries written before phases existed)."""
        if not self.is_open:
            return Phase.CLOSED
        if self.phase:
            return self.phase
        if self.status == "intent":
            return Phase.INTENT
        if self.status == InstanceStatus.TERMINATING.value:
            return Phase.TERMINATING
        return Phase.CREATED

    @property
    def is_open(self) -> bool:
        """True until the instance is confirmed gone."""
        return self.status not in CLOSED

    def cost_so_far(self, now: datetime | None = None) -> float:
        """Estimated spend: price × time since creation (until it ended)."""
        if self.price_per_hour is None:
            return 0.0
        end = self.ended_at or now or utcnow()
        hours = max(0.0, (end - self.created_at).total_seconds() / 3600)
        return self.price_per_hour * hours

    def ttl_left(self, now: datetime | None = None) -> timedelta | None:
        """Time until the TTL expires (negative when past), or None without a TTL."""
        if self.expires_at is None:
            return None
        return self.expires_at - (now or utcnow())


def new_name(journal_id: str | None = None) -> str:
    """A unique instance name: ``broker-``, the journal's id and 10 random hex digits."""
    if journal_id:
        return f"{NAME_PREFIX}{journal_id}-{secrets.token_hex(5)}"
    return f"{NAME_PREFIX}{secrets.token_hex(5)}"


def name_journal_id(name: str | None) -> str | None:
    """The journal id carried in an instance name, or None (not ours, or an older name)."""
    m = _NAME_WITH_ID.match(name or "")
    return m.group(1) if m else None


def _ts(dt: datetime | None) -> str | None:
    return dt.isoformat() if dt is not None else None


class Journal:
    """SQLite journal at ``<state dir>/journal.sqlite`` (thread-safe; process-safe via WAL)."""

    def __init__(self, path: str | Path, *, timeout: float = 30.0) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise ConfigError(
                f"state dir {self.path.parent} is not a directory (BROKER_STATE_DIR / state_dir)"
            ) from None
        except OSError as e:
            raise JournalError(
                f"cannot create the state dir {self.path.parent}: {e.strerror or e}"
            ) from None
        self._lock = threading.Lock()
        self._closed = False
        with self._guard("open"):
            # isolation_level=None: we issue BEGIN/COMMIT ourselves (see _tx).
            self._conn = sqlite3.connect(
                self.path, timeout=timeout, check_same_thread=False, isolation_level=None
            )
            self._conn.row_factory = sqlite3.Row
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=NORMAL")
            self._conn.execute(f"PRAGMA busy_timeout={int(timeout * 1000)}")
            with self._lock:
                self._conn.executescript(_SCHEMA)
                have = {r["name"] for r in self._conn.execute("PRAGMA table_info(instances)")}
                for col, typ in _MIGRATIONS.items():
                    if col not in have:
                        self._conn.execute(f"ALTER TABLE instances ADD COLUMN {col} {typ}")
                # INSERT OR IGNORE: two processes opening a new journal agree on one id.
                self._conn.execute(
                    "INSERT OR IGNORE INTO meta (key, value) VALUES ('journal_id', ?)",
                    (secrets.token_hex(3),),
                )
                row = self._conn.execute(
                    "SELECT value FROM meta WHERE key = 'journal_id'"
                ).fetchone()
                self.journal_id: str = row["value"]

    @contextmanager
    def _guard(self, what: str) -> Iterator[None]:
        """SQLite and OS errors as one-line :class:`JournalError` naming the file."""
        try:
            yield
        except sqlite3.DatabaseError as e:
            text = str(e)
            if "not a database" in text or "malformed" in text:
                hint = "it is corrupt: move it aside (broker starts a new one) and run reconcile"
            elif "locked" in text or "busy" in text:
                hint = "another broker process holds it locked; retry when it is done"
            else:
                hint = text
            raise JournalError(f"journal {self.path}: cannot {what} ({text}); {hint}") from None
        except OSError as e:
            raise JournalError(f"journal {self.path}: cannot {what} ({e.strerror or e})") from None

    def new_instance_name(self, label: str | None = None) -> str:
        """A fresh unique name carrying this journal's id, plus an optional readable label."""
        base = new_name(self.journal_id)
        if not label:
            return base
        slug = re.sub(r"[^a-z0-9-]+", "-", label.lower()).strip("-")[:24].strip("-")
        return f"{base}-{slug}" if slug else base

    def owns(self, name: str | None) -> bool:
        """Whether an instance name was handed out by this journal (by its journal id)."""
        return name_journal_id(name) == self.journal_id

    @classmethod
    def default(cls, state_dir: str | Path) -> Journal:
        """The journal in a state dir."""
        return cls(Path(state_dir) / "journal.sqlite")

    def close(self) -> None:
        """Close the connection."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self._conn.close()

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        # BEGIN IMMEDIATE takes the write lock up front, so concurrent writers queue on
        # busy_timeout instead of failing with "database is locked" on upgrade.
        with self._guard("write"), self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    # -- writes ---------------------------------------------------------------------------------
    def record_intent(
        self,
        offer: GPUOffer,
        *,
        name: str | None = None,
        ttl_seconds: int | None = None,
        sweep: str | None = None,
        tag: str | None = None,
        owner: str | None = None,
        budget: float | None = None,
        projected_cost: float = 0.0,
    ) -> str:
        """Record that we are about to create an instance from ``offer``; returns its name.

        ``owner`` names the process that holds the instance (see :mod:`broker.lifecycle`); an
        entry without one is detached: it lives until terminated or its TTL passes.

        With a ``budget`` this is *the* budget check, under the journal's write lock so that
        concurrent creates cannot both slip under it. A create without a TTL then gets one:
        the time that what remains of the budget buys at the offer's price (read the chosen
        ``ttl_seconds`` back from the entry), so spend stays within the budget even if no
        broker command ever runs again. A TTL that does not fit is refused.
        """
        name = name or self.new_instance_name()
        now = utcnow()
        ttl_note: str | None = None
        with self._tx() as c:
            if budget is not None:
                rows = c.execute("SELECT * FROM instances").fetchall()
                committed = _committed([JournalEntry.model_validate(dict(r)) for r in rows], now)
                left = budget - committed
                price = offer.price_per_hour
                what = (
                    f"{offer.gpu_count}x {offer.gpu_type} at ${price:.2f}/h"
                    if offer.gpu_count
                    else f"{offer.gpu_type} at ${price:.2f}/h"
                )
                if ttl_seconds is None and price > 0:
                    affordable = int(max(0.0, left) / price * 3600)
                    if affordable < MIN_BUDGET_TTL_S:
                        raise BudgetExceededError(
                            f"budget ${budget:.2f} would be exceeded: ${committed:.2f} spent or "
                            f"committed leaves ${max(0.0, left):.2f}, less than "
                            f"{MIN_BUDGET_TTL_S // 60} minutes of {what}"
                        )
                    ttl_seconds = min(affordable, 365 * 86400)
                    ttl_note = f"ttl {ttl_seconds}s set by the budget (${left:.2f} left)"
                elif committed + projected_cost > budget:
                    raise BudgetExceededError(
                        f"budget ${budget:.2f} would be exceeded: ${committed:.2f} spent or "
                        f"committed + ${projected_cost:.2f} for {what}"
                    )
            expires = now + timedelta(seconds=ttl_seconds) if ttl_seconds else None
            c.execute(
                "INSERT INTO instances (name, provider, status, gpu_type, gpu_count,"
                " price_per_hour, spot, offer_json, ttl_seconds, expires_at, sweep, tag,"
                " created_at, updated_at, owner, phase) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    name,
                    offer.provider,
                    "intent",
                    offer.gpu_type,
                    offer.gpu_count,
                    offer.price_per_hour,
                    int(offer.spot),
                    offer.model_dump_json(),
                    ttl_seconds,
                    _ts(expires),
                    sweep,
                    tag,
                    _ts(now),
                    _ts(now),
                    owner,
                    Phase.INTENT,
                ),
            )
            self._event(c, name, "intent", f"{offer.provider} {offer.offer_id}")
            if ttl_note:
                self._event(c, name, "ttl", ttl_note)
        return name

    def record_sent(self, name: str) -> None:
        """The create request is about to go out: from now on the provider may have it."""
        with self._tx() as c:
            self._update(c, name, phase=Phase.SENT, sent_at=_ts(utcnow()))
            self._event(c, name, Phase.SENT, None)

    def record_created(self, name: str, instance_id: str, status: InstanceStatus) -> None:
        """The provider accepted the create and gave this id (or it was found by name)."""
        with self._tx() as c:
            row = c.execute(
                "SELECT phase, status FROM instances WHERE name = ?", (name,)
            ).fetchone()
            if row is None:
                raise KeyError(name)
            fields: dict[str, Any] = {"instance_id": instance_id}
            # A terminate already requested (a cleanup finding the instance) keeps its phase.
            if row["phase"] not in (Phase.TERMINATING, Phase.CLOSED):
                fields.update(status=status.value, phase=Phase.CREATED)
            self._update(c, name, **fields)
            self._event(c, name, status.value, f"id {instance_id}")

    def record_ready(self, name: str) -> None:
        """Readiness passed."""
        with self._tx() as c:
            self._update(c, name, phase=Phase.READY)
            self._event(c, name, Phase.READY, None)

    def record_terminate_requested(
        self, name: str, detail: str | None = None, *, owner: str | None = None
    ) -> bool:
        """Mark the entry terminating *before* the provider is asked; False if already closed.

        If the process dies or the provider call fails, the entry shows as terminating and
        ``reap``/``reconcile`` finish the job.
        """
        with self._tx() as c:
            row = c.execute(
                "SELECT phase, status FROM instances WHERE name = ?", (name,)
            ).fetchone()
            if row is None:
                raise KeyError(name)
            if row["status"] in CLOSED:
                return False
            # ``owner``: the process finishing the terminate (None: nobody waits for it).
            self._update(
                c,
                name,
                phase=Phase.TERMINATING,
                status=InstanceStatus.TERMINATING.value,
                owner=owner,
            )
            self._event(c, name, "terminate_requested", detail)
        return True

    def record_status(
        self,
        name: str,
        status: InstanceStatus,
        *,
        detail: str | None = None,
        ssh_target: str | None = None,
    ) -> None:
        """A status transition (only written when the status or target changed).

        Checked and written in one transaction: a stale reading from another process can
        neither reopen a closed entry nor undo a requested terminate.
        """
        now = utcnow()
        with self._tx() as c:
            row = c.execute("SELECT * FROM instances WHERE name = ?", (name,)).fetchone()
            if row is None:
                raise KeyError(name)
            entry = JournalEntry.model_validate(dict(row))
            if not entry.is_open:
                return
            closing = status.value in CLOSED
            if entry.state == Phase.TERMINATING and not closing:
                status = InstanceStatus.TERMINATING  # requested: a late "running" is stale
            if entry.status == status.value and (
                ssh_target is None or ssh_target == entry.ssh_target
            ):
                return
            fields: dict[str, Any] = {"status": status.value}
            if ssh_target is not None:
                fields["ssh_target"] = ssh_target
            if status is InstanceStatus.RUNNING and entry.running_at is None:
                fields["running_at"] = _ts(now)
            if closing:
                fields["ended_at"] = _ts(now)
                fields["phase"] = Phase.CLOSED
            self._update(c, name, **fields)
            self._event(c, name, status.value, detail)

    def record_terminated(self, name: str, detail: str | None = None) -> None:
        """The instance is confirmed gone at the provider."""
        self.record_status(name, InstanceStatus.TERMINATED, detail=detail)

    def set_owner(self, name: str, owner: str | None) -> None:
        """Hand the entry to a process (or detach it with ``None``)."""
        with self._tx() as c:
            self._update(c, name, owner=owner)
            self._event(c, name, "owner", owner or "detached")

    def record_event(self, name: str, status: str, detail: str | None = None) -> None:
        """A note in the entry's history that changes no field (e.g. a failed terminate)."""
        with self._tx() as c:
            self._event(c, name, status, detail)

    def record_adopted(
        self,
        *,
        name: str,
        provider: str,
        instance_id: str,
        status: InstanceStatus,
        gpu_type: str | None,
        gpu_count: int | None,
        price_per_hour: float | None,
        created_at: datetime | None,
        detail: str,
    ) -> None:
        """Enter an instance found at a provider but missing here (an orphan), so it is counted."""
        now = utcnow()
        if created_at is not None and created_at.tzinfo is None:
            created_at = created_at.replace(tzinfo=UTC)  # providers that omit the zone mean UTC
        with self._tx() as c:
            c.execute(
                "INSERT OR IGNORE INTO instances (name, provider, instance_id, status, gpu_type,"
                " gpu_count, price_per_hour, created_at, updated_at)"
                " VALUES (?,?,?,?,?,?,?,?,?)",
                (
                    name,
                    provider,
                    instance_id,
                    status.value,
                    gpu_type,
                    gpu_count,
                    price_per_hour,
                    _ts(created_at or now),
                    _ts(now),
                ),
            )
            self._update(
                c,
                name,
                instance_id=instance_id,
                status=status.value,
                phase=Phase.CREATED,
                ended_at=None,
            )
            self._event(c, name, "adopted", detail)

    # -- capacity cool-downs ----------------------------------------------------------------------
    def add_cooldown(self, offer_key: str, seconds: float, reason: str) -> None:
        """Skip this offer for ``seconds`` (it just failed for capacity); shared by processes."""
        until = utcnow() + timedelta(seconds=seconds)
        with self._tx() as c:
            c.execute(
                "INSERT OR REPLACE INTO cooldowns (offer_key, until, reason) VALUES (?,?,?)",
                (offer_key, _ts(until), reason[:300]),
            )

    def cooling(self) -> dict[str, datetime]:
        """Offer keys still cooling down, with when each may be tried again."""
        now = utcnow()
        with self._guard("read"), self._lock:
            rows = self._conn.execute("SELECT offer_key, until FROM cooldowns").fetchall()
        out = {r["offer_key"]: datetime.fromisoformat(r["until"]) for r in rows}
        return {k: v for k, v in out.items() if v > now}

    def record_failed(self, name: str, error: str) -> None:
        """A create that the provider refused: nothing exists, so the entry is closed."""
        with self._tx() as c:
            self._update(
                c,
                name,
                status=InstanceStatus.TERMINATED.value,
                ended_at=_ts(utcnow()),
                phase=Phase.CLOSED,
            )
            self._event(c, name, "create_failed", error[:500])

    def _update(self, c: sqlite3.Connection, name: str, **fields: Any) -> None:
        fields["updated_at"] = _ts(utcnow())
        cols = ", ".join(f"{k} = ?" for k in fields)
        cur = c.execute(f"UPDATE instances SET {cols} WHERE name = ?", (*fields.values(), name))  # noqa: S608 - column names are ours
        if cur.rowcount != 1:
            raise KeyError(name)

    def _event(self, c: sqlite3.Connection, name: str, status: str, detail: str | None) -> None:
        c.execute(
            "INSERT INTO events (name, at, status, detail) VALUES (?,?,?,?)",
            (name, _ts(utcnow()), status, detail),
        )

    # -- reads ----------------------------------------------------------------------------------
    def _rows(self, sql: str, args: tuple[Any, ...] = ()) -> list[JournalEntry]:
        with self._guard("read"), self._lock:
            rows = self._conn.execute(sql, args).fetchall()
        return [JournalEntry.model_validate(dict(r)) for r in rows]

    def get(self, name: str) -> JournalEntry | None:
        """The entry with this unique name."""
        rows = self._rows("SELECT * FROM instances WHERE name = ?", (name,))
        return rows[0] if rows else None

    def find(self, provider: str, instance_id: str) -> JournalEntry | None:
        """The entry for a provider's instance id."""
        rows = self._rows(
            "SELECT * FROM instances WHERE provider = ? AND instance_id = ?",
            (provider, instance_id),
        )
        return rows[0] if rows else None

    def open_entries(self) -> list[JournalEntry]:
        """Entries not yet confirmed gone (intents included), oldest first."""
        marks = ",".join("?" for _ in CLOSED)
        return self._rows(
            f"SELECT * FROM instances WHERE status NOT IN ({marks}) ORDER BY created_at",  # noqa: S608
            tuple(CLOSED),
        )

    def all_entries(self, sweep: str | None = None) -> list[JournalEntry]:
        """Every entry (optionally of one sweep), oldest first."""
        if sweep is None:
            return self._rows("SELECT * FROM instances ORDER BY created_at")
        return self._rows("SELECT * FROM instances WHERE sweep = ? ORDER BY created_at", (sweep,))

    def events(self, name: str) -> list[tuple[datetime, str, str | None]]:
        """The status history of one entry."""
        with self._guard("read"), self._lock:
            rows = self._conn.execute(
                "SELECT at, status, detail FROM events WHERE name = ? ORDER BY id", (name,)
            ).fetchall()
        return [(datetime.fromisoformat(r["at"]), r["status"], r["detail"]) for r in rows]

    def estimated_spend(self) -> float:
        """Sum of cost so far over every entry."""
        return sum(e.cost_so_far() for e in self.all_entries())

    def committed_spend(self) -> float:
        """The budget guard's measure: cost so far of closed entries, and for open ones the
        larger of cost so far and price x TTL (one hour without a TTL): what they will cost
        if nobody stops them earlier."""
        return _committed(self.all_entries(), utcnow())


def _committed(entries: list[JournalEntry], now: datetime) -> float:
    total = 0.0
    for e in entries:
        spent = e.cost_so_far(now)
        if e.is_open and e.price_per_hour is not None:
            spent = max(spent, e.price_per_hour * (e.ttl_seconds or 3600) / 3600)
        total += spent
    return total


def offer_of(entry_json: str | None) -> GPUOffer | None:
    """Decode an entry's stored offer."""
    return GPUOffer.model_validate(json.loads(entry_json)) if entry_json else None
