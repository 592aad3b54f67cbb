"""Crash and race windows of the fast paths: a fresh job runs without a claim at epoch 0,
its result is checkpointed only before a retry, progress shows late, writes commit async.

Real child processes (or the service in-process) against the embedded PostgreSQL and the
stand-in on loopback.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import anyio
import pytest

from cognigy_offload.sim import Fault, SimState
from tests.integration.conftest import Process, body
from tests.integration.test_recovery import (
    deliveries_per_task,
    fetch,
    post_many,
    wait_all_final,
)

pytestmark = pytest.mark.anyio


async def job_row(dsn: str) -> Any:
    [row] = await fetch(
        dsn,
        "SELECT status, result IS NOT NULL AS has_result, attempts_query, attempts_delivery "
        "FROM cognigy_offload_jobs",
    )
    return row


class TestFailedFirstDelivery:
    """The first delivery of a fresh job fails and a retry waits (429 Retry-After)."""

    async def test_kill_9_while_waiting_to_retry_keeps_the_result_and_the_attempt(
        self, process_factory: Any, sim: tuple[SimState, str], database: str
    ) -> None:
        """Once the first attempt has failed, its result and the attempt are in the row:
        kill -9 during the wait for the retry, and the restart re-delivers the stored
        result (no second query run) and counts both delivery attempts."""
        state, _ = sim
        state.add_faults(Fault(status=429, retry_after="3"))
        process: Process = process_factory(queue={"workers": 1})
        await process.start()
        [task_id] = await post_many(process.url, [body()])
        with anyio.fail_after(5):
            await state.wait_received(1)
        await anyio.sleep(0.6)  # well inside the 3 s wait for the second attempt
        row = await job_row(database)
        process.kill()
        assert row["has_result"], f"result not checkpointed after a failed attempt: {dict(row)}"
        assert row["attempts_delivery"] == 1, dict(row)
        await process.start()
        try:
            await wait_all_final(database, 1, timeout_s=8)
        finally:
            assert await process.terminate() == 0
        row = await job_row(database)
        assert row["status"] == "delivered"
        assert row["attempts_query"] == 1, "the stored result was computed again"
        assert row["attempts_delivery"] == 2, dict(row)
        assert deliveries_per_task(state) == {task_id: 1}


class TestDatabaseGoneAtTheEnd:
    """PostgreSQL goes away while a delivery is in flight and is back a moment later."""

    async def test_a_finish_that_meets_a_restarting_database_is_retried_not_redelivered(
        self,
        service_factory: Any,
        sim: tuple[SimState, str],
        database: str,
        pg_admin_dsn: str,
    ) -> None:
        """The delivery succeeded but the final write hit a database that was restarting:
        the worker writes it once the database is back (it still holds the lease), rather
        than leaving the lease to lapse so that the job is run and delivered again."""
        state, _ = sim
        state.slowness_s = 0.8
        db_name = urlsplit(database).path.lstrip("/")
        async with service_factory(queue={"workers": 1, "lease_s": 2}) as svc:
            task_id = (await svc.post()).json()["taskId"]
            with anyio.fail_after(5):
                await state.wait_received(1)
            await fetch(pg_admin_dsn, f'ALTER DATABASE "{db_name}" ALLOW_CONNECTIONS false')
            try:
                await fetch(
                    pg_admin_dsn,
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1",
                    db_name,
                )
                await anyio.sleep(1.5)  # the delivery is answered meanwhile
            finally:
                await fetch(pg_admin_dsn, f'ALTER DATABASE "{db_name}" ALLOW_CONNECTIONS true')
            doc = await svc.wait_status(task_id, {"delivered", "failed"}, timeout_s=5)
            await anyio.sleep(2.5)  # past the lease: a lapsed job would be taken again now
            doc = (await svc.client.get(f"/tasks/{task_id}")).json()
        assert doc["status"] == "delivered", doc
        assert doc["attempts"] == {"query": 1, "delivery": 1}, doc
        assert deliveries_per_task(state) == {task_id: 1}
