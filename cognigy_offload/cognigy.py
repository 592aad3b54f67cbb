"""Delivery of a job's result into the Cognigy conversation (SPEC §3).

``build_request`` turns a result into the request of the configured delivery mode
(``context``, ``inject``, ``notify`` or ``variables``). ``Deliverer`` sends it with the
retry policy of ``retry``, the shared ``RateLimiter`` and ``CircuitBreaker`` of
``ratelimit`` and the auth of ``auth``. httpx exceptions are translated here and nowhere
else: above this module only ``DeliveryError``, ``DeadlineExceeded`` and ``LeaseLost``
are seen.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import anyio
import httpx
import structlog

from .auth import ApiKeyAuth, OAuth2ClientCredentials, build_auth
from .config import CognigyConfig, Secrets
from .errors import DeadlineExceeded, DeliveryError, TokenError
from .metrics import Metrics
from .models import ENCODER, Target, format_variable, json_value
from .ratelimit import CircuitBreaker, Permit, RateLimiter
from .retry import Action, Decision, backoff_s, classify, parse_retry_after

log = structlog.get_logger("cognigy_offload.cognigy")

_EXCERPT_CHARS = 200
# httpx's timeout bounds each read, not the whole answer: a server dripping a byte at a
# time could hold an attempt (and its rate-limit slot) open for ever. Cap the attempt.
_ATTEMPT_CAP_FACTOR = 2.0


@dataclass(frozen=True, slots=True)
class OutboundRequest:
    """One delivery request, ready to send."""

    method: str
    url: str
    body: bytes
    needs_api_auth: bool


def _segment(value: str | None, field: str, mode: str) -> str:
    """``value`` as one percent-encoded URL path segment; it can never change the route."""
    if not value:
        raise DeliveryError("invalid_target", f"{mode} delivery needs {field}, the job has none")
    encoded = quote(value, safe="")
    # "." and ".." are path syntax that clients and proxies collapse: encode them too.
    if set(encoded) == {"."}:
        encoded = encoded.replace(".", "%2E")
    return encoded


def _result_object(result: dict[str, Any], task_id: str, timestamp_s: int) -> dict[str, Any]:
    columns = {str(name): json_value(value) for name, value in result.items()}
    # The job's own fields win over a column of the same name: the flow relies on them.
    columns["taskId"] = task_id
    columns["timestamp"] = timestamp_s
    return columns


def build_request(
    config: CognigyConfig,
    target: Target,
    result: dict[str, Any],
    task_id: str,
    timestamp_s: int,
) -> OutboundRequest:
    """The request that delivers ``result`` in the target's mode; payload_too_large if too big."""
    mode = target.mode
    api_url = config.api_url.rstrip("/")
    body: dict[str, Any]
    if mode == "context":
        session = _segment(target.sessionId, "sessionId", mode)
        url = f"{api_url}/new/v2.0/sessions/{session}/context/inject"
        body = {
            "userId": target.userId,
            "context": {config.result_key: _result_object(result, task_id, timestamp_s)},
        }
        method, needs_api_auth = "POST", True
    elif mode in ("inject", "notify"):
        url_token = _segment(target.URLToken, "URLToken", mode)
        url = f"{config.endpoint_url.rstrip('/')}/{mode}/{url_token}"
        body = {
            "userId": target.userId,
            "sessionId": target.sessionId,
            "text": "",
            "data": {config.result_key: _result_object(result, task_id, timestamp_s)},
        }
        method, needs_api_auth = "POST", False
    elif mode == "variables":
        conversation = _segment(target.conversationId, "conversationId", mode)
        url = f"{api_url}/api/v1/conversations/{conversation}/variables"
        values = {str(name): json_value(value) for name, value in result.items()}
        summary = "|".join(f"{name}:{format_variable(value)}" for name, value in values.items())
        variables: list[dict[str, Any]] = [
            {"name": "db_query_result", "value": summary},
            {"name": "db_query_timestamp", "value": str(int(timestamp_s))},
        ]
        variables.extend({"name": name, "value": value} for name, value in values.items())
        body = {"variables": variables}
        method, needs_api_auth = "PATCH", True
    else:  # pragma: no cover  (Target.mode is a Literal; msgspec refuses other values)
        raise DeliveryError("invalid_target", f"unknown delivery mode {mode!r}")
    encoded = ENCODER.encode(body)
    if len(encoded) > config.max_payload_bytes:
        raise DeliveryError(
            "payload_too_large",
            f"the {mode} delivery body is {len(encoded)} bytes, over "
            f"cognigy.max_payload_bytes = {config.max_payload_bytes} (Cognigy refuses "
            "contexts over about 65 kB); make the query return fewer or shorter columns",
        )
    return OutboundRequest(method=method, url=url, body=encoded, needs_api_auth=needs_api_auth)


