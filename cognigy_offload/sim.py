"""A local stand-in for the Cognigy API and Endpoint, for tests and the demo (loopback only).

It serves the routes the delivery client calls (SPEC §1, §3): the OAuth2 token endpoint,
context inject, conversation variables, and the Endpoint's inject / notify. It records
every delivery it receives (bodies decoded with exact decimals) and plays back faults:
scripted answers for the next requests (a status, a Retry-After, a delay, or a dropped
connection), a global slowness and a server-side rate limit over a rolling window.

Faults are set from Python through ``SimState`` or over HTTP under ``/_sim/`` (for a
stand-in running in another process). ``run_sim`` serves it with uvicorn inside the
current event loop.
"""

from __future__ import annotations

import contextlib
import hmac
import math
import secrets
import socket
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs, unquote

import anyio
import msgspec
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from .config import is_loopback
from .models import ENCODER, EXACT_DECODER

_SIM_TOKEN_LIFE_FLOOR_S = 5.0
_SHUTDOWN_GRACE_S = 5


@dataclass
class Fault:
    """One scripted answer: ``status`` (with optional Retry-After and body) after ``delay_s``,
    or ``drop``: the connection closes in the middle of the answer."""

    status: int = 200
    retry_after: str | None = None
    delay_s: float = 0.0
    drop: bool = False
    body: Any = None


@dataclass
class Received:
    """One delivery request as the stand-in saw it."""

    method: str
    raw_path: str
    params: dict[str, str]
    headers: dict[str, str]
    auth: str
    body: Any
    received_at: float
    status: int | None = None
    dropped: bool = False


@dataclass
class SimState:
    """Configuration, recorded traffic and fault script of one stand-in."""

    client_id: str = "sim-client"
    client_secret: str = "sim-client-secret"
    api_key: str = "sim-api-key"
    # Sent verbatim as ``expires_in`` (None: the key is left out), so tests can send garbage.
    token_expires_in: Any = 900
    received: list[Received] = field(default_factory=list)
    token_requests: int = 0
    faults: deque[Fault] = field(default_factory=deque)
    token_faults: deque[Fault] = field(default_factory=deque)
    slowness_s: float = 0.0
    rate_limit: int | None = None
    rate_window_s: float = 60.0
    rate_limited: int = 0
    _admitted: deque[float] = field(default_factory=deque, repr=False)
    _tokens: dict[str, float] = field(default_factory=dict, repr=False)
    _waiters: list[anyio.Event] = field(default_factory=list, repr=False)
    _stopping: anyio.Event | None = field(default=None, repr=False)

    def add_faults(self, *faults: Fault) -> None:
        """Script the answers to the next delivery requests, in order."""
        self.faults.extend(faults)

    def add_token_faults(self, *faults: Fault) -> None:
        """Script the answers to the next token requests, in order."""
        self.token_faults.extend(faults)

    def revoke_tokens(self) -> None:
        """Make every issued token invalid, as if it had expired on the server."""
        self._tokens.clear()

    def reset(self) -> None:
        """Forget traffic, tokens and faults; keep the credentials."""
        self.received.clear()
        self.token_requests = 0
        self.faults.clear()
        self.token_faults.clear()
        self.slowness_s = 0.0
        self.rate_limit = None
        self.rate_limited = 0
        self._admitted.clear()
        self._tokens.clear()

    def statuses(self) -> list[int | None]:
        """The status answered to each delivery request so far (None: dropped or pending)."""
        return [r.status for r in self.received]

    def delivered(self) -> list[Received]:
        """The delivery requests answered with a 2xx."""
        return [r for r in self.received if r.status is not None and 200 <= r.status < 300]

    async def wait_received(self, count: int) -> None:
        """Return once at least ``count`` delivery requests have arrived."""
        while len(self.received) < count:
            event = anyio.Event()
            self._waiters.append(event)
            await event.wait()

    def snapshot(self) -> dict[str, Any]:
        """What ``GET /_sim/received`` answers."""
        return {
            "received": [asdict(r) for r in self.received],
            "tokenRequests": self.token_requests,
            "rateLimited": self.rate_limited,
        }

    def _record(self, entry: Received) -> None:
        self.received.append(entry)
        waiters, self._waiters = self._waiters, []
        for event in waiters:
            event.set()

    async def _pause(self, delay_s: float) -> None:
        """Sleep ``delay_s``, cut short when the stand-in shuts down."""
        if delay_s <= 0:
            return
        stopping = self._stopping
        with anyio.move_on_after(delay_s):
            if stopping is None:
                await anyio.sleep(delay_s)
            else:
                await stopping.wait()

    def _admit(self, now: float) -> float | None:
        """Apply the server-side rate limit: None if admitted, else seconds to Retry-After."""
        if self.rate_limit is None:
            return None
        while self._admitted and self._admitted[0] <= now - self.rate_window_s:
            self._admitted.popleft()
        if len(self._admitted) >= self.rate_limit:
            return self._admitted[0] + self.rate_window_s - now
        self._admitted.append(now)
        return None

    def _authorized(self, headers: dict[str, str], now: float) -> bool:
        api_key = headers.get("x-api-key")
        if api_key is not None:
            return hmac.compare_digest(api_key.encode(), self.api_key.encode())
        scheme, _, token = headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            return False
        expires_at = self._tokens.get(token.strip())
        return expires_at is not None and now < expires_at


