"""Delivery to the Cognigy stand-in over real HTTP on 127.0.0.1: auth, retries, limits."""

from __future__ import annotations

import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from decimal import Decimal
from email.utils import formatdate
from typing import Any

import anyio
import httpx
import pytest

from cognigy_offload.cognigy import Deliverer
from cognigy_offload.config import AuthConfig, CognigyConfig, Secrets
from cognigy_offload.errors import DeadlineExceeded, DeliveryError, LeaseLost
from cognigy_offload.metrics import Metrics
from cognigy_offload.models import Target
from cognigy_offload.sim import Fault, SimState, run_sim
from tests.conftest import target

pytestmark = pytest.mark.anyio

CLIENT_ID = "delivery-test-client"
CLIENT_SECRET = "delivery-test-secret-0123456789"
API_KEY = "delivery-test-api-key-0123456789"
TASK = "5b0c7a52-1d0e-4f57-9a57-5a0f0d2f7c1e"
RESULT: dict[str, Any] = {"count": 100000, "total": Decimal("7499925000.00")}
SECRETS = Secrets(webhook_tokens=(), client_secret=CLIENT_SECRET, api_key=API_KEY)


class ManualClock:
    """A monotonic clock a test moves by hand (token expiry without waiting)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Attempts:
    """The on_attempt callback: counts calls, can raise on a given call."""

    def __init__(self, raise_on: int | None = None) -> None:
        self.count = 0
        self.raise_on = raise_on

    async def __call__(self) -> None:
        self.count += 1
        if self.count == self.raise_on:
            raise LeaseLost("another worker took the job")


@pytest.fixture
async def stand_in() -> AsyncIterator[tuple[SimState, str]]:
    state = SimState(client_id=CLIENT_ID, client_secret=CLIENT_SECRET, api_key=API_KEY)
    async with run_sim(state) as url:
        yield state, url


@pytest.fixture
async def client(stand_in: tuple[SimState, str]) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient() as c:
        yield c


@pytest.fixture
def state(stand_in: tuple[SimState, str]) -> SimState:
    return stand_in[0]


MakeDeliverer = Callable[..., Deliverer]


@pytest.fixture
def make_deliverer(stand_in: tuple[SimState, str], client: httpx.AsyncClient) -> MakeDeliverer:
    """Deliverer factory: fast retries by default; keyword arguments override config or kwargs."""
    url = stand_in[1]

    def make(
        *,
        auth_kind: str = "oauth2",
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.monotonic,
        rng: Callable[[], float] = random.random,
        rate_window_s: float = 60.0,
        **changes: Any,
    ) -> Deliverer:
        settings: dict[str, Any] = {
            "api_url": url,
            "endpoint_url": url,
            "request_timeout_s": 2.0,
            "max_attempts": 4,
            "backoff_base_s": 0.01,
            "backoff_max_s": 0.05,
            "breaker_failures": 100,
            "breaker_cooldown_s": 1.0,
            "rate_limit_per_minute": 1000,
            "auth": AuthConfig(kind=auth_kind, client_id=CLIENT_ID),  # type: ignore[arg-type]
        }
        settings.update(changes)
        return Deliverer(
            CognigyConfig(**settings),
            f"{url}/auth/oauth2/token",
            SECRETS,
            client,
            metrics or Metrics(),
            clock=clock,
            rng=rng,
            rate_window_s=rate_window_s,
        )

    return make


def deliver(
    deliverer: Deliverer,
    *,
    tgt: Target | None = None,
    task_id: str = TASK,
    deadline_in_s: float = 60.0,
    on_attempt: Callable[[], Awaitable[None]] | None = None,
) -> Awaitable[int]:
    return deliverer.deliver(
        task_id,
        tgt or target(),
        RESULT,
        1796292000,
        time.time() + deadline_in_s,
        on_attempt or Attempts(),
    )


def sample(metrics: Metrics, outcome: str, http_status: str) -> float:
    value = metrics.registry.get_sample_value(
        "cognigy_offload_deliveries_total", {"outcome": outcome, "http_status": http_status}
    )
    return value or 0.0


# -- the four modes over the wire -------------------------------------------------------


async def test_context_delivery_arrives_exactly(
    state: SimState, make_deliverer: MakeDeliverer
) -> None:
    """The stand-in receives the SPEC body with exact decimals and a Bearer token."""
    metrics = Metrics()
    assert await deliver(make_deliverer(metrics=metrics)) == 200
    [got] = state.received
    assert got.method == "POST" and got.params == {"sessionId": "sess_41c7"}
    assert got.auth == "bearer" and got.headers["authorization"] == "<redacted>"
    assert got.body["context"]["offload"] == {
        "count": 100000,
        "total": Decimal("7499925000.00"),
        "taskId": TASK,
        "timestamp": 1796292000,
    }
    assert sample(metrics, "delivered", "200") == 1


@pytest.mark.parametrize(
    ("mode", "field", "param"),
    [
        ("context", "sessionId", "sessionId"),
        ("variables", "conversationId", "conversationId"),
        ("inject", "URLToken", "URLToken"),
        ("notify", "URLToken", "URLToken"),
    ],
)
async def test_every_mode_keeps_awkward_identifiers_in_one_segment(
    state: SimState, make_deliverer: MakeDeliverer, mode: str, field: str, param: str
) -> None:
    """A '/' or '?' in an identifier reaches the right route intact; inject/notify send no auth."""
    ident = "a/b?c=d#e .."
    status = await deliver(make_deliverer(), tgt=target(mode, **{field: ident}))
    assert status == 200
    [got] = state.received
    assert got.params == {param: ident}
    assert got.method == ("PATCH" if mode == "variables" else "POST")
    if mode in ("inject", "notify"):
        assert got.auth == "none" and state.token_requests == 0
    else:
        assert got.auth == "bearer" and state.token_requests == 1


async def test_api_key_auth(state: SimState, make_deliverer: MakeDeliverer) -> None:
    """kind = api_key: X-API-Key, no token request; a 401 fails at once (no token to renew)."""
    deliverer = make_deliverer(auth_kind="api_key")
    assert await deliver(deliverer) == 200
    assert state.received[0].auth == "api_key" and state.token_requests == 0
    state.add_faults(Fault(401))
    with pytest.raises(DeliveryError) as info:
        await deliver(deliverer)
    assert info.value.kind == "auth" and len(state.received) == 2


# -- tokens ---------------------------------------------------------------------------------


async def test_the_token_is_cached_and_reused_across_deliveries(
    state: SimState, make_deliverer: MakeDeliverer
) -> None:
    """Ten deliveries, one token request."""
    deliverer = make_deliverer()
    for _ in range(10):
        assert await deliver(deliverer) == 200
    assert state.token_requests == 1
    assert len(state.delivered()) == 10


async def test_an_expired_token_with_50_concurrent_deliveries_causes_one_token_request(
    state: SimState, make_deliverer: MakeDeliverer
) -> None:
    """Single flight over real HTTP: 50 workers find the token expired, one fetches."""
    clock = ManualClock()
    deliverer = make_deliverer(clock=clock)
    assert await deliver(deliverer) == 200
    clock.now += 10_000.0  # long past the token's cache life
    statuses: list[int] = []

    async def one(i: int) -> None:
        statuses.append(await deliver(deliverer, task_id=f"task-{i}"))

    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            for i in range(50):
                tg.start_soon(one, i)
    assert statuses == [200] * 50
    assert state.token_requests == 2


async def test_a_401_refreshes_the_token_once_then_succeeds(
    state: SimState, make_deliverer: MakeDeliverer
) -> None:
    """The server revokes the token: one 401, one new token, the retry succeeds."""
    deliverer = make_deliverer()
    assert await deliver(deliverer) == 200
    state.revoke_tokens()
    attempts = Attempts()
    assert await deliver(deliverer, on_attempt=attempts) == 200
    assert state.statuses() == [200, 401, 200]
    assert state.token_requests == 2
    assert attempts.count == 2


async def test_a_second_401_fails_with_kind_auth(
    state: SimState, make_deliverer: MakeDeliverer
) -> None:
    """401, refresh, 401 again: kind auth, status kept, no third request."""
    state.add_faults(Fault(401), Fault(401))
    with pytest.raises(DeliveryError) as info:
        await deliver(make_deliverer())
    assert info.value.kind == "auth" and info.value.http_status == 401
    assert "traceId" in info.value.detail
    assert state.statuses() == [401, 401]
    assert state.token_requests == 2


async def test_wrong_client_credentials_fail_with_kind_auth(
    state: SimState, make_deliverer: MakeDeliverer
) -> None:
    """The token endpoint refuses the client: TokenError kind auth, nothing delivered."""
    state.client_secret = "a-different-secret-value"
    with pytest.raises(DeliveryError) as info:
        await deliver(make_deliverer())
    assert info.value.kind == "auth" and info.value.http_status == 401
    assert "/auth/oauth2/token" in info.value.detail
    assert CLIENT_SECRET not in info.value.detail
    assert state.received == []


async def test_a_token_endpoint_outage_is_retried(
    state: SimState, make_deliverer: MakeDeliverer
) -> None:
    """A 503 from the token endpoint is transient: the next attempt fetches and delivers."""
    state.add_token_faults(Fault(503))
    assert await deliver(make_deliverer()) == 200
    assert state.token_requests == 2 and state.statuses() == [200]


# -- permanent failures ---------------------------------------------------------------------


async def test_403_fails_at_once_with_kind_forbidden(
    state: SimState, make_deliverer: MakeDeliverer
) -> None:
    """403: one request, kind forbidden, status kept."""
    state.add_faults(Fault(403))
    with pytest.raises(DeliveryError) as info:
        await deliver(make_deliverer())
    assert (info.value.kind, info.value.http_status) == ("forbidden", 403)
    assert len(state.received) == 1


@pytest.mark.parametrize("status", [400, 404, 409, 422])
async def test_other_4xx_fail_at_once_as_rejected_keeping_the_status(
    state: SimState, make_deliverer: MakeDeliverer, status: int
) -> None:
    """Other 4xx: kind rejected, the status and an excerpt with the traceId in the detail."""
    state.add_faults(Fault(status))
    with pytest.raises(DeliveryError) as info:
        await deliver(make_deliverer())
    error = info.value
    assert (error.kind, error.http_status) == ("rejected", status)
    assert f"HTTP {status}" in error.detail and "traceId" in error.detail
    assert len(error.detail) < 400
    assert len(state.received) == 1


async def test_a_long_problem_body_is_cut_to_an_excerpt(
    state: SimState, make_deliverer: MakeDeliverer
) -> None:
    """The detail quotes at most about 200 characters of the answer."""
    state.add_faults(Fault(422, body={"title": "Bad", "detail": "x" * 5000, "traceId": "t-1"}))
    with pytest.raises(DeliveryError) as info:
        await deliver(make_deliverer())
    assert len(info.value.detail) < 300


# -- transient failures ---------------------------------------------------------------------


@pytest.mark.parametrize("how", ["seconds", "http-date"])
async def test_429_waits_for_retry_after_then_succeeds(
    state: SimState, make_deliverer: MakeDeliverer, how: str
) -> None:
    """Retry-After in seconds or as an HTTP-date: the retry arrives no earlier than asked."""
    if how == "seconds":
        retry_after, min_gap_s = "1", 1.0
    else:
        retry_after = formatdate(int(time.time()) + 2, usegmt=True)
        min_gap_s = 0.9  # the date has whole seconds: at least 1 s, at most 2 s away
    state.add_faults(Fault(429, retry_after=retry_after))
    metrics = Metrics()
    with anyio.fail_after(10):
        assert await deliver(make_deliverer(metrics=metrics)) == 200
    assert state.statuses() == [429, 200]
    first, second = state.received
    assert second.received_at - first.received_at >= min_gap_s
    assert sample(metrics, "rate_limited", "429") == 1


async def test_a_429_pauses_every_worker(
    state: SimState, make_deliverer: MakeDeliverer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After one worker's 429 with Retry-After: 1, no worker sends anything for 1 s."""
    deliverer = make_deliverer()
    paused = anyio.Event()
    original = deliverer.limiter.pause_until

    def pause_until(monotonic_t: float) -> None:
        original(monotonic_t)
        paused.set()

    monkeypatch.setattr(deliverer.limiter, "pause_until", pause_until)
    state.add_faults(Fault(429, retry_after="1"))
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(deliver, deliverer)
            await paused.wait()
            for i in range(5):
                tg.start_soon(lambda i=i: deliver(deliverer, task_id=f"other-{i}"))
    rate_limited = state.received[0]
    assert rate_limited.status == 429
    later = state.received[1:]
    assert len(later) == 6 and all(r.status == 200 for r in later)
    assert min(r.received_at for r in later) - rate_limited.received_at >= 1.0


