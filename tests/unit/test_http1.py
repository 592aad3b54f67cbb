"""Http1Transport under httpx.AsyncClient against real loopback servers, faults included."""

from __future__ import annotations

import asyncio
import importlib.util
import socket
import ssl
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Generator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from cognigy_offload import http1
from cognigy_offload.http1 import MAX_BODY, Http1Transport, make_transport

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(10)]


@pytest.fixture(
    scope="module",
    params=[pytest.param({}, id="asyncio"), pytest.param({"use_uvloop": True}, id="uvloop")],
)
def anyio_backend(request: pytest.FixtureRequest) -> tuple[str, dict[str, Any]]:
    """Plain asyncio, and uvloop as the service runs (its transports are not asyncio's)."""
    if request.param and importlib.util.find_spec("uvloop") is None:
        pytest.skip("uvloop is not installed")
    return "asyncio", request.param


# The server's answer to one request (raw head + body): bytes to write, or None to hang up.
Respond = Callable[[bytes, asyncio.StreamWriter], Awaitable[bytes | None]]


# A self-signed certificate for IP 127.0.0.1 (EC P-256, valid until 2126), for the https tests.
TLS_KEY = """\
-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgmwCPdCHT7EPz/yvg
lJzzQa+8AiIWFOK6AOxxIVnbX4WhRANCAASS61Ht74P1olk6iV9Xu6ztKQpEXP7E
1Ok+5Ntv9Rip4On7WqNqEr0gjSER4G4O928H5yrbUff1U6vRsy36u1lS
-----END PRIVATE KEY-----
"""
TLS_CERT = """\
-----BEGIN CERTIFICATE-----
MIIBjDCCATOgAwIBAgIUM7uIFd5G4T/qzyHQg6/x+m/i4D0wCgYIKoZIzj0EAwIw
FDESMBAGA1UEAwwJMTI3LjAuMC4xMCAXDTI2MTIwMzE4NDQzOFoYDzIxMjYxMTA5
MTg0NDM4WjAUMRIwEAYDVQQDDAkxMjcuMC4wLjEwWTATBgcqhkjOPQIBBggqhkjO
PQMBBwNCAASS61Ht74P1olk6iV9Xu6ztKQpEXP7E1Ok+5Ntv9Rip4On7WqNqEr0g
jSER4G4O928H5yrbUff1U6vRsy36u1lSo2EwXzAdBgNVHQ4EFgQU4MlJLOcBpqUT
DarXhuLHRsU3MvcwHwYDVR0jBBgwFoAU4MlJLOcBpqUTDarXhuLHRsU3MvcwDwYD
VR0RBAgwBocEfwAAATAMBgNVHRMBAf8EAjAAMAoGCCqGSM49BAMCA0cAMEQCIA3K
kdI02ARpkVCuuK4a1yervhyEuegs4OOOBIPfuEN+AiAUzAMWEP3PKL2ho6zQ0RbS
NcbR2DCkWo9CM+SrLiZsmw==
-----END CERTIFICATE-----
"""


def answer(
    status: int = 200,
    body: bytes = b"ok",
    headers: tuple[tuple[str, str], ...] = (),
    reason: str = "OK",
    version: str = "HTTP/1.1",
) -> bytes:
    lines = [f"{version} {status} {reason}", *(f"{k}: {v}" for k, v in headers)]
    if not any(k.lower() in ("content-length", "transfer-encoding") for k, _ in headers):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def echo(request: bytes, writer: asyncio.StreamWriter) -> bytes:
    return answer(body=request.partition(b"\r\n\r\n")[2])


def constant(data: bytes | None) -> Respond:
    async def respond(request: bytes, writer: asyncio.StreamWriter) -> bytes | None:
        return data

    return respond


async def never(request: bytes, writer: asyncio.StreamWriter) -> bytes | None:
    await asyncio.sleep(30)  # cancelled when the server stops
    return None


