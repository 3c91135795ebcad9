"""Terminate, reap and reconcile: everything that ends instances or finds the ones left over.

* :func:`terminate` marks the entry *terminating* in the journal before it asks the provider,
  then confirms the instance is gone before it closes the entry. If it is interrupted or the
  provider refuses, the entry stays terminating (and abandoned) for :func:`reap`/``reconcile``.
* :func:`reap` finishes what nobody is finishing: instances past their TTL, terminates that were
  requested but not confirmed, instances whose creator abandoned them (including a create that
  got no answer, once the provider lists it).
* :func:`find_discrepancies`/:func:`fix` compare the journal with the providers' listings.
  Instances whose names carry another journal's id are *foreign*: listed, never touched unless
  asked (``include_foreign``).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from broker.errors import BrokerError, InvalidRequestError, NotFoundError, TerminateError
from broker.journal import AMBIGUOUS_GRACE_S, NAME_PREFIX, Journal, JournalEntry, Phase
from broker.lifecycle.base import (
    ABANDONED,
    Deadline,
    LifecycleClient,
    Retry,
    current_owner,
    format_duration,
    owner_alive,
    poll,
)
from broker.types import Instance, InstanceStatus, utcnow

log = logging.getLogger(__name__)


# -- terminate ------------------------------------------------------------------------------------


def resolve_entry(journal: Journal, ref: str | Instance) -> JournalEntry:
    """A journal entry by name, provider id, or a unique prefix of either."""
    if isinstance(ref, Instance):
        entry = journal.get(ref.name) if ref.name else None
        entry = entry or journal.find(ref.provider, ref.instance_id)
        if entry is None:
            raise NotFoundError(
                f"{ref.provider} instance {ref.instance_id} is not in the journal",
                provider=ref.provider,
            )
        return entry
    ref = ref.strip()
    if len(ref) < 3:
        raise InvalidRequestError(
            f"instance reference {ref!r} is too short: give a name, a provider id or a prefix "
            "of at least 3 characters"
        )
    entry = journal.get(ref)
    if entry is not None:
        return entry
    hits = [
        e
        for e in journal.all_entries()
        if e.name.startswith(ref) or (e.instance_id is not None and e.instance_id.startswith(ref))
    ]
    exact = [e for e in hits if e.instance_id == ref]
    if len(exact) == 1:
        return exact[0]
    if len(hits) == 1:
        return hits[0]
    if not hits:
        raise NotFoundError(
            f"no instance {ref!r} in the journal; `broker instances list --all` lists them"
        )
    names = ", ".join(e.name for e in hits[:5])
    raise InvalidRequestError(f"{ref!r} is ambiguous: it matches {names}")


def terminate(
    client: LifecycleClient, ref: str | Instance, *, wait: bool = True, timeout: float = 300.0
) -> JournalEntry:
    """Terminate and (with ``wait``) confirm the instance is gone; then close its entry.

    The entry is marked terminating (held by this process) before the provider is called.
    Raises :class:`TerminateError` when the provider still shows it at the deadline, and the
    provider's error when the API refuses; in both cases the entry stays open, terminating and
    abandoned, so ``reap`` (which every broker command runs first) finishes it.
    """
    from bifrost import forget_host

    journal = client.journal
    entry = resolve_entry(journal, ref)
    if entry.instance_id is None:
        raise TerminateError(
            f"{entry.name} has no provider id yet (create still running or interrupted); "
            "`broker instances reconcile` finds it by name"
        )
    if not entry.is_open:
        return entry
    provider = client.get_provider(entry.provider)
    me = current_owner()
    journal.record_terminate_requested(entry.name, f"by {me}", owner=me if wait else None)
    try:
        provider.terminate(entry.instance_id)
    except NotFoundError:
        pass
    except BrokerError as e:
        journal.record_event(entry.name, "terminate_failed", str(e))
        journal.set_owner(entry.name, ABANDONED)
        raise
    if not wait:
        # Not confirmed: the entry stays open (terminating, detached) until a later check sees
        # the instance gone.
        done = journal.get(entry.name)
        assert done is not None
        return done
    iid = entry.instance_id

    def gone() -> bool | Retry:
        try:
            cur = provider.get(iid)
        except NotFoundError:
            return True
        except BrokerError as e:
            return Retry(f"status check failed ({e})")
        if cur.status is InstanceStatus.TERMINATED:
            return True
        return Retry(f"still {cur.status.value}")

    def timed_out(last: str) -> TerminateError:
        journal.set_owner(entry.name, ABANDONED)
        return TerminateError(
            f"{entry.provider} still shows {iid} after {timeout:.0f}s; "
            "the journal keeps it open (retry `broker instances terminate`)",
            provider=entry.provider,
        )

    poll(gone, Deadline(timeout), on_timeout=timed_out)
    journal.record_terminated(entry.name, "confirmed gone")
    if entry.ssh_target and not provider.capabilities.persistent_hosts:
        _forget(forget_host, entry.ssh_target)
    done = journal.get(entry.name)
    assert done is not None
    return done


def _forget(forget_host: Callable[..., int], target: str) -> None:
    m = re.fullmatch(r"[^@]+@\[?([^\]]+)\]?:(\d+)", target)
    if m:
        try:
            forget_host(m.group(1), int(m.group(2)))
        except Exception as e:
            log.debug("could not forget host key of %s: %s", target, e)


# -- reap -----------------------------------------------------------------------------------------


def expired_entries(journal: Journal, now: datetime | None = None) -> list[JournalEntry]:
    """Open entries whose TTL has passed."""
    now = now or utcnow()
    return [
        e
        for e in journal.open_entries()
        if e.expires_at is not None and e.expires_at <= now and e.instance_id is not None
    ]


def reap_reason(entry: JournalEntry, now: datetime) -> str | None:
    """Why ``reap`` must end this open entry's instance now, or None."""
    if entry.expires_at is not None and entry.expires_at <= now:
        return "TTL passed"
    if entry.owner == ABANDONED:
        return "abandoned by its creator"
    if entry.state == Phase.TERMINATING and owner_alive(entry.owner) is not True:
        return "terminate requested, not confirmed"
    return None


