"""The provider protocol, its declared capabilities, and the one registry.

Adding a provider is one new module in ``broker/providers/`` that defines a :class:`Provider`
subclass decorated with :func:`register`; the registry discovers modules by scanning the package,
so nothing else needs editing.
"""

from __future__ import annotations

import importlib
import pkgutil
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Self, TypeVar

from broker.errors import ConfigError, InvalidRequestError
from broker.types import CreateRequest, GPUOffer, Instance

if TYPE_CHECKING:
    from pydantic import SecretStr

    from broker.config import Settings
    from broker.http import HttpClient
    from broker.query import Query


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
    "Capabilities",
    "HttpProvider",
    "Provider",
    "get_provider_class",
    "provider_classes",
    "register",
]
