"""Lifecycle rules against an in-process provider: failover, guards, cleanup, reap, reconcile.

The simulator tests (test_lifecycle_sim.py) cover the same paths over real HTTP and real sshd;
these pin the decision logic precisely and fast.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable
from datetime import timedelta
from typing import ClassVar

import pytest

from broker import GPUClient, load_settings
from broker.errors import (
    BudgetExceededError,
    ConfigError,
    InvalidRequestError,
    NoCapacityError,
    NotFoundError,
    PriceLimitError,
    ProviderUnavailableError,
    ProvisionError,
    ReadinessError,
    TerminateError,
)
from broker.lifecycle import (
    current_owner,
    find_discrepancies,
    fix,
    format_duration,
    owner_alive,
    parse_ttl,
)
from broker.providers.base import Capabilities, Provider
from broker.query import Query
from broker.types import (
    CloudType,
    CreateRequest,
    GPUOffer,
    Instance,
    InstanceStatus,
    Manufacturer,
    utcnow,
)


def offer(offer_id: str, price: float, gpu_count: int = 0) -> GPUOffer:
    return GPUOffer(
        provider="fake",
        offer_id=offer_id,
        gpu_type="CPU only" if gpu_count == 0 else "A100 80GB PCIe",
        gpu_provider_name="none" if gpu_count == 0 else "NVIDIA A100 80GB PCIe",
        manufacturer=Manufacturer.NONE if gpu_count == 0 else Manufacturer.NVIDIA,
        gpu_known=True,
        gpu_count=gpu_count,
        vram_gb=None if gpu_count == 0 else 80,
        price_per_hour=price,
        cloud_type=CloudType.SECURE,
        source="test",
    )


class Fake(Provider):
    """A provider whose instances are this machine (target local) and whose faults are scripted."""

    name: ClassVar[str] = "fake"
    display_name: ClassVar[str] = "Fake"
    capabilities: ClassVar[Capabilities] = Capabilities(requires_api_key=False)

    def __init__(self, offers: list[GPUOffer]) -> None:
        self.offers = offers
        self.instances: dict[str, Instance] = {}
        self.create_calls: list[str] = []
        self.create_faults: dict[str, Callable[[Instance], None]] = {}
        self.terminate_faults = 0
        self.polls_until_gone = 0
        self.lock = threading.Lock()

    @classmethod
    def is_configured(cls, settings: object) -> bool:  # type: ignore[override]
        return True

    @classmethod
    def from_settings(cls, settings: object) -> Fake:  # type: ignore[override]
        raise NotImplementedError

    def search(self, query: Query) -> list[GPUOffer]:
        return list(self.offers)

    def create(self, request: CreateRequest) -> Instance:
        oid = request.offer.offer_id
        self.create_calls.append(oid)
        inst = Instance(
            provider="fake",
            instance_id=f"i-{len(self.create_calls)}",
            name=request.name,
            status=InstanceStatus.RUNNING,
            gpu_type=request.offer.gpu_type,
            gpu_count=request.offer.gpu_count,
            price_per_hour=request.offer.price_per_hour,
            created_at=utcnow(),
            extra={"target": "local"},
        )
        fault = self.create_faults.get(oid)
        if fault is not None:
            fault(inst)  # may raise before or after "creating"
        self.instances[inst.instance_id] = inst
        return inst

    def get(self, instance_id: str) -> Instance:
        inst = self.instances.get(instance_id)
        if inst is None:
            raise NotFoundError(f"no {instance_id}", provider="fake")
        if inst.status is InstanceStatus.TERMINATING:
            if self.polls_until_gone > 0:
                self.polls_until_gone -= 1
                return inst
            del self.instances[instance_id]
            raise NotFoundError(f"no {instance_id}", provider="fake")
        return inst

    def list_instances(self) -> list[Instance]:
        return list(self.instances.values())

    def terminate(self, instance_id: str) -> None:
        if self.terminate_faults > 0:
            self.terminate_faults -= 1
            raise ProviderUnavailableError("API down", provider="fake", status_code=503)
        inst = self.instances.get(instance_id)
        if inst is not None:
            inst.status = InstanceStatus.TERMINATING


def no_capacity(inst: Instance) -> None:
    raise NoCapacityError("There are no longer any instances available", provider="fake")


@pytest.fixture
def make_client() -> Callable[..., tuple[GPUClient, Fake]]:
    clients: list[GPUClient] = []

    def make(offers: list[GPUOffer], **kw: object) -> tuple[GPUClient, Fake]:
        fake = Fake(offers)
        c = GPUClient(load_settings(), providers=[fake], **kw)  # type: ignore[arg-type]
        clients.append(c)
        return c, fake

    yield make  # type: ignore[misc]
    for c in clients:
        c.close()


# -- small pieces ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("3h", 10800), ("90m", 5400), ("1h30m", 5400), ("2d", 172800), ("600", 600), (120, 120)],
)
def test_parse_ttl(text: str | int, seconds: int) -> None:
    assert parse_ttl(text) == seconds


@pytest.mark.parametrize("bad", ["3 hours", "h3", "", "10s", "1h-5m", 30, float("nan"), "3000000d"])
def test_parse_ttl_rejects_with_the_accepted_forms(bad: str | int) -> None:
    with pytest.raises(ConfigError) as e:
        parse_ttl(bad)
    assert "ttl" in str(e.value)
    assert any(w in str(e.value) for w in ("'3h'", "minute", "year"))


def test_format_duration() -> None:
    assert format_duration(59) == "59s"
    assert format_duration(3725) == "1h02m"
    assert format_duration(-120) == "-2m"


def test_owner_liveness() -> None:
    me = current_owner()
    assert owner_alive(me) is True
    host = me.split(":")[0]
    assert owner_alive(f"{host}:999999:1") is False
    assert owner_alive("elsewhere:1:1") is None
    assert owner_alive(None) is None


# -- create ---------------------------------------------------------------------------------------


def test_failover_skips_offers_without_capacity_and_cools_them_down(make_client) -> None:  # type: ignore[no-untyped-def]
    c, fake = make_client([offer("a", 1.0), offer("b", 2.0), offer("c", 3.0)])
    fake.create_faults = {"a": no_capacity, "b": no_capacity}
    seen = []
    inst = c.create(None, wait=False, on_attempt=seen.append)
    assert inst.offer is not None and inst.offer.offer_id == "c"
    assert fake.create_calls == ["a", "b", "c"]
    assert [(a.offer_id, a.ok, a.error_type) for a in seen] == [
        ("a", False, "NoCapacityError"),
        ("b", False, "NoCapacityError"),
        ("c", True, None),
    ]
    inst.terminate()
    # a and b are skipped for a while, by any process sharing the journal
    inst2 = c.create(None, wait=False)
    assert fake.create_calls[3:] == ["c"]
    inst2.terminate()
    assert {e.status for e in c.journal.all_entries()} == {"terminated"}


def test_all_offers_failing_raises_provision_error_listing_each(make_client) -> None:  # type: ignore[no-untyped-def]
    c, fake = make_client([offer("a", 1.0), offer("b", 2.0)])
    fake.create_faults = {"a": no_capacity, "b": no_capacity}
    with pytest.raises(ProvisionError) as e:
        c.create(None, wait=False)
    assert [a.offer_id for a in e.value.attempts] == ["a", "b"]
    assert "fake a: NoCapacityError" in str(e.value)
    assert not c.journal.open_entries()  # definite refusals close their entries


def test_n_offers_limits_the_attempts(make_client) -> None:  # type: ignore[no-untyped-def]
    c, fake = make_client([offer(x, 1.0 + i) for i, x in enumerate("abcd")])
    fake.create_faults = dict.fromkeys("abcd", no_capacity)
    with pytest.raises(ProvisionError):
        c.create(None, wait=False, n_offers=2)
    assert fake.create_calls == ["a", "b"]


def test_price_cap_refuses_before_any_create(make_client) -> None:  # type: ignore[no-untyped-def]
    c, fake = make_client([offer("a", 5.0)], max_price_per_hour=4.0)
    with pytest.raises(PriceLimitError) as e:
        c.create(offer("a", 5.0), wait=False)
    assert "$4.00/h" in str(e.value) and "$5.00/h" in str(e.value)
    assert fake.create_calls == []


def test_budget_refuses_when_projected_spend_exceeds_it(make_client) -> None:  # type: ignore[no-untyped-def]
    c, fake = make_client([offer("a", 2.0)], budget=3.0)
    with pytest.raises(BudgetExceededError) as e:
        c.create(None, ttl="2h", wait=False)  # 2 $/h x 2 h = 4 > 3
    assert "budget $3.00" in str(e.value)
    assert fake.create_calls == []
    inst = c.create(None, ttl="1h", wait=False)  # 2 <= 3
    inst.terminate()


def test_revalidation_catches_a_price_rise(make_client) -> None:  # type: ignore[no-untyped-def]
    c, fake = make_client([offer("a", 2.0), offer("b", 3.0)])
    seen = [offer("a", 1.0), offer("b", 3.0)]  # what the user saw: a was cheaper then
    inst = c.create(seen, wait=False)
    assert fake.create_calls == ["b"]
    assert inst.extra["attempts"][0]["error_type"] == "StaleOfferError"
    inst.terminate()


def test_ambiguous_create_is_recovered_by_name(make_client) -> None:  # type: ignore[no-untyped-def]
    c, fake = make_client([offer("a", 1.0)])

    def lost_answer(inst: Instance) -> None:
        fake.instances[inst.instance_id] = inst  # created, but the answer never arrived
        raise ProviderUnavailableError("read timeout", provider="fake")

    fake.create_faults = {"a": lost_answer}
    inst = c.create(None, wait=False)
    assert inst.instance_id == "i-1"
    assert any(s == "create_recovered" for _, s, _ in c.journal.events(inst.name or ""))
    inst.terminate()


def test_ctrl_c_during_create_terminates_what_was_created(make_client) -> None:  # type: ignore[no-untyped-def]
    c, fake = make_client([offer("a", 1.0)])

    def interrupted(inst: Instance) -> None:
        fake.instances[inst.instance_id] = inst
        raise KeyboardInterrupt

    fake.create_faults = {"a": interrupted}
    with pytest.raises(KeyboardInterrupt):
        c.create(None, wait=False)
    assert "i-1" not in fake.instances  # terminated and confirmed gone
    assert not c.journal.open_entries()


def test_context_manager_terminates_on_exception_and_confirms(make_client) -> None:  # type: ignore[no-untyped-def]
    c, fake = make_client([offer("a", 1.0)])
    fake.polls_until_gone = 2  # the provider takes a few polls to really remove it
    with pytest.raises(RuntimeError), c.create(None, wait=False) as inst:
        raise RuntimeError("the user's script crashed")
    assert fake.instances == {}
    entry = c.journal.get(inst.name or "")
    assert entry is not None and entry.status == "terminated"
    assert [s for _, s, _ in c.journal.events(entry.name)][-2:] == [
        "terminate_requested",
        "terminated",
    ]


def test_terminate_with_the_api_down_keeps_the_entry_open(make_client) -> None:  # type: ignore[no-untyped-def]
    c, fake = make_client([offer("a", 1.0)])
    inst = c.create(None, wait=False)
    fake.terminate_faults = 1
    with pytest.raises(ProviderUnavailableError):
        inst.terminate()
    assert [e.name for e in c.journal.open_entries()] == [inst.name]
    inst.terminate()  # the API is back
    assert not c.journal.open_entries()


def test_terminate_unconfirmed_raises(make_client) -> None:  # type: ignore[no-untyped-def]
    c, fake = make_client([offer("a", 1.0)])
    inst = c.create(None, wait=False)
    fake.polls_until_gone = 10**6
    with pytest.raises(TerminateError):
        c.terminate(inst, timeout=0.5)
    assert c.journal.open_entries()


def test_readiness_on_this_machine(make_client) -> None:  # type: ignore[no-untyped-def]
    c, _ = make_client([offer("a", 1.0)])
    stages: list[str] = []
    with c.create(None, on_progress=lambda s, d: stages.append(s)) as inst:
        assert inst.status is InstanceStatus.RUNNING
        assert inst.host().exec("echo ok").stdout.strip() == "ok"
    assert stages[-1] == "ready"


def test_probe_mismatch_terminates_unless_kept(make_client) -> None:  # type: ignore[no-untyped-def]
    # This machine has no GPU: an offer promising one fails the probe.
    c, _fake = make_client([offer("g", 1.0, gpu_count=1)])
    with pytest.raises(ProvisionError) as e:
        c.create(None, ready_timeout=30)
    assert e.value.attempts[0].error_type == "ReadinessError"
    assert "probe" in (e.value.attempts[0].error or "")
    assert not c.journal.open_entries()
    with pytest.raises(ReadinessError) as r:
        c.create(None, ready_timeout=30, keep_on_failure=True)
    assert r.value.kept and r.value.stage == "probe"
    (kept,) = c.journal.open_entries()
    assert kept.owner is None  # detached: reconcile will not treat it as an orphan
    c.terminate(kept.name)


# -- reap / reconcile -----------------------------------------------------------------------------


def _expire(c: GPUClient, name: str) -> None:
    past = (utcnow() - timedelta(minutes=1)).isoformat()
    with sqlite3.connect(c.journal.path) as db:
        db.execute("UPDATE instances SET expires_at = ? WHERE name = ?", (past, name))


def test_reap_terminates_instances_past_their_ttl(make_client) -> None:  # type: ignore[no-untyped-def]
    c, _fake = make_client([offer("a", 1.0), offer("b", 1.0)])
    old = c.create(offer("a", 1.0), ttl="1h", wait=False, detach=True)
    young = c.create(offer("b", 1.0), ttl="1h", wait=False, detach=True)
    _expire(c, old.name or "")
    done = c.reap()
    assert [(e.name, err) for e, err in done] == [(old.name, None)]
    assert [e.name for e in c.journal.open_entries()] == [young.name]
    young.terminate()


def test_reconcile_finds_orphans_and_ghosts_and_leaves_others_alone(make_client) -> None:  # type: ignore[no-untyped-def]
    c, fake = make_client([offer("a", 1.0)])
    held = c.create(None, wait=False)  # held by this live process: fine
    dead = c.create(None, wait=False)
    with sqlite3.connect(c.journal.path) as db:
        host = current_owner().split(":")[0]
        db.execute("UPDATE instances SET owner = ? WHERE name = ?", (f"{host}:999999:1", dead.name))
    ghost = c.create(None, wait=False)
    del fake.instances[ghost.instance_id]  # gone behind our back
    stray_name = c.journal.new_instance_name()  # ours (our journal id), but lost from the journal
    stray = Instance(
        provider="fake", instance_id="i-99", name=stray_name, status=InstanceStatus.RUNNING
    )
    mine = Instance(
        provider="fake", instance_id="i-98", name="my-own", status=InstanceStatus.RUNNING
    )
    # A colleague's box on the same account: another journal's id, or a name without one.
    theirs = Instance(
        provider="fake", instance_id="i-97", name="broker-abcdef-0123456789",
        status=InstanceStatus.RUNNING,
    )  # fmt: skip
    legacy = Instance(
        provider="fake", instance_id="i-96", name="broker-0123456789", status=InstanceStatus.RUNNING
    )
    fake.instances.update({"i-99": stray, "i-98": mine, "i-97": theirs, "i-96": legacy})

    report = find_discrepancies(c)
    found = {(f.kind, f.instance_id): f.reason for f in report.findings}
    foreign = "named by another journal (another state dir, user or CI)"
    assert found == {
        ("orphan", dead.instance_id): "the process that created it died",
        ("orphan", "i-99"): "not in the journal",
        ("ghost", ghost.instance_id): "gone at the provider",
        ("foreign", "i-97"): foreign,
        ("foreign", "i-96"): foreign,
    }
    for f in report.fixable():
        fix(c, f, timeout=5)
    assert set(fake.instances) == {held.instance_id, "i-98", "i-97", "i-96"}
    assert {f.kind for f in find_discrepancies(c).findings} == {"foreign"}
    adopted = c.journal.get(stray_name)
    assert adopted is not None and adopted.status == "terminated"
    # Only when asked: foreign instances are terminated (and entered in this journal).
    for f in find_discrepancies(c).fixable(include_foreign=True):
        assert fix(c, f, timeout=5) == "terminated"
    assert set(fake.instances) == {held.instance_id, "i-98"}
    held.terminate()


# -- what a review found ---------------------------------------------------------------------------


def test_unanswered_create_keeps_the_entry_and_tries_no_other_offer(make_client) -> None:  # type: ignore[no-untyped-def]
    c, fake = make_client([offer("a", 1.0), offer("b", 2.0)])
    late: list[Instance] = []

    def lost(inst: Instance) -> None:
        late.append(inst)  # created, but listed only later
        raise ProviderUnavailableError("read timeout", provider="fake")

    fake.create_faults = {"a": lost}
    with pytest.raises(ProvisionError) as e:
        c.create(None, wait=False)
    assert fake.create_calls == ["a"]  # never a second box
    assert e.value.attempts[0].error_type == "AmbiguousCreateError"
    (entry,) = c.journal.open_entries()
    assert entry.owner == "abandoned"
    fake.instances[late[0].instance_id] = late[0]  # now the provider lists it
    (finding,) = find_discrepancies(c).findings
    assert finding.kind == "orphan" and "abandoned" in finding.reason
    fix(c, finding, timeout=5)
    assert fake.instances == {} and not c.journal.open_entries()


def test_failed_cleanup_stops_failover_and_reports_the_abandoned_box(make_client) -> None:  # type: ignore[no-untyped-def]
    # Issue 16.6: moving on to the next offer would leave two boxes billing.
    c, fake = make_client([offer("g", 1.0, gpu_count=1), offer("h", 2.0)])
    fake.terminate_faults = 1  # the cleanup of the unready first box fails
    with pytest.raises(ProvisionError) as e:
        c.create(None, ready_timeout=30)
    assert fake.create_calls == ["g"]
    (entry,) = c.journal.open_entries()
    assert e.value.abandoned == [entry.name] and e.value.to_dict()["abandoned"] == [entry.name]
    assert entry.state == "terminating" and entry.owner == "abandoned"
    (finding,) = find_discrepancies(c).findings
    assert finding.instance_id == "i-1" and "abandoned" in finding.reason
    # reap (every broker command runs it) finishes the terminate nobody finished
    assert [(x.name, err) for x, err in c.reap(timeout=5)] == [(entry.name, None)]
    assert fake.instances == {} and not c.journal.open_entries()


def test_reconcile_rechecks_before_fixing(make_client) -> None:  # type: ignore[no-untyped-def]
    c, fake = make_client([offer("a", 1.0)])
    name = c.journal.new_instance_name()
    stray = Instance(provider="fake", instance_id="i-77", name=name, status=InstanceStatus.RUNNING)
    fake.instances["i-77"] = stray
    (finding,) = find_discrepancies(c).findings
    # Meanwhile a live process records it as its own: the fix must leave it alone.
    c.journal.record_adopted(
        name=name, provider="fake", instance_id="i-77",
        status=InstanceStatus.RUNNING, gpu_type=None, gpu_count=None, price_per_hour=1.0,
        created_at=None, detail="test",
    )  # fmt: skip
    c.journal.set_owner(name, current_owner())
    assert fix(c, finding).startswith("skipped")
    assert "i-77" in fake.instances


def test_closed_entries_are_never_reopened_by_a_stale_status(make_client) -> None:  # type: ignore[no-untyped-def]
    c, _fake = make_client([offer("a", 1.0)])
    inst = c.create(None, wait=False)
    inst.terminate()
    c.journal.record_status(inst.name or "", InstanceStatus.RUNNING)
    entry = c.journal.get(inst.name or "")
    assert entry is not None and entry.status == "terminated"


def test_budget_counts_what_open_instances_are_committed_to(make_client) -> None:  # type: ignore[no-untyped-def]
    c, _fake = make_client([offer("a", 3.0)], budget=10.0)
    first = c.create(None, ttl="3h", wait=False)  # $9 committed
    with pytest.raises(BudgetExceededError):
        c.create(None, ttl="3h", wait=False)
    first.terminate()


def test_detach_inside_the_block_keeps_the_instance(make_client) -> None:  # type: ignore[no-untyped-def]
    c, fake = make_client([offer("a", 1.0)])
    with c.create(None, wait=False) as inst:
        inst.detach()
    assert inst.instance_id in fake.instances
    inst.terminate()


def test_terminate_failure_does_not_hide_the_users_error(make_client) -> None:  # type: ignore[no-untyped-def]
    c, fake = make_client([offer("a", 1.0)])
    fake.terminate_faults = 1
    with pytest.raises(ZeroDivisionError), c.create(None, wait=False):
        1 / 0  # noqa: B018
    assert c.journal.open_entries()  # left for reap/reconcile, not forgotten


def test_short_references_are_refused(make_client) -> None:  # type: ignore[no-untyped-def]
    c, _fake = make_client([offer("a", 1.0)])
    inst = c.create(None, wait=False)
    for ref in ("", " ", "br"):
        with pytest.raises(InvalidRequestError):
            c.terminate(ref)
    inst.terminate()


def test_concurrent_creates_cannot_both_slip_under_the_budget(make_client) -> None:  # type: ignore[no-untyped-def]
    c, fake = make_client([offer("a", 3.0)], budget=10.0)  # room for one 3 h x $3 box
    results: list[object] = []
    barrier = threading.Barrier(4)

    def one() -> None:
        barrier.wait()
        try:
            results.append(c.create(offer("a", 3.0), ttl="3h", wait=False, detach=True))
        except (BudgetExceededError, ProvisionError) as e:
            results.append(e)

    threads = [threading.Thread(target=one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    made = [r for r in results if isinstance(r, Instance)]
    assert len(made) == 1 and len(fake.instances) == 1
    c.terminate(made[0])


def test_reap_finishes_a_terminate_whose_process_died(make_client) -> None:  # type: ignore[no-untyped-def]
    # Issue 16.5: SIGKILL between "terminate requested" and the confirmation.
    c, fake = make_client([offer("a", 1.0)])
    inst = c.create(None, wait=False, detach=True)
    host = current_owner().split(":")[0]
    c.journal.record_terminate_requested(inst.name or "", "test", owner=f"{host}:999999:1")
    (entry,) = c.journal.open_entries()
    assert entry.state == "terminating" and entry.status == "terminating"
    c.journal.record_status(entry.name, InstanceStatus.RUNNING)  # a stale reading cannot undo it
    assert c.journal.get(entry.name).status == "terminating"  # type: ignore[union-attr]
    assert [(e.name, err) for e, err in c.reap(timeout=5)] == [(entry.name, None)]
    assert fake.instances == {} and not c.journal.open_entries()


def test_reap_closes_a_pending_create_never_listed_after_the_grace(make_client) -> None:  # type: ignore[no-untyped-def]
    c, fake = make_client([offer("a", 1.0)])

    def lost(inst: Instance) -> None:
        raise ProviderUnavailableError("read timeout", provider="fake")

    fake.create_faults = {"a": lost}
    with pytest.raises(ProvisionError):
        c.create(None, wait=False)
    (entry,) = c.journal.open_entries()
    assert c.reap(timeout=5) == [] and c.journal.open_entries()  # within the grace: kept
    old = (utcnow() - timedelta(minutes=16)).isoformat()
    with sqlite3.connect(c.journal.path) as db:
        db.execute("UPDATE instances SET sent_at = ? WHERE name = ?", (old, entry.name))
    assert c.reap(timeout=5) == [] and not c.journal.open_entries()


def test_interrupt_before_the_request_is_sent_closes_the_intent(make_client, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from broker.journal import Journal

    c, fake = make_client([offer("a", 1.0)])

    def interrupted(self: Journal, name: str) -> None:
        raise KeyboardInterrupt  # e.g. SIGTERM between the intent and the request

    monkeypatch.setattr(Journal, "record_sent", interrupted)
    with pytest.raises(KeyboardInterrupt):
        c.create(None, wait=False)
    assert fake.create_calls == [] and not c.journal.open_entries()
    (entry,) = c.journal.all_entries()
    assert entry.state == "closed"
