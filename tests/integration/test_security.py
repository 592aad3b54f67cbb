"""Hostile input and security (issue 5): no 500, no injection, no leaks, bounded resources.

Real PostgreSQL, real HTTP on 127.0.0.1, the Cognigy stand-in. The memory checks watch
the resident set of a real ``serve`` child process with psutil.
"""

from __future__ import annotations

import contextlib
import json
import time
import tomllib
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Any

import anyio
import asyncpg
import httpx
import psutil
import pytest
import structlog
from structlog.testing import capture_logs

from cognigy_offload.logs import _redact
from cognigy_offload.sim import Fault, SimState
from cognigy_offload.store import TABLE
from cognigy_offload.worker import QUERY_FAILED_DETAIL
from tests.integration.conftest import AUTH, CLIENT_SECRET, SECRETS, WEBHOOK_TOKEN, Process, body

pytestmark = pytest.mark.anyio

WEBHOOK = "/webhook/cognigy-trigger"
MB = 1024 * 1024
NEXT_TOKEN = "rotated-webhook-token-fedcba9876543210"
API_KEY = SECRETS.api_key
ERROR_KEYS = {"error", "detail", "field"}
# What the production log pipeline does before rendering (logs.configure), so captured
# entries are what would be written.
LOG_PIPELINE = [
    structlog.contextvars.merge_contextvars,
    structlog.processors.add_log_level,
    _redact,
    structlog.processors.format_exc_info,
]
EVIL_QUERIES = {
    # First: it would leave its pooled connection read-write for the ones after it.
    "evil_session": {
        "sql": "SELECT set_config('default_transaction_read_only', 'off', false) AS x"
    },
    "evil_delete": {"sql": "DELETE FROM transactions RETURNING id"},
    "evil_cte": {
        "sql": "WITH changed AS (UPDATE transactions SET amount = 0 RETURNING 1) "
        "SELECT count(*) AS n FROM changed"
    },
    "evil_drop": {"sql": "DROP TABLE transactions"},
    "evil_read_write": {"sql": "SELECT set_config('transaction_read_only', 'off', true) AS x"},
}


# -- helpers ----------------------------------------------------------------------------


async def fetchval(dsn: str, sql: str, *args: Any) -> Any:
    """One value from the test database."""
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetchval(sql, *args)
    finally:
        await conn.close()


async def job_rows(dsn: str) -> int:
    """How many jobs the job table holds."""
    return int(await fetchval(dsn, f"SELECT count(*) FROM {TABLE}"))


async def transactions_fingerprint(dsn: str) -> str:
    """A digest of every row of the demo table, with the row count."""
    digest = await fetchval(
        dsn,
        "SELECT count(*) || ':' || md5(string_agg(t::text, ',' ORDER BY id)) FROM transactions t",
    )
    assert isinstance(digest, str) and digest.startswith("20000:")
    return digest


