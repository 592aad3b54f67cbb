"""OAuth2 client credentials (token cache, single flight, 401 handling) and API-key auth."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, cast
from urllib.parse import parse_qs

import anyio
import httpx
import pytest

from cognigy_offload.auth import (
    ApiKeyAuth,
    OAuth2ClientCredentials,
    build_auth,
    cache_life_s,
    parse_expires_in,
)
from cognigy_offload.config import AuthConfig, CognigyConfig, Secrets
from cognigy_offload.errors import DeliveryError, TokenError
from cognigy_offload.metrics import Metrics

from .faketime import FakeTime, settle

pytestmark = pytest.mark.anyio

TOKEN_URL = "https://api.example.test/auth/oauth2/token"
API_URL = "https://api.example.test/new/v2.0/sessions/s/context/inject"
SECRET = "s3cret-Client-Value-0042"


class FakeCognigy:
    """A MockTransport handler: a token endpoint and one API route that checks the token."""

    def __init__(self, expires_in: Any = 3600) -> None:
        self.expires_in = expires_in
        self.token_status = 200
        self.token_body: Any = None
        self.token_error: Exception | None = None
        self.token_gate: anyio.Event | None = None
        self.api_gate: anyio.Event | None = None
        self.token_forms: list[dict[str, str]] = []
        self.api_auth: list[str | None] = []
        self.valid: set[str] = set()
        self.issued = 0

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        if str(request.url) == TOKEN_URL:
            return await self.token(request)
        self.api_auth.append(request.headers.get("Authorization"))
        if self.api_gate is not None:
            await self.api_gate.wait()
        bearer = request.headers.get("Authorization", "").removeprefix("Bearer ")
        return httpx.Response(200 if bearer in self.valid else 401, json={})

    async def token(self, request: httpx.Request) -> httpx.Response:
        form = {k: v[0] for k, v in parse_qs(request.content.decode(), True).items()}
        self.token_forms.append(form)
        if self.token_gate is not None:
            await self.token_gate.wait()
        if self.token_error is not None:
            raise self.token_error
        if self.token_body is not None or self.token_status != 200:
            return httpx.Response(self.token_status, json=self.token_body)
        self.issued += 1
        token = f"tok-{self.issued}"
        self.valid.add(token)
        body: dict[str, Any] = {"access_token": token, "token_type": "Bearer"}
        if self.expires_in is not ...:
            body["expires_in"] = self.expires_in
        return httpx.Response(200, json=body)


@pytest.fixture
def cognigy() -> FakeCognigy:
    return FakeCognigy()


@pytest.fixture
async def client(cognigy: FakeCognigy) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(transport=httpx.MockTransport(cognigy)) as c:
        yield c


def oauth(
    client: httpx.AsyncClient,
    ft: FakeTime,
    metrics: Metrics | None = None,
    margin_s: float = 60.0,
) -> OAuth2ClientCredentials:
    return OAuth2ClientCredentials(
        TOKEN_URL,
        "my-client",
        SECRET,
        "api",
        client,
        metrics,
        refresh_margin_s=margin_s,
        clock=ft.clock,
    )


def fetches(metrics: Metrics, outcome: str) -> float:
    value = metrics.registry.get_sample_value(
        "cognigy_offload_token_fetches_total", {"outcome": outcome}
    )
    return value or 0.0


# -- the token request and the cache -------------------------------------------------------


async def test_token_request_is_a_client_credentials_form_post(
    cognigy: FakeCognigy, client: httpx.AsyncClient, fake_time: FakeTime
) -> None:
    """grant_type, client_id, client_secret and scope go in a form body; Bearer on the call."""
    auth = oauth(client, fake_time)
    response = await client.post(API_URL, json={}, auth=auth)
    assert response.status_code == 200
    assert cognigy.token_forms == [
        {
            "grant_type": "client_credentials",
            "client_id": "my-client",
            "client_secret": SECRET,
            "scope": "api",
        }
    ]
    assert cognigy.api_auth == ["Bearer tok-1"]


async def test_the_token_is_cached_and_reused(
    cognigy: FakeCognigy, client: httpx.AsyncClient, fake_time: FakeTime
) -> None:
    """Many calls within the token's cache life cause one token request."""
    auth = oauth(client, fake_time)
    for _ in range(10):
        assert (await client.post(API_URL, json={}, auth=auth)).status_code == 200
        fake_time.advance(300.0)
    assert len(cognigy.token_forms) == 1


