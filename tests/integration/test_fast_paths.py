"""The fast paths keep their promises: group commit, coalescing, result cache, inline answers.

Real PostgreSQL, real HTTP on loopback, the Cognigy stand-in. Where a test needs work to
be held in flight it takes a PostgreSQL lock (on the job table to hold INSERTs, on
``transactions`` to hold queries) instead of sleeping, and releases it when the state it
waits for is visible.
"""

from __future__ import annotations

import contextlib
import inspect
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
import asyncpg
import httpx
import pytest

from cognigy_offload.sim import SimState
from tests.integration.conftest import AUTH, Process, Running, body

pytestmark = pytest.mark.anyio

JOBS = "cognigy_offload_jobs"
SLOW_QUERY = {
    "sql": "SELECT $1::float8 AS slept FROM pg_sleep($1::float8)",
    "params": ["seconds"],
}
REVENUE_SQL = """
SELECT count(*) AS count, coalesce(sum(amount), 0) AS total
FROM transactions
WHERE segment = $1 AND created_at >= $2 AND created_at < $3
"""
CACHE_TTL_S = 2.0
CACHED_QUERY = {
    "sql": REVENUE_SQL,
    "params": ["customer_segment", "date_range.start", "date_range.end"],
    "cache_ttl_s": CACHE_TTL_S,
}


class TableLock:
    """A PostgreSQL table lock held by a side connection until ``release``."""

    def __init__(self, dsn: str, table: str, mode: str) -> None:
        self.dsn = dsn
        self.table = table
        self.mode = mode
        self._conn: asyncpg.Connection | None = None
        self._tx: Any = None

    async def acquire(self) -> None:
        self._conn = await asyncpg.connect(self.dsn)
        self._tx = self._conn.transaction()
        await self._tx.start()
        await self._conn.execute(f"LOCK TABLE {self.table} IN {self.mode} MODE")

    async def release(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(asyncpg.InterfaceError):
                await self._tx.rollback()
            await self._conn.close()
            self._conn = None


@contextlib.asynccontextmanager
async def table_lock(dsn: str, table: str, mode: str) -> AsyncIterator[TableLock]:
    """Hold ``LOCK TABLE table IN mode MODE``; released on exit at the latest."""
    lock = TableLock(dsn, table, mode)
    await lock.acquire()
    try:
        yield lock
    finally:
        await lock.release()


async def until(check: Callable[[], bool | Awaitable[bool]], timeout_s: float = 15.0) -> None:
    """Wait for state that has no event of its own (a lock wait, a counter), bounded."""
    with anyio.fail_after(timeout_s):
        while True:
            outcome = check()
            if inspect.isawaitable(outcome):
                outcome = await outcome
            if outcome:
                return
            await anyio.sleep(0.01)


async def fetchval(dsn: str, sql: str, *args: Any) -> Any:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetchval(sql, *args)
    finally:
        await conn.close()


async def rows_for(dsn: str, conversation_ids: list[str]) -> int:
    """How many job rows carry one of these conversationIds."""
    return int(
        await fetchval(
            dsn,
            f"SELECT count(*) FROM {JOBS} WHERE target->>'conversationId' = ANY($1::text[])",
            conversation_ids,
        )
    )


async def waiting_inserts(dsn: str) -> list[int]:
    """Backends whose INSERT into the job table waits for a lock."""
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            """SELECT pid FROM pg_stat_activity
               WHERE wait_event_type = 'Lock' AND query LIKE '%INSERT INTO cognigy_offload_jobs%'"""
        )
    finally:
        await conn.close()
    return [r["pid"] for r in rows]


def executor_runs(svc: Running) -> int:
    return svc.service.executor.runs


def shared_count(svc: Running, query: str, how: str) -> float:
    value = svc.service.metrics.registry.get_sample_value(
        "cognigy_offload_queries_shared_total", {"query": query, "how": how}
    )
    return value or 0.0


