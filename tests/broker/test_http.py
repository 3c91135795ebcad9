"""The shared HTTP layer: retries, typed errors, redaction, create-once."""

from __future__ import annotations

import logging
from datetime import UTC, datetime

import httpx
import pytest
import respx
from pydantic import SecretStr

from broker.errors import (
    AuthError,
    InvalidRequestError,
    NotFoundError,
    ProviderUnavailableError,
    RateLimitedError,
)
from broker.http import (
    AmbiguousRequestError,
    HttpClient,
    create_once,
    parse_retry_after,
    redact,
    truncate,
)

KEY = "sk-test-SUPERSECRET-0123456789"
BASE = "https://api.example.test/v1"


class Sleeps:
    """Records backoff waits instead of sleeping."""

    def __init__(self) -> None:
        self.calls: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)


@pytest.fixture
def sleeps() -> Sleeps:
    return Sleeps()


@pytest.fixture
def client(sleeps: Sleeps) -> HttpClient:
    return HttpClient("demo", BASE, SecretStr(KEY), sleep=sleeps, max_attempts=4)


@respx.mock
def test_sends_bearer_header_and_returns_json(client: HttpClient) -> None:
    route = respx.get(f"{BASE}/things").mock(return_value=httpx.Response(200, json={"ok": 1}))
    assert client.get("/things") == {"ok": 1}
    assert route.calls.last.request.headers["Authorization"] == f"Bearer {KEY}"


@respx.mock
def test_429_then_ok_honours_retry_after(client: HttpClient, sleeps: Sleeps) -> None:
    route = respx.get(f"{BASE}/x").mock(
        side_effect=[
            httpx.Response(429, headers={"Retry-After": "7"}, json={"error": "slow down"}),
            httpx.Response(200, json=[1]),
        ]
    )
    assert client.get("/x") == [1]
    assert route.call_count == 2
    assert len(sleeps.calls) == 1
    assert 7.0 <= sleeps.calls[0] <= 7.1


@respx.mock
def test_retry_after_is_capped(sleeps: Sleeps) -> None:
    c = HttpClient("demo", BASE, SecretStr(KEY), sleep=sleeps, retry_after_cap=5)
    respx.get(f"{BASE}/x").mock(
        side_effect=[httpx.Response(429, headers={"Retry-After": "3600"}), httpx.Response(200)]
    )
    assert c.get("/x") is None
    assert sleeps.calls[0] <= 5.1


@respx.mock
def test_429_exhausted_raises_rate_limited_with_retry_after(
    client: HttpClient, sleeps: Sleeps
) -> None:
    respx.get(f"{BASE}/x").mock(
        return_value=httpx.Response(429, headers={"Retry-After": "2"}, json={"error": "limit"})
    )
    with pytest.raises(RateLimitedError) as ei:
        client.get("/x")
    assert ei.value.retry_after == 2.0
    assert ei.value.status_code == 429
    assert "limit" in ei.value.message
    assert len(sleeps.calls) == 3  # four attempts, three waits


@respx.mock
def test_500_then_ok_retries_with_backoff(client: HttpClient, sleeps: Sleeps) -> None:
    route = respx.get(f"{BASE}/x").mock(
        side_effect=[httpx.Response(500, text="boom"), httpx.Response(200, json={"a": 1})]
    )
    assert client.get("/x") == {"a": 1}
    assert route.call_count == 2
    assert len(sleeps.calls) == 1
    assert 0 <= sleeps.calls[0] <= 0.5


@respx.mock
def test_transport_error_retried(client: HttpClient, sleeps: Sleeps) -> None:
    route = respx.get(f"{BASE}/x").mock(
        side_effect=[httpx.ReadTimeout("slow"), httpx.Response(200, json={})]
    )
    assert client.get("/x") == {}
    assert route.call_count == 2


@pytest.mark.parametrize(
    ("status", "exc"),
    [
        (400, InvalidRequestError),
        (401, AuthError),
        (403, AuthError),
        (404, NotFoundError),
        (422, InvalidRequestError),
    ],
)
@respx.mock
def test_4xx_not_retried_and_typed(
    client: HttpClient, sleeps: Sleeps, status: int, exc: type[Exception]
) -> None:
    route = respx.get(f"{BASE}/x").mock(
        return_value=httpx.Response(status, json={"message": "bad thing happened"})
    )
    with pytest.raises(exc) as ei:
        client.get("/x")
    assert route.call_count == 1
    assert sleeps.calls == []
    assert "bad thing happened" in str(ei.value)
    assert f"HTTP {status}" in str(ei.value)
    assert "demo" in str(ei.value)


