"""Authentication towards the Cognigy REST API: OAuth2 client credentials or an API key.

``OAuth2ClientCredentials`` is an ``httpx.Auth`` whose async flow holds the token cache
behind an ``anyio.Lock``: however many requests find the token expired, one token request
goes out (single flight) and the rest reuse its answer. A 401 from the API drops the
cached token only if it is still the one that got the 401, so a burst of 401s causes one
refresh. The retry after a 401 is the delivery loop's business (``cognigy.Deliverer``),
so that the repeated request passes through the rate limiter like any other.

Secrets (client secret, tokens, API key) never appear in exception texts or logs.
"""

from __future__ import annotations

import math
import time
from collections.abc import AsyncGenerator, Callable, Generator
from dataclasses import dataclass
from typing import Any

import anyio
import httpx

from .config import CognigyConfig, Secrets
from .errors import TokenError
from .metrics import Metrics

DEFAULT_EXPIRES_IN_S = 300.0
_EXCERPT_CHARS = 200


@dataclass(frozen=True, slots=True)
class _Token:
    value: str
    valid_until: float


def parse_expires_in(raw: Any, default_s: float = DEFAULT_EXPIRES_IN_S) -> float:
    """The token life in seconds from a token answer's ``expires_in``; TokenError if garbage."""
    if raw is None:
        return default_s
    value: float
    if isinstance(raw, bool):
        value = math.nan
    elif isinstance(raw, int | float):
        value = float(raw)
    elif isinstance(raw, str):
        try:
            value = float(raw.strip())
        except ValueError:
            value = math.nan
    else:
        value = math.nan
    if not math.isfinite(value):
        raise TokenError(
            "auth",
            f"the token answer's expires_in is not a number of seconds ({type(raw).__name__})",
        )
    return value


def cache_life_s(expires_in_s: float, refresh_margin_s: float) -> float:
    """How long after issue a token is used: expires_in - min(margin, expires_in / 2)."""
    return expires_in_s - min(refresh_margin_s, expires_in_s / 2)


