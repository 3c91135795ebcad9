"""Search orchestration: ask every provider at once, stop at the search timeout, report each.

:meth:`broker.GPUClient.search` builds the query and the reports; this module owns the parts that
decide *when* a search is over:

* Each provider is searched on its own **daemon** thread under :func:`broker.http.deadline`, so
  every HTTP request it makes (retries and backoff included) is cut off at the search timeout.
  A ``ThreadPoolExecutor`` would not do: its workers are joined at interpreter exit, so one slow
  provider kept ``broker search`` alive for its whole HTTP timeout and retries.
* At the deadline the search returns with the providers that have not answered reported as
  ``timeout``; ``on_timeout`` (the client closes that provider's HTTP client) makes a straggler
  that wakes up later fail at once instead of retrying.

It also holds the search-wide defaults of the query language (spot offers only when asked for).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from broker.errors import BrokerError
from broker.http import DeadlineExceededError, deadline
from broker.providers.base import Provider, provider_classes
from broker.query.ir import And, Between, Cmp, Contains, Expr, Flag, In, Not, Or, Query
from broker.types import GPUOffer

if TYPE_CHECKING:
    from broker.config import Settings as _Settings

Status = Literal["ok", "error", "timeout"]

#: What ``spot`` means when a query does not mention it: on-demand offers only. Spot
#: (interruptible) capacity can vanish under a job, so it is opt-in: ``spot`` in the query,
#: ``spot=true``, ``spot or !spot`` for both, or ``--spot`` / ``spot=True`` in Python.
ON_DEMAND_ONLY: Expr = Not(Flag("spot"))


@dataclass
class Outcome:
    """How one provider's search ended."""

    provider: str
    status: Status
    offers: list[GPUOffer] = field(default_factory=list)
    latency_s: float | None = None
    error: dict[str, Any] | None = None


def mentions(expr: Expr | None, fld: str) -> bool:
    """Whether any condition of ``expr`` is about ``fld`` (at any depth)."""
    if expr is None:
        return False
    if isinstance(expr, Cmp | Contains | In | Between | Flag):
        return expr.field == fld
    if isinstance(expr, Not):
        return mentions(expr.expr, fld)
    if isinstance(expr, And | Or):
        return any(mentions(e, fld) for e in expr.items)
    raise TypeError(f"not a query expression: {expr!r}")


def with_defaults(query: Query) -> Query:
    """``query`` as searched: on-demand only unless it says something about ``spot``."""
    if mentions(query.where, "spot"):
        return query
    return query.and_where(ON_DEMAND_ONLY)


def how_to_configure(cls: type[Provider]) -> str:
    """One line saying how to configure a provider (its key variable, never a key value)."""
    var = getattr(cls, "key_variable", None)
    if not isinstance(var, str):
        return f"{cls.display_name} is not configured (see `broker providers`)"
    from broker.config import Settings

    # The settings field is the variable's lower-case name (RUNPOD_API_KEY -> runpod_api_key).
    key_field = var.lower()
    in_file = f" or {key_field} in the config file" if key_field in Settings.model_fields else ""
    return (
        f"{cls.display_name} is not configured: set {var} (environment or .env file){in_file}; "
        "`broker init` writes a config file"
    )


def unconfigured_clouds(settings: _Settings) -> list[tuple[str, dict[str, Any]]]:
    """When no cloud has a key: each cloud provider with how to configure it (else nothing).

    ``broker search`` then searches only key-less providers (this machine, ``ssh_hosts``); these
    entries say why the clouds are missing instead of leaving an unexplained short list.
    """
    clouds = {n: c for n, c in provider_classes().items() if c.capabilities.requires_api_key}
    if any(c.is_configured(settings) for c in clouds.values()):
        return []
    return [
        (n, {"type": "NotConfigured", "provider": n, "message": how_to_configure(c)})
        for n, c in clouds.items()
    ]


def _error_dict(name: str, exc: BaseException) -> dict[str, Any]:
    if isinstance(exc, BrokerError):
        return exc.to_dict()
    return {"type": type(exc).__name__, "provider": name, "message": str(exc)}


def _timeout_dict(name: str, timeout_s: float) -> dict[str, Any]:
    return {
        "type": "Timeout",
        "provider": name,
        "message": f"no answer within {timeout_s:g}s (BROKER_SEARCH_TIMEOUT)",
    }


T = TypeVar("T")


def run_concurrently(
    jobs: Mapping[str, Callable[[], T]], timeout_s: float, *, label: str = "job"
) -> dict[str, tuple[T | None, BaseException | None, float]]:
    """Run every job on its own daemon thread; collect what finished within ``timeout_s``.

    Returns ``{key: (result, error, seconds)}`` for the jobs that finished in time; the others are
    simply absent. Their threads are daemons and run under :func:`broker.http.deadline`, so
    neither this call nor interpreter exit waits for them (a ``ThreadPoolExecutor``'s workers are
    joined at exit, which kept ``broker search`` alive behind one slow provider or SSH host).
    """
    started = time.monotonic()
    until = started + timeout_s
    done: queue.Queue[tuple[str, T | None, BaseException | None, float]] = queue.Queue()

    def work(key: str, job: Callable[[], T]) -> None:
        result: T | None = None
        error: BaseException | None = None
        try:
            with deadline(until):
                result = job()
        except BaseException as e:  # reported to the caller, never raised on this thread
            error = e
        done.put((key, result, error, round(time.monotonic() - started, 3)))

    for key, job in jobs.items():
        name = f"broker-{label}-{key}"
        threading.Thread(target=work, args=(key, job), name=name, daemon=True).start()
    out: dict[str, tuple[T | None, BaseException | None, float]] = {}
    while len(out) < len(jobs):
        left = until - time.monotonic()
        if left <= 0:
            break
        try:
            key, result, error, seconds = done.get(timeout=left)
        except queue.Empty:
            break
        out[key] = (result, error, seconds)
    return out


def fan_out(
    names: Sequence[str],
    search_one: Callable[[str], list[GPUOffer]],
    timeout_s: float,
    *,
    on_timeout: Callable[[str], None] | None = None,
) -> dict[str, Outcome]:
    """Run ``search_one(name)`` for every name concurrently; return by ``timeout_s`` at the latest.

    Providers that have not answered by then are reported as ``timeout`` and ``on_timeout`` is
    called for each (from this thread). Their threads are daemons and their requests are bounded
    by the same deadline, so neither this call nor the process waits for them.
    """
    jobs: dict[str, Callable[[], list[GPUOffer]]] = {
        n: (lambda n=n: search_one(n))  # type: ignore[misc]
        for n in names
    }
    finished = run_concurrently(jobs, timeout_s, label="search")
    out: dict[str, Outcome] = {}
    for n in names:
        if n not in finished:
            out[n] = Outcome(n, "timeout", [], timeout_s, _timeout_dict(n, timeout_s))
            if on_timeout is not None:
                on_timeout(n)
            continue
        offers, error, latency = finished[n]
        if error is None:
            out[n] = Outcome(n, "ok", offers or [], latency)
        elif isinstance(error, DeadlineExceededError):
            out[n] = Outcome(n, "timeout", [], timeout_s, _timeout_dict(n, timeout_s))
        else:
            out[n] = Outcome(n, "error", [], latency, _error_dict(n, error))
    return out


__all__ = [
    "ON_DEMAND_ONLY",
    "Outcome",
    "fan_out",
    "how_to_configure",
    "mentions",
    "run_concurrently",
    "unconfigured_clouds",
    "with_defaults",
]
