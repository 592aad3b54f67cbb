"""The core path end to end: webhook → stored job → aggregation → result in Cognigy.

Real PostgreSQL, real HTTP on loopback, the Cognigy stand-in.
"""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
import tomllib
import uuid
from decimal import Decimal
from pathlib import Path
from typing import Any

import anyio
import asyncpg
import httpx
import pytest

from cognigy_offload.config import dump_toml
from cognigy_offload.sim import Fault, SimState
from tests.conftest import ROOT
from tests.integration.conftest import AUTH, Process, body

pytestmark = pytest.mark.anyio


async def expected_revenue(dsn: str, segment: str, start: str, end: str) -> dict[str, Any]:
    """The revenue aggregate computed directly, for comparison."""
    conn = await asyncpg.connect(dsn)
    try:
        row = await conn.fetchrow(
            "SELECT count(*) AS count, coalesce(sum(amount), 0) AS total FROM transactions "
            "WHERE segment = $1 AND created_at >= $2::date AND created_at < $3::date",
            segment,
            dt.date.fromisoformat(start),
            dt.date.fromisoformat(end),
        )
    finally:
        await conn.close()
    return {"count": row["count"], "total": row["total"]}


async def job_rows(dsn: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return int(await conn.fetchval("SELECT count(*) FROM cognigy_offload_jobs"))
    finally:
        await conn.close()


async def test_webhook_is_accepted_stored_computed_and_delivered_in_context_mode(
    service_factory: Any, sim: tuple[SimState, str], database: str
) -> None:
    """A valid webhook gets 202 with a string taskId and Location, and the exact aggregate
    reaches the stand-in's context-inject route with the taskId and a Unix timestamp."""
    state, _ = sim
    async with service_factory() as svc:
        response = await svc.post()
        assert response.status_code == 202
        answer = response.json()
        assert answer["status"] == "accepted"
        assert answer["message"] == "Database query dispatched to background worker"
        task_id = answer["taskId"]
        assert isinstance(task_id, str) and uuid.UUID(task_id)
        assert response.headers["location"] == f"/tasks/{task_id}"
        doc = await svc.wait_status(task_id, {"delivered", "failed"})
    want = await expected_revenue(database, "enterprise", "2024-01-01", "2025-01-01")
    assert doc["status"] == "delivered", doc
    assert doc["result"]["count"] == want["count"]
    assert Decimal(str(doc["result"]["total"])) == want["total"]
    assert doc["attempts"] == {"query": 1, "delivery": 1}
    assert doc["conversationId"] == "conv_8f4a2c1d"
    assert doc["error"] is None
    [delivery] = state.delivered()
    assert delivery.method == "POST"
    assert delivery.raw_path == "/new/v2.0/sessions/sess_41c7/context/inject"
    pushed = delivery.body["context"]["offload"]
    assert delivery.body["userId"] == "usr_9b3e7f2a"
    assert pushed["count"] == want["count"] and pushed["total"] == want["total"]
    assert pushed["taskId"] == task_id and isinstance(pushed["timestamp"], int)


@pytest.mark.parametrize("mode", ["inject", "notify"])
async def test_endpoint_modes_post_to_the_urltoken_route_without_api_auth(
    service_factory: Any, sim: tuple[SimState, str], mode: str
) -> None:
    """inject/notify post {userId, sessionId, text, data} to /{mode}/{URLToken}, no API auth."""
    state, _ = sim
    async with service_factory(cognigy={"delivery": mode}) as svc:
        task_id = (await svc.post()).json()["taskId"]
        doc = await svc.wait_status(task_id, {"delivered", "failed"})
    assert doc["status"] == "delivered", doc
    [delivery] = state.delivered()
    assert delivery.raw_path == f"/{mode}/a1b2c3"
    assert delivery.auth == "" or delivery.auth == "none"
    assert set(delivery.body) == {"userId", "sessionId", "text", "data"}
    assert delivery.body["text"] == "" and delivery.body["sessionId"] == "sess_41c7"
    assert delivery.body["data"]["offload"]["taskId"] == task_id
    assert state.token_requests == 0


async def test_variables_mode_patches_the_seed_format(
    service_factory: Any, sim: tuple[SimState, str], database: str
) -> None:
    """variables mode PATCHes db_query_result as count:N|total:X.XX, then the timestamp,
    then one entry per column."""
    state, _ = sim
    async with service_factory(cognigy={"delivery": "variables"}) as svc:
        task_id = (await svc.post()).json()["taskId"]
        doc = await svc.wait_status(task_id, {"delivered", "failed"})
    assert doc["status"] == "delivered", doc
    want = await expected_revenue(database, "enterprise", "2024-01-01", "2025-01-01")
    [delivery] = state.delivered()
    assert delivery.method == "PATCH"
    assert delivery.raw_path == "/api/v1/conversations/conv_8f4a2c1d/variables"
    variables = delivery.body["variables"]
    assert variables[0] == {
        "name": "db_query_result",
        "value": f"count:{want['count']}|total:{want['total']:.2f}",
    }
    assert variables[1]["name"] == "db_query_timestamp"
    assert variables[1]["value"].isdigit()
    assert variables[2:] == [
        {"name": "count", "value": want["count"]},
        {"name": "total", "value": want["total"]},
    ]


async def test_api_key_auth_sends_the_key_on_rest_calls(
    service_factory: Any, sim: tuple[SimState, str]
) -> None:
    """With auth kind api_key the REST call carries X-API-Key and no token is fetched."""
    state, _ = sim
    async with service_factory(cognigy={"auth": {"kind": "api_key"}}) as svc:
        task_id = (await svc.post()).json()["taskId"]
        doc = await svc.wait_status(task_id, {"delivered", "failed"})
    assert doc["status"] == "delivered", doc
    assert state.token_requests == 0


async def test_task_document_goes_through_the_states(
    service_factory: Any, sim: tuple[SimState, str]
) -> None:
    """Polling shows queued, running, delivering and delivered, in that order."""
    state, _ = sim
    state.slowness_s = 0.4
    slow = {
        "sql": "SELECT pg_sleep(0.4)::text AS slept, $1::text AS segment",
        "params": ["customer_segment"],
    }
    async with service_factory(queue={"workers": 1}, queries={"slow": slow}) as svc:
        # The first job keeps the only worker busy (another question: not shared).
        other = body(query="slow", variables={"customer_segment": "smb"})
        first = (await svc.post(other)).json()["taskId"]
        task_id = (await svc.post(body(query="slow"))).json()["taskId"]
        seen: list[str] = []
        with anyio.fail_after(15):
            while not seen or seen[-1] not in ("delivered", "failed"):
                status = (await svc.client.get(f"/tasks/{task_id}")).json()["status"]
                if not seen or seen[-1] != status:
                    seen.append(status)
                await anyio.sleep(0.02)
        doc = await svc.wait_status(task_id, {"delivered"})
        await svc.wait_status(first, {"delivered"})
    assert seen == ["queued", "running", "delivering", "delivered"]
    assert doc["attempts"] == {"query": 1, "delivery": 1}
    assert doc["result"]["segment"] == "enterprise"
    assert doc["createdAt"].endswith("Z") and doc["updatedAt"] > doc["createdAt"]


async def test_retries_are_counted_on_the_task(
    service_factory: Any, sim: tuple[SimState, str]
) -> None:
    """Two 503s then success: delivered with three delivery attempts and one query."""
    state, _ = sim
    state.add_faults(Fault(status=503), Fault(status=503))
    async with service_factory() as svc:
        task_id = (await svc.post()).json()["taskId"]
        doc = await svc.wait_status(task_id, {"delivered", "failed"})
    assert doc["status"] == "delivered"
    assert doc["attempts"] == {"query": 1, "delivery": 3}


async def test_a_403_fails_the_job_with_kind_and_status(
    service_factory: Any, sim: tuple[SimState, str]
) -> None:
    """A 403 from Cognigy fails the job at once: failed, kind forbidden, httpStatus 403."""
    state, _ = sim
    state.add_faults(Fault(status=403))
    async with service_factory() as svc:
        task_id = (await svc.post()).json()["taskId"]
        doc = await svc.wait_status(task_id, {"delivered", "failed"})
    assert doc["status"] == "failed"
    assert doc["error"]["kind"] == "forbidden" and doc["error"]["httpStatus"] == 403
    assert doc["result"] is not None  # the result is kept for a replay


@pytest.mark.parametrize(
    ("changes", "field", "code"),
    [
        ({"query": "nope"}, "$.query", "unknown_query"),
        (
            {"query": None, "variables": {"aggregation_type": "nope"}},
            "$.variables.aggregation_type",
            "unknown_query",
        ),
        (
            {"variables": {"customer_segment": 42}},
            "$.variables.customer_segment",
            "invalid_parameter",
        ),
        (
            {"variables": {"date_range": "2024-02-30_to_2024-03-01"}},
            "$.variables.date_range",
            "invalid_parameter",
        ),
        ({"variables": {"date_range": "yesterday"}}, "$.variables.date_range", "invalid_parameter"),
        ({"userId": 7}, "$.userId", "invalid_request"),
        ({"sessionId": None}, "$.sessionId", "missing_field"),
    ],
)
async def test_bad_webhooks_get_422_naming_the_field_and_store_nothing(
    service_factory: Any, database: str, changes: dict[str, Any], field: str, code: str
) -> None:
    """Unknown query, mistyped or missing parameter: 422 naming the field; no job row."""
    payload = body(**changes)
    if changes.get("query", "") is None:
        del payload["query"]
    if changes.get("sessionId", "") is None:
        del payload["sessionId"]
    async with service_factory() as svc:
        response = await svc.post(payload)
    assert response.status_code == 422, response.text
    assert response.json() == {"error": code, "detail": response.json()["detail"], "field": field}
    assert await job_rows(database) == 0


async def test_missing_variable_names_it(service_factory: Any, database: str) -> None:
    """A parameter whose variable is absent is a 422 naming $.variables.<name>."""
    payload = body()
    del payload["variables"]["customer_segment"]
    async with service_factory() as svc:
        response = await svc.post(payload)
    assert response.status_code == 422
    assert response.json()["field"] == "$.variables.customer_segment"
    assert response.json()["error"] == "missing_parameter"
    assert await job_rows(database) == 0


async def test_a_full_queue_answers_503_with_retry_after_and_stores_nothing(
    service_factory: Any, sim: tuple[SimState, str], database: str
) -> None:
    """With every slot taken the webhook answers 503 + Retry-After at once, never hangs."""
    state, _ = sim
    state.slowness_s = 2.0
    async with service_factory(queue={"capacity": 2, "workers": 1}) as svc:
        codes = []
        for _ in range(6):
            codes.append((await svc.post()).status_code)
        full = await svc.post()
        assert full.status_code == 503
        assert full.headers["retry-after"].isdigit()
        assert full.json()["error"] == "queue_full"
        ready = await svc.client.get("/readyz")
        assert ready.status_code == 503
        state.slowness_s = 0.0
    accepted = codes.count(202)
    assert 2 <= accepted <= 4  # two slots, plus the job a worker holds
    assert codes.count(503) == 6 - accepted
    assert await job_rows(database) == accepted


async def test_statement_timeout_fails_the_job_as_query_timeout(
    service_factory: Any,
) -> None:
    """A query running into statement_timeout fails the job with kind query_timeout."""
    slow = {"sql": "SELECT pg_sleep(5) AS slept, $1::text AS s", "params": ["customer_segment"]}
    async with service_factory(
        database={"statement_timeout_ms": 200}, queries={"slow": slow}
    ) as svc:
        task_id = (await svc.post(body(query="slow"))).json()["taskId"]
        doc = await svc.wait_status(task_id, {"failed", "delivered"})
    assert doc["status"] == "failed"
    assert doc["error"]["kind"] == "query_timeout"


async def test_aggregation_type_picks_the_query_when_query_is_absent(
    service_factory: Any, sim: tuple[SimState, str]
) -> None:
    """Without `query`, variables.aggregation_type names it."""
    payload = body(variables={"aggregation_type": "transaction_count"})
    del payload["query"]
    async with service_factory() as svc:
        task_id = (await svc.post(payload)).json()["taskId"]
        doc = await svc.wait_status(task_id, {"delivered", "failed"})
    assert doc["query"] == "transaction_count" and set(doc["result"]) == {"count"}


async def test_task_route_needs_auth_and_404s_unknown_ids(service_factory: Any) -> None:
    """GET /tasks needs the token; an unknown or non-UUID id is a 404."""
    async with service_factory() as svc:
        async with httpx.AsyncClient(base_url=svc.url) as stranger:
            anonymous = await stranger.get(f"/tasks/{uuid.uuid4()}")
        assert anonymous.status_code == 401
        assert (await svc.client.get(f"/tasks/{uuid.uuid4()}")).status_code == 404
        assert (await svc.client.get("/tasks/not-a-uuid")).status_code == 404


async def test_serve_reads_config_and_env_overrides(process_factory: Any) -> None:
    """`serve` starts from config.toml, takes COGNIGY_OFFLOAD__SECTION__KEY overrides, answers."""
    process: Process = process_factory()
    process.env["COGNIGY_OFFLOAD__QUEUE__CAPACITY"] = "3"
    await process.start()
    async with httpx.AsyncClient(base_url=process.url, headers=AUTH) as client:
        ready = (await client.get("/readyz")).json()
        assert ready["queue"]["capacity"] == 3
        response = await client.post("/webhook/cognigy-trigger", json=body())
        assert response.status_code == 202
        task_id = response.json()["taskId"]
        with anyio.fail_after(10):
            while (await client.get(f"/tasks/{task_id}")).json()["status"] != "delivered":
                await anyio.sleep(0.05)
    assert await process.terminate() == 0


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        (("COGNIGY_OFFLOAD__QUEUE__CAPACTY", "3"), "queue.capacty: unknown key"),
        (("COGNIGY_OFFLOAD__SERVER__PORT", "eighty"), "server.port"),
        (("COGNIGY_OFFLOAD__QUERIES__BROKEN__SQL", "SELEC 1"), "queries.broken.sql"),
    ],
)
def test_serve_refuses_bad_config_naming_the_key(
    process_factory: Any, override: tuple[str, str], expected: str
) -> None:
    """Unknown keys, wrong types and bad SQL stop start-up with a message naming the key."""
    process: Process = process_factory()
    process.env[override[0]] = override[1]
    result = subprocess.run(
        [sys.executable, "-m", "cognigy_offload", "serve", "--config", str(process.config_path)],
        env=process.env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert expected in result.stdout + result.stderr


async def test_serve_with_empty_dsn_starts_an_embedded_postgres(
    process_factory: Any, tmp_path: Path
) -> None:
    """An empty database.dsn runs a real embedded PostgreSQL under database.data_dir."""
    process: Process = process_factory(database={"data_dir": str(tmp_path / "pg")})
    process.env["COGNIGY_OFFLOAD__DATABASE__DSN"] = ""
    # A brand-new server has no demo table: serve a query that needs none.
    data = tomllib.loads(process.config_path.read_text())
    data["queries"] = {"now": {"sql": "SELECT now() AS now, $1::text AS s", "params": ["s"]}}
    process.config_path.write_text(dump_toml(data))
    await process.start()
    try:
        assert (tmp_path / "pg" / "PG_VERSION").exists()
        async with httpx.AsyncClient() as client:
            ready = await client.get(f"{process.url}/readyz")
        assert ready.status_code == 200, ready.text
    finally:
        assert await process.terminate() == 0
    assert not (tmp_path / "pg" / "postmaster.pid").exists()


async def test_every_column_type_maps_to_json_by_the_documented_rule(
    service_factory: Any, sim: tuple[SimState, str]
) -> None:
    """numeric exact (huge and tiny), NaN/Infinity as null, bigint beyond 2^53 exact, dates
    and timestamps as ISO 8601, NULL as null, json/jsonb parsed: in the task and the push."""
    sql = """
    SELECT 12345678901234567890123.45::numeric AS huge, 1e-30::numeric AS tiny,
           'NaN'::numeric AS nan, 'Infinity'::float8 AS inf, 9007199254740993::bigint AS big,
           DATE '2024-01-02' AS day, TIMESTAMPTZ '2024-01-02 03:04:05.5+00' AS at,
           NULL::int AS nothing, '{"a": [1, 2.50]}'::jsonb AS doc, '[true]'::json AS arr,
           $1::text AS segment
    """
    types = {"sql": sql, "params": ["customer_segment"]}
    state, _ = sim
    async with service_factory(queries={"types": types}) as svc:
        task_id = (await svc.post(body(query="types"))).json()["taskId"]
        doc = await svc.wait_status(task_id, {"delivered", "failed"})
        raw = (await svc.client.get(f"/tasks/{task_id}")).content
    assert doc["status"] == "delivered", doc
    assert b'"huge":12345678901234567890123.45' in raw
    assert b'"big":9007199254740993' in raw and b'"tiny":1E-30' in raw.replace(b"e", b"E")
    pushed = state.delivered()[0].body["context"]["offload"]
    assert pushed["huge"] == Decimal("12345678901234567890123.45")
    assert pushed["tiny"] == Decimal("1E-30")
    assert pushed["big"] == 9007199254740993
    assert pushed["nan"] is None and pushed["inf"] is None and pushed["nothing"] is None
    assert pushed["day"] == "2024-01-02"
    assert pushed["at"] == "2024-01-02T03:04:05.500000+00:00"
    assert pushed["doc"] == {"a": [1, Decimal("2.50")]} and pushed["arr"] == [True]
    assert pushed["segment"] == "enterprise"
