"""`python -m cognigy_offload bench`: measured throughput, latency, coalescing and memory.

One run starts everything it needs on this machine: PostgreSQL (embedded under
``.cognigy_offload/bench-pg`` with the 1,000,000-row demo table, or the server named by
``$COGNIGY_OFFLOAD__DATABASE__DSN``), the Cognigy stand-in without a rate limit (in this
process), and the service as a separate child process (same uvicorn settings as
``serve``: uvloop and httptools when installed) so the load generator never takes the
server's CPU. A bare Starlette endpoint, served the same way in another child, is the
yardstick for the accept path.

The load generator is a lean keep-alive HTTP/1.1 client on raw asyncio transports:
httpx costs more CPU per request than the server under test. Every figure is printed
next to its target and written as JSON for later comparison.

To hold jobs in the queue (accept path, memory) the bench takes an ACCESS EXCLUSIVE lock
on ``transactions`` (the "gate"): the first job's query waits for it and, as every job
asks the same question, the other workers coalesce onto that one run, so no worker
competes with the accept path for CPU and the rest of the jobs stay queued.

Every job the bench creates carries a ``conversationId`` starting with ``bench-``; they
are deleted after each phase, and nothing else in the job table is touched.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import math
import os
import platform
import secrets as random_secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import asyncpg
import msgspec

from .config import ENV_PREFIX, Config, dump_toml, parse_config

BENCH_DATA_DIR = ".cognigy_offload/bench-pg"
DEMO_ROWS = 1_000_000
MARK = "bench-"  # conversationId prefix of every job the bench creates
JOB_TABLE = "cognigy_offload_jobs"
WEBHOOK_PATH = "/webhook/cognigy-trigger"
STATS_PATH = "/_bench/stats"
SIM_CLIENT_ID = "bench-client"
HOST = "127.0.0.1"
SEGMENTS = ("enterprise", "mid_market", "smb", "startup", "public_sector")
RESULT_KEY = "offload"
# High enough that the outbound limiter never waits during a run.
RATE_LIMIT_PER_MINUTE = 10_000_000
CHILD_STOP_S = 30.0
READY_TIMEOUT_S = 60.0
DELIVERY_TIMEOUT_S = 120.0
GROUP_COMMIT_WINDOW_MS = 1.0  # the variant measured beside the shipped 0
COALESCING_RUNS = {
    "coalescing": "no cache, 30 ms query",
    "coalescing_slow": "no cache, 1 s query",
    "coalescing_cached": "cache_ttl_s",
}

REVENUE_SQL = """
SELECT count(*) AS count, coalesce(sum(amount), 0) AS total
FROM transactions
WHERE segment = $1 AND created_at >= $2 AND created_at < $3
"""
# The same aggregation made to take a second (pg_sleep in FROM runs once per query): a
# burst of webhooks then arrives while the runs go on, as with a real multi-second query.
REVENUE_SLOW_SQL = """
SELECT count(*) AS count, coalesce(sum(amount), 0) AS total
FROM transactions, pg_sleep(1.0)
WHERE segment = $1 AND created_at >= $2 AND created_at < $3
"""
TRIVIAL_SQL = "SELECT $1::int AS n"
REVENUE_PARAMS = ["customer_segment", "date_range.start", "date_range.end"]
QUERIES: dict[str, dict[str, Any]] = {
    "revenue": {"sql": REVENUE_SQL, "params": REVENUE_PARAMS},
    "revenue_cached": {"sql": REVENUE_SQL, "params": REVENUE_PARAMS, "cache_ttl_s": 600.0},
    "revenue_slow": {"sql": REVENUE_SLOW_SQL, "params": REVENUE_PARAMS},
    "trivial": {"sql": TRIVIAL_SQL, "params": ["n"]},
}


@dataclass(frozen=True)
class Plan:
    """How long and how hard each phase runs (``--quick`` shortens every window)."""

    name: str
    warm_s: float
    measure_s: float
    e2e_s: float
    levels: tuple[int, ...] = (1, 16, 64)
    e2e_trivial_c: int = 32
    e2e_revenue_c: int = 8
    inline_c: int = 16
    coalesce_jobs: int = 1000
    coalesce_sets: int = 10
    memory_jobs: int = 10_000
    paired_s: float = 2.0  # per query: jobs one at a time, each paired with a raw run
    # Throughput windows measured this many times; the median run is reported (this VM's
    # hypervisor takes CPU away for a minute or so at a time: one window can land in it).
    repeats: int = 1

    @classmethod
    def pick(cls, quick: bool) -> Plan:
        """The quick plan (build and debug) or the full one (the committed results)."""
        if quick:
            return cls("quick", warm_s=0.5, measure_s=1.5, e2e_s=2.0)
        # Pairs of a 30 ms query vary by several ms each: 15 s gives ~250 of them.
        return cls("full", warm_s=1.0, measure_s=5.0, e2e_s=6.0, paired_s=15.0, repeats=3)


# -- measuring ------------------------------------------------------------------------------


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    """The nearest-rank percentile of already sorted values (NaN when there are none)."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(fraction * len(sorted_values)))
    return float(sorted_values[min(rank, len(sorted_values)) - 1])


def latency_summary(latencies_s: Sequence[float]) -> dict[str, float]:
    """p50 / p99 / max in milliseconds."""
    ordered = sorted(latencies_s)
    return {
        "p50_ms": round(percentile(ordered, 0.50) * 1000, 3),
        "p99_ms": round(percentile(ordered, 0.99) * 1000, 3),
        "max_ms": round(ordered[-1] * 1000, 3) if ordered else math.nan,
    }


_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def process_cpu_s(pid: int) -> float:
    """User plus system CPU seconds a process has used so far (Linux /proc)."""
    if pid == os.getpid():
        times = os.times()
        return times.user + times.system
    with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
        # The command name may hold spaces: the fields we need follow its closing ')'.
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def machine_cpu_s() -> tuple[float, float]:
    """(busy, stolen) CPU seconds of the whole machine so far, over every core.

    Steal is time the hypervisor gave our virtual CPUs to someone else: not ours to use.
    """
    with open("/proc/stat", encoding="ascii") as stat:
        values = [int(v) for v in stat.readline().split()[1:]] + [0] * 8
    user, nice, system, _idle, _iowait, irq, softirq, steal = values[:8]
    return (user + nice + system + irq + softirq) / _CLK_TCK, steal / _CLK_TCK