async def test_5xx_then_success(state: SimState, make_deliverer: MakeDeliverer) -> None:
    """503, 500, 502 are retried with backoff; the fourth attempt delivers."""
    metrics = Metrics()
    state.add_faults(Fault(503), Fault(500), Fault(502))
    attempts = Attempts()
    assert await deliver(make_deliverer(metrics=metrics), on_attempt=attempts) == 200
    assert state.statuses() == [503, 500, 502, 200]
    assert attempts.count == 4
    assert sample(metrics, "retryable", "503") == 1 and sample(metrics, "delivered", "200") == 1


async def test_a_dropped_connection_then_success(
    state: SimState, make_deliverer: MakeDeliverer
) -> None:
    """The connection closes in the middle of the answer: retried, then delivered."""
    metrics = Metrics()
    state.add_faults(Fault(drop=True))
    assert await deliver(make_deliverer(metrics=metrics)) == 200
    assert [r.dropped for r in state.received] == [True, False]
    assert sample(metrics, "connection", "none") == 1


async def test_an_answer_slower_than_request_timeout_is_retried(
    state: SimState, make_deliverer: MakeDeliverer
) -> None:
    """No answer within request_timeout_s: the attempt times out and the next one delivers."""
    metrics = Metrics()
    state.add_faults(Fault(delay_s=3.0))
    started = time.monotonic()
    deliverer = make_deliverer(metrics=metrics, request_timeout_s=0.3)
    assert await deliver(deliverer) == 200
    assert time.monotonic() - started < 2.0
    assert len(state.received) == 2
    assert sample(metrics, "timeout", "none") == 1


