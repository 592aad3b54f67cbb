"""The sliding-window rate limiter, driven by a fake clock."""

from __future__ import annotations

import random

import anyio
import pytest

from cognigy_offload.errors import DeadlineExceeded
from cognigy_offload.metrics import Metrics
from cognigy_offload.ratelimit import Permit, RateLimiter

from .faketime import FakeTime, settle

pytestmark = pytest.mark.anyio


def limiter(
    ft: FakeTime, limit: int, window_s: float = 60.0, metrics: Metrics | None = None
) -> RateLimiter:
    return RateLimiter(limit, ft.clock, ft.sleep, window_s=window_s, metrics=metrics)


async def test_requests_within_the_limit_go_at_once(fake_time: FakeTime) -> None:
    """Up to ``limit`` requests in a window pass without any wait."""
    rl = limiter(fake_time, 3)
    for _ in range(3):
        (await rl.acquire()).release()
    assert fake_time.sleeps == []
    assert rl.in_window() == 3


async def test_the_next_request_waits_until_the_oldest_leaves_the_window(
    fake_time: FakeTime,
) -> None:
    """The (limit+1)-th request waits until window_s after the first one finished."""
    rl = limiter(fake_time, 2)
    first = await rl.acquire()
    fake_time.advance(1.0)
    first.release()  # finished at 1001
    (await rl.acquire()).release()
    got: list[float] = []

    async def third() -> None:
        (await rl.acquire()).release()
        got.append(fake_time.now)

    async with anyio.create_task_group() as tg:
        tg.start_soon(third)
        await settle()
        assert got == []
        assert fake_time.next_wake() == pytest.approx(1061.0)
        fake_time.advance_to_next()
    assert got == [pytest.approx(1061.0)]


async def test_in_flight_requests_hold_their_slot_until_they_finish(fake_time: FakeTime) -> None:
    """With every slot in flight, the next request waits for one to finish, then window_s."""
    rl = limiter(fake_time, 2)
    a = await rl.acquire()
    b = await rl.acquire()
    got: list[float] = []

    async def third() -> None:
        (await rl.acquire()).release()
        got.append(fake_time.now)

    async with anyio.create_task_group() as tg:
        tg.start_soon(third)
        await settle()
        assert got == [] and fake_time.sleeping == 0  # waiting on an event, not a timer
        fake_time.advance(10.0)
        a.release()  # finished at 1010: its slot frees at 1070
        await settle()
        assert fake_time.next_wake() == pytest.approx(1070.0)
        fake_time.advance_to_next()
    assert got == [pytest.approx(1070.0)]
    b.release()


async def test_a_request_that_was_never_sent_frees_its_slot(fake_time: FakeTime) -> None:
    """release(sent=False) gives the slot back at once."""
    rl = limiter(fake_time, 1)
    (await rl.acquire()).release(sent=False)
    (await rl.acquire()).release()
    assert fake_time.sleeps == []


async def test_release_twice_is_harmless(fake_time: FakeTime) -> None:
    """A second release of the same permit changes nothing."""
    rl = limiter(fake_time, 1)
    permit = await rl.acquire()
    permit.release()
    fake_time.advance(30)
    permit.release()
    assert rl.in_window() == 1
    fake_time.advance(30)
    assert rl.in_window() == 0


async def test_pause_until_holds_every_waiter(fake_time: FakeTime) -> None:
    """After pause_until(t) nobody gets a slot before t, even with slots free."""
    rl = limiter(fake_time, 100)
    rl.pause_until(fake_time.now + 30.0)
    times: list[float] = []

    async def one() -> None:
        (await rl.acquire()).release()
        times.append(fake_time.now)

    async with anyio.create_task_group() as tg:
        for _ in range(5):
            tg.start_soon(one)
        await settle()
        assert times == []
        fake_time.advance(29.0)
        await settle()
        assert times == []
        fake_time.advance(1.0)
    assert times == [pytest.approx(1030.0)] * 5


async def test_pause_extends_but_never_shortens(fake_time: FakeTime) -> None:
    """A later pause_until extends the pause; an earlier one does not cut it short."""
    rl = limiter(fake_time, 10)
    rl.pause_until(1050.0)
    rl.pause_until(1020.0)
    assert rl.paused_until == 1050.0
    rl.pause_until(1080.0)
    assert rl.paused_until == 1080.0


