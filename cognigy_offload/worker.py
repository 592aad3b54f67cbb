"""The worker pool: claims jobs, runs their query, checkpoints the result, delivers it.

Also the sweeper: renews this instance's leases, takes over jobs nobody holds (after a
crash, a restart or from a dead instance) and prunes finished jobs past the retention.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import anyio
import structlog

from .config import Config
from .errors import (
    DeadlineExceeded,
    DeliveryError,
    LeaseLost,
    QueryError,
    QueryUnavailable,
    RequestError,
    StoreError,
)
from .inline import InlineWaiters
from .jobqueue import JobQueue
from .metrics import Metrics
from .models import Job, JobError, Target
from .queries import Catalog, Executor
from .store import Store

log = structlog.get_logger("cognigy_offload.worker")

SHOW_AFTER_S = 0.25  # a job running longer than this is shown as running in its row
SHOW_TICK_S = 0.1
FINAL_RETRY_FIRST_S = 0.05  # the final write retried while PostgreSQL is away, doubling
FINAL_RETRY_MAX_S = 1.0
QUERY_FAILED_DETAIL = "The query failed; the service log has the cause under this taskId."


class Deliverer(Protocol):
    """What the worker needs from the Cognigy client (cognigy.Deliverer)."""

    async def deliver(
        self,
        task_id: str,
        target: Target,
        result: dict[str, Any],
        timestamp_s: int,
        deadline_wall_s: float,
        on_attempt: Callable[[], Awaitable[None]],
        on_retry: Callable[[], Awaitable[None]] | None = None,
    ) -> int: ...


class Workers:
    """``queue.workers`` coroutines and one sweeper, run inside the app's task group."""

    def __init__(
        self,
        *,
        config: Config,
        store: Store,
        queue: JobQueue,
        catalog: Catalog,
        executor: Executor,
        deliverer: Deliverer,
        waiters: InlineWaiters,
        metrics: Metrics,
        instance_name: str,
    ) -> None:
        self.config = config
        self.store = store
        self.queue = queue
        self.catalog = catalog
        self.executor = executor
        self.deliverer = deliverer
        self.waiters = waiters
        self.metrics = metrics
        self.instance_name = instance_name
        self.busy = 0
        self.active: set[uuid.UUID] = set()
        # Jobs taken straight from the webhook whose rows do not show yet what the worker
        # does: id -> ('running' | 'delivering', since when); see run_marker.
        self.unshown: dict[uuid.UUID, tuple[str, float]] = {}
        self.idle = anyio.Event()
        self.idle.set()
        # Until a sweep finds none left, jobs an earlier run of this instance (same
        # host:port, so surely dead: this one holds the port) left behind are taken back
        # without waiting for their leases; the start-up sweep alone takes what fits.
        self.reclaiming = True
        # The task group jobs started at once run in (start_now), while serving.
        self.lane: anyio.abc.TaskGroup | None = None
        self.lane_busy = 0

    # -- the worker loop ------------------------------------------------------------------

    async def run_worker(self) -> None:
        """Take jobs off the queue until it is closed."""
        while True:
            try:
                job_id, fresh = await self.queue.get()
            except (anyio.EndOfStream, anyio.ClosedResourceError):
                return
            await self._carry(job_id, fresh)

    def start_now(self, job_id: uuid.UUID, fresh: Job | None) -> bool:
        """Start a job at once beside the workers, its queue slot given back as a worker
        taking it would; False when not serving or when server.max_inline_waits jobs
        started this way still run (then the caller queues it).

        For a job whose caller waits inline (Prefer: wait): its result needs no push, so
        it must not wait behind workers that wait on the outbound rate limit or a slow
        Cognigy. Such a job may go on after its caller gave up (to push the result); it
        counts against the limit until it ends.
        """
        if self.lane is None or self.lane_busy >= self.config.server.max_inline_waits:
            return False
        self.queue.cancel()  # the job leaves its reserved slot, as if a worker took it
        self.lane_busy += 1
        self.lane.start_soon(self._carry_beside, job_id, fresh)
        return True

    async def _carry_beside(self, job_id: uuid.UUID, fresh: Job | None) -> None:
        try:
            await self._carry(job_id, fresh)
        finally:
            self.lane_busy -= 1

    async def _carry(self, job_id: uuid.UUID, fresh: Job | None) -> None:
        self.busy += 1
        if self.busy == 1:
            self.idle = anyio.Event()
        self.active.add(job_id)
        try:
            await self.process(job_id, fresh)
        finally:
            self.active.discard(job_id)
            self.unshown.pop(job_id, None)
            self.busy -= 1
            if self.busy == 0:
                self.idle.set()

    async def process(self, job_id: uuid.UUID, fresh: Job | None = None) -> None:
        """Carry one job as far as it goes; every outcome is written to its row.

        ``fresh`` is a job this instance accepted a moment ago: its row is held here at
        epoch 0 and says queued, so it runs without a claim (one round trip and commit
        less); every write is still fenced by that epoch, and the sweep's heartbeat shows
        it as running if it takes long. Any other job (recovered, retried) is claimed.
        """
        if fresh is not None:
            job = fresh
        else:
            try:
                claimed = await self.store.claim(job_id)
            except StoreError as exc:
                # Not held any more: its lease lapses and the sweep takes the job again.
                log.warning("job.claim_failed", task_id=str(job_id), error=str(exc))
                return
            if claimed is None:
                return  # another instance took it, or it was finished meanwhile
            job = claimed
        with structlog.contextvars.bound_contextvars(
            task_id=str(job.id), conversation_id=job.target.conversationId, query=job.query
        ):
            log.info(
                "job.claimed",
                status="running" if fresh is not None else job.status,
                duration_s=self._age_s(job),
                attempts_query=job.attempts_query,
                attempts_delivery=job.attempts_delivery,
            )
            try:
                await self._advance(job, counted=fresh is None)
            except LeaseLost as exc:
                log.warning("job.lease_lost", detail=str(exc))
            except StoreError as exc:
                # The row keeps its lease; when it lapses the sweep takes the job again.
                log.warning("job.store_unavailable", error=str(exc))
            except anyio.get_cancelled_exc_class():
                with anyio.CancelScope(shield=True), anyio.move_on_after(2):
                    await self._release_quietly(job)
                    log.info("job.released", reason="shutdown")
                raise
            except Exception:
                log.exception("job.internal_error")
                await self._fail_quietly(job, JobError(kind="internal", detail="internal error"))
            finally:
                self.waiters.finish(job.id, None)

    async def _advance(self, job: Job, *, counted: bool) -> None:
        """Run the query (unless a result is stored), store it, then deliver; ``counted``:
        the claim already counted this query attempt in the row."""
        if time.time() >= job.deadline_at.timestamp():
            await self._finish(job, "expired", None)
            return
        if job.result is None:
            if not counted:
                job.attempts_query += 1
                self.unshown[job.id] = ("running", time.monotonic())
            finished = await self._run_query(job)
            if finished:
                return
            # SPEC §3: the result is stored before it is pushed, so a crash during the
            # push repeats the push from the row and never runs the query again. This
            # write does not wait for the disk (a kill -9 of the service loses nothing
            # PostgreSQL has received; see store._ASYNC_COMMIT).
            job.status = "delivering"
            await self.store.save_result(job)
            self.unshown.pop(job.id, None)
        assert job.result is not None and job.result_at is not None
        first = job.attempts_delivery + 1

        async def before_attempt() -> None:
            # The first attempt is counted by the final write; a retry at once.
            job.attempts_delivery += 1
            if job.attempts_delivery > first:
                await self.store.record_attempt(job)

        async def before_retry() -> None:
            # An attempt failed and a retry will follow, maybe after a long wait
            # (Retry-After, backoff): count the failed attempt in the row now.
            await self.store.record_attempt(job)

        try:
            status = await self.deliverer.deliver(
                str(job.id),
                job.target,
                job.result,
                int(job.result_at.timestamp()),
                job.deadline_at.timestamp(),
                before_attempt,
                before_retry,
            )
        except DeadlineExceeded:
            await self._finish(job, "expired", None)
        except DeliveryError as exc:
            error = JobError(kind=exc.kind, detail=exc.detail, httpStatus=exc.http_status)
            await self._finish(job, "failed", error)
        else:
            await self._finish(job, "delivered", None, http_status=status)

    async def _run_query(self, job: Job) -> bool:
        """Run the job's query; True when the job is finished (failed, answered inline)."""
        query = self.catalog.queries.get(job.query)
        if query is None:
            detail = f"Query {job.query!r} is no longer in the configuration."
            await self._finish(job, "failed", JobError(kind="unknown_query", detail=detail))
            return True
        try:
            args = self.catalog.bind(query, job.variables)
            result = await self.executor.run(query, args, accepted_at_s=job.created_at.timestamp())
        except RequestError as exc:
            error = JobError(kind="invalid_parameter", detail=exc.detail)
            await self._finish(job, "failed", error)
            return True
        except QueryUnavailable as exc:
            delay_s = min(2.0**job.attempts_query, 30.0)
            log.warning("job.query_retry", error=str(exc), retry_in_s=delay_s)
            await self.store.release(job, delay_s=delay_s)
            return True
        except QueryError as exc:
            log.error("job.query_failed", kind=exc.kind, error=str(exc))
            await self._finish(job, "failed", JobError(kind=exc.kind, detail=QUERY_FAILED_DETAIL))
            return True
        job.result = result
        job.result_at = dt.datetime.now(dt.UTC)
        waiter = self.waiters.take(job.id)
        if waiter is not None:
            job.status = "answered"
            job.updated_at = await self.store.save_result(job, answered=True)
            self._count_final(job, "answered")
            log.info("job.answered", status="answered", duration_s=self._age_s(job))
            self.waiters.finish(job.id, job.document())
            return True
        log.info(
            "job.result_ready",
            status="delivering",
            duration_s=self._age_s(job),
            attempts=job.attempts_query,
        )
        return False

    async def _finish(
        self,
        job: Job,
        status: str,
        error: JobError | None,
        http_status: int | None = None,
    ) -> None:
        await self._write_final(job, status, error)
        self._count_final(job, status)
        fields: dict[str, Any] = {"status": status, "duration_s": self._age_s(job)}
        if error is not None:
            fields.update(kind=error.kind, detail=error.detail, http_status=error.httpStatus)
        if http_status is not None:
            fields["http_status"] = http_status
        (log.warning if status in ("failed", "expired") else log.info)(f"job.{status}", **fields)

    async def _write_final(self, job: Job, status: str, error: JobError | None) -> None:
        """Write the final state, retried while PostgreSQL is away (a restart, a failover)
        for up to one lease: the outcome, a delivery above all, has happened, and a job
        left to the lease would be run and delivered again. The job stays active
        meanwhile, so the sweep's heartbeat keeps its lease once the database is back;
        LeaseLost (another instance took it) is not retried."""
        give_up_at = time.monotonic() + self.config.queue.lease_s
        delay_s = FINAL_RETRY_FIRST_S
        while True:
            try:
                await self.store.finish(job, status, error)
                return
            except StoreError as exc:
                if time.monotonic() + delay_s >= give_up_at:
                    raise
                log.warning("job.final_write_retry", error=str(exc), retry_in_s=delay_s)
            await anyio.sleep(delay_s)
            delay_s = min(delay_s * 2, FINAL_RETRY_MAX_S)

    def _count_final(self, job: Job, status: str) -> None:
        self.metrics.jobs_finished.labels(status).inc()
        self.metrics.job_duration.labels(status).observe(self._age_s(job))

    @staticmethod
    def _age_s(job: Job) -> float:
        return round((dt.datetime.now(dt.UTC) - job.created_at).total_seconds(), 4)

    async def _release_quietly(self, job: Job) -> None:
        # If this fails the lease lapses and the sweep takes the job again.
        with contextlib.suppress(StoreError, LeaseLost):
            await self.store.release(job)

    async def _fail_quietly(self, job: Job, error: JobError) -> None:
        with contextlib.suppress(StoreError, LeaseLost):
            await self._finish(job, "failed", error)

    # -- the sweeper ----------------------------------------------------------------------

    async def sweep(self, *, startup: bool = False) -> int:
        """Renew leases, take over orphaned jobs that fit into the queue; returns how many."""
        if not startup:
            await self.store.heartbeat([*self.queue.waiting(), *self.active])
        # No slots are reserved while the database answers, so webhooks arriving meanwhile
        # are not refused; what no longer fits afterwards is handed back at once.
        limit = self.queue.free
        prefix = f"{self.instance_name}:" if startup or self.reclaiming else None
        taken = await self.store.take_over(limit, previous_prefix=prefix)
        if prefix is not None and limit > 0:
            self.reclaiming = len(taken) >= limit  # a full take: more may be left
        free = self.queue.free  # the queue may have filled up or closed meanwhile
        fits, rest = taken[:free], taken[free:]
        if rest:
            await self.store.release_unstarted(rest)
        taken = fits
        for job_id in taken:
            self.queue.put(job_id)
        if taken:
            self.metrics.jobs_recovered.inc(len(taken))
            log.info("jobs.recovered", count=len(taken), at_startup=startup)
        return len(taken)

    async def run_marker(self) -> None:
        """Show in the job table what workers do with jobs taken straight from the webhook
        once that lasts over SHOW_AFTER_S: one UPDATE for all of them, and none at all for
        the usual fast job, which goes from queued to its final state in one write."""
        while True:
            await anyio.sleep(SHOW_TICK_S)
            now = time.monotonic()
            due = {
                job_id: state
                for job_id, (state, since) in self.unshown.items()
                if now - since >= SHOW_AFTER_S
            }
            if not due:
                continue
            try:
                await self.store.show_progress(due)
            except StoreError as exc:
                log.warning("jobs.progress_not_shown", error=str(exc))
                continue
            for job_id, state in due.items():
                if self.unshown.get(job_id, ("", 0.0))[0] == state:
                    del self.unshown[job_id]

    async def run_sweeper(self) -> None:
        """Sweep every ``queue.sweep_interval_s``; prune once a minute."""
        last_prune = 0.0
        while True:
            await anyio.sleep(self.config.queue.sweep_interval_s)
            try:
                await self.sweep()
                if time.monotonic() - last_prune >= 60:
                    last_prune = time.monotonic()
                    pruned = await self.store.prune(self.config.queue.retention_s)
                    if pruned:
                        self.metrics.jobs_pruned.inc(pruned)
                        log.info("jobs.pruned", count=pruned)
            except StoreError as exc:
                log.warning("sweep.store_unavailable", error=str(exc))