def assert_error_shape(response: httpx.Response, status: int, field: str | None = "*") -> None:
    """The answer has ``status`` and exactly the JSON error shape of SPEC §2."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json"), response.headers
    payload = response.json()
    assert set(payload) == ERROR_KEYS, payload
    assert isinstance(payload["error"], str) and payload["error"]
    assert isinstance(payload["detail"], str) and payload["detail"]
    if field != "*":
        assert payload["field"] == field, payload


def rss_bytes(pid: int) -> int:
    """The resident set size of process ``pid``."""
    return int(psutil.Process(pid).memory_info().rss)


@dataclass
class RssWatch:
    """The peak resident set of a process, sampled while a block runs."""

    pid: int
    baseline: int
    peak: int

    @property
    def growth_mb(self) -> float:
        """Peak over baseline, in MiB."""
        return (self.peak - self.baseline) / MB

    async def sample(self, period_s: float = 0.02) -> None:
        """Sample until cancelled."""
        while True:
            self.peak = max(self.peak, rss_bytes(self.pid))
            await anyio.sleep(period_s)


@contextlib.asynccontextmanager
async def watching_rss(pid: int, period_s: float = 0.02) -> AsyncIterator[RssWatch]:
    """Track the peak RSS of ``pid`` while the block runs."""
    baseline = rss_bytes(pid)
    watch = RssWatch(pid, baseline, baseline)
    async with anyio.create_task_group() as tg:
        tg.start_soon(watch.sample, period_s)
        try:
            yield watch
        finally:
            tg.cancel_scope.cancel()
    watch.peak = max(watch.peak, rss_bytes(pid))


@dataclass
class RawResponse:
    """One HTTP answer as read off the socket."""

    status: int
    headers: dict[str, str]
    body: bytes


class RawHttp:
    """A minimal HTTP/1.1 client on one keep-alive connection: exact bytes, cheap requests."""

    def __init__(self, stream: anyio.abc.ByteStream) -> None:
        self.stream = stream
        self.buffer = b""

    @classmethod
    @contextlib.asynccontextmanager
    async def connect(cls, port: int) -> AsyncIterator[RawHttp]:
        """A connection to 127.0.0.1:``port``."""
        stream = await anyio.connect_tcp("127.0.0.1", port)
        async with stream:
            yield cls(stream)

    async def send(self, data: bytes) -> None:
        """Write bytes as they are."""
        await self.stream.send(data)

    async def response(self) -> RawResponse | None:
        """The next answer; None if the server closed the connection before a whole one."""
        while b"\r\n\r\n" not in self.buffer:
            if not await self._fill():
                return None
        head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        while len(self.buffer) < length:
            if not await self._fill():
                return None
        payload, self.buffer = self.buffer[:length], self.buffer[length:]
        return RawResponse(int(lines[0].split()[1]), headers, payload)

    async def _fill(self) -> bool:
        try:
            self.buffer += await self.stream.receive(65536)
        except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
            return False
        return True


def request_bytes(
    path: str, payload: bytes, headers: dict[str, str] | None = None, method: str = "POST"
) -> bytes:
    """A complete HTTP/1.1 request with a Content-Length."""
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"]
    merged = {"Content-Type": "application/json", **AUTH, **(headers or {})}
    merged.setdefault("Content-Length", str(len(payload)))
    lines += [f"{name}: {value}" for name, value in merged.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + payload


async def as_async(chunks: Iterable[bytes] | AsyncIterable[bytes]) -> AsyncIterator[bytes]:
    """Iterate plain or async chunks alike."""
    if isinstance(chunks, AsyncIterable):
        async for chunk in chunks:
            yield chunk
    else:
        for chunk in chunks:
            yield chunk


async def push_body(
    port: int, head: bytes, chunks: Iterable[bytes] | AsyncIterable[bytes]
) -> tuple[int | None, int]:
    """Send ``head`` then every chunk, ignoring the answer, until done or the server stops.

    Returns the answer's status (None: closed without one) and how many body bytes went
    out. A server that stops reading makes the send block: it gets 3 s after its answer.
    """
    sent = 0
    answer: RawResponse | None = None
    async with RawHttp.connect(port) as conn:

        async def sender(done: anyio.Event) -> None:
            nonlocal sent
            with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                await conn.send(head)
                async for chunk in as_async(chunks):
                    await conn.send(chunk)
                    sent += len(chunk)
            done.set()

        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                done = anyio.Event()
                tg.start_soon(sender, done)
                answer = await conn.response()
                with anyio.move_on_after(3):
                    await done.wait()
                tg.cancel_scope.cancel()
    return (answer.status if answer is not None else None), sent


def chunked(total_bytes: int, chunk_bytes: int = 64 * 1024) -> Iterable[bytes]:
    """``total_bytes`` of a JSON-looking body in chunked transfer coding, never held whole."""
    data = b'{"userId": "' + b"u" * (chunk_bytes - 12)
    frame = f"{len(data):x}\r\n".encode() + data + b"\r\n"
    for _ in range(total_bytes // len(data)):
        yield frame
    yield b"0\r\n\r\n"


def plain(total_bytes: int, chunk_bytes: int = 64 * 1024) -> Iterable[bytes]:
    """``total_bytes`` of raw body bytes, chunk by chunk."""
    data = b"x" * chunk_bytes
    for _ in range(total_bytes // chunk_bytes):
        yield data


# -- 1. authentication ------------------------------------------------------------------

WRONG_CREDENTIALS: list[dict[str, str]] = [
    {},
    {"Authorization": "Bearer wrong-token-0123456789abcdef"},
    {"Authorization": f"Bearer {WEBHOOK_TOKEN[:-1]}"},
    {"Authorization": f"Bearer {WEBHOOK_TOKEN}x"},
    {"Authorization": f"Bearer {WEBHOOK_TOKEN.upper()}"},
    {"Authorization": f"Basic {WEBHOOK_TOKEN}"},
    {"Authorization": WEBHOOK_TOKEN},
    {"Authorization": "Bearer"},
    {"Authorization": ""},
    {"X-Webhook-Token": ""},
    {"X-Webhook-Token": "wrong"},
    {"X-Webhook-Token": f"Bearer {WEBHOOK_TOKEN}"},
    {"X-Api-Key": WEBHOOK_TOKEN},
    {"Cookie": f"token={WEBHOOK_TOKEN}"},
]


async def test_protected_routes_answer_401_before_anything_else(
    service_factory: Any, database: str
) -> None:
    """Without the right token every non-operational request is a 401 in the JSON shape,
    also where the answer would otherwise be 404, 405, 413, 415 or 422; nothing is stored."""
    async with service_factory() as svc, httpx.AsyncClient(base_url=svc.url) as stranger:
        requests: list[tuple[str, str, dict[str, Any]]] = [
            ("POST", WEBHOOK, {"json": body()}),
            ("POST", WEBHOOK, {"content": b"{not json"}),
            ("POST", WEBHOOK, {"json": body(query="nope")}),
            ("POST", WEBHOOK, {"content": b"x", "headers": {"Content-Type": "text/plain"}}),
            ("POST", WEBHOOK, {"content": b"u" * 200_000}),
            ("GET", WEBHOOK, {}),
            ("DELETE", WEBHOOK, {}),
            ("GET", f"/tasks/{uuid.uuid4()}", {}),
            ("GET", "/tasks/not-a-uuid", {}),
            ("DELETE", f"/tasks/{uuid.uuid4()}", {}),
            ("GET", "/no/such/route", {}),
            ("GET", "/webhook/cognigy-trigger/../../tasks", {}),
        ]
        for method, path, kwargs in requests:
            for credentials in WRONG_CREDENTIALS:
                headers = {**kwargs.get("headers", {}), **credentials}
                response = await stranger.request(method, path, **{**kwargs, "headers": headers})
                assert_error_shape(response, 401, None)
                assert response.json()["error"] == "unauthorized"
                assert response.headers["www-authenticate"] == "Bearer"
        # With the token the same requests get their own answers (so 401 came first).
        assert (await svc.client.get("/no/such/route")).status_code == 404
        assert (await svc.client.get(WEBHOOK)).status_code == 405
        assert (await svc.client.get("/tasks/not-a-uuid")).status_code == 404
        both_ways = [
            {"Authorization": f"Bearer {WEBHOOK_TOKEN}"},
            {"Authorization": f"bearer {WEBHOOK_TOKEN}"},
            {"X-Webhook-Token": WEBHOOK_TOKEN},
        ]
        for credentials in both_ways:
            accepted = await stranger.post(WEBHOOK, json=body(), headers=credentials)
            assert accepted.status_code == 202, accepted.text
            task = await stranger.get(accepted.headers["location"], headers=credentials)
            assert task.status_code == 200
            anonymous = await stranger.get(accepted.headers["location"])
            assert_error_shape(anonymous, 401, None)
            assert accepted.json()["taskId"] not in anonymous.text
    assert await job_rows(database) == len(both_ways)


async def test_operational_routes_need_no_token(service_factory: Any) -> None:
    """/healthz, /readyz, /metrics and /openapi.json answer a caller without a token."""
    async with service_factory() as svc, httpx.AsyncClient(base_url=svc.url) as stranger:
        for path in ("/healthz", "/readyz", "/metrics", "/openapi.json"):
            assert (await stranger.get(path)).status_code == 200, path
        # A public path is public for its own methods only: the rest are JSON 405s.
        assert_error_shape(await stranger.post("/healthz"), 405, None)
        assert_error_shape(await stranger.delete("/metrics"), 405, None)


@pytest.mark.parametrize("token", ["", "change-me", "short-token"])
async def test_serve_refuses_to_listen_beyond_loopback_with_a_weak_token(
    process_factory: Any, token: str
) -> None:
    """`serve` on 0.0.0.0 with an empty, placeholder or short webhook token stops at
    start-up (exit 2), naming the key and not the token."""
    process: Process = process_factory(server={"host": "0.0.0.0"})
    process.env["COGNIGY_OFFLOAD_WEBHOOK_TOKEN"] = token
    with pytest.raises(RuntimeError, match="serve exited with 2") as caught:
        await process.start()
    assert "server.webhook_token_env" in str(caught.value)
    if token:
        assert token not in process.output()


# -- 2. the error contract --------------------------------------------------------------


async def test_hostile_bodies_get_exactly_the_spec_codes(
    service_factory: Any, database: str
) -> None:
    """400 unparsable, 413 too large (also chunked), 415 not JSON, 422 naming the field,
    405 other methods: always the JSON error shape, never a 5xx, and no job stored."""
    limit = 150_000
    async with service_factory(server={"max_body_bytes": limit}) as svc:
        client = svc.client

        async def post_raw(content: Any, content_type: str = "application/json") -> httpx.Response:
            return await client.post(
                WEBHOOK, content=content, headers={"Content-Type": content_type}
            )

        valid = json.dumps(body()).encode()
        for broken in (valid[:-1], valid[:17], b"", b"\xff" + valid, valid.replace(b"u", b"\xc3")):
            assert_error_shape(await post_raw(broken), 400, None)

        for content_type in (
            "text/plain",
            "",
            "application/x-www-form-urlencoded",
            "multipart/form-data; boundary=x",
            "application/jsonp",
            "json",
        ):
            assert_error_shape(await post_raw(valid, content_type), 415, None)
        assert (await post_raw(valid, "application/json; charset=utf-8")).status_code == 202

        too_big = b'{"userId": "' + b"u" * limit + b'", "variables": {}}'
        assert_error_shape(await post_raw(too_big), 413, None)

        async def stream() -> AsyncIterator[bytes]:
            for _ in range(40):  # 40 x 8 KiB chunks, no Content-Length
                yield b" " * 8192

        streamed = await post_raw(stream())
        assert_error_shape(streamed, 413, None)

        deep = '{"a":' * 20_000 + "1" + "}" * 20_000
        cases: list[tuple[Any, str]] = [
            (body(userId=None), "$.userId"),
            (body(userId=""), "$.userId"),
            (body(userId=123), "$.userId"),
            (body(userId=10**30), "$.userId"),
            (body(sessionId=None), "$.sessionId"),
            (body(sessionId=""), "$.sessionId"),
            (body() | {"variables": None}, "$.variables"),
            (body() | {"variables": "customer_segment=enterprise"}, "$.variables"),
            (body(query=""), "$.query"),
            (body(query="revenue; DROP TABLE transactions"), "$.query"),
            (body(query="REVENUE"), "$.query"),
            (body(variables={"customer_segment": 10**30}), "$.variables.customer_segment"),
            (body(variables={"customer_segment": None}), "$.variables.customer_segment"),
            (body(variables={"customer_segment": ""}), None),  # empty text is a value
            (body(variables={"date_range": ""}), "$.variables.date_range"),
            (body(variables={"date_range": "2024-02-30_to_2024-03-01"}), "$.variables.date_range"),
            (body(variables={"x": {f"k{i}": 0 for i in range(10_000)}}), None),
            (body() | {"variables": {f"k{i}": 0 for i in range(10_000)}}, "$.variables"),
            (body() | {"extra": {f"k{i}": 0 for i in range(10_000)}}, None),
            ([body()], "$"),
        ]
        for payload, field in cases:
            response = await client.post(WEBHOOK, json=payload)
            if field is None:
                assert response.status_code == 202, response.text
            else:
                assert_error_shape(response, 422, field)
        accepted = sum(1 for _, f in cases if f is None) + 1
        deep_body = ('{"userId": "u", "sessionId": "s", "variables": {"a": ' + deep + "}}").encode()
        assert_error_shape(await post_raw(deep_body), 422, "$.variables")
        huge_int = b'{"userId": "u", "variables": {"n": ' + b"9" * 5000 + b"}}"
        response = await post_raw(huge_int)
        assert_error_shape(response, 422)
        assert response.json()["field"].startswith("$.variables")

        for method in ("GET", "PUT", "PATCH", "DELETE", "OPTIONS"):
            assert_error_shape(await client.request(method, WEBHOOK), 405, None)
        assert_error_shape(await client.post(f"/tasks/{uuid.uuid4()}"), 405, None)
        assert_error_shape(await client.get("/nope"), 404, None)
        assert_error_shape(await client.get(f"/tasks/{uuid.uuid4()}"), 404, "$.taskId")
        assert_error_shape(await client.get("/tasks/" + "f" * 5000), 404, "$.taskId")
        assert_error_shape(await client.get("/tasks/%00"), 404, "$.taskId")
    assert await job_rows(database) == accepted


async def test_huge_and_lying_bodies_are_never_read_into_memory(
    process_factory: Any, database: str
) -> None:
    """A 50 MB body, chunked without Content-Length or with a lying one, is refused while
    streaming (413, or 400 for the bytes a short Content-Length frames) and the serving
    process's resident memory stays flat."""
    process: Process = process_factory()
    await process.start()
    assert process.proc is not None
    pid = process.proc.pid
    size = 50 * MB
    head = "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    auth = f"Authorization: Bearer {WEBHOOK_TOKEN}\r\n"
    scenarios: list[tuple[str, bytes, Iterable[bytes], set[int | None]]] = [
        (
            "chunked, no Content-Length",
            (head + auth + "Transfer-Encoding: chunked\r\n\r\n").format(path=WEBHOOK).encode(),
            chunked(size),
            {413},
        ),
        (
            "declares 50 MB",
            (head + auth + f"Content-Length: {size}\r\n\r\n").format(path=WEBHOOK).encode(),
            plain(size),
            {413},
        ),
        (
            "declares 100 bytes, sends 50 MB",
            (head + auth + "Content-Length: 100\r\n\r\n").format(path=WEBHOOK).encode(),
            plain(size),
            {400, None},  # None: the server hung up on the garbage that followed
        ),
        (
            "declares 60000 bytes, sends 50 MB",
            (head + auth + "Content-Length: 60000\r\n\r\n").format(path=WEBHOOK).encode(),
            plain(size),
            {400, None},  # None: the server hung up on the garbage that followed
        ),
        (
            "no token, 50 MB chunked",
            (head + "Transfer-Encoding: chunked\r\n\r\n").format(path=WEBHOOK).encode(),
            chunked(size),
            {401},
        ),
    ]
    # Warm up the code paths once so the baseline includes what any first request allocates.
    async with httpx.AsyncClient(base_url=process.url, headers=AUTH) as client:
        for _ in range(3):
            await client.post(WEBHOOK, content=b"x" * 70_000)
    for name, request_head, chunks, statuses in scenarios:
        started = time.monotonic()
        async with watching_rss(pid, period_s=0.002) as watch:
            status, sent = await push_body(process.port, request_head, chunks)
        print(
            f"{name}: answered {status} after {sent / MB:.1f} MB sent in "
            f"{time.monotonic() - started:.2f} s; RSS {watch.baseline / MB:.1f} MB, "
            f"peak +{watch.growth_mb:.1f} MB"
        )
        assert status in statuses, name
        assert watch.growth_mb < 16, name
    async with httpx.AsyncClient(base_url=process.url) as client:
        assert (await client.get("/healthz")).status_code == 200
    assert await job_rows(database) == 0


