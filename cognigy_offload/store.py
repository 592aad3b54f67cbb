"""The job table in PostgreSQL: durable acceptance, leases with fencing, recovery, dead letters.

Every write a worker makes after claiming a job names the fencing epoch it got; a
write from an older claim matches no row and raises LeaseLost, so a worker that was
presumed dead cannot overwrite the work of the one that took over.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import math
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import anyio
import asyncpg

from . import db
from .errors import LeaseLost, RequestError, StoreError, StoreUnavailable
from .models import (
    ENCODER,
    EXACT_DECODER,
    JOB_ERROR_DECODER,
    TARGET_DECODER,
    Job,
    JobError,
    Target,
)

TABLE = "cognigy_offload_jobs"
ACTIVE = ("queued", "running", "delivering")
WATCHDOG_TICK_S = 0.05

SCHEMA = f"""
CREATE TABLE IF NOT EXISTS {TABLE} (
    id                uuid PRIMARY KEY,
    idempotency_key   text UNIQUE,
    request_digest    bytea,
    status            text NOT NULL CHECK (status IN ('queued', 'running', 'delivering',
                          'delivered', 'answered', 'failed', 'expired')),
    query             text NOT NULL,
    variables         json NOT NULL,
    target            json NOT NULL,
    result            json,
    result_at         timestamptz,
    error             json,
    attempts_query    integer NOT NULL DEFAULT 0,
    attempts_delivery integer NOT NULL DEFAULT 0,
    lease_epoch       bigint NOT NULL DEFAULT 0,
    locked_by         text,
    locked_until      timestamptz,
    created_at        timestamptz NOT NULL DEFAULT clock_timestamp(),
    updated_at        timestamptz NOT NULL DEFAULT clock_timestamp(),
    deadline_at       timestamptz NOT NULL
);
CREATE INDEX IF NOT EXISTS {TABLE}_active ON {TABLE} (locked_until)
    WHERE status IN ('queued', 'running', 'delivering');
CREATE INDEX IF NOT EXISTS {TABLE}_status ON {TABLE} (status, updated_at);
"""

_COLUMNS = (
    "id, status, query, variables, target, result, result_at, error, attempts_query, "
    "attempts_delivery, lease_epoch, created_at, updated_at, deadline_at"
)

_INSERT = f"""
INSERT INTO {TABLE} (id, idempotency_key, request_digest, status, query, variables, target,
                     locked_by, locked_until, deadline_at)
SELECT i.id, i.key, i.digest, 'queued', i.query, i.variables::json, i.target::json, $6,
       clock_timestamp() + make_interval(secs => $7), clock_timestamp() + make_interval(secs => $8)
FROM unnest($1::uuid[], $2::text[], $3::bytea[], $4::text[], $5::text[], $9::text[])
     AS i(id, key, digest, query, variables, target)
ON CONFLICT (idempotency_key) DO NOTHING
RETURNING id, created_at, deadline_at
"""

# Joined into the worker's own writes: their commit does not wait for the WAL flush. Only
# acceptance must survive a PostgreSQL crash at once (202 means committed); losing the
# last few hundred milliseconds of a worker's progress repeats a query or a delivery,
# which the lease recovery does anyway. set_config(..., true) lasts until the statement's
# own commit, which is when synchronous_commit is read.
_ASYNC_COMMIT = "(SELECT set_config('synchronous_commit', 'off', true)) AS async_commit"

# The workers' frequent writes, many jobs per statement (see Store.run_writer). Each row
# names the epoch its worker holds; a row whose epoch is stale matches nothing and its
# caller gets LeaseLost, exactly as with a write of its own.
_SAVE_MANY = f"""
UPDATE {TABLE} t SET result = u.result::json, result_at = u.result_at, status = 'delivering',
    attempts_query = u.attempts_query, attempts_delivery = u.attempts_delivery,
    updated_at = clock_timestamp()
FROM unnest($1::uuid[], $2::bigint[], $3::text[], $4::timestamptz[], $5::int[], $6::int[])
     AS u(id, epoch, result, result_at, attempts_query, attempts_delivery),
     {_ASYNC_COMMIT}
