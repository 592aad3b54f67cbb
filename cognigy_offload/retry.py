"""The delivery retry policy of SPEC §3 as pure functions: no I/O, no clock, no sleeping.

``classify`` maps one Cognigy answer (or a transport failure) to a ``Decision``;
``backoff_s`` and ``parse_retry_after`` say how long to wait before the next attempt.
The delivery client (``cognigy.Deliverer``) applies them.
"""

from __future__ import annotations

import datetime as dt
import enum
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from email.utils import parsedate_to_datetime

# RFC 9110 allows only an integer here, but some gateways send "1.5"; accept both.
_SECONDS = re.compile(r"[+-]?[0-9]+(?:\.[0-9]+)?")
# 2**60 backoff steps is far past any max_s: cap the exponent so the float cannot overflow.
_MAX_EXPONENT = 60


class Action(enum.Enum):
    """What the delivery loop does next."""

    SUCCESS = "success"
    RETRY = "retry"
    RATE_LIMITED = "rate_limited"
    REFRESH = "refresh"
    FAIL = "fail"


@dataclass(frozen=True, slots=True)
class Decision:
    """The policy's verdict on one attempt; ``kind`` is the failure kind when it fails."""

    action: Action
    kind: str | None = None
    http_status: int | None = None

    @property
    def retryable(self) -> bool:
        """True when another attempt may fix it (after a wait or a token refresh)."""
        return self.action in (Action.RETRY, Action.RATE_LIMITED, Action.REFRESH)


_RETRYABLE_4XX = frozenset({408, 425, 429})


def classify(status: int | None, transport_error: bool, *, refreshed: bool = False) -> Decision:
    """Map an HTTP status (or a transport error) to the next step of SPEC §3's policy.

    ``refreshed`` says the token was already refreshed once after a 401 in this delivery,
    so another 401 fails the job with kind ``auth``.
    """
    if transport_error:
        return Decision(Action.RETRY, kind="transport")
    if status is None:
        raise ValueError("classify needs an HTTP status or transport_error=True")
    if 200 <= status < 300:
        return Decision(Action.SUCCESS, http_status=status)
    if status == 401:
        if refreshed:
            return Decision(Action.FAIL, kind="auth", http_status=status)
        return Decision(Action.REFRESH, kind="auth", http_status=status)
    if status == 403:
        return Decision(Action.FAIL, kind="forbidden", http_status=status)
    if status == 429:
        return Decision(Action.RATE_LIMITED, kind="unavailable", http_status=status)
    if status in _RETRYABLE_4XX or 500 <= status < 600:
        return Decision(Action.RETRY, kind="unavailable", http_status=status)
    # Other 4xx, and redirects or informational answers the client does not follow.
    return Decision(Action.FAIL, kind="rejected", http_status=status)


def backoff_s(attempt: int, base_s: float, max_s: float, rng: Callable[[], float]) -> float:
    """Exponential backoff with full jitter: uniform in [0, min(max_s, base_s * 2**(attempt-1))]."""
    exponent = min(max(attempt - 1, 0), _MAX_EXPONENT)
    ceiling_s = min(max_s, base_s * (2.0**exponent))
    return max(0.0, ceiling_s * rng())


def parse_retry_after(value: str | None, now: dt.datetime, max_s: float) -> float | None:
    """Seconds to wait from a Retry-After value (seconds or an HTTP-date), clamped to [0, max_s].

    Returns None when the header is missing or unreadable, so the caller falls back to
    its backoff. ``now`` must be timezone-aware.
    """
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    if _SECONDS.fullmatch(text):
        seconds = float(text)
    else:
        try:
            when = parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
        if when.tzinfo is None:
            # RFC 9110 dates are always GMT; parsedate_to_datetime leaves "-0000" naive.
            when = when.replace(tzinfo=dt.UTC)
        seconds = (when - now).total_seconds()
    if not math.isfinite(seconds):
        return None
    return min(max(seconds, 0.0), max_s)
