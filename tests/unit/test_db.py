"""PostgreSQL plumbing that needs no server: DSN errors and the embedded server's user list."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cognigy_offload.config import DatabaseConfig
from cognigy_offload.db import _forget_dead_users, create_pool, pool_sizes
from cognigy_offload.errors import ConfigError

pytestmark = pytest.mark.anyio


async def test_a_malformed_dsn_is_a_config_error_not_an_outage() -> None:
    """A DSN that cannot be parsed names database.dsn (exit 2, no restart loop)."""
    with pytest.raises(ConfigError, match=r"database\.dsn"):
        await create_pool("notadsn", DatabaseConfig())


def test_users_killed_with_minus_9_are_forgotten(tmp_path: Path) -> None:
    """Dead pids leave the embedded server's user list, so the last real user stops it."""
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    pid_file = tmp_path / ".handle_pids.json"
    pid_file.write_text(json.dumps([int(dead.stdout), os.getpid()]))
    _forget_dead_users(pid_file)
    assert json.loads(pid_file.read_text()) == [os.getpid()]
    _forget_dead_users(tmp_path / "missing.json")  # nothing to do, no error


@pytest.mark.parametrize(
    ("pool_min", "pool_max", "jobs", "queries"),
    [
        (2, 10, (2, 2), (1, 8)),  # the shipped config: 8 workers can each run a query
        (0, 10, (0, 2), (1, 8)),
        (10, 40, (10, 10), (1, 30)),
        (1, 1, (1, 1), (1, 1)),  # the floor: one connection each
        (4, 4, (1, 1), (3, 3)),
    ],
)
def test_pool_max_is_split_between_the_job_table_and_the_queries(
    pool_min: int, pool_max: int, jobs: tuple[int, int], queries: tuple[int, int]
) -> None:
    """A quarter of pool_max (at least one) for the job table, the rest for queries."""
    config = DatabaseConfig(pool_min=pool_min, pool_max=pool_max)
    assert pool_sizes(config) == (jobs, queries)
