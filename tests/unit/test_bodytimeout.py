"""BodyDeadlines: one watchdog ends body reads that run past their limit, and only those."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from cognigy_offload.bodytimeout import BodyDeadlines
from cognigy_offload.errors import RequestError
from cognigy_offload.web import read_body

pytestmark = pytest.mark.anyio


def stalled_after(chunks: list[bytes]) -> Any:
    """An ASGI receive that gives ``chunks`` (more_body) and then never another message."""
    queue = list(chunks)

    async def receive() -> dict[str, Any]:
        if queue:
            return {"type": "http.request", "body": queue.pop(0), "more_body": True}
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    return receive


async def test_a_stalled_read_is_ended_with_408_and_a_prompt_one_is_untouched() -> None:
    deadlines = BodyDeadlines(limit_s=0.2)

    async def complete() -> dict[str, Any]:
        return {"type": "http.request", "body": b"{}", "more_body": False}

    assert await read_body(None, complete, 100, deadlines) == b"{}"
    stalled = asyncio.create_task(read_body(None, stalled_after([b"{"]), 100, deadlines))
    await asyncio.sleep(0.05)
    assert deadlines.expire_overdue() == 0  # not overdue yet
    await asyncio.sleep(0.2)
    assert deadlines.expire_overdue() == 1
    with pytest.raises(RequestError) as caught:
        await stalled
    assert caught.value.status == 408 and caught.value.headers == {"Connection": "close"}
    assert not deadlines._reading and not deadlines._expired  # nothing left behind


async def test_a_cancellation_from_elsewhere_is_not_mistaken_for_a_timeout() -> None:
    """Shutdown cancelling a reading task still cancels it (no 408 answer to nobody)."""
    deadlines = BodyDeadlines(limit_s=60)
    reading = asyncio.create_task(read_body(None, stalled_after([]), 100, deadlines))
    await asyncio.sleep(0.01)
    reading.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reading
    assert not deadlines._reading


async def test_the_watchdog_runs_until_cancelled() -> None:
    deadlines = BodyDeadlines(limit_s=0.1)
    watchdog = asyncio.create_task(deadlines.run())
    stalled = asyncio.create_task(read_body(None, stalled_after([]), 100, deadlines))
    with pytest.raises(RequestError):
        await asyncio.wait_for(stalled, 2)
    watchdog.cancel()
    with pytest.raises(asyncio.CancelledError):
        await watchdog