async def post_all(svc: Running, payloads: list[dict[str, Any]]) -> list[httpx.Response]:
    """POST every payload at once; the answers in the same order."""
    answers: list[httpx.Response | None] = [None] * len(payloads)

    async def one(index: int) -> None:
        answers[index] = await svc.post(payloads[index])

    async with anyio.create_task_group() as tg:
        for index in range(len(payloads)):
            tg.start_soon(one, index)
    return [a for a in answers if a is not None]


def delivered_results(state: SimState, task_ids: set[str]) -> dict[str, Any]:
    """The pushed result object of each of these tasks, by taskId."""
    found: dict[str, Any] = {}
    for entry in state.delivered():
        pushed = dict(entry.body["context"]["offload"])
        task_id = pushed.pop("taskId")
        pushed.pop("timestamp")
        if task_id in task_ids:
            found[task_id] = pushed
    return found


# -- group commit -------------------------------------------------------------------------------


async def test_concurrent_webhooks_share_inserts_and_every_202_has_its_row(
    service_factory: Any, database: str
) -> None:
    """Webhooks that arrive while an INSERT is in flight are committed together in one
    statement: fewer INSERT batches than requests, a 202 for each, and every row exists."""
    n = 24
    payloads = [body(conversationId=f"gc-{i}") for i in range(n)]
    async with service_factory(queue={"capacity": 200}) as svc:
        store = svc.service.store
        before = store.batches
        answers: list[httpx.Response] = []
        async with table_lock(database, JOBS, "SHARE ROW EXCLUSIVE") as lock:

            async def send() -> None:
                answers.extend(await post_all(svc, payloads))

            async with anyio.create_task_group() as tg:
                tg.start_soon(send)
                # Every request reserves its queue slot before it waits for the commit.
                await until(lambda: svc.service.queue.depth >= n)
                await lock.release()
        batches = store.batches - before
    assert [a.status_code for a in answers] == [202] * n
    assert batches < n
    assert batches <= 3, f"{n} parked webhooks took {batches} INSERTs"
    task_ids = [uuid.UUID(a.json()["taskId"]) for a in answers]
    assert len(set(task_ids)) == n
    stored = await fetchval(
        database, f"SELECT count(*) FROM {JOBS} WHERE id = ANY($1::uuid[])", task_ids
    )
    assert stored == n


async def test_an_insert_that_fails_answers_503_and_stores_nothing(
    service_factory: Any, database: str
) -> None:
    """When the job table refuses the INSERT, every webhook of the batch gets 503 with
    Retry-After (never a 202), no row exists and the queue slots are given back."""
    payloads = [body(conversationId=f"refused-{i}") for i in range(5)]
    async with service_factory() as svc:
        conn = await asyncpg.connect(database)
        try:
            # NOT VALID: existing rows are not checked, every new row is refused.
            await conn.execute(
                f"ALTER TABLE {JOBS} ADD CONSTRAINT refuse_all CHECK (false) NOT VALID"
            )
        finally:
            await conn.close()
        answers = await post_all(svc, payloads)
        assert svc.service.queue.depth == 0
    for answer in answers:
        assert answer.status_code == 503, answer.text
        assert answer.json()["error"] == "database_unavailable"
        assert answer.headers["retry-after"]
    assert await rows_for(database, [p["conversationId"] for p in payloads]) == 0


async def test_a_backend_killed_during_the_insert_answers_503_and_stores_nothing(
    service_factory: Any, database: str
) -> None:
    """If the PostgreSQL backend dies while the INSERT runs (before the commit), the
    caller gets 503, not 202, and no row exists; the next webhook is accepted again."""
    async with service_factory() as svc:
        async with table_lock(database, JOBS, "SHARE ROW EXCLUSIVE") as lock:
            answer: list[httpx.Response] = []

            async def send() -> None:
                answer.append(await svc.post(body(conversationId="killed-insert")))

            async with anyio.create_task_group() as tg:
                tg.start_soon(send)
                await until(lambda: _has(waiting_inserts(database)))
                [pid] = await waiting_inserts(database)
                assert await fetchval(database, "SELECT pg_terminate_backend($1)", pid)
                await until(lambda: bool(answer))
                await lock.release()
        assert answer[0].status_code == 503, answer[0].text
        assert answer[0].json()["error"] == "database_unavailable"
        after = await svc.post(body(conversationId="after-kill"))
        assert after.status_code == 202
    assert await rows_for(database, ["killed-insert"]) == 0
    assert await rows_for(database, ["after-kill"]) == 1


