"""Payloads, the job record and the result value rules, with one msgspec codec per type."""

from __future__ import annotations

import datetime as dt
import math
import os
import threading
import uuid
from decimal import ROUND_HALF_UP, Decimal
from typing import Annotated, Any, Literal

import msgspec

Status = Literal["queued", "running", "delivering", "delivered", "answered", "failed", "expired"]
Mode = Literal["context", "inject", "notify", "variables"]

Ident = Annotated[str, msgspec.Meta(min_length=1, max_length=512)]


# new_task_id: random version-4 UUIDs from one os.urandom() call per 256 ids. The same
# bytes as uuid.uuid4() (os.urandom), at under half its CPU: no system call and no
# UUID.__init__ checks per id, which is a webhook's id on the accept path.
_RANDOM: list[Any] = [b"", 0]
_RANDOM_LOCK = threading.Lock()
_VERSION_CLEAR = ~((0xF000 << 64) | (0xC000 << 48))
_VERSION_4 = (0x4000 << 64) | (0x8000 << 48)


def new_task_id() -> uuid.UUID:
    """A random (version 4, RFC 4122 variant) UUID, as uuid.uuid4() makes; never the same
    bytes twice, from any thread."""
    with _RANDOM_LOCK:
        buffer, at = _RANDOM
        if at >= len(buffer):
            buffer, at = os.urandom(4096), 0
            _RANDOM[0] = buffer
        _RANDOM[1] = at + 16
    value = (int.from_bytes(buffer[at : at + 16]) & _VERSION_CLEAR) | _VERSION_4
    task_id = object.__new__(uuid.UUID)
    object.__setattr__(task_id, "int", value)
    object.__setattr__(task_id, "is_safe", uuid.SafeUUID.unknown)
    return task_id


class WebhookRequest(msgspec.Struct, kw_only=True):
    """The body a Cognigy HTTP Request node sends (SPEC §2); unknown keys are ignored."""

    userId: Ident
    variables: dict[str, Any]
    conversationId: Ident | None = None
    sessionId: Ident | None = None
    URLToken: Ident | None = None
    query: Annotated[str, msgspec.Meta(min_length=1, max_length=128)] | None = None


class Accepted(msgspec.Struct):
    """The 202 answer."""

    taskId: str
    status: str = "accepted"
    message: str = "Database query dispatched to background worker"


class ErrorBody(msgspec.Struct):
    """Every error answer of the HTTP interface."""

    error: str
    detail: str
    field: str | None = None


class Target(msgspec.Struct, frozen=True, kw_only=True):
    """Where and how a job's result goes back into Cognigy, fixed when the job is accepted."""

    mode: Mode
    userId: str
    sessionId: str | None = None
    conversationId: str | None = None
    URLToken: str | None = None


class JobError(msgspec.Struct, kw_only=True):
    """Why a job failed: ``kind`` names the condition, ``httpStatus`` the last Cognigy answer."""

    kind: str
    detail: str
    httpStatus: int | None = None


class Attempts(msgspec.Struct):
    query: int
    delivery: int


class TaskDocument(msgspec.Struct, kw_only=True):
    """GET /tasks/{taskId} (SPEC §2)."""

    taskId: str
    status: Status
    query: str
    conversationId: str | None
    attempts: Attempts
    result: dict[str, Any] | None
    error: JobError | None
    createdAt: str
    updatedAt: str


class Job(msgspec.Struct, kw_only=True):
    """One row of the job table, as the worker and the task route see it."""

    id: uuid.UUID
    status: Status
    query: str
    variables: dict[str, Any]
    target: Target
    result: dict[str, Any] | None = None
    error: JobError | None = None
    attempts_query: int = 0
    attempts_delivery: int = 0
    lease_epoch: int = 0
    created_at: dt.datetime
    updated_at: dt.datetime
    deadline_at: dt.datetime
    result_at: dt.datetime | None = None

    def document(self) -> TaskDocument:
        """The public task document of this job."""
        return TaskDocument(
            taskId=str(self.id),
            status=self.status,
            query=self.query,
            conversationId=self.target.conversationId,
            attempts=Attempts(query=self.attempts_query, delivery=self.attempts_delivery),
            result=self.result,
            error=self.error,
            createdAt=iso_millis(self.created_at),
            updatedAt=iso_millis(self.updated_at),
        )


def iso_millis(moment: dt.datetime) -> str:
    """2026-12-03T10:00:00.000Z: UTC with milliseconds, the task document's time format."""
    utc = moment.astimezone(dt.UTC)
    return utc.strftime("%Y-%m-%dT%H:%M:%S.") + f"{utc.microsecond // 1000:03d}Z"


def json_value(value: Any) -> Any:
    """Map one result column to JSON by the rule of SPEC §3.

    Integers stay integers (also beyond 2^53), ``numeric`` stays an exact Decimal that
    encodes as a JSON number, NaN and ±Infinity become null, dates and times become
    ISO 8601 strings, json/jsonb arrive already parsed, everything else becomes text.
    """
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, Decimal):
        return value if value.is_finite() else None
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, dict):
        return {str(k): json_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_value(v) for v in value]
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).hex()
    return str(value)


def _enc_hook(value: Any) -> Any:
    return json_value(value) if not isinstance(value, Decimal | float) else None


# One encoder/decoder per type, built once (msgspec's advice and SPEC's "no per-request
# allocation"). Decimals encode as JSON numbers; decoding stored results keeps them exact.
ENCODER = msgspec.json.Encoder(decimal_format="number", enc_hook=_enc_hook)
WEBHOOK_DECODER = msgspec.json.Decoder(WebhookRequest)
EXACT_DECODER = msgspec.json.Decoder(float_hook=Decimal)
TARGET_DECODER = msgspec.json.Decoder(Target)
JOB_ERROR_DECODER = msgspec.json.Decoder(JobError)


def encode(value: Any) -> bytes:
    """Encode any payload of this package as JSON bytes."""
    return ENCODER.encode(value)


def format_variable(value: Any) -> str:
    """One value of ``db_query_result``: integers as they are, other numbers with 2 decimals."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, Decimal):
        # Half away from zero, as PostgreSQL's round() does, not Python's half-to-even.
        return str(value.quantize(Decimal("0.01"), ROUND_HALF_UP))
    if isinstance(value, float):
        return f"{Decimal(repr(value)).quantize(Decimal('0.01'), ROUND_HALF_UP)}"
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return ENCODER.encode(value).decode()