@respx.mock
def test_5xx_exhausted_is_provider_unavailable(client: HttpClient) -> None:
    respx.get(f"{BASE}/x").mock(return_value=httpx.Response(503, text="<html>down</html>"))
    with pytest.raises(ProviderUnavailableError) as ei:
        client.get("/x")
    assert ei.value.status_code == 503


@respx.mock
def test_malformed_json_is_unavailable_and_not_retried(client: HttpClient) -> None:
    route = respx.get(f"{BASE}/x").mock(return_value=httpx.Response(200, text="{not json"))
    with pytest.raises(ProviderUnavailableError, match="unreadable JSON"):
        client.get("/x")
    assert route.call_count == 1


@respx.mock
def test_non_idempotent_post_not_retried_on_5xx_or_timeout(client: HttpClient) -> None:
    route = respx.post(f"{BASE}/create").mock(return_value=httpx.Response(502))
    with pytest.raises(AmbiguousRequestError):
        client.post("/create", {"a": 1}, idempotent=False)
    assert route.call_count == 1
    route.mock(side_effect=httpx.ReadTimeout("read timed out"))
    with pytest.raises(AmbiguousRequestError):
        client.post("/create", {"a": 1}, idempotent=False)
    assert route.call_count == 2


@respx.mock
def test_non_idempotent_post_resent_only_when_never_sent(client: HttpClient) -> None:
    # A refused connection and a 429 both mean the provider did nothing: safe to send again.
    route = respx.post(f"{BASE}/create").mock(
        side_effect=[
            httpx.ConnectError("refused"),
            httpx.Response(429, headers={"Retry-After": "1"}),
            httpx.Response(200, json={"id": "i-1"}),
        ]
    )
    assert client.post("/create", {}, idempotent=False) == {"id": "i-1"}
    assert route.call_count == 3


@respx.mock
def test_key_never_in_errors_or_logs(client: HttpClient, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    echo = {"error": f"invalid key {KEY}; header was Authorization: Bearer {KEY}"}
    respx.get(f"{BASE}/x").mock(
        side_effect=[httpx.Response(500, json=echo), httpx.Response(401, json=echo)]
    )
    with pytest.raises(AuthError) as ei:
        client.get("/x")
    for text in (str(ei.value), repr(ei.value), str(ei.value.to_dict()), caplog.text):
        assert KEY not in text
    assert "***" in str(ei.value)
    assert KEY not in repr(client)


def test_redact_patterns() -> None:
    s = redact(f"GET /x?api_key={KEY}&a=1 Authorization: Bearer {KEY}", [])
    assert KEY not in s
    assert "a=1" in s
    assert redact("token=abc def", []) == "token=*** def"
    assert redact(f"x {KEY} y", [KEY]) == "x *** y"


def test_truncate() -> None:
    assert truncate("a\n  b") == "a b"
    assert len(truncate("x" * 1000, 50)) == 50


def test_parse_retry_after() -> None:
    assert parse_retry_after("5") == 5.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("garbage") is None
    now = datetime(2026, 1, 1, 0, 0, 0, tzinfo=UTC)
    assert parse_retry_after("Thu, 01 Jan 2026 00:00:30 GMT", now=now) == 30.0
    assert parse_retry_after("-3") == 0.0


def test_create_once_returns_found_instance_after_ambiguity() -> None:
    looked: list[str] = []

    def send() -> str:
        raise AmbiguousRequestError("timeout", provider="demo")

    def find(name: str) -> str | None:
        looked.append(name)
        return "inst-1"

    assert create_once("demo", "broker-1", send, find, sleep=lambda s: None) == "inst-1"
    assert looked == ["broker-1"]


def test_create_once_raises_when_nothing_found() -> None:
    def send() -> str:
        raise AmbiguousRequestError("timeout", provider="demo", status_code=None)

    with pytest.raises(ProviderUnavailableError, match="no instance with that name"):
        create_once("demo", "broker-1", send, lambda n: None, sleep=lambda s: None)


def test_create_once_lookup_failure_is_reported() -> None:
    def send() -> str:
        raise AmbiguousRequestError("timeout", provider="demo")

    def find(name: str) -> str | None:
        raise AuthError("nope", provider="demo")

    with pytest.raises(ProviderUnavailableError, match="lookup by name failed"):
        create_once("demo", "broker-1", send, find, sleep=lambda s: None)


def test_create_once_definite_errors_pass_through() -> None:
    calls: list[str] = []

    def send() -> str:
        raise InvalidRequestError("bad image", provider="demo", status_code=400)

    def find(name: str) -> str | None:
        calls.append(name)
        return None

    with pytest.raises(InvalidRequestError):
        create_once("demo", "broker-1", send, find)
    assert calls == []