def entries_to_reap(journal: Journal, now: datetime | None = None) -> list[JournalEntry]:
    """Open entries :func:`reap` acts on (a journal-only check: no provider is asked)."""
    now = now or utcnow()
    return [e for e in journal.open_entries() if reap_reason(e, now) is not None]


def reap(
    client: LifecycleClient, *, timeout: float = 300.0
) -> list[tuple[JournalEntry, BrokerError | None]]:
    """Finish what nobody is finishing; returns each entry acted on with its error (or None).

    Terminates instances past their TTL, terminates requested but not confirmed, and abandoned
    instances. An abandoned create that got no answer is looked up by name (once per run): if
    the provider lists it now, it is adopted into its entry and terminated.
    """
    journal = client.journal
    done: list[tuple[JournalEntry, BrokerError | None]] = []
    for e in entries_to_reap(journal):
        try:
            if e.instance_id is None:
                found = client.get_provider(e.provider).find_by_name(e.name)
                if found is None:
                    sent = e.sent_at or e.created_at
                    if e.state != Phase.SENT or (utcnow() - sent).total_seconds() >= (
                        AMBIGUOUS_GRACE_S
                    ):
                        # Never listed within the grace period (or never sent): nothing bills.
                        journal.record_failed(e.name, "reap: not listed by the provider")
                    continue
                journal.record_created(e.name, found.instance_id, found.status)
                journal.record_event(e.name, "adopted", "listed after an unanswered create")
            done.append((terminate(client, e.name, timeout=timeout), None))
        except BrokerError as err:
            done.append((e, err))
    return done


# -- reconcile ------------------------------------------------------------------------------------


@dataclass
class Finding:
    """One discrepancy between the journal and a provider.

    ``kind``: ``orphan`` (billing, held by nobody: terminated by a fix), ``ghost`` (journal only:
    closed by a fix), ``foreign`` (named by another journal: fixed only when asked) or
    ``pending`` (a create that got no answer, within the grace period: nothing to fix yet).
    """

    kind: str
    provider: str
    name: str | None
    instance_id: str | None
    reason: str
    status: str | None = None
    price_per_hour: float | None = None
    instance: Instance | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "kind": self.kind,
            "provider": self.provider,
            "name": self.name,
            "instance_id": self.instance_id,
            "reason": self.reason,
            "status": self.status,
            "price_per_hour": self.price_per_hour,
        }


