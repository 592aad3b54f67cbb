"""Unit-test fixtures: the anyio backend and a fake clock with a matching sleep."""

from __future__ import annotations

import pytest

from .faketime import FakeTime


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def fake_time() -> FakeTime:
    return FakeTime()
