"""Outbound flow control towards Cognigy, shared by every worker coroutine of the process.

``RateLimiter`` is a sliding-window log: never more than ``limit`` delivery requests in
any rolling window (60 s by default), and a 429's Retry-After pauses every waiter.
``CircuitBreaker`` stops sending after repeated failures (5xx, timeouts, dropped
connections) and lets one probe through after a cool-down.

Both take the clock and the sleep function as arguments so tests can drive them with a
fake clock, and both take a deadline (on the same clock) past which nobody waits.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import anyio

from .errors import DeadlineExceeded
from .metrics import Metrics

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]

BREAKER_STATES = {"closed": 0, "open": 1, "half_open": 2}


@dataclass(eq=False, slots=True)
class _Entry:
    """One request in the window log; ``done_at`` is None while it is in flight."""

    done_at: float | None = None
    done: anyio.Event | None = None


class Permit:
    """The right to send one request; ``release()`` it when the request is over."""

    __slots__ = ("_entry", "_limiter")

    def __init__(self, limiter: RateLimiter, entry: _Entry) -> None:
        self._limiter = limiter
        self._entry = entry

    def release(self, *, sent: bool = True) -> None:
        """Mark the request finished (``sent=False``: it never left, so free its slot)."""
        self._limiter._release(self._entry, sent=sent)


class RateLimiter:
    """A sliding-window log limiting requests to ``limit_per_minute`` per ``window_s``.

    A request's entry counts from the moment it is sent until ``window_s`` after it
    *finished*. Cognigy counts a request when it arrives, which is somewhere between
    those two instants, so this keeps the server-side count within the limit whatever the
    network latency; the send-time count of SPEC §3 is then never exceeded either.
    """

    def __init__(
        self,
        limit_per_minute: int,
        clock: Clock = time.monotonic,
        sleep: Sleep = anyio.sleep,
        *,
        window_s: float = 60.0,
        metrics: Metrics | None = None,
    ) -> None:
        if limit_per_minute <= 0:
            raise ValueError("limit_per_minute must be greater than 0")
        if window_s <= 0:
            raise ValueError("window_s must be greater than 0")
        self.limit = limit_per_minute
        self.window_s = window_s
        self._clock = clock
        self._sleep = sleep
        self._metrics = metrics
        self._log: deque[_Entry] = deque()
        self._paused_until = float("-inf")
        # FIFO: only the head waiter sleeps; everyone behind it queues on the lock, so
        # slots are handed out in arrival order and nobody is starved.
        self._lock = anyio.Lock()

    @property
    def paused_until(self) -> float:
        """The clock time before which no request is sent (after a 429 with Retry-After)."""
        return self._paused_until

    def pause_until(self, monotonic_t: float) -> None:
        """Make every waiter wait until ``monotonic_t`` (on this limiter's clock)."""
        self._paused_until = max(self._paused_until, monotonic_t)

    def in_window(self) -> int:
        """How many requests currently count against the limit."""
        self._prune(self._clock())
        return len(self._log)

    async def acquire(self, deadline_s: float | None = None) -> Permit:
        """Wait until a request may be sent and record it; DeadlineExceeded past ``deadline_s``."""
        started = self._clock()
        contended = self._lock.locked()
        if deadline_s is None:
            permit, slept = await self._acquire(None)
        else:
            # Bound the time spent queued behind other waiters too.
            with anyio.move_on_after(max(deadline_s - started, 0.0)):
                permit, slept = await self._acquire(deadline_s)
                self._count_wait(started, contended or slept)
                return permit
            raise DeadlineExceeded("the deadline passed while waiting for the rate limit")
        self._count_wait(started, contended or slept)
        return permit

    async def _acquire(self, deadline_s: float | None) -> tuple[Permit, bool]:
        slept = False
        async with self._lock:
            while True:
                now = self._clock()
                self._prune(now)
                if now < self._paused_until:
                    wake_s = self._paused_until
                elif len(self._log) < self.limit:
                    entry = _Entry()
                    self._log.append(entry)
                    return Permit(self, entry), slept
                else:
                    finished = [e.done_at for e in self._log if e.done_at is not None]
                    if not finished:
                        # Every counted request is still in flight: the first to finish
                        # starts the earliest expiry.
                        pending = self._log[0]
                        if pending.done is None:
                            pending.done = anyio.Event()
                        slept = True
                        await pending.done.wait()
                        continue
                    wake_s = min(finished) + self.window_s
                    if wake_s <= now:
                        # An expired entry may sit behind an in-flight head: drop all
                        # expired ones (a full scan, only here at the limit).
                        before = len(self._log)
                        self._log = deque(e for e in self._log if not self._expired(e, now))
                        if len(self._log) < before:
                            continue
                if deadline_s is not None and wake_s > deadline_s:
                    raise DeadlineExceeded(
                        "the rate limit would hold the request past the job's deadline"
                    )
                slept = True
                # Never a zero sleep: float rounding must not turn this into a busy loop.
                await self._sleep(max(wake_s - now, 1e-6))

    def _prune(self, now: float) -> None:
        # O(expired), not O(window) per request: entries are in send order, so expired
        # ones are mostly at the head. One stuck behind an in-flight head only makes the
        # count stricter; at the limit, _acquire scans the whole log once.
        log = self._log
        while log and self._expired(log[0], now):
            log.popleft()

    def _expired(self, entry: _Entry, now: float) -> bool:
        return entry.done_at is not None and entry.done_at <= now - self.window_s

    def _release(self, entry: _Entry, *, sent: bool) -> None:
        if entry.done_at is not None:
            return
        if sent:
            entry.done_at = self._clock()
        else:
            self._log.remove(entry)
            entry.done_at = float("-inf")
        if entry.done is not None:
            entry.done.set()

    def _count_wait(self, started: float, waited: bool) -> None:
        if self._metrics is not None and waited:
            self._metrics.rate_limit_waits.inc()
            self._metrics.rate_limit_wait_seconds.inc(max(self._clock() - started, 0.0))


class CircuitBreaker:
    """Closed → open after ``failure_threshold`` consecutive failures → half-open after
    ``cooldown_s``, where exactly one probe goes through: success closes, failure reopens.

    Waiters wait while it is open (they do not fail), but never past their deadline.
    """

    def __init__(
        self,
        failure_threshold: int,
        cooldown_s: float,
        clock: Clock = time.monotonic,
        *,
        sleep: Sleep = anyio.sleep,
        metrics: Metrics | None = None,
    ) -> None:
        if failure_threshold <= 0:
            raise ValueError("failure_threshold must be greater than 0")
        self.failure_threshold = failure_threshold
        self.cooldown_s = cooldown_s
        self._clock = clock
        self._sleep = sleep
        self._metrics = metrics
        self._state = "closed"
        self._failures = 0
        self._open_until = float("-inf")
        self._probe_done: anyio.Event | None = None
        self._set_state("closed")

    @property
    def state(self) -> str:
        """``closed``, ``open`` or ``half_open`` (for /readyz and logs)."""
        return self._state

    @property
    def open_until(self) -> float:
        """When an open breaker lets its probe through (on the breaker's clock)."""
        return self._open_until

    async def acquire(self, deadline_s: float | None = None) -> bool:
        """Wait until a request may go; True when the caller is the half-open probe.

        The probe's caller must report its outcome with ``record_success`` /
        ``record_failure``, or ``abandon_probe`` when it sent nothing.
        """
        while True:
            now = self._clock()
            if self._state == "closed":
                return False
            if self._state == "open":
                if now >= self._open_until:
                    self._probe_done = anyio.Event()
                    self._set_state("half_open")
                    return True
                if deadline_s is not None and self._open_until > deadline_s:
                    raise DeadlineExceeded("the circuit breaker stays open past the job's deadline")
                await self._sleep(self._open_until - now)
                continue
            # Half-open: a probe is in flight; wait for its outcome.
            probe_done = self._probe_done
            assert probe_done is not None
            if deadline_s is None:
                await probe_done.wait()
                continue
            with anyio.move_on_after(max(deadline_s - now, 0.0)):
                await probe_done.wait()
                continue
            raise DeadlineExceeded("the deadline passed while the breaker's probe was in flight")

    def record_success(self) -> None:
        """The server answered (anything but a failure): close the breaker."""
        self._failures = 0
        if self._state != "closed":
            self._set_state("closed")
            self._wake_waiters()

    def record_failure(self) -> None:
        """A 5xx, timeout or connection error: count it, open or reopen the breaker."""
        self._failures += 1
        if self._state == "half_open" or (
            self._state == "closed" and self._failures >= self.failure_threshold
        ):
            self._open_until = self._clock() + self.cooldown_s
            self._set_state("open")
            self._wake_waiters()

    def abandon_probe(self) -> None:
        """The probe sent nothing (cancelled, lease lost): let the next waiter probe."""
        if self._state == "half_open":
            self._set_state("open")
            self._wake_waiters()

    def _wake_waiters(self) -> None:
        if self._probe_done is not None:
            self._probe_done.set()
            self._probe_done = None

    def _set_state(self, state: str) -> None:
        self._state = state
        if self._metrics is not None:
            self._metrics.breaker_state.set(BREAKER_STATES[state])
