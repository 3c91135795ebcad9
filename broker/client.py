"""``GPUClient``: the facade scripts use.

>>> c = GPUClient()
>>> offers = c.search((c.gpu_type.contains("A100")) & (c.gpu_count == 2) & (c.price_per_hour <= 4))
>>> offers[0].price_per_hour  # cheapest first
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any, Literal

from pydantic import BaseModel, Field

from broker.config import Settings, load_settings
from broker.errors import BrokerError, ConfigError
from broker.providers.base import Provider, get_provider_class, provider_classes
from broker.query import Expr, Query, QueryFields, as_query, hints, run_query, to_text
from broker.query import ir as qir
from broker.query.fields import BY_NAME
from broker.types import GPUOffer

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
    ) -> None:
        self.settings = settings or load_settings()
        self.search_timeout_s = search_timeout_s or self.settings.search_timeout_s
        self._providers: dict[str, Provider] = {}
        self._selected = list(providers) if providers is not None else None

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
        ``provider``, ``spot``, ``sort``, ``limit``) are added with *and*. A slow or failing
        provider neither delays (beyond ``search_timeout_s``) nor hides the others: see
        ``result.reports``.
        """
        q = build_query(query, **filters)
        h = hints(q)
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
            pool = ThreadPoolExecutor(max_workers=len(todo), thread_name_prefix="broker-search")
            started = time.monotonic()
            futures: dict[Future[list[GPUOffer]], str] = {}
            for n in todo:
                futures[pool.submit(self._search_one, n, q)] = n
            pending = set(futures)
            deadline = started + self.search_timeout_s
            while pending:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                done, pending = wait(pending, timeout=left, return_when=FIRST_COMPLETED)
                for f in done:
                    n = futures[f]
                    latency = round(time.monotonic() - started, 3)
                    exc = f.exception()
                    if exc is None:
                        got = f.result()
                        offers.extend(got)
                        reports[n] = ProviderReport(
                            provider=n, status="ok", offers=len(got), latency_s=latency
                        )
                    else:
                        err = (
                            exc.to_dict()
                            if isinstance(exc, BrokerError)
                            else {"type": type(exc).__name__, "provider": n, "message": str(exc)}
                        )
                        reports[n] = ProviderReport(
                            provider=n, status="error", latency_s=latency, error=err
                        )
            for f in pending:
                n = futures[f]
                reports[n] = ProviderReport(
                    provider=n,
                    status="timeout",
                    latency_s=self.search_timeout_s,
                    error={
                        "type": "Timeout",
                        "provider": n,
                        "message": f"no answer within {self.search_timeout_s:g}s",
                    },
                )
            # Never wait for a straggler: its thread ends on its own HTTP timeout.
            pool.shutdown(wait=False, cancel_futures=True)
        result = run_query(q, offers)
        for r in reports.values():
            if r.status == "ok":
                r.matched = sum(1 for o in result if o.provider == r.provider)
                r.pushdown = list(h.used)
        return SearchResult(
            query=to_text(q), offers=result, reports=[reports[n] for n in names if n in reports]
        )

    def _search_one(self, name: str, q: Query) -> list[GPUOffer]:
        return self.get_provider(name).search(q)

    def explain(self, query: str | Expr | Query | None = None, **filters: Any) -> dict[str, Any]:
        """What a search would do: the parsed query and what each provider is asked."""
        q = build_query(query, **filters)
        h = hints(q)
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
