"""Create with failover: offers tried in order, each create journaled as a state machine.

For each offer: re-validate it, write the intent (the one budget check, under the journal's write
lock, which also sets a TTL when a budget is set and none was asked), mark it *sent*, call the
provider once, record the id (*created*), wait for readiness (*ready*). Recovery decisions read
the entry's phase:

* a definite refusal closes the entry and the next offer is tried;
* an unanswered create (phase ``sent``, no id) is looked up once; if the provider does not list
  it, the entry stays open and *pending* (counted in the budget), no other offer is tried, and
  any later broker command that sees it terminates it (see :mod:`broker.lifecycle.reconcile`);
* a readiness failure terminates the instance; if that terminate cannot be confirmed, failover
  stops and the instance is reported as abandoned (trying another offer could bill twice);
* Ctrl-C, SIGTERM or SIGHUP (inside :func:`broker.signals.interrupts_as_keyboard`) terminate
  whatever may have been created.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from broker.errors import (
    AmbiguousCreateError,
    AuthError,
    BrokerError,
    BudgetExceededError,
    InvalidRequestError,
    NoCapacityError,
    PriceLimitError,
    ProviderError,
    ProvisionError,
    RateLimitedError,
    ReadinessError,
    StaleOfferError,
)
from broker.journal import AMBIGUOUS_GRACE_S, Phase, new_name
from broker.lifecycle.base import (
    ABANDONED,
    LifecycleClient,
    ProgressFn,
    current_owner,
    format_duration,
)
from broker.lifecycle.instance import ManagedInstance
from broker.lifecycle.reconcile import terminate
from broker.providers.base import Provider
from broker.query import as_query
from broker.query import ir as qir
from broker.query.fields import BY_NAME
from broker.types import CreateRequest, GPUOffer, Instance, ProvisionAttempt

log = logging.getLogger(__name__)

_SLUG = re.compile(r"[^a-z0-9-]+")


def instance_name(label: str | None = None, journal_id: str | None = None) -> str:
    """A fresh unique name, ``broker-[<journal id>-]<10 hex>`` plus an optional readable label."""
    base = new_name(journal_id)
    if not label:
        return base
    slug = _SLUG.sub("-", label.lower()).strip("-")[:24].strip("-")
    return f"{base}-{slug}" if slug else base


def _revalidate(provider: Provider, offer: GPUOffer, cap: float | None) -> GPUOffer:
    """The offer as the provider quotes it now; StaleOfferError if gone or dearer."""
    q = as_query(None)
    q = q.and_where(qir.cmp(BY_NAME["gpu_count"], "==", offer.gpu_count))
    q = q.and_where(qir.cmp(BY_NAME["spot"], "==", offer.spot))
    for fresh in provider.search(q):
        if fresh.key != offer.key:
            continue
        if fresh.price_per_hour > offer.price_per_hour + 1e-9:
            raise StaleOfferError(
                f"price rose from ${offer.price_per_hour:.3f}/h to ${fresh.price_per_hour:.3f}/h",
                provider=provider.name,
            )
        if cap is not None and fresh.price_per_hour > cap:
            raise PriceLimitError(
                f"${fresh.price_per_hour:.3f}/h is above the cap ${cap:.3f}/h "
                "(--max-price / max_price_per_hour)",
                provider=provider.name,
            )
        if fresh.stock is not None and fresh.stock.rank == 0:
            raise StaleOfferError(
                str(fresh.provider_data.get("unavailable") or "the offer is out of stock now"),
                provider=provider.name,
            )
        return fresh
    raise StaleOfferError(
        f"offer {offer.offer_id} ({offer.gpu_count}x {offer.gpu_type}) is no longer listed",
        provider=provider.name,
    )


@dataclass
class CreateOptions:
    """Everything :func:`create` needs besides the offers (GPUClient fills the defaults)."""

    image: str
    disk_gb: int = 50
    label: str | None = None
    n_offers: int = 3
    ttl_seconds: int | None = None
    max_price_per_hour: float | None = None
    budget: float | None = None
    env: dict[str, str] = field(default_factory=dict)
    ports: list[str] = field(default_factory=list)
    keep_on_failure: bool = False
    wait: bool = True
    ready_timeout: float | None = None
    sweep: str | None = None
    tag: str | None = None
    detach: bool = False
    revalidate: bool = True
    on_progress: ProgressFn | None = None
    on_attempt: Callable[[ProvisionAttempt], None] | None = None


def _projected_cost(offer: GPUOffer, ttl_seconds: int | None) -> float:
    # Without a TTL (and so without a budget) we count one hour: the least a forgotten box costs.
    hours = ttl_seconds / 3600 if ttl_seconds else 1.0
    return offer.price_per_hour * hours


def create(
    client: LifecycleClient, offers: Sequence[GPUOffer], opts: CreateOptions
) -> ManagedInstance:
    """Try ranked ``offers`` (at most ``opts.n_offers``) until one is created and ready."""
    journal = client.journal
    cap = opts.max_price_per_hour
    attempts: list[ProvisionAttempt] = []

    def note(a: ProvisionAttempt) -> None:
        attempts.append(a)
        if opts.on_attempt is not None:
            opts.on_attempt(a)

    if not offers:
        raise ProvisionError("no offer matches the request")
    affordable = [o for o in offers if cap is None or o.price_per_hour <= cap]
    if not affordable:
        cheapest = min(offers, key=lambda o: o.price_per_hour)
        raise PriceLimitError(
            f"every matching offer costs more than the cap ${cap:.2f}/h (--max-price) "
            f"(cheapest: {cheapest.provider} {cheapest.gpu_count}x {cheapest.gpu_type} at "
            f"${cheapest.price_per_hour:.2f}/h); raise max_price_per_hour to allow it"
        )
    cooling = journal.cooling()
    ready_offers = [o for o in affordable if o.key not in cooling]
    if not ready_offers:
        soonest = min(cooling[o.key] for o in affordable)
        raise ProvisionError(
            f"every matching offer failed for capacity recently; retry after "
            f"{soonest:%H:%M:%S} UTC or lower capacity_cooldown_s"
        )

    budget_errors: list[BudgetExceededError] = []
    for offer in ready_offers[: max(1, opts.n_offers)]:
        t0 = time.monotonic()
        base = {
            "provider": offer.provider,
            "offer_id": offer.offer_id,
            "gpu_type": offer.gpu_type,
            "price_per_hour": offer.price_per_hour,
        }

        def failed(
            e: BrokerError,
            instance_id: str | None = None,
            base: dict[str, object] = base,
            t0: float = t0,
        ) -> None:
            note(
                ProvisionAttempt(
                    **base,
                    ok=False,
                    error_type=type(e).__name__,
                    error=e.message if not isinstance(e, ReadinessError) else str(e),
                    instance_id=instance_id,
                    seconds=time.monotonic() - t0,
                )
            )

        try:
            inst = _create_one(client, offer, opts, cap)
        except BudgetExceededError as e:
            failed(e)
            budget_errors.append(e)
            continue
        except ReadinessError as e:
            failed(e, e.instance_id)
            if e.kept:
                raise
            if e.cleanup_failed:
                # The box may still bill: another offer now could mean two. Stop and say so.
                raise ProvisionError(
                    f"stopped: {e.name} never got ready and its terminate could not be confirmed",
                    attempts,
                    abandoned=[e.name or e.instance_id or "?"],
                ) from e
            continue
        except AmbiguousCreateError as e:
            failed(e)
            # Another offer now could mean two boxes billing: stop here.
            raise ProvisionError(
                "stopped after an unanswered create",
                attempts,
                abandoned=[e.instance_name] if e.instance_name else [],
            ) from e
        except (ProviderError, BrokerError) as e:
            if isinstance(e, NoCapacityError):
                journal.add_cooldown(offer.key, client.settings.capacity_cooldown_s, str(e))
            failed(e)
            continue
        note(
            ProvisionAttempt(
                **base, ok=True, instance_id=inst.instance_id, seconds=time.monotonic() - t0
            )
        )
        inst.extra.setdefault("attempts", [a.model_dump(mode="json") for a in attempts])
        return inst
    if budget_errors and len(budget_errors) == len(attempts):
        raise budget_errors[0]
    raise ProvisionError(f"all {len(attempts)} offer(s) tried failed", attempts)


def _create_one(
    client: LifecycleClient, offer: GPUOffer, opts: CreateOptions, cap: float | None
) -> ManagedInstance:
    provider = client.get_provider(offer.provider)
    journal = client.journal
    fresh = _revalidate(provider, offer, cap) if opts.revalidate else offer
    name = journal.record_intent(
        fresh,
        name=journal.new_instance_name(opts.label),
        ttl_seconds=opts.ttl_seconds,
        sweep=opts.sweep,
        tag=opts.tag,
        owner=current_owner(),
        budget=opts.budget,
        projected_cost=_projected_cost(fresh, opts.ttl_seconds),
    )
    entry = journal.get(name)
    ttl_seconds = entry.ttl_seconds if entry is not None else opts.ttl_seconds
    request = CreateRequest(
        offer=fresh,
        name=name,
        image=opts.image,
        disk_gb=opts.disk_gb,
        env=dict(opts.env),
        ports=list(opts.ports) or ["22/tcp"],
        ssh_public_key=client.settings.ssh_public_key(),
        ttl_seconds=ttl_seconds,
    )
    created: Instance | None = None
    try:
        journal.record_sent(name)
        try:
            created = provider.create(request)
        except (
            NoCapacityError,
            InvalidRequestError,
            StaleOfferError,
            AuthError,
            RateLimitedError,
        ) as e:
            # A definite refusal: nothing was created.
            journal.record_failed(name, f"{type(e).__name__}: {e.message}")
            raise
        except Exception as e:
            # Ambiguous (an unanswered request, or an adapter bug after sending): the provider
            # may have created it.
            created = _recover_ambiguous(provider, name, client, e)
        journal.record_created(name, created.instance_id, created.status)
        managed = ManagedInstance.model_validate(
            created.model_dump()
            # The offer names the GPU precisely; some APIs describe a pod's GPU more loosely
            # (RunPod's "A100 PCIe" has no memory size).
            | {"name": name, "offer": fresh, "gpu_type": fresh.gpu_type}
        ).bind(client)  # type: ignore[arg-type]
        # Which TTL applies and who enforces it (``broker create`` states both).
        managed.extra["ttl_seconds"] = ttl_seconds
        managed.extra["ttl_from_budget"] = opts.ttl_seconds is None and ttl_seconds is not None
        managed.extra["ttl_enforced_by"] = (
            None
            if ttl_seconds is None
            else "provider"
            if provider.capabilities.provider_ttl
            else "broker reap"
        )
        if opts.wait:
            try:
                # Looked up on the package so tests (and the kill -9 scenarios) can replace
                # ``broker.lifecycle.wait_until_ready``.
                import broker.lifecycle as pkg

                ready = pkg.wait_until_ready(
                    client,
                    managed,
                    timeout=opts.ready_timeout,
                    on_progress=opts.on_progress,
                    keep_host=managed.keep_host,
                )
            except ReadinessError as e:
                if opts.keep_on_failure:
                    journal.set_owner(name, None)
                    e.kept = True
                    raise
                e.cleanup_failed = not _cleanup(
                    client, provider, name, managed.instance_id, f"not ready: {e}"
                )
                raise
            managed.status, managed.ssh = ready.status, ready.ssh
            journal.record_ready(name)
        if opts.detach:
            journal.set_owner(name, None)
        return managed
    except BaseException as e:
        # What to do is read from the entry's phase, not guessed from local variables.
        if isinstance(e, ReadinessError):
            raise  # cleaned up (or kept) above
        try:
            entry = journal.get(name)
        except BrokerError:
            entry = None  # the journal itself failed: still try to end the box
        if entry is not None:
            if entry.state == Phase.CLOSED:
                raise  # refused by the provider: nothing exists
            if isinstance(e, Exception) and entry.state == Phase.SENT and not entry.instance_id:
                raise  # unanswered: pending, handled by _recover_ambiguous
        # Ctrl-C, SIGTERM/SIGHUP (inside interrupts_as_keyboard) or a crash at any other phase:
        # never leave a box behind (an intent never sent is simply closed).
        if not opts.keep_on_failure:
            iid = entry.instance_id if entry is not None else None
            if iid is None and created is not None:
                iid = created.instance_id
            _cleanup(client, provider, name, iid, f"interrupted: {type(e).__name__}")
        raise


def _recover_ambiguous(
    provider: Provider, name: str, client: LifecycleClient, error: BaseException
) -> Instance:
    """One lookup by name after an unanswered create, or a pending entry and an error.

    An error from the adapter's own lookup (``create_once``, which raises from an
    :class:`~broker.http.AmbiguousRequestError`) is not looked up again; anything else gets one
    listing.
    """
    from broker.http import AmbiguousRequestError

    journal = client.journal
    found: Instance | None = None
    if not isinstance(error.__cause__, AmbiguousRequestError):
        try:
            found = provider.find_by_name(name)
        except BrokerError as e2:
            error = AmbiguousCreateError(f"{error}; lookup failed: {e2}")
    if found is not None:
        journal.record_event(name, "create_recovered", f"found by name after: {error}")
        return found
    # Not listed (yet) is not proof it was never created: the entry stays open and pending
    # (counted in the budget); whoever sees the instance later terminates it.
    journal.set_owner(name, ABANDONED)
    journal.record_event(name, "create_ambiguous", str(error)[:500])
    err = AmbiguousCreateError(
        f"the create of {name} got no clear answer ({error}); it may exist: it stays pending in "
        f"the journal (counted in the budget) for {format_duration(AMBIGUOUS_GRACE_S)}, and "
        "`broker instances reconcile` (or any broker command that sees it) terminates it",
        provider=provider.name,
    )
    err.instance_name = name
    raise err from error


def _cleanup(
    client: LifecycleClient, provider: Provider, name: str, instance_id: str | None, why: str
) -> bool:
    """Terminate during a failed or interrupted create; True when confirmed done.

    When it cannot confirm, the entry is marked abandoned so ``reap``/``reconcile`` (and nothing
    held by a live process) finishes the job.
    """
    journal = client.journal
    try:
        if instance_id is None:
            entry = journal.get(name)
            if entry is not None and entry.state == Phase.INTENT:
                journal.record_failed(name, f"{why} before the request was sent")
                return True
            found = provider.find_by_name(name)
            if found is None:
                journal.set_owner(name, ABANDONED)
                journal.record_event(name, "cleanup", f"{why}; not listed at the provider (yet)")
                return False
            journal.record_created(name, found.instance_id, found.status)
        journal.record_event(name, "cleanup", why)
        terminate(client, name, wait=True, timeout=120.0)
        return True
    except BaseException as e:
        log.warning("could not clean up %s (%s); run `broker instances reconcile`", name, e)
        try:
            journal.set_owner(name, ABANDONED)
        except Exception as e2:
            log.warning("could not mark %s abandoned: %s", name, e2)
        return False
