"""Property-based fuzzing of the webhook and task routes: never a 5xx, never a stray job.

Hypothesis generates 2,500 examples of four requests each (bodies, headers, methods,
paths), 10,000 requests in all, and hands them straight to the real ASGI app (as uvicorn
would, without sockets or an HTTP client in between) while its lifespan runs once against
a real PostgreSQL. Hypothesis runs in a worker thread; each example's four requests run
concurrently on the event loop.
"""

from __future__ import annotations

import contextlib
import copy
import datetime as dt
import json
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, unquote

import anyio
import anyio.from_thread
import asyncpg
import httpx
import pytest
import structlog
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.types import ASGIApp, Message
from structlog.testing import capture_logs

from cognigy_offload.app import build_app
from cognigy_offload.config import parse_config
from cognigy_offload.sim import SimState
from cognigy_offload.store import TABLE
from tests.conftest import SAMPLE_BODY
from tests.integration.conftest import SECRETS, WEBHOOK_TOKEN, config_data

pytestmark = pytest.mark.anyio

EXAMPLES = 2_500
REQUESTS_PER_EXAMPLE = 4
DRAIN_S = 5
WEBHOOK = "/webhook/cognigy-trigger"
ERROR_KEYS = {"error", "detail", "field"}
WEBHOOK_STATUSES = {200, 202, 400, 401, 405, 409, 413, 415, 422}
OTHER_STATUSES = {200, 401, 404, 405}
FINAL = {"delivered", "answered", "failed", "expired"}

# -- strategies -------------------------------------------------------------------------
# Hypothesis spends about 0.1 ms per draw and milliseconds on text or recursive
# strategies, so a request is a handful of choices (one draw of a few bytes) into pools of
# interesting values: 10,000 requests fit in the time budget, and shrinking still moves
# every choice to the first entry of its pool.

SAMPLE = SAMPLE_BODY
HOSTILE = [
    "enterprise' OR '1'='1",
    "'; DROP TABLE transactions; --",
    "$1",
    "$2::text) OR (1=1",
    "\x00",
    "a\x00b",
    "\\u0000",
    "../../etc/passwd",
    "..",
    "%2F%2E%2E",
    "a/b?c#d",
    "\u202e\ufeff",
    "\U0001f600" * 20,
    "e" * 10_000,
    "e" * 10_001,
    "",
    " ",
    "null",
    "\r\nX-Injected: 1",
]
DATE_RANGES = [
    "2024-01-01_to_2024-12-31",
    "2023-06-01_to_2023-06-01",
    "2024-12-31_to_2024-01-01",
    "2024-02-30_to_2024-03-01",
    "0001-01-01_to_0001-01-01",
    "9999-12-30_to_9999-12-30",
    "9999-12-31_to_9999-12-31",
    "2024-01-01_to_",
    "_to_",
    "2024-01-01T00:00_to_2024-02-01",
    "\uff12\uff10\uff12\uff14-01-01_to_2024-01-02",
    " 2024-01-01_to_2024-01-31 ",
    "2024-01-01_to_2024-12-31' OR '1'='1",
]
NAMES = ["revenue", "transaction_count", "average_amount", "REVENUE", "nope", "revenue "]
VALUES: list[Any] = [
    "enterprise",
    "smb",
    None,
    True,
    False,
    0,
    -1,
    2**31,
    2**63,
    -(10**30),
    10**4000,
    1.5,
    -0.0,
    1e308,
    [],
    {},
    ["enterprise"],
    {"start": "2024-01-01", "end": "2024-02-01"},
    {"a": {"b": [1, {"c": None}]}},
    *HOSTILE,
    *DATE_RANGES,
    *NAMES,
    json.loads("[" * 400 + "]" * 400),
    {f"k{i}": i for i in range(300)},
]
# Large values are spliced into the encoded body: encoding them per example is slow, and
# json.dumps cannot nest 5,000 levels deep.
BIG_VALUES = {
    '"__nested_5000_deep__"': b"[" * 5000 + b"]" * 5000,
    '"__keys_10000__"': json.dumps({f"k{i}": 0 for i in range(10_000)}).encode(),
    '"__text_70000__"': b'"' + b"x" * 70_000 + b'"',
}
# Where a mutation lands: the validated keys more often than the ignored ones.
PATHS = [
    ("variables", "customer_segment"),
    ("variables", "date_range"),
    ("variables", "date_range"),
    ("query",),
    ("query",),
    ("userId",),
    ("userId",),
    ("sessionId",),
    ("sessionId",),
    ("variables", "aggregation_type"),
    ("variables",),
    ("conversationId",),
    ("URLToken",),
    ("variables", "extra"),
    ("extra",),
]
CONTENT_TYPES = [
    b"text/plain",
    b"application/x-www-form-urlencoded",
    b"multipart/form-data; boundary=x",
    b"application/jsonx",
    b"",
]
# Content-Length values a lenient HTTP parser might let through to the app.
LENGTHS = [b"abc", b"-1", b"\xb2", b"1e3", b"9" * 30, b"9" * 5000, b"0", b"+5", b"0x10"]
PREFERS = [b"wait=0.05", b"respond-async, wait=0.1", b"wait=99999", b"wait=-1", b"wait=abc"]
OTHER_PATHS = [
    "/",
    "/tasks",
    "/tasks/",
    "/webhook",
    f"{WEBHOOK}/",
    f"{WEBHOOK}/x",
    "/healthz",
    "/metrics",
    "/openapi.json",
    "/%00",
    "/..%2F..%2Fetc%2Fpasswd",
]
KNOWN = "known-task-"
HEADER_BYTES = bytes(b for b in range(0x20, 0x100) if b != 0x7F)