async def _has(pids: Awaitable[list[int]]) -> bool:
    return bool(await pids)


@pytest.mark.slow
async def test_kill_9_under_load_loses_no_job_that_was_answered_202(
    process_factory: Callable[..., Process], database: str
) -> None:
    """kill -9 of the service while webhooks stream in: every taskId a client saw in a 202
    has its row (the answer is only sent after the commit)."""
    process = process_factory()
    await process.start()
    accepted: list[str] = []
    failed = 0
    enough = anyio.Event()

    async def client(worker: int) -> None:
        nonlocal failed
        async with httpx.AsyncClient(base_url=process.url, headers=AUTH, timeout=5) as http:
            for i in range(200):
                try:
                    response = await http.post(
                        "/webhook/cognigy-trigger",
                        json=body(conversationId=f"k9-{worker}-{i}"),
                    )
                except httpx.TransportError:
                    failed += 1
                    return
                if response.status_code == 202:
                    accepted.append(response.json()["taskId"])
                    if len(accepted) >= 100:
                        enough.set()

    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            for worker in range(16):
                tg.start_soon(client, worker)
            await enough.wait()
            process.kill()
    assert failed > 0, "the load should still have been running at the kill"
    ids = [uuid.UUID(t) for t in accepted]
    stored = await fetchval(
        database, f"SELECT count(*) FROM {JOBS} WHERE id = ANY($1::uuid[])", ids
    )
    assert stored == len(ids)


# -- coalescing and the result cache --------------------------------------------------------------


async def test_concurrent_identical_jobs_run_one_query_and_all_get_its_result(
    service_factory: Any, sim: tuple[SimState, str], database: str
) -> None:
    """Identical jobs whose runs overlap share one query run (single-flight); each job is
    delivered, all with the same result."""
    state, _ = sim
    workers = 4
    payloads = [body(conversationId=f"same-{i}", userId=f"usr-{i}") for i in range(workers)]
    async with service_factory(queue={"workers": workers}) as svc:
        runs_before = executor_runs(svc)
        async with table_lock(database, "transactions", "ACCESS EXCLUSIVE") as gate:
            answers = await post_all(svc, payloads)
            assert [a.status_code for a in answers] == [202] * workers
            # One worker's query waits for the lock; the others must join it, not run.
            await until(lambda: shared_count(svc, "revenue", "coalesced") >= 3)
            await gate.release()
        task_ids = {a.json()["taskId"] for a in answers}
        docs = [await svc.wait_status(t, {"delivered", "failed"}) for t in task_ids]
        assert executor_runs(svc) - runs_before == 1
    assert {d["status"] for d in docs} == {"delivered"}
    pushed = delivered_results(state, task_ids)
    assert set(pushed) == task_ids
    results = list(pushed.values())
    assert all(r == results[0] for r in results)
    assert results[0]["count"] > 0