# -- 4. SQL injection -------------------------------------------------------------------

HOSTILE_SEGMENTS = [
    "enterprise' OR '1'='1",
    "enterprise' OR 1=1 --",
    "'; DROP TABLE transactions; --",
    "enterprise'; DELETE FROM transactions; --",
    "$1",
    "$2::text) OR (1=1",
    "enterprise\\' OR \\'1\\'=\\'1",
    "\\x00",
    "%' OR segment LIKE '%",
    "e" * 10_000,
]


async def test_sql_in_variables_is_bound_as_a_value(service_factory: Any, database: str) -> None:
    """Hostile text is a parameter value: the aggregate over no matching rows comes back
    (count 0), a NUL is a 422 naming the field, and the transactions table is unchanged."""
    before = await transactions_fingerprint(database)
    async with service_factory(queue={"workers": 4}) as svc:
        for segment in HOSTILE_SEGMENTS:
            response = await svc.post(
                body(variables={"customer_segment": segment}), headers={"Prefer": "wait=5"}
            )
            assert response.status_code in (200, 202), response.text
            task_id = response.json()["taskId"]
            doc = (
                response.json()
                if response.status_code == 200
                else (await svc.wait_status(task_id, {"delivered", "failed", "answered"}))
            )
            assert doc["status"] in ("answered", "delivered"), doc
            assert doc["result"] == {"count": 0, "total": 0}, segment[:40]
        for segment in ("enterprise\x00", "\x00' OR '1'='1", "a" * 5000 + "\x00"):
            refused = await svc.post(body(variables={"customer_segment": segment}))
            assert_error_shape(refused, 422, "$.variables.customer_segment")
            assert "NUL" in refused.json()["detail"]
        too_long = await svc.post(body(variables={"customer_segment": "e" * 10_001}))
        assert_error_shape(too_long, 422, "$.variables.customer_segment")
        for date_range in ("2024-01-01_to_2024-12-31' OR '1'='1", "2024-01-01'; --_to_2024-12-31"):
            refused = await svc.post(body(variables={"date_range": date_range}))
            assert_error_shape(refused, 422, "$.variables.date_range")
        # Control: a real segment still counts rows, so the zero counts above mean something.
        control = await svc.post(body(), headers={"Prefer": "wait=5"})
        assert control.status_code == 200 and control.json()["result"]["count"] > 0
    assert await transactions_fingerprint(database) == before
    assert await job_rows(database) == len(HOSTILE_SEGMENTS) + 1


