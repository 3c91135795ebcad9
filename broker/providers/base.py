"""The provider protocol, its declared capabilities, and the one registry.

Adding a provider is one new module in ``broker/providers/`` that defines a :class:`Provider`
subclass decorated with :func:`register`; the registry discovers modules by scanning the package,
so nothing else needs editing.
"""

from __future__ import annotations

import importlib
import logging
import pkgutil
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Self, TypeVar

from pydantic import BaseModel, ConfigDict

from broker.errors import (
    BrokerError,
    ConfigError,
    InvalidRequestError,
    NoCapacityError,
    ProviderUnavailableError,
)
from broker.types import (
    CreateRequest,
    GPUOffer,
    Instance,
    InstanceStatus,
    Manufacturer,
)

if TYPE_CHECKING:
    from pydantic import SecretStr

    from broker.config import Settings
    from broker.http import HttpClient
    from broker.query import Query


log = logging.getLogger(__name__)


class Wire(BaseModel):
    """Base of every adapter's wire models: unknown fields are ignored (APIs grow fields)."""

    model_config = ConfigDict(extra="ignore")


#: Words the providers use for "no capacity for that offer right now" (RunPod's "There are no
#: longer any instances available", Lambda's insufficient-capacity, Vast's no_such_ask, Prime's
#: out of stock). Such an error means: try the next offer.
CAPACITY_PHRASES = (
    "no longer any instances available",
    "no instances available",
    "not enough free gpus",
    "there are no instances",
    "insufficient-capacity",
    "not enough capacity",
    "insufficient capacity",
    "insufficient resources",
    "out of stock",
    "no capacity",
    "not available",
    "sold out",
    "no_such_ask",
    "no longer available",
    "already rented",
    "is rented",
)


def is_capacity_message(text: str) -> bool:
    """Whether a provider's error text says there is no capacity for the offer."""
    low = text.lower()
    return any(p in low for p in CAPACITY_PHRASES)


def capacity_or_same(e: InvalidRequestError) -> InvalidRequestError | NoCapacityError:
    """A 4xx whose text says "no capacity" as a NoCapacityError (the caller tries the next
    offer); any other error unchanged."""
    if is_capacity_message(e.message):
        return NoCapacityError(e.message, provider=e.provider, status_code=e.status_code)
    return e


def created_instance(
    provider: str, request: CreateRequest, instance_id: str, provider_status: str
) -> Instance:
    """The instance a create just asked for, described by the offer it was created from (for
    APIs whose create answers with an id only)."""
    offer = request.offer
    return Instance(
        provider=provider,
        instance_id=instance_id,
        name=request.name,
        status=InstanceStatus.PROVISIONING,
        provider_status=provider_status,
        gpu_type=offer.gpu_type,
        gpu_count=offer.gpu_count,
        price_per_hour=offer.price_per_hour,
        spot=offer.spot,
        offer=offer,
    )


def cpu_only_offer(**fields: Any) -> GPUOffer:
    """The offer of a machine without GPUs (``local`` and ``ssh`` hosts without nvidia-smi)."""
    return GPUOffer(
        **fields,
        gpu_type="CPU only",
        gpu_provider_name="none",
        manufacturer=Manufacturer.NONE,
        gpu_known=True,
        gpu_count=0,
        vram_gb=None,
    )


W = TypeVar("W", bound=BaseModel)


