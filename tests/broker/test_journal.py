"""The SQLite journal: intent before create, transitions, concurrency across processes."""

from __future__ import annotations

import multiprocessing as mp
from datetime import timedelta
from pathlib import Path

import pytest

from broker.journal import NAME_PREFIX, Journal
from broker.types import GPUOffer, InstanceStatus, Manufacturer


def offer(price: float = 2.0) -> GPUOffer:
    return GPUOffer(
        provider="runpod",
        offer_id="NVIDIA A100-SXM4-80GB",
        gpu_type="A100 SXM 80GB",
        gpu_provider_name="NVIDIA A100-SXM4-80GB",
        manufacturer=Manufacturer.NVIDIA,
        gpu_known=True,
        gpu_count=2,
        vram_gb=80,
        price_per_hour=price,
        source="t",
    )


def test_lifecycle_of_an_entry(tmp_path: Path) -> None:
    with Journal(tmp_path / "j.sqlite") as j:
        name = j.record_intent(offer(), ttl_seconds=3600, sweep="s1", tag="01")
        assert (
            name.startswith(f"{NAME_PREFIX}{j.journal_id}-") and len(name) == len(NAME_PREFIX) + 17
        )
        e = j.get(name)
        assert e is not None
        assert (e.status, e.instance_id, e.provider, e.gpu_count) == ("intent", None, "runpod", 2)
        left = e.ttl_left()
        assert left is not None and timedelta(minutes=59) < left <= timedelta(hours=1)
        assert [x.name for x in j.open_entries()] == [name]

        j.record_created(name, "pod-123", InstanceStatus.PROVISIONING)
        j.record_status(name, InstanceStatus.RUNNING, ssh_target="root@1.2.3.4:22022")
        j.record_status(name, InstanceStatus.RUNNING)  # no change: no event
        found = j.find("runpod", "pod-123")
        assert found is not None and found.ssh_target == "root@1.2.3.4:22022"
        assert found.running_at is not None

        j.record_terminated(name, "confirmed gone")
        e = j.get(name)
        assert e is not None and not e.is_open and e.ended_at is not None
        assert j.open_entries() == []
        assert [s for _, s, _ in j.events(name)] == [
            "intent",
            "provisioning",
            "running",
            "terminated",
        ]
        assert [x.name for x in j.all_entries(sweep="s1")] == [name]
        assert j.all_entries(sweep="other") == []


def test_failed_create_closes_entry_and_costs_nothing(tmp_path: Path) -> None:
    with Journal(tmp_path / "j.sqlite") as j:
        name = j.record_intent(offer(price=0.0))
        j.record_failed(name, "NoCapacityError: none left")
        e = j.get(name)
        assert e is not None and not e.is_open
        assert j.estimated_spend() == 0.0
        assert j.events(name)[-1][1:] == ("create_failed", "NoCapacityError: none left")


def test_unknown_name_is_an_error(tmp_path: Path) -> None:
    with Journal(tmp_path / "j.sqlite") as j, pytest.raises(KeyError):
        j.record_status("broker-nope", InstanceStatus.RUNNING)


def _writer(path: str, n: int, q: mp.Queue[list[str]]) -> None:
    names = []
    with Journal(path) as j:
        for i in range(n):
            name = j.record_intent(offer())
            j.record_created(name, f"id-{name}", InstanceStatus.STARTING)
            if i % 2:
                j.record_terminated(name)
            names.append(name)
    q.put(names)


def test_concurrent_processes_lose_nothing(tmp_path: Path) -> None:
    path = str(tmp_path / "shared.sqlite")
    Journal(path).close()
    ctx = mp.get_context("spawn")
    q: mp.Queue[list[str]] = ctx.Queue()
    procs = [ctx.Process(target=_writer, args=(path, 25, q)) for _ in range(4)]
    for p in procs:
        p.start()
    names = [n for _ in procs for n in q.get(timeout=120)]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    with Journal(path) as j:
        entries = j.all_entries()
        assert sorted(e.name for e in entries) == sorted(names)
        assert len(names) == 100 == len(set(names))
        assert len(j.open_entries()) == 52  # indices 0,2,..,24 of each writer stay open
        assert all(e.instance_id == f"id-{e.name}" for e in entries)