def describe_response(response: httpx.Response) -> str:
    """``HTTP 422: <title>: <detail> (traceId ...)``, at most about 200 characters of body."""
    excerpt = ""
    try:
        problem = response.json()
    except ValueError:
        problem = None
    if isinstance(problem, dict):
        parts = [
            str(problem[key]) for key in ("title", "detail") if isinstance(problem.get(key), str)
        ]
        excerpt = ": ".join(parts)
        trace_id = problem.get("traceId")
        if isinstance(trace_id, str) and trace_id:
            excerpt = f"{excerpt} (traceId {trace_id})" if excerpt else f"traceId {trace_id}"
    if not excerpt:
        excerpt = response.text
    excerpt = _without_credentials(" ".join(excerpt.split()), response)
    if len(excerpt) > _EXCERPT_CHARS:
        excerpt = excerpt[: _EXCERPT_CHARS - 1] + "…"
    head = f"HTTP {response.status_code}"
    if excerpt:
        return f"{head}: {excerpt}"
    return f"{head} {response.reason_phrase}".rstrip()


def _without_credentials(text: str, response: httpx.Response) -> str:
    """Cut the credential that was sent out of an answer that echoes it back."""
    try:
        headers = response.request.headers
    except RuntimeError:  # a response built without a request
        return text
    for name in ("authorization", "x-api-key"):
        value = headers.get(name, "")
        secret = value[7:].strip() if value[:7].lower() == "bearer " else value.strip()
        if len(secret) >= 4:
            text = text.replace(secret, "<redacted>")
    return text


@dataclass(slots=True)
class _Outcome:
    """What one attempt produced: a response, or a transport failure (kind, detail)."""

    response: httpx.Response | None = None
    transport_kind: str | None = None
    detail: str = ""