@pytest.mark.parametrize(
    ("expires_in", "margin_s", "life_s"),
    [
        (3600, 60.0, 3540.0),
        (900, 60.0, 840.0),
        (60, 60.0, 30.0),  # a margin as long as the life would leave nothing: half instead
        (10, 60.0, 5.0),
        ("3600", 60.0, 3540.0),
        ("  120.5 ", 0.0, 120.5),
        (..., 60.0, 240.0),  # missing: the conservative default of 300 s
        (None, 60.0, 240.0),  # JSON null: treated as missing
    ],
)
async def test_cache_life_follows_expires_in(
    cognigy: FakeCognigy,
    client: httpx.AsyncClient,
    fake_time: FakeTime,
    expires_in: Any,
    margin_s: float,
    life_s: float,
) -> None:
    """Cached until expires_in - min(margin, expires_in / 2) after issue, then refetched."""
    cognigy.expires_in = expires_in
    auth = oauth(client, fake_time, margin_s=margin_s)
    await client.post(API_URL, json={}, auth=auth)
    fake_time.advance(life_s - 0.01)
    await client.post(API_URL, json={}, auth=auth)
    assert len(cognigy.token_forms) == 1
    fake_time.advance(0.01)
    await client.post(API_URL, json={}, auth=auth)
    assert len(cognigy.token_forms) == 2


@pytest.mark.parametrize("expires_in", [0, -5, "0", -0.5])
async def test_a_token_already_expired_is_used_once_and_not_cached(
    cognigy: FakeCognigy, client: httpx.AsyncClient, fake_time: FakeTime, expires_in: Any
) -> None:
    """expires_in <= 0: the request that fetched it uses it; the next one fetches again."""
    cognigy.expires_in = expires_in
    auth = oauth(client, fake_time)
    assert (await client.post(API_URL, json={}, auth=auth)).status_code == 200
    assert (await client.post(API_URL, json={}, auth=auth)).status_code == 200
    assert len(cognigy.token_forms) == 2
    assert not auth.cached_token_valid()


@pytest.mark.parametrize("expires_in", ["soon", "", True, False, {"s": 1}, [3600], "NaN"])
async def test_garbage_expires_in_is_a_token_error_naming_the_field(
    cognigy: FakeCognigy, client: httpx.AsyncClient, fake_time: FakeTime, expires_in: Any
) -> None:
    """A non-numeric expires_in fails the token request with a message naming expires_in."""
    cognigy.expires_in = expires_in
    metrics = Metrics()
    auth = oauth(client, fake_time, metrics)
    with pytest.raises(TokenError) as info:
        await client.post(API_URL, json={}, auth=auth)
    assert "expires_in" in info.value.detail
    assert info.value.kind == "auth"
    assert cognigy.api_auth == []
    assert fetches(metrics, "invalid") == 1


@pytest.mark.parametrize(
    ("raw", "expected"), [(5, 5.0), (2.5, 2.5), ("7", 7.0), ("-1", -1.0), (None, 300.0)]
)
def test_parse_expires_in(raw: Any, expected: float) -> None:
    """Numbers and numeric strings are seconds; missing is the default."""
    assert parse_expires_in(raw) == expected


def test_cache_life_never_goes_below_half_the_life() -> None:
    """The refresh margin takes at most half of a short token's life."""
    assert cache_life_s(900, 60) == 840
    assert cache_life_s(30, 60) == 15


# -- single flight ------------------------------------------------------------------------


