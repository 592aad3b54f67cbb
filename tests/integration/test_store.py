"""The job table's guarantees, against a real PostgreSQL: fencing, leases, take-over."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import AsyncIterator
from typing import Any

import anyio
import asyncpg
import pytest

from cognigy_offload.errors import LeaseLost, StoreError
from cognigy_offload.models import Job, Target
from cognigy_offload.store import TABLE, NewJob, Store

pytestmark = pytest.mark.anyio


@pytest.fixture
async def pool(database: str) -> AsyncIterator[asyncpg.Pool]:
    async with asyncpg.create_pool(database, min_size=1, max_size=4) as made:
        yield made


def store(pool: asyncpg.Pool, name: str, lease_s: float = 30) -> Store:
    return Store(pool, instance_id=name, lease_s=lease_s, deadline_s=60)


async def insert(s: Store, count: int) -> list[uuid.UUID]:
    """Store ``count`` jobs through the group-commit path."""
    target = Target(mode="context", userId="u", sessionId="s")
    ids: list[uuid.UUID] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(s.run_committer)

        async def one() -> None:
            job = NewJob(uuid.uuid4(), "revenue", b"{}", target, None, None)
            ids.append((await s.insert(job)).id)

        async with anyio.create_task_group() as inner:
            for _ in range(count):
                inner.start_soon(one)
        tg.cancel_scope.cancel()
    return ids


async def test_a_stale_claim_cannot_overwrite_a_newer_one(pool: asyncpg.Pool) -> None:
    """After another instance took the job over, the old holder's writes raise LeaseLost
    and change nothing."""
    a, b = store(pool, "a", lease_s=0.1), store(pool, "b")
    await a.migrate()
    [job_id] = await insert(a, 1)
    old = await a.claim(job_id)
    assert old is not None and old.status == "running"
    await anyio.sleep(0.2)  # a's lease lapses (a is presumed dead)
    assert await b.take_over(10) == [job_id]
    new = await b.claim(job_id)
    assert new is not None and new.lease_epoch > old.lease_epoch
    with pytest.raises(LeaseLost):
        await a.save_result(with_result(old, {"n": 1}))
    with pytest.raises(LeaseLost):
        await a.finish(old, "failed")
    await b.save_result(with_result(new, {"n": 2}))
    current = await b.get(job_id)
    assert current is not None and current.result == {"n": 2}
    assert current.status == "delivering"


def with_result(job: Job, result: dict[str, Any]) -> Job:
    """The job as a worker holds it after its query ran."""
    job.result, job.result_at = result, dt.datetime.now(dt.UTC)
    return job


async def test_a_job_taken_straight_from_the_webhook_is_fenced_too(pool: asyncpg.Pool) -> None:
    """A job handed to a worker without a claim (epoch 0, as inserted) loses its writes to
    an instance that took it over after the lease lapsed; when nobody did, its result and
    final state are written with its attempt counts."""
    a, b = store(pool, "a", lease_s=0.1), store(pool, "b")
    await a.migrate()
    target = Target(mode="context", userId="u", sessionId="s")
    async with anyio.create_task_group() as tg:
        tg.start_soon(a.run_committer)
        fresh = await a.insert(NewJob(uuid.uuid4(), "revenue", b"{}", target, None, None))
        tg.cancel_scope.cancel()
    assert fresh.job is not None and fresh.job.lease_epoch == 0
    assert fresh.job.status == "queued"
    await anyio.sleep(0.2)
    assert await b.take_over(10) == [fresh.id]
    with pytest.raises(LeaseLost):
        await a.save_result(with_result(fresh.job, {"n": 1}))
    with pytest.raises(LeaseLost):
        await a.finish(fresh.job, "delivered")

    a = store(pool, "a")
    async with anyio.create_task_group() as tg:
        tg.start_soon(a.run_committer)
        kept = await a.insert(NewJob(uuid.uuid4(), "revenue", b"{}", target, None, None))
        tg.cancel_scope.cancel()
    assert kept.job is not None
    kept.job.attempts_query, kept.job.attempts_delivery = 1, 1
    await a.save_result(with_result(kept.job, {"n": 2}))
    await a.finish(kept.job, "delivered")
    row = await a.get(kept.id)
    assert row is not None and (row.status, row.result) == ("delivered", {"n": 2})
    assert (row.attempts_query, row.attempts_delivery) == (1, 1)
    assert row.result_at is not None


async def test_concurrent_sweeps_never_take_the_same_job(pool: asyncpg.Pool) -> None:
    """FOR UPDATE SKIP LOCKED: two instances sweeping at once split the orphans."""
    a, b, c = store(pool, "a"), store(pool, "b"), store(pool, "c", lease_s=0.05)
    await a.migrate()
    ids = await insert(c, 40)
    await anyio.sleep(0.1)  # c's leases lapse
    taken: dict[str, list[uuid.UUID]] = {}

    async def sweep(s: Store) -> None:
        taken[s.instance_id] = await s.take_over(40)

    async with anyio.create_task_group() as tg:
        tg.start_soon(sweep, a)
        tg.start_soon(sweep, b)
    assert not set(taken["a"]) & set(taken["b"])
    assert set(taken["a"]) | set(taken["b"]) == set(ids)


async def test_heartbeat_renews_only_the_jobs_named(pool: asyncpg.Pool) -> None:
    """A job the instance lost track of is not renewed, so its lease lapses."""
    a = store(pool, "a", lease_s=0.2)
    await a.migrate()
    kept, lost = await insert(a, 2)
    await anyio.sleep(0.1)
    assert await a.heartbeat([kept]) == 1
    await anyio.sleep(0.15)
    other = store(pool, "b")
    assert await other.take_over(10) == [lost]


async def test_group_commit_shares_inserts(pool: asyncpg.Pool) -> None:
    """Concurrent inserts are committed in fewer statements than jobs, all rows present."""
    a = store(pool, "a")
    await a.migrate()
    ids = await insert(a, 50)
    assert len(set(ids)) == 50
    assert a.batches < 50
    async with pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM cognigy_offload_jobs") == 50


async def held_jobs(s: Store, count: int) -> list[Job]:
    """``count`` jobs inserted by ``s`` and held by it at epoch 0, as a worker gets them."""
    target = Target(mode="context", userId="u", sessionId="s")
    jobs: list[Job] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(s.run_committer)
        for _ in range(count):
            inserted = await s.insert(NewJob(uuid.uuid4(), "revenue", b"{}", target, None, None))
            assert inserted.job is not None
            jobs.append(inserted.job)
        tg.cancel_scope.cancel()
    return jobs


async def test_concurrent_worker_writes_share_statements(pool: asyncpg.Pool) -> None:
    """Result checkpoints and final states written at the same moment go out in fewer
    statements than writes, and every row gets its own values."""
    a = store(pool, "a")
    await a.migrate()
    jobs = await held_jobs(a, 30)
    async with anyio.create_task_group() as tg:
        await tg.start(a.run_committer)

        async def work(job: Job, n: int) -> None:
            job.attempts_query, job.attempts_delivery = 1, n
            await a.save_result(with_result(job, {"n": n}))
            await a.finish(job, "delivered")

        async with anyio.create_task_group() as inner:
            for n, job in enumerate(jobs):
                inner.start_soon(work, job, n)
        tg.cancel_scope.cancel()
    assert a.write_batches < 2 * len(jobs)
    for n, job in enumerate(jobs):
        row = await a.get(job.id)
        assert row is not None
        assert (row.status, row.result, row.attempts_delivery) == ("delivered", {"n": n}, n)


async def test_a_stale_write_in_a_batch_fails_alone(pool: asyncpg.Pool) -> None:
    """A batch mate whose lease was taken over gets LeaseLost; the others are written."""
    a, b = store(pool, "a", lease_s=0.1), store(pool, "b")
    await a.migrate()
    jobs = await held_jobs(a, 6)
    await anyio.sleep(0.2)  # a's leases lapse ...
    stolen = jobs[0]
    assert stolen.id in await b.take_over(1)  # ... and b takes the oldest one
    outcomes: dict[uuid.UUID, str] = {}
    async with anyio.create_task_group() as tg:
        await tg.start(a.run_committer)

        async def finish(job: Job) -> None:
            try:
                await a.finish(job, "delivered")
                outcomes[job.id] = "written"
            except LeaseLost:
                outcomes[job.id] = "lease_lost"

        async with anyio.create_task_group() as inner:
            for job in jobs:
                inner.start_soon(finish, job)
        tg.cancel_scope.cancel()
    assert outcomes.pop(stolen.id) == "lease_lost"
    assert set(outcomes.values()) == {"written"}
    assert a.write_batches < len(jobs)  # they did share statements
    row = await b.get(stolen.id)
    assert row is not None and row.status == "queued"


async def test_a_row_postgresql_refuses_does_not_fail_its_batch_mates(pool: asyncpg.Pool) -> None:
    """When PostgreSQL refuses one row of a shared statement, each row is written alone:
    only the bad one fails."""
    a = store(pool, "a")
    await a.migrate()
    jobs = await held_jobs(a, 5)
    outcomes: dict[uuid.UUID, str] = {}
    async with anyio.create_task_group() as tg:
        await tg.start(a.run_committer)

        async def save(job: Job, result: str) -> None:
            try:
                await a._write("save", job, result, dt.datetime.now(dt.UTC), 1, 0)
                outcomes[job.id] = "written"
            except StoreError:
                outcomes[job.id] = "refused"

        async with anyio.create_task_group() as inner:
            for n, job in enumerate(jobs):
                inner.start_soon(save, job, "{not json" if n == 2 else '{"n": 1}')
        tg.cancel_scope.cancel()
    assert outcomes.pop(jobs[2].id) == "refused"
    assert set(outcomes.values()) == {"written"}
    assert a.write_batches > len(jobs)  # one shared statement, refused, then one each


async def test_a_release_that_lands_after_the_final_write_does_not_undo_it(
    pool: asyncpg.Pool, database: str
) -> None:
    """The worker is cancelled at the end of the shutdown grace while its batched final
    write waits on a row lock; its shutdown release goes out on another connection and
    reaches the row after the final write. The job stays delivered (it was reverted to
    delivering, unlocked, and pushed again by the next sweep). Found by a break-it pass."""
    a = store(pool, "a")
    await a.migrate()
    [job] = await held_jobs(a, 1)
    async with anyio.create_task_group() as tg:
        await tg.start(a.run_committer)
        await a.save_result(with_result(job, {"n": 1}))
        locker = await asyncpg.connect(database)
        try:
            holding = locker.transaction()
            await holding.start()
            await locker.execute(f"SELECT 1 FROM {TABLE} WHERE id = $1 FOR UPDATE", job.id)
            released: list[str] = []

            async def worker() -> None:  # the shape of Workers.process's cancel handler
                try:
                    job.attempts_delivery = 1
                    await a.finish(job, "delivered")  # Cognigy already answered 2xx
                except anyio.get_cancelled_exc_class():
                    with anyio.CancelScope(shield=True), anyio.move_on_after(2):
                        try:
                            await a.release(job)
                            released.append("released")
                        except LeaseLost:
                            released.append("final already")
                    raise

            pool_scope = anyio.CancelScope()  # the worker pool's, as in app._drain

            async def in_the_pool() -> None:
                with pool_scope:
                    await worker()

            async with anyio.create_task_group() as inner:
                inner.start_soon(in_the_pool)
                await anyio.sleep(0.2)
                pool_scope.cancel()  # the grace is over
                await anyio.sleep(0.3)
                await holding.commit()  # the final write goes through, then the release
        finally:
            await locker.close()
        tg.cancel_scope.cancel()
    row = await pool.fetchrow(f"SELECT status, locked_by FROM {TABLE} WHERE id = $1", job.id)
    assert row is not None and row["status"] == "delivered", dict(row or {})
    assert released == ["final already"]