@pytest.mark.parametrize(
    ("fault", "kind", "http_status"),
    [
        (Fault(503), "unavailable", 503),
        (Fault(429), "unavailable", 429),
        (Fault(drop=True), "connection", None),
        (Fault(delay_s=3.0), "timeout", None),
    ],
)
async def test_exhausted_attempts_fail_naming_the_last_error(
    state: SimState,
    make_deliverer: MakeDeliverer,
    fault: Fault,
    kind: str,
    http_status: int | None,
) -> None:
    """max_attempts failures in a row: the failure kind and detail name the last one."""
    state.add_faults(*[fault] * 3)
    deliverer = make_deliverer(max_attempts=3, request_timeout_s=0.3, max_retry_after_s=0.05)
    with anyio.fail_after(10), pytest.raises(DeliveryError) as info:
        await deliver(deliverer)
    error = info.value
    assert (error.kind, error.http_status) == (kind, http_status)
    assert "3 attempts" in error.detail
    assert len(state.received) == 3


# -- deadline and lease -------------------------------------------------------------------


async def test_no_attempt_starts_after_the_deadline(
    state: SimState, make_deliverer: MakeDeliverer
) -> None:
    """A job whose deadline has passed is not sent at all, and no attempt is recorded."""
    attempts = Attempts()
    with pytest.raises(DeadlineExceeded):
        await deliver(make_deliverer(), deadline_in_s=-1.0, on_attempt=attempts)
    assert attempts.count == 0 and state.received == []