class _SimConfigPatch(msgspec.Struct, forbid_unknown_fields=True):
    slowness_s: float | None = None
    rate_limit: int | None = None
    rate_window_s: float | None = None
    token_expires_in: Any = msgspec.UNSET
    clear_rate_limit: bool = False


class _FaultList(msgspec.Struct, forbid_unknown_fields=True):
    faults: list[Fault] = msgspec.field(default_factory=list)
    token_faults: list[Fault] = msgspec.field(default_factory=list)


class _DroppedResponse(Response):
    """Starts a 200 answer, sends part of its body and stops: the server closes the socket."""

    def __init__(self) -> None:
        super().__init__()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", b"1024")],
            }
        )
        await send({"type": "http.response.body", "body": b'{"status": "o', "more_body": True})


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(ENCODER.encode(data), status, headers, media_type="application/json")


def _problem(status: int, detail: str, headers: dict[str, str] | None = None) -> Response:
    """An RFC 7807 answer with a traceId, as Cognigy sends them."""
    body = {
        "type": "about:blank",
        "title": _phrase(status),
        "status": status,
        "detail": detail,
        "traceId": uuid.uuid4().hex,
    }
    return Response(ENCODER.encode(body), status, headers, media_type="application/problem+json")


def _seconds(value: Any, default_s: float) -> float:
    """A token life from whatever ``expires_in`` the stand-in was told to send."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return default_s
    try:
        seconds = float(value)
    except ValueError:
        return default_s
    return seconds if math.isfinite(seconds) else default_s


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return ""


def _answer(fault: Fault) -> Response:
    if fault.drop:
        return _DroppedResponse()
    headers = {"Retry-After": fault.retry_after} if fault.retry_after is not None else None
    if fault.body is not None:
        return _json(fault.body, fault.status, headers)
    if fault.status >= 400:
        return _problem(fault.status, f"scripted answer {fault.status}", headers)
    return _json({"status": "ok"}, fault.status, headers)


def _redacted_headers(request: Request) -> dict[str, str]:
    secret_names = {"authorization", "x-api-key", "cookie"}
    return {
        name: ("<redacted>" if name in secret_names else value)
        for name, value in request.headers.items()
    }


Handler = Callable[[Request], Awaitable[Response]]


class _SimApp:
    """The request handlers, bound to one SimState."""

    def __init__(self, state: SimState) -> None:
        self.state = state

    async def token(self, request: Request) -> Response:
        state = self.state
        state.token_requests += 1
        if state.token_faults:
            fault = state.token_faults.popleft()
            await state._pause(fault.delay_s)
            return _answer(fault)
        content_type = request.headers.get("content-type", "")
        if not content_type.startswith("application/x-www-form-urlencoded"):
            return _json({"error": "invalid_request", "error_description": "form body"}, 400)
        form = {k: v[0] for k, v in parse_qs((await request.body()).decode("utf-8")).items()}
        if form.get("grant_type") != "client_credentials":
            return _json({"error": "unsupported_grant_type"}, 400)
        client_ok = hmac.compare_digest(
            form.get("client_id", "").encode(), state.client_id.encode()
        )
        secret_ok = hmac.compare_digest(
            form.get("client_secret", "").encode(), state.client_secret.encode()
        )
        if not (client_ok and secret_ok):
            return _json(
                {"error": "invalid_client", "error_description": "client authentication failed"},
                401,
            )
        token = secrets.token_urlsafe(24)
        life_s = _seconds(state.token_expires_in, default_s=900.0)
        # A token issued with expires_in <= 0 may still be used once by the client.
        state._tokens[token] = time.monotonic() + max(float(life_s), _SIM_TOKEN_LIFE_FLOOR_S)
        body: dict[str, Any] = {"access_token": token, "token_type": "Bearer"}
        if state.token_expires_in is not None:
            body["expires_in"] = state.token_expires_in
        return _json(body)

    def delivery(self, route: str, needs_auth: bool) -> Handler:
        """A handler for one delivery route; ``route`` names its one path parameter."""
        prefix, rest = route.split("{", 1)
        param, suffix = rest.split("}", 1)

        async def handle(request: Request) -> Response:
            state = self.state
            now = time.monotonic()
            # Route on the raw path: a %2F in a segment must not split it.
            raw_path = request.scope.get("raw_path") or request.url.path.encode()
            raw = raw_path.decode("latin-1")
            segment = raw[len(prefix) : len(raw) - len(suffix)]
            if not (raw.startswith(prefix) and raw.endswith(suffix)) or "/" in segment:
                return _problem(404, f"no route for {raw}")
            body_bytes = await request.body()
            try:
                body: Any = EXACT_DECODER.decode(body_bytes)
            except msgspec.DecodeError:
                body = None
            headers = _redacted_headers(request)
            auth = (
                "api_key"
                if "x-api-key" in request.headers
                else "bearer"
                if request.headers.get("authorization", "").lower().startswith("bearer ")
                else "none"
            )
            entry = Received(
                method=request.method,
                raw_path=raw,
                params={param: unquote(segment)},
                headers=headers,
                auth=auth,
                body=body,
                received_at=now,
            )
            state._record(entry)
            response = await self._answer(request, entry, needs_auth, now)
            if isinstance(response, _DroppedResponse):
                entry.dropped = True
            else:
                entry.status = response.status_code
            return response

        return handle

    async def _answer(
        self, request: Request, entry: Received, needs_auth: bool, now: float
    ) -> Response:
        state = self.state
        retry_after_s = state._admit(now)
        if retry_after_s is not None:
            state.rate_limited += 1
            return _problem(
                429,
                f"more than {state.rate_limit} requests in {state.rate_window_s:g} s",
                {"Retry-After": str(max(1, math.ceil(retry_after_s)))},
            )
        fault = state.faults.popleft() if state.faults else None
        await state._pause(state.slowness_s + (fault.delay_s if fault else 0.0))
        if fault is not None:
            return _answer(fault)
        if needs_auth and not state._authorized(dict(request.headers), time.monotonic()):
            return _problem(401, "a valid Bearer token or X-API-Key is required")
        if entry.body is None:
            return _problem(400, "the body is not valid JSON")
        return _json({"status": "ok"})

    async def received(self, request: Request) -> Response:
        return _json(self.state.snapshot())

    async def reset(self, request: Request) -> Response:
        self.state.reset()
        return _json({"status": "reset"})

    async def revoke_tokens(self, request: Request) -> Response:
        self.state.revoke_tokens()
        return _json({"status": "revoked"})

    async def add_faults(self, request: Request) -> Response:
        try:
            faults = msgspec.json.decode(await request.body(), type=_FaultList)
        except msgspec.DecodeError as exc:
            return _problem(422, str(exc))
        self.state.add_faults(*faults.faults)
        self.state.add_token_faults(*faults.token_faults)
        return _json(
            {"faults": len(self.state.faults), "tokenFaults": len(self.state.token_faults)}
        )

    async def configure(self, request: Request) -> Response:
        try:
            patch = msgspec.json.decode(await request.body(), type=_SimConfigPatch)
        except msgspec.DecodeError as exc:
            return _problem(422, str(exc))
        state = self.state
        if patch.slowness_s is not None:
            state.slowness_s = patch.slowness_s
        if patch.rate_limit is not None:
            state.rate_limit = patch.rate_limit
        if patch.clear_rate_limit:
            state.rate_limit = None
        if patch.rate_window_s is not None:
            state.rate_window_s = patch.rate_window_s
        if patch.token_expires_in is not msgspec.UNSET:
            state.token_expires_in = patch.token_expires_in
        return _json(
            {
                "slowness_s": state.slowness_s,
                "rate_limit": state.rate_limit,
                "rate_window_s": state.rate_window_s,
                "token_expires_in": state.token_expires_in,
            }
        )


CONTEXT_ROUTE = "/new/v2.0/sessions/{sessionId}/context/inject"
VARIABLES_ROUTE = "/api/v1/conversations/{conversationId}/variables"
INJECT_ROUTE = "/inject/{URLToken}"
NOTIFY_ROUTE = "/notify/{URLToken}"


def build_sim_app(state: SimState) -> Starlette:
    """The stand-in's Starlette app, serving ``state``."""
    sim = _SimApp(state)

    def path_route(route: str) -> str:
        # ``:path`` lets a decoded "/" through to the handler, which checks the raw path.
        name = route.split("{")[1].split("}")[0]
        return route.replace("{" + name + "}", "{" + name + ":path}")

    routes = [
        Route("/auth/oauth2/token", sim.token, methods=["POST"]),
        Route(path_route(CONTEXT_ROUTE), sim.delivery(CONTEXT_ROUTE, True), methods=["POST"]),
        Route(path_route(VARIABLES_ROUTE), sim.delivery(VARIABLES_ROUTE, True), methods=["PATCH"]),
        Route(path_route(INJECT_ROUTE), sim.delivery(INJECT_ROUTE, False), methods=["POST"]),
        Route(path_route(NOTIFY_ROUTE), sim.delivery(NOTIFY_ROUTE, False), methods=["POST"]),
        Route("/_sim/received", sim.received, methods=["GET"]),
        Route("/_sim/reset", sim.reset, methods=["POST"]),
        Route("/_sim/faults", sim.add_faults, methods=["POST"]),
        Route("/_sim/config", sim.configure, methods=["POST"]),
        Route("/_sim/revoke-tokens", sim.revoke_tokens, methods=["POST"]),
    ]
    return Starlette(routes=routes)