async def test_a_malicious_catalog_entry_cannot_write(service_factory: Any, database: str) -> None:
    """Queries run READ ONLY: DELETE, a writing CTE, DROP TABLE, switching the transaction
    to read-write or the session's default to read-write fail the job with a generic query
    error; the cause goes to the log under the taskId; the table is unchanged and the
    service keeps working. One query connection: the one the session switch tainted must
    not serve the DELETE after it."""
    before = await transactions_fingerprint(database)
    failed: dict[str, str] = {}
    with capture_logs(processors=LOG_PIPELINE) as entries:
        async with service_factory(queries=EVIL_QUERIES, database={"pool_max": 2}) as svc:
            for name in EVIL_QUERIES:
                response = await svc.post(body(query=name))
                assert response.status_code == 202, response.text
                task_id = response.json()["taskId"]
                doc = await svc.wait_status(task_id, {"failed", "delivered", "answered"})
                assert doc["status"] == "failed", doc
                assert doc["error"] == {
                    "kind": "query",
                    "detail": QUERY_FAILED_DETAIL,
                    "httpStatus": None,
                }
                assert doc["result"] is None
                failed[task_id] = name
            control = await svc.post(body(), headers={"Prefer": "wait=5"})
            assert control.status_code == 200, control.text
    assert await transactions_fingerprint(database) == before
    logged = {e.get("task_id"): e for e in entries if e["event"] == "job.query_failed"}
    for task_id in failed:
        assert task_id in logged, f"no job.query_failed log line for {failed[task_id]}"
        assert "read-only" in logged[task_id]["error"] or "read-write" in logged[task_id]["error"]