# -- issue 16.7 / 16.8 -----------------------------------------------------------------------------


def test_a_corrupt_journal_is_one_clear_error(tmp_path: Path) -> None:
    from broker.errors import JournalError

    path = tmp_path / "journal.sqlite"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(JournalError) as e:
        Journal(path)
    assert str(path) in str(e.value) and "corrupt" in str(e.value)
    assert "\n" not in str(e.value)


def test_a_state_dir_that_is_a_file_is_a_config_error(tmp_path: Path) -> None:
    from broker.errors import ConfigError

    (tmp_path / "state").write_text("")
    with pytest.raises(ConfigError) as e:
        Journal(tmp_path / "state" / "journal.sqlite")
    assert "not a directory" in str(e.value)


def test_a_locked_journal_is_one_clear_error(tmp_path: Path) -> None:
    import sqlite3

    from broker.errors import JournalError

    with Journal(tmp_path / "j.sqlite", timeout=0.2) as j:
        name = j.record_intent(offer())
        other = sqlite3.connect(tmp_path / "j.sqlite", isolation_level=None)
        other.execute("BEGIN EXCLUSIVE")  # e.g. another process mid-write
        try:
            with pytest.raises(JournalError) as e:
                j.record_terminate_requested(name)
            assert "locked" in str(e.value)
        finally:
            other.execute("ROLLBACK")
            other.close()


def test_record_status_checks_and_writes_in_one_transaction(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Another process closed the entry after this one read it: the stale read must not win.
    with Journal(tmp_path / "j.sqlite") as j:
        name = j.record_intent(offer())
        j.record_created(name, "pod-1", InstanceStatus.RUNNING)
        stale = j.get(name)
        j.record_terminated(name, "closed elsewhere")
        monkeypatch.setattr(Journal, "get", lambda self, n: stale)
        j.record_status(name, InstanceStatus.RUNNING)
        monkeypatch.undo()
        entry = j.get(name)
        assert entry is not None and entry.status == "terminated" and entry.state == "closed"


def test_names_carry_the_journal_id(tmp_path: Path) -> None:
    from broker.journal import name_journal_id

    with Journal(tmp_path / "a.sqlite") as a, Journal(tmp_path / "b.sqlite") as b:
        assert a.journal_id != b.journal_id
        name = a.new_instance_name("My Run")
        assert a.owns(name) and not b.owns(name) and name.endswith("-my-run")
        assert name_journal_id(name) == a.journal_id
        assert name_journal_id("broker-0123456789") is None  # older names carry none
    with Journal(tmp_path / "a.sqlite") as again:
        assert again.journal_id == a.journal_id  # stable across opens


def test_budget_sets_a_ttl_that_fits_what_is_left(tmp_path: Path) -> None:
    from broker.errors import BudgetExceededError

    with Journal(tmp_path / "j.sqlite") as j:
        first = j.get(j.record_intent(offer(2.0), budget=3.0))  # $3 at $2/h: 1.5 h
        assert first is not None and first.ttl_seconds == 5400
        with pytest.raises(BudgetExceededError):
            j.record_intent(offer(2.0), budget=3.0)  # nothing left
        assert j.committed_spend() <= 3.0


def test_threads_asking_a_new_client_for_its_journal_share_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A multi-node launch or a sweep asks one client for its journal from many threads at
    once: exactly one journal is opened (two connections creating one new SQLite file together
    can see it locked), and every thread gets that one."""
    import threading
    import time

    from broker import GPUClient
    from broker.config import Settings

    opened: list[Journal] = []
    real_default = Journal.default

    def slow_default(state_dir: Path) -> Journal:
        time.sleep(0.05)  # widen the window a racing second open would need
        j = real_default(state_dir)
        opened.append(j)
        return j

    monkeypatch.setattr(Journal, "default", staticmethod(slow_default))
    client = GPUClient(Settings(state_dir=tmp_path / "state"), providers=["local"])
    got: list[Journal] = []
    start = threading.Barrier(8)

    def ask() -> None:
        start.wait()
        got.append(client.journal)

    threads = [threading.Thread(target=ask) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(opened) == 1
    assert len(got) == 8 and all(j is opened[0] for j in got)
    client.close()
