"""``GPUClient``: the facade scripts use.

>>> c = GPUClient()
>>> offers = c.search((c.gpu_type.contains("A100")) & (c.gpu_count == 2) & (c.price_per_hour <= 4))
>>> offers[0].price_per_hour  # cheapest first
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, Field

from broker import lifecycle
from broker.config import Settings, load_settings
from broker.errors import BrokerError, ConfigError, NotFoundError, ProvisionError
from broker.journal import Phase
from broker.providers.base import Provider, get_provider_class, provider_classes
from broker.query import Expr, Query, QueryFields, as_query, hints, run_query, to_text
from broker.query import ir as qir
from broker.query.fields import BY_NAME
from broker.types import GPUOffer, Instance, InstanceStatus, utcnow

if TYPE_CHECKING:
    from broker.journal import Journal, JournalEntry
    from broker.lifecycle import ManagedInstance, ProgressFn, ReconcileReport
    from broker.types import ProvisionAttempt

#: Largest disk a create may ask for, GB (a typo like 1e20 is refused, not sent).
MAX_DISK_GB = 100_000
#: Longest readiness deadline, s (a day).
MAX_READY_TIMEOUT_S = 86_400.0

log = logging.getLogger(__name__)

ReportStatus = Literal["ok", "error", "timeout", "skipped"]


class ProviderReport(BaseModel):
    """How one provider answered a search."""

    provider: str
    status: ReportStatus
    offers: int = 0
    matched: int = 0
    latency_s: float | None = None
    error: dict[str, Any] | None = None
    pushdown: list[str] = Field(default_factory=list)


class SearchResult(BaseModel):
    """Offers (filtered, sorted, limited) plus a per-provider report; iterates like a list."""

    query: str
    offers: list[GPUOffer]
    reports: list[ProviderReport]

    def __iter__(self) -> Iterator[GPUOffer]:  # type: ignore[override]
        return iter(self.offers)

    def __len__(self) -> int:
        return len(self.offers)

    def __getitem__(self, i: int) -> GPUOffer:
        return self.offers[i]

    def __bool__(self) -> bool:
        return bool(self.offers)

    @property
    def failed(self) -> list[ProviderReport]:
        """Reports of providers that errored or timed out."""
        return [r for r in self.reports if r.status in ("error", "timeout")]

    @property
    def all_failed(self) -> bool:
        """True when every queried provider errored or timed out."""
        queried = [r for r in self.reports if r.status != "skipped"]
        return bool(queried) and all(r.status in ("error", "timeout") for r in queried)


def build_query(
    query: str | Expr | Query | None = None,
    *,
    gpu_type: str | None = None,
    gpu_count: int | None = None,
    min_vram_gb: float | None = None,
    max_price_per_hour: float | None = None,
    manufacturer: str | None = None,
    provider: Sequence[str] | None = None,
    spot: bool | None = None,
    sort: Sequence[str] | None = None,
    limit: int | None = None,
) -> Query:
    """Combine a query (any face) with the common keyword filters into one :class:`Query`."""
    q = as_query(query)
    extra: list[Expr] = []
    if gpu_type:
        extra.append(qir.contains(BY_NAME["gpu_type"], gpu_type))
    if gpu_count is not None:
        extra.append(qir.cmp(BY_NAME["gpu_count"], "==", gpu_count))
    if min_vram_gb is not None:
        extra.append(qir.cmp(BY_NAME["vram_gb"], ">=", min_vram_gb))
    if max_price_per_hour is not None:
        extra.append(qir.cmp(BY_NAME["price_per_hour"], "<=", max_price_per_hour))
    if manufacturer:
        extra.append(qir.cmp(BY_NAME["manufacturer"], "==", manufacturer))
    if provider:
        extra.append(qir.isin(BY_NAME["provider"], list(provider)))
    if spot is not None:
        extra.append(qir.cmp(BY_NAME["spot"], "==", spot))
    for e in extra:
        q = q.and_where(e)
    if sort:
        q = q.sorted_by(*sort)
    if limit is not None:
        q = q.take(limit)
    return q


class GPUClient(QueryFields):
    """Search, and (with the lifecycle module) rent GPU instances across providers.

    Field attributes (``c.gpu_type``, ``c.gpu_count``, ``c.vram_gb``, ``c.price_per_hour``, ...)
    build queries; see ``docs/query.md``.
    """

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        providers: Sequence[str | Provider] | None = None,
        search_timeout_s: float | None = None,
        max_price_per_hour: float | None = None,
        budget: float | None = None,
        journal: Journal | None = None,
    ) -> None:
        self.settings = settings or load_settings()
        self.search_timeout_s = search_timeout_s or self.settings.search_timeout_s
        #: Guards checked before every create (arguments win over the config file).
        self.max_price_per_hour = (
            max_price_per_hour
            if max_price_per_hour is not None
            else self.settings.max_price_per_hour
        )
        self.budget = budget if budget is not None else self.settings.budget_total
        self._providers: dict[str, Provider] = {}
        self._selected = list(providers) if providers is not None else None
        self._journal = journal
        self._journal_lock = threading.Lock()

    @property
    def journal(self) -> Journal:
        """The instance journal (``<state dir>/journal.sqlite``), opened on first use."""
        # One journal per client even when threads (a multi-node launch, a sweep) ask at once:
        # two connections opening a new file together can see it locked.
        with self._journal_lock:
            if self._journal is None:
                from broker.journal import Journal

                self._journal = Journal.default(self.settings.state_dir)
            return self._journal

    # -- providers -----------------------------------------------------------------------------
    def provider_names(self) -> list[str]:
        """Providers this client uses: explicit, else settings, else every configured cloud.

        ``local`` joins the default set only when no cloud is configured, so a configured
        account's searches are not topped by this machine at $0/h; name it to include it.
        """
        if self._selected is not None:
            for p in self._selected:
                if isinstance(p, str):
                    get_provider_class(p)  # a typo fails here, with the closest name
            return [p if isinstance(p, str) else p.name for p in self._selected]
        if self.settings.providers:
            for n in self.settings.providers:
                get_provider_class(n)
            return list(self.settings.providers)
        classes = provider_classes()
        clouds = [
            n
            for n, cls in classes.items()
            if cls.capabilities.requires_api_key and cls.is_configured(self.settings)
        ]
        if clouds:
            return clouds
        return [n for n, cls in classes.items() if cls.is_configured(self.settings)]

    def get_provider(self, name: str) -> Provider:
        """The adapter for ``name`` (built once, from settings)."""
        if name in self._providers:
            return self._providers[name]
        if self._selected is not None:
            for p in self._selected:
                if isinstance(p, Provider) and p.name == name:
                    self._providers[name] = p
                    return p
        cls = get_provider_class(name)
        if not cls.is_configured(self.settings):
            raise ConfigError(
                f"provider {name!r} is not configured: set its API key (see `broker init`)",
                provider=name,
            )
        inst = cls.from_settings(self.settings)
        self._providers[name] = inst
        return inst

    def close(self) -> None:
        """Close every provider's HTTP client."""
        for p in self._providers.values():
            p.close()
        self._providers.clear()
        if self._journal is not None:
            self._journal.close()
            self._journal = None

    def __enter__(self) -> GPUClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- search --------------------------------------------------------------------------------
    def search(
        self,
        query: str | Expr | Query | None = None,
        **filters: Any,
    ) -> SearchResult:
        """Ask every provider at once, then filter, sort (cheapest first) and limit locally.

        ``query`` is a query string, a builder expression or a :class:`Query`; keyword filters
        (``gpu_type``, ``gpu_count``, ``min_vram_gb``, ``max_price_per_hour``, ``manufacturer``,
        ``provider``, ``spot``, ``sort``, ``limit``) are added with *and*. Spot (interruptible)
        offers are included only when the query says ``spot`` (or ``spot=True``); otherwise only
        on-demand ones. A slow or failing provider neither delays (beyond ``search_timeout_s``:
        its requests are cut off and its client closed) nor hides the others: see
        ``result.reports``. Cloud providers that are not configured are reported as ``skipped``
        with how to configure them when none is.
        """
        from broker import search as orchestration

        q = build_query(query, **filters)
        searched = orchestration.with_defaults(q)
        h = hints(searched)
        names = self.provider_names()
        reports: dict[str, ProviderReport] = {}
        todo: list[str] = []
        for n in names:
            if not h.allows_provider(n):
                reports[n] = ProviderReport(provider=n, status="skipped")
            else:
                todo.append(n)
        offers: list[GPUOffer] = []
        if todo:
            outcomes = orchestration.fan_out(
                todo,
                lambda n: self._search_one(n, searched),
                self.search_timeout_s,
                on_timeout=self._cancel_search,
            )
            for n, out in outcomes.items():
                offers.extend(out.offers)
                reports[n] = ProviderReport(
                    provider=n,
                    status=out.status,
                    offers=len(out.offers),
                    latency_s=out.latency_s,
                    error=out.error,
                )
        result = run_query(searched, offers)
        for r in reports.values():
            if r.status == "ok":
                r.matched = sum(1 for o in result if o.provider == r.provider)
                r.pushdown = list(h.used)
        unconfigured = []
        if self._selected is None and not self.settings.providers:
            unconfigured = [
                ProviderReport(provider=name, status="skipped", error=error)
                for name, error in orchestration.unconfigured_clouds(self.settings)
            ]
        return SearchResult(
            query=to_text(q),
            offers=result,
            reports=[reports[n] for n in names if n in reports] + unconfigured,
        )

    def _cancel_search(self, name: str) -> None:
        # The provider missed the search deadline: close its HTTP client so that a request or
        # retry still under way cannot reach the provider again; the next call builds a fresh
        # one. A provider the caller passed in is theirs to close (its requests are cut off by
        # the deadline all the same).
        p = self._providers.get(name)
        if p is None or any(p is s for s in self._selected or ()):
            return
        del self._providers[name]
        p.close()

    def _search_one(self, name: str, q: Query) -> list[GPUOffer]:
        return self.get_provider(name).search(q)

    def explain(self, query: str | Expr | Query | None = None, **filters: Any) -> dict[str, Any]:
        """What a search would do: the parsed query and what each provider is asked."""
        q = build_query(query, **filters)
        from broker.search import with_defaults

        h = hints(with_defaults(q))
        per: list[dict[str, Any]] = []
        for n in self.provider_names():
            cls = get_provider_class(n)
            can = set(cls.capabilities.pushdown)
            if not h.allows_provider(n):
                per.append({"provider": n, "queried": False, "reason": "excluded by provider="})
                continue
            pushed = [u for u in h.used if u.split(" ")[0] in can]
            per.append(
                {
                    "provider": n,
                    "queried": True,
                    "server_side": pushed,
                    "checked_locally": "every condition",
                }
            )
        return {
            "query": to_text(q),
            "ir": repr(q),
            "sort": [f"{'-' if k.descending else ''}{k.field}" for k in q.sort]
            or ["price_per_hour"],
            "limit": q.limit,
            "providers": per,
        }

    # -- lifecycle -----------------------------------------------------------------------------
    def create(
        self,
        query: str | Expr | Query | GPUOffer | Sequence[GPUOffer] | None = None,
        *,
        gpu_count: int | None = None,
        image: str | None = None,
        disk_gb: int = 50,
        name: str | None = None,
        n_offers: int = 3,
        ttl: str | float | None = None,
        max_price_per_hour: float | None = None,
        env: dict[str, str] | None = None,
        ports: Sequence[str] | None = None,
        keep_on_failure: bool = False,
        wait: bool = True,
        ready_timeout: float | None = None,
        spot: bool | None = None,
        sweep: str | None = None,
        tag: str | None = None,
        detach: bool = False,
        on_progress: ProgressFn | None = None,
        on_attempt: Callable[[ProvisionAttempt], None] | None = None,
    ) -> ManagedInstance:
        """Rent one instance: the cheapest matching offer that can be created and becomes ready.

        ``query`` is a query (any face) searched across providers, one offer, or a ranked list
        of offers. Up to ``n_offers`` are tried in order, each re-validated just before its
        create call; one that fails (no capacity, stale, SSH never up...) is recorded and the
        next is tried. All failing raises :class:`ProvisionError` listing every attempt.

        With ``wait`` (the default) the instance is usable on return: running, SSH login with
        the configured key works, and ``nvidia-smi`` shows the GPUs of the offer. A failed
        readiness terminates it unless ``keep_on_failure``. ``ttl`` (``"3h"``) is enforced by
        the provider where it can and by ``reap`` otherwise. Use the result as a context manager
        to terminate it when the block ends; ``detach=True`` lets it outlive this process.

        Guards: ``max_price_per_hour`` (or the client's/config's) excludes dearer offers; the
        budget refuses a create whose projected cost (price x ttl, or 1 h) would take the
        journal's estimated spend past it. With a budget, a create without a TTL gets one: the
        time the remaining budget buys at the offer's price (``inst.extra["ttl_seconds"]``,
        enforced by the provider where it can, else by ``reap``).
        """
        import math

        if isinstance(disk_gb, bool) or not 1 <= disk_gb <= MAX_DISK_GB:
            raise ConfigError(f"disk_gb must be between 1 and {MAX_DISK_GB} GB, not {disk_gb!r}")
        if ready_timeout is not None and not (
            math.isfinite(ready_timeout) and 1 <= ready_timeout <= MAX_READY_TIMEOUT_S
        ):
            raise ConfigError(
                f"ready_timeout must be between 1 and {MAX_READY_TIMEOUT_S:g} seconds, "
                f"not {ready_timeout!r}"
            )
        cap = max_price_per_hour if max_price_per_hour is not None else self.max_price_per_hour
        ttl_s = lifecycle.parse_ttl(ttl if ttl is not None else self.settings.default_ttl)
        if isinstance(query, GPUOffer):
            offers: list[GPUOffer] = [query]
        elif isinstance(query, Sequence) and not isinstance(query, str):
            offers = list(query)
            if not all(isinstance(o, GPUOffer) for o in offers):
                raise ConfigError("create() takes a query, one GPUOffer, or a list of GPUOffers")
        else:
            result = self.search(query, gpu_count=gpu_count, spot=spot)
            if not result.offers and result.all_failed:
                detail = "; ".join(
                    f"{r.provider}: {(r.error or {}).get('message', r.status)}"
                    for r in result.failed
                )
                raise ProvisionError(f"search failed at every provider ({detail})")
            offers = list(result.offers)
        self._reap_quietly()
        opts = lifecycle.CreateOptions(
            image=image or self.settings.default_image,
            disk_gb=disk_gb,
            label=name,
            n_offers=n_offers,
            ttl_seconds=ttl_s,
            max_price_per_hour=cap,
            budget=self.budget,
            env=dict(env or {}),
            ports=list(ports or []),
            keep_on_failure=keep_on_failure,
            wait=wait,
            ready_timeout=ready_timeout,
            sweep=sweep,
            tag=tag,
            detach=detach,
            on_progress=on_progress,
            on_attempt=on_attempt,
        )
        return lifecycle.create(self, offers, opts)

    def wait_until_ready(
        self,
        instance: Instance,
        timeout: float | None = None,
        *,
        on_progress: ProgressFn | None = None,
    ) -> Instance:
        """Block until ``instance`` is usable (see :func:`broker.lifecycle.wait_until_ready`)."""
        return lifecycle.wait_until_ready(self, instance, timeout=timeout, on_progress=on_progress)

    def instance(self, ref: str) -> ManagedInstance:
        """A journal instance (name, provider id or unique prefix), refreshed from its provider."""
        entry = lifecycle.resolve_entry(self.journal, ref)
        if entry.instance_id is None:
            raise NotFoundError(f"{entry.name} has no provider id (its create did not finish)")
        inst = self.get_provider(entry.provider).get(entry.instance_id)
        if entry.is_open:
            self.journal.record_status(
                entry.name, inst.status, ssh_target=inst.ssh.target if inst.ssh else None
            )
        data = inst.model_dump() | {"name": inst.name or entry.name}
        return lifecycle.ManagedInstance.model_validate(data).bind(self)

    def instances(
        self, *, include_closed: bool = False, refresh: bool = True
    ) -> list[JournalEntry]:
        """Our instances from the journal; with ``refresh`` their status is re-read first."""
        entries = self.journal.all_entries() if include_closed else self.journal.open_entries()
        if refresh:
            for e in entries:
                if e.is_open and e.instance_id is None:
                    self._adopt_if_listed(e)
                if not e.is_open or e.instance_id is None:
                    continue
                try:
                    inst = self.get_provider(e.provider).get(e.instance_id)
                except NotFoundError:
                    # The provider no longer knows it (RunPod forgets terminated pods): it does
                    # not bill, so it must not show as running nor count in $/h. Only once the
                    # provider has shown it (ready) or after a minute: some APIs answer 404 for
                    # an instance created a moment ago.
                    age = (utcnow() - e.updated_at).total_seconds()
                    if e.state in (Phase.READY, Phase.TERMINATING) or age > 60:
                        self.journal.record_terminated(e.name, "provider no longer knows it")
                    continue
                except BrokerError:
                    continue
                self.journal.record_status(
                    e.name, inst.status, ssh_target=inst.ssh.target if inst.ssh else None
                )
            names = {e.name for e in entries}
            fresh = self.journal.all_entries() if include_closed else self.journal.open_entries()
            entries = [e for e in fresh if e.name in names]
        return entries

    def _adopt_if_listed(self, e: JournalEntry) -> None:
        # A create that got no answer: if the provider lists it now, give the entry its id so
        # it shows and counts (it stays abandoned, so the next reap terminates it).
        if e.state != Phase.SENT or lifecycle.owner_alive(e.owner) is True:
            return
        try:
            found = self.get_provider(e.provider).find_by_name(e.name)
        except BrokerError:
            return
        if found is not None:
            self.journal.record_created(e.name, found.instance_id, found.status)
            self.journal.record_event(e.name, "adopted", "listed after an unanswered create")

    def terminate(
        self, instance: str | Instance, *, wait: bool = True, timeout: float = 300.0
    ) -> JournalEntry:
        """Terminate an instance and confirm it is gone (then its journal entry is closed)."""
        return lifecycle.terminate(self, instance, wait=wait, timeout=timeout)

    def reap(self, *, timeout: float = 300.0) -> list[tuple[JournalEntry, BrokerError | None]]:
        """Terminate what nobody else will: instances past their TTL, terminates requested but
        not confirmed, abandoned instances (see :func:`broker.lifecycle.reap`); returns each
        with its error (or None)."""
        return lifecycle.reap(self, timeout=timeout)

    def _reap_quietly(self) -> None:
        # Short deadline: a stuck provider must not hold up the create the user asked for.
        for entry, error in self.reap(timeout=30.0):
            if error is not None:
                log.warning("could not reap %s past its TTL: %s", entry.name, error)
            else:
                log.warning("terminated %s: its TTL had passed", entry.name)

    def launch(
        self,
        task: Any,
        *,
        results_dir: str = "results",
        keep: bool = False,
        detach: bool = False,
        on_event: Callable[[str, str], None] | None = None,
        on_log: Callable[[str], None] | None = None,
    ) -> Any:
        """Run a :class:`broker.launch.Task` (or a task file's path) end to end: rent, push,
        set up, run, follow, pull ``outputs`` into ``<results_dir>/<task name>/``, terminate.

        Returns a :class:`broker.launch.LaunchResult` whose ``exit_code`` is the job's; raises
        :class:`broker.launch.LaunchError` when the launch itself fails (after cleaning up).
        See ``docs/launch.md``.
        """
        from pathlib import Path

        from broker.launch import Launch, Task, load_task

        if isinstance(task, str | Path):
            task = load_task(task)
        if not isinstance(task, Task):
            raise ConfigError("launch() takes a broker.launch.Task or the path of a task file")
        run = Launch(
            self, task, results_dir=results_dir, keep=keep, on_event=on_event, on_log=on_log
        )
        return run.run(detach=detach)

    def reconcile(self, providers: Sequence[str] | None = None) -> ReconcileReport:
        """Find orphans (billing, held by nobody), ghosts (journal only), foreign instances
        (named by another journal) and pending creates; changes nothing."""
        return lifecycle.find_discrepancies(self, providers)

    def spend(self) -> float:
        """Estimated US$ spent so far by every instance in the journal."""
        return self.journal.estimated_spend()

    def active_count(self) -> int:
        """Open journal entries that may bill."""
        return sum(
            1
            for e in self.journal.open_entries()
            if e.status == "intent" or InstanceStatus(e.status).is_active
        )
