"""Running it for real: JSON logs, /metrics, health and readiness, check-config, OpenAPI.

Real PostgreSQL, real HTTP on loopback, the Cognigy stand-in.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import anyio
import asyncpg
import httpx
import pytest
import structlog
from openapi_schema_validator import OAS31Validator
from openapi_spec_validator import validate as validate_spec
from prometheus_client.parser import text_string_to_metric_families

from cognigy_offload.sim import Fault, SimState
from tests.conftest import ROOT
from tests.integration.conftest import AUTH, WEBHOOK_TOKEN, body

pytestmark = pytest.mark.anyio

JOB_KEYS = ("task_id", "conversation_id", "query")


# -- logs -----------------------------------------------------------------------------------


async def test_production_logs_are_json_lines_with_the_job_context_of_their_own_job(
    process_factory: Any, sim: tuple[SimState, str]
) -> None:
    """Every line of `serve` is a JSON object; every line about a job names its task_id,
    conversation_id and query; a job's context never leaks into the next job's lines; each
    job has one final-state line with duration_s."""
    state, _ = sim
    process = process_factory(queue={"workers": 1})
    await process.start()
    # The first delivery attempt gets a 503, so cognigy.py logs inside the job's context too.
    state.add_faults(Fault(status=503))
    conversations = ("conv_first_job", "conv_second_job")
    tasks: dict[str, str] = {}
    async with httpx.AsyncClient(base_url=process.url, headers=AUTH, timeout=30) as client:
        for conversation, segment in zip(conversations, ("enterprise", "smb"), strict=True):
            answer = await client.post(
                "/webhook/cognigy-trigger",
                json=body(conversationId=conversation, variables={"customer_segment": segment}),
            )
            assert answer.status_code == 202, answer.text
            task_id = answer.json()["taskId"]
            tasks[task_id] = conversation
            with anyio.fail_after(20):
                while (await client.get(f"/tasks/{task_id}")).json()["status"] != "delivered":
                    await anyio.sleep(0.02)
    assert await process.terminate() == 0

    lines = [line for line in process.output().splitlines() if line.strip()]
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except ValueError:
            pytest.fail(f"a log line is not JSON: {line!r}")
    assert all({"event", "level", "timestamp"} <= record.keys() for record in records)

    first, second = tasks
    about_jobs = [r for r in records if any(key in r for key in JOB_KEYS)]
    assert about_jobs, "no line about a job at all"
    for record in about_jobs:
        assert all(key in record for key in JOB_KEYS), record
        assert tasks[record["task_id"]] == record["conversation_id"], record
        assert record["query"] == "revenue"
    # Lines named after a job or a delivery attempt are about a job, so they carry its context.
    for record in records:
        if record["event"].startswith(("job.", "delivery")):
            assert "task_id" in record, record
    # The refused attempt was logged by the delivery client, inside the first job's context.
    assert any(r.get("http_status") == 503 for r in about_jobs if r["task_id"] == first)

    # Nothing logged after the first job finished names it.
    first_done = next(
        i
        for i, r in enumerate(records)
        if r.get("task_id") == first and r["event"] == "job.delivered"
    )
    assert all(r.get("task_id") != first for r in records[first_done + 1 :])
    assert any(r.get("task_id") == second for r in records[first_done + 1 :])
    # Lines that are not about a job (start, drain, stop) carry no job context at all.
    assert any(r["event"] == "service.stopped" for r in records)
    for record in records:
        if record["event"].startswith(("service.", "startup.")):
            assert not any(key in record for key in JOB_KEYS), record

    for task_id in tasks:
        finals = [
            r for r in about_jobs if r["task_id"] == task_id and r["event"] == "job.delivered"
        ]
        assert len(finals) == 1
        assert isinstance(finals[0]["duration_s"], float) and finals[0]["duration_s"] >= 0


async def test_every_state_change_of_a_job_has_one_line_with_duration(
    service_factory: Any,
) -> None:
    """A delivered job logs exactly one line per state (queued, running, delivering,
    delivered), each with its status and duration_s, all with the job's context."""
    with structlog.testing.capture_logs(
        processors=[structlog.contextvars.merge_contextvars]
    ) as records:
        async with service_factory() as svc:
            answer = await svc.post()
            task_id = answer.json()["taskId"]
            await svc.wait_status(task_id, {"delivered"})
    mine = [r for r in records if r.get("task_id") == task_id and "status" in r]
    assert [r["status"] for r in mine] == ["queued", "running", "delivering", "delivered"]
    for record in mine:
        assert all(key in record for key in JOB_KEYS)
        assert isinstance(record["duration_s"], float)


