"""Single-flight and the "accepted while it ran" rule of Executor.run, on a scripted run.

The database is replaced by a run whose start and end the test controls: what is under
test is which jobs share which run, not PostgreSQL.
"""

from __future__ import annotations

import time
from typing import Any

import anyio
import pytest

from cognigy_offload.queries import Executor, Query
from tests.conftest import REVENUE_QUERY

pytestmark = pytest.mark.anyio


class ScriptedExecutor(Executor):
    """An Executor whose runs end when the test says so, each with a new result."""

    def __init__(self) -> None:
        super().__init__(None)  # type: ignore[arg-type]
        self.release = anyio.Event()
        self.started = anyio.Event()

    async def _execute(self, query: Query, args: list[Any]) -> dict[str, Any]:
        self.runs += 1
        number = self.runs
        self.started.set()
        await self.release.wait()
        return {"run": number}


async def test_identical_questions_share_one_run_and_others_run_apart() -> None:
    """Jobs asking the same thing while it runs share it; another parameter runs its own."""
    executor = ScriptedExecutor()
    got: list[dict[str, Any]] = []

    async def ask(segment: str) -> None:
        got.append(await executor.run(REVENUE_QUERY, [segment], accepted_at_s=time.time()))

    async with anyio.create_task_group() as tg:
        for segment in ["smb"] * 5 + ["enterprise"]:
            tg.start_soon(ask, segment)
        await anyio.wait_all_tasks_blocked()
        executor.release.set()
    assert executor.runs == 2
    assert sorted(r["run"] for r in got) == [1, 1, 1, 1, 1, 2]  # smb asked first


async def test_a_job_accepted_while_the_run_went_on_takes_it_even_when_asking_later() -> None:
    """The worker of a job accepted during a run may come only after the run ended (the
    queue was long): it takes that run's result, as it would have by joining the run."""
    executor = ScriptedExecutor()
    async with anyio.create_task_group() as tg:
        tg.start_soon(executor.run, REVENUE_QUERY, ["smb"])
        await executor.started.wait()
        accepted_during_run = time.time()
        executor.release.set()
    later = await executor.run(REVENUE_QUERY, ["smb"], accepted_at_s=accepted_during_run)
    assert later == {"run": 1} and executor.runs == 1


async def test_a_job_accepted_after_the_run_ended_runs_the_query_again() -> None:
    """No result from before a job arrived: without cache_ttl_s it gets a run of its own."""
    executor = ScriptedExecutor()
    executor.release.set()
    first = await executor.run(REVENUE_QUERY, ["smb"], accepted_at_s=time.time())
    await anyio.sleep(0.01)
    second = await executor.run(REVENUE_QUERY, ["smb"], accepted_at_s=time.time())
    assert (first, second) == ({"run": 1}, {"run": 2})
    third = await executor.run(REVENUE_QUERY, ["smb"])  # no acceptance time: never reused
    assert third == {"run": 3}
