"""The inline fast path (``Prefer: wait``): webhook callers waiting for their job's result.

A result goes either to the waiting caller or to Cognigy, never both: the worker
``take``s the waiter before it stores the result as ``answered``; a caller that gave up
first (timeout, disconnect) has ``abandon``ed it and the job is delivered as usual.
Both steps run on one event loop, so each is atomic.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

import anyio


@dataclass
class Waiter:
    """One caller waiting for one job."""

    taken: bool = False
    abandoned: bool = False
    done: anyio.Event = field(default_factory=anyio.Event)
    document: Any = None


class InlineWaiters:
    """Callers waiting for a result, bounded so a flood of waits cannot pile up."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._waiters: dict[uuid.UUID, Waiter] = {}

    def __len__(self) -> int:
        return len(self._waiters)

    def register(self, job_id: uuid.UUID) -> Waiter | None:
        """Start waiting for ``job_id``; None when too many callers already wait."""
        if len(self._waiters) >= self.limit:
            return None
        waiter = self._waiters[job_id] = Waiter()
        return waiter

    def take(self, job_id: uuid.UUID) -> Waiter | None:
        """The worker's claim: the waiter if its caller still waits, else None."""
        waiter = self._waiters.get(job_id)
        if waiter is None or waiter.abandoned:
            return None
        waiter.taken = True
        return waiter

    def abandon(self, job_id: uuid.UUID) -> bool:
        """The caller stops waiting; False if the worker already took the result for it."""
        waiter = self._waiters.get(job_id)
        if waiter is None:
            return True
        if waiter.taken:
            return False
        waiter.abandoned = True
        del self._waiters[job_id]
        return True

    def finish(self, job_id: uuid.UUID, document: Any) -> None:
        """Hand the answered document (or None on failure) to the caller."""
        waiter = self._waiters.pop(job_id, None)
        if waiter is not None:
            waiter.document = document
            waiter.done.set()

    def discard(self, job_id: uuid.UUID) -> None:
        """Forget a waiter whose caller is gone."""
        self._waiters.pop(job_id, None)
