"""A fake monotonic clock and a sleep driven by it, for time-based unit tests."""

from __future__ import annotations

import heapq
import itertools

import anyio


class FakeTime:
    """A monotonic clock that only moves when told to, and a sleep that waits for it.

    ``sleep`` parks the caller until ``advance`` moves the clock past its wake time, so
    time-based code runs in fake seconds without real waiting.
    """

    def __init__(self, start_s: float = 1000.0) -> None:
        self.now = start_s
        self.sleeps: list[float] = []
        self._sleepers: list[tuple[float, int, anyio.Event]] = []
        self._seq = itertools.count()

    def clock(self) -> float:
        return self.now

    async def sleep(self, delay_s: float) -> None:
        self.sleeps.append(delay_s)
        if delay_s <= 0:
            await anyio.lowlevel.checkpoint()
            return
        event = anyio.Event()
        heapq.heappush(self._sleepers, (self.now + delay_s, next(self._seq), event))
        await event.wait()

    @property
    def sleeping(self) -> int:
        """How many callers are parked in ``sleep``."""
        return len(self._sleepers)

    def next_wake(self) -> float | None:
        """The earliest wake time of a parked sleeper."""
        return self._sleepers[0][0] if self._sleepers else None

    def advance(self, delta_s: float) -> None:
        """Move the clock forward and wake every sleeper whose time has come."""
        self.now += delta_s
        while self._sleepers and self._sleepers[0][0] <= self.now:
            _, _, event = heapq.heappop(self._sleepers)
            event.set()

    def advance_to_next(self) -> None:
        """Jump to the earliest sleeper's wake time (no-op without sleepers)."""
        wake = self.next_wake()
        if wake is not None:
            self.advance(max(wake - self.now, 0.0))


async def settle(rounds: int = 50) -> None:
    """Let every runnable task run until it blocks again (bounded number of rounds)."""
    for _ in range(rounds):
        await anyio.lowlevel.checkpoint()
