"""The composition root: builds every part, wires them in the Starlette lifespan, runs uvicorn."""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import socket
import threading
import urllib.request
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import anyio
import httpx
import structlog
import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.routing import Route

from . import db, http1, openapi, web
from .bodytimeout import BodyDeadlines
from .cognigy import Deliverer
from .config import Config, Secrets
from .errors import ConfigError, OffloadError
from .inline import InlineWaiters
from .jobqueue import JobQueue
from .metrics import Metrics
from .queries import Catalog, Executor
from .store import Store
from .worker import Workers

log = structlog.get_logger("cognigy_offload.app")


def instance_name(config: Config) -> str:
    """A stable name for this instance: a restart with the same name takes its jobs at once."""
    return f"{socket.gethostname()}:{config.server.port}"


def build_app(
    config: Config,
    secrets: Secrets,
    *,
    dsn: str | None = None,
    name: str | None = None,
    on_ready: Callable[[web.Service], None] | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
) -> Starlette:
    """The Starlette app; its lifespan opens the database, the queue, workers and client."""
    metrics = Metrics()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        async with contextlib.AsyncExitStack() as stack:
            try:
                service = await stack.enter_async_context(
                    run_service(
                        config,
                        secrets,
                        metrics,
                        dsn=dsn,
                        name=name or instance_name(config),
                        transport=transport,
                    )
                )
            except ConfigError as exc:
                log.error("startup.failed", problems=exc.problems)
                raise
            except OffloadError as exc:
                log.error("startup.failed", error=str(exc))
                raise
            if on_ready is not None:
                on_ready(service)
            yield {"service": service}

    routes = [
        Route(web.WEBHOOK_PATH, web.webhook_endpoint, methods=["POST"]),
        Route("/tasks/{task_id}", web.task, methods=["GET"]),
        Route("/healthz", web.healthz, methods=["GET"]),
        Route("/readyz", web.readyz, methods=["GET"]),
        Route("/metrics", web.metrics, methods=["GET"]),
        Route("/openapi.json", openapi.endpoint, methods=["GET"]),
    ]
    app = Starlette(
        routes=routes,
        middleware=[Middleware(web.Front, tokens=secrets.webhook_tokens, metrics=metrics)],
        exception_handlers={HTTPException: web.http_error, Exception: web.internal_error},
        lifespan=lifespan,
    )
    # A trailing slash is a 404 in the JSON shape, not a redirect built from the Host header.
    app.router.redirect_slashes = False
    return app


@contextlib.asynccontextmanager
async def open_database(config: Config, dsn: str | None = None) -> AsyncIterator[db.Pools]:
    """The asyncpg pools on the configured database, or on an embedded server if dsn is empty."""
    embedded: db.EmbeddedPostgres | None = None
    target = dsn or config.database.dsn
    if not target:
        embedded = db.EmbeddedPostgres(config.database.data_dir)
        log.info("database.embedded_starting", data_dir=str(embedded.data_dir))
        target = await anyio.to_thread.run_sync(embedded.start)
    try:
        jobs_size, queries_size = db.pool_sizes(config.database)
        async with contextlib.AsyncExitStack() as stack:
            pools = []
            for read_only, size in ((False, jobs_size), (True, queries_size)):
                pool = await db.create_pool(target, config.database, read_only=read_only, size=size)
                stack.push_async_callback(_close_pool, pool)
                pools.append(pool)
            yield db.Pools(jobs=pools[0], queries=pools[1])
    finally:
        if embedded is not None:
            await anyio.to_thread.run_sync(embedded.stop)


async def _close_pool(pool: Any) -> None:
    with anyio.CancelScope(shield=True), anyio.move_on_after(5):
        await pool.close()


@contextlib.asynccontextmanager
async def run_service(
    config: Config,
    secrets: Secrets,
    metrics: Metrics,
    *,
    dsn: str | None = None,
    name: str,
    transport: httpx.AsyncBaseTransport | None = None,
) -> AsyncIterator[web.Service]:
    """Start every part in order, yield the running service, then drain and stop."""
    instance_id = f"{name}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    async with open_database(config, dsn) as pools:
        store = Store(
            pools.jobs,
            instance_id=instance_id,
            lease_s=config.queue.lease_s,
            deadline_s=config.queue.job_deadline_s,
            group_commit_s=config.queue.group_commit_ms / 1000,
        )
        await store.migrate()
        catalog = await Catalog.prepare(pools.queries, config.queries)
        executor = Executor(
            pools.queries,
            on_run=lambda q, s, outcome: _observe_query(metrics, q.name, s, outcome),
            on_shared=lambda q, how: metrics.queries_shared.labels(q.name, how).inc(),
            # A busy query pool frees a connection within one statement timeout at most.
            acquire_timeout_s=max(
                db.ACQUIRE_TIMEOUT_S, config.database.statement_timeout_ms / 1000
            ),
        )
        queue = JobQueue(config.queue.capacity)
        waiters = InlineWaiters(config.server.max_inline_waits)
        metrics.queue_depth.set_function(lambda: queue.depth)
        metrics.inline_waits.set_function(lambda: len(waiters))
        max_connections = max(10, config.queue.workers * 2)
        limits = httpx.Limits(max_connections=max_connections)
        # The lean HTTP/1.1 transport (a third of httpcore's CPU per delivery) when
        # httptools is installed; httpx's own otherwise. Tests may pass their own.
        transport = (
            transport
            or http1.make_transport(max_connections)
            or httpx.AsyncHTTPTransport(limits=limits)
        )
        async with httpx.AsyncClient(
            timeout=config.cognigy.request_timeout_s, transport=transport
        ) as client:
            deliverer = Deliverer(
                config.cognigy,
                config.token_url,
                secrets,
                client,
                metrics,
                # Deliveries skip the client's layers, unless a proxy must be honoured.
                transport=None if _proxied() else transport,
            )
            workers = Workers(
                config=config,
                store=store,
                queue=queue,
                catalog=catalog,
                executor=executor,
                deliverer=deliverer,
                waiters=waiters,
                metrics=metrics,
                instance_name=name,
            )
            deadlines = BodyDeadlines(web.BODY_TIMEOUT_S)
            service = web.Service(
                config=config,
                store=store,
                queue=queue,
                catalog=catalog,
                waiters=waiters,
                metrics=metrics,
                executor=executor,
                breaker_state=lambda: deliverer.breaker.state,
                body_deadlines=deadlines,
                start_now=workers.start_now,
            )
            async with anyio.create_task_group() as tg:
                await tg.start(store.run_committer)
                tg.start_soon(deadlines.run)
                await workers.sweep(startup=True)
                async with anyio.create_task_group() as pool_tg:
                    for _ in range(config.queue.workers):
                        pool_tg.start_soon(workers.run_worker)
                    workers.lane = pool_tg
                    tg.start_soon(workers.run_sweeper)
                    tg.start_soon(workers.run_marker)
                    log.info(
                        "service.started",
                        instance=instance_id,
                        listening=f"http://{config.server.host}:{config.server.port}",
                        workers=config.queue.workers,
                        queries=sorted(catalog.queries),
                    )
                    try:
                        yield service
                    finally:
                        await _drain(service, workers, pool_tg, config)
                tg.cancel_scope.cancel()
    log.info("service.stopped", instance=instance_id)