@dataclass
class ReconcileReport:
    """What ``reconcile`` found: orphans, ghosts, foreign and pending, and unreachable providers."""

    findings: list[Finding] = field(default_factory=list)
    unreachable: dict[str, str] = field(default_factory=dict)

    @property
    def orphans(self) -> list[Finding]:
        """Instances at a provider that nobody holds (they bill)."""
        return [f for f in self.findings if f.kind == "orphan"]

    @property
    def ghosts(self) -> list[Finding]:
        """Journal entries whose instance no longer exists."""
        return [f for f in self.findings if f.kind == "ghost"]

    @property
    def foreign(self) -> list[Finding]:
        """``broker-...`` instances named by another journal (a colleague's, CI's)."""
        return [f for f in self.findings if f.kind == "foreign"]

    @property
    def pending(self) -> list[Finding]:
        """Unanswered creates still within their grace period (open and counted)."""
        return [f for f in self.findings if f.kind == "pending"]

    def fixable(self, *, include_foreign: bool = False) -> list[Finding]:
        """What a fix would act on."""
        kinds = {"orphan", "ghost"} | ({"foreign"} if include_foreign else set())
        return [f for f in self.findings if f.kind in kinds]


def orphan_reason(entry: JournalEntry | None, instance_id: str, now: datetime) -> str | None:
    """Why a live ``broker-...`` instance is held by nobody, or None when it is accounted for."""
    if entry is None:
        return "not in the journal"
    if not entry.is_open:
        return "journal says terminated, provider still has it"
    if entry.instance_id is not None and entry.instance_id != instance_id:
        return f"a second instance under the name of {entry.instance_id}"
    if entry.expires_at is not None and entry.expires_at <= now:
        return f"TTL expired {format_duration((now - entry.expires_at).total_seconds())} ago"
    if entry.owner == ABANDONED:
        return "abandoned by its creator (cleanup or create left unconfirmed)"
    if entry.state == Phase.TERMINATING and owner_alive(entry.owner) is not True:
        return "terminate requested but not confirmed"
    if owner_alive(entry.owner) is False:
        return "the process that created it died"
    if entry.instance_id is None and entry.owner is None:
        return "create was interrupted before the provider answered"
    return None


def find_discrepancies(
    client: LifecycleClient,
    providers: Sequence[str] | None = None,
    *,
    intent_grace_s: float = 120.0,
    ambiguous_grace_s: float = AMBIGUOUS_GRACE_S,
) -> ReconcileReport:
    """Compare the journal with what each provider lists; changes nothing.

    An entry whose create request went out without an answer (phase ``sent``, no id) is
    ``pending`` until a listing taken ``ambiguous_grace_s`` after the request still lacks it;
    only then is it a ghost.
    """
    journal = client.journal
    report = ReconcileReport()
    names = list(providers) if providers else client.provider_names()
    names = list(dict.fromkeys([*names, *(e.provider for e in journal.open_entries())]))
    for pname in names:
        listed_at = utcnow()
        try:
            listed = client.get_provider(pname).list_instances()
        except BrokerError as e:
            report.unreachable[pname] = str(e)
            continue
        # Read the journal only after the listing: an instance created meanwhile by another
        # process is then already in it, not mistaken for an orphan.
        entries = journal.all_entries()
        open_entries = [e for e in entries if e.is_open]
        by_name = {e.name: e for e in entries}
        now = utcnow()
        live: dict[str, Instance] = {}
        for inst in listed:
            if inst.status is InstanceStatus.TERMINATED:
                continue
            live[inst.instance_id] = inst
            if not (inst.name or "").startswith(NAME_PREFIX):
                continue  # not created by broker: never touch it
            entry = by_name.get(inst.name or "")
            if entry is None and not journal.owns(inst.name):
                report.findings.append(
                    Finding(
                        "foreign",
                        pname,
                        inst.name,
                        inst.instance_id,
                        "named by another journal (another state dir, user or CI)",
                        inst.status.value,
                        inst.price_per_hour,
                        inst,
                    )
                )
                continue
            reason = orphan_reason(entry, inst.instance_id, now)
            if reason is not None:
                report.findings.append(
                    Finding(
                        "orphan",
                        pname,
                        inst.name,
                        inst.instance_id,
                        reason,
                        inst.status.value,
                        inst.price_per_hour,
                        inst,
                    )
                )
        for ent in open_entries:
            if ent.provider != pname or ent.updated_at >= listed_at:
                continue  # changed while we listed: the listing cannot speak for it
            if ent.instance_id is not None:
                if ent.instance_id not in live:
                    report.findings.append(
                        Finding(
                            "ghost",
                            pname,
                            ent.name,
                            ent.instance_id,
                            "gone at the provider",
                            ent.status,
                        )
                    )
                continue
            if any(i.name == ent.name for i in live.values()):
                continue  # handled as an orphan above (or still being created)
            alive = owner_alive(ent.owner)
            if ent.state == Phase.SENT:
                # The request went out: the provider may list the instance late. Keep the
                # entry open (and in the budget) until the grace period has passed.
                if alive is True:
                    continue  # its creator is still waiting for the answer
                sent = ent.sent_at or ent.created_at
                waited = (listed_at - sent).total_seconds()
                if waited < ambiguous_grace_s:
                    report.findings.append(
                        Finding(
                            "pending",
                            pname,
                            ent.name,
                            None,
                            f"create sent {format_duration(waited)} ago got no answer; "
                            f"not listed yet (kept open for "
                            f"{format_duration(ambiguous_grace_s)})",
                            ent.status,
                            ent.price_per_hour,
                        )
                    )
                else:
                    report.findings.append(
                        Finding(
                            "ghost",
                            pname,
                            ent.name,
                            None,
                            f"create sent {format_duration(waited)} ago was never listed",
                            ent.status,
                        )
                    )
                continue
            # An intent never sent: a create in progress, or one that died before the request.
            age = (now - ent.created_at).total_seconds()
            if alive is False or (alive is None and age > intent_grace_s):
                report.findings.append(
                    Finding(
                        "ghost",
                        pname,
                        ent.name,
                        None,
                        "create never reached the provider",
                        ent.status,
                    )
                )
    return report