class _SimServer(uvicorn.Server):
    """uvicorn without signal handling (the host process owns signals) and with a start event."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.startup_done = anyio.Event()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        try:
            await super().startup(sockets=sockets)
        except SystemExit:
            # uvicorn exits the process when it cannot listen; report it as an error instead.
            self.should_exit = True
        finally:
            self.startup_done.set()


@asynccontextmanager
async def run_sim(state: SimState, host: str = "127.0.0.1", port: int = 0) -> AsyncIterator[str]:
    """Serve the stand-in on loopback in the current event loop; yield its base URL."""
    if not is_loopback(host):
        raise ValueError(f"the Cognigy stand-in listens on loopback only, not {host!r}")
    config = uvicorn.Config(
        build_sim_app(state),
        host=host,
        port=port,
        lifespan="off",
        access_log=False,
        log_config=None,
        log_level="warning",
        timeout_graceful_shutdown=_SHUTDOWN_GRACE_S,
    )
    server = _SimServer(config)
    state._stopping = anyio.Event()
    served = anyio.Event()

    async def serve() -> None:
        try:
            await server.serve()
        finally:
            served.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(serve)
        await server.startup_done.wait()
        if not server.started:
            with anyio.CancelScope(shield=True):
                await served.wait()
            raise OSError(f"the Cognigy stand-in could not listen on {host}:{port}")
        bound = server.servers[0].sockets[0].getsockname()
        url_host = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
        try:
            yield f"http://{url_host}:{bound[1]}"
        finally:
            state._stopping.set()
            server.should_exit = True
            with anyio.CancelScope(shield=True):
                await served.wait()


async def serve_stand_in(
    state: SimState,
    port: int,
    write: Callable[[bytes], object],
    ready: Callable[[str], object] | None = None,
    poll_s: float = 0.1,
) -> None:
    """``python -m cognigy_offload stand-in``: serve the stand-in on 127.0.0.1:``port``
    until cancelled, writing each delivery it receives as one JSON line."""
    async with run_sim(state, port=port) as url:
        if ready is not None:
            ready(url)
        shown = 0
        while True:
            await anyio.sleep(poll_s)
            for request in state.received[shown:]:
                line = {
                    "method": request.method,
                    "path": request.raw_path,
                    "status": request.status,
                    "body": request.body,
                }
                write(ENCODER.encode(line) + b"\n")
            shown = len(state.received)