def parse_listing(
    provider: str,
    model: type[W],
    items: Any,
    what: str,
    build: Callable[[W], Instance],
    *,
    status_of: Callable[[Mapping[str, Any]], InstanceStatus],
    status_key: str = "status",
    name_key: str = "name",
) -> list[Instance]:
    """An instance listing parsed entry by entry.

    One odd entry (a field missing or of a new type) must not fail the whole listing: that would
    hide every live instance from ``find_by_name`` and reconcile. An entry that does not parse
    keeps its id, name and status, is marked with ``extra["unparsed"]`` (the rest unknown) and
    logged as a warning; only an entry without an id is left out (and warned about).
    """
    from broker.http import parse_as

    if not isinstance(items, list):
        raise ProviderUnavailableError(
            f"unexpected {what} response shape: not a list ({type(items).__name__})",
            provider=provider,
        )
    out: list[Instance] = []
    for i, raw in enumerate(items):
        try:
            out.append(build(parse_as(provider, model, raw, what)))
            continue
        except (BrokerError, ValueError, TypeError, AttributeError) as e:
            problem = getattr(e, "message", None) or str(e)
        ident = raw.get("id") if isinstance(raw, Mapping) else None
        if ident is None or isinstance(ident, dict | list):
            log.warning("%s: %s entry %d has no id, left out: %s", provider, what, i, problem)
            continue
        name = raw.get(name_key)
        status_word = raw.get(status_key)
        try:
            status = status_of(raw)
        except (ValueError, TypeError, AttributeError):
            status = InstanceStatus.UNKNOWN
        log.warning(
            "%s: %s entry %s did not parse (%s); kept with its id, name and status only",
            provider,
            what,
            ident,
            problem,
        )
        out.append(
            Instance(
                provider=provider,
                instance_id=str(ident),
                name=name if isinstance(name, str) else None,
                status=status,
                provider_status=status_word if isinstance(status_word, str) else None,
                extra={"unparsed": problem},
            )
        )
    return out


@dataclass(frozen=True)
class Capabilities:
    """What a provider's API can do; the client checks these before calling."""

    search: bool = True
    create: bool = True
    terminate: bool = True
    stop_resume: bool = False
    spot: bool = False
    provider_ttl: bool = False  # the provider itself terminates after a TTL (RunPod terminateAfter)
    ssh_key_registry: bool = False  # named SSH keys registered in the account (Lambda)
    requires_api_key: bool = True
    # The user's own long-lived machines: their host keys stay pinned (a fresh cloud box at a
    # reused IP:port legitimately has a new key; a known machine with a new key is an alarm).
    persistent_hosts: bool = False
    pushdown: tuple[str, ...] = ()  # query fields the provider can filter on server-side

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form for ``broker providers --json``."""
        d = asdict(self)
        d["pushdown"] = list(self.pushdown)
        return d


class Provider(ABC):
    """One cloud (or this machine) behind the same operations.

    Every method either returns real data or raises a :class:`broker.errors.BrokerError` subclass:
    a failed call never turns into an empty list.
    """

    name: ClassVar[str]
    display_name: ClassVar[str]
    capabilities: ClassVar[Capabilities]

    @classmethod
    @abstractmethod
    def is_configured(cls, settings: Settings) -> bool:
        """Whether settings hold what this provider needs (usually an API key)."""

    @classmethod
    @abstractmethod
    def from_settings(cls, settings: Settings) -> Provider:
        """Build a ready-to-use adapter; raise ConfigError when something is missing."""

    @abstractmethod
    def search(self, query: Query) -> list[GPUOffer]:
        """Offers that may match ``query``; the caller re-checks every predicate locally."""

    @abstractmethod
    def create(self, request: CreateRequest) -> Instance:
        """Create one instance from one offer; never silently switch to another price or type."""

    @abstractmethod
    def get(self, instance_id: str) -> Instance:
        """The instance's current state; NotFoundError when the provider does not know it."""

    @abstractmethod
    def list_instances(self) -> list[Instance]:
        """Every instance of this account (not only ours)."""

    @abstractmethod
    def terminate(self, instance_id: str) -> None:
        """Ask the provider to destroy the instance (idempotent: already gone is fine)."""

    def find_by_name(self, name: str) -> Instance | None:
        """The instance with this unique name, if any (used after an ambiguous create)."""
        for inst in self.list_instances():
            if inst.name == name:
                return inst
        return None

    def stop(self, instance_id: str) -> None:
        """Stop (pause) an instance; only where ``capabilities.stop_resume``."""
        raise InvalidRequestError(f"{self.name} cannot stop instances", provider=self.name)

    def resume(self, instance_id: str) -> None:
        """Resume a stopped instance; only where ``capabilities.stop_resume``."""
        raise InvalidRequestError(f"{self.name} cannot resume instances", provider=self.name)

    def close(self) -> None:  # noqa: B027 - optional hook, most adapters have nothing to close
        """Release HTTP clients and other resources."""

    def __enter__(self) -> Provider:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"