def fix(client: LifecycleClient, finding: Finding, *, timeout: float = 300.0) -> str:
    """Resolve one finding: terminate an orphan (or a foreign instance), close a ghost.

    Each finding is checked again first: between the report and the fix another process may
    have taken the instance, or a slow provider may have listed it after all. Returns what was
    done.
    """
    journal = client.journal
    provider = client.get_provider(finding.provider)
    if finding.kind == "pending":
        return "skipped: still within the grace period"
    if finding.kind == "ghost":
        if finding.instance_id is not None:
            try:
                cur = provider.get(finding.instance_id)
            except NotFoundError:
                cur = None
            if cur is not None and cur.status is not InstanceStatus.TERMINATED:
                return "skipped: the provider shows it again"
            journal.record_terminated(finding.name or "", f"reconcile: {finding.reason}")
        else:
            entry = journal.get(finding.name or "")
            if entry is None or entry.instance_id is not None or not entry.is_open:
                return "skipped: the entry changed"
            if entry.state == Phase.SENT and provider.find_by_name(entry.name) is not None:
                return "skipped: the provider lists it now"
            journal.record_failed(finding.name or "", f"reconcile: {finding.reason}")
        return "closed in journal"
    assert finding.instance_id is not None
    name = finding.name or f"{NAME_PREFIX}{finding.provider}-{finding.instance_id}"
    entry = journal.get(name)
    if finding.kind == "orphan" and orphan_reason(entry, finding.instance_id, utcnow()) is None:
        return "skipped: now held by a live process"
    if entry is not None and entry.instance_id not in (None, finding.instance_id):
        # A duplicate under a known name: end exactly that instance, keep the entry's own.
        provider.terminate(finding.instance_id)
        journal.record_event(name, "duplicate_terminated", finding.instance_id)
        return "terminated"
    inst = finding.instance
    if entry is None or entry.instance_id is None or not entry.is_open:
        journal.record_adopted(
            name=name,
            provider=finding.provider,
            instance_id=finding.instance_id,
            status=inst.status if inst is not None else InstanceStatus.UNKNOWN,
            gpu_type=inst.gpu_type if inst is not None else None,
            gpu_count=inst.gpu_count if inst is not None else None,
            price_per_hour=inst.price_per_hour if inst is not None else None,
            created_at=inst.created_at if inst is not None else None,
            detail=f"reconcile: {finding.reason}",
        )
    terminate(client, name, wait=True, timeout=timeout)
    return "terminated"