# -- metrics --------------------------------------------------------------------------------


def scrape(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a Prometheus exposition by (sample name, labels)."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: dict[Any, float], name: str, **labels: str) -> float:
    """One sample's value; KeyError names it if the series is missing."""
    key = (name, frozenset(labels.items()))
    if key not in samples:
        known = sorted(str(dict(k[1])) for k in samples if k[0] == name)
        raise KeyError(f"{name}{labels} not exported; {name} has {known}")
    return samples[key]


async def test_metrics_count_a_known_workload(
    service_factory: Any, sim: tuple[SimState, str]
) -> None:
    """After 4 accepted jobs (one delivery refused with 403) and 4 refused webhooks, /metrics
    shows exactly that in the SPEC §2 series, and no label holds a job's or a user's id."""
    state, _ = sim
    p = "cognigy_offload_"
    async with service_factory() as svc:
        state.add_faults(Fault(status=403))
        task_ids = []
        for segment in ("enterprise", "smb", "startup", "mid_market"):
            answer = await svc.post(body(variables={"customer_segment": segment}))
            assert answer.status_code == 202
            task_ids.append(answer.json()["taskId"])
            # One at a time, so the scripted 403 hits the first job's delivery.
            await svc.wait_status(task_ids[-1], {"delivered", "failed"})
        assert (await svc.client.get(f"/tasks/{task_ids[0]}")).json()["status"] == "failed"

        no_query_parameter = body()
        del no_query_parameter["variables"]["customer_segment"]
        refusals = {
            "unauthorized": await svc.client.post(
                "/webhook/cognigy-trigger", json=body(), headers={"Authorization": "Bearer nope"}
            ),
            "unknown_query": await svc.post(body(query="no_such_query")),
            "missing_parameter": await svc.post(no_query_parameter),
            "invalid_json": await svc.client.post(
                "/webhook/cognigy-trigger",
                content=b"{not json",
                headers={"Content-Type": "application/json"},
            ),
        }
        for reason, answer in refusals.items():
            assert answer.json()["error"] == reason
        exposition = (await svc.client.get("/metrics")).text

    samples = scrape(exposition)
    assert value(samples, p + "jobs_accepted_total") == 4
    for reason in refusals:
        assert value(samples, p + "jobs_rejected_total", reason=reason) == 1
    assert value(samples, p + "queue_depth") == 0
    assert value(samples, p + "jobs_finished_total", status="delivered") == 3
    assert value(samples, p + "jobs_finished_total", status="failed") == 1
    assert value(samples, p + "job_duration_seconds_count", status="delivered") == 3
    assert value(samples, p + "job_duration_seconds_bucket", status="failed", le="+Inf") == 1
    assert value(samples, p + "query_duration_seconds_count", query="revenue") == 4
    assert value(samples, p + "queries_total", query="revenue", outcome="ok") == 4
    assert value(samples, p + "deliveries_total", outcome="delivered", http_status="200") == 3
    assert value(samples, p + "deliveries_total", outcome="forbidden", http_status="403") == 1
    assert value(samples, p + "token_fetches_total", outcome="ok") == 1
    assert value(samples, p + "rate_limit_waits_total") == 0
    assert value(samples, p + "jobs_recovered_total") == 0
    assert value(samples, p + "circuit_breaker_state") == 0

    # Low cardinality: labels come from small fixed sets, never from a request.
    allowed = {"reason", "status", "query", "outcome", "http_status", "how", "le"}
    for name, labels in samples:
        if name.startswith(p):
            assert {label for label, _ in labels} <= allowed, (name, labels)
    identities = [*task_ids, "conv_8f4a2c1d", "usr_9b3e7f2a", "sess_41c7", "a1b2c3"]
    assert not [ident for ident in identities if ident in exposition]


# -- health ---------------------------------------------------------------------------------


async def not_ready(client: httpx.AsyncClient) -> list[str]:
    """The problems /readyz reports (empty when it answers 200)."""
    answer = await client.get("/readyz")
    problems: list[str] = answer.json()["problems"]
    assert (answer.status_code == 200) == (not problems)
    if problems:
        assert answer.status_code == 503 and answer.headers["Retry-After"]
    return problems


async def test_health_and_readiness_follow_queue_database_and_drain(
    service_factory: Any, database: str, pg_admin_dsn: str
) -> None:
    """/healthz is 200 throughout; /readyz is 200 when ready and 503 naming why when the
    queue is full, when PostgreSQL refuses connections (and 200 again once it is back),
    and when draining; the webhook then answers 503 within a second."""
    name = urlsplit(database).path.lstrip("/")
    # One worker, one queue slot, no sweep stealing slots while the test fills the queue.
    async with service_factory(queue={"capacity": 1, "workers": 1, "sweep_interval_s": 60}) as svc:
        client = svc.client
        assert (await client.get("/healthz")).status_code == 200
        assert await not_ready(client) == []

        # Queue full: the only worker is stuck on a table lock, the only slot is taken.
        locker = await asyncpg.connect(database)
        try:
            locker_tx = locker.transaction()
            await locker_tx.start()
            await locker.execute("LOCK TABLE transactions IN ACCESS EXCLUSIVE MODE")
            running = (await svc.post()).json()["taskId"]
            await svc.wait_status(running, {"running"})
            queued = await svc.post(body(variables={"customer_segment": "smb"}))
            assert queued.status_code == 202
            problems = await not_ready(client)
            assert [p.split(":")[0] for p in problems] == ["queue_full"]
            refused = await svc.post(body(variables={"customer_segment": "startup"}))
            assert refused.status_code == 503 and refused.json()["error"] == "queue_full"
            assert (await client.get("/healthz")).status_code == 200
            await locker_tx.rollback()
        finally:
            await locker.close()
        await svc.wait_status(queued.json()["taskId"], {"delivered"})
        assert await not_ready(client) == []

        # PostgreSQL unreachable: its connections are cut and new ones refused.
        admin = await asyncpg.connect(pg_admin_dsn)
        try:
            await admin.execute(f"ALTER DATABASE {name} ALLOW_CONNECTIONS false")
            await admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1",
                name,
            )
            assert [p.split(":")[0] for p in await not_ready(client)] == ["database"]
            started = time.monotonic()
            refused = await svc.post()
            assert time.monotonic() - started < 1.5
            assert refused.status_code == 503
            assert refused.json()["error"] == "database_unavailable"
            assert refused.headers["Retry-After"]
            assert (await client.get("/healthz")).status_code == 200
        finally:
            await admin.execute(f"ALTER DATABASE {name} ALLOW_CONNECTIONS true")
            await admin.close()
        with anyio.fail_after(10):
            while await not_ready(client):
                await anyio.sleep(0.05)

        # Draining: what SIGTERM sets (app._Server.handle_exit) before uvicorn stops.
        svc.service.draining = True
        assert [p.split(":")[0] for p in await not_ready(client)] == ["draining"]
        refused = await svc.post()
        assert refused.status_code == 503 and refused.json()["error"] == "shutting_down"
        assert (await client.get("/healthz")).status_code == 200


