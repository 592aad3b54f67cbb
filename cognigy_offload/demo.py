"""`python -m cognigy_offload demo`: a newcomer's first run, with nothing set up.

Embedded PostgreSQL with a 1,000,000-row demo table, the local Cognigy stand-in, the
service itself on loopback, a handful of webhooks in every delivery mode, and a report
of what was accepted, computed and delivered.
"""

from __future__ import annotations

import contextlib
import logging
import secrets as random_secrets
import time
import tomllib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import asyncpg
import httpx
import structlog

from .app import build_app
from .config import Config, Secrets, parse_config
from .db import EmbeddedPostgres
from .models import ENCODER
from .seed import ensure_transactions
from .serving import run_uvicorn
from .sim import SimState, run_sim
from .web import Service

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "config.toml"


@dataclass
class Sample:
    """One webhook the demo sends."""

    title: str
    body: dict[str, Any]
    prefer_wait_s: float = 0.0


def _body(query: str, segment: str, date_range: str, **extra: Any) -> dict[str, Any]:
    return {
        "conversationId": f"conv_{random_secrets.token_hex(4)}",
        "userId": f"usr_{random_secrets.token_hex(4)}",
        "sessionId": f"sess_{random_secrets.token_hex(3)}",
        "URLToken": "demo-endpoint-token",
        "query": query,
        "variables": {
            "customer_segment": segment,
            "date_range": date_range,
            "aggregation_type": query,
            **extra,
        },
    }


PHASES: list[tuple[str, list[Sample]]] = [
    (
        "context",
        [
            Sample(
                "revenue, enterprise, all of 2024",
                _body("revenue", "enterprise", "2024-01-01_to_2024-12-31"),
            ),
            Sample(
                "average amount, smb, 2023-2025",
                _body("average_amount", "smb", "2023-01-01_to_2025-12-31"),
            ),
            Sample(
                "transaction count, startup, Q1 2025 (Prefer: wait=5, answered inline)",
                _body("transaction_count", "startup", "2025-01-01_to_2025-03-31"),
                5.0,
            ),
        ],
    ),
    (
        "variables",
        [
            Sample(
                "revenue, mid_market, 2024 (the seed's variables format)",
                _body("revenue", "mid_market", "2024-01-01_to_2024-12-31"),
            ),
        ],
    ),
    (
        "inject",
        [
            Sample(
                "revenue, public_sector, H1 2024",
                _body("revenue", "public_sector", "2024-01-01_to_2024-06-30"),
            ),
        ],
    ),
    (
        "notify",
        [
            Sample(
                "transaction count, enterprise, 2023",
                _body("transaction_count", "enterprise", "2023-01-01_to_2023-12-31"),
            ),
        ],
    ),
]


def _config(mode: str, dsn: str, sim_url: str, data_dir: str) -> Config:
    data = tomllib.loads(DEFAULT_CONFIG.read_text())
    data["database"].update(dsn=dsn, data_dir=data_dir)
    data["cognigy"].update(delivery=mode, api_url=sim_url, endpoint_url=sim_url)
    data["cognigy"]["auth"].update(client_id="demo-client")
    return parse_config(data)


def _print(text: str = "") -> None:
    print(text, flush=True)


@contextlib.asynccontextmanager
async def _service(
    config: Config, secrets: Secrets, dsn: str
) -> AsyncIterator[tuple[str, Service]]:
    holder: dict[str, Service] = {}
    app = build_app(config, secrets, dsn=dsn, on_ready=lambda s: holder.__setitem__("service", s))
    async with run_uvicorn(app) as url:
        yield url, holder["service"]


async def _demo(rows: int, data_dir: str) -> int:
    started = time.perf_counter()
    _print("cognigy-offload demo")
    _print("=" * 78)
    _print(f"1. Embedded PostgreSQL under {data_dir} ...")
    embedded = EmbeddedPostgres(data_dir)
    dsn = await anyio.to_thread.run_sync(embedded.start)
    try:
        return await _with_database(dsn, rows, data_dir, started)
    finally:
        await anyio.to_thread.run_sync(embedded.stop)


