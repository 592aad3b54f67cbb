"""The bounded hand-off between the webhook and the workers."""

from __future__ import annotations

import uuid

import anyio
import pytest

from cognigy_offload.inline import InlineWaiters
from cognigy_offload.jobqueue import JobQueue, QueueFull

pytestmark = pytest.mark.anyio


async def test_reservations_count_against_capacity_before_anything_is_stored() -> None:
    """A reserved slot is taken at once, so a committed job always fits."""
    queue = JobQueue(2)
    queue.reserve()
    queue.reserve()
    with pytest.raises(QueueFull):
        queue.reserve()
    queue.cancel()
    first = uuid.uuid4()
    queue.push(first)
    assert queue.depth == 1 and queue.free == 1
    assert await queue.get() == (first, None)
    assert queue.depth == 0
    queue.close()


async def test_close_returns_the_jobs_never_started() -> None:
    """Closing hands back the waiting ids and ends the workers' loop."""
    queue = JobQueue(3)
    ids = [uuid.uuid4() for _ in range(2)]
    for job_id in ids:
        queue.reserve()
        queue.push(job_id)
    assert sorted(queue.close()) == sorted(ids)
    with pytest.raises((anyio.EndOfStream, anyio.ClosedResourceError)):
        await queue.get()
    with pytest.raises(QueueFull):
        queue.reserve()


async def test_a_recovered_job_already_waiting_is_not_queued_twice() -> None:
    """put() of an id already in the channel is ignored."""
    queue = JobQueue(3)
    job_id = uuid.uuid4()
    queue.put(job_id)
    queue.put(job_id)
    assert queue.depth == 1
    queue.close()


def test_a_result_goes_to_the_waiting_caller_or_to_cognigy_never_both() -> None:
    """take() after abandon() gives None (deliver); abandon() after take() says wait."""
    waiters = InlineWaiters(limit=2)
    a, b = uuid.uuid4(), uuid.uuid4()
    assert waiters.register(a) is not None and waiters.register(b) is not None
    assert waiters.register(uuid.uuid4()) is None  # bounded
    assert waiters.abandon(a) is True
    assert waiters.take(a) is None
    assert waiters.take(b) is not None
    assert waiters.abandon(b) is False
    waiters.finish(b, {"status": "answered"})
    assert len(waiters) == 0