async def test_fifty_concurrent_requests_with_an_expired_token_cause_one_token_request(
    cognigy: FakeCognigy, client: httpx.AsyncClient, fake_time: FakeTime
) -> None:
    """Single flight: the first caller fetches, the other 49 wait and reuse its token."""
    auth = oauth(client, fake_time)
    await client.post(API_URL, json={}, auth=auth)
    fake_time.advance(10_000.0)  # the cached token is now expired
    cognigy.token_gate = anyio.Event()
    statuses: list[int] = []

    async def call() -> None:
        statuses.append((await client.post(API_URL, json={}, auth=auth)).status_code)

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            for _ in range(50):
                tg.start_soon(call)
            await settle()
            assert len(cognigy.token_forms) == 2  # the first one, and one refetch in flight
            cognigy.token_gate.set()
    assert statuses == [200] * 50
    assert len(cognigy.token_forms) == 2
    assert set(cognigy.api_auth[1:]) == {"Bearer tok-2"}


async def test_fifty_concurrent_401s_cause_one_refresh(
    cognigy: FakeCognigy, client: httpx.AsyncClient, fake_time: FakeTime
) -> None:
    """A 401 drops the cached token only if it is still the one refused: one refresh."""
    auth = oauth(client, fake_time)
    await client.post(API_URL, json={}, auth=auth)
    cognigy.valid.clear()  # the server revoked tok-1
    cognigy.api_gate = anyio.Event()
    statuses: list[list[int]] = []

    async def call_with_one_retry() -> None:
        first = await client.post(API_URL, json={}, auth=auth)
        second = await client.post(API_URL, json={}, auth=auth)
        statuses.append([first.status_code, second.status_code])

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            for _ in range(50):
                tg.start_soon(call_with_one_retry)
            await settle()
            cognigy.api_gate.set()
    assert statuses == [[401, 200]] * 50
    assert len(cognigy.token_forms) == 2


async def test_a_stale_401_does_not_drop_a_newer_token(
    cognigy: FakeCognigy, client: httpx.AsyncClient, fake_time: FakeTime
) -> None:
    """invalidate(old) after a refresh leaves the new token cached."""
    auth = oauth(client, fake_time)
    old = await auth.token()
    auth.invalidate(old)
    new = await auth.token()
    auth.invalidate(old)
    assert await auth.token() == new != old
    assert len(cognigy.token_forms) == 2


# -- failures -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "kind", "outcome"),
    [
        (401, "auth", "rejected"),
        (400, "auth", "rejected"),
        (404, "auth", "rejected"),
        (500, "token_unavailable", "unavailable"),
        (503, "token_unavailable", "unavailable"),
        (429, "token_unavailable", "unavailable"),
    ],
)
async def test_a_failed_token_request_names_url_and_status_never_the_secret(
    cognigy: FakeCognigy,
    client: httpx.AsyncClient,
    fake_time: FakeTime,
    status: int,
    kind: str,
    outcome: str,
) -> None:
    """The error says the token URL and the HTTP status, redacts an echoed secret, and the
    lock is free afterwards (the next call fetches again and succeeds)."""
    cognigy.token_status = status
    cognigy.token_body = {"error": "invalid_client", "echo": f"client_secret={SECRET}"}
    metrics = Metrics()
    auth = oauth(client, fake_time, metrics)
    with pytest.raises(TokenError) as info:
        await client.post(API_URL, json={}, auth=auth)
    error = info.value
    assert isinstance(error, DeliveryError)
    assert error.kind == kind and error.http_status == status
    assert TOKEN_URL in error.detail and f"HTTP {status}" in error.detail
    assert "invalid_client" in error.detail
    assert SECRET not in str(error) and SECRET not in repr(error)
    assert fetches(metrics, outcome) == 1
    cognigy.token_status, cognigy.token_body = 200, None
    with anyio.fail_after(5):
        assert (await client.post(API_URL, json={}, auth=auth)).status_code == 200
    assert fetches(metrics, "ok") == 1