def parent_pid(pid: int) -> int | None:
    """The parent of a local process, or None if there is no such process here."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            return int(stat.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def local_postmaster(backend_pid: int) -> int | None:
    """The postmaster of our backend if PostgreSQL runs on this machine, else None."""
    postmaster = parent_pid(backend_pid)
    try:
        with open(f"/proc/{backend_pid}/cmdline", "rb") as cmdline:
            is_postgres = b"postgres" in cmdline.read()
    except OSError:
        return None
    return postmaster if is_postgres else None


def process_tree_cpu_s(root_pid: int) -> float:
    """CPU seconds of a process and its direct children (PostgreSQL's postmaster and backends)."""
    total = 0.0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        if pid == root_pid or parent_pid(pid) == root_pid:
            with contextlib.suppress(OSError, ValueError, IndexError):
                total += process_cpu_s(pid)
    return total


def rss_mb(pid: int) -> dict[str, float]:
    """Resident memory now and at its peak (VmRSS, VmHWM) in MB."""
    found: dict[str, float] = {}
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                found[key] = round(int(value.split()[0]) / 1024, 1)
    return {"rss_mb": found.get("VmRSS", math.nan), "peak_rss_mb": found.get("VmHWM", math.nan)}


@dataclass
class CpuMark:
    """A snapshot of CPU counters, to be subtracted from a later one."""

    wall_s: float
    server_s: float
    loadgen_s: float
    postgres_s: float
    machine_busy_s: float
    steal_s: float

    @classmethod
    def take(cls, server_pid: int, postgres_pid: int | None) -> CpuMark:
        """Read every counter now (``postgres_pid``: the local postmaster, if known)."""
        busy, steal = machine_cpu_s()
        return cls(
            time.monotonic(),
            process_cpu_s(server_pid),
            process_cpu_s(os.getpid()),
            process_tree_cpu_s(postgres_pid) if postgres_pid else 0.0,
            busy,
            steal,
        )

    def until(self, later: CpuMark) -> dict[str, float]:
        """CPU use between the two marks, in percent of one core (the machine has 200)."""
        wall_s = max(later.wall_s - self.wall_s, 1e-9)

        def pct(seconds: float) -> float:
            return round(100 * seconds / wall_s, 1)

        server = later.server_s - self.server_s
        loadgen = later.loadgen_s - self.loadgen_s
        postgres = later.postgres_s - self.postgres_s
        machine = later.machine_busy_s - self.machine_busy_s
        return {
            "server_pct": pct(server),
            "loadgen_pct": pct(loadgen),
            "postgres_pct": pct(postgres),
            "others_pct": pct(max(machine - server - loadgen - postgres, 0.0)),
            "machine_pct": pct(machine),
            "steal_pct": pct(later.steal_s - self.steal_s),
        }


# -- the raw HTTP/1.1 load generator -----------------------------------------------------------


def parse_response(buffer: bytes | bytearray) -> tuple[int, bytes, int] | None:
    """(status, body, bytes used) of the first complete answer in ``buffer``, else None.

    Enough HTTP/1.1 for the answers uvicorn gives: a status line, headers, and a body of
    Content-Length bytes (chunked answers are not used by the routes we call).
    """
    end = buffer.find(b"\r\n\r\n")
    if end < 0:
        return None
    head = bytes(buffer[:end]).lower()
    length = 0
    at = head.find(b"\r\ncontent-length:")
    if at >= 0:
        stop = head.find(b"\r\n", at + 2)
        length = int(head[at + 17 : stop if stop >= 0 else len(head)])
    used = end + 4 + length
    if len(buffer) < used:
        return None
    return int(buffer[9:12]), bytes(buffer[end + 4 : used]), used


def build_request(path: str, body: bytes, headers: dict[str, str]) -> bytes:
    """The bytes of one POST with a JSON body."""
    lines = [f"POST {path} HTTP/1.1", f"Host: {HOST}", "Content-Type: application/json"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


class HttpConnection(asyncio.Protocol):
    """One keep-alive connection that sends a request and reads its answer, one at a time."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._transport: asyncio.Transport | None = None
        self._answer: asyncio.Future[tuple[int, bytes]] | None = None
        self.closed = False

    @classmethod
    async def open(cls, port: int) -> HttpConnection:
        """Connect to the loopback port."""
        loop = asyncio.get_running_loop()
        transport, protocol = await loop.create_connection(cls, HOST, port)
        # uvloop may call connection_made only after create_connection has returned.
        protocol._transport = transport
        return protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """asyncio callback."""
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods.
        self._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        """asyncio callback: complete the waiting request once its answer is whole."""
        self._buffer += data
        answer = self._answer
        if answer is None or answer.done():
            return
        parsed = parse_response(self._buffer)
        if parsed is not None:
            status, body, used = parsed
            del self._buffer[:used]
            answer.set_result((status, body))

    def connection_lost(self, exc: Exception | None) -> None:
        """asyncio callback."""
        self.closed = True
        if self._answer is not None and not self._answer.done():
            self._answer.set_exception(ConnectionError("the server closed the connection"))

    async def request(self, raw: bytes) -> tuple[int, bytes]:
        """Send one request and return (status, body)."""
        assert self._transport is not None
        answer: asyncio.Future[tuple[int, bytes]] = asyncio.get_running_loop().create_future()
        self._answer = answer
        self._transport.write(raw)
        try:
            return await answer
        finally:
            self._answer = None

    def close(self) -> None:
        """Close the connection."""
        if self._transport is not None:
            self._transport.close()


class _Conn:
    """A connection that reconnects when the server closed it while idle (keep-alive timeout)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.http: HttpConnection | None = None

    async def request(self, raw: bytes) -> tuple[int, bytes]:
        if self.http is None or self.http.closed:
            self.http = await HttpConnection.open(self.port)
        return await self.http.request(raw)

    def close(self) -> None:
        if self.http is not None:
            self.http.close()


@dataclass
class LoadResult:
    """What a load run saw: latencies of measured requests, status counts, CPU use."""

    latencies_s: list[float] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    window_s: float = 0.0
    cpu: dict[str, float] = field(default_factory=dict)
    errors: int = 0

    @property
    def rate(self) -> float:
        """Measured requests per second."""
        return len(self.latencies_s) / self.window_s if self.window_s > 0 else math.nan

    def summary(self) -> dict[str, Any]:
        """The JSON form."""
        return {
            "requests": len(self.latencies_s),
            "per_s": round(self.rate, 1),
            **latency_summary(self.latencies_s),
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "connection_errors": self.errors,
            "cpu": self.cpu,
        }


async def hammer(
    port: int,
    pids: tuple[int, int | None],
    request_for: Callable[[int], bytes],
    concurrency: int,
    warm_s: float,
    measure_s: float,
) -> LoadResult:
    """Closed loop: ``concurrency`` connections send back to back; measure after warm-up.

    ``pids`` are the server's and the local postmaster's, for the CPU figures.
    """
    result = LoadResult(window_s=measure_s)
    start = time.monotonic() + warm_s
    end = start + measure_s
    counter = iter(range(sys.maxsize))
    marks: list[CpuMark] = []

    async def client() -> None:
        conn = _Conn(port)
        try:
            while (sent := time.monotonic()) < end:
                raw = request_for(next(counter))
                try:
                    status, _ = await conn.request(raw)
                except (ConnectionError, OSError):
                    result.errors += 1
                    continue
                if sent >= start:
                    result.latencies_s.append(time.monotonic() - sent)
                    result.statuses[status] += 1
        finally:
            conn.close()

    async def marker() -> None:
        await anyio.sleep(max(start - time.monotonic(), 0))
        marks.append(CpuMark.take(*pids))
        await anyio.sleep(max(end - time.monotonic(), 0))
        marks.append(CpuMark.take(*pids))

    async with anyio.create_task_group() as tg:
        tg.start_soon(marker)
        for _ in range(concurrency):
            tg.start_soon(client)
    result.cpu = marks[0].until(marks[1])
    return result


def constant(raw: bytes) -> Callable[[int], bytes]:
    """A request maker that always sends the same bytes."""
    return lambda _: raw


async def burst(
    port: int, requests: Sequence[bytes], concurrency: int
) -> tuple[list[tuple[int, bytes]], float]:
    """Send every request once over ``concurrency`` connections; (answers in order, seconds)."""
    answers: list[tuple[int, bytes]] = [(0, b"")] * len(requests)
    indices = iter(range(len(requests)))
    started = time.monotonic()

    async def client() -> None:
        conn = _Conn(port)
        try:
            for index in indices:
                try:
                    answers[index] = await conn.request(requests[index])
                except (ConnectionError, OSError):
                    answers[index] = (0, b"")
        finally:
            conn.close()

    async with anyio.create_task_group() as tg:
        for _ in range(concurrency):
            tg.start_soon(client)
    return answers, time.monotonic() - started


class _TaskId(msgspec.Struct):
    taskId: str


_TASK_ID = msgspec.json.Decoder(_TaskId)


def task_id_of(body: bytes) -> str | None:
    """The taskId of a 202 (or inline 200) answer."""
    try:
        return _TASK_ID.decode(body).taskId
    except msgspec.DecodeError:
        return None


class Deliveries:
    """Matches the stand-in's received deliveries to task ids (one watcher task)."""

    def __init__(self, state: Any) -> None:
        self.state = state
        self.arrived: dict[str, tuple[float, Any]] = {}
        self._events: dict[str, anyio.Event] = {}
        self._seen = 0

    async def watch(self) -> None:
        """Run until cancelled: record each delivery's time and result by taskId."""
        while True:
            await self.state.wait_received(self._seen + 1)
            fresh = self.state.received[self._seen :]
            self._seen += len(fresh)
            for entry in fresh:
                task_id, result = _delivered_task(entry.body)
                if task_id is None or task_id in self.arrived:
                    continue
                self.arrived[task_id] = (entry.received_at, result)
                event = self._events.pop(task_id, None)
                if event is not None:
                    event.set()

    async def wait(self, task_id: str, timeout_s: float = DELIVERY_TIMEOUT_S) -> float | None:
        """When ``task_id`` was delivered (monotonic); None if not within ``timeout_s``."""
        if task_id not in self.arrived:
            event = self._events.setdefault(task_id, anyio.Event())
            with anyio.move_on_after(timeout_s):
                await event.wait()
        found = self.arrived.get(task_id)
        return found[0] if found is not None else None


def _delivered_task(body: Any) -> tuple[str | None, Any]:
    try:
        obj = dict(body["context"][RESULT_KEY])
    except (KeyError, TypeError):
        return None, None
    task_id = obj.pop("taskId", None)
    obj.pop("timestamp", None)
    return (task_id if isinstance(task_id, str) else None), obj


# -- what the jobs ask ------------------------------------------------------------------------


def revenue_variables(index: int) -> dict[str, Any]:
    """A distinct revenue question per index (segment and a one-year window)."""
    start = dt.date(2023, 1, 1) + dt.timedelta(days=(index // len(SEGMENTS)) % 700)
    last = start + dt.timedelta(days=364)
    return {
        "customer_segment": SEGMENTS[index % len(SEGMENTS)],
        "date_range": f"{start.isoformat()}_to_{last.isoformat()}",
    }


def revenue_args(index: int) -> list[Any]:
    """The same question as asyncpg arguments, bound as the catalog binds them."""
    variables = revenue_variables(index)
    first, last = (dt.date.fromisoformat(d) for d in variables["date_range"].split("_to_"))

    def midnight(day: dt.date) -> dt.datetime:
        return dt.datetime.combine(day, dt.time(), tzinfo=dt.UTC)

    return [
        variables["customer_segment"],
        midnight(first),
        midnight(last + dt.timedelta(days=1)),
    ]


def webhook_body(conversation: str, query: str, variables: dict[str, Any]) -> bytes:
    """A webhook body in the shape of SPEC §2 (context delivery)."""
    return msgspec.json.encode(
        {
            "conversationId": f"{MARK}{conversation}",
            "userId": f"usr_{conversation}",
            "sessionId": f"sess_{conversation}",
            "URLToken": "bench",
            "query": query,
            "variables": {**variables, "aggregation_type": query},
        }
    )


# -- child processes -------------------------------------------------------------------------


def free_port() -> int:
    """A free loopback TCP port."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def service_config(port: int, sim_url: str, **sections: dict[str, Any]) -> dict[str, Any]:
    """The bench service's config: defaults, the stand-in, the bench queries, overrides."""
    data: dict[str, Any] = msgspec.to_builtins(Config())
    data["server"].update(port=port, host=HOST, log_format="json", log_level="info")
    data["queue"].update(group_commit_ms=0.0)
    data["cognigy"].update(
        api_url=sim_url, endpoint_url=sim_url, rate_limit_per_minute=RATE_LIMIT_PER_MINUTE
    )
    data["cognigy"]["auth"].update(client_id=SIM_CLIENT_ID)
    data["queries"] = {name: dict(query) for name, query in QUERIES.items()}
    for section, values in sections.items():
        data[section].update(values)
    parse_config(data)  # refuse a bad bench config here, not in the child
    return data


@dataclass
class Child:
    """A server child process (the service or the bare endpoint)."""

    kind: str
    port: int
    process: anyio.abc.Process
    log_path: Path

    @property
    def pid(self) -> int:
        """The child's process id."""
        return self.process.pid

    def log_tail(self, lines: int = 30) -> str:
        """The end of the child's output, for error messages."""
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


@dataclass
class Env:
    """What every phase shares: the database, the stand-in, a scratch directory, secrets."""

    dsn: str
    sim_state: Any
    sim_url: str
    workdir: Path
    webhook_token: str
    client_secret: str
    deliveries: Deliveries
    postgres_pid: int | None = None

    @property
    def auth(self) -> dict[str, str]:
        """The webhook auth header."""
        return {"Authorization": f"Bearer {self.webhook_token}"}


@contextlib.asynccontextmanager
async def run_child(
    env: Env, kind: str, config: dict[str, Any] | None = None
) -> AsyncIterator[Child]:
    """Start ``python -m cognigy_offload.bench --child KIND``, wait until it answers, stop it."""
    port = free_port() if config is None else int(config["server"]["port"])
    name = f"{kind}-{port}"
    config_path = env.workdir / f"{name}.toml"
    config_path.write_text(dump_toml(config or {}))
    log_path = env.workdir / f"{name}.log"
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("COGNIGY_OFFLOAD")}
    child_env.update(
        COGNIGY_OFFLOAD_WEBHOOK_TOKEN=env.webhook_token,
        COGNIGY_CLIENT_SECRET=env.client_secret,
        COGNIGY_OFFLOAD__DATABASE__DSN=env.dsn,
    )
    command = [sys.executable, "-m", "cognigy_offload.bench", "--child", kind]
    command += ["--config", str(config_path), "--port", str(port)]
    with log_path.open("ab") as log:
        process = await anyio.open_process(
            command, env=child_env, stdout=log, stderr=subprocess.STDOUT
        )
    child = Child(kind, port, process, log_path)
    try:
        await _wait_ready(child)
        yield child
    finally:
        with anyio.CancelScope(shield=True):
            await _stop(child)


async def _wait_ready(child: Child) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if child.process.returncode is not None:
            raise RuntimeError(f"the {child.kind} child exited:\n{child.log_tail()}")
        with contextlib.suppress(OSError, TimeoutError):
            status, _ = await http_get(child.port, "/healthz", timeout_s=1.0)
            if status == 200:
                return
        await anyio.sleep(0.05)
    raise RuntimeError(f"the {child.kind} child did not answer:\n{child.log_tail()}")


async def http_get(port: int, path: str, timeout_s: float = 10.0) -> tuple[int, bytes]:
    """One GET on a fresh connection; TimeoutError after ``timeout_s``."""
    with anyio.fail_after(timeout_s):
        conn = await HttpConnection.open(port)
        try:
            return await conn.request(f"GET {path} HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
        finally:
            conn.close()


async def _stop(child: Child) -> None:
    if child.process.returncode is None:
        child.process.send_signal(signal.SIGTERM)
        with anyio.move_on_after(CHILD_STOP_S):
            await child.process.wait()
    if child.process.returncode is None:
        child.process.kill()
        await child.process.wait()


async def get_json(port: int, path: str) -> Any:
    """GET a JSON route of a child."""
    status, body = await http_get(port, path)
    if status != 200:
        raise RuntimeError(f"GET {path} answered {status}: {body[:200]!r}")
    return msgspec.json.decode(body)


async def stats(child: Child) -> dict[str, Any]:
    """The service child's internal counters (Store.batches, Executor.runs, queue depth)."""
    found: dict[str, Any] = await get_json(child.port, STATS_PATH)
    return found


async def metric_sum(child: Child, name: str, labels: dict[str, str] | None = None) -> float:
    """The sum of one Prometheus series (over the label values not given) from /metrics."""
    _, body = await http_get(child.port, "/metrics")
    total = 0.0
    for line in body.decode().splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        series, _, value = line.rpartition(" ")
        if all(f'{k}="{v}"' in series for k, v in (labels or {}).items()):
            total += float(value)
    return total


# -- the database ----------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def open_bench_database(log: Callable[[str], None]) -> AsyncIterator[tuple[str, bool]]:
    """(dsn, embedded): $COGNIGY_OFFLOAD__DATABASE__DSN, else the embedded bench server."""
    given = os.environ.get(f"{ENV_PREFIX}DATABASE__DSN", "")
    if given:
        yield given, False
        return
    from .db import EmbeddedPostgres

    log(f"starting embedded PostgreSQL under {BENCH_DATA_DIR} ...")
    server = EmbeddedPostgres(BENCH_DATA_DIR)
    dsn = await anyio.to_thread.run_sync(server.start)
    try:
        yield dsn, True
    finally:
        await anyio.to_thread.run_sync(server.stop)


async def delete_bench_jobs(dsn: str) -> int:
    """Delete the jobs this bench made (and only those)."""
    conn = await asyncpg.connect(dsn)
    try:
        if await conn.fetchval("SELECT to_regclass($1)", JOB_TABLE) is None:
            return 0
        result: str = await conn.execute(
            f"DELETE FROM {JOB_TABLE} WHERE target->>'conversationId' LIKE $1", MARK + "%"
        )
        return int(result.split()[-1])
    finally:
        await conn.close()


@contextlib.asynccontextmanager
async def gate(dsn: str) -> AsyncIterator[None]:
    """Hold every query on ``transactions`` (ACCESS EXCLUSIVE lock) until the block ends."""
    conn = await asyncpg.connect(dsn)
    try:
        transaction = conn.transaction()
        await transaction.start()
        await conn.execute("LOCK TABLE transactions IN ACCESS EXCLUSIVE MODE")
        try:
            yield
        finally:
            await transaction.rollback()
    finally:
        await conn.close()


async def batch_sizes(dsn: str, conversation: str) -> dict[str, Any]:
    """Jobs per INSERT for one conversationId: rows of one INSERT share a transaction id.

    Only valid while the rows are untouched since their insert (the gate keeps workers
    off them and the sweeper is pushed out of the run).
    """
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            f"""SELECT count(*) AS size FROM {JOB_TABLE}
                WHERE target->>'conversationId' = $1 GROUP BY xmin::text""",
            MARK + conversation,
        )
    finally:
        await conn.close()
    sizes = sorted(int(r["size"]) for r in rows)
    if not sizes:
        return {"inserts": 0}
    return {
        "inserts": len(sizes),
        "jobs": sum(sizes),
        "mean": round(sum(sizes) / len(sizes), 2),
        "p50": percentile(sizes, 0.5),
        "p90": percentile(sizes, 0.9),
        "max": sizes[-1],
    }


# -- phases ---------------------------------------------------------------------------------


def accept_config(env: Env, group_commit_ms: float) -> dict[str, Any]:
    """The accept-path service: room for every job, the sweeper kept out of the window.

    The sweeper's lease renewal rewrites every held row, a cost of the gate's artificial
    backlog of tens of thousands of jobs, not of accepting; it also would change the
    rows' xmin, which the batch-size count reads.
    """
    return service_config(
        free_port(),
        env.sim_url,
        queue={
            "capacity": 1_000_000,
            "sweep_interval_s": 3600.0,
            "lease_s": 7200.0,
            "group_commit_ms": group_commit_ms,
        },
        database={"statement_timeout_ms": 3_600_000},
    )


async def accept_level(
    env: Env, plan: Plan, child: Child, concurrency: int, conversation: str
) -> dict[str, Any]:
    """Webhooks back to back on ``concurrency`` connections to one child; group-commit counts."""
    raw = build_request(
        WEBHOOK_PATH, webhook_body(conversation, "revenue", revenue_variables(0)), env.auth
    )
    is_service = child.kind == "service"
    before = await stats(child) if is_service else {}
    load = await hammer(
        child.port,
        (child.pid, env.postgres_pid),
        constant(raw),
        concurrency,
        plan.warm_s,
        plan.measure_s,
    )
    result = load.summary()
    if is_service:
        after = await stats(child)
        accepted = after["accepted"] - before["accepted"]
        batches = after["batches"] - before["batches"]
        result["group_commit"] = {
            "accepted": accepted,
            "insert_batches": batches,
            "jobs_per_batch": round(accepted / batches, 2) if batches else None,
            "by_xmin": await batch_sizes(env.dsn, conversation),
        }
    return result


def median_run(runs: Sequence[dict[str, Any]], key: str) -> dict[str, Any]:
    """The run with the median ``key`` (the middle one of an odd count), with every run's
    ``key`` and steal beside it."""
    ordered = sorted(runs, key=lambda r: r[key])
    chosen = dict(ordered[len(ordered) // 2])
    if len(runs) > 1:
        chosen["runs"] = [r[key] for r in runs]
        chosen["runs_steal_pct"] = [r["cpu"].get("steal_pct") for r in runs]
    return chosen


async def phase_accept(env: Env, plan: Plan, log: Callable[[str], None]) -> dict[str, Any]:
    """1 and 5: webhook req/s and latency beside a bare endpoint; group-commit batch sizes.

    Workers are held at the gate (see the module docstring) so only the accept path runs.
    """
    results: dict[str, Any] = {"levels": {}, "group_commit_window": {}}
    async with (
        run_child(env, "bare") as bare,
        run_child(env, "service", accept_config(env, 0.0)) as service,
        gate(env.dsn),
    ):
        for concurrency in plan.levels:
            # Bare then full at each level, so drift in the shared machine's load hits both.
            bares, fulls = [], []
            for _ in range(plan.repeats):
                bares.append(await accept_level(env, plan, bare, concurrency, ""))
                fulls.append(await accept_level(env, plan, service, concurrency, f"a{concurrency}"))
            level = {"bare": median_run(bares, "per_s"), "service": median_run(fulls, "per_s")}
            level["group_commit"] = level["service"].pop("group_commit")
            level["ratio"] = round(level["service"]["per_s"] / level["bare"]["per_s"], 3)
            results["levels"][str(concurrency)] = level
            log(
                f"  accept c={concurrency}: bare {level['bare']['per_s']:,.0f}/s, "
                f"full {level['service']['per_s']:,.0f}/s "
                f"p99 {level['service']['p99_ms']:.1f} ms, "
                f"{level['group_commit']['jobs_per_batch']} jobs/INSERT"
            )
        results["rss_after_mb"] = rss_mb(service.pid)
    # The stopped service handed its backlog back; the next one must not pick it up.
    await delete_bench_jobs(env.dsn)
    # The same with a group-commit window, at the lowest and highest concurrency.
    async with (
        run_child(env, "service", accept_config(env, GROUP_COMMIT_WINDOW_MS)) as windowed,
        gate(env.dsn),
    ):
        for concurrency in (min(plan.levels), max(plan.levels)):
            run = await accept_level(env, plan, windowed, concurrency, f"w{concurrency}")
            results["group_commit_window"][str(concurrency)] = run
            log(
                f"  accept c={concurrency}, group_commit_ms={GROUP_COMMIT_WINDOW_MS:g}: "
                f"{run['per_s']:,.0f}/s p99 {run['p99_ms']:.1f} ms, "
                f"{run['group_commit']['jobs_per_batch']} jobs/INSERT"
            )
    return results


async def e2e_closed_loop(
    env: Env,
    child: Child,
    make_body: Callable[[int], bytes],
    concurrency: int,
    warm_s: float,
    measure_s: float,
    headers: dict[str, str] | None = None,
) -> dict[str, Any]:
    """``concurrency`` conversations: each sends a webhook and waits for its delivery."""
    start = time.monotonic() + warm_s
    end = start + measure_s
    pairs: list[tuple[float, float]] = []
    statuses: Counter[int] = Counter()
    lost = 0
    counter = iter(range(sys.maxsize))
    all_headers = {**env.auth, **(headers or {})}
    marks: list[CpuMark] = []

    async def conversation() -> None:
        nonlocal lost
        conn = _Conn(child.port)
        try:
            while time.monotonic() < end:
                raw = build_request(WEBHOOK_PATH, make_body(next(counter)), all_headers)
                sent = time.monotonic()
                try:
                    status, body = await conn.request(raw)
                except (ConnectionError, OSError):
                    lost += 1
                    continue
                statuses[status] += 1
                task_id = task_id_of(body) if status == 202 else None
                if task_id is None:
                    continue
                delivered = await env.deliveries.wait(task_id)
                if delivered is None:
                    lost += 1
                    continue
                pairs.append((sent, delivered))
        finally:
            conn.close()

    async def marker() -> None:
        await anyio.sleep(max(start - time.monotonic(), 0))
        marks.append(CpuMark.take(child.pid, env.postgres_pid))
        await anyio.sleep(max(end - time.monotonic(), 0))
        marks.append(CpuMark.take(child.pid, env.postgres_pid))

    async with anyio.create_task_group() as tg:
        tg.start_soon(marker)
        for _ in range(concurrency):
            tg.start_soon(conversation)
    done_in_window = [p for p in pairs if start <= p[1] < end]
    latencies = [d - s for s, d in pairs if s >= start]
    return {
        "concurrency": concurrency,
        "jobs": len(done_in_window),
        "jobs_per_s": round(len(done_in_window) / measure_s, 1),
        **latency_summary(latencies),
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "lost": lost,
        "cpu": marks[0].until(marks[1]),
    }


async def paired_overhead(
    env: Env,
    child: Child,
    make_body: Callable[[int], bytes],
    sql: str,
    args_for: Callable[[int], list[Any]],
    measure_s: float,
) -> dict[str, Any]:
    """Overhead per job, paired: each job (webhook to delivery, one at a time) goes with
    the same query with the same arguments straight through asyncpg, so both see the
    machine in the same state; the overhead is the median of the per-pair differences.
    The order alternates: whichever runs second finds the rows the first one read in
    PostgreSQL's buffers, and that advantage must not always go to the same side."""
    conn = await asyncpg.connect(env.dsn)
    pairs: list[tuple[float, float]] = []
    try:
        await conn.fetch(sql, *args_for(10**6))  # prepare outside the window
        http = _Conn(child.port)
        end = time.monotonic() + measure_s
        index = 5_000_000  # parameter sets apart from the other runs'
        try:
            while time.monotonic() < end:
                index += 1
                raw_s = await _timed_query(conn, sql, args_for(index)) if index % 2 else 0.0
                raw_request = build_request(WEBHOOK_PATH, make_body(index), env.auth)
                sent = time.monotonic()
                status, body = await http.request(raw_request)
                task_id = task_id_of(body) if status == 202 else None
                delivered = await env.deliveries.wait(task_id) if task_id else None
                if delivered is None:
                    continue
                if not index % 2:
                    raw_s = await _timed_query(conn, sql, args_for(index))
                pairs.append((delivered - sent, raw_s))
        finally:
            http.close()
    finally:
        await conn.close()
    differences = sorted(e - r for e, r in pairs)
    e2e = latency_summary([e for e, _ in pairs])
    raw = latency_summary([r for _, r in pairs])
    return {
        "pairs": len(pairs),
        "e2e_p50_ms": e2e["p50_ms"],
        "raw_p50_ms": raw["p50_ms"],
        "overhead_ms": round(percentile(differences, 0.5) * 1000, 3) if differences else None,
        "ratio": round(e2e["p50_ms"] / raw["p50_ms"], 2) if raw["p50_ms"] else None,
    }


async def _timed_query(conn: asyncpg.Connection, sql: str, args: list[Any]) -> float:
    started = time.monotonic()
    await conn.fetch(sql, *args)
    return time.monotonic() - started


async def raw_queries(
    dsn: str, sql: str, args_for: Callable[[int], list[Any]], concurrency: int, measure_s: float
) -> dict[str, Any]:
    """The same query run directly through asyncpg: latency and queries/s."""
    latencies: list[float] = []
    counter = iter(range(sys.maxsize))
    end = time.monotonic() + measure_s

    async def runner() -> None:
        conn = await asyncpg.connect(dsn)
        try:
            await conn.fetch(sql, *args_for(10**6))  # prepare outside the window
            while time.monotonic() < end:
                args = args_for(next(counter))
                sent = time.monotonic()
                await conn.fetch(sql, *args)
                latencies.append(time.monotonic() - sent)
        finally:
            await conn.close()

    async with anyio.create_task_group() as tg:
        for _ in range(concurrency):
            tg.start_soon(runner)
    return {
        "concurrency": concurrency,
        "queries": len(latencies),
        "per_s": round(len(latencies) / measure_s, 1),
        **latency_summary(latencies),
    }


async def inline_loop(
    env: Env, child: Child, concurrency: int, warm_s: float, measure_s: float
) -> dict[str, Any]:
    """7: Prefer: wait=5 on the trivial query; every answer must be 200 'answered'."""
    answered: list[str] = []
    statuses: Counter[str] = Counter()

    def request_for(index: int) -> bytes:
        body = webhook_body(f"i{index}", "trivial", {"n": index})
        return build_request(WEBHOOK_PATH, body, {**env.auth, "Prefer": "wait=5"})

    # hammer() only keeps statuses; the document is checked on a sample afterwards.
    load = await hammer(
        child.port, (child.pid, env.postgres_pid), request_for, concurrency, warm_s, measure_s
    )
    sample = [request_for(10**8 + i) for i in range(50)]
    answers, _ = await burst(child.port, sample, concurrency)
    for status, body in answers:
        document = msgspec.json.decode(body) if body else {}
        statuses[f"{status} {document.get('status')}"] += 1
        if status == 200 and document.get("status") == "answered" and document.get("result"):
            answered.append(document["taskId"])
    # Give any (wrong) push a moment to arrive before checking none did.
    await anyio.sleep(0.5)
    pushed = sum(1 for task_id in answered if task_id in env.deliveries.arrived)
    return {
        **load.summary(),
        "sample_answers": dict(statuses),
        "sample_pushed_to_cognigy": pushed,
    }


async def coalesce(env: Env, child: Child, query: str, plan: Plan, tag: str) -> dict[str, Any]:
    """3: ``coalesce_jobs`` webhooks asking ``coalesce_sets`` questions; count query runs."""
    sets = [revenue_variables(1000 + 37 * i) for i in range(plan.coalesce_sets)]
    bodies = [
        build_request(WEBHOOK_PATH, webhook_body(f"{tag}{i}", query, sets[i % len(sets)]), env.auth)
        for i in range(plan.coalesce_jobs)
    ]
    runs_before = await metric_sum(child, "cognigy_offload_queries_total", {"query": query})
    stats_before = await stats(child)
    started = time.monotonic()
    answers, accept_s = await burst(child.port, bodies, 64)
    task_ids = [task_id_of(body) if status == 202 else None for status, body in answers]
    results_by_set: dict[int, set[str]] = {}
    last = started
    delivered = 0
    for index, task_id in enumerate(task_ids):
        if task_id is None:
            continue
        at = await env.deliveries.wait(task_id)
        if at is None:
            continue
        delivered += 1
        last = max(last, at)
        result = env.deliveries.arrived[task_id][1]
        results_by_set.setdefault(index % len(sets), set()).add(json.dumps(result, default=str))
    runs = await metric_sum(child, "cognigy_offload_queries_total", {"query": query}) - runs_before
    stats_after = await stats(child)
    return {
        "query": query,
        "webhooks": len(bodies),
        "accepted": sum(1 for t in task_ids if t is not None),
        "delivered": delivered,
        "distinct_parameter_sets": len(sets),
        "queries_run": int(runs),
        "executor_runs": stats_after["runs"] - stats_before["runs"],
        "one_result_per_set": all(len(r) == 1 for r in results_by_set.values()),
        "accept_s": round(accept_s, 3),
        "all_delivered_s": round(last - started, 3),
    }


async def phase_e2e(env: Env, plan: Plan, log: Callable[[str], None]) -> dict[str, Any]:
    """2, 3 and 7: webhook to delivery, overhead beyond raw asyncpg, coalescing, inline."""
    port = free_port()
    config = service_config(port, env.sim_url, queue={"capacity": 20_000})
    results: dict[str, Any] = {}
    warm_s, measure_s = plan.warm_s, plan.e2e_s
    async with run_child(env, "service", config) as service:

        def trivial(index: int) -> bytes:
            return webhook_body(f"t{index}", "trivial", {"n": index})

        def revenue(index: int) -> bytes:
            return webhook_body(f"r{index}", "revenue", revenue_variables(index))

        def trivial_args(index: int) -> list[Any]:
            return [index]

        runs = [
            ("trivial_c1", trivial, 1),
            ("trivial", trivial, plan.e2e_trivial_c),
            ("revenue_c1", revenue, 1),
            ("revenue", revenue, plan.e2e_revenue_c),
        ]
        for name, make_body, concurrency in runs:
            repeats = plan.repeats if concurrency > 1 else 1
            results[name] = median_run(
                [
                    await e2e_closed_loop(env, service, make_body, concurrency, warm_s, measure_s)
                    for _ in range(repeats)
                ],
                "jobs_per_s",
            )
            r = results[name]
            log(
                f"  e2e {name}: {r['jobs_per_s']:,.1f} jobs/s, p50 {r['p50_ms']:.1f} ms, "
                f"p99 {r['p99_ms']:.1f} ms (c={concurrency})"
            )
        raw_runs = [
            ("raw_trivial_c1", TRIVIAL_SQL, trivial_args, 1),
            ("raw_trivial", TRIVIAL_SQL, trivial_args, plan.e2e_trivial_c),
            ("raw_revenue_c1", REVENUE_SQL, revenue_args, 1),
            ("raw_revenue", REVENUE_SQL, revenue_args, plan.e2e_revenue_c),
        ]
        for name, sql, args_for, concurrency in raw_runs:
            # Raw asyncpg keeps one connection per concurrent runner, like a worker has.
            results[name] = await raw_queries(
                env.dsn, sql, args_for, min(concurrency, 10), plan.measure_s
            )
            r = results[name]
            log(f"  raw {name}: {r['per_s']:,.1f}/s, p50 {r['p50_ms']:.2f} ms")
        for query, make_body, sql, args_for in (
            ("trivial", trivial, TRIVIAL_SQL, trivial_args),
            ("revenue", revenue, REVENUE_SQL, revenue_args),
        ):
            paired = await paired_overhead(env, service, make_body, sql, args_for, plan.paired_s)
            results[f"overhead_{query}"] = {
                **paired,
                "throughput_vs_raw": round(
                    results[query]["jobs_per_s"] / results[f"raw_{query}"]["per_s"], 3
                ),
            }
            log(
                f"  overhead {query}: e2e p50 {paired['e2e_p50_ms']:.2f} ms, raw p50 "
                f"{paired['raw_p50_ms']:.2f} ms, median difference {paired['overhead_ms']} ms "
                f"({paired['pairs']} pairs)"
            )
        results["inline"] = await inline_loop(env, service, plan.inline_c, warm_s, measure_s)
        log(
            f"  inline Prefer: wait=5: {results['inline']['per_s']:,.0f}/s, "
            f"p99 {results['inline']['p99_ms']:.1f} ms, "
            f"sample {results['inline']['sample_answers']}"
        )
        results["coalescing"] = await coalesce(env, service, "revenue", plan, "cn")
        results["coalescing_slow"] = await coalesce(env, service, "revenue_slow", plan, "cs")
        results["coalescing_cached"] = await coalesce(env, service, "revenue_cached", plan, "cc")
        for key in COALESCING_RUNS:
            c = results[key]
            log(
                f"  {key}: {c['queries_run']} queries for {c['delivered']} delivered jobs, "
                f"{c['distinct_parameter_sets']} parameter sets"
            )
        results["rss_after_mb"] = rss_mb(service.pid)
        results["counters"] = await stats(service)
        results["stand_in"] = {
            "token_requests": env.sim_state.token_requests,
            "deliveries_received": len(env.sim_state.received),
        }
    return results


async def phase_memory(env: Env, plan: Plan, log: Callable[[str], None]) -> dict[str, Any]:
    """4: the server's RSS with ``memory_jobs`` jobs queued behind the gate."""
    port = free_port()
    config = service_config(
        port,
        env.sim_url,
        queue={"capacity": plan.memory_jobs + 1000},
        database={"statement_timeout_ms": 3_600_000},
    )
    async with run_child(env, "service", config) as service, gate(env.dsn):
        idle = rss_mb(service.pid)
        bodies = [
            build_request(
                WEBHOOK_PATH, webhook_body(f"m{i}", "revenue", revenue_variables(0)), env.auth
            )
            for i in range(plan.memory_jobs)
        ]
        answers, accept_s = await burst(service.port, bodies, 64)
        accepted = sum(1 for status, _ in answers if status == 202)
        counters = await stats(service)
        loaded = rss_mb(service.pid)
    result = {
        "jobs_accepted": accepted,
        "queue_depth": counters["queue_depth"],
        "accept_s": round(accept_s, 2),
        "idle": idle,
        "queued": loaded,
        "delta_mb": round(loaded["rss_mb"] - idle["rss_mb"], 1),
        "bytes_per_queued_job": round(
            (loaded["rss_mb"] - idle["rss_mb"]) * 1024 * 1024 / max(accepted, 1)
        ),
    }
    log(
        f"  memory: {loaded['rss_mb']} MB RSS with {counters['queue_depth']:,} queued "
        f"(idle {idle['rss_mb']} MB)"
    )
    return result


# -- the report -----------------------------------------------------------------------------


def cpu_text(cpu: dict[str, float]) -> str:
    """CPU use in percent of one core: server / PostgreSQL / load generator / others."""
    return (
        f"cpu srv {cpu['server_pct']:.0f} pg {cpu['postgres_pct']:.0f} "
        f"gen {cpu['loadgen_pct']:.0f} other {cpu['others_pct']:.0f} "
        f"steal {cpu['steal_pct']:.0f}%"
    )


@dataclass
class Row:
    """One line of the printed table."""

    measure: str
    measured: str
    target: str = ""
    ok: bool | None = None


def report_rows(results: dict[str, Any]) -> list[Row]:
    """The table of figures and ratios, each next to its target."""
    rows: list[Row] = []
    accept = results["accept"]["levels"]
    for level, data in accept.items():
        bare, full, commit = data["bare"], data["service"], data["group_commit"]
        rows.append(
            Row(
                f"1 accept c={level} bare",
                f"{bare['per_s']:>8,.0f} req/s  p50 {bare['p50_ms']:6.2f}  "
                f"p99 {bare['p99_ms']:6.2f} ms  {cpu_text(bare['cpu'])}",
            )
        )
        is_top = level == str(max(int(k) for k in accept))
        rows.append(
            Row(
                f"1 accept c={level} full",
                f"{full['per_s']:>8,.0f} req/s  p50 {full['p50_ms']:6.2f}  "
                f"p99 {full['p99_ms']:6.2f} ms  {cpu_text(full['cpu'])}",
                "p99 < 20 ms" if is_top else "",
                full["p99_ms"] < 20 if is_top else None,
            )
        )
        if "runs" in full:
            rows.append(
                Row(
                    f"1 accept c={level} runs",
                    f"median of bare {runs_text(bare)} and full {runs_text(full)} req/s",
                )
            )
        rows.append(
            Row(
                f"1 accept c={level} full/bare",
                f"{data['ratio']:.0%}",
                ">= 50%" if is_top else "",
                data["ratio"] >= 0.5 if is_top else None,
            )
        )
        by_xmin = commit["by_xmin"]
        rows.append(
            Row(
                f"5 group commit c={level}",
                f"{commit['accepted']:,} jobs in {commit['insert_batches']:,} INSERTs "
                f"({commit['jobs_per_batch']}/INSERT; p50 {by_xmin.get('p50')}, "
                f"max {by_xmin.get('max')})",
                "batches < jobs" if level != "1" else "",
                commit["insert_batches"] < commit["accepted"] if level != "1" else None,
            )
        )
    for level, run in results["accept"].get("group_commit_window", {}).items():
        commit = run["group_commit"]
        rows.append(
            Row(
                f"5 window {GROUP_COMMIT_WINDOW_MS:g} ms c={level}",
                f"{run['per_s']:>8,.0f} req/s  p50 {run['p50_ms']:6.2f}  "
                f"p99 {run['p99_ms']:6.2f} ms  {commit['jobs_per_batch']}/INSERT "
                f"(p50 {commit['by_xmin'].get('p50')}, max {commit['by_xmin'].get('max')})",
            )
        )
    e2e = results["e2e"]
    for name, label in (("trivial", "trivial"), ("revenue", "revenue 1M rows")):
        run = e2e[name]
        rows.append(
            Row(
                f"2 e2e {label} c={run['concurrency']}",
                f"{run['jobs_per_s']:>8,.1f} jobs/s  p50 {run['p50_ms']:6.1f}  "
                f"p99 {run['p99_ms']:6.1f} ms  {cpu_text(run['cpu'])}",
                ">= 500 jobs/s" if name == "trivial" else "",
                run["jobs_per_s"] >= 500 if name == "trivial" else None,
            )
        )
        if "runs" in run:
            rows.append(Row(f"2 e2e {label} runs", f"median of {runs_text(run)} jobs/s"))
        over = e2e[f"overhead_{name}"]
        rows.append(
            Row(
                f"2 e2e {label} c=1",
                f"p50 {over['e2e_p50_ms']:.2f} ms vs raw asyncpg {over['raw_p50_ms']:.2f} ms: "
                f"+{over['overhead_ms']:.2f} ms/job (x{over['ratio']}, "
                f"median of {over['pairs']} pairs)",
                "overhead < 5 ms/job",
                over["overhead_ms"] < 5,
            )
        )
        rows.append(
            Row(
                f"2 e2e {label} vs raw",
                f"{run['jobs_per_s']:,.1f} jobs/s vs raw {e2e[f'raw_{name}']['per_s']:,.1f} "
                f"queries/s ({over['throughput_vs_raw']:.1%})",
            )
        )
    for key, label in COALESCING_RUNS.items():
        c = e2e[key]
        rows.append(
            Row(
                f"3 coalescing, {label}",
                f"{c['queries_run']} queries for {c['delivered']:,} jobs / "
                f"{c['distinct_parameter_sets']} sets (one result per set: "
                f"{'yes' if c['one_result_per_set'] else 'NO'})",
                f"exactly {c['distinct_parameter_sets']}",
                c["queries_run"] == c["distinct_parameter_sets"],
            )
        )
    memory = results["memory"]
    rows.append(
        Row(
            f"4 memory, {memory['queue_depth']:,} queued",
            f"RSS {memory['queued']['rss_mb']} MB (idle {memory['idle']['rss_mb']} MB, "
            f"{memory['bytes_per_queued_job']:,} B/job)",
            "< 200 MB",
            memory["queued"]["rss_mb"] < 200,
        )
    )
    inline = e2e["inline"]
    rows.append(
        Row(
            "7 inline Prefer: wait=5 trivial",
            f"{inline['per_s']:>8,.0f} req/s  p50 {inline['p50_ms']:6.2f}  "
            f"p99 {inline['p99_ms']:6.2f} ms  pushed {inline['sample_pushed_to_cognigy']}",
            "200 answered, none pushed",
            inline["sample_pushed_to_cognigy"] == 0
            and set(inline["sample_answers"]) == {"200 answered"},
        )
    )
    return rows


def runs_text(run: dict[str, Any]) -> str:
    """``2,695 / 3,456 / 4,295`` (steal 29 / 3 / 1%): every repeat of a measurement."""
    figures = " / ".join(f"{v:,.0f}" for v in run["runs"])
    steal = " / ".join(f"{v:.0f}" for v in run["runs_steal_pct"] if v is not None)
    return f"{figures} (steal {steal}%)"


def render_table(rows: Sequence[Row]) -> str:
    """The rows as a fixed-width table."""
    width_measure = max(len(r.measure) for r in rows)
    width_measured = max(len(r.measured) for r in rows)
    width_target = max(len(r.target) for r in rows)
    lines = []
    header = (
        f"{'measure':<{width_measure}}  {'measured':<{width_measured}}  "
        f"{'target':<{width_target}}  ok"
    )
    lines.append(header)
    lines.append("-" * len(header))
    for r in rows:
        verdict = "" if r.ok is None else ("ok" if r.ok else "MISS")
        lines.append(
            f"{r.measure:<{width_measure}}  {r.measured:<{width_measured}}  "
            f"{r.target:<{width_target}}  {verdict}".rstrip()
        )
    return "\n".join(lines)


def _load_avg() -> list[float]:
    with contextlib.suppress(OSError):
        return [round(v, 2) for v in os.getloadavg()]
    return []


def _git_commit() -> str | None:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() or None
    return None


def _fast_modules() -> dict[str, bool]:
    found = {}
    for module in ("uvloop", "httptools"):
        try:
            __import__(module)
            found[module] = True
        except ImportError:
            found[module] = False
    return found


def uvicorn_fast_options() -> dict[str, str]:
    """uvicorn's event loop and HTTP parser as app.serve picks them: uvloop and httptools
    when installed (the ``fast`` extra)."""
    found = _fast_modules()
    options = {"loop": "uvloop"} if found["uvloop"] else {}
    if found["httptools"]:
        options["http"] = "httptools"
    return options


# -- the run --------------------------------------------------------------------------------


async def _bench(plan: Plan, log: Callable[[str], None]) -> dict[str, Any]:
    from .seed import ensure_transactions
    from .sim import SimState, run_sim

    results: dict[str, Any] = {
        "plan": plan.name,
        "started_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "load_avg_before": _load_avg(),
            **_fast_modules(),
        },
        "git_commit": _git_commit(),
    }
    async with open_bench_database(log) as (dsn, embedded):
        conn = await asyncpg.connect(dsn)
        try:
            rows, seed_s = await ensure_transactions(conn, DEMO_ROWS)
            results["postgres"] = {
                "version": await conn.fetchval("SHOW server_version"),
                "embedded": embedded,
                "transactions_rows": rows,
                "fsync": await conn.fetchval("SHOW fsync"),
                "synchronous_commit": await conn.fetchval("SHOW synchronous_commit"),
            }
            # The postmaster, if it runs here: its CPU use is reported beside the server's.
            postgres_pid = local_postmaster(int(await conn.fetchval("SELECT pg_backend_pid()")))
        finally:
            await conn.close()
        how = f"seeded in {seed_s:.1f} s" if seed_s else "reused"
        log(f"transactions: {rows:,} rows ({how})")
        await delete_bench_jobs(dsn)
        client_secret = random_secrets.token_urlsafe(24)
        state = SimState(client_id=SIM_CLIENT_ID, client_secret=client_secret)
        with tempfile.TemporaryDirectory(prefix="cognigy-offload-bench-") as workdir:
            async with run_sim(state) as sim_url, anyio.create_task_group() as tg:
                env = Env(
                    dsn=dsn,
                    sim_state=state,
                    sim_url=sim_url,
                    workdir=Path(workdir),
                    webhook_token=random_secrets.token_urlsafe(24),
                    client_secret=client_secret,
                    deliveries=Deliveries(state),
                    postgres_pid=postgres_pid,
                )
                tg.start_soon(env.deliveries.watch)
                try:
                    for name, phase in (
                        ("accept", phase_accept),
                        ("e2e", phase_e2e),
                        ("memory", phase_memory),
                    ):
                        log(f"phase {name} ...")
                        results[name] = await phase(env, plan, log)
                        await delete_bench_jobs(dsn)
                finally:
                    tg.cancel_scope.cancel()
    results["machine"]["load_avg_after"] = _load_avg()
    return results


def default_output(plan: Plan, today: dt.date | None = None) -> Path:
    """bench/results-<YYYY-MM-DD>.json (a quick run gets -quick so it never replaces a full one)."""
    day = (today or dt.date.today()).isoformat()
    suffix = "" if plan.name == "full" else f"-{plan.name}"
    return Path("bench") / f"results-{day}{suffix}.json"


def run_bench(quick: bool = False, output: str | None = None) -> int:
    """Run the benchmark, print the table, write the JSON; returns the exit code."""
    import logging

    import structlog

    logging.basicConfig(level=logging.WARNING)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    plan = Plan.pick(quick)
    started = time.monotonic()

    def log(text: str) -> None:
        print(text, flush=True, file=sys.stderr)

    backend_options = {"use_uvloop": True} if _fast_modules()["uvloop"] else {}
    results = anyio.run(_bench, plan, log, backend_options=backend_options)
    results["duration_s"] = round(time.monotonic() - started, 1)
    rows = report_rows(results)
    results["table"] = [msgspec.to_builtins(r) for r in map(_row_dict, rows)]
    machine = results["machine"]
    print()
    print(
        f"cognigy-offload bench ({plan.name}), {results['started_at']}, "
        f"{machine['cpus']} CPUs, load avg {machine['load_avg_before']} -> "
        f"{machine['load_avg_after']}, uvloop {machine['uvloop']}, "
        f"httptools {machine['httptools']}, PostgreSQL {results['postgres']['version']} "
        f"(fsync {results['postgres']['fsync']}), {results['duration_s']} s"
    )
    print(render_table(rows))
    path = Path(output) if output else default_output(plan)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(f"\nresults written to {path}")
    return 0


def _row_dict(row: Row) -> dict[str, Any]:
    return {"measure": row.measure, "measured": row.measured, "target": row.target, "ok": row.ok}


# -- the child processes' entry point ------------------------------------------------------------


class _WithStats:
    """ASGI wrapper of the service that answers GET /_bench/stats with internal counters."""

    def __init__(self, app: Any, holder: dict[str, Any]) -> None:
        self.app = app
        self.holder = holder

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] != STATS_PATH:
            await self.app(scope, receive, send)
            return
        from starlette.responses import Response

        service = self.holder["service"]
        accepted = service.metrics.registry.get_sample_value("cognigy_offload_jobs_accepted_total")
        body = msgspec.json.encode(
            {
                "batches": service.store.batches,
                "write_batches": service.store.write_batches,
                "runs": service.executor.runs,
                "queue_depth": service.queue.depth,
                "accepted": int(accepted or 0),
            }
        )
        await Response(body, media_type="application/json")(scope, receive, send)


def _bare_app() -> Any:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    constant = msgspec.json.encode(
        {
            "status": "accepted",
            "taskId": "00000000-0000-0000-0000-000000000000",
            "message": "Database query dispatched to background worker",
        }
    )

    async def endpoint(request: Request) -> Response:
        return Response(constant, 202, media_type="application/json")

    async def healthz(request: Request) -> Response:
        return Response(b'{"status":"ok"}', media_type="application/json")

    return Starlette(
        routes=[
            Route(WEBHOOK_PATH, endpoint, methods=["POST"]),
            Route("/healthz", healthz, methods=["GET"]),
        ]
    )


def ready(holder: dict[str, Any], service: Any, tune_gc: Callable[[], None]) -> None:
    """The service child's on_ready: what serve does (GC tuning), and keep the service."""
    holder["service"] = service
    tune_gc()


def _child_main(argv: Sequence[str]) -> int:
    """Serve the service (with a stats route) or the bare endpoint, as ``serve`` would."""
    import argparse

    import uvicorn

    from . import logs
    from .app import build_app, tune_gc
    from .config import load_config, load_secrets

    parser = argparse.ArgumentParser(prog="python -m cognigy_offload.bench")
    parser.add_argument("--child", choices=["service", "bare"], required=True)
    parser.add_argument("--config", required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    app: Any
    if args.child == "bare":
        app = _bare_app()
        tune_gc()  # the same process settings as the service's
    else:
        config = load_config(Path(args.config))
        logs.configure(config.server.log_format, config.server.log_level)
        holder: dict[str, Any] = {}
        app = _WithStats(
            build_app(config, load_secrets(config), on_ready=lambda s: ready(holder, s, tune_gc)),
            holder,
        )
    # The options of app.serve: the same loop, HTTP parser, logging and headers.
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=HOST,
            port=args.port,
            lifespan="on",
            log_config=None,
            access_log=False,
            server_header=False,
            **uvicorn_fast_options(),  # type: ignore[arg-type]
        )
    )
    server.run()
    return 0 if server.started else 3


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