async def test_a_fresh_cached_result_is_reused_and_rerun_after_it_expires(
    service_factory: Any, sim: tuple[SimState, str]
) -> None:
    """With cache_ttl_s, a repeat of the same question inside the TTL is answered from the
    cache (no second run) and delivered; after the TTL the query runs again."""
    state, _ = sim
    async with service_factory(queries={"cached": CACHED_QUERY}) as svc:
        runs_before = executor_runs(svc)

        async def job(tag: str) -> dict[str, Any]:
            answer = await svc.post(body(query="cached", conversationId=tag))
            assert answer.status_code == 202
            return dict(await svc.wait_status(answer.json()["taskId"], {"delivered", "failed"}))

        first_started = time.monotonic()
        first = await job("cache-1")
        second = await job("cache-2")
        reused_within_s = time.monotonic() - first_started
        assert reused_within_s < CACHE_TTL_S, "too slow to test the cache on this machine"
        assert executor_runs(svc) - runs_before == 1
        assert shared_count(svc, "cached", "cache") == 1
        # Expiry is a point in time, not an event: wait it out.
        await anyio.sleep(CACHE_TTL_S + 0.1)
        third = await job("cache-3")
        assert executor_runs(svc) - runs_before == 2
    assert first["status"] == second["status"] == third["status"] == "delivered"
    assert first["result"] == second["result"] == third["result"]
    assert len(state.delivered()) == 3


# -- the inline fast path ----------------------------------------------------------------------


async def test_prefer_wait_answers_200_with_the_result_and_nothing_is_pushed(
    service_factory: Any, sim: tuple[SimState, str]
) -> None:
    """Prefer: wait=5 on a quick query answers 200, status answered, with the result; the
    stand-in never receives that job (a later job is delivered, proving the pipe works)."""
    state, _ = sim
    async with service_factory() as svc:
        answer = await svc.post(body(conversationId="inline"), headers={"Prefer": "wait=5"})
        assert answer.status_code == 200, answer.text
        doc = answer.json()
        assert doc["status"] == "answered"
        assert doc["result"]["count"] > 0 and "total" in doc["result"]
        assert answer.headers["location"] == f"/tasks/{doc['taskId']}"
        stored = await svc.wait_status(doc["taskId"], {"answered"})
        assert stored["result"] == doc["result"]
        # A barrier: a normal job after it is delivered, so a wrong push would have come too.
        later = await svc.post(body(conversationId="after-inline"))
        await svc.wait_status(later.json()["taskId"], {"delivered"})
    assert delivered_results(state, {doc["taskId"]}) == {}
    assert len(state.received) == 1


async def test_a_repeated_inline_request_gets_the_answer_again(
    service_factory: Any, sim: tuple[SimState, str]
) -> None:
    """The flow retries an inline request (its first 200 was lost on the way) with the
    same Idempotency-Key: the answered job is never pushed, so the repeat must carry the
    answer again, not just the taskId."""
    state, _ = sim
    headers = {"Prefer": "wait=5", "Idempotency-Key": "inline-retry-1"}
    async with service_factory() as svc:
        first = await svc.post(body(conversationId="inline-retry"), headers=headers)
        assert first.status_code == 200 and first.json()["status"] == "answered", first.text
        again = await svc.post(body(conversationId="inline-retry"), headers=headers)
    assert again.status_code == 200, again.text
    assert again.json() == first.json()
    assert again.headers["location"] == first.headers["location"]
    assert state.received == []


async def test_a_slow_query_with_a_short_wait_answers_202_and_is_delivered(
    service_factory: Any, sim: tuple[SimState, str]
) -> None:
    """Prefer: wait=0.2 on a 2 s query answers the normal 202 after about 0.2 s, and the
    result is pushed to Cognigy as usual."""
    state, _ = sim
    async with service_factory(queries={"slow": SLOW_QUERY}) as svc:
        started = time.monotonic()
        answer = await svc.post(
            body(query="slow", variables={"seconds": 2.0}), headers={"Prefer": "wait=0.2"}
        )
        elapsed_s = time.monotonic() - started
        assert answer.status_code == 202, answer.text
        assert 0.2 <= elapsed_s < 1.5
        task_id = answer.json()["taskId"]
        doc = await svc.wait_status(task_id, {"delivered", "failed", "answered"})
    assert doc["status"] == "delivered"
    assert delivered_results(state, {task_id}) == {task_id: {"slept": 2.0}}