# -- check-config ---------------------------------------------------------------------------


async def check_config(
    path: Path, dsn: str, *, drop: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[bytes]:
    """Run `python -m cognigy_offload check-config --config PATH` against ``dsn``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("COGNIGY")}
    env.update(
        COGNIGY_OFFLOAD__DATABASE__DSN=dsn,
        COGNIGY_OFFLOAD_WEBHOOK_TOKEN=WEBHOOK_TOKEN,
        COGNIGY_CLIENT_SECRET="a-client-secret-for-the-check",
    )
    for name in drop:
        env.pop(name)
    return await anyio.run_process(
        [sys.executable, "-m", "cognigy_offload", "check-config", "--config", str(path)],
        env=env,
        cwd=ROOT,
        check=False,
    )


async def test_check_config_passes_a_good_config_and_names_the_key_of_each_problem(
    database: str, tmp_path: Path
) -> None:
    """check-config exits 0 on the shipped config; on an unknown key, a wrong type, bad SQL,
    a params count mismatch, a missing secret or an unreachable database it exits non-zero
    and names the key of every problem."""
    shipped = (ROOT / "config.toml").read_text()
    queries = (
        '\n[queries.broken]\nsql = "SELEC count(*) FROM transactions"\nparams = []\n'
        '\n[queries.short]\nsql = "SELECT count(*) FROM transactions WHERE segment = $1"\n'
        "params = []\n"
    )
    files = {
        "good": shipped,
        "unknown_key": shipped.replace("max_body_bytes = 65536", "max_body_bytez = 65536"),
        "wrong_type": shipped.replace("workers = 8", 'workers = "eight"'),
        "queries": shipped + queries,
    }
    for name, text in files.items():
        (tmp_path / f"{name}.toml").write_text(text)
    unreachable = "postgresql://nobody@127.0.0.1:9/none"
    runs: dict[str, subprocess.CompletedProcess[bytes]] = {}

    async def run(name: str, file: str, dsn: str, drop: tuple[str, ...] = ()) -> None:
        runs[name] = await check_config(tmp_path / f"{file}.toml", dsn, drop=drop)

    async with anyio.create_task_group() as tg:
        tg.start_soon(run, "good", "good", database)
        tg.start_soon(run, "unknown_key", "unknown_key", database)
        tg.start_soon(run, "wrong_type", "wrong_type", database)
        tg.start_soon(run, "queries", "queries", database, ("COGNIGY_CLIENT_SECRET",))
        tg.start_soon(run, "unreachable", "good", unreachable)
    out = {name: (r.stdout + r.stderr).decode() for name, r in runs.items()}

    assert runs["good"].returncode == 0, out["good"]
    assert "queries ok: average_amount, revenue, transaction_count" in out["good"]
    expected = {
        "unknown_key": ["server.max_body_bytez: unknown key"],
        "wrong_type": ["queue.workers: Expected `int`, got `str`"],
        "queries": [
            "queries.broken.sql: PostgreSQL refused it",
            "queries.short.params: the SQL has 1 parameters but params lists 0",
            "cognigy.auth.client_secret_env: $COGNIGY_CLIENT_SECRET is empty",
        ],
        "unreachable": ["database.dsn: no connection (database.dsn): PostgreSQL does not answer"],
    }
    for name, problems in expected.items():
        assert runs[name].returncode != 0, out[name]
        for problem in problems:
            assert problem in out[name], out[name]
        assert "nobody@" not in out[name]  # the DSN (it may hold a password) is not printed
    assert "3 problem(s)" in out["queries"]


# -- OpenAPI --------------------------------------------------------------------------------


async def test_openapi_is_valid_31_and_describes_the_real_answers(
    service_factory: Any,
) -> None:
    """/openapi.json is a valid OpenAPI 3.1 document, and the answers the service really
    gives (202, task document, error, readiness) match the schemas it names."""
    async with service_factory() as svc:
        answer = await svc.client.get("/openapi.json")
        assert answer.status_code == 200
        spec = answer.json()
        validate_spec(spec)
        assert spec["openapi"].startswith("3.1")

        def check(instance: Any, schema: str) -> None:
            ref = {"$ref": f"#/components/schemas/{schema}", "components": spec["components"]}
            OAS31Validator(ref).validate(instance)

        accepted = await svc.post()
        check(accepted.json(), "Accepted")
        document = await svc.wait_status(accepted.json()["taskId"], {"delivered"})
        check(document, "TaskDocument")
        check((await svc.post(body(query="nope"))).json(), "ErrorBody")
        check((await svc.client.get("/readyz")).json(), "Readiness")
        operations = spec["paths"]["/webhook/cognigy-trigger"]["post"]["responses"]
        assert {"202", "200", "400", "401", "409", "413", "415", "422", "503"} <= operations.keys()


def form(secret: str) -> dict[str, str]:
    """A client-credentials token request for the shipped config's client id."""
    return {
        "grant_type": "client_credentials",
        "client_id": "your-client-id",
        "client_secret": secret,
    }


async def test_the_stand_in_command_serves_locally_and_prints_each_delivery() -> None:
    """`python -m cognigy_offload stand-in`: a local Cognigy for trying serve without a
    tenant. It accepts the shipped config's client id with $COGNIGY_CLIENT_SECRET, prints
    each delivery as a JSON line, and stops with exit 0 on SIGTERM."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("COGNIGY")}
    env["COGNIGY_CLIENT_SECRET"] = "local-secret"
    proc = subprocess.Popen(
        [sys.executable, "-m", "cognigy_offload", "stand-in", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        async with httpx.AsyncClient(base_url=url, timeout=5) as client:
            with anyio.fail_after(30):
                while True:
                    try:
                        token = await client.post("/auth/oauth2/token", data=form("local-secret"))
                        break
                    except httpx.ConnectError:
                        await anyio.sleep(0.1)
            assert token.status_code == 200
            pushed = await client.post(
                "/new/v2.0/sessions/s1/context/inject",
                json={"userId": "u", "context": {"offload": {"total": 1}}},
                headers={"Authorization": f"Bearer {token.json()['access_token']}"},
            )
            assert pushed.status_code == 200
            wrong = await client.post("/auth/oauth2/token", data=form("other"))
            assert wrong.status_code == 401
        await anyio.sleep(0.5)
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    lines = [json.loads(line) for line in out.decode().splitlines()]
    assert lines == [
        {
            "method": "POST",
            "path": "/new/v2.0/sessions/s1/context/inject",
            "status": 200,
            "body": {"userId": "u", "context": {"offload": {"total": 1}}},
        }
    ]
    assert f"http://127.0.0.1:{port}" in err.decode()