async def _drain(
    service: web.Service, workers: Workers, pool_tg: anyio.abc.TaskGroup, config: Config
) -> None:
    """Stop taking work, give running jobs the grace period, hand back the rest."""
    service.draining = True
    workers.lane = None  # a webhook still being answered queues its job (handed back below)
    with anyio.CancelScope(shield=True):
        left = service.queue.close()
        try:
            with anyio.fail_after(5):
                await service.store.release_unstarted(left)
        except (OffloadError, TimeoutError) as exc:
            log.warning("shutdown.release_failed", error=str(exc), jobs=len(left))
        log.info(
            "service.draining",
            unstarted=len(left),
            running=workers.busy,
            grace_s=config.server.shutdown_grace_s,
        )
    with anyio.move_on_after(config.server.shutdown_grace_s, shield=True):
        await workers.idle.wait()
    pool_tg.cancel_scope.cancel()


def _proxied() -> bool:
    """True when the environment names an HTTP proxy (httpx's clients honour it)."""
    return any(scheme in ("http", "https", "all") for scheme in urllib.request.getproxies())


def _observe_query(metrics: Metrics, name: str, seconds: float, outcome: str) -> None:
    metrics.query_duration.labels(name).observe(seconds)
    metrics.queries_run.labels(name, outcome).inc()


class _Server(uvicorn.Server):
    """uvicorn's server that marks the service draining as soon as a signal arrives."""

    def __init__(self, config: uvicorn.Config, holder: dict[str, web.Service]) -> None:
        super().__init__(config)
        self.holder = holder

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """Handle SIGTERM/SIGINT as a graceful stop that ends with exit code 0.

        uvicorn's own version re-raises the signal after shutdown, which would make
        systemd see a death by signal instead of a clean exit.
        """
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        handled = (signal.SIGINT, signal.SIGTERM)
        original = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig: int, frame: Any) -> None:
        service = self.holder.get("service")
        if service is not None:
            service.draining = True
        super().handle_exit(sig, frame)


def _fast_choices() -> dict[str, str]:
    choices = {}
    for module, key, value in (("uvloop", "loop", "uvloop"), ("httptools", "http", "httptools")):
        try:
            __import__(module)
            choices[key] = value
        except ImportError:
            pass
    return choices


def tune_gc() -> None:
    """Once start-up is done (the serving process only, never tests).

    What start-up built lives until exit: take it out of the cyclic GC's scans, and
    collect the young generation less often (each webhook allocates hundreds of
    short-lived objects; the default threshold of 700 runs a collection every few).
    """
    gc.freeze()
    gc.set_threshold(20_000, 20, 100)


def serve(config: Config, secrets: Secrets) -> None:
    """Run the service under uvicorn until SIGTERM/SIGINT (the systemd unit's ExecStart)."""
    holder: dict[str, web.Service] = {}

    def ready(service: web.Service) -> None:
        holder["service"] = service
        tune_gc()

    # Bind before the lifespan runs: a second copy started on a port that is in use must
    # stop here, before its start-up recovery takes over the running copy's jobs.
    listener = bind_listener(config.server.host, config.server.port)
    app = build_app(config, secrets, on_ready=ready)
    server = _Server(
        uvicorn.Config(
            app,
            host=config.server.host,
            port=config.server.port,
            lifespan="on",
            log_config=None,
            access_log=False,
            server_header=False,
            timeout_graceful_shutdown=int(config.server.max_wait_s) + 1,
            **_fast_choices(),  # type: ignore[arg-type]
        ),
        holder,
    )
    server.run(sockets=[listener])
    if not server.started:
        raise SystemExit(3)


def bind_listener(host: str, port: int) -> socket.socket:
    """The listening socket, or a ConfigError naming server.port if it cannot be had."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((host, port))
        listener.listen(2048)
    except OSError as exc:
        listener.close()
        raise ConfigError(
            [
                f"server.port: cannot listen on {host}:{port}: {exc.strerror} "
                "(is another copy of the service running?)"
            ]
        ) from exc
    listener.set_inheritable(True)
    return listener