WHERE t.id = u.id AND t.lease_epoch = u.epoch
RETURNING t.id, t.updated_at
"""
_FINISH_MANY = f"""
UPDATE {TABLE} t SET status = u.status, error = u.error::json,
    attempts_delivery = u.attempts_delivery, attempts_query = u.attempts_query,
    locked_by = NULL, locked_until = NULL, updated_at = clock_timestamp()
FROM unnest($1::uuid[], $2::bigint[], $3::text[], $4::text[], $5::int[], $6::int[])
     AS u(id, epoch, status, error, attempts_delivery, attempts_query),
     {_ASYNC_COMMIT}
WHERE t.id = u.id AND t.lease_epoch = u.epoch
RETURNING t.id, t.updated_at
"""
_BATCHED = {"save": _SAVE_MANY, "finish": _FINISH_MANY}


@dataclass(slots=True)  # not frozen: a frozen init costs twice as much, once per webhook
class NewJob:
    """A validated webhook, ready to be stored."""

    id: uuid.UUID
    query: str
    variables: bytes
    target: Target
    idempotency_key: str | None
    digest: bytes | None


@dataclass(slots=True)
class Inserted:
    """What storing a webhook gave: its task id, whether it is a new job, and the new job
    as the worker will find it (queued, held by this instance at epoch 0)."""

    id: uuid.UUID
    created: bool
    job: Job | None = None


def digest(body: bytes) -> bytes:
    """The fingerprint an Idempotency-Key is bound to."""
    return hashlib.sha256(body).digest()


def _row_to_job(row: asyncpg.Record) -> Job:
    error = row["error"]
    return Job(
        id=row["id"],
        status=row["status"],
        query=row["query"],
        variables=EXACT_DECODER.decode(row["variables"]),
        target=TARGET_DECODER.decode(row["target"]),
        result=EXACT_DECODER.decode(row["result"]) if row["result"] is not None else None,
        result_at=row["result_at"],
        error=JOB_ERROR_DECODER.decode(error) if error is not None else None,
        attempts_query=row["attempts_query"],
        attempts_delivery=row["attempts_delivery"],
        lease_epoch=row["lease_epoch"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        deadline_at=row["deadline_at"],
    )


class _Done:
    """A one-shot event for the one caller waiting on a pending insert: a bare asyncio
    future costs a fraction of an anyio.Event, and there is one per webhook."""

    __slots__ = ("_future", "_set")

    def __init__(self) -> None:
        self._future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._set = False

    def set(self) -> None:
        self._set = True
        if not self._future.done():
            self._future.set_result(None)

    def is_set(self) -> bool:
        return self._set

    async def wait(self) -> None:
        if not self._set:
            await self._future


@dataclass(slots=True)
class _Pending:
    job: NewJob
    done: _Done
    expires_at: float = math.inf
    result: Inserted | None = None
    error: BaseException | None = None
    abandoned: bool = False


class _Write:
    """One worker write waiting for the writer: which statement, whose row, its values."""

    __slots__ = ("done", "error", "job_id", "kind", "row", "values")

    def __init__(self, kind: str, job: Job, values: tuple[Any, ...]) -> None:
        self.kind = kind
        self.job_id = job.id
        self.values = (job.id, job.lease_epoch, *values)
        self.done = _Done()
        self.row: asyncpg.Record | None = None
        self.error: BaseException | None = None


def _new_job(job: NewJob, row: asyncpg.Record) -> Job:
    return Job(
        id=job.id,
        status="queued",
        query=job.query,
        variables=EXACT_DECODER.decode(job.variables),
        target=job.target,
        created_at=row["created_at"],
        updated_at=row["created_at"],
        deadline_at=row["deadline_at"],
    )


class Store:
    """All reads and writes of the job table; driver errors become StoreError here."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        instance_id: str,
        lease_s: float,
        deadline_s: float,
        group_commit_s: float = 0.0,
    ) -> None:
        self.pool = pool
        self.instance_id = instance_id
        self.lease_s = lease_s
        self.deadline_s = deadline_s
        self.group_commit_s = group_commit_s
        self._pending: list[_Pending] = []
        self._in_flight: list[_Pending] = []
        self._wake = anyio.Event()
        self.batches = 0
        self._writes: list[_Write] = []
        self._write_wake = anyio.Event()
        self._writer_running = False
        self.write_batches = 0

    async def migrate(self) -> None:
        """Create the job table once, even with several instances starting together."""
        # One statement string: pg_advisory_xact_lock holds until the implicit commit.
        await self._execute(f"SELECT pg_advisory_xact_lock(hashtext('{TABLE}'));\n{SCHEMA}")

    # -- accepting ----------------------------------------------------------------------

    async def insert(self, job: NewJob, *, wait_s: float | None = None) -> Inserted:
        """Commit a new job (group commit: concurrent callers share one INSERT).

        Returns only after the row is committed; the same idempotency key with the
        same body gives the earlier job, with another body a 409. With ``wait_s``, a
        database that does not answer in time raises StoreUnavailable (and a row that is
        committed later anyway is deleted): the committer's watchdog keeps that clock,
        not a timer per request.
        """
        expires_at = time.monotonic() + wait_s if wait_s is not None else math.inf
        pending = _Pending(job, _Done(), expires_at)
        self._pending.append(pending)
        self._wake.set()
        try:
            await pending.done.wait()
        except BaseException:
            # The caller gave up (the webhook's 1 s wait, a client that left) and answers
            # that nothing was stored: make that true, or a retry runs the job twice.
            with anyio.CancelScope(shield=True):
                await self._abandon(pending)
            raise
        if pending.error is not None:
            raise pending.error
        assert pending.result is not None
        return pending.result

    async def _abandon(self, pending: _Pending) -> None:
        if pending in self._pending:  # not sent yet: it never will be
            self._pending.remove(pending)
            return
        pending.abandoned = True  # in flight: _flush deletes the row once committed
        if pending.done.is_set() and pending.result is not None and pending.result.created:
            await self._forget([pending.result.id])

    async def _forget(self, ids: list[uuid.UUID]) -> None:
        """Delete jobs whose caller was told they were not stored (no worker has them)."""
        with contextlib.suppress(StoreError):
            await self._execute(
                f"DELETE FROM {TABLE} WHERE id = ANY($1::uuid[]) AND status = 'queued'", ids
            )

    async def run_committer(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Flush pending inserts in batches until cancelled (one task per app); the
        workers' writes are batched alongside (run_writer). Started with ``tg.start``,
        it returns once writes go through the writer."""
        self._writer_running = True  # writes queue up from now on; run_writer takes them
        try:
            await self._run_committer(task_status)
        finally:
            self._stop_writer()

    async def _run_committer(self, task_status: anyio.abc.TaskStatus[None]) -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._watchdog)
            tg.start_soon(self.run_writer)
            task_status.started()
            while True:
                await self._wake.wait()
                self._wake = anyio.Event()
                if self.group_commit_s > 0:
                    await anyio.sleep(self.group_commit_s)
                batch, self._pending = self._pending, []
                if batch:
                    self._in_flight = batch
                    try:
                        await self._flush(batch)
                    finally:
                        self._in_flight = []

    async def _watchdog(self) -> None:
        """Answer callers whose ``wait_s`` ran out: the database hangs rather than refuses."""
        while True:
            await anyio.sleep(WATCHDOG_TICK_S)
            now = time.monotonic()
            for pending in [*self._in_flight, *self._pending]:
                if pending.expires_at <= now and not pending.done.is_set():
                    if pending in self._pending:
                        self._pending.remove(pending)  # never sent
                    else:
                        pending.abandoned = True  # in flight: deleted if it commits
                    pending.error = StoreUnavailable(
                        "PostgreSQL did not store the job in time; nothing was stored"
                    )
                    pending.done.set()

    async def _flush(self, batch: list[_Pending]) -> None:
        self.batches += 1
        try:
            with anyio.CancelScope(shield=True):
                try:
                    inserted = await self._insert_rows([p.job for p in batch])
                except StoreUnavailable:
                    inserted = await self._in_doubt([p.job for p in batch])
                for pending in batch:
                    try:
                        pending.result = await self._resolve(pending.job, inserted)
                    except RequestError as exc:  # one 409 must not refuse its batch mates
                        if not pending.done.is_set():
                            pending.error = exc
        except Exception as exc:
            error = self._translate(exc)
            for pending in batch:
                if pending.result is None and not pending.done.is_set():
                    pending.error = error
        finally:
            for pending in batch:
                pending.done.set()
            forgotten = [
                p.result.id
                for p in batch
                if p.abandoned and p.result is not None and p.result.created
            ]
            if forgotten:
                with anyio.CancelScope(shield=True):
                    await self._forget(forgotten)

    async def _insert_rows(self, jobs: list[NewJob]) -> dict[uuid.UUID, asyncpg.Record | None]:
        rows = await self._fetch(
            _INSERT,
            [j.id for j in jobs],
            [j.idempotency_key for j in jobs],
            [j.digest for j in jobs],
            [j.query for j in jobs],
            [j.variables.decode() for j in jobs],
            self.instance_id,
            self.lease_s,
            self.deadline_s,
            [ENCODER.encode(j.target).decode() for j in jobs],
        )
        return {r["id"]: r for r in rows}

    async def _in_doubt(self, jobs: list[NewJob]) -> dict[uuid.UUID, asyncpg.Record | None]:
        """After the connection died during the INSERT, the commit may still have happened:
        look once, so a stored job is answered 202 rather than 503 (and not run unseen).
        Re-raises the original StoreUnavailable if none of the rows exists."""
        rows: list[asyncpg.Record] = []
        for attempt in range(3):  # other pooled connections may be dead too: a fresh one answers
            try:
                rows = await self._fetch(
                    f"SELECT id FROM {TABLE} WHERE id = ANY($1::uuid[])", [j.id for j in jobs]
                )
                break
            except StoreUnavailable:
                if attempt == 2:
                    raise
                await anyio.sleep(0.05)
        found: dict[uuid.UUID, asyncpg.Record | None] = {r["id"]: None for r in rows}
        if not found:
            raise StoreUnavailable("PostgreSQL went away during the insert; nothing was stored")
        return found

    async def _resolve(
        self, job: NewJob, inserted: dict[uuid.UUID, asyncpg.Record | None]
    ) -> Inserted:
        if job.id in inserted:
            row = inserted[job.id]  # None when found after an in-doubt commit: claim it then
            return Inserted(job.id, created=True, job=_new_job(job, row) if row else None)
        if job.idempotency_key is None:
            raise StoreUnavailable("the job was not stored")
        row = await self._fetchrow(
            f"SELECT id, request_digest FROM {TABLE} WHERE idempotency_key = $1",
            job.idempotency_key,
        )
        if row is None:  # the earlier job was pruned between the insert and this look-up
            raise StoreError("idempotency key vanished; retry the request")
        if row["request_digest"] != job.digest:
            raise RequestError(
                409,
                "idempotency_conflict",
                "This Idempotency-Key was used before with a different body.",
                None,
            )
        return Inserted(row["id"], created=False)

    async def run_writer(self) -> None:
        """Write the workers' result checkpoints and final states many rows a statement
        (run by run_committer).

        Like the group commit: what arrives while one statement runs goes into the next,
        so under load a job costs a fraction of a round trip, a pool connection and a
        commit instead of one each; alone, a write goes out at once. These writes do not
        wait for the disk (see _ASYNC_COMMIT).
        """
        while True:
            await self._write_wake.wait()
            self._write_wake = anyio.Event()
            batch, self._writes = self._writes, []
            with anyio.CancelScope(shield=True):
                for kind, statement in _BATCHED.items():
                    writes = [w for w in batch if w.kind == kind]
                    if writes:
                        await self._write_many(statement, writes)

    def _stop_writer(self) -> None:
        self._writer_running = False
        for write in self._writes:  # never sent: their callers must not hang
            write.error = StoreUnavailable("the job store is shutting down")
            write.done.set()
        self._writes = []

    async def _write_many(self, statement: str, writes: list[_Write]) -> None:
        self.write_batches += 1
        seen: set[uuid.UUID] = set()
        now: list[_Write] = []
        for write in writes:  # a row twice in one UPDATE would be written once
            if write.job_id in seen:
                self._writes.append(write)
                self._write_wake.set()
            else:
                seen.add(write.job_id)
                now.append(write)
        try:
            columns = list(zip(*(w.values for w in now), strict=True))
            rows = await self._fetch(statement, *(list(c) for c in columns))
        except StoreError as exc:
            if len(now) > 1 and not isinstance(exc, StoreUnavailable):
                # One bad row must not fail its batch mates: each goes alone.
                for write in now:
                    await self._write_many(statement, [write])
                return
            for write in now:
                write.error = exc
                write.done.set()
            return
        by_id = {r["id"]: r for r in rows}
        for write in now:
            write.row = by_id.get(write.job_id)
            write.done.set()

    async def _write(self, kind: str, job: Job, *values: Any) -> asyncpg.Record:
        """One fenced worker write through the writer (or alone if it is not running)."""
        if not self._writer_running:
            rows = await self._fetch(
                _BATCHED[kind], *([v] for v in (job.id, job.lease_epoch, *values))
            )
            row = rows[0] if rows else None
        else:
            write = _Write(kind, job, values)
            self._writes.append(write)
            self._write_wake.set()
            try:
                await write.done.wait()
            except BaseException:
                if write in self._writes:  # not sent yet: it never will be
                    self._writes.remove(write)
                raise
            if write.error is not None:
                raise write.error
            row = write.row
        if row is None:
            raise LeaseLost(f"job {job.id} was claimed again (epoch {job.lease_epoch} is stale)")
        return row

    # -- working ------------------------------------------------------------------------

    async def claim(self, job_id: uuid.UUID) -> Job | None:
        """Take a job this instance holds for running: bump the epoch, extend the lease."""
        row = await self._fetchrow(
            f"""
            UPDATE {TABLE} SET
                lease_epoch = lease_epoch + 1,
                locked_until = clock_timestamp() + make_interval(secs => $3),
                status = CASE WHEN result IS NULL THEN 'running' ELSE 'delivering' END,
                attempts_query = attempts_query + CASE
                    WHEN result IS NULL AND deadline_at > clock_timestamp() THEN 1 ELSE 0 END,
                updated_at = clock_timestamp()
            FROM {_ASYNC_COMMIT}
            WHERE id = $1 AND locked_by = $2 AND status IN ('queued', 'running', 'delivering')
            RETURNING {_COLUMNS}
            """,
            job_id,
            self.instance_id,
            self.lease_s,
        )
        return _row_to_job(row) if row is not None else None

    async def save_result(self, job: Job, *, answered: bool = False) -> dt.datetime:
        """Checkpoint the job's result (``job.result``, ``job.result_at``) so a retry never
        recomputes it; ``answered`` (given to an inline caller) is a final state.

        An answer is committed synchronously, like an acceptance: the caller gets the
        result once this returns, and an answer lost in a PostgreSQL crash would leave the
        job queued, to be run and pushed to Cognigy as well (a second input to the flow).
        A checkpoint goes through the writer and does not wait for the disk.
        """
        result = ENCODER.encode(job.result).decode()
        if not answered:
            row = await self._write(
                "save", job, result, job.result_at, job.attempts_query, job.attempts_delivery
            )
        else:
            row = await self._fenced(
                f"""
                UPDATE {TABLE} SET result = $3::json, result_at = $4, status = 'answered',
                    attempts_query = $5, attempts_delivery = $6, updated_at = clock_timestamp(),
                    locked_by = NULL, locked_until = NULL
                WHERE id = $1 AND lease_epoch = $2 RETURNING updated_at
                """,
                job,
                result,
                job.result_at,
                job.attempts_query,
                job.attempts_delivery,
            )
        updated_at: dt.datetime = row["updated_at"]
        return updated_at

    async def record_attempt(self, job: Job) -> None:
        """Write the job's delivery attempt count (a retry is about to be sent)."""
        await self._fenced(
            f"""
            UPDATE {TABLE} SET attempts_delivery = $3, updated_at = clock_timestamp()
            FROM {_ASYNC_COMMIT}
            WHERE id = $1 AND lease_epoch = $2 RETURNING id
            """,
            job,
            job.attempts_delivery,
        )

    async def finish(self, job: Job, status: str, error: JobError | None = None) -> None:
        """Set a final state with the attempt counts, and give up the lease (through the
        writer; the commit does not wait for the disk)."""
        await self._write(
            "finish",
            job,
            status,
            ENCODER.encode(error).decode() if error is not None else None,
            job.attempts_delivery,
            job.attempts_query,
        )

    async def release(self, job: Job, *, delay_s: float = 0.0) -> None:
        """Hand a job back unfinished (shutdown, database hiccup): any instance may take it.

        Never a job already in a final state: a worker cancelled at the end of the
        shutdown grace while its final write was on the way releases the job, and that
        release may reach PostgreSQL after the final write (LeaseLost then)."""
        await self._fenced(
            f"""
            UPDATE {TABLE} SET
                status = CASE WHEN result IS NULL THEN 'queued' ELSE 'delivering' END,
                locked_by = NULL, locked_until = clock_timestamp() + make_interval(secs => $3),
                attempts_delivery = $4, attempts_query = $5, updated_at = clock_timestamp()
            WHERE id = $1 AND lease_epoch = $2 AND status IN ('queued', 'running', 'delivering')
            RETURNING id
            """,
            job,
            delay_s,
            job.attempts_delivery,
            job.attempts_query,
        )

    async def release_unstarted(self, job_ids: list[uuid.UUID]) -> int:
        """Give up jobs accepted here but never started (shutdown), so the next start takes them."""
        if not job_ids:
            return 0
        result = await self._execute(
            f"""UPDATE {TABLE} SET locked_by = NULL, locked_until = NULL
                    WHERE id = ANY($1::uuid[]) AND locked_by = $2""",
            job_ids,
            self.instance_id,
        )
        return int(result.split()[-1])

    async def heartbeat(self, job_ids: list[uuid.UUID]) -> int:
        """Extend the lease on the jobs this instance really holds (queued here or running).

        Only those: a job whose row says this instance but that it lost track of (a
        failed claim while the database was away) must lapse so the sweep takes it again.
        """
        if not job_ids:
            return 0
        result = await self._execute(
            f"""UPDATE {TABLE} SET locked_until = clock_timestamp() + make_interval(secs => $2)
                WHERE id = ANY($3::uuid[]) AND locked_by = $1
                  AND status IN ('queued', 'running', 'delivering')""",
            self.instance_id,
            self.lease_s,
            job_ids,
        )
        return int(result.split()[-1])

    async def show_progress(self, progress: Mapping[uuid.UUID, str]) -> None:
        """Write what workers are doing ('running' the query, 'delivering') with jobs taken
        straight from the webhook, whose rows still say queued (a fast job never has to)."""
        await self._execute(
            f"""UPDATE {TABLE} t SET
                    status = p.status, updated_at = clock_timestamp(),
                    attempts_query = t.attempts_query
                        + CASE WHEN t.status = 'queued' THEN 1 ELSE 0 END
                FROM unnest($2::uuid[], $3::text[]) AS p(id, status), {_ASYNC_COMMIT}
                WHERE t.id = p.id AND t.locked_by = $1 AND t.result IS NULL
                  AND t.status IN ('queued', 'running') AND t.status <> p.status""",
            self.instance_id,
            list(progress),
            list(progress.values()),
        )

    async def take_over(self, limit: int, *, previous_prefix: str | None = None) -> list[uuid.UUID]:
        """Claim unheld jobs (lapsed lease, released, or held by an earlier run of this instance).

        FOR UPDATE SKIP LOCKED lets several instances sweep at once without taking the
        same job; the epoch bump fences out whoever held it before.
        """
        if limit <= 0:
            return []
        rows = await self._fetch(
            f"""
                WITH c AS (
                    SELECT id FROM {TABLE}
                    WHERE status IN ('queued', 'running', 'delivering')
                      AND (locked_until IS NULL OR locked_until < clock_timestamp()
                           OR (locked_by LIKE $4 AND locked_by <> $1))
                    ORDER BY created_at LIMIT $2
                    FOR UPDATE SKIP LOCKED
                )
                UPDATE {TABLE} j SET locked_by = $1, lease_epoch = j.lease_epoch + 1,
                    locked_until = clock_timestamp() + make_interval(secs => $3),
                    status = CASE WHEN j.result IS NULL THEN 'queued' ELSE 'delivering' END
                FROM c WHERE j.id = c.id
                RETURNING j.id
                """,
            self.instance_id,
            limit,
            self.lease_s,
            (previous_prefix.replace("%", r"\%").replace("_", r"\_") + "%")
            if previous_prefix
            else "",
        )
        return [r["id"] for r in rows]

    async def prune(self, retention_s: float) -> int:
        """Delete finished jobs older than the retention, a bounded batch at a time."""
        result = await self._execute(
            f"""DELETE FROM {TABLE} WHERE id IN (
                        SELECT id FROM {TABLE}
                        WHERE status IN ('delivered', 'answered', 'failed', 'expired')
                          AND updated_at < clock_timestamp() - make_interval(secs => $1)
                        LIMIT 1000)""",
            retention_s,
        )
        return int(result.split()[-1])

    # -- reading and dead letters -------------------------------------------------------

    async def get(self, job_id: uuid.UUID) -> Job | None:
        """The job with this id, or None."""
        row = await self._fetchrow(f"SELECT {_COLUMNS} FROM {TABLE} WHERE id = $1", job_id)
        return _row_to_job(row) if row is not None else None

    async def list_jobs(self, status: str | None = None, limit: int = 50) -> list[Job]:
        """The newest jobs, optionally of one status."""
        rows = await self._fetch(
            f"""SELECT {_COLUMNS} FROM {TABLE} WHERE ($1::text IS NULL OR status = $1)
                    ORDER BY created_at DESC LIMIT $2""",
            status,
            limit,
        )
        return [_row_to_job(r) for r in rows]

    async def counts(self) -> dict[str, int]:
        """How many jobs are in each status."""
        rows = await self._fetch(f"SELECT status, count(*) AS n FROM {TABLE} GROUP BY status")
        return {r["status"]: r["n"] for r in rows}

    async def retry(self, job_id: uuid.UUID) -> Job | None:
        """Queue a failed or expired job again: re-delivered from its stored result if it has
        one, else run again; it gets a fresh deadline. None if no such finished job."""
        row = await self._fetchrow(
            f"""
            UPDATE {TABLE} SET
                status = CASE WHEN result IS NULL THEN 'queued' ELSE 'delivering' END,
                error = NULL, locked_by = NULL, locked_until = NULL,
                lease_epoch = lease_epoch + 1, updated_at = clock_timestamp(),
                deadline_at = clock_timestamp() + make_interval(secs => $2)
            WHERE id = $1 AND status IN ('failed', 'expired')
            RETURNING {_COLUMNS}
            """,
            job_id,
            self.deadline_s,
        )
        return _row_to_job(row) if row is not None else None

    async def ping(self) -> None:
        """Raise StoreUnavailable unless PostgreSQL answers."""
        await self._fetchrow("SELECT 1 AS ok")

    # -- plumbing -----------------------------------------------------------------------

    def _conn(self) -> Any:
        return db.connection(self.pool)

    async def _call(self, method: str, sql: str, *args: Any) -> Any:
        try:
            async with self._conn() as conn:
                return await getattr(conn, method)(sql, *args)
        except Exception as exc:
            translated = self._translate(exc)
            if translated is exc:
                raise
            raise translated from exc

    async def _fetchrow(self, sql: str, *args: Any) -> asyncpg.Record | None:
        return await self._call("fetchrow", sql, *args)

    async def _fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        result: list[asyncpg.Record] = await self._call("fetch", sql, *args)
        return result

    async def _execute(self, sql: str, *args: Any) -> str:
        result: str = await self._call("execute", sql, *args)
        return result

    async def _fenced(self, sql: str, job: Job, *args: Any) -> asyncpg.Record:
        row = await self._fetchrow(sql, job.id, job.lease_epoch, *args)
        if row is None:
            raise LeaseLost(f"job {job.id} was claimed again (epoch {job.lease_epoch} is stale)")
        return row

    @staticmethod
    def _translate(exc: Exception) -> Exception:
        if isinstance(exc, RequestError | StoreError | LeaseLost):
            return exc
        if isinstance(exc, db.UNAVAILABLE_ERRORS):
            return StoreUnavailable(f"PostgreSQL unavailable: {db.describe(exc)}")
        if isinstance(exc, asyncpg.PostgresError):
            return StoreError(f"job table error: {db.describe(exc)}")
        return exc