# -- 5. no leaks ------------------------------------------------------------------------


async def final_document(
    client: httpx.AsyncClient, location: str, token: str, timeout_s: float = 20
) -> dict[str, Any]:
    """Poll a task until it reaches a final status."""
    with anyio.fail_after(timeout_s):
        while True:
            response = await client.get(location, headers={"X-Webhook-Token": token})
            doc: dict[str, Any] = response.json()
            if doc["status"] in ("delivered", "answered", "failed", "expired"):
                return doc
            await anyio.sleep(0.05)


def assert_no_secret(texts: Iterable[str], secrets: Iterable[str]) -> None:
    """None of ``secrets`` occurs in any of ``texts``."""
    needles = [s for s in secrets if s]
    for text in texts:
        for needle in needles:
            assert needle not in text, f"a secret ({needle[:4]}...) leaked into: {text[:300]}"


async def test_no_secret_leaks_from_a_full_process_run(
    process_factory: Any, sim: tuple[SimState, str]
) -> None:
    """Through rotation (two webhook tokens), Cognigy 401 and 403 answers, a failing and a
    refusing token endpoint (echoing the client secret) and a failing query, no webhook
    token, client secret, API key or bearer token appears in the process's log output, in
    any answer body, task document or /metrics; the query error is logged with its taskId."""
    state, _ = sim
    process: Process = process_factory(queries=EVIL_QUERIES, cognigy={"max_attempts": 4})
    process.env["COGNIGY_OFFLOAD_WEBHOOK_TOKEN"] = f"{WEBHOOK_TOKEN},{NEXT_TOKEN}"
    process.env["COGNIGY_API_KEY"] = API_KEY
    await process.start()
    texts: list[str] = []
    issued: set[str] = set()
    async with httpx.AsyncClient(base_url=process.url, timeout=30) as client:

        async def run_job(payload: dict[str, Any], token: str) -> dict[str, Any]:
            response = await client.post(
                WEBHOOK, json=payload, headers={"Authorization": f"Bearer {token}"}
            )
            texts.append(response.text)
            assert response.status_code == 202, response.text
            doc = await final_document(client, response.headers["location"], token)
            issued.update(state._tokens)
            texts.append(json.dumps(doc))
            return doc

        # Rotation: the old and the new token both work.
        assert (await run_job(body(), WEBHOOK_TOKEN))["status"] == "delivered"
        assert (await run_job(body(), NEXT_TOKEN))["status"] == "delivered"
        state.add_faults(Fault(401), Fault(401))
        refused = await run_job(body(), NEXT_TOKEN)
        assert refused["error"]["kind"] == "auth" and refused["error"]["httpStatus"] == 401
        state.add_faults(Fault(403))
        forbidden = await run_job(body(), WEBHOOK_TOKEN)
        assert forbidden["error"]["kind"] == "forbidden"
        echo = {"error": "invalid_client", "error_description": f"bad secret {CLIENT_SECRET}"}
        state.add_faults(Fault(401))
        state.add_token_faults(Fault(500), Fault(400, body=echo))
        no_token = await run_job(body(), WEBHOOK_TOKEN)
        assert no_token["status"] == "failed" and no_token["error"]["kind"] == "auth"
        assert "<redacted>" in no_token["error"]["detail"]
        evil = await run_job(body(query="evil_delete"), WEBHOOK_TOKEN)
        assert evil["error"] == {"kind": "query", "detail": QUERY_FAILED_DETAIL, "httpStatus": None}
        assert (await run_job(body(), WEBHOOK_TOKEN))["status"] == "delivered"

        for headers in ({}, {"Authorization": "Bearer wrong-token-0123456789"}):
            texts.append((await client.post(WEBHOOK, json=body(), headers=headers)).text)
        bad = await client.post(WEBHOOK, json=body(userId=None), headers=AUTH)
        texts.append(bad.text)
        for path in ("/metrics", "/readyz", "/healthz", "/openapi.json", "/no-such-route"):
            texts.append((await client.get(path, headers=AUTH)).text)
    assert await process.terminate() == 0
    output = process.output()
    assert issued, "the stand-in issued no bearer token"
    assert '"job.query_failed"' in output and '"http_status":403' in output.replace(" ", "")
    assert_no_secret([output, *texts], [WEBHOOK_TOKEN, NEXT_TOKEN, CLIENT_SECRET, API_KEY, *issued])
    failure = next(json.loads(line) for line in output.splitlines() if '"job.query_failed"' in line)
    assert failure["task_id"] == evil["taskId"]
    assert "read-only" in failure["error"]


