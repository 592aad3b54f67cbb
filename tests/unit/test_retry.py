"""The retry policy of SPEC §3 as tables: classify, backoff_s, parse_retry_after."""

from __future__ import annotations

import datetime as dt

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cognigy_offload.retry import Action, backoff_s, classify, parse_retry_after

NOW = dt.datetime(2026, 12, 3, 10, 0, 0, tzinfo=dt.UTC)


@pytest.mark.parametrize(
    ("status", "transport_error", "refreshed", "action", "kind"),
    [
        (200, False, False, Action.SUCCESS, None),
        (201, False, False, Action.SUCCESS, None),
        (204, False, True, Action.SUCCESS, None),
        (401, False, False, Action.REFRESH, "auth"),
        (401, False, True, Action.FAIL, "auth"),
        (403, False, False, Action.FAIL, "forbidden"),
        (403, False, True, Action.FAIL, "forbidden"),
        (408, False, False, Action.RETRY, "unavailable"),
        (425, False, False, Action.RETRY, "unavailable"),
        (429, False, False, Action.RATE_LIMITED, "unavailable"),
        (500, False, False, Action.RETRY, "unavailable"),
        (502, False, False, Action.RETRY, "unavailable"),
        (503, False, False, Action.RETRY, "unavailable"),
        (504, False, False, Action.RETRY, "unavailable"),
        (599, False, False, Action.RETRY, "unavailable"),
        (400, False, False, Action.FAIL, "rejected"),
        (404, False, False, Action.FAIL, "rejected"),
        (409, False, False, Action.FAIL, "rejected"),
        (413, False, False, Action.FAIL, "rejected"),
        (422, False, False, Action.FAIL, "rejected"),
        (301, False, False, Action.FAIL, "rejected"),
        (None, True, False, Action.RETRY, "transport"),
        (None, True, True, Action.RETRY, "transport"),
    ],
)
def test_classify_follows_the_spec_table(
    status: int | None, transport_error: bool, refreshed: bool, action: Action, kind: str | None
) -> None:
    """Every status class maps to the step SPEC §3 prescribes, and keeps the status."""
    decision = classify(status, transport_error, refreshed=refreshed)
    assert decision.action is action
    assert decision.kind == kind
    assert decision.http_status == status


def test_classify_needs_a_status_or_a_transport_error() -> None:
    """Neither a status nor a transport error is a programming error, not a decision."""
    with pytest.raises(ValueError):
        classify(None, False)


@pytest.mark.parametrize(
    ("action", "retryable"),
    [(200, False), (401, True), (403, False), (429, True), (503, True), (422, False)],
)
def test_retryable_property(action: int, retryable: bool) -> None:
    """``retryable`` is true exactly for the decisions that lead to another attempt."""
    assert classify(action, False).retryable is retryable


@pytest.mark.parametrize(
    ("attempt", "rng", "expected_s"),
    [
        (1, 1.0, 0.5),
        (2, 1.0, 1.0),
        (3, 1.0, 2.0),
        (4, 0.5, 2.0),
        (7, 1.0, 30.0),  # 0.5 * 64 = 32, capped at 30
        (1, 0.0, 0.0),
        (10_000, 1.0, 30.0),  # a huge attempt number does not overflow
        (0, 1.0, 0.5),  # attempt numbers start at 1; 0 behaves like 1
    ],
)
def test_backoff_is_exponential_with_full_jitter(
    attempt: int, rng: float, expected_s: float
) -> None:
    """The ceiling doubles per attempt up to max_s; the jitter scales it by rng()."""
    assert backoff_s(attempt, 0.5, 30.0, lambda: rng) == pytest.approx(expected_s)


@given(
    attempt=st.integers(min_value=1, max_value=200),
    jitter=st.floats(min_value=0.0, max_value=1.0),
)
def test_backoff_stays_within_zero_and_max(attempt: int, jitter: float) -> None:
    """Whatever the attempt and jitter, the wait is within [0, max_s]."""
    wait_s = backoff_s(attempt, 0.25, 10.0, lambda: jitter)
    assert 0.0 <= wait_s <= 10.0


@pytest.mark.parametrize(
    ("value", "expected_s"),
    [
        (None, None),
        ("", None),
        ("   ", None),
        ("0", 0.0),
        ("7", 7.0),
        (" 12 ", 12.0),
        ("1.5", 1.5),
        ("-3", 0.0),  # a negative wait clamps to 0
        ("500", 120.0),  # clamped to max_s
        ("Thu, 03 Dec 2026 10:00:30 GMT", 30.0),
        ("Thu, 03 Dec 2026 09:59:00 GMT", 0.0),  # in the past
        ("Fri, 04 Dec 2026 10:00:00 GMT", 120.0),  # a day ahead, clamped
        ("Thursday, 03-Dec-26 10:00:10 GMT", 10.0),  # RFC 850
        ("Thu Dec  3 10:00:05 2026", 5.0),  # asctime
        ("soon", None),
        ("1e3", None),
        ("nan", None),
        ("inf", None),
        ("0x10", None),
        ("Thu, 99 Foo 2026 10:00:30 GMT", None),
    ],
)
def test_parse_retry_after(value: str | None, expected_s: float | None) -> None:
    """Seconds or an HTTP-date, clamped to [0, max_s]; anything else is None (use backoff)."""
    result = parse_retry_after(value, NOW, 120.0)
    if expected_s is None:
        assert result is None
    else:
        assert result == pytest.approx(expected_s)


@given(st.text(max_size=40))
def test_parse_retry_after_never_raises(value: str) -> None:
    """Arbitrary header text gives None or a wait within the bounds, never an exception."""
    result = parse_retry_after(value, NOW, 60.0)
    assert result is None or 0.0 <= result <= 60.0
