"""Nothing lost: kill -9, restarts, SIGTERM, PostgreSQL going away, deadlines, idempotency,
dead letters and several instances sharing one job table.

Real child processes against a real PostgreSQL and the stand-in on loopback.
"""

from __future__ import annotations

import collections
import json
import subprocess
import sys
import uuid
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit

import anyio
import asyncpg
import httpx
import pytest

from cognigy_offload.app import build_app
from cognigy_offload.config import parse_config
from cognigy_offload.models import Target
from cognigy_offload.serving import run_uvicorn
from cognigy_offload.sim import Fault, SimState
from cognigy_offload.store import NewJob, Store
from tests.conftest import ROOT
from tests.integration.conftest import AUTH, SECRETS, Process, body, config_data

pytestmark = pytest.mark.anyio

FINAL = {"delivered", "answered", "failed", "expired"}
SLOW_QUERY = {
    "sql": "SELECT pg_sleep(0.6)::text AS slept, $1::text AS segment",
    "params": ["customer_segment"],
}


async def fetch(dsn: str, sql: str, *args: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        return list(await conn.fetch(sql, *args))
    finally:
        await conn.close()


async def statuses(dsn: str) -> collections.Counter[str]:
    rows = await fetch(dsn, "SELECT status FROM cognigy_offload_jobs")
    return collections.Counter(r["status"] for r in rows)


async def wait_all_final(dsn: str, expected: int, timeout_s: float = 40) -> None:
    with anyio.fail_after(timeout_s):
        while True:
            counts = await statuses(dsn)
            if sum(counts.values()) == expected and set(counts) <= FINAL:
                return
            await anyio.sleep(0.1)


async def post_many(url: str, payloads: Iterable[dict[str, Any]], **headers: str) -> list[str]:
    ids = []
    async with httpx.AsyncClient(base_url=url, headers={**AUTH, **headers}, timeout=10) as c:
        for payload in payloads:
            response = await c.post("/webhook/cognigy-trigger", json=payload)
            assert response.status_code == 202, response.text
            ids.append(response.json()["taskId"])
    return ids


def deliveries_per_task(state: SimState) -> collections.Counter[str]:
    """How many 2xx deliveries the stand-in answered per taskId."""
    counts: collections.Counter[str] = collections.Counter()
    for entry in state.delivered():
        payload = entry.body.get("context") or entry.body.get("data") or {}
        counts[payload["offload"]["taskId"]] += 1
    return counts


class TestCrashRecovery:
    """kill -9 while jobs are queued, running and delivering; a restart finishes them all."""

    async def test_kill_9_loses_nothing_and_reruns_no_stored_result(
        self, process_factory: Any, sim: tuple[SimState, str], database: str
    ) -> None:
        """Every accepted job ends final after kill -9 and restart; jobs whose result was
        stored before the kill are re-delivered without running their query again."""
        state, _ = sim
        state.slowness_s = 1.0
        process: Process = process_factory(queue={"workers": 3}, queries={"slow": SLOW_QUERY})
        await process.start()
        payloads = [body(query="slow" if i % 2 else "revenue") for i in range(12)]
        ids = await post_many(process.url, payloads)
        with anyio.fail_after(10):
            while not {"queued", "running", "delivering"} <= set(await statuses(database)):
                await anyio.sleep(0.02)
        before = {
            r["id"]: r["has_result"]
            for r in await fetch(
                database, "SELECT id, result IS NOT NULL AS has_result FROM cognigy_offload_jobs"
            )
        }
        process.kill()
        state.slowness_s = 0.0
        await process.start()  # same port: same instance name, so its jobs are taken at once
        try:
            await wait_all_final(database, len(ids))
        finally:
            assert await process.terminate() == 0
        rows = await fetch(database, "SELECT id, status, attempts_query FROM cognigy_offload_jobs")
        assert {r["status"] for r in rows} == {"delivered"}
        for row in rows:
            if before[row["id"]]:
                assert row["attempts_query"] == 1, "a stored result was computed again"
        delivered = deliveries_per_task(state)
        assert set(delivered) == set(ids)
        assert "jobs.recovered" in process.output()

    async def test_sigterm_finishes_running_jobs_and_leaves_the_rest_queued(
        self, process_factory: Any, sim: tuple[SimState, str], database: str
    ) -> None:
        """SIGTERM: stop accepting, finish the running job within the grace period, exit 0;
        unstarted jobs stay queued in PostgreSQL and the next start delivers them."""
        state, _ = sim
        process: Process = process_factory(queue={"workers": 1}, queries={"slow": SLOW_QUERY})
        await process.start()
        ids = await post_many(process.url, [body(query="slow") for _ in range(3)])
        with anyio.fail_after(10):
            while (await statuses(database))["running"] != 1:
                await anyio.sleep(0.02)
        assert await process.terminate() == 0
        counts = await statuses(database)
        assert counts["delivered"] == 1 and counts["queued"] == 2, counts
        log = process.output()
        assert "another operation is in progress" not in log
        assert "Unclosed" not in log and "Traceback" not in log
        await process.start()
        try:
            await wait_all_final(database, len(ids))
        finally:
            assert await process.terminate() == 0
        assert (await statuses(database)) == {"delivered": 3}
        assert sorted(deliveries_per_task(state).values()) == [1, 1, 1]

    async def test_sigterm_past_the_grace_period_hands_the_job_back(
        self, process_factory: Any, sim: tuple[SimState, str], database: str
    ) -> None:
        """A job still running when the grace period ends is cancelled and released, and
        the next start runs it to the end."""
        slower = {
            "sql": "SELECT pg_sleep(3)::text AS slept, $1::text AS s",
            "params": ["customer_segment"],
        }
        process: Process = process_factory(
            queue={"workers": 1}, server={"shutdown_grace_s": 0.3}, queries={"slower": slower}
        )
        await process.start()
        await post_many(process.url, [body(query="slower")])
        with anyio.fail_after(10):
            while (await statuses(database))["running"] != 1:
                await anyio.sleep(0.02)
        assert await process.terminate() == 0
        [row] = await fetch(database, "SELECT status, locked_by FROM cognigy_offload_jobs")
        assert row["status"] == "queued" and row["locked_by"] is None
        await process.start()
        try:
            await wait_all_final(database, 1)
        finally:
            await process.terminate()
        assert await statuses(database) == {"delivered": 1}

    async def test_draining_refuses_new_webhooks(self, process_factory: Any, database: str) -> None:
        """While draining, a webhook gets 503 with Retry-After or the connection is refused."""
        slower = {
            "sql": "SELECT pg_sleep(2)::text AS slept, $1::text AS s",
            "params": ["customer_segment"],
        }
        process: Process = process_factory(queue={"workers": 1}, queries={"slower": slower})
        await process.start()
        await post_many(process.url, [body(query="slower")])
        with anyio.fail_after(10):
            while (await statuses(database))["running"] != 1:
                await anyio.sleep(0.02)
        async with httpx.AsyncClient(base_url=process.url, headers=AUTH, timeout=5) as c:
            assert (await c.get("/healthz")).status_code == 200  # open a keep-alive connection
            assert process.proc is not None
            process.proc.send_signal(15)
            await anyio.sleep(0.3)
            try:
                late = await c.post("/webhook/cognigy-trigger", json=body())
                assert late.status_code == 503
                assert "retry-after" in late.headers
            except httpx.TransportError:
                pass  # refusing new connections while draining is allowed too
        assert await process.terminate() == 0
        assert (await statuses(database))["delivered"] == 1


class TestDatabaseOutage:
    """PostgreSQL going away under load: answers stay 202 or 503, nothing accepted is lost."""

    async def test_terminating_backends_under_load(
        self,
        service_factory: Any,
        sim: tuple[SimState, str],
        database: str,
        pg_admin_dsn: str,
    ) -> None:
        """pg_terminate_backend on every connection, three times under load: no 500, no hang,
        every accepted job delivered; a query killed mid-run is retried, not failed."""
        db_name = urlsplit(database).path.lstrip("/")
        slow = {
            "sql": "SELECT pg_sleep(0.5)::text AS slept, $1::text AS s",
            "params": ["customer_segment"],
        }
        codes: collections.Counter[int] = collections.Counter()
        accepted: list[str] = []
        async with service_factory(queries={"slow": slow}) as svc:

            async def load() -> None:
                for i in range(60):
                    response = await svc.post(body(query="slow" if i % 3 == 0 else "revenue"))
                    codes[response.status_code] += 1
                    if response.status_code == 202:
                        accepted.append(response.json()["taskId"])
                    await anyio.sleep(0.02)

            async def kill_backends() -> None:
                for _ in range(3):
                    await anyio.sleep(0.4)
                    await fetch(
                        pg_admin_dsn,
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE datname = $1 AND pid <> pg_backend_pid()",
                        db_name,
                    )

            with anyio.fail_after(60):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(load)
                    tg.start_soon(kill_backends)
                for task_id in accepted:
                    await svc.wait_status(task_id, {"delivered"}, timeout_s=30)
        assert set(codes) <= {202, 503}, codes
        assert codes[202] >= 30
        assert await statuses(database) == {"delivered": codes[202]}

    async def test_database_down_answers_503_within_a_second(
        self, service_factory: Any, database: str, pg_admin_dsn: str
    ) -> None:
        """Without the database no job can be stored: 503 with Retry-After, in under 1 s."""
        db_name = urlsplit(database).path.lstrip("/")
        async with service_factory() as svc:
            await fetch(pg_admin_dsn, f'ALTER DATABASE "{db_name}" ALLOW_CONNECTIONS false')
            await fetch(
                pg_admin_dsn,
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1",
                db_name,
            )
            try:
                with anyio.fail_after(1.5):
                    started = anyio.current_time()
                    response = await svc.post()
                    elapsed_s = anyio.current_time() - started
                assert response.status_code == 503, response.text
                assert response.headers["retry-after"]
                assert elapsed_s < 1.0
                ready = await svc.client.get("/readyz")
                assert ready.status_code == 503
                assert "database" in " ".join(ready.json()["problems"])
            finally:
                await fetch(pg_admin_dsn, f'ALTER DATABASE "{db_name}" ALLOW_CONNECTIONS true')
            with anyio.fail_after(10):
                while (response := await svc.post()).status_code != 202:
                    await anyio.sleep(0.1)
            await svc.wait_status(response.json()["taskId"], {"delivered"})

    async def test_a_hanging_database_still_answers_503_within_a_second(
        self, service_factory: Any, database: str
    ) -> None:
        """A job table that blocks (locked, not down) gives 503 with Retry-After in ~1 s."""
        async with service_factory() as svc:
            assert (await svc.post()).status_code == 202
            blocker = await asyncpg.connect(database)
            try:
                async with blocker.transaction():
                    await blocker.execute(
                        "LOCK TABLE cognigy_offload_jobs IN ACCESS EXCLUSIVE MODE"
                    )
                    started = anyio.current_time()
                    with anyio.fail_after(3):
                        response = await svc.post()
                    elapsed_s = anyio.current_time() - started
            finally:
                await blocker.close()
        assert response.status_code == 503 and response.headers["retry-after"]
        assert elapsed_s < 1.5


class TestIdempotency:
    """Idempotency-Key: one job per key, enforced by PostgreSQL."""

    async def test_same_key_same_body_gives_the_same_task_and_one_delivery(
        self, service_factory: Any, sim: tuple[SimState, str], database: str
    ) -> None:
        """A repeat gets the same taskId (200) and creates no second job, query or push."""
        state, _ = sim
        async with service_factory() as svc:
            first = await svc.post(headers={"Idempotency-Key": "k-1"})
            again = await svc.post(headers={"Idempotency-Key": "k-1"})
            assert first.status_code == 202 and again.status_code == 200
            assert first.json()["taskId"] == again.json()["taskId"]
            await svc.wait_status(first.json()["taskId"], {"delivered"})
            late = await svc.post(headers={"Idempotency-Key": "k-1"})
            assert late.json()["taskId"] == first.json()["taskId"]
        assert sum((await statuses(database)).values()) == 1
        assert len(state.delivered()) == 1

    async def test_the_same_json_formatted_differently_is_the_same_body(
        self, service_factory: Any
    ) -> None:
        """Pretty-printed, with keys reordered: still the same body for the key (200)."""
        async with service_factory() as svc:
            first = await svc.post(headers={"Idempotency-Key": "k-fmt"})
            pretty = json.dumps(dict(reversed(list(body().items()))), indent=2)
            again = await svc.client.post(
                "/webhook/cognigy-trigger",
                content=pretty,
                headers={"Idempotency-Key": "k-fmt", "Content-Type": "application/json"},
            )
        assert again.status_code == 200, again.text
        assert again.json()["taskId"] == first.json()["taskId"]

    async def test_same_key_other_body_is_a_409(self, service_factory: Any) -> None:
        """The same key with a different body is a conflict."""
        async with service_factory() as svc:
            assert (await svc.post(headers={"Idempotency-Key": "k-2"})).status_code == 202
            other = await svc.post(body(userId="someone-else"), headers={"Idempotency-Key": "k-2"})
        assert other.status_code == 409
        assert other.json()["error"] == "idempotency_conflict"

    async def test_concurrent_requests_with_one_key_make_one_job(
        self, service_factory: Any, sim: tuple[SimState, str], database: str
    ) -> None:
        """20 concurrent requests with one key: one job, one taskId, one delivery."""
        state, _ = sim
        answers: list[httpx.Response] = []
        async with service_factory() as svc:

            async def one() -> None:
                answers.append(await svc.post(headers={"Idempotency-Key": "k-3"}))

            async with anyio.create_task_group() as tg:
                for _ in range(20):
                    tg.start_soon(one)
            task_ids = {a.json()["taskId"] for a in answers}
            assert len(task_ids) == 1
            assert sorted(a.status_code for a in answers) == [200] * 19 + [202]
            await svc.wait_status(task_ids.pop(), {"delivered"})
        assert sum((await statuses(database)).values()) == 1
        assert len(state.delivered()) == 1

    async def test_two_instances_share_the_key(self, process_factory: Any, database: str) -> None:
        """The unique constraint holds across instances: the key made on A is found on B."""
        a: Process = process_factory()
        b: Process = process_factory()
        await a.start()
        await b.start()
        try:
            [one] = await post_many(a.url, [body()], **{"Idempotency-Key": "shared"})
            async with httpx.AsyncClient(base_url=b.url, headers=AUTH) as c:
                again = await c.post(
                    "/webhook/cognigy-trigger", json=body(), headers={"Idempotency-Key": "shared"}
                )
            assert again.status_code == 200 and again.json()["taskId"] == one
        finally:
            await a.terminate()
            await b.terminate()


class TestDeadlines:
    """A job not delivered within queue.job_deadline_s is expired, never delivered late."""

    async def test_delivery_retries_stop_at_the_deadline(
        self, service_factory: Any, sim: tuple[SimState, str]
    ) -> None:
        """With Cognigy answering 503, the job expires at its deadline; no attempt starts
        after it."""
        state, _ = sim
        state.add_faults(*[Fault(status=503) for _ in range(200)])
        async with service_factory(
            queue={"job_deadline_s": 1.0},
            cognigy={
                "backoff_base_s": 0.2,
                "backoff_max_s": 0.2,
                "max_attempts": 100,
                "breaker_failures": 1000,
            },
        ) as svc:
            response = await svc.post()
            task_id = response.json()["taskId"]
            doc = await svc.wait_status(task_id, {"expired", "failed", "delivered"})
            sent_at = [entry.received_at for entry in state.received]
        assert doc["status"] == "expired"
        assert doc["attempts"]["delivery"] == len(sent_at) >= 2
        assert state.delivered() == []

    async def test_a_job_queued_past_its_deadline_never_runs(
        self, service_factory: Any, sim: tuple[SimState, str]
    ) -> None:
        """A job that waited in the queue beyond its deadline is expired without its query."""
        state, _ = sim
        slower = {
            "sql": "SELECT pg_sleep(1.2)::text AS slept, $1::text AS s",
            "params": ["customer_segment"],
        }
        async with service_factory(
            queue={"workers": 1, "job_deadline_s": 1.0}, queries={"slower": slower}
        ) as svc:
            first = (await svc.post(body(query="slower"))).json()["taskId"]
            second = (await svc.post()).json()["taskId"]
            doc = await svc.wait_status(second, {"expired", "delivered", "failed"})
            await svc.wait_status(first, {"expired", "delivered", "failed"})
        assert doc["status"] == "expired"
        assert doc["result"] is None and doc["attempts"] == {"query": 0, "delivery": 0}
        assert state.delivered() == []  # the first job, finished after its deadline, neither


class TestDeadLetters:
    """jobs list / show / retry against the configured database."""

    async def test_list_show_and_retry_a_failed_job(
        self, process_factory: Any, sim: tuple[SimState, str], database: str
    ) -> None:
        """A 403-failed job is listed, shown, and `jobs retry` re-delivers it from its stored
        result (the query is not run again)."""
        state, _ = sim
        state.add_faults(Fault(status=403))
        process: Process = process_factory()
        await process.start()
        try:
            [task_id] = await post_many(process.url, [body()])
            await wait_all_final(database, 1)

            def cli(*args: str) -> subprocess.CompletedProcess[str]:
                return subprocess.run(
                    [
                        sys.executable,
                        "-m",
                        "cognigy_offload",
                        "jobs",
                        *args,
                        "--config",
                        str(process.config_path),
                    ],
                    env=process.env,
                    cwd=ROOT,
                    capture_output=True,
                    text=True,
                    timeout=60,
                )

            listed = await anyio.to_thread.run_sync(cli, "list", "--status", "failed")
            assert listed.returncode == 0, listed.stderr
            assert task_id in listed.stdout and "forbidden" in listed.stdout
            shown = await anyio.to_thread.run_sync(cli, "show", task_id)
            assert shown.returncode == 0 and '"httpStatus":403' in shown.stdout
            retried = await anyio.to_thread.run_sync(cli, "retry", task_id)
            assert retried.returncode == 0, retried.stderr
            assert "re-delivered from its stored result" in retried.stdout
            await wait_all_final(database, 1)
            again = await anyio.to_thread.run_sync(cli, "retry", task_id)
            assert again.returncode == 1 and "it is delivered" in again.stderr
            unknown = await anyio.to_thread.run_sync(cli, "show", "nope")
            assert unknown.returncode == 1
        finally:
            await process.terminate()
        [row] = await fetch(database, "SELECT status, attempts_query FROM cognigy_offload_jobs")
        assert row["status"] == "delivered" and row["attempts_query"] == 1
        assert len(state.delivered()) == 1

    async def test_finished_jobs_are_pruned_after_the_retention(
        self, service_factory: Any, database: str
    ) -> None:
        """Store.prune deletes finished jobs older than the retention and keeps the rest."""
        async with service_factory() as svc:
            task_id = (await svc.post()).json()["taskId"]
            await svc.wait_status(task_id, {"delivered"})
            assert await svc.service.store.prune(3600) == 0
            await anyio.sleep(0.2)
            assert await svc.service.store.prune(0.1) == 1
            assert (await svc.client.get(f"/tasks/{task_id}")).status_code == 404


class TestSeveralInstances:
    """Two `serve` processes against one PostgreSQL share the job table."""

    async def test_two_instances_run_each_job_once(
        self, process_factory: Any, sim: tuple[SimState, str], database: str
    ) -> None:
        """Jobs sent to both instances are each delivered exactly once."""
        state, _ = sim
        a: Process = process_factory()
        b: Process = process_factory()
        await a.start()
        await b.start()
        try:
            ids = await post_many(a.url, [body() for _ in range(15)])
            ids += await post_many(b.url, [body() for _ in range(15)])
            await wait_all_final(database, 30)
        finally:
            assert await a.terminate() == 0
            assert await b.terminate() == 0
        delivered = deliveries_per_task(state)
        assert set(delivered) == set(ids)
        assert set(delivered.values()) == {1}, "a job was delivered twice"

    async def test_a_second_copy_on_a_busy_port_stops_before_touching_jobs(
        self, process_factory: Any, sim: tuple[SimState, str], database: str
    ) -> None:
        """Starting the service twice on one port: the second copy exits (code 2, naming
        server.port) before its start-up recovery, so the running copy's jobs are delivered
        once each."""
        state, _ = sim
        state.slowness_s = 0.5
        a: Process = process_factory()
        await a.start()
        try:
            ids = await post_many(a.url, [body() for _ in range(4)])
            twin: Process = process_factory(port=a.port)
            result = await anyio.to_thread.run_sync(
                lambda: subprocess.run(
                    [
                        sys.executable,
                        "-m",
                        "cognigy_offload",
                        "serve",
                        "--config",
                        str(twin.config_path),
                    ],
                    env=twin.env,
                    cwd=ROOT,
                    capture_output=True,
                    text=True,
                    timeout=60,
                )
            )
            assert result.returncode == 2, result.stderr
            assert "server.port" in result.stderr and "jobs.recovered" not in result.stderr
            await wait_all_final(database, 4)
        finally:
            assert await a.terminate() == 0
        assert deliveries_per_task(state) == dict.fromkeys(ids, 1)

    async def test_jobs_of_a_killed_instance_are_taken_over(
        self, process_factory: Any, sim: tuple[SimState, str], database: str
    ) -> None:
        """kill -9 one instance holding jobs: the other takes them over after the lease."""
        state, _ = sim
        state.slowness_s = 0.8
        a: Process = process_factory(queue={"workers": 1})
        b: Process = process_factory()
        await a.start()
        await b.start()
        try:
            ids = await post_many(a.url, [body() for _ in range(6)])
            with anyio.fail_after(10):
                while not (await statuses(database))["delivering"]:
                    await anyio.sleep(0.02)
            a.kill()
            state.slowness_s = 0.0
            await wait_all_final(database, 6, timeout_s=30)
        finally:
            assert await b.terminate() == 0
        assert (await statuses(database)) == {"delivered": 6}
        assert set(deliveries_per_task(state)) == set(ids)
        assert "jobs.recovered" in b.output()


async def test_a_restart_takes_back_more_of_its_jobs_than_the_queue_holds_without_the_lease(
    database: str, sim: tuple[SimState, str]
) -> None:
    """An earlier run of this instance (same host:port) left more unfinished jobs than
    queue.capacity: the start-up sweep takes what fits and the next sweeps take the rest
    as room frees up, instead of leaving them until their (here 10 min) lease lapses."""
    name = "recovery-host:4321"
    pool = await asyncpg.create_pool(database, min_size=1, max_size=2)
    try:
        earlier = Store(pool, instance_id=f"{name}:99999:dead", lease_s=600, deadline_s=1500)
        await earlier.migrate()
        target = Target(mode="context", userId="u", sessionId="s")
        variables = json.dumps(body()["variables"]).encode()
        async with anyio.create_task_group() as tg:
            await tg.start(earlier.run_committer)
            for _ in range(12):
                await earlier.insert(NewJob(uuid.uuid4(), "revenue", variables, target, None, None))
            tg.cancel_scope.cancel()
    finally:
        await pool.close()
    state, sim_url = sim
    config = parse_config(
        config_data(sim_url, queue={"capacity": 5, "workers": 2, "sweep_interval_s": 0.2})
    )
    app = build_app(config, SECRETS, dsn=database, name=name)
    async with run_uvicorn(app):
        with anyio.fail_after(20):
            await wait_all_final(database, 12, timeout_s=20)
    counts = await statuses(database)
    assert counts == {"delivered": 12}, counts
    assert len(state.received) >= 12