@pytest.mark.parametrize(
    ("exc", "outcome"),
    [
        (httpx.ConnectError("connection refused"), "error"),
        (httpx.ReadTimeout("timed out"), "timeout"),
    ],
)
async def test_a_token_endpoint_that_cannot_be_reached_is_a_retryable_token_error(
    cognigy: FakeCognigy,
    client: httpx.AsyncClient,
    fake_time: FakeTime,
    exc: Exception,
    outcome: str,
) -> None:
    """Transport errors become TokenError(kind token_unavailable), chained to the cause."""
    cognigy.token_error = exc
    metrics = Metrics()
    auth = oauth(client, fake_time, metrics)
    with pytest.raises(TokenError) as info:
        await client.post(API_URL, json={}, auth=auth)
    assert info.value.kind == "token_unavailable"
    assert TOKEN_URL in info.value.detail
    assert info.value.__cause__ is exc
    assert fetches(metrics, outcome) == 1


@pytest.mark.parametrize(
    "body",
    [{"token_type": "Bearer"}, {"access_token": ""}, {"access_token": 42}, ["tok"], "tok"],
)
async def test_a_token_answer_without_a_token_is_refused(
    cognigy: FakeCognigy, client: httpx.AsyncClient, fake_time: FakeTime, body: Any
) -> None:
    """No usable access_token: TokenError, not a request with 'Bearer None'."""
    cognigy.token_body = body
    auth = oauth(client, fake_time)
    with pytest.raises(TokenError) as info:
        await client.post(API_URL, json={}, auth=auth)
    assert "access_token" in info.value.detail or "object" in info.value.detail
    assert cognigy.api_auth == []


async def test_waiters_share_a_failed_fetch_instead_of_repeating_it(
    cognigy: FakeCognigy, client: httpx.AsyncClient, fake_time: FakeTime
) -> None:
    """Ten callers behind one failing token request get its error; one request is sent."""
    cognigy.token_status = 503
    cognigy.token_gate = anyio.Event()
    auth = oauth(client, fake_time)
    errors: list[str] = []

    async def call() -> None:
        try:
            await auth.token()
        except TokenError as exc:
            errors.append(exc.kind)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            for _ in range(10):
                tg.start_soon(call)
            await settle()
            cognigy.token_gate.set()
    assert errors == ["token_unavailable"] * 10
    assert len(cognigy.token_forms) == 1


async def test_no_secret_in_reprs(client: httpx.AsyncClient, fake_time: FakeTime) -> None:
    """Printing the auth objects or the secrets never shows a secret."""
    auth = oauth(client, fake_time)
    assert SECRET not in repr(auth)
    assert "k3y-value" not in repr(ApiKeyAuth("k3y-value"))
    secrets = Secrets(webhook_tokens=("w" * 20,), client_secret=SECRET, api_key="k3y-value")
    assert SECRET not in repr(secrets) and "k3y-value" not in repr(secrets)


def test_oauth_refuses_synchronous_use(fake_time: FakeTime) -> None:
    """The token cache lives on an async lock: a sync client is a programming error."""
    unused_client = cast(httpx.AsyncClient, None)
    auth = oauth(unused_client, fake_time)
    with (
        httpx.Client(transport=httpx.MockTransport(lambda r: httpx.Response(200))) as sync,
        pytest.raises(RuntimeError),
    ):
        sync.get("https://api.example.test/x", auth=auth)


# -- API key ------------------------------------------------------------------------------


async def test_api_key_auth_sets_the_header_and_no_bearer() -> None:
    """kind = api_key: X-API-Key on every call, no token request."""
    seen: list[httpx.Headers] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers)
        return httpx.Response(200, json={})

    config = CognigyConfig(auth=AuthConfig(kind="api_key"))
    secrets = Secrets(webhook_tokens=(), client_secret="", api_key="the-api-key")
    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        auth = build_auth(config, TOKEN_URL, secrets, client)
        assert isinstance(auth, ApiKeyAuth)
        await client.post(API_URL, json={}, auth=auth)
    assert seen[0]["X-API-Key"] == "the-api-key"
    assert "Authorization" not in seen[0]


async def test_build_auth_defaults_to_oauth2(client: httpx.AsyncClient) -> None:
    """kind = oauth2 builds the client-credentials auth with the configured token URL."""
    secrets = Secrets(webhook_tokens=(), client_secret=SECRET, api_key="")
    auth = build_auth(CognigyConfig(), TOKEN_URL, secrets, client)
    assert isinstance(auth, OAuth2ClientCredentials)
    assert auth.token_url == TOKEN_URL