async def test_a_deadline_during_backoff_raises_without_another_attempt(
    state: SimState, make_deliverer: MakeDeliverer
) -> None:
    """The backoff would end after the deadline: DeadlineExceeded at once, one request sent."""
    state.add_faults(Fault(503))
    deliverer = make_deliverer(backoff_base_s=5.0, backoff_max_s=5.0, rng=lambda: 1.0)
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded):
        await deliver(deliverer, deadline_in_s=1.0)
    assert time.monotonic() - started < 1.0
    assert len(state.received) == 1


async def test_a_retry_after_past_the_deadline_raises(
    state: SimState, make_deliverer: MakeDeliverer
) -> None:
    """A 429 asking for longer than the job has left: DeadlineExceeded, no second request."""
    state.add_faults(Fault(429, retry_after="30"))
    with anyio.fail_after(5), pytest.raises(DeadlineExceeded):
        await deliver(make_deliverer(), deadline_in_s=2.0)
    assert len(state.received) == 1


async def test_lease_lost_in_on_attempt_propagates_and_sends_nothing(
    state: SimState, make_deliverer: MakeDeliverer
) -> None:
    """on_attempt raising LeaseLost stops the delivery before the request is sent."""
    deliverer = make_deliverer()
    with pytest.raises(LeaseLost):
        await deliver(deliverer, on_attempt=Attempts(raise_on=1))
    assert state.received == []
    assert deliverer.limiter.in_window() == 0  # the unused slot went back