async def test_a_caller_that_disconnects_while_waiting_gets_its_job_delivered(
    service_factory: Any, sim: tuple[SimState, str], database: str
) -> None:
    """A caller that hangs up while waiting inline loses nothing: the job is pushed to
    Cognigy as usual (not kept as 'answered' for a caller who is gone)."""
    state, _ = sim
    find = f"SELECT id FROM {JOBS} WHERE target->>'conversationId' = 'gone'"
    async with service_factory(queries={"slow": SLOW_QUERY}) as svc:
        async with (
            httpx.AsyncClient(base_url=svc.url, headers=AUTH, timeout=30) as leaving,
            anyio.create_task_group() as tg,
        ):

            async def wait_inline() -> None:
                await leaving.post(
                    "/webhook/cognigy-trigger",
                    json=body(query="slow", variables={"seconds": 2.0}, conversationId="gone"),
                    headers={"Prefer": "wait=5"},
                )
                raise AssertionError("the inline wait should have been cut off")

            tg.start_soon(wait_inline)
            # Hang up once the job is stored, while its 2 s query still runs.
            await until(lambda: _exists(fetchval(database, find)))
            tg.cancel_scope.cancel()
        task_id = str(await fetchval(database, find))
        doc = await svc.wait_status(task_id, {"delivered", "answered", "failed"})
    assert doc["status"] == "delivered"
    assert delivered_results(state, {task_id}) == {task_id: {"slept": 2.0}}


async def _exists(value: Awaitable[Any]) -> bool:
    return await value is not None


async def test_the_prefer_wait_is_capped_by_max_wait_s(
    service_factory: Any, sim: tuple[SimState, str]
) -> None:
    """Prefer: wait=5 waits no longer than server.max_wait_s (0.3 s here): a 2.5 s query
    gets its 202 after about 0.3 s and is delivered as usual."""
    state, _ = sim
    async with service_factory(server={"max_wait_s": 0.3}, queries={"slow": SLOW_QUERY}) as svc:
        started = time.monotonic()
        answer = await svc.post(
            body(query="slow", variables={"seconds": 2.5}), headers={"Prefer": "wait=5"}
        )
        elapsed_s = time.monotonic() - started
        assert answer.status_code == 202, answer.text
        assert 0.3 <= elapsed_s < 2.0
        task_id = answer.json()["taskId"]
        doc = await svc.wait_status(task_id, {"delivered", "failed", "answered"})
    assert doc["status"] == "delivered"
    assert delivered_results(state, {task_id}) == {task_id: {"slept": 2.5}}


async def test_workers_beyond_the_query_pool_wait_for_a_connection_not_retry(
    service_factory: Any,
) -> None:
    """More workers than query connections: a worker waits for a free one (a busy pool is
    not an outage), so every job runs its query once, none is handed back for a retry."""
    slow = {
        "sql": "SELECT pg_sleep(1.3)::text AS slept, $1::text AS segment",
        "params": ["customer_segment"],
    }
    segments = ["smb", "enterprise", "startup"]
    async with service_factory(
        queue={"workers": 3}, database={"pool_min": 1, "pool_max": 2}, queries={"slow": slow}
    ) as svc:
        answers = [
            await svc.post(body(query="slow", variables={"customer_segment": s})) for s in segments
        ]
        docs = [
            await svc.wait_status(a.json()["taskId"], {"delivered", "failed"}, timeout_s=20)
            for a in answers
        ]
    assert [d["status"] for d in docs] == ["delivered"] * 3
    assert [d["attempts"]["query"] for d in docs] == [1, 1, 1]
    assert sorted(d["result"]["segment"] for d in docs) == sorted(segments)


