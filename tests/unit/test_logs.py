"""The JSON log line: fields, timestamp, redaction, and lines written once per loop turn."""

from __future__ import annotations

import asyncio
import datetime as dt
import io
import logging

import msgspec
import pytest

from cognigy_offload.logs import _BatchedWriter, _json_line, _StdlibJson, _timestamp


@pytest.mark.parametrize(
    "now_ns",
    [0, 1796325421_000001000, 1796325421_500000000, 1796325421_999999000, 1796325421_999999999],
)
def test_the_timestamp_is_utc_iso_8601_to_the_microsecond(now_ns: int) -> None:
    """The cached-second timestamp says the same instant as datetime does (truncated to
    the microsecond, never rounded into the next second)."""
    text = _timestamp(now_ns)
    assert text.endswith("Z") and len(text) == len("2026-12-03T10:00:00.000000Z")
    parsed = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    expected = dt.datetime.fromtimestamp(now_ns // 1000 / 1e6, dt.UTC)
    assert parsed == expected.replace(microsecond=now_ns // 1000 % 1_000_000)


@pytest.mark.parametrize("key", ["password", "Authorization", "X-API-Key", "CLIENT_SECRET"])
def test_a_secret_named_field_is_redacted_in_any_case(key: str) -> None:
    """The fast check for 'no secret here' still catches every spelling of a secret key."""
    line = _json_line(None, "info", {"event": "x", "query": "q", key: "s3cr3t"})
    assert b"s3cr3t" not in line
    assert msgspec.json.decode(line)[key] == "<redacted>"


def test_a_line_has_level_timestamp_and_no_secret() -> None:
    """One JSON object with the event's fields, its level, a timestamp, secrets redacted."""
    line = _json_line(None, "warning", {"event": "x", "Authorization": "Bearer s", "n": 1})
    decoded = msgspec.json.decode(line)
    assert decoded["level"] == "warning" and decoded["n"] == 1
    assert decoded["Authorization"] == "<redacted>"
    assert decoded["timestamp"].endswith("Z")


def test_lines_logged_in_one_loop_turn_are_written_together_in_order() -> None:
    """Inside a running loop, lines wait for the end of the turn (one write for all);
    outside one, each is written at once."""
    out = io.BytesIO()
    writer = _BatchedWriter(out)
    writer.msg(b"outside")
    assert out.getvalue() == b"outside\n"

    async def turn() -> bytes:
        for index in range(3):
            writer.info(f"line {index}".encode())
        before = out.getvalue()
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        return before

    before = asyncio.run(turn())
    assert before == b"outside\n"
    assert out.getvalue() == b"outside\nline 0\nline 1\nline 2\n"


def test_a_library_record_with_a_traceback_is_one_json_line() -> None:
    """asyncpg's pool warnings while PostgreSQL is down: one JSON line each, with the
    traceback inside it, never a multi-line plain-text dump."""
    out = io.BytesIO()
    handler = _StdlibJson(_BatchedWriter(out))
    logger = logging.getLogger("asyncpg.pool.test")
    logger.propagate = False
    logger.addHandler(handler)
    try:
        try:
            raise ConnectionRefusedError("connection refused")
        except ConnectionRefusedError:
            logger.warning("Failed to restore the pool connection floor; retrying", exc_info=True)
    finally:
        logger.removeHandler(handler)
    lines = out.getvalue().splitlines()
    assert len(lines) == 1
    record = msgspec.json.decode(lines[0])
    assert record["level"] == "warning" and record["logger"] == "asyncpg.pool.test"
    assert record["event"].startswith("Failed to restore")
    assert "ConnectionRefusedError" in record["exception"]


def test_a_library_warning_repeated_within_a_minute_is_one_line_with_a_count(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """asyncpg warns every few seconds while PostgreSQL is down: the first warning is
    written, repeats of it within the window are held back and counted on the next line
    written; errors and other messages are never held back."""
    out = io.BytesIO()
    handler = _StdlibJson(_BatchedWriter(out))
    clock = [1000.0]
    monkeypatch.setattr("cognigy_offload.logs.time.monotonic", lambda: clock[0])
    logger = logging.getLogger("asyncpg.pool.repeat-test")
    logger.propagate = False
    logger.addHandler(handler)
    try:
        for _ in range(5):
            logger.warning("Failed to restore the pool connection floor; retrying")
            clock[0] += 5
        logger.warning("another warning")
        logger.error("an error %s", 1)
        logger.error("an error %s", 2)
        clock[0] += 60
        logger.warning("Failed to restore the pool connection floor; retrying")
    finally:
        logger.removeHandler(handler)
    records = [msgspec.json.decode(line) for line in out.getvalue().splitlines()]
    assert [(r["event"], r.get("repeated")) for r in records] == [
        ("Failed to restore the pool connection floor; retrying", None),
        ("another warning", None),
        ("an error 1", None),
        ("an error 2", None),
        ("Failed to restore the pool connection floor; retrying", 4),
    ]