class HttpProvider(Provider):
    """A cloud reached over its HTTP API with one API key: the shared setup of those adapters.

    Subclasses set ``api_url`` and ``key_variable`` (the environment variable named in errors)
    and use ``self._http`` (retries, typed errors, redaction), ``self._sleep`` (backoff waits)
    and ``self._ssh_public_key``.
    """

    api_url: ClassVar[str]
    key_variable: ClassVar[str]

    def __init__(
        self,
        api_key: SecretStr,
        *,
        ssh_public_key: str | None = None,
        base_url: str | None = None,
        sleep: Callable[[float], None] = time.sleep,
        http: HttpClient | None = None,
    ) -> None:
        from broker.http import HttpClient

        self._sleep = sleep
        self._ssh_public_key = ssh_public_key
        self._http = http or HttpClient(self.name, base_url or self.api_url, api_key, sleep=sleep)

    @classmethod
    def is_configured(cls, settings: Settings) -> bool:
        """True when this provider's API key is set."""
        return settings.api_key(cls.name) is not None

    @classmethod
    def base_url(cls, settings: Settings) -> str:
        """The API's base URL (a provider with a settings override redefines this)."""
        return cls.api_url

    @classmethod
    def from_settings(cls, settings: Settings) -> Self:
        """Adapter using the provider's API key and the configured SSH public key."""
        key = settings.api_key(cls.name)
        if key is None:
            raise ConfigError(f"{cls.display_name} needs {cls.key_variable}", provider=cls.name)
        return cls(key, ssh_public_key=settings.ssh_public_key(), base_url=cls.base_url(settings))

    def close(self) -> None:
        """Close the HTTP client."""
        self._http.close()


P = TypeVar("P", bound=type[Provider])

_REGISTRY: dict[str, type[Provider]] = {}
_discovered = False


def register(cls: P) -> P:
    """Class decorator: make a provider known under ``cls.name``."""
    existing = _REGISTRY.get(cls.name)
    if existing is not None and existing is not cls:
        raise ConfigError(f"two providers registered under the name {cls.name!r}")
    _REGISTRY[cls.name] = cls
    return cls


def _discover() -> None:
    global _discovered
    if _discovered:
        return
    import broker.providers as pkg

    for mod in pkgutil.iter_modules(pkg.__path__):
        if mod.name.startswith("_") or mod.name == "base":
            continue
        importlib.import_module(f"{pkg.__name__}.{mod.name}")
    _discovered = True


def provider_classes() -> dict[str, type[Provider]]:
    """Every registered provider class by name, sorted by name."""
    _discover()
    return dict(sorted(_REGISTRY.items()))


def get_provider_class(name: str) -> type[Provider]:
    """Look up a provider class; a typo gets the closest known name in the error."""
    import difflib

    classes = provider_classes()
    if name in classes:
        return classes[name]
    close = difflib.get_close_matches(name, list(classes), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise ConfigError(f"unknown provider {name!r} (known: {', '.join(classes)}){hint}")


__all__ = [
    "CAPACITY_PHRASES",
    "Capabilities",
    "HttpProvider",
    "Provider",
    "Wire",
    "capacity_or_same",
    "cpu_only_offer",
    "created_instance",
    "get_provider_class",
    "is_capacity_message",
    "parse_listing",
    "provider_classes",
    "register",
]
