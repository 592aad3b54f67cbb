"""A deadline for reading request bodies, kept by one watchdog instead of a timer per request.

uvicorn gives a request all the time it wants to send its body: a client that sends its
headers and then stalls, or trickles a byte at a time, would hold a task and a socket for
ever. A timer per request costs 7-12 us of CPU on the accept path (uvloop's timer
handles), several percent of a webhook; registering the reading task in a dict costs well
under one. A watchdog looks at the dict a few times per deadline and cancels the reads
that ran out; the reader turns that cancellation into a 408.
"""

from __future__ import annotations

import asyncio
import time

import anyio


class BodyDeadlines:
    """The reads in progress and the one task that ends those past ``limit_s``."""

    def __init__(self, limit_s: float) -> None:
        self.limit_s = limit_s
        self._reading: dict[asyncio.Task[object], float] = {}
        self._expired: set[asyncio.Task[object]] = set()

    def begin(self) -> asyncio.Task[object] | None:
        """Register the calling task as reading a body from now on."""
        task = asyncio.current_task()
        if task is not None:
            self._reading[task] = time.monotonic()
        return task

    def end(self, task: asyncio.Task[object] | None) -> None:
        """The read is over (finished, refused or cancelled)."""
        if task is not None:
            self._reading.pop(task, None)

    def expired(self, task: asyncio.Task[object] | None) -> bool:
        """Whether the CancelledError the task caught is this watchdog's doing; if so the
        cancellation is consumed (the task goes on to answer 408)."""
        if task is None or task not in self._expired:
            return False
        self._expired.discard(task)
        task.uncancel()
        return True

    def expire_overdue(self, now: float | None = None) -> int:
        """Cancel every read older than the limit; how many were cancelled."""
        cutoff = (time.monotonic() if now is None else now) - self.limit_s
        overdue = [task for task, started in self._reading.items() if started <= cutoff]
        for task in overdue:
            del self._reading[task]
            # The task is suspended inside its read (the dict entry exists only while it
            # reads, and this loop runs on the same thread): the cancellation lands there.
            self._expired.add(task)
            task.cancel()
        return len(overdue)

    async def run(self) -> None:
        """Check a few times per deadline until cancelled (one task per service)."""
        period = min(1.0, self.limit_s / 4)
        while True:
            await anyio.sleep(period)
            self.expire_overdue()