class OAuth2ClientCredentials(httpx.Auth):
    """Bearer tokens from an OAuth2 client-credentials grant, cached and fetched single-flight."""

    def __init__(
        self,
        token_url: str,
        client_id: str,
        client_secret: str,
        scope: str,
        client: httpx.AsyncClient,
        metrics: Metrics | None = None,
        *,
        refresh_margin_s: float = 60.0,
        timeout_s: float = 15.0,
        clock: Callable[[], float] = time.monotonic,
        default_expires_in_s: float = DEFAULT_EXPIRES_IN_S,
    ) -> None:
        self.token_url = token_url
        self._client_id = client_id
        self._client_secret = client_secret
        self._scope = scope
        self._client = client
        self._metrics = metrics
        self._refresh_margin_s = refresh_margin_s
        self._timeout_s = timeout_s
        self._clock = clock
        self._default_expires_in_s = default_expires_in_s
        self._cached: _Token | None = None
        self._lock = anyio.Lock()
        # Incremented by every fetch; lets a waiter see that the fetch it queued behind
        # failed, so it shares that failure instead of sending another doomed request.
        self._fetches = 0
        self._last_error: TokenError | None = None

    def __repr__(self) -> str:
        return f"OAuth2ClientCredentials(token_url={self.token_url!r}, client_id=<set>)"

    def sync_auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response]:
        """Refuse synchronous use: the token cache lives on an async lock."""
        raise RuntimeError("OAuth2ClientCredentials works with httpx.AsyncClient only")
        yield request  # pragma: no cover  (makes this a generator, as httpx expects)

    async def async_auth_flow(
        self, request: httpx.Request
    ) -> AsyncGenerator[httpx.Request, httpx.Response]:
        """Attach a Bearer token; on a 401 drop that token so the next attempt fetches one."""
        token = await self.token()
        request.headers["Authorization"] = f"Bearer {token}"
        response = yield request
        if response.status_code == 401:
            self.invalidate(token)

    def invalidate(self, token: str) -> None:
        """Drop the cached token if it is still ``token`` (the one the server refused)."""
        if self._cached is not None and self._cached.value == token:
            self._cached = None

    def cached_token_valid(self) -> bool:
        """True when a cached token is still within its cache life."""
        return self._cached is not None and self._clock() < self._cached.valid_until

    async def token(self) -> str:
        """A valid access token: the cached one, or one fetched now (one fetch at a time)."""
        cached = self._cached
        if cached is not None and self._clock() < cached.valid_until:
            return cached.value
        fetches_seen = self._fetches
        async with self._lock:
            cached = self._cached
            if cached is not None and self._clock() < cached.valid_until:
                return cached.value
            if self._fetches != fetches_seen and self._last_error is not None:
                error = self._last_error
                raise TokenError(error.kind, error.detail, error.http_status)
            self._fetches += 1
            try:
                value = await self._fetch()
            except TokenError as exc:
                self._last_error = exc
                raise
            self._last_error = None
            return value

    async def _fetch(self) -> str:
        issued_at = self._clock()
        form = {
            "grant_type": "client_credentials",
            "client_id": self._client_id,
            "client_secret": self._client_secret,
            "scope": self._scope,
        }
        try:
            request = self._client.build_request(
                "POST",
                self.token_url,
                data=form,
                headers={"Accept": "application/json"},
                timeout=self._timeout_s,
            )
            # auth=None: the token request itself must not go through this auth flow.
            response = await self._client.send(request, auth=None)
        except httpx.TimeoutException as exc:
            self._count("timeout")
            raise TokenError(
                "token_unavailable", f"the token request to {self.token_url} timed out"
            ) from exc
        except httpx.HTTPError as exc:
            self._count("error")
            raise TokenError(
                "token_unavailable",
                f"the token request to {self.token_url} failed: {type(exc).__name__}",
            ) from exc
        status = response.status_code
        if status != 200:
            excerpt = self._redact(_short(response.text))
            if status == 429 or status >= 500:
                self._count("unavailable")
                kind = "token_unavailable"
            else:
                # Wrong client id or secret, or a wrong token URL: no retry fixes that.
                self._count("rejected")
                kind = "auth"
            raise TokenError(
                kind,
                f"the token request to {self.token_url} answered HTTP {status}: {excerpt}",
                status,
            )
        try:
            body = response.json()
        except ValueError as exc:
            self._count("invalid")
            raise TokenError(
                "auth", f"the token answer from {self.token_url} is not JSON", status
            ) from exc
        if not isinstance(body, dict):
            self._count("invalid")
            raise TokenError("auth", f"the token answer from {self.token_url} is not an object")
        access_token = body.get("access_token")
        if not isinstance(access_token, str) or not access_token:
            self._count("invalid")
            raise TokenError(
                "auth", f"the token answer from {self.token_url} has no access_token string"
            )
        try:
            expires_in_s = parse_expires_in(body.get("expires_in"), self._default_expires_in_s)
        except TokenError as exc:
            self._count("invalid")
            raise TokenError("auth", f"{exc.detail}, from {self.token_url}") from None
        self._count("ok")
        if expires_in_s > 0:
            life_s = cache_life_s(expires_in_s, self._refresh_margin_s)
            self._cached = _Token(access_token, issued_at + life_s)
        else:
            # Already expired on arrival: good for the request that asked, not cacheable.
            self._cached = None
        return access_token

    def _count(self, outcome: str) -> None:
        if self._metrics is not None:
            self._metrics.token_fetches.labels(outcome=outcome).inc()

    def _redact(self, text: str) -> str:
        if self._client_secret:
            text = text.replace(self._client_secret, "<redacted>")
        return text


class ApiKeyAuth(httpx.Auth):
    """The ``X-API-Key`` header on every request."""

    def __init__(self, api_key: str) -> None:
        self._api_key = api_key

    def __repr__(self) -> str:
        return "ApiKeyAuth(<redacted>)"

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response]:
        """Attach the API key."""
        request.headers["X-API-Key"] = self._api_key
        yield request


def build_auth(
    config: CognigyConfig,
    token_url: str,
    secrets: Secrets,
    client: httpx.AsyncClient,
    metrics: Metrics | None = None,
    *,
    clock: Callable[[], float] = time.monotonic,
) -> OAuth2ClientCredentials | ApiKeyAuth:
    """The auth the config asks for (``[cognigy.auth] kind``)."""
    if config.auth.kind == "api_key":
        return ApiKeyAuth(secrets.api_key)
    return OAuth2ClientCredentials(
        token_url,
        config.auth.client_id,
        secrets.client_secret,
        config.auth.scope,
        client,
        metrics,
        refresh_margin_s=config.refresh_margin_s,
        timeout_s=config.request_timeout_s,
        clock=clock,
    )


def _short(text: str) -> str:
    """The first 200 characters of ``text`` on one line."""
    flat = " ".join(text.split())
    return flat if len(flat) <= _EXCERPT_CHARS else flat[: _EXCERPT_CHARS - 1] + "…"