async def _with_database(dsn: str, rows: int, data_dir: str, started: float) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        n, seed_s = await ensure_transactions(conn, rows)
        version = await conn.fetchval("SHOW server_version")
    finally:
        await conn.close()
    how = f"generated in {seed_s:.1f} s" if seed_s else "reused from an earlier run"
    _print(f"   PostgreSQL {version}; transactions table: {n:,} rows ({how})")
    webhook_token = random_secrets.token_urlsafe(24)
    client_secret = random_secrets.token_urlsafe(24)
    secrets = Secrets(webhook_tokens=(webhook_token,), client_secret=client_secret, api_key="")
    state = SimState(client_id="demo-client", client_secret=client_secret)
    async with run_sim(state) as sim_url:
        _print(
            f"2. Local Cognigy stand-in on {sim_url} (OAuth2 token route, context "
            "inject, Endpoint inject/notify, variables)"
        )
        _print("3. The service on loopback; webhooks in each delivery mode:")
        failures = 0
        for mode, samples in PHASES:
            config = _config(mode, dsn, sim_url, data_dir)
            async with (
                _service(config, secrets, dsn) as (url, service),
                httpx.AsyncClient(
                    base_url=url,
                    headers={"Authorization": f"Bearer {webhook_token}"},
                    timeout=30,
                ) as client,
            ):
                for sample in samples:
                    failures += not await _run_sample(client, service, state, mode, sample)
                if mode == "context":
                    await _show_refusal(client)
    _print("=" * 78)
    _print(
        f"Token requests to the stand-in: {state.token_requests} (the token is "
        "cached across jobs; each of the 4 phases starts a fresh service)."
    )
    _print(
        f"Demo finished in {time.perf_counter() - started:.1f} s; "
        f"{'all jobs delivered' if not failures else f'{failures} job(s) FAILED'}."
    )
    return 1 if failures else 0


async def _run_sample(
    client: httpx.AsyncClient, service: Service, state: SimState, mode: str, sample: Sample
) -> bool:
    _print(f"\n   [{mode}] {sample.title}")
    headers = {"Prefer": f"wait={sample.prefer_wait_s:g}"} if sample.prefer_wait_s else {}
    before = len(state.received)
    sent = time.perf_counter()
    response = await client.post("/webhook/cognigy-trigger", json=sample.body, headers=headers)
    accept_ms = (time.perf_counter() - sent) * 1000
    answer = response.json()
    _print(
        f"     webhook -> {response.status_code} in {accept_ms:.1f} ms, "
        f"taskId {answer.get('taskId')}"
    )
    if response.status_code == 200 and answer.get("status") == "answered":
        _print(f"     answered inline (not pushed to Cognigy): result {_short(answer['result'])}")
        return True
    if response.status_code != 202:
        _print(f"     unexpected answer: {answer}")
        return False
    task_id = answer["taskId"]
    with anyio.move_on_after(60):
        while True:
            doc = (await client.get(f"/tasks/{task_id}")).json()
            if doc["status"] in ("delivered", "failed", "expired"):
                break
            await anyio.sleep(0.02)
    done_ms = (time.perf_counter() - sent) * 1000
    query_s = service.metrics.registry.get_sample_value(
        "cognigy_offload_query_duration_seconds_sum", {"query": sample.body["query"]}
    )
    _print(
        f"     query {sample.body['query']!r} in PostgreSQL: "
        f"{(query_s or 0) * 1000:.1f} ms; status {doc['status']} after {done_ms:.0f} ms, "
        f"attempts {doc['attempts']}"
    )
    _print(f"     result: {_short(doc['result'])}")
    pushed = state.received[before:]
    for entry in pushed:
        _print(f"     stand-in received: {entry.method} {entry.raw_path} -> {entry.status}")
        _print(f"       {_short(entry.body, 300)}")
    if doc["status"] != "delivered":
        _print(f"     error: {doc['error']}")
        return False
    return True


async def _show_refusal(client: httpx.AsyncClient) -> None:
    bad = _body("revenue", "enterprise", "2024-13-01_to_2024-12-31")
    response = await client.post("/webhook/cognigy-trigger", json=bad)
    _print(
        f"\n   [context] a typo in the flow (month 13): {response.status_code} "
        f"{response.json()} -- nothing queued"
    )


def _short(value: Any, limit: int = 160) -> str:
    text = ENCODER.encode(value).decode()
    return text if len(text) <= limit else text[: limit - 3] + "..."


def run_demo(rows: int = 1_000_000, data_dir: str = ".cognigy_offload/demo-pg") -> int:
    """Run the demo; returns the exit code."""
    logging.basicConfig(level=logging.WARNING)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    return anyio.run(_demo, rows, data_dir)