class Server:
    """A loopback HTTP/1.1 server that counts connections, requests and hang-ups."""

    def __init__(
        self,
        respond: Respond,
        hang_up_after_answer: bool = False,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.respond = respond
        self.tls = tls
        self.hang_up_after_answer = hang_up_after_answer
        self.connections = 0
        self.hangups = 0  # connections the client closed
        self.active = 0
        self.max_active = 0
        self.requests: list[bytes] = []
        self._tasks: set[asyncio.Task[Any]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0, ssl=self.tls)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections += 1
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    self.hangups += 1
                    return
                length = 0
                for line in head.lower().split(b"\r\n"):
                    if line.startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                request = head + await reader.readexactly(length)
                self.requests.append(request)
                self.active += 1
                self.max_active = max(self.max_active, self.active)
                try:
                    data = await self.respond(request, writer)
                finally:
                    self.active -= 1
                if data is None:
                    return
                writer.write(data)
                await writer.drain()
                if self.hang_up_after_answer:
                    return
        except asyncio.CancelledError:
            pass  # stop() ends the handlers still waiting, quietly
        finally:
            writer.close()

    async def until(self, condition: Callable[[], bool]) -> None:
        for _ in range(100):
            if condition():
                return
            await asyncio.sleep(0.01)
        raise AssertionError("the server never saw it")


@pytest.fixture
async def serve() -> AsyncIterator[Callable[..., Awaitable[Server]]]:
    servers: list[Server] = []

    async def start(respond: Respond = echo, **options: Any) -> Server:
        server = Server(respond, **options)
        await server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.stop()


def client(max_connections: int = 4, timeout: float = 0.5, **options: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=Http1Transport(max_connections, **options), timeout=httpx.Timeout(timeout)
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


Serve = Callable[..., Awaitable[Server]]


# -- keep-alive and the pool ----------------------------------------------------------------


async def test_sequential_requests_share_one_connection(serve: Serve) -> None:
    server = await serve()
    async with client() as c:
        for i in range(50):
            body = b'{"n": %d, "pad": "%s"}' % (i, b"x" * 80)
            response = await c.post(server.url + "/api/x?y=1", content=body)
            assert response.status_code == 200
            assert response.content == body
    assert server.connections == 1
    head, _, body = server.requests[0].partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"POST /api/x?y=1 HTTP/1.1"
    assert f"Host: {server.url.removeprefix('http://')}".encode() in lines
    assert f"Content-Length: {len(body)}".encode() in lines
    assert any(line.lower().startswith(b"user-agent: python-httpx/") for line in lines)


async def test_concurrent_requests_up_to_the_cap(serve: Serve) -> None:
    async def slow(request: bytes, writer: asyncio.StreamWriter) -> bytes:
        await asyncio.sleep(0.05)
        return answer()

    server = await serve(slow)
    statuses: list[int] = []

    async def one(c: httpx.AsyncClient) -> None:
        statuses.append((await c.get(server.url)).status_code)

    async with client(max_connections=3) as c, anyio.create_task_group() as tg:
        for _ in range(9):
            tg.start_soon(one, c)
    assert statuses == [200] * 9
    assert server.max_active == 3
    assert server.connections == 3


async def test_a_new_origin_closes_an_idle_connection_to_stay_under_the_cap(serve: Serve) -> None:
    first, second = await serve(), await serve()
    async with client(max_connections=1) as c:
        assert (await c.get(first.url)).status_code == 200
        assert (await c.get(second.url)).status_code == 200
        await first.until(lambda: first.hangups == 1)


async def test_pool_timeout_when_every_connection_is_busy(serve: Serve) -> None:
    server = await serve(never)
    async with client(max_connections=1, timeout=5) as c, anyio.create_task_group() as tg:
        tg.start_soon(c.get, server.url)
        await server.until(lambda: server.active == 1)
        started = time.monotonic()
        with pytest.raises(httpx.PoolTimeout):
            await c.get(server.url, timeout=httpx.Timeout(5, pool=0.1))
        assert time.monotonic() - started < 0.5
        tg.cancel_scope.cancel()


async def test_cancellation_closes_the_connection_and_frees_the_slot(serve: Serve) -> None:
    calls: list[int] = []

    async def first_hangs(request: bytes, writer: asyncio.StreamWriter) -> bytes | None:
        calls.append(1)
        if len(calls) == 1:
            await asyncio.sleep(30)
        return answer()

    server = await serve(first_hangs)
    async with client(max_connections=1, timeout=5) as c:
        with anyio.move_on_after(0.1) as scope:
            await c.get(server.url)
        assert scope.cancelled_caught
        with anyio.fail_after(1):
            assert (await c.get(server.url)).status_code == 200
    assert server.connections == 2
    await server.until(lambda: server.hangups >= 1)


async def test_idle_connections_expire(serve: Serve) -> None:
    server = await serve()
    async with client(keepalive_expiry=0.05) as c:
        await c.get(server.url)
        await asyncio.sleep(0.1)
        await c.get(server.url)
    assert server.connections == 2


async def test_aclose_closes_the_connections(serve: Serve) -> None:
    server = await serve()
    async with client() as c:
        await c.get(server.url)
    await server.until(lambda: server.hangups == 1)


# -- how answers end ------------------------------------------------------------------------


async def test_chunked_answer(serve: Serve) -> None:
    chunked = answer(headers=(("Transfer-Encoding", "chunked"),), body=b"")
    chunked += b"6\r\nhello \r\n5\r\nworld\r\n0\r\n\r\n"
    server = await serve(constant(chunked))
    async with client() as c:
        for _ in range(3):
            response = await c.get(server.url)
            assert response.content == b"hello world"
            assert response.headers["transfer-encoding"] == "chunked"
            assert "content-length" not in response.headers
    assert server.connections == 1


async def test_connection_close_is_honoured(serve: Serve) -> None:
    # The server would go on reading: reusing the connection would work, but must not happen.
    server = await serve(constant(answer(headers=(("Connection", "close"),))))
    async with client() as c:
        for _ in range(2):
            assert (await c.get(server.url)).text == "ok"
    assert server.connections == 2
    await server.until(lambda: server.hangups == 2)


async def test_http10_without_keep_alive_closes(serve: Serve) -> None:
    server = await serve(constant(answer(version="HTTP/1.0")))
    async with client() as c:
        for _ in range(2):
            response = await c.get(server.url)
            assert response.http_version == "HTTP/1.0"
    assert server.connections == 2


async def test_answer_without_length_ends_at_eof(serve: Serve) -> None:
    server = await serve(
        constant(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil the end"),
        hang_up_after_answer=True,
    )
    async with client() as c:
        assert (await c.get(server.url)).content == b"until the end"


async def test_answer_to_head_has_no_body(serve: Serve) -> None:
    server = await serve(constant(answer(headers=(("Content-Length", "5"),), body=b"")))
    async with client() as c:
        response = await c.head(server.url)
        assert response.status_code == 200
        assert response.content == b""


async def test_informational_answer_is_skipped(serve: Serve) -> None:
    server = await serve(constant(b"HTTP/1.1 100 Continue\r\n\r\n" + answer(body=b"final")))
    async with client() as c:
        response = await c.post(server.url, content=b"x")
        assert (response.status_code, response.content) == (200, b"final")


async def test_statuses_reasons_and_headers_pass_through(serve: Serve) -> None:
    answers = {
        b"/limited": answer(429, b"{}", (("Retry-After", "7"),), "Too Many Requests"),
        b"/auth": answer(
            401,
            b"no",
            (("WWW-Authenticate", 'Bearer error="invalid_token"'), ("Set-Cookie", "a=1")),
            "Unauthorized",
        ),
    }

    async def route(request: bytes, writer: asyncio.StreamWriter) -> bytes:
        return answers[request.split(b" ")[1]]

    server = await serve(route)
    async with client() as c:
        limited = await c.post(server.url + "/limited", content=b"{}")
        assert limited.status_code == 429
        assert limited.reason_phrase == "Too Many Requests"
        assert limited.headers["Retry-After"] == "7"
        assert limited.http_version == "HTTP/1.1"
        denied = await c.get(server.url + "/auth")
        assert (denied.status_code, denied.content) == (401, b"no")
        assert denied.headers["www-authenticate"] == 'Bearer error="invalid_token"'
        assert denied.headers.raw[:2] == [
            (b"WWW-Authenticate", b'Bearer error="invalid_token"'),
            (b"Set-Cookie", b"a=1"),
        ]


async def test_auth_flow_retries_through_the_transport(serve: Serve) -> None:
    class RetryOn401(httpx.Auth):
        def auth_flow(
            self, request: httpx.Request
        ) -> Generator[httpx.Request, httpx.Response, None]:
            response = yield request
            if response.status_code == 401:
                request.headers["Authorization"] = "Bearer fresh"
                yield request

    async def check(request: bytes, writer: asyncio.StreamWriter) -> bytes:
        ok = b"\r\nAuthorization: Bearer fresh\r\n" in request
        return answer(200) if ok else answer(401, reason="Unauthorized")

    server = await serve(check)
    async with client() as c:
        response = await c.post(server.url, content=b"{}", auth=RetryOn401())
        assert response.status_code == 200
    assert len(server.requests) == 2
    assert server.connections == 1


async def test_https_verifies_the_server(serve: Serve, tmp_path: Path) -> None:
    (tmp_path / "key.pem").write_text(TLS_KEY)
    (tmp_path / "cert.pem").write_text(TLS_CERT)
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    server = await serve(tls=server_context)
    url = server.url.replace("http://", "https://")
    trusting = ssl.create_default_context(cadata=TLS_CERT)
    async with client(ssl_context=trusting) as c:
        for _ in range(2):
            assert (await c.post(url, content=b"secret")).content == b"secret"
    assert server.connections == 1
    # The default context does not know the certificate. The server's side of the failed
    # handshake reaches the loop's exception handler in debug mode: ignore it there.
    loop = asyncio.get_running_loop()
    handler = loop.get_exception_handler()
    loop.set_exception_handler(lambda loop, context: None)
    try:
        async with client() as c:
            with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
                await c.get(url)
        await asyncio.sleep(0.05)
    finally:
        loop.set_exception_handler(handler)


# -- faults ---------------------------------------------------------------------------------


async def test_server_closing_an_idle_connection(serve: Serve) -> None:
    server = await serve(hang_up_after_answer=True)
    async with client() as c:
        assert (await c.post(server.url, content=b"one")).content == b"one"
        await asyncio.sleep(0.05)  # the hang-up reaches the client
        assert (await c.post(server.url, content=b"two")).content == b"two"
    assert server.connections == 2


async def test_connection_refused() -> None:
    async with client() as c:
        with pytest.raises(httpx.ConnectError):
            await c.get(f"http://127.0.0.1:{free_port()}/")


@pytest.mark.skipif(sys.platform != "linux", reason="relies on Linux dropping SYNs")
async def test_connect_timeout() -> None:
    # A listen backlog of 0 holds one connection: the SYN of the next one is dropped.
    with socket.socket() as listener, socket.socket() as filler:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        filler.connect(listener.getsockname())
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/"
        async with client(timeout=0.2) as c:
            started = time.monotonic()
            with pytest.raises(httpx.ConnectTimeout):
                await c.get(url)
            assert time.monotonic() - started < 0.6


async def test_no_answer_is_a_read_timeout(serve: Serve) -> None:
    server = await serve(never)
    async with client(timeout=0.2) as c:
        started = time.monotonic()
        with pytest.raises(httpx.ReadTimeout):
            await c.post(server.url, content=b"{}")
        assert 0.19 < time.monotonic() - started < 0.6


async def test_the_read_timeout_bounds_each_wait_not_the_whole_answer(serve: Serve) -> None:
    async def drip(request: bytes, writer: asyncio.StreamWriter) -> bytes:
        data = answer(body=b"abcde")
        head, body = data[:-5], data[-5:]
        writer.write(head)
        for byte in body[:-1]:
            await asyncio.sleep(0.06)
            writer.write(bytes([byte]))
        await asyncio.sleep(0.06)
        return body[-1:]

    server = await serve(drip)
    async with client(timeout=0.15) as c:
        assert (await c.get(server.url)).content == b"abcde"


async def test_hang_up_without_an_answer(serve: Serve) -> None:
    server = await serve(constant(None))
    async with client() as c:
        with pytest.raises(httpx.RemoteProtocolError, match="without sending a response"):
            await c.get(server.url)


async def test_hang_up_in_the_middle_of_the_answer(serve: Serve) -> None:
    partial = answer(body=b"x" * 100)[:-50]
    server = await serve(constant(partial), hang_up_after_answer=True)
    async with client() as c:
        with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
            await c.get(server.url)
        # The next request gets a new connection.
        server.hang_up_after_answer = False
        server.respond = echo
        assert (await c.post(server.url, content=b"again")).content == b"again"


async def test_garbage_answer(serve: Serve) -> None:
    server = await serve(constant(b"SSH-2.0-OpenSSH_9.6\r\n\r\n"))
    async with client() as c:
        with pytest.raises(httpx.RemoteProtocolError):
            await c.get(server.url)
        await server.until(lambda: server.hangups == 1)


async def test_a_second_answer_to_one_request_drops_the_connection(serve: Serve) -> None:
    server = await serve(constant(answer(body=b"one") + answer(body=b"two")))
    async with client() as c:
        assert (await c.get(server.url)).content == b"one"
        assert (await c.get(server.url)).content == b"one"
    assert server.connections == 2


@pytest.mark.parametrize("chunked", [False, True])
async def test_a_body_over_1_mib_is_refused(serve: Serve, chunked: bool) -> None:
    big = b"x" * (MAX_BODY + 1)
    if chunked:
        data = answer(headers=(("Transfer-Encoding", "chunked"),), body=b"")
        data += b"%x\r\n%s\r\n0\r\n\r\n" % (len(big), big)
    else:
        data = answer(body=big)
    server = await serve(constant(data))
    async with client() as c:
        with pytest.raises(httpx.RemoteProtocolError, match="over"):
            await c.get(server.url)
    assert server.connections == 1


async def test_a_body_of_exactly_1_mib_is_read(serve: Serve) -> None:
    server = await serve(constant(answer(body=b"y" * MAX_BODY)))
    async with client() as c:
        assert len((await c.get(server.url)).content) == MAX_BODY


async def test_cr_lf_in_a_header_is_refused(serve: Serve) -> None:
    server = await serve()
    async with client() as c:
        with pytest.raises(httpx.LocalProtocolError):
            await c.get(server.url, headers={"X-Note": "a\r\nInjected: 1"})
    assert server.connections == 0


# -- construction ---------------------------------------------------------------------------


def test_make_transport_falls_back_without_httptools(monkeypatch: pytest.MonkeyPatch) -> None:
    assert isinstance(make_transport(5), Http1Transport)
    monkeypatch.setattr(http1, "httptools", None)
    assert make_transport(5) is None
