"""The HTTP interface of SPEC §2: webhook, task documents, health, readiness, metrics.

Every refusal is the JSON error shape; no input a client can send gives a 500.
"""

from __future__ import annotations

import asyncio
import hmac
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import anyio
import msgspec
import structlog
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from .bodytimeout import BodyDeadlines
from .config import Config
from .errors import RequestError, StoreError, StoreUnavailable
from .inline import InlineWaiters
from .jobqueue import JobQueue, QueueFull
from .metrics import Metrics
from .models import (
    ENCODER,
    EXACT_DECODER,
    WEBHOOK_DECODER,
    Accepted,
    ErrorBody,
    Job,
    Target,
    new_task_id,
)
from .queries import Catalog, Executor
from .store import NewJob, Store, digest

log = structlog.get_logger("cognigy_offload.web")

WEBHOOK_PATH = "/webhook/cognigy-trigger"
PUBLIC_PATHS = frozenset({"/healthz", "/readyz", "/metrics", "/openapi.json"})
MAX_VARIABLES = 200
MAX_IDEMPOTENCY_KEY = 255
RETRY_AFTER_FULL_S = "2"
RETRY_AFTER_DOWN_S = "5"
STORE_WAIT_S = 1.0
# A Cognigy HTTP Request node sends its body at once and gives up after 8 to 15 s: a body
# still arriving after 15 s is a stalled or hostile client, answered 408 and disconnected.
BODY_TIMEOUT_S = 15.0
# wait=<seconds> (RFC 7240), quoted or not, ending where the preference ends: "wait=1e9"
# or "wait=5x" is not a wait of 1 or 5 seconds.
_PREFER_WAIT = re.compile(
    r"(?:^|[,;\s])wait\s*=\s*(\"?)(\d{1,30}(?:\.\d{1,6})?)\1\s*(?:$|[,;])", re.IGNORECASE
)
_AT = re.compile(r" - at `(\$[^`]*)`$")
_MISSING = re.compile(r"missing required field `([^`]+)`")
_MODE_FIELDS = {
    "context": ("sessionId",),
    "inject": ("sessionId", "URLToken"),
    "notify": ("sessionId", "URLToken"),
    "variables": ("conversationId",),
}


@dataclass
class Service:
    """What the endpoints need, built and wired by the composition root (app.py)."""

    config: Config
    store: Store
    queue: JobQueue
    catalog: Catalog
    waiters: InlineWaiters
    metrics: Metrics
    executor: Executor
    breaker_state: Callable[[], str] = lambda: "closed"
    draining: bool = False
    body_deadlines: BodyDeadlines | None = None
    # Starts a job at once beside the workers (Workers.start_now); False: queue it.
    start_now: Callable[[uuid.UUID, Job | None], bool] = lambda job_id, job: False