# -- shared flow control --------------------------------------------------------------------


async def test_300_deliveries_at_120_per_window_get_no_429(
    state: SimState, make_deliverer: MakeDeliverer
) -> None:
    """The issue's test, with the 60 s window scaled to 2 s on both sides: 300 deliveries by
    40 workers at a limit of 120 per window against a stand-in that answers 429 to any
    excess: zero 429, all delivered, never more than 120 arrivals in any rolling window."""
    window_s, limit, total, workers = 2.0, 120, 300, 40
    state.rate_limit, state.rate_window_s = limit, window_s
    deliverer = make_deliverer(rate_limit_per_minute=limit, rate_window_s=window_s)
    send, receive = anyio.create_memory_object_stream[int](total)
    for i in range(total):
        send.send_nowait(i)
    send.close()
    statuses: list[int] = []

    async def worker() -> None:
        async with receive.clone() as jobs:
            async for i in jobs:
                statuses.append(await deliver(deliverer, task_id=f"task-{i}"))

    started = time.monotonic()
    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            for _ in range(workers):
                tg.start_soon(worker)
    receive.close()
    elapsed_s = time.monotonic() - started
    arrivals = sorted(r.received_at for r in state.received)
    busiest = max(sum(1 for t in arrivals if start <= t < start + window_s) for start in arrivals)
    print(
        f"\nrate-limit test: {total} deliveries in {elapsed_s:.2f} s "
        f"(first to last arrival {arrivals[-1] - arrivals[0]:.2f} s), "
        f"{state.rate_limited} answered 429, busiest rolling {window_s:g} s window: "
        f"{busiest} arrivals (limit {limit})"
    )
    assert state.rate_limited == 0 and 429 not in state.statuses()
    assert statuses == [200] * total
    assert len({r.body["context"]["offload"]["taskId"] for r in state.received}) == total
    assert busiest <= limit
    # 300 at 120 per window needs at least two full windows after the first burst.
    assert arrivals[-1] - arrivals[0] >= 2 * window_s


async def test_the_breaker_opens_after_n_failures_and_lets_one_probe_through(
    state: SimState, make_deliverer: MakeDeliverer
) -> None:
    """Three 503s open it; nothing is sent for the cooldown; then one (slow) probe goes alone,
    and only after its success do the other workers send."""
    deliverer = make_deliverer(breaker_failures=3, breaker_cooldown_s=0.5, max_attempts=1)
    state.add_faults(Fault(503), Fault(503), Fault(503))
    for _ in range(3):
        with pytest.raises(DeliveryError):
            await deliver(deliverer)
    assert deliverer.breaker.state == "open"
    state.add_faults(Fault(200, delay_s=0.3))
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            for i in range(5):
                tg.start_soon(lambda i=i: deliver(deliverer, task_id=f"after-{i}"))
    assert deliverer.breaker.state == "closed"
    third_failure, probe, *others = state.received[2:]
    assert probe.received_at - third_failure.received_at >= 0.45
    assert len(others) == 4
    assert min(r.received_at for r in others) - probe.received_at >= 0.3
    assert all(r.status == 200 for r in [probe, *others])


async def test_a_deadline_inside_the_breaker_cooldown_expires_the_job(
    state: SimState, make_deliverer: MakeDeliverer
) -> None:
    """While the breaker is open, a job whose deadline comes first is expired, not failed."""
    deliverer = make_deliverer(breaker_failures=1, breaker_cooldown_s=30.0, max_attempts=1)
    state.add_faults(Fault(503))
    with pytest.raises(DeliveryError):
        await deliver(deliverer)
    with anyio.fail_after(5), pytest.raises(DeadlineExceeded):
        await deliver(deliverer, deadline_in_s=2.0)
    assert len(state.received) == 1