class Deliverer:
    """Pushes results to Cognigy; one per app, shared by every worker coroutine."""

    def __init__(
        self,
        config: CognigyConfig,
        token_url: str,
        secrets: Secrets,
        client: httpx.AsyncClient,
        metrics: Metrics,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
        rng: Callable[[], float] = random.random,
        wall_clock: Callable[[], float] = time.time,
        rate_window_s: float = 60.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.config = config
        self._client = client
        # With a transport, deliveries go straight to it (see _exchange); without one
        # (an HTTP proxy is configured in the environment), through the client.
        self._transport = transport
        self._headers = [(b"Content-Type", b"application/json"), (b"Accept", b"application/json")]
        self._timeout = httpx.Timeout(config.request_timeout_s).as_dict()
        self._metrics = metrics
        self._clock = clock
        self._sleep = sleep
        self._rng = rng
        self._wall_clock = wall_clock
        self.auth: OAuth2ClientCredentials | ApiKeyAuth = build_auth(
            config, token_url, secrets, client, metrics, clock=clock
        )
        self.limiter = RateLimiter(
            config.rate_limit_per_minute, clock, sleep, window_s=rate_window_s, metrics=metrics
        )
        self.breaker = CircuitBreaker(
            config.breaker_failures, config.breaker_cooldown_s, clock, sleep=sleep, metrics=metrics
        )

    async def deliver(
        self,
        task_id: str,
        target: Target,
        result: dict[str, Any],
        timestamp_s: int,
        deadline_wall_s: float,
        on_attempt: Callable[[], Awaitable[None]],
        on_retry: Callable[[], Awaitable[None]] | None = None,
    ) -> int:
        """Deliver one result with retries; return the HTTP status of the successful answer.

        ``on_attempt`` runs before each attempt is sent; ``on_retry`` once an attempt has
        failed and another will follow, before any wait (backoff, Retry-After, a new
        token), so what the failed attempt leaves behind can be made durable first.
        Raises DeliveryError when it fails for good, DeadlineExceeded when the next
        attempt would start after ``deadline_wall_s`` (Unix seconds), and lets LeaseLost
        from ``on_attempt`` and ``on_retry`` through.
        """
        config = self.config
        outbound = build_request(config, target, result, task_id, timestamp_s)
        auth: httpx.Auth | None = self.auth if outbound.needs_api_auth else None
        # Only OAuth2 can cure a 401 (with a new token); an API key or a URLToken cannot.
        can_refresh = isinstance(auth, OAuth2ClientCredentials)
        deadline_s = self._clock() + (deadline_wall_s - self._wall_clock())
        refreshed = False
        attempt = 0
        while True:
            attempt += 1
            self._check_deadline(deadline_wall_s, attempt)
            outcome = await self._attempt(
                outbound, auth, deadline_s, deadline_wall_s, attempt, on_attempt
            )
            if isinstance(outcome, TokenError):
                log.info(
                    "delivery.attempt_failed",
                    task_id=task_id,
                    attempt=attempt,
                    http_status=outcome.http_status,
                    action="token",
                    detail=outcome.detail,
                )
                if outcome.kind != "token_unavailable" or attempt >= config.max_attempts:
                    raise outcome
                if on_retry is not None:
                    await on_retry()
                await self._backoff(attempt, deadline_wall_s, task_id, outcome.detail)
                continue
            response = outcome.response
            status = response.status_code if response is not None else None
            decision = classify(status, response is None, refreshed=refreshed)
            if decision.action is Action.REFRESH and not can_refresh:
                decision = Decision(Action.FAIL, kind="auth", http_status=status)
            if decision.action is Action.SUCCESS:
                log.debug("delivery.sent", task_id=task_id, attempt=attempt, http_status=status)
                assert status is not None
                return status
            detail = describe_response(response) if response is not None else outcome.detail
            log.info(
                "delivery.attempt_failed",
                task_id=task_id,
                attempt=attempt,
                http_status=status,
                action=decision.action.value,
                detail=detail,
            )
            if decision.action is Action.FAIL:
                assert decision.kind is not None
                raise DeliveryError(
                    decision.kind, f"Cognigy refused the delivery: {detail}", status
                )
            if attempt >= config.max_attempts:
                kind = outcome.transport_kind or decision.kind or "unavailable"
                if decision.action is Action.REFRESH:
                    kind = "auth"
                raise DeliveryError(
                    kind,
                    f"gave up after {attempt} attempts; the last one: {detail}",
                    status,
                )
            if on_retry is not None:
                await on_retry()
            if decision.action is Action.REFRESH:
                # The auth flow already dropped the refused token; the next attempt fetches.
                refreshed = True
                continue
            if decision.action is Action.RATE_LIMITED:
                assert response is not None
                now_wall = dt.datetime.fromtimestamp(self._wall_clock(), dt.UTC)
                wait_s = parse_retry_after(
                    response.headers.get("Retry-After"), now_wall, config.max_retry_after_s
                )
                if wait_s is None:
                    wait_s = backoff_s(
                        attempt, config.backoff_base_s, config.backoff_max_s, self._rng
                    )
                # Every worker shares the server's limit: pause them all, not just this one.
                self.limiter.pause_until(self._clock() + wait_s)
                continue
            await self._backoff(attempt, deadline_wall_s, task_id, detail)

    async def _attempt(
        self,
        outbound: OutboundRequest,
        auth: httpx.Auth | None,
        deadline_s: float,
        deadline_wall_s: float,
        attempt: int,
        on_attempt: Callable[[], Awaitable[None]],
    ) -> _Outcome | TokenError:
        """Wait for the breaker and the rate limit, record the attempt, send one request."""
        is_probe = await self.breaker.acquire(deadline_s)
        reported = False
        permit: Permit | None = None
        sent = False
        try:
            permit = await self.limiter.acquire(deadline_s)
            # The waits above may have run into the deadline: no attempt starts after it.
            self._check_deadline(deadline_wall_s, attempt)
            await on_attempt()
            sent = True
            outcome = await self._send(outbound, auth)
            if isinstance(outcome, TokenError):
                sent = False  # the token fetch failed: the delivery request never left
                return outcome
            status = outcome.response.status_code if outcome.response is not None else None
            if status is None or status == 408 or status >= 500:
                self.breaker.record_failure()
            else:
                self.breaker.record_success()
            reported = True
            return outcome
        finally:
            if permit is not None:
                permit.release(sent=sent)
            if is_probe and not reported:
                self.breaker.abandon_probe()

    async def _send(
        self, outbound: OutboundRequest, auth: httpx.Auth | None
    ) -> _Outcome | TokenError:
        timeout_s = self.config.request_timeout_s
        deliveries = self._metrics.deliveries
        try:
            with anyio.fail_after(timeout_s * _ATTEMPT_CAP_FACTOR):
                response = await self._exchange(outbound, auth)
        except TokenError as exc:
            return exc
        except (httpx.TimeoutException, TimeoutError) as exc:
            deliveries.labels(outcome="timeout", http_status="none").inc()
            return _Outcome(
                transport_kind="timeout",
                detail=f"no answer within {timeout_s:g} s ({type(exc).__name__})",
            )
        except httpx.TransportError as exc:
            deliveries.labels(outcome="connection", http_status="none").inc()
            return _Outcome(
                transport_kind="connection",
                detail=f"the connection failed: {type(exc).__name__}: {_first_line(exc)}",
            )
        except httpx.HTTPError as exc:
            deliveries.labels(outcome="connection", http_status="none").inc()
            raise DeliveryError(
                "connection", f"the request could not be sent: {type(exc).__name__}"
            ) from exc
        status = response.status_code
        deliveries.labels(outcome=_outcome_label(status), http_status=str(status)).inc()
        return _Outcome(response=response)

    async def _exchange(self, outbound: OutboundRequest, auth: httpx.Auth | None) -> httpx.Response:
        """One request and its whole answer, with the auth flow.

        Through the transport directly, this is what AsyncClient.send does minus what a
        delivery never needs (URL merging, cookie jar, redirects, event hooks): those
        cost more CPU than sending the request. Through the client when proxied.
        """
        if self._transport is None:
            request = self._client.build_request(
                outbound.method,
                outbound.url,
                content=outbound.body,
                headers=self._headers,
                timeout=self.config.request_timeout_s,
            )
            return await self._client.send(request, auth=auth)
        request = httpx.Request(
            outbound.method,
            outbound.url,
            headers=self._headers,
            content=outbound.body,
            extensions={"timeout": self._timeout},
        )
        if auth is None:
            return await self._round_trip(request)
        flow = auth.async_auth_flow(request)
        try:
            response = await self._round_trip(await flow.__anext__())
            with contextlib.suppress(StopAsyncIteration):
                await flow.asend(response)  # lets the flow see a 401 (drops the token)
        finally:
            await flow.aclose()
        return response

    async def _round_trip(self, request: httpx.Request) -> httpx.Response:
        assert self._transport is not None
        response = await self._transport.handle_async_request(request)
        response.request = request
        try:
            await response.aread()
        finally:
            await response.aclose()
        return response

    def _check_deadline(self, deadline_wall_s: float, attempt: int) -> None:
        if self._wall_clock() >= deadline_wall_s:
            raise DeadlineExceeded(
                f"the job's deadline passed before delivery attempt {attempt} could start"
            )

    async def _backoff(
        self, attempt: int, deadline_wall_s: float, task_id: str, detail: str
    ) -> None:
        config = self.config
        wait_s = backoff_s(attempt, config.backoff_base_s, config.backoff_max_s, self._rng)
        if self._wall_clock() + wait_s >= deadline_wall_s:
            raise DeadlineExceeded(
                f"the job's deadline comes before delivery attempt {attempt + 1} could start "
                f"(after attempt {attempt}: {detail})"
            )
        await self._sleep(wait_s)


def _outcome_label(status: int) -> str:
    """The ``outcome`` label of one answered delivery request."""
    decision = classify(status, False)
    labels = {
        Action.SUCCESS: "delivered",
        Action.RATE_LIMITED: "rate_limited",
        Action.RETRY: "retryable",
        Action.REFRESH: "unauthorized",
    }
    return labels.get(decision.action) or decision.kind or "failed"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:_EXCERPT_CHARS] if text else ""


__all__ = [
    "Deliverer",
    "OutboundRequest",
    "build_request",
    "describe_response",
]
