"""Integration fixtures: the Cognigy stand-in, the service in-process, the service as a process.

Everything listens on 127.0.0.1 only.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from cognigy_offload.app import build_app
from cognigy_offload.config import Config, Secrets, dump_toml, parse_config
from cognigy_offload.serving import run_uvicorn
from cognigy_offload.sim import SimState, run_sim
from cognigy_offload.web import Service
from tests.conftest import ROOT, SAMPLE_BODY, merge, shipped_data

WEBHOOK_TOKEN = "test-webhook-token-0123456789"
CLIENT_SECRET = "test-client-secret-abcdef"
AUTH = {"Authorization": f"Bearer {WEBHOOK_TOKEN}"}

BODY = SAMPLE_BODY


def body(**changes: Any) -> dict[str, Any]:
    """The sample webhook body with some keys replaced (variables merged)."""
    result = {**BODY, "variables": dict(BODY["variables"])}
    for key, value in changes.items():
        if key == "variables":
            result["variables"].update(value)
        else:
            result[key] = value
    return result


def config_data(sim_url: str, **sections: dict[str, Any]) -> dict[str, Any]:
    """The shipped config.toml as a dict, pointed at the stand-in, fast retries, overrides."""
    test_defaults: dict[str, dict[str, Any]] = {
        "cognigy": {
            "api_url": sim_url,
            "endpoint_url": sim_url,
            "backoff_base_s": 0.01,
            "backoff_max_s": 0.05,
            "auth": {"client_id": "offload-test"},
        },
        "queue": {"workers": 4, "sweep_interval_s": 0.2, "lease_s": 2},
        "server": {"shutdown_grace_s": 5},
    }
    return merge(shipped_data(**test_defaults), sections)


SECRETS = Secrets(webhook_tokens=(WEBHOOK_TOKEN,), client_secret=CLIENT_SECRET, api_key="k" * 24)


@pytest.fixture
async def sim() -> AsyncIterator[tuple[SimState, str]]:
    """The Cognigy stand-in on loopback: (state, base URL)."""
    state = SimState(client_id="offload-test", client_secret=CLIENT_SECRET, api_key="k" * 24)
    async with run_sim(state) as url:
        yield state, url


@dataclass
class Running:
    """A service running in this process."""

    url: str
    service: Service
    client: httpx.AsyncClient
    config: Config

    async def post(self, payload: Any = None, **kwargs: Any) -> httpx.Response:
        """POST a webhook (the sample body unless given)."""
        return await self.client.post(
            "/webhook/cognigy-trigger", json=BODY if payload is None else payload, **kwargs
        )

    async def wait_status(self, task_id: str, statuses: set[str], timeout_s: float = 10) -> Any:
        """Poll the task document until its status is one of ``statuses``."""
        with anyio.fail_after(timeout_s):
            while True:
                doc = (await self.client.get(f"/tasks/{task_id}")).json()
                if doc.get("status") in statuses:
                    return doc
                await anyio.sleep(0.02)


@pytest.fixture
def service_factory(
    database: str, sim: tuple[SimState, str]
) -> Callable[..., contextlib.AbstractAsyncContextManager[Running]]:
    """Start the service in-process (real uvicorn on loopback) with config overrides."""

    @contextlib.asynccontextmanager
    async def start(**sections: dict[str, Any]) -> AsyncIterator[Running]:
        config = parse_config(config_data(sim[1], **sections))
        holder: dict[str, Service] = {}
        app = build_app(
            config, SECRETS, dsn=database, on_ready=lambda s: holder.__setitem__("service", s)
        )
        async with (
            run_uvicorn(app) as url,
            httpx.AsyncClient(base_url=url, headers=AUTH, timeout=30) as client,
        ):
            yield Running(url, holder["service"], client, config)

    return start


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Process:
    """``python -m cognigy_offload serve`` as a real child process."""

    port: int
    config_path: Path
    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    logs: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        """Start the process and wait until /healthz answers, without blocking the loop."""
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cognigy_offload", "serve", "--config", str(self.config_path)],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
        log.close()
        async with httpx.AsyncClient(timeout=0.5) as client:
            with anyio.fail_after(30):
                while True:
                    if self.proc.poll() is not None:
                        raise RuntimeError(
                            f"serve exited with {self.proc.returncode}:\n{self.output()}"
                        )
                    try:
                        if (await client.get(f"{self.url}/healthz")).status_code == 200:
                            return
                    except httpx.TransportError:
                        pass
                    await anyio.sleep(0.05)

    async def terminate(self, timeout_s: float = 30) -> int:
        """SIGTERM and wait without blocking the loop; returns the exit code."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        with anyio.fail_after(timeout_s):
            while self.proc.poll() is None:
                await anyio.sleep(0.05)
        return self.proc.returncode

    def kill(self) -> None:
        """kill -9."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@pytest.fixture
def process_factory(
    database: str, sim: tuple[SimState, str], tmp_path: Path
) -> Iterator[Callable[..., Process]]:
    """Make service processes on free ports sharing the test database and stand-in."""
    made: list[Process] = []

    def make(port: int | None = None, **sections: dict[str, Any]) -> Process:
        data = config_data(sim[1], **sections)
        data["server"]["port"] = port or free_port()
        data["server"]["log_format"] = "json"
        path = tmp_path / f"config-{len(made)}.toml"
        path.write_text(dump_toml(data))
        env = {k: v for k, v in os.environ.items() if not k.startswith("COGNIGY_OFFLOAD")}
        env.update(
            COGNIGY_OFFLOAD_WEBHOOK_TOKEN=WEBHOOK_TOKEN,
            COGNIGY_CLIENT_SECRET=CLIENT_SECRET,
            COGNIGY_OFFLOAD__DATABASE__DSN=database,
        )
        process = Process(data["server"]["port"], path, env, tmp_path / f"serve-{len(made)}.log")
        made.append(process)
        return process

    yield make
    for process in made:
        if process.proc is not None and process.proc.poll() is None:
            process.proc.kill()
            process.proc.wait(10)