async def test_a_pause_set_while_waiting_applies_to_the_waiter(fake_time: FakeTime) -> None:
    """A waiter sleeping for the window re-checks the pause when it wakes."""
    rl = limiter(fake_time, 1)
    (await rl.acquire()).release()
    got: list[float] = []

    async def second() -> None:
        (await rl.acquire()).release()
        got.append(fake_time.now)

    async with anyio.create_task_group() as tg:
        tg.start_soon(second)
        await settle()
        rl.pause_until(1090.0)
        fake_time.advance_to_next()  # 1060: window free, but paused
        await settle()
        assert got == []
        fake_time.advance_to_next()
    assert got == [pytest.approx(1090.0)]


async def test_a_wait_past_the_deadline_raises_at_once(fake_time: FakeTime) -> None:
    """DeadlineExceeded instead of a wait that would end after the deadline; no slot taken."""
    rl = limiter(fake_time, 1)
    (await rl.acquire()).release()
    with pytest.raises(DeadlineExceeded):
        await rl.acquire(deadline_s=fake_time.now + 30.0)
    assert fake_time.sleeps == []
    assert rl.in_window() == 1
    rl.pause_until(fake_time.now + 100.0)
    with pytest.raises(DeadlineExceeded):
        await rl.acquire(deadline_s=fake_time.now + 99.0)


async def test_waiters_are_served_in_arrival_order(fake_time: FakeTime) -> None:
    """Slots go to waiters first come, first served."""
    rl = limiter(fake_time, 1, window_s=10.0)
    order: list[int] = []

    async def one(i: int) -> None:
        (await rl.acquire()).release()
        order.append(i)

    async with anyio.create_task_group() as tg:
        for i in range(5):
            tg.start_soon(one, i)
            await settle(5)
        for _ in range(10):
            await settle()
            if len(order) == 5:
                break
            fake_time.advance_to_next()
    assert order == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
async def test_never_more_than_limit_in_any_rolling_window(seed: int) -> None:
    """Random arrivals and request durations: every window holds at most ``limit`` requests,
    counting each request from its send to its finish (which brackets when the server
    sees it)."""
    rng = random.Random(seed)
    ft = FakeTime()
    limit, window_s = 5, 60.0
    rl = limiter(ft, limit, window_s)
    spans: list[tuple[float, float]] = []

    async def request(start_delay_s: float, duration_s: float) -> None:
        await ft.sleep(start_delay_s)
        permit: Permit = await rl.acquire()
        sent = ft.now
        await ft.sleep(duration_s)
        permit.release()
        spans.append((sent, ft.now))

    count = 40
    async with anyio.create_task_group() as tg:
        for _ in range(count):
            tg.start_soon(request, rng.uniform(0, 200), rng.choice([0.0, 0.5, 3.0, 20.0]))
        for _ in range(2000):
            await settle()
            if len(spans) == count:
                break
            ft.advance_to_next()
    assert len(spans) == count
    sends = sorted(s for s, _ in spans)
    for i in range(count - limit):
        # Among any limit+1 consecutive sends, the window separates the first from the last.
        assert sends[i + limit] - sends[i] >= window_s - 1e-9
    for start, _ in spans:
        # Every other request live in [start - window, start] is at most limit-1 others.
        live = [s for s, e in spans if s <= start and e > start - window_s]
        assert len(live) <= limit


async def test_waits_are_counted_in_metrics(fake_time: FakeTime) -> None:
    """rate_limit_waits counts waiting requests; rate_limit_wait_seconds their wait."""
    metrics = Metrics()
    rl = limiter(fake_time, 1, metrics=metrics)
    (await rl.acquire()).release()

    async def second() -> None:
        (await rl.acquire()).release()

    async with anyio.create_task_group() as tg:
        tg.start_soon(second)
        await settle()
        fake_time.advance_to_next()
    assert metrics.registry.get_sample_value("cognigy_offload_rate_limit_waits_total") == 1.0
    waited = metrics.registry.get_sample_value("cognigy_offload_rate_limit_wait_seconds_total")
    assert waited == pytest.approx(60.0)


def test_invalid_arguments_are_refused() -> None:
    """A zero limit or window is a configuration error, not an endless wait."""
    with pytest.raises(ValueError):
        RateLimiter(0)
    with pytest.raises(ValueError):
        RateLimiter(1, window_s=0)