async def test_no_secret_in_logs_or_answers_with_api_key_auth(
    service_factory: Any, sim: tuple[SimState, str]
) -> None:
    """With API-key auth, Cognigy answering 401 and 403 and a failing query, the captured
    log events (after the production processors, tracebacks rendered) hold no secret."""
    state, _ = sim
    answers: list[str] = []
    with capture_logs(processors=LOG_PIPELINE) as entries:
        async with service_factory(
            cognigy={"auth": {"kind": "api_key"}}, queries=EVIL_QUERIES
        ) as svc:
            for faults, status in (
                ((), "delivered"),
                ((Fault(401),), "failed"),
                ((Fault(403),), "failed"),
            ):
                state.add_faults(*faults)
                task_id = (await svc.post()).json()["taskId"]
                doc = await svc.wait_status(task_id, {"delivered", "failed"})
                assert doc["status"] == status, doc
                answers.append(json.dumps(doc))
            task_id = (await svc.post(body(query="evil_cte"))).json()["taskId"]
            answers.append(json.dumps(await svc.wait_status(task_id, {"failed"})))
            async with httpx.AsyncClient(base_url=svc.url) as stranger:
                answers.append((await stranger.post(WEBHOOK, json=body())).text)
            answers.append((await svc.client.get("/metrics")).text)
    assert all(r.auth == "api_key" for r in state.received)
    events = {e["event"] for e in entries}
    assert {"job.query_failed", "job.failed", "job.delivered"} <= events, events
    assert_no_secret([repr(e) for e in entries] + answers, [WEBHOOK_TOKEN, CLIENT_SECRET, API_KEY])
    failure = next(e for e in entries if e["event"] == "job.query_failed")
    assert failure["task_id"] == task_id and "read-only" in failure["error"]


# -- 6. resource limits -----------------------------------------------------------------


