"""The in-process hand-off from the webhook to the workers: a bounded anyio memory channel.

A slot is reserved before the job row is written, so a job that was committed always
fits into the channel and a full queue is refused (503) before anything is stored.
"""

from __future__ import annotations

import uuid

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from .models import Job

# A job id, with the job itself when it was accepted here a moment ago (the worker then
# needs no claim to read it back: the row is held by this instance at epoch 0).
Ticket = tuple[uuid.UUID, Job | None]


class QueueFull(Exception):
    """Raised by reserve() when every slot is taken by accepted jobs not yet started."""


class JobQueue:
    """Accepted job ids waiting for a worker; at most ``capacity`` of them."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._send: MemoryObjectSendStream[Ticket]
        self._receive: MemoryObjectReceiveStream[Ticket]
        self._send, self._receive = anyio.create_memory_object_stream[Ticket](capacity)
        self._reserved = 0
        self._waiting: set[uuid.UUID] = set()
        self.closed = False

    @property
    def depth(self) -> int:
        """Reserved slots plus jobs waiting in the channel."""
        return self._reserved + len(self._waiting)

    @property
    def free(self) -> int:
        """How many more jobs fit (none once closed)."""
        return 0 if self.closed else max(0, self.capacity - self.depth)

    def waiting(self) -> list[uuid.UUID]:
        """The ids in the channel, not yet taken by a worker."""
        return list(self._waiting)

    def reserve(self) -> None:
        """Take a slot for a job about to be stored; raise QueueFull if none is left."""
        if self.closed or self.depth >= self.capacity:
            raise QueueFull
        self._reserved += 1

    def cancel(self) -> None:
        """Give back a reserved slot (the job was not stored)."""
        self._reserved -= 1

    def push(self, job_id: uuid.UUID, job: Job | None = None) -> None:
        """Put a stored job into its reserved slot."""
        self._reserved -= 1
        self.put(job_id, job)

    def put(self, job_id: uuid.UUID, job: Job | None = None) -> None:
        """Put a job into a free slot (recovered jobs); never blocks."""
        if job_id in self._waiting:
            return
        self._send.send_nowait((job_id, job))
        self._waiting.add(job_id)

    async def get(self) -> Ticket:
        """The next job id (and job, if fresh from the webhook); raises anyio.EndOfStream
        once closed and drained."""
        ticket = await self._receive.receive()
        self._waiting.discard(ticket[0])
        return ticket

    def close(self) -> list[uuid.UUID]:
        """Stop handing out jobs; returns the ids that were never started."""
        self.closed = True
        left = list(self._waiting)
        self._waiting.clear()
        self._send.close()
        self._receive.close()
        return left
