"""The circuit breaker: closed → open → half-open (one probe) → closed or open again."""

from __future__ import annotations

import anyio
import pytest

from cognigy_offload.errors import DeadlineExceeded
from cognigy_offload.metrics import Metrics
from cognigy_offload.ratelimit import CircuitBreaker

from .faketime import FakeTime, settle

pytestmark = pytest.mark.anyio

GAUGE = "cognigy_offload_circuit_breaker_state"


def breaker(ft: FakeTime, threshold: int = 3, cooldown_s: float = 30.0) -> CircuitBreaker:
    return CircuitBreaker(threshold, cooldown_s, ft.clock, sleep=ft.sleep, metrics=Metrics())


def gauge(cb: CircuitBreaker) -> float | None:
    assert cb._metrics is not None
    return cb._metrics.registry.get_sample_value(GAUGE)


async def test_closed_lets_everything_through(fake_time: FakeTime) -> None:
    """A closed breaker never waits and nobody is a probe."""
    cb = breaker(fake_time)
    assert [await cb.acquire() for _ in range(5)] == [False] * 5
    assert cb.state == "closed" and gauge(cb) == 0


async def test_a_success_resets_the_failure_count(fake_time: FakeTime) -> None:
    """Only consecutive failures open it."""
    cb = breaker(fake_time, threshold=3)
    for _ in range(2):
        cb.record_failure()
    cb.record_success()
    for _ in range(2):
        cb.record_failure()
    assert cb.state == "closed"
    cb.record_failure()
    assert cb.state == "open" and gauge(cb) == 1
    assert cb.open_until == pytest.approx(fake_time.now + 30.0)


async def test_open_waits_for_the_cooldown_then_lets_exactly_one_probe_through(
    fake_time: FakeTime,
) -> None:
    """While open everyone waits; after the cooldown one probe goes, the rest wait for it;
    its success closes the breaker and releases them."""
    cb = breaker(fake_time, threshold=2)
    cb.record_failure()
    cb.record_failure()
    went: list[tuple[int, bool]] = []

    async def caller(i: int) -> None:
        went.append((i, await cb.acquire()))

    async with anyio.create_task_group() as tg:
        for i in range(4):
            tg.start_soon(caller, i)
        await settle()
        assert went == []
        fake_time.advance(29.9)
        await settle()
        assert went == []
        fake_time.advance(0.1)
        await settle()
        assert len(went) == 1 and went[0][1] is True
        assert cb.state == "half_open" and gauge(cb) == 2
        cb.record_success()
    assert sorted(probe for _, probe in went) == [False, False, False, True]
    assert cb.state == "closed" and gauge(cb) == 0


async def test_a_failed_probe_reopens_for_another_cooldown(fake_time: FakeTime) -> None:
    """Probe failure → open again; the waiters wait a new cooldown, then one probes again."""
    cb = breaker(fake_time, threshold=1, cooldown_s=10.0)
    cb.record_failure()
    fake_time.advance(10.0)
    assert await cb.acquire() is True
    went: list[bool] = []

    async def caller() -> None:
        went.append(await cb.acquire())

    async with anyio.create_task_group() as tg:
        tg.start_soon(caller)
        tg.start_soon(caller)
        await settle()
        assert went == []
        cb.record_failure()  # the probe failed
        await settle()
        assert cb.state == "open" and went == []
        assert cb.open_until == pytest.approx(fake_time.now + 10.0)
        fake_time.advance(10.0)
        await settle()
        assert went == [True]
        cb.record_success()
    assert went == [True, False]


async def test_an_abandoned_probe_hands_the_probe_to_the_next_waiter(fake_time: FakeTime) -> None:
    """A probe that sent nothing (cancelled, lease lost) must not leave it half-open for ever."""
    cb = breaker(fake_time, threshold=1, cooldown_s=5.0)
    cb.record_failure()
    fake_time.advance(5.0)
    assert await cb.acquire() is True
    went: list[bool] = []

    async def caller() -> None:
        went.append(await cb.acquire())

    async with anyio.create_task_group() as tg:
        tg.start_soon(caller)
        await settle()
        cb.abandon_probe()
        await settle()
        assert went == [True]
        cb.record_success()


async def test_a_cooldown_past_the_deadline_raises_at_once(fake_time: FakeTime) -> None:
    """Waiting is fine, waiting past the job's deadline is not."""
    cb = breaker(fake_time, threshold=1, cooldown_s=30.0)
    cb.record_failure()
    with pytest.raises(DeadlineExceeded):
        await cb.acquire(deadline_s=fake_time.now + 10.0)
    assert fake_time.sleeps == []


async def test_waiting_for_a_probe_ends_at_the_deadline(fake_time: FakeTime) -> None:
    """A waiter behind an in-flight probe gives up at its deadline (real-time bound)."""
    cb = breaker(fake_time, threshold=1, cooldown_s=1.0)
    cb.record_failure()
    fake_time.advance(1.0)
    assert await cb.acquire() is True
    with anyio.fail_after(5), pytest.raises(DeadlineExceeded):
        await cb.acquire(deadline_s=fake_time.now + 0.05)


async def test_failures_while_open_do_not_extend_the_cooldown(fake_time: FakeTime) -> None:
    """Late failures of requests sent before it opened do not push the probe back."""
    cb = breaker(fake_time, threshold=2, cooldown_s=30.0)
    cb.record_failure()
    cb.record_failure()
    until = cb.open_until
    fake_time.advance(5.0)
    cb.record_failure()
    assert cb.open_until == until


def test_invalid_threshold_is_refused() -> None:
    """A threshold of 0 would open on nothing."""
    with pytest.raises(ValueError):
        CircuitBreaker(0, 1.0)
