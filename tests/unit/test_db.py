"""PostgreSQL plumbing that needs no server: DSN errors and the embedded server's user list."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cognigy_offload.config import DatabaseConfig
from cognigy_offload.db import _forget_dead_users, create_pool
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
