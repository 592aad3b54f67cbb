"""Crash and race windows of the fast paths: a fresh job runs without a claim at epoch 0,
progress shows late, worker writes commit without waiting for the disk.

Real child processes (or the service in-process) against the embedded PostgreSQL and the
stand-in on loopback.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import anyio
import asyncpg
import httpx
import pytest

from cognigy_offload.app import build_app
from cognigy_offload.config import parse_config
from cognigy_offload.db import EmbeddedPostgres
from cognigy_offload.seed import ensure_transactions
from cognigy_offload.serving import run_uvicorn
from cognigy_offload.sim import Fault, SimState
from tests.integration.conftest import AUTH, SECRETS, Process, body, config_data
from tests.integration.test_recovery import (
    deliveries_per_task,
    fetch,
    post_many,
    wait_all_final,
)

pytestmark = pytest.mark.anyio

WEBHOOK = "/webhook/cognigy-trigger"


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


class TestKilledDuringTheFirstPush:
    """kill -9 while the first push of a fresh job is in flight (SPEC §3: the result is
    stored and never recomputed)."""

    async def test_the_push_is_repeated_from_the_stored_result(
        self, process_factory: Any, sim: tuple[SimState, str], database: str
    ) -> None:
        """The restart pushes the same result again (same body, same timestamp), from the
        row: the query does not run a second time."""
        state, _ = sim
        state.slowness_s = 3.0  # the push is in flight when the process dies
        process: Process = process_factory(queue={"workers": 1})
        await process.start()
        [task_id] = await post_many(process.url, [body()])
        with anyio.fail_after(5):
            await state.wait_received(1)
        process.kill()
        state.slowness_s = 0.0
        await process.start()
        try:
            await wait_all_final(database, 1, timeout_s=10)
        finally:
            assert await process.terminate() == 0
        row = await job_row(database)
        assert row["status"] == "delivered"
        assert row["attempts_query"] == 1, "the result was computed again"
        pushes = [r.body["context"]["offload"] for r in state.received]
        assert [p["taskId"] for p in pushes] == [task_id, task_id]
        assert pushes[0] == pushes[1]  # the same result, with the same timestamp


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


def _kill_postgres(data_dir: Path) -> None:
    """kill -9 the postmaster under ``data_dir`` and every process it started: whatever
    WAL was not yet written out of shared memory is gone, as in a crash."""
    postmaster = int((data_dir / "postmaster.pid").read_text().split()[0])
    victims = [postmaster]
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == postmaster:
                victims.append(int(stat.parent.name))
    for pid in victims:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for _ in range(100):  # gone (or a zombie nobody reaps) within a second
        if not any(_alive(pid) for pid in victims):
            break
        time.sleep(0.01)
    # Every process of it is dead: its lock files are stale.
    for lock in (data_dir / "postmaster.pid", *data_dir.glob(".s.PGSQL.*.lock")):
        lock.unlink()


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


class TestInlineAnswerSurvivesACrash:
    """Prefer: wait answered 200: the caller has the result, it must never be pushed too."""

    async def test_an_answer_given_inline_is_durable_before_it_is_sent(
        self, sim: tuple[SimState, str], tmp_path: Path
    ) -> None:
        """PostgreSQL crashes right after the 200 (WAL writer slow, as under load): after
        recovery the job is still 'answered', so it is not run and pushed to Cognigy as
        well (a second input to the flow)."""
        state, sim_url = sim
        data_dir = tmp_path / "pg"
        server = EmbeddedPostgres(data_dir)
        dsn = await anyio.to_thread.run_sync(server.start)
        try:
            conn = await asyncpg.connect(dsn)
            try:
                await ensure_transactions(conn, 100)
                # Asynchronously committed WAL waits for the WAL writer: make that wait long.
                await conn.execute("ALTER SYSTEM SET wal_writer_delay = '10s'")
                await conn.execute("SELECT pg_reload_conf()")
            finally:
                await conn.close()
            config = parse_config(config_data(sim_url, queue={"workers": 1, "lease_s": 1}))
            app = build_app(config, SECRETS, dsn=dsn)
            async with (
                run_uvicorn(app) as url,
                httpx.AsyncClient(base_url=url, headers=AUTH, timeout=10) as client,
            ):
                response = await client.post(WEBHOOK, json=body(), headers={"Prefer": "wait=5"})
                assert response.status_code == 200, response.text
                assert response.json()["status"] == "answered"
                task_id = response.json()["taskId"]
                _kill_postgres(data_dir)
                # The same handle starts it again (on the same socket: the same DSN).
                await anyio.to_thread.run_sync(server._server.ensure_postgres_running)
                conn = await asyncpg.connect(dsn)
                try:
                    status = await conn.fetchval(
                        "SELECT status FROM cognigy_offload_jobs WHERE id = $1",
                        uuid.UUID(task_id),
                    )
                finally:
                    await conn.close()
            assert status == "answered"
            assert state.received == []
        finally:
            await anyio.to_thread.run_sync(server.stop)
