"""One exception tree for everything the broker raises.

Every provider error carries the provider's name, the HTTP status when there was one, and a short
message meant for a human. Messages never contain API keys: the HTTP layer redacts them before an
exception is built.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from broker.types import ProvisionAttempt


class BrokerError(Exception):
    """Base class of every error the broker raises on purpose."""

    def __init__(
        self,
        message: str,
        *,
        provider: str | None = None,
        status_code: int | None = None,
    ) -> None:
        self.message = message
        self.provider = provider
        self.status_code = status_code
        super().__init__(self.__str__())

    def __str__(self) -> str:
        parts = []
        if self.provider:
            parts.append(self.provider)
        if self.status_code is not None:
            parts.append(f"HTTP {self.status_code}")
        prefix = f"[{' '.join(parts)}] " if parts else ""
        return f"{prefix}{self.message}"

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(message={self.message!r}, provider={self.provider!r}, "
            f"status_code={self.status_code!r})"
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary (used by `--json` output and provider reports)."""
        return {
            "type": type(self).__name__,
            "provider": self.provider,
            "status_code": self.status_code,
            "message": self.message,
        }


class ConfigError(BrokerError):
    """The configuration is missing or invalid (a key, a path, a setting)."""


class QueryError(BrokerError, ValueError):
    """A query string or builder expression is malformed.

    ``column`` is 1-based and points at the offending token in the query text, when there is one.
    """

    def __init__(
        self,
        message: str,
        *,
        text: str | None = None,
        column: int | None = None,
        suggestion: str | None = None,
    ) -> None:
        self.text = text
        self.column = column
        self.suggestion = suggestion
        self.detail = message
        full = message
        if column is not None:
            full += f" at column {column}"
        if suggestion:
            full += f"; did you mean {suggestion!r}?"
        super().__init__(full)

    def caret(self) -> str:
        """The query text with a caret under the offending column (for terminals)."""
        if self.text is None or self.column is None:
            return ""
        return f"{self.text}\n{' ' * (self.column - 1)}^"


class ProviderError(BrokerError):
    """Base class of errors that come from a provider's API."""


class AuthError(ProviderError):
    """The API key is missing, wrong, or lacks permission (401/403)."""


class NoCapacityError(ProviderError):
    """The provider has no machine matching the request right now: try another offer."""


class RateLimitedError(ProviderError):
    """The provider asked us to slow down (429)."""

    def __init__(
        self,
        message: str,
        *,
        provider: str | None = None,
        status_code: int | None = 429,
        retry_after: float | None = None,
    ) -> None:
        self.retry_after = retry_after
        super().__init__(message, provider=provider, status_code=status_code)


class InvalidRequestError(ProviderError):
    """The provider rejected the request as malformed (4xx other than auth/limits)."""


class ProviderUnavailableError(ProviderError):
    """The provider's API is down, timing out, or answered with something unreadable."""


class AmbiguousCreateError(ProviderUnavailableError):
    """A create request went out and no clear answer came back; the instance may exist.

    Its journal entry stays open (marked abandoned), so ``broker instances reconcile`` terminates
    the instance if it turns up, and no further offer is tried (that could bill twice).
    """

    #: The journal name of the instance that may exist.
    instance_name: str | None = None


class StaleOfferError(ProviderError):
    """The offer changed or vanished between search and create (price, stock, or id)."""


class NotFoundError(ProviderError):
    """The instance (or other object) does not exist at the provider."""


class ProvisionError(BrokerError):
    """Every offer tried during a create failed; ``attempts`` lists each one with its error."""

    def __init__(
        self,
        message: str,
        attempts: Sequence[ProvisionAttempt] = (),
        *,
        abandoned: Sequence[str] = (),
    ) -> None:
        self.attempts = list(attempts)
        #: Names of instances whose cleanup could not be confirmed: they may still bill until
        #: ``broker instances reap``/``reconcile`` finishes the terminate.
        self.abandoned = list(abandoned)
        super().__init__(message)

    def __str__(self) -> str:
        lines = [self.message]
        for a in self.attempts:
            lines.append(f"  - {a.provider} {a.offer_id}: {a.error_type}: {a.error}")
        for name in self.abandoned:
            lines.append(
                f"  ! {name} may still be billing (cleanup unconfirmed): "
                "run `broker instances reap` or `broker instances reconcile`"
            )
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """JSON form with the abandoned instances."""
        d = super().to_dict()
        d["abandoned"] = list(self.abandoned)
        return d


class GuardError(BrokerError):
    """A safety guard refused the request before any provider was called."""


class PriceLimitError(GuardError):
    """The offer costs more per hour than the configured ``max_price_per_hour``."""


class BudgetExceededError(GuardError):
    """Creating the instance would take the estimated spend past the total budget."""


class ReadinessError(BrokerError):
    """An instance did not become usable; ``stage`` names where it got stuck.

    Stages, in order: ``provider`` (running at the provider), ``endpoint`` (SSH endpoint
    published), ``tcp`` (port open), ``login`` (SSH login with our key), ``probe`` (the GPUs are the
    ones we paid for).
    """

    def __init__(
        self,
        message: str,
        *,
        stage: str,
        provider: str | None = None,
        instance_id: str | None = None,
        name: str | None = None,
        elapsed_s: float | None = None,
        kept: bool = False,
    ) -> None:
        self.stage = stage
        #: True when the failed instance's cleanup terminate could not be confirmed.
        self.cleanup_failed = False
        self.instance_id = instance_id
        self.name = name
        self.elapsed_s = elapsed_s
        self.kept = kept
        super().__init__(message, provider=provider)

    def __str__(self) -> str:
        who = self.name or self.instance_id or "instance"
        tail = "; kept running (keep_on_failure)" if self.kept else ""
        took = f" after {self.elapsed_s:.0f}s" if self.elapsed_s is not None else ""
        return f"{who} not ready at stage '{self.stage}'{took}: {super().__str__()}{tail}"

    def to_dict(self) -> dict[str, Any]:
        """JSON form with the stage."""
        d = super().to_dict()
        d.update(stage=self.stage, instance_id=self.instance_id, name=self.name, kept=self.kept)
        return d


class TerminateError(BrokerError):
    """A terminate could not be confirmed; the journal keeps the instance open to retry."""


class JournalError(BrokerError):
    """The journal (SQLite in the state dir) cannot be opened, read or written.

    The message names the file and what to do; it is one line, never a traceback.
    """


__all__ = [
    "AmbiguousCreateError",
    "AuthError",
    "BrokerError",
    "BudgetExceededError",
    "ConfigError",
    "GuardError",
    "InvalidRequestError",
    "JournalError",
    "NoCapacityError",
    "NotFoundError",
    "PriceLimitError",
    "ProviderError",
    "ProviderUnavailableError",
    "ProvisionError",
    "QueryError",
    "RateLimitedError",
    "ReadinessError",
    "StaleOfferError",
    "TerminateError",
]
