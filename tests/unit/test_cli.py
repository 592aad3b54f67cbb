"""Command-line arguments refused by argparse itself, before any database is touched."""

from __future__ import annotations

import pytest

from cognigy_offload.__main__ import main


@pytest.mark.parametrize("limit", ["-5", "0", "many", "99999999999999999999"])
def test_jobs_list_refuses_a_limit_that_is_not_a_positive_number(
    limit: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`jobs list --limit -5` was sent to PostgreSQL and came back as a job-table error."""
    with pytest.raises(SystemExit) as exited:
        main(["jobs", "list", "--limit", limit])
    assert exited.value.code == 2
    assert "--limit" in capsys.readouterr().err