async def test_an_inline_request_is_answered_while_every_worker_waits_on_the_rate_limit(
    service_factory: Any, sim: tuple[SimState, str]
) -> None:
    """A backlog of pushes held by the outbound rate limit must not hold a Prefer: wait
    caller too: its result needs no push, so its job starts at once beside the workers
    (the burst found by the newcomer pass answered 202 after the whole wait)."""
    state, _ = sim
    async with service_factory(queue={"workers": 1}, cognigy={"rate_limit_per_minute": 1}) as svc:
        first = await svc.post(body(conversationId="limit-1"))
        await svc.wait_status(first.json()["taskId"], {"delivered"})
        # The only worker now waits about a minute to push the next job; one more queues.
        for n in (2, 3):
            assert (await svc.post(body(conversationId=f"limit-{n}"))).status_code == 202
        await anyio.sleep(0.3)
        started = time.monotonic()
        answer = await svc.post(body(conversationId="inline-now"), headers={"Prefer": "wait=5"})
        elapsed_s = time.monotonic() - started
        assert answer.status_code == 200, answer.text
        assert answer.json()["status"] == "answered"
        assert elapsed_s < 2.5
        assert svc.service.queue.depth == 1  # limit-3 still waits its turn
    assert len(state.received) == 1  # limit-2 and limit-3 go out after the window


SLEEPY = {
    "sql": "SELECT $1::text AS segment, pg_sleep($2::float8)::text AS slept",
    "params": ["customer_segment", "seconds"],
}


async def test_jobs_started_for_inline_callers_are_bounded_by_max_inline_waits(
    service_factory: Any,
) -> None:
    """Callers that give up leave their jobs running (to push the result later): those
    still count, so no more than max_inline_waits jobs run beside the workers; the rest
    queue (found by a break-it pass: 10 ran with a limit of 2)."""
    async with service_factory(
        server={"max_inline_waits": 2},
        queue={"workers": 1, "capacity": 50},
        queries={"sleepy": SLEEPY},
    ) as svc:
        workers = svc.service.start_now.__self__  # type: ignore[attr-defined]
        most_busy = 0

        async def watch() -> None:
            nonlocal most_busy
            while True:
                most_busy = max(most_busy, workers.busy)
                assert workers.lane_busy <= 2
                await anyio.sleep(0.01)

        async def call(n: int) -> None:
            payload = body(query="sleepy", variables={"customer_segment": f"s{n}", "seconds": 2})
            answer = await svc.post(payload, headers={"Prefer": "wait=0.3"})
            assert answer.status_code == 202

        with anyio.fail_after(30):
            async with anyio.create_task_group() as outer:
                outer.start_soon(watch)
                for wave in range(5):  # 2 callers a wave, each gives up after 0.3 s
                    async with anyio.create_task_group() as tg:
                        for k in range(2):
                            tg.start_soon(call, wave * 2 + k)
                await anyio.sleep(0.2)
                outer.cancel_scope.cancel()
    assert 2 <= most_busy <= 2 + 1  # the lane's 2 and the one worker


async def test_a_job_started_for_an_inline_caller_does_not_hold_a_queue_slot(
    service_factory: Any,
) -> None:
    """queue.capacity counts accepted jobs not yet started: an inline job that started
    (and now waits on the rate limit to push, its caller gone) gives its slot back, as a
    job a worker takes does."""
    async with service_factory(
        queue={"workers": 4, "capacity": 2},
        cognigy={"rate_limit_per_minute": 1},
        queries={"sleepy": SLEEPY},
    ) as svc:
        first = await svc.post(body(conversationId="use-the-window"))
        await svc.wait_status(first.json()["taskId"], {"delivered"})
        for n in range(2):
            answer = await svc.post(
                body(query="sleepy", variables={"customer_segment": f"m{n}", "seconds": 0.6}),
                headers={"Prefer": "wait=0.2"},
            )
            assert answer.status_code == 202
        await anyio.sleep(1.0)  # both queries done; both jobs wait on the rate limit
        assert svc.service.queue.free == 2
        assert (await svc.client.get("/readyz")).status_code == 200
        third = await svc.post(body(conversationId="third"))
        assert third.status_code == 202, third.text
