"""The one HTTP layer every cloud adapter uses: timeouts, retries, typed errors, redaction.

Rules this module enforces so that adapters cannot get them wrong:

* Retries (tenacity, exponential backoff with full jitter) happen only on 429, 5xx and transport
  errors, never on other 4xx. A 429's ``Retry-After`` is honoured, capped at ``retry_after_cap``.
* Responses map to the typed errors of :mod:`broker.errors`: 401/403 → AuthError, 404 →
  NotFoundError, 429 → RateLimitedError, other 4xx → InvalidRequestError, 5xx / transport /
  unreadable JSON → ProviderUnavailableError. Messages carry the provider's own error text,
  truncated and redacted.
* Requests that create something are sent with ``idempotent=False``: they are retried only when the
  provider certainly did not act on them (429, or the connection was never established). A failure
  after the request may have reached the provider raises :class:`AmbiguousRequestError`, and
  :func:`create_once` then looks the instance up by its unique name before giving up.
* The API key stays a :class:`~pydantic.SecretStr` until the ``Authorization`` header is built for
  one request, and it is scrubbed from every error message and log line.
"""

from __future__ import annotations

import contextlib
import contextvars
import email.utils
import json
import logging
import random
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import UTC, datetime
from typing import Any, TypeVar

import httpx
from pydantic import SecretStr
from tenacity import RetryCallState, Retrying, retry_if_exception, stop_after_attempt

from broker.errors import (
    AuthError,
    BrokerError,
    InvalidRequestError,
    NotFoundError,
    ProviderError,
    ProviderUnavailableError,
    RateLimitedError,
)

log = logging.getLogger(__name__)

#: Default timeouts: connecting should be quick; clouds can be slow to answer a search.
DEFAULT_TIMEOUT = httpx.Timeout(connect=5.0, read=30.0, write=10.0, pool=5.0)
#: Longest provider error text kept in an exception message.
MAX_ERROR_TEXT = 300
REDACTED = "***"

T = TypeVar("T")