async def test_a_flood_gets_503s_with_retry_after_and_memory_stays_bounded(
    process_factory: Any, sim: tuple[SimState, str], database: str
) -> None:
    """20,000 webhooks from 64 keep-alive connections against a queue of 100 and a slow
    Cognigy: the overflow gets 503 + Retry-After at once, the process's memory and its
    PostgreSQL connections stay bounded, and every job that got a 202 is delivered."""
    state, _ = sim
    total, concurrency = 20_000, 64
    process: Process = process_factory(
        queue={"capacity": 100, "workers": 4},
        cognigy={"rate_limit_per_minute": 1_000_000},
    )
    await process.start()
    assert process.proc is not None
    pool_max = tomllib.loads(process.config_path.read_text())["database"]["pool_max"]
    request = request_bytes(WEBHOOK, json.dumps(body()).encode())
    statuses: dict[int, int] = {}
    accepted: list[str] = []
    without_retry_after = 0
    issued = 0

    async def client_loop(limit: int) -> None:
        nonlocal issued, without_retry_after
        async with RawHttp.connect(process.port) as conn:
            while issued < limit:
                issued += 1
                await conn.send(request)
                answer = await conn.response()
                assert answer is not None, "the server hung up"
                statuses[answer.status] = statuses.get(answer.status, 0) + 1
                if answer.status == 202:
                    accepted.append(json.loads(answer.body)["taskId"])
                elif answer.status == 503 and not answer.headers.get("retry-after", "").isdigit():
                    without_retry_after += 1

    async def flood(limit: int) -> None:
        async with anyio.create_task_group() as tg:
            for _ in range(concurrency):
                tg.start_soon(client_loop, limit)

    # Warm up at full concurrency (Python's allocator, connection buffers), then measure.
    await flood(1_000)
    await wait_delivered(database, accepted, timeout_s=30)
    warm_up_accepted = len(accepted)
    statuses.clear()
    state.slowness_s = 0.05  # 4 workers x 20 deliveries/s: the queue fills at once
    started = time.monotonic()
    most_connections = 0

    async def count_connections() -> None:
        nonlocal most_connections
        conn = await asyncpg.connect(database)
        try:
            while True:
                count = await conn.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND application_name = 'cognigy-offload'"
                )
                most_connections = max(most_connections, count)
                await anyio.sleep(0.1)
        finally:
            with anyio.CancelScope(shield=True):
                await conn.close()

    with anyio.fail_after(90):
        async with (
            watching_rss(process.proc.pid, period_s=0.1) as watch,
            anyio.create_task_group() as sampler,
        ):
            sampler.start_soon(count_connections)
            await flood(total + 1_000)
            sampler.cancel_scope.cancel()
    flood_s = time.monotonic() - started
    state.slowness_s = 0.0
    await wait_delivered(database, accepted, timeout_s=60)
    print(
        f"flood: {total} requests in {flood_s:.1f} s ({total / flood_s:.0f}/s), answers "
        f"{statuses}; RSS {watch.baseline / MB:.1f} MB, peak +{watch.growth_mb:.1f} MB; "
        f"at most {most_connections} PostgreSQL connections"
    )
    assert set(statuses) <= {202, 503}, statuses
    assert sum(statuses.values()) == total
    assert statuses.get(503, 0) > total // 2 and without_retry_after == 0
    assert statuses.get(202, 0) >= 100  # at least the queue's capacity got in
    assert await job_rows(database) == len(accepted) == warm_up_accepted + statuses[202]
    assert watch.growth_mb < 40
    assert 0 < most_connections <= pool_max


async def wait_delivered(dsn: str, task_ids: list[str], timeout_s: float) -> None:
    """Wait until every job in ``task_ids`` is delivered."""
    ids = [uuid.UUID(t) for t in task_ids]
    with anyio.fail_after(timeout_s):
        while True:
            done = await fetchval(
                dsn,
                f"SELECT count(*) FROM {TABLE} WHERE id = ANY($1) AND status = 'delivered'",
                ids,
            )
            if done == len(ids):
                return
            await anyio.sleep(0.2)


async def test_inline_waits_are_bounded(service_factory: Any) -> None:
    """With max_inline_waits = 4, at most 4 callers wait for their result at once; the
    others get their 202 without waiting."""
    slow = {
        "sql": "SELECT $1::text AS segment, pg_sleep(0.3)::text AS slept",
        "params": ["customer_segment"],
    }
    async with service_factory(
        server={"max_inline_waits": 4}, queue={"workers": 4}, queries={"slow": slow}
    ) as svc:
        most = 0
        statuses: list[int] = []

        async def watch() -> None:
            nonlocal most
            while True:
                most = max(most, len(svc.service.waiters))
                await anyio.sleep(0.005)

        async def call(index: int) -> None:
            payload = body(query="slow", variables={"customer_segment": f"s{index}"})
            response = await svc.post(payload, headers={"Prefer": "wait=5"})
            statuses.append(response.status_code)

        with anyio.fail_after(30):
            async with anyio.create_task_group() as outer:
                outer.start_soon(watch)
                async with anyio.create_task_group() as tg:
                    for index in range(20):
                        tg.start_soon(call, index)
                outer.cancel_scope.cancel()
    assert most <= 4
    assert 1 <= statuses.count(200) <= 4
    assert statuses.count(202) == 20 - statuses.count(200)


# -- found by the fuzzer ----------------------------------------------------------------