def error_response(
    status: int,
    code: str,
    detail: str,
    where: str | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    """The JSON error shape of SPEC §2."""
    body = _error_body(code, detail, where)
    return Response(body, status, headers=headers, media_type="application/json")


def json_response(
    payload: Any, status: int = 200, headers: dict[str, str] | None = None
) -> Response:
    """A JSON answer encoded once by the shared encoder."""
    return Response(ENCODER.encode(payload), status, headers=headers, media_type="application/json")


class Front:
    """The outermost ASGI layer: the webhook token on every route but the operational ones,
    and the webhook itself served straight from here.

    It runs before routing, so an unknown path without a token is a 401, not a 404. The
    webhook is the hot path: calling it directly skips the router, the exception
    middleware and the Request/Response objects, about a third of its CPU per request.
    Other methods on its path still go through the router (405).
    """

    def __init__(self, app: ASGIApp, tokens: tuple[str, ...], metrics: Metrics) -> None:
        self.app = app
        self.tokens = tuple(t.encode() for t in tokens)
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in PUBLIC_PATHS:
            await self.app(scope, receive, send)
        elif not self._allowed(scope):
            self.metrics.jobs_rejected.labels("unauthorized").inc()
            await send_json(
                send,
                401,
                _error_body(
                    "unauthorized",
                    "Send the webhook token as 'Authorization: Bearer <token>' "
                    "or 'X-Webhook-Token'.",
                ),
                [(b"www-authenticate", b"Bearer")],
            )
        elif scope["path"] == WEBHOOK_PATH and scope["method"] == "POST":
            await webhook(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    def _allowed(self, scope: Scope) -> bool:
        if not self.tokens:
            return True  # only possible on a loopback-only server (config.load_secrets)
        offered: bytes | None = None
        for name, value in scope["headers"]:
            if name == b"authorization" and value[:7].lower() == b"bearer ":
                offered = value[7:].strip()
            elif name == b"x-webhook-token":
                offered = value.strip()
        if offered is None:
            return False
        # Compare against every token (no early exit) so timing tells nothing.
        matches = [hmac.compare_digest(offered, token) for token in self.tokens]
        return any(matches)


async def send_json(
    send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    """One JSON answer straight to the ASGI server (no Response object)."""
    raw = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    if headers:
        raw.extend(headers)
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


def _error_body(code: str, detail: str, where: str | None = None) -> bytes:
    return ENCODER.encode(ErrorBody(error=code, detail=detail, field=where))


async def read_body(
    content_length: str | None,
    receive: Receive,
    limit: int,
    deadlines: BodyDeadlines | None = None,
) -> bytes:
    """The request body, refused with 413 as soon as it grows past ``limit`` bytes, and
    with 408 if it is not complete within the ``deadlines``' limit."""
    if content_length is not None:
        digits = content_length.strip()
        # isdigit() alone passes "²", which int() refuses: only ASCII digits are a length.
        if not (digits.isascii() and digits.isdigit()):
            raise RequestError(400, "bad_request", "Content-Length is not a number.")
        # No int() of thousands of digits (Python refuses over 4,300): long means too large.
        digits = digits.lstrip("0") or "0"
        if len(digits) > len(str(limit)) or int(digits) > limit:
            raise _too_large(limit)
    reader = deadlines.begin() if deadlines is not None else None
    try:
        return await _read_chunks(receive, limit)
    except asyncio.CancelledError:
        if deadlines is not None and deadlines.expired(reader):
            raise RequestError(
                408,
                "request_timeout",
                f"The body did not arrive within {deadlines.limit_s:g} s.",
                headers={"Connection": "close"},
            ) from None
        raise
    finally:
        if deadlines is not None:
            deadlines.end(reader)


async def _read_chunks(receive: Receive, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _too_large(limit: int) -> RequestError:
    return RequestError(413, "payload_too_large", f"The body is larger than {limit} bytes.")


def decode_webhook(body: bytes) -> Any:
    """Parse and type-check a webhook body; 400 if not JSON, 422 naming the field if wrong."""
    try:
        return WEBHOOK_DECODER.decode(body)
    except msgspec.ValidationError as exc:
        text = str(exc)
        at = _AT.search(text)
        # msgspec writes a value inside an object as `[...]` (no key): name the object.
        where = at.group(1).split("[...]")[0] if at else "$"
        message = _AT.sub("", text)
        missing = _MISSING.search(message)
        if missing:
            where = f"{where}.{missing.group(1)}" if where != "$" else f"$.{missing.group(1)}"
        raise RequestError(422, "invalid_request", f"{message}.", where) from None
    except RecursionError:
        raise RequestError(
            422, "invalid_request", "The JSON is nested too deeply.", "$.variables"
        ) from None
    except msgspec.DecodeError as exc:
        if not body.strip():
            raise RequestError(
                400, "invalid_json", "The body is empty; send the webhook as a JSON object."
            ) from None
        raise RequestError(400, "invalid_json", f"The body is not valid JSON: {exc}.") from None


def _canonical(body: bytes) -> bytes:
    """The body with keys sorted and whitespace dropped: the same JSON sent pretty-printed
    or with keys reordered is the same body for an Idempotency-Key (exact numbers kept)."""
    return msgspec.json.encode(EXACT_DECODER.decode(body), order="sorted")


def _check_content_type(content_type: str) -> None:
    media = content_type.split(";")[0].strip().lower()
    if media != "application/json" and not (
        media.startswith("application/") and media.endswith("+json")
    ):
        raise RequestError(415, "unsupported_media_type", "Send the body as application/json.")


def _prefer_wait_s(prefer: str | None, cap_s: float) -> float:
    if not prefer:
        return 0.0
    match = _PREFER_WAIT.search(prefer)
    return min(float(match.group(2)), cap_s) if match else 0.0


def _target(payload: Any, mode: str) -> Target:
    for name in _MODE_FIELDS[mode]:
        if getattr(payload, name) is None:
            raise RequestError(
                422,
                "missing_field",
                f"`{name}` is required when results are delivered in {mode!r} mode.",
                f"$.{name}",
            )
    return Target(
        mode=mode,  # type: ignore[arg-type]
        userId=payload.userId,
        sessionId=payload.sessionId,
        conversationId=payload.conversationId,
        URLToken=payload.URLToken,
    )


class ClientGone(Exception):
    """The caller disconnected before its request was read: there is nobody to answer."""


@dataclass(frozen=True, slots=True)
class Answer:
    """What the webhook answers: status, JSON body, extra headers."""

    status: int
    body: bytes
    headers: list[tuple[bytes, bytes]]


_WANTED = {
    b"content-type": "content_type",
    b"content-length": "content_length",
    b"idempotency-key": "idempotency_key",
    b"prefer": "prefer",
}


@dataclass(slots=True)
class Incoming:
    """The headers the webhook reads (latin-1 decoded, as HTTP defines them)."""

    content_type: str = ""
    content_length: str | None = None
    idempotency_key: str | None = None
    prefer: str | None = None

    @classmethod
    def of(cls, scope: Scope) -> Incoming:
        """Pick them out of the ASGI scope in one pass (the last of a repeated header wins)."""
        incoming = cls()
        for name, value in scope["headers"]:
            attribute = _WANTED.get(name)
            if attribute is not None:
                setattr(incoming, attribute, value.decode("latin-1"))
        return incoming


async def webhook(scope: Scope, receive: Receive, send: Send) -> None:
    """POST /webhook/cognigy-trigger: validate, store durably, queue, answer 202 (ASGI)."""
    service: Service = scope["state"]["service"]
    try:
        answer = await _accept(Incoming.of(scope), receive, service)
    except RequestError as exc:
        service.metrics.jobs_rejected.labels(exc.code).inc()
        headers = [(k.lower().encode(), v.encode()) for k, v in (exc.headers or {}).items()]
        answer = Answer(exc.status, _error_body(exc.code, exc.detail, exc.field), headers)
    except ClientGone:
        return
    await send_json(send, answer.status, answer.body, answer.headers)


async def webhook_endpoint(request: Request) -> Response:  # pragma: no cover  (Front has POST)
    """The router's entry for the webhook path: only there so other methods get a 405."""
    raise HTTPException(405)


async def _accept(incoming: Incoming, receive: Receive, service: Service) -> Answer:
    config = service.config
    if service.draining:
        raise RequestError(
            503,
            "shutting_down",
            "The service is shutting down; retry shortly.",
            headers={"Retry-After": RETRY_AFTER_FULL_S},
        )
    _check_content_type(incoming.content_type)
    body = await read_body(
        incoming.content_length, receive, config.server.max_body_bytes, service.body_deadlines
    )
    payload = decode_webhook(body)
    if len(payload.variables) > MAX_VARIABLES:
        raise RequestError(
            422,
            "too_many_variables",
            f"`variables` has more than {MAX_VARIABLES} keys.",
            "$.variables",
        )
    target = _target(payload, config.cognigy.delivery)
    query = service.catalog.pick(payload.query, payload.variables)
    service.catalog.bind(query, payload.variables)
    key = incoming.idempotency_key
    if key is not None and not 0 < len(key) <= MAX_IDEMPOTENCY_KEY:
        raise RequestError(
            400,
            "bad_idempotency_key",
            f"Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} characters.",
        )
    try:
        service.queue.reserve()
    except QueueFull:
        raise RequestError(
            503,
            "queue_full",
            "Too many jobs are waiting; retry shortly.",
            headers={"Retry-After": RETRY_AFTER_FULL_S},
        ) from None
    new = NewJob(
        id=new_task_id(),
        query=query.name,
        variables=ENCODER.encode(payload.variables),
        target=target,
        idempotency_key=key,
        digest=digest(_canonical(body)) if key is not None else None,
    )
    try:
        # A database that hangs (not refuses) still gives a 503 within STORE_WAIT_S.
        inserted = await service.store.insert(new, wait_s=STORE_WAIT_S)
    except StoreUnavailable:
        service.queue.cancel()
        raise RequestError(
            503,
            "database_unavailable",
            "The job store is unreachable; retry shortly.",
            headers={"Retry-After": RETRY_AFTER_DOWN_S},
        ) from None
    except StoreError as exc:
        service.queue.cancel()
        log.error("webhook.store_failed", error=str(exc))
        raise RequestError(
            503,
            "database_unavailable",
            "The job could not be stored; retry.",
            headers={"Retry-After": RETRY_AFTER_DOWN_S},
        ) from None
    except RequestError:
        service.queue.cancel()
        raise
    task_id = str(inserted.id)
    headers = [(b"location", f"/tasks/{task_id}".encode())]
    if not inserted.created:
        service.queue.cancel()
        return Answer(200, await _repeat_answer(service, inserted.id), headers)
    wait_s = _prefer_wait_s(incoming.prefer, config.server.max_wait_s)
    waiter = service.waiters.register(inserted.id) if wait_s > 0 else None
    # A waiting caller's job starts at once if it can (see Workers.start_now): no push
    # is needed for its answer, so it must not wait behind the workers.
    if waiter is None or not service.start_now(inserted.id, inserted.job):
        service.queue.push(inserted.id, inserted.job)
    service.metrics.jobs_accepted.inc()
    log.info(
        "job.accepted",
        task_id=task_id,
        conversation_id=target.conversationId,
        query=query.name,
        status="queued",
        duration_s=0.0,
    )
    if waiter is not None:
        document = await _wait_inline(receive, service, inserted.id, waiter, wait_s)
        if document is not None:
            return Answer(200, ENCODER.encode(document), headers)
    return Answer(202, ENCODER.encode(Accepted(taskId=task_id)), headers)


async def _repeat_answer(service: Service, job_id: uuid.UUID) -> bytes:
    """The body for a repeated Idempotency-Key: the task document if the job was answered
    inline (it is never pushed, so a caller whose first answer was lost on the way must
    get the result again), else the usual acceptance."""
    try:
        job = await service.store.get(job_id)
    except StoreError:
        job = None
    if job is not None and job.status == "answered":
        return ENCODER.encode(job.document())
    return ENCODER.encode(Accepted(taskId=str(job_id)))


async def _wait_inline(
    receive: Receive, service: Service, job_id: uuid.UUID, waiter: Any, wait_s: float
) -> Any:
    """Wait for the result; None if it is not ready in time or the caller left."""

    async def watch_disconnect(scope: anyio.CancelScope) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                scope.cancel()
                return

    async with anyio.create_task_group() as tg:
        with anyio.move_on_after(wait_s) as timer:
            tg.start_soon(watch_disconnect, timer)
            await waiter.done.wait()
        tg.cancel_scope.cancel()
    if waiter.done.is_set():
        return waiter.document
    if service.waiters.abandon(job_id):
        return None
    # The worker took the result for this caller just now: it is being stored.
    with anyio.move_on_after(5):
        await waiter.done.wait()
    return waiter.document


async def task(request: Request) -> Response:
    """GET /tasks/{taskId}: the task document."""
    service: Service = request.state.service
    try:
        job_id = uuid.UUID(request.path_params["task_id"])
    except ValueError:
        return error_response(404, "not_found", "No task has this id.", "$.taskId")
    try:
        job = await service.store.get(job_id)
    except StoreError:
        return error_response(
            503,
            "database_unavailable",
            "The job store is unreachable.",
            headers={"Retry-After": RETRY_AFTER_DOWN_S},
        )
    if job is None:
        return error_response(404, "not_found", "No task has this id.", "$.taskId")
    return json_response(job.document())


async def healthz(request: Request) -> Response:
    """GET /healthz: the process runs."""
    return json_response({"status": "ok"})


async def readyz(request: Request) -> Response:
    """GET /readyz: PostgreSQL answers, the queue takes work and we are not draining."""
    service: Service = request.state.service
    problems: list[str] = []
    if service.draining:
        problems.append("draining: the service is shutting down")
    if service.queue.free <= 0:
        problems.append("queue_full: no free slot in the queue")
    try:
        with anyio.fail_after(1):
            await service.store.ping()
    except (StoreError, TimeoutError):
        problems.append("database: PostgreSQL does not answer")
    detail = {
        "status": "ready" if not problems else "not_ready",
        "problems": problems,
        "queue": {"depth": service.queue.depth, "capacity": service.queue.capacity},
        "circuitBreaker": service.breaker_state(),
    }
    headers = {"Retry-After": RETRY_AFTER_DOWN_S} if problems else None
    return json_response(detail, 503 if problems else 200, headers)


async def metrics(request: Request) -> Response:
    """GET /metrics: Prometheus text exposition."""
    service: Service = request.state.service
    return Response(
        service.metrics.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8"
    )


async def http_error(request: Request, exc: Exception) -> Response:
    """Router refusals (404, 405) in the JSON error shape."""
    assert isinstance(exc, HTTPException)
    codes = {404: "not_found", 405: "method_not_allowed"}
    detail = {404: "No such route.", 405: "This route does not take that method."}
    return error_response(
        exc.status_code,
        codes.get(exc.status_code, "http_error"),
        detail.get(exc.status_code, str(exc.detail)),
        headers=dict(exc.headers or {}),
    )


async def internal_error(request: Request, exc: Exception) -> Response:
    """The last resort: still the JSON shape, and the cause in the log, not the answer."""
    log.exception("http.internal_error", path=request.url.path)
    return error_response(500, "internal_error", "Internal error; it has been logged.")
