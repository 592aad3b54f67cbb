"""A lean HTTP/1.1 transport for ``httpx.AsyncClient``: asyncio protocol + httptools.

Why it exists: httpx's default transport (httpcore over anyio, with h11) costs about 1.3 ms of
CPU per small POST on a keep-alive connection, the largest CPU cost of a job in this service.
Here a request is one ``transport.write`` and the answer is parsed by llhttp (httptools); the
client layer (auth flows, request building, decoding) stays httpx's.

It does what delivering to the Cognigy API needs and no more: HTTP/1.1 (http and https),
keep-alive pools per origin under one ``max_connections`` cap, httpx's timeouts and exception
types. Request bodies are sent whole; answers are read whole and refused beyond 1 MiB. No
proxies, no HTTP/2, no pipelining, no upgrades. The client's ``limits`` and ``verify`` do not
reach a custom transport: give ``max_connections`` and ``ssl_context`` here. The write timeout
is unused: a request goes whole into the socket buffer, a peer that reads nothing shows up as a
read timeout.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from typing import cast

import httpx

try:
    import httptools
except ImportError:  # the ``fast`` extra is not installed: make_transport returns None
    httptools = None  # type: ignore[assignment]

MAX_BODY = 1 << 20
_MAX_HEAD = 64 << 10
_FRAMING = (b"content-length", b"transfer-encoding")
_PORTS = {"http": 80, "https": 443}
_VERSIONS = {"1.1": b"HTTP/1.1", "1.0": b"HTTP/1.0"}
Origin = tuple[str, str, int]


class _Connection(asyncio.Protocol):
    """One connection: a request is written, then its answer parsed, one at a time."""

    def __init__(self, origin: Origin, forget: Callable[[_Connection], None]) -> None:
        self.origin = origin
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.reusable = False  # the last answer was complete and allows keep-alive
        self.idle_since = 0.0
        self._forget = forget
        self._loop = asyncio.get_running_loop()
        self._parser = httptools.HttpResponseParser(self)
        self._waiter: asyncio.Future[httpx.Response] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._read_timeout = 0.0
        self._last_data = 0.0
        self._start(head_only=False)

    def _start(self, head_only: bool) -> None:
        self._head_only = head_only
        self._reason = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._body: list[bytes] = []
        self._size = 0  # body bytes
        self._received = 0  # all bytes of this answer
        self._head_done = False
        self._framed = False  # Content-Length or chunked: the body does not end at EOF

    async def request(
        self, data: bytes, head_only: bool, read_timeout: float | None
    ) -> httpx.Response:
        """Send ``data`` (a whole request), return its answer."""
        assert self.transport is not None
        self._start(head_only)
        self.reusable = False
        waiter: asyncio.Future[httpx.Response] = self._loop.create_future()
        self._waiter = waiter
        self.transport.write(data)
        if read_timeout is not None:
            self._read_timeout = read_timeout
            self._last_data = self._loop.time()
            self._timer = self._loop.call_later(read_timeout, self._check_timeout)
        try:
            return await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                waiter.exception()  # the caller is gone: no "exception never retrieved" log
            raise
        finally:
            self._waiter = None
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._forget(self)
        if self.transport is not None:
            self.transport.close()

    def _fail(self, exc: httpx.TransportError) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(exc)
        self.close()

    def _check_timeout(self) -> None:
        if self._waiter is None or self._waiter.done():
            return
        idle = self._loop.time() - self._last_data
        if idle >= self._read_timeout:
            self._timer = None
            self._fail(httpx.ReadTimeout(f"no data for {self._read_timeout:g} s"))
        else:
            self._timer = self._loop.call_later(self._read_timeout - idle, self._check_timeout)

    # -- asyncio callbacks --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self._waiter is None or self._waiter.done():
            self.close()  # bytes nobody asked for: the connection is out of step
            return
        self._received += len(data)
        if self._timer is not None:
            self._last_data = self._loop.time()
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(httpx.RemoteProtocolError("protocol upgrades are not supported"))
        except httptools.HttpParserError as exc:
            self._fail(httpx.RemoteProtocolError(f"malformed HTTP response: {exc}"))
            return
        if self._size > MAX_BODY:
            self._fail(httpx.RemoteProtocolError(f"response body over {MAX_BODY} bytes"))
        elif not self._head_done and self._received > _MAX_HEAD:
            self._fail(httpx.RemoteProtocolError(f"response head over {_MAX_HEAD} bytes"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.close()
        if self._head_done and not self._framed and exc is None:
            self.on_message_complete()  # the body of an answer without length ends at EOF
        if exc is not None:
            self._fail(httpx.ReadError(str(exc) or type(exc).__name__))
        elif self._received == 0:
            self._fail(httpx.RemoteProtocolError("Server disconnected without sending a response."))
        else:
            self._fail(httpx.RemoteProtocolError("Server disconnected before the answer's end."))

    # -- httptools callbacks ------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._waiter is None or self._waiter.done():
            self.close()  # a second answer to one request

    def on_status(self, status: bytes) -> None:
        self._reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))
        lower = name.lower()
        if lower == b"content-length" or (
            lower == b"transfer-encoding" and b"chunked" in value.lower()
        ):
            self._framed = True

    def on_headers_complete(self) -> None:
        self._head_done = True
        if self._head_only:  # the answer to HEAD has no body, whatever its headers say
            self.on_message_complete()
            self.close()

    def on_body(self, body: bytes) -> None:
        self._size += len(body)
        if self._size <= MAX_BODY:
            self._body.append(body)

    def on_message_complete(self) -> None:
        waiter = self._waiter
        if waiter is None or waiter.done() or self._size > MAX_BODY:
            return
        status = self._parser.get_status_code()
        if status < 200:  # informational (100 Continue): the real answer follows
            self._start(self._head_only)
            return
        self.reusable = self._parser.should_keep_alive() and not self.closed
        version = _VERSIONS.get(self._parser.get_http_version(), b"HTTP/1.1")
        waiter.set_result(
            httpx.Response(
                status,
                headers=self._headers,
                stream=httpx.ByteStream(b"".join(self._body)),
                extensions={"http_version": version, "reason_phrase": self._reason},
            )
        )


def _encode(request: httpx.Request, body: bytes) -> bytes:
    """Request line, headers and body as one bytes object."""
    url = request.url
    lines = [request.method.encode("ascii") + b" " + url.raw_path + b" HTTP/1.1"]
    has_host = framed = False
    for name, value in request.headers.raw:
        lower = name.lower()
        if lower in _FRAMING:  # the body is sent whole: our own Content-Length frames it
            framed = True
            continue
        has_host = has_host or lower == b"host"
        lines.append(name + b": " + value)
    if not has_host:
        lines.insert(1, b"Host: " + url.netloc)
    if body or framed:
        lines.append(b"Content-Length: %d" % len(body))
    lines += (b"", b"")
    head = b"\r\n".join(lines)
    # httpx lets CR and LF into header values: refuse them, they could forge headers.
    if head.count(b"\n") != len(lines) - 1 or head.count(b"\r") != len(lines) - 1:
        raise httpx.LocalProtocolError("CR or LF inside the request line or a header")
    return head + body


class Http1Transport(httpx.AsyncBaseTransport):
    """HTTP/1.1 keep-alive pools per origin, at most ``max_connections`` connections in all.

    Idle connections are reused newest first; one idle for more than ``keepalive_expiry``
    seconds is closed instead (servers drop idle connections, a request sent on one as it
    goes would fail). ``ssl_context`` defaults to a verifying context.
    """

    def __init__(
        self,
        max_connections: int = 100,
        *,
        keepalive_expiry: float = 5.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        if httptools is None:
            raise RuntimeError("Http1Transport needs httptools (the 'fast' extra)")
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        self._max = max_connections
        self._expiry = keepalive_expiry
        self._ssl = ssl_context
        self._slots = asyncio.Semaphore(max_connections)
        self._conns: set[_Connection] = set()
        self._idle: dict[Origin, list[_Connection]] = {}
        self._connecting = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        timeout: dict[str, float | None] = request.extensions.get("timeout", {})
        url = request.url
        if url.scheme not in _PORTS:
            raise httpx.UnsupportedProtocol(f"unsupported URL scheme {url.scheme!r}")
        origin = (url.scheme, url.raw_host.decode("ascii"), url.port or _PORTS[url.scheme])
        data = _encode(request, await request.aread())
        if self._slots.locked():
            try:
                async with asyncio.timeout(timeout.get("pool")):
                    await self._slots.acquire()
            except TimeoutError:
                raise httpx.PoolTimeout("no free connection within the pool timeout") from None
        else:
            await self._slots.acquire()
        conn: _Connection | None = None
        try:
            conn = self._pop_idle(origin) or await self._connect(origin, timeout.get("connect"))
            response = await conn.request(data, request.method == "HEAD", timeout.get("read"))
            if conn.reusable and not conn.closed:
                conn.idle_since = asyncio.get_running_loop().time()
                self._idle.setdefault(origin, []).append(conn)
            else:
                conn.close()
            return response
        except BaseException:
            if conn is not None:
                conn.close()
            raise
        finally:
            self._slots.release()

    def _pop_idle(self, origin: Origin) -> _Connection | None:
        idle = self._idle.get(origin)
        if not idle:
            return None
        conn = idle.pop()
        if asyncio.get_running_loop().time() - conn.idle_since < self._expiry:
            return conn
        for stale in [conn, *idle]:  # the newest has expired, so have the older ones
            stale.close()
        return None

    async def _connect(self, origin: Origin, timeout_s: float | None) -> _Connection:
        # A new connection must fit under the cap: close the oldest idle ones of other origins.
        while len(self._conns) + self._connecting >= self._max:
            victim = next((idle[0] for idle in self._idle.values() if idle), None)
            if victim is None:
                break
            victim.close()
        scheme, host, port = origin
        context = None
        if scheme == "https":
            context = self._ssl = self._ssl or _ssl_context()
        loop = asyncio.get_running_loop()
        self._connecting += 1
        try:
            async with asyncio.timeout(timeout_s):
                transport, conn = await loop.create_connection(
                    lambda: _Connection(origin, self._forget),
                    host,
                    port,
                    ssl=context,
                    server_hostname=host if context else None,
                )
        except TimeoutError:
            raise httpx.ConnectTimeout(f"no connection to {host}:{port} in time") from None
        except OSError as exc:
            raise httpx.ConnectError(f"{host}:{port}: {exc}") from exc
        finally:
            self._connecting -= 1
        conn.transport = transport
        if conn.closed:
            raise httpx.ConnectError(f"{host}:{port} closed the connection at once")
        self._conns.add(conn)
        return conn

    def _forget(self, conn: _Connection) -> None:
        """A closed connection leaves the pool."""
        self._conns.discard(conn)
        idle = self._idle.get(conn.origin)
        if idle and conn in idle:
            idle.remove(conn)

    async def aclose(self) -> None:
        for conn in list(self._conns):
            conn.close()


def _ssl_context() -> ssl.SSLContext:
    create = getattr(httpx, "create_ssl_context", None)
    return create() if create is not None else ssl.create_default_context()


def make_transport(max_connections: int) -> httpx.AsyncBaseTransport | None:
    """An ``Http1Transport``, or None (httpx's default) when httptools is not installed."""
    if httptools is None:
        return None
    return Http1Transport(max_connections)