_BEARER = re.compile(r"(?i)(bearer\s+)[^\s\"',]+")
_AUTH_HEADER = re.compile(r"(?i)(authorization[\"']?\s*[:=]\s*[\"']?)[^\"'\n,}]+")
# api_key=VALUE in URLs/forms and "api_key": "VALUE" in JSON; a bare "api_key: word" in prose is
# left alone (the key itself is always replaced by value, whatever surrounds it).
_KEY_PARAM = re.compile(r"(?i)\b((?:api_?key|apikey|access_token|token|key)=)[^&\s\"']+")
_KEY_JSON = re.compile(r"(?i)(\"(?:api_?key|apikey|access_token|token|key)\"\s*:\s*\")[^\"]+")


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` with every given secret, Bearer token and ``api_key=...`` value replaced."""
    for s in secrets:
        if s:
            text = text.replace(s, REDACTED)
    text = _BEARER.sub(rf"\g<1>{REDACTED}", text)
    text = _AUTH_HEADER.sub(rf"\g<1>{REDACTED}", text)
    text = _KEY_JSON.sub(rf"\g<1>{REDACTED}", text)
    return _KEY_PARAM.sub(rf"\g<1>{REDACTED}", text)


def truncate(text: str, limit: int = MAX_ERROR_TEXT) -> str:
    """One line of at most ``limit`` characters (provider error pages can be huge HTML)."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


#: The monotonic time by which the current call must be answered (None: no deadline). A context
#: variable, so one search's deadline bounds every request its provider makes on that thread.
_DEADLINE: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "broker_http_deadline", default=None
)


@contextlib.contextmanager
def deadline(at: float | None) -> Iterator[None]:
    """Within this block no request outlives ``at`` (``time.monotonic()``), retries included.

    Each request's timeouts are cut to the time left, backoff waits never pass it, and once it has
    passed a request raises :class:`DeadlineExceededError` instead of being sent. ``GPUClient``
    sets it around every provider search, so a slow provider stops at the search timeout.
    """
    token = _DEADLINE.set(at)
    try:
        yield
    finally:
        _DEADLINE.reset(token)


def time_left() -> float | None:
    """Seconds until the current deadline (None when there is none; may be negative)."""
    at = _DEADLINE.get()
    return None if at is None else at - time.monotonic()


class DeadlineExceededError(ProviderUnavailableError):
    """The caller's deadline passed (a search timeout); the request was cut short or not sent."""


class AmbiguousRequestError(ProviderUnavailableError):
    """The request may have reached the provider, but we don't know whether it acted on it.

    Raised for a timeout or dropped connection after the request was sent, a 5xx, or an unreadable
    success body. For a create this means an instance may exist: look it up by name before
    reporting failure (see :func:`create_once`).
    """


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or an HTTP date)."""
    if value is None or not value.strip():
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


class BearerAuth(httpx.Auth):
    """Adds ``Authorization: Bearer <key>``, revealing the secret only while building the header."""

    def __init__(self, key: SecretStr) -> None:
        self._key = key

    def auth_flow(self, request: httpx.Request) -> Any:
        """httpx hook: set the header on the outgoing request."""
        request.headers["Authorization"] = f"Bearer {self._key.get_secret_value()}"
        yield request

    def __repr__(self) -> str:
        return "BearerAuth(***)"


def _error_text(response: httpx.Response) -> str:
    """The provider's own error words from a JSON or text body."""
    try:
        body = response.json()
    except (ValueError, UnicodeDecodeError):
        return response.text
    if isinstance(body, dict):
        # Providers pair a code with a sentence ({"error": "no_such_ask", "msg": "..."}): keep both.
        parts: list[str] = []
        for k in ("error", "message", "msg", "detail", "errors", "error_description"):
            v = body.get(k)
            if not v:
                continue
            if isinstance(v, dict):
                v = v.get("message") or v.get("code") or json.dumps(v)
            text = v if isinstance(v, str) else json.dumps(v)
            if text not in parts:
                parts.append(text)
        if parts:
            return ": ".join(parts)
    return response.text


class HttpClient:
    """A sync httpx client bound to one provider's base URL and key.

    ``sleep`` is how backoff waits happen; tests pass a recorder so no test really sleeps.
    """

    def __init__(
        self,
        provider: str,
        base_url: str,
        api_key: SecretStr | None,
        *,
        timeout: httpx.Timeout | float = DEFAULT_TIMEOUT,
        max_attempts: int = 4,
        backoff_base: float = 0.5,
        backoff_max: float = 20.0,
        retry_after_cap: float = 60.0,
        sleep: Callable[[float], None] = time.sleep,
        headers: Mapping[str, str] | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.provider = provider
        self.base_url = base_url.rstrip("/")
        self._api_key = api_key
        self.max_attempts = max(1, max_attempts)
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.retry_after_cap = retry_after_cap
        self._sleep = sleep
        self._timeout = timeout if isinstance(timeout, httpx.Timeout) else httpx.Timeout(timeout)
        self._closed = False
        self._client = httpx.Client(
            base_url=self.base_url,
            timeout=timeout,
            auth=BearerAuth(api_key) if api_key is not None else None,
            headers={
                "Accept": "application/json",
                "User-Agent": "gpu-broker/0.1",
                **(headers or {}),
            },
            transport=transport,
        )

    # -- public API -------------------------------------------------------------------------

    def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        json_body: Any = None,
        idempotent: bool = True,
        expect_json: bool = True,
    ) -> Any:
        """Send one request and return its decoded JSON body (None for an empty body).

        ``idempotent=False`` (creates): retried only on 429 and on failures to connect, because
        only those guarantee the provider did nothing; anything else raises at once.
        """
        retryable = _is_retryable if idempotent else _is_safe_to_resend
        retrying = Retrying(
            retry=retry_if_exception(retryable),
            stop=stop_after_attempt(self.max_attempts),
            wait=self._wait,
            sleep=self._sleep_within_deadline,
            before_sleep=self._log_retry,
            reraise=True,
        )
        return retrying(self._send_once, method, path, params, json_body, expect_json)

    def get(self, path: str, *, params: Mapping[str, Any] | None = None) -> Any:
        """GET with retries."""
        return self.request("GET", path, params=params)

    def post(self, path: str, json_body: Any = None, *, idempotent: bool = True) -> Any:
        """POST; pass ``idempotent=False`` for anything that creates."""
        return self.request("POST", path, json_body=json_body, idempotent=idempotent)

    def put(self, path: str, json_body: Any = None, *, idempotent: bool = True) -> Any:
        """PUT; pass ``idempotent=False`` for anything that creates."""
        return self.request("PUT", path, json_body=json_body, idempotent=idempotent)

    def delete(self, path: str, *, params: Mapping[str, Any] | None = None) -> Any:
        """DELETE with retries (deleting twice is harmless)."""
        return self.request("DELETE", path, params=params, expect_json=False)

    def redact(self, text: str) -> str:
        """``text`` with this client's key (and anything key-shaped) removed."""
        secrets = [self._api_key.get_secret_value()] if self._api_key is not None else []
        return redact(text, secrets)

    def close(self) -> None:
        """Close the connection pool; later requests fail at once (never silently reopen)."""
        self._closed = True
        self._client.close()

    def __repr__(self) -> str:
        return f"HttpClient(provider={self.provider!r}, base_url={self.base_url!r})"

    # -- internals --------------------------------------------------------------------------

    def _send_once(
        self, method: str, path: str, params: Mapping[str, Any] | None, body: Any, expect_json: bool
    ) -> Any:
        if self._closed:
            # Closed by a search that gave up on this provider: a straggling retry must not
            # reach the provider any more.
            raise DeadlineExceededError(
                f"{method} {path}: cancelled (the client was closed)", provider=self.provider
            )
        timeout = self._request_timeout(method, path)
        started = time.monotonic()
        try:
            response = self._client.request(method, path, params=params, json=body, timeout=timeout)
        except (httpx.TransportError, RuntimeError) as e:
            left = time_left()
            if self._closed or (left is not None and left <= 0.05):
                # Cut short by the caller's deadline (or by close()): a timeout, not a fault.
                raise DeadlineExceededError(
                    f"{method} {path}: no answer within the search timeout", provider=self.provider
                ) from None
            if not isinstance(e, httpx.TransportError):
                raise
            raise self._transport_error(method, path, e) from None
        elapsed = time.monotonic() - started
        log.debug(
            "%s %s %s -> %s in %.2fs", self.provider, method, path, response.status_code, elapsed
        )
        self._raise_for_status(method, path, response)
        if not response.content.strip():
            return None
        try:
            return response.json()
        except (ValueError, UnicodeDecodeError):
            if not expect_json:
                return None
            raise AmbiguousRequestError(
                self._msg(f"{method} {path}: unreadable JSON: {truncate(response.text, 120)}"),
                provider=self.provider,
                status_code=response.status_code,
            ) from None

    def _transport_error(
        self, method: str, path: str, e: httpx.TransportError
    ) -> ProviderUnavailableError:
        if isinstance(e, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout):
            # The request never left this machine: safe to send again.
            return _NotSentError(
                self._msg(f"{method} {path}: cannot connect ({type(e).__name__}: {e})"),
                provider=self.provider,
            )
        return AmbiguousRequestError(
            self._msg(f"{method} {path}: {type(e).__name__} after sending: {e}"),
            provider=self.provider,
        )

    def _request_timeout(self, method: str, path: str) -> httpx.Timeout:
        """The client's timeouts, each cut to the time the current deadline leaves."""
        left = time_left()
        if left is None:
            return self._timeout
        if left <= 0:
            raise DeadlineExceededError(
                f"{method} {path}: not sent, the search timeout has passed", provider=self.provider
            )

        def cut(t: float | None) -> float:
            return left if t is None else min(t, left)

        t = self._timeout
        return httpx.Timeout(
            connect=cut(t.connect), read=cut(t.read), write=cut(t.write), pool=cut(t.pool)
        )

    def _sleep_within_deadline(self, seconds: float) -> None:
        """Backoff that never sleeps past the deadline (the next attempt then stops at once)."""
        left = time_left()
        if left is not None:
            seconds = max(0.0, min(seconds, left))
        self._sleep(seconds)

    def _raise_for_status(self, method: str, path: str, response: httpx.Response) -> None:
        code = response.status_code
        if code < 400:
            return
        text = self._msg(f"{method} {path}: {truncate(_error_text(response))}")
        if code in (401, 403):
            raise AuthError(text, provider=self.provider, status_code=code)
        if code == 404:
            raise NotFoundError(text, provider=self.provider, status_code=code)
        if code == 429:
            raise RateLimitedError(
                text,
                provider=self.provider,
                status_code=code,
                retry_after=parse_retry_after(response.headers.get("Retry-After")),
            )
        if code >= 500:
            raise AmbiguousRequestError(text, provider=self.provider, status_code=code)
        raise InvalidRequestError(text, provider=self.provider, status_code=code)

    def _msg(self, text: str) -> str:
        return truncate(self.redact(text), MAX_ERROR_TEXT + 80)

    def _wait(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome is not None else None
        if isinstance(exc, RateLimitedError) and exc.retry_after is not None:
            # The provider said how long; a small jitter keeps parallel clients apart.
            return min(self.retry_after_cap, exc.retry_after) + random.uniform(0, 0.1)
        # Full jitter: uniform in [0, base * 2^(n-1)], capped.
        ceiling = min(self.backoff_max, self.backoff_base * 2 ** (state.attempt_number - 1))
        return random.uniform(0, ceiling)

    def _log_retry(self, state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome is not None else None
        wait = state.next_action.sleep if state.next_action is not None else 0.0
        # str(exc) is already redacted: errors are built from _msg().
        log.warning(
            "%s: attempt %d failed (%s); retrying in %.1fs",
            self.provider,
            state.attempt_number,
            exc,
            wait,
        )


class _NotSentError(ProviderUnavailableError):
    """The connection was never established (internal: safe to retry even for creates)."""


def _is_retryable(exc: BaseException) -> bool:
    if isinstance(exc, DeadlineExceededError):
        return False
    if isinstance(exc, RateLimitedError | ProviderUnavailableError):
        # Unreadable JSON on a 2xx is not a transient fault: retrying the same read won't fix it.
        return not (isinstance(exc, AmbiguousRequestError) and _is_bad_body(exc))
    return False


def _is_safe_to_resend(exc: BaseException) -> bool:
    return isinstance(exc, RateLimitedError | _NotSentError)


def _is_bad_body(exc: ProviderError) -> bool:
    return exc.status_code is not None and exc.status_code < 400


def create_once(
    provider: str,
    name: str,
    send: Callable[[], T],
    find_by_name: Callable[[str], T | None],
    *,
    lookups: int = 2,
    lookup_delay: float = 2.0,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Run a create exactly once; after an ambiguous failure, look for the instance by name.

    Returns what ``send`` returned, or the instance ``find_by_name`` found after an ambiguous
    failure (the provider did create it). When nothing is found the original error is raised, with
    a note that the lookup came back empty, so the caller knows no instance is billing under that
    name as far as the provider's list shows.
    """
    try:
        return send()
    except AmbiguousRequestError as first:
        log.warning("%s: create of %r ended ambiguously (%s); looking it up", provider, name, first)
        lookup_error: BrokerError | None = None
        for i in range(max(1, lookups)):
            if i:
                sleep(lookup_delay)  # the provider's list can lag the create by a moment
            try:
                found = find_by_name(name)
            except BrokerError as e:
                lookup_error = e
                continue
            if found is not None:
                log.info(
                    "%s: create of %r had succeeded; using the existing instance", provider, name
                )
                return found
        if lookup_error is not None:
            raise ProviderUnavailableError(
                f"create of {name!r} ended ambiguously ({first.message}) and the lookup by name "
                f"failed too ({lookup_error.message}): an instance may exist, check the provider",
                provider=provider,
                status_code=first.status_code,
            ) from first
        raise ProviderUnavailableError(
            f"create of {name!r} failed ({first.message}); no instance with that name exists",
            provider=provider,
            status_code=first.status_code,
        ) from first


M = TypeVar("M")


def parse_as(provider: str, model: type[M], data: Any, what: str) -> M:
    """Validate ``data`` against a wire model; a shape we don't understand is the provider's fault.

    Raised as :class:`ProviderUnavailableError` so a changed API reads as a provider failure (shown
    in the per-provider report), never as an empty result.
    """
    from pydantic import TypeAdapter, ValidationError

    try:
        return TypeAdapter(model).validate_python(data)
    except ValidationError as e:
        errs = e.errors()
        loc = ".".join(str(p) for p in errs[0]["loc"]) if errs else ""
        msg = errs[0]["msg"] if errs else "invalid"
        raise ProviderUnavailableError(
            f"unexpected {what} response shape: {loc}: {msg} ({e.error_count()} problem(s))",
            provider=provider,
        ) from None


__all__ = [
    "DEFAULT_TIMEOUT",
    "AmbiguousRequestError",
    "BearerAuth",
    "DeadlineExceededError",
    "HttpClient",
    "create_once",
    "deadline",
    "parse_as",
    "parse_retry_after",
    "redact",
    "time_left",
    "truncate",
]