async def test_an_idempotency_conflict_does_not_refuse_the_jobs_committed_with_it(
    service_factory: Any, database: str
) -> None:
    """A 409 for one webhook in a group commit leaves the other webhooks of that commit
    accepted: each gets its 202, and no refused request leaves a job behind."""
    async with service_factory(queue={"group_commit_ms": 100}) as svc:
        first = await svc.post(body(), headers={"Idempotency-Key": "k-1"})
        assert first.status_code == 202
        answers: list[int] = []

        async def post(payload: dict[str, Any], headers: dict[str, str]) -> None:
            answers.append((await svc.post(payload, headers=headers)).status_code)

        async with anyio.create_task_group() as tg:
            # The conflict reaches the committer first, the fresh webhooks right after it.
            tg.start_soon(post, body(userId="someone-else"), {"Idempotency-Key": "k-1"})
            await anyio.sleep(0.01)
            for index in range(5):
                tg.start_soon(post, body(userId=f"fresh-{index}"), {})
    assert sorted(answers) == [202] * 5 + [409]
    assert await job_rows(database) == 1 + 5


@pytest.mark.parametrize("kind", ["oauth2", "api_key"])
async def test_a_cognigy_answer_echoing_the_credential_sent_does_not_leak_it(
    service_factory: Any, sim: tuple[SimState, str], kind: str
) -> None:
    """If Cognigy's error body quotes the bearer token or API key it was sent, that
    credential reaches neither the task document nor the log."""
    state, _ = sim
    with capture_logs(processors=LOG_PIPELINE) as entries:
        async with service_factory(cognigy={"auth": {"kind": kind}}) as svc:
            delivered = (await svc.post()).json()["taskId"]
            await svc.wait_status(delivered, {"delivered"})
            credential = next(iter(state._tokens)) if kind == "oauth2" else API_KEY
            echo = {"title": "Forbidden", "detail": f"credential {credential} lacks a scope"}
            state.add_faults(Fault(403, body=echo))
            task_id = (await svc.post()).json()["taskId"]
            doc = await svc.wait_status(task_id, {"failed"})
    assert doc["error"]["kind"] == "forbidden"
    assert_no_secret([json.dumps(doc), *(repr(e) for e in entries)], [credential])


async def test_a_webhook_answered_503_leaves_no_job_behind(
    service_factory: Any, database: str
) -> None:
    """When the job table hangs past the webhook's wait the answer is 503, and the job is
    not stored once the table frees up either: the caller will retry, so a stored copy
    would run twice."""
    async with service_factory() as svc:
        locker = await asyncpg.connect(database)
        try:
            async with locker.transaction():
                await locker.execute(f"LOCK TABLE {TABLE} IN ACCESS EXCLUSIVE MODE")
                with anyio.fail_after(10):
                    refused = await svc.post(body(userId="while-the-table-hangs"))
                assert_error_shape(refused, 503, None)
        finally:
            await locker.close()
        # Group commits run in order: this 202 means the blocked batch is finished too.
        later = await svc.post(body(userId="after-the-table-is-free"))
        assert later.status_code == 202, later.text
        assert await job_rows(database) == 1


# -- 7. slow clients ----------------------------------------------------------------------


async def test_a_body_that_stalls_or_trickles_gets_408_and_the_connection_closed(
    service_factory: Any, database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client that sends its headers and then too little of its body, or trickles a
    chunked body past the deadline, is answered 408 in the error shape and its connection
    closed (no task, socket or queue slot held for it); nothing is stored. A complete
    body on the same service is still accepted."""
    monkeypatch.setattr("cognigy_offload.web.BODY_TIMEOUT_S", 0.6)
    payload = json.dumps(body()).encode()
    stalled = request_bytes(WEBHOOK, payload, {"Content-Length": str(len(payload) + 50)})

    def trickle(count: int) -> Iterable[bytes]:
        for _ in range(count):
            yield b"1\r\n \r\n"

    trickled_head = request_bytes(WEBHOOK, b"", {"Transfer-Encoding": "chunked"}).replace(
        b"Content-Length: 0\r\n", b""
    )
    async with service_factory() as running:
        port = int(running.url.rsplit(":", 1)[1])
        for name, head in [
            ("headers only", request_bytes(WEBHOOK, b"", {"Content-Length": "100"})),
            ("body 50 bytes short", stalled),
        ]:
            started = time.monotonic()
            async with RawHttp.connect(port) as conn:
                await conn.send(head)
                with anyio.fail_after(10):
                    answer = await conn.response()
                    assert answer is not None, name
                    assert answer.status == 408, (name, answer)
                    assert json.loads(answer.body)["error"] == "request_timeout"
                    assert answer.headers.get("connection") == "close"
                    assert await conn.response() is None  # the server closed the connection
            assert 0.5 < time.monotonic() - started < 5, name
        # A chunked body that keeps trickling a byte every 50 ms never completes in time.
        started = time.monotonic()
        with anyio.fail_after(10):
            status, _ = await push_body(port, trickled_head, slowly(trickle(200), 0.05))
        assert status == 408 and 0.5 < time.monotonic() - started < 5
        answer_ok = await running.client.post(WEBHOOK, json=body())
        assert answer_ok.status_code == 202
    assert await job_rows(database) == 1


async def slowly(chunks: Iterable[bytes], pause_s: float) -> AsyncIterator[bytes]:
    """The chunks with a pause before each."""
    for chunk in chunks:
        await anyio.sleep(pause_s)
        yield chunk