@dataclass(frozen=True)
class Call:
    """One generated request."""

    method: str
    path: str
    headers: dict[str, bytes]
    content: bytes


def choices(draw: st.DrawFn, *sizes: int) -> list[int]:
    """Several choices (``0 <= c < size`` each) from one draw of as many random bytes.

    One draw is far cheaper than one per choice, bytes come out evenly spread (a single
    large integer would favour small values), and shrinking takes every choice to 0.
    """
    raw = draw(st.binary(min_size=len(sizes), max_size=len(sizes)))
    return [byte * size // 256 for byte, size in zip(raw, sizes, strict=True)]


def header_garbage(draw: st.DrawFn) -> bytes:
    """Bytes a real HTTP parser lets through in a header value."""
    raw = draw(st.binary(min_size=1, max_size=24))
    return bytes(HEADER_BYTES[b % len(HEADER_BYTES)] for b in raw).strip() or b"x"


def mutated_body(draw: st.DrawFn, mutations: int) -> Any:
    """The sample body with ``mutations`` keys removed or replaced."""
    payload = json.loads(json.dumps(SAMPLE))
    for _ in range(mutations):
        where, action, index = choices(draw, len(PATHS), 10, len(VALUES))
        path = PATHS[where]
        node = payload
        for key in path[:-1]:
            node = node.get(key) if isinstance(node, dict) else None
        if not isinstance(node, dict):
            continue
        if action == 9:
            node.pop(path[-1], None)
        elif action == 8:
            node[path[-1]] = draw(st.binary(max_size=16)).decode("latin-1")
        elif action == 7:
            node[path[-1]] = list(BIG_VALUES)[index % len(BIG_VALUES)].strip('"')
        else:
            value = VALUES[index]
            # A copy: a later mutation may write into it, and the pool must stay as it is.
            node[path[-1]] = copy.deepcopy(value) if isinstance(value, dict | list) else value
    return payload


def encoded_body(draw: st.DrawFn, kind: int, ascii_only: bool, mutations: int) -> bytes:
    """Mostly a mutated webhook as JSON; sometimes mangled JSON, another value, raw bytes."""
    if kind == 19:
        return draw(st.binary(max_size=64))
    if kind == 18:
        payload = VALUES[draw(st.integers(0, len(VALUES) - 1))]
    else:
        payload = mutated_body(draw, mutations)
    encoded = json.dumps(payload, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")
    for marker, value in BIG_VALUES.items():
        if marker.encode() in encoded:
            encoded = encoded.replace(marker.encode(), value)
    if kind == 17:
        cut = draw(st.integers(0, len(encoded)))
        encoded = encoded[:cut] + draw(st.binary(max_size=4)) + encoded[cut + 1 :]
    return encoded


def credentials(draw: st.DrawFn, choice: int) -> dict[str, bytes]:
    """Mostly the right token (choice < 16 of 20), else another header, none or a bad one."""
    good = WEBHOOK_TOKEN.encode()
    if choice < 16:
        return {"authorization": b"Bearer " + good}
    if choice == 16:
        return {"x-webhook-token": good}
    if choice == 17:
        return {}
    if choice == 18:
        return {"authorization": b"Bearer " + good[:-1]}
    return {"authorization": b"Bearer " + header_garbage(draw)}


@st.composite
def calls(draw: st.DrawFn) -> Call:
    """A request to the webhook (mostly), the task route or elsewhere."""
    (auth, route, content_type, prefer, key, method, kind, ascii_only, mutations, index, length) = (
        choices(draw, 20, 10, 20, 40, 20, 20, 20, 2, 4, 64, 40)
    )
    headers = credentials(draw, auth)
    if route < 8:
        if content_type < 17:
            headers["content-type"] = b"application/json"
        elif content_type == 17:
            headers["content-type"] = b"application/json; charset=utf-8"
        elif content_type == 18:
            headers["content-type"] = CONTENT_TYPES[index % len(CONTENT_TYPES)]
        if prefer >= 37:
            headers["prefer"] = PREFERS[index % len(PREFERS)] if prefer < 39 else b"wait"
        if key >= 16:
            headers["idempotency-key"] = (
                f"key-{index % 20}".encode() if key < 19 else header_garbage(draw)
            )
        if length >= 38:
            headers["content-length"] = LENGTHS[index % len(LENGTHS)]
        verb = "POST" if method < 19 else ["GET", "PUT", "DELETE"][index % 3]
        return Call(
            verb, WEBHOOK, headers, encoded_body(draw, kind, bool(ascii_only), mutations + 3)
        )
    if route == 8:
        if content_type < 8:
            # Resolved to a task accepted earlier when sent (strategies must not see state).
            task = f"{KNOWN}{index}"
        elif content_type < 16:
            task = str(uuid.UUID(int=draw(st.integers(0, 2**128 - 1))))
        else:
            task = quote(draw(st.binary(max_size=40)).decode("latin-1"), safe="")
        verb = "GET" if method < 17 else ["POST", "DELETE", "PUT"][method - 17]
        return Call(verb, f"/tasks/{task}", headers, b"")
    verb = ["GET", "POST", "PUT", "HEAD"][method % 4]
    body = encoded_body(draw, kind, bool(ascii_only), mutations + 3)
    return Call(verb, OTHER_PATHS[index % len(OTHER_PATHS)], headers, body)


# -- the service under fuzz -------------------------------------------------------------


@dataclass
class Tally:
    """What the fuzzer saw."""

    statuses: Counter[int] = field(default_factory=Counter)
    task_ids: set[str] = field(default_factory=set)
    known_ids: list[str] = field(default_factory=list)
    requests: int = 0


@dataclass
class Answer:
    """One HTTP answer as the ASGI app sent it."""

    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""

    def json(self) -> Any:
        """The body as JSON."""
        return json.loads(self.body)


class GatedTransport(httpx.AsyncBaseTransport):
    """Outbound HTTP (to the stand-in) held until ``gate`` opens.

    While it is closed the workers stall on their first delivery and accepted jobs wait in
    the queue, so the event loop serves the fuzzer alone; opening it lets them drain.
    """

    def __init__(self) -> None:
        self.gate = anyio.Event()
        self.inner = httpx.AsyncHTTPTransport()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """Wait for the gate, then send."""
        await self.gate.wait()
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        """Close the real transport."""
        await self.inner.aclose()


@dataclass
class Target:
    """The app under fuzz, its lifespan state and the gate of its outbound HTTP."""

    app: ASGIApp
    state: dict[str, Any]
    outbound: GatedTransport

    async def request(
        self, method: str, path: str, headers: dict[str, bytes], body: bytes
    ) -> Answer:
        """Call the app as uvicorn would: decoded path, raw headers, body in 64 KiB chunks."""
        raw_headers = [(b"host", b"127.0.0.1")]
        if (body or method in ("POST", "PUT")) and "content-length" not in headers:
            raw_headers.append((b"content-length", str(len(body)).encode()))
        raw_headers += [(name.encode(), value) for name, value in headers.items()]
        scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.4"},
            "http_version": "1.1",
            "method": method,
            "scheme": "http",
            "path": unquote(path),
            "raw_path": path.encode(),
            "query_string": b"",
            "root_path": "",
            "headers": raw_headers,
            "client": ("127.0.0.1", 40000),
            "server": ("127.0.0.1", 80),
            "state": dict(self.state),
        }
        chunks = [body[i : i + 65536] for i in range(0, len(body), 65536)] or [b""]
        answered = anyio.Event()
        answer = Answer()

        async def receive() -> Message:
            if chunks:
                chunk = chunks.pop(0)
                return {"type": "http.request", "body": chunk, "more_body": bool(chunks)}
            await answered.wait()
            return {"type": "http.disconnect"}

        async def send(message: Message) -> None:
            if message["type"] == "http.response.start":
                answer.status = message["status"]
                answer.headers = {k.decode(): v.decode("latin-1") for k, v in message["headers"]}
            elif message["type"] == "http.response.body":
                answer.body += message.get("body", b"")
                if not message.get("more_body"):
                    answered.set()

        await self.app(scope, receive, send)
        assert answered.is_set(), (method, path, "the app returned without answering")
        return answer


@contextlib.asynccontextmanager
async def in_process_app(database: str, sim_url: str) -> AsyncIterator[Target]:
    """The real app with its lifespan running once."""
    config = parse_config(
        config_data(
            sim_url,
            queue={"capacity": 50_000, "workers": 4},
            server={"max_wait_s": 0.01, "shutdown_grace_s": 1},
            cognigy={"rate_limit_per_minute": 1_000_000},
        )
    )
    # Durability is not under test here; no flush per commit keeps the run in budget.
    conn = await asyncpg.connect(database)
    try:
        name = await conn.fetchval("SELECT current_database()")
        await conn.execute(f'ALTER DATABASE "{name}" SET synchronous_commit = off')
    finally:
        await conn.close()
    outbound = GatedTransport()
    app = build_app(config, SECRETS, dsn=database, transport=outbound)
    async with app.router.lifespan_context(app) as state:
        yield Target(app, dict(state or {}), outbound)


def check(call: Call, answer: Answer, tally: Tally) -> None:
    """What must hold for every answer."""
    webhook = call.path == WEBHOOK and call.method == "POST"
    status = answer.status
    tally.statuses[status] += 1
    assert status < 500, (call, status, answer.body[:300])
    assert status in (WEBHOOK_STATUSES if webhook else OTHER_STATUSES), (call, status)
    if status >= 400:
        assert answer.headers["content-type"] == "application/json", answer.headers
        payload = answer.json()
        assert set(payload) == ERROR_KEYS, payload
        assert isinstance(payload["error"], str) and isinstance(payload["detail"], str)
        assert payload["field"] is None or payload["field"].startswith("$"), payload
    elif webhook:
        task_id = answer.json()["taskId"]
        assert answer.headers["location"] == f"/tasks/{task_id}"
        if task_id not in tally.task_ids:
            tally.task_ids.add(task_id)
            tally.known_ids.append(task_id)


async def job_outcomes(dsn: str) -> dict[str, tuple[str, str | None]]:
    """Every job's status and error kind, by task id."""
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(f"SELECT id::text, status, error->>'kind' AS kind FROM {TABLE}")
    finally:
        await conn.close()
    return {r["id"]: (r["status"], r["kind"]) for r in rows}


async def test_no_generated_request_gets_a_5xx_or_stores_a_stray_job(
    database: str, sim: tuple[SimState, str]
) -> None:
    """Across 10,000 generated requests no answer is a 5xx, every refusal is the JSON error
    shape, every 2xx names a task, the job table holds exactly the jobs answered 2xx, and
    the accepted jobs that run afterwards finish without an internal error."""
    tally = Tally()
    started = time.monotonic()
    with capture_logs(processors=[structlog.contextvars.merge_contextvars]) as entries:
        async with in_process_app(database, sim[1]) as target:

            async def send(call: Call) -> None:
                path = call.path
                if KNOWN in path:
                    index = int(path.rpartition("-")[2])
                    known = tally.known_ids or [str(uuid.uuid4())]
                    path = f"/tasks/{known[-1 - index % len(known)]}"
                answer = await target.request(call.method, path, call.headers, call.content)
                tally.requests += 1
                check(call, answer, tally)

            async def send_all(batch: list[Call]) -> None:
                async with anyio.create_task_group() as tg:
                    for call in batch:
                        tg.start_soon(send, call)

            @settings(
                max_examples=EXAMPLES,
                deadline=dt.timedelta(seconds=5),
                database=None,
                print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
            )
            @given(data=st.data())
            def fuzz(data: st.DataObject) -> None:
                batch = [data.draw(calls(), label=f"call {i}") for i in range(REQUESTS_PER_EXAMPLE)]
                anyio.from_thread.run(send_all, batch)

            await anyio.to_thread.run_sync(fuzz)
            fuzz_s = time.monotonic() - started
            assert set(await job_outcomes(database)) == tally.task_ids
            # Let the workers run the accepted jobs for a while (not necessarily all).
            target.outbound.gate.set()
            with anyio.move_on_after(DRAIN_S):
                while True:
                    outcomes = await job_outcomes(database)
                    if all(status in FINAL for status, _ in outcomes.values()):
                        break
                    await anyio.sleep(0.2)
    outcomes = await job_outcomes(database)
    finished = Counter(kind or status for status, kind in outcomes.values() if status in FINAL)
    print(
        f"\nfuzz: {tally.requests} requests in {fuzz_s:.1f} s, answers "
        f"{dict(sorted(tally.statuses.items()))}; {len(tally.task_ids)} jobs accepted, "
        f"{finished.total()} finished in {DRAIN_S} s: {dict(finished)}"
    )
    assert tally.requests >= EXAMPLES * REQUESTS_PER_EXAMPLE
    assert set(outcomes) == tally.task_ids
    assert finished.total() >= min(len(outcomes), 100)
    assert "internal" not in finished
    internal = [e for e in entries if "internal" in e["event"]]
    assert not internal, internal[:3]
