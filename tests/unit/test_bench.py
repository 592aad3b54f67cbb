"""The bench's own parts: its HTTP parsing, statistics, config, question sets and report."""

from __future__ import annotations

import datetime as dt
import math
import tomllib
from pathlib import Path
from typing import Any

import pytest

from cognigy_offload import bench
from cognigy_offload.config import dump_toml, parse_config
from cognigy_offload.errors import ConfigError
from cognigy_offload.queries import Catalog, Query
from cognigy_offload.serving import run_uvicorn

RESPONSE = (
    b"HTTP/1.1 202 Accepted\r\ndate: x\r\nContent-Length: 14\r\n"
    b"content-type: application/json\r\n\r\n"
    b'{"taskId":"t"}'
)


class TestParseResponse:
    def test_a_whole_answer_gives_status_body_and_length_used(self) -> None:
        """Status, body and bytes used come out of one complete answer; a second
        pipelined answer after it is left in the buffer."""
        parsed = bench.parse_response(RESPONSE + RESPONSE[:10])
        assert parsed == (202, b'{"taskId":"t"}', len(RESPONSE))

    @pytest.mark.parametrize("cut", [5, RESPONSE.index(b"\r\n\r\n") + 2, len(RESPONSE) - 1])
    def test_a_partial_answer_is_not_parsed(self, cut: int) -> None:
        """An answer whose head or body has not fully arrived gives None."""
        assert bench.parse_response(RESPONSE[:cut]) is None

    def test_no_content_length_means_an_empty_body(self) -> None:
        """An answer without Content-Length has no body (the routes we call always send one)."""
        assert bench.parse_response(b"HTTP/1.1 204 No Content\r\n\r\n") == (204, b"", 27)

    def test_build_request_round_trips_its_body_length(self) -> None:
        """The request carries the exact Content-Length of its body and the given headers."""
        raw = bench.build_request("/p", b'{"a":1}', {"Prefer": "wait=5"})
        head, _, body = raw.partition(b"\r\n\r\n")
        assert body == b'{"a":1}'
        assert b"Content-Length: 7" in head and b"Prefer: wait=5" in head
        assert head.startswith(b"POST /p HTTP/1.1\r\n")


class TestStatistics:
    @pytest.mark.parametrize(
        ("fraction", "expected"), [(0.5, 50.0), (0.99, 99.0), (1.0, 100.0), (0.001, 1.0)]
    )
    def test_nearest_rank_percentile(self, fraction: float, expected: float) -> None:
        """The percentile is the nearest-rank value of 1..100."""
        assert bench.percentile([float(v) for v in range(1, 101)], fraction) == expected

    def test_no_values_give_nan(self) -> None:
        """An empty sample has no percentile (NaN), and the summary says so too."""
        assert math.isnan(bench.percentile([], 0.5))
        assert math.isnan(bench.latency_summary([])["p99_ms"])

    def test_latency_summary_is_in_milliseconds(self) -> None:
        """Seconds in, milliseconds out."""
        summary = bench.latency_summary([0.001, 0.002, 0.010])
        assert summary == {"p50_ms": 2.0, "p99_ms": 10.0, "max_ms": 10.0}

    def test_cpu_marks_give_percent_of_one_core(self) -> None:
        """Two marks one second apart with half a second of server CPU read as 50%."""
        first = bench.CpuMark(0.0, 1.0, 1.0, 0.0, 10.0, 0.0)
        later = bench.CpuMark(1.0, 1.5, 1.25, 0.25, 11.5, 0.1)
        cpu = first.until(later)
        assert cpu["server_pct"] == 50.0
        assert cpu["loadgen_pct"] == 25.0
        assert cpu["postgres_pct"] == 25.0
        assert cpu["others_pct"] == 50.0
        assert cpu["machine_pct"] == 150.0
        assert cpu["steal_pct"] == 10.0

    def test_this_process_cpu_is_readable(self) -> None:
        """The bench can read its own CPU time and the machine's counters."""
        assert bench.process_cpu_s(__import__("os").getpid()) > 0
        busy, steal = bench.machine_cpu_s()
        assert busy > 0 and steal >= 0


class TestQuestions:
    def test_revenue_args_are_bound_exactly_as_the_catalog_binds_them(self) -> None:
        """The raw asyncpg comparison runs the very values the service would bind."""
        query = Query(
            "revenue",
            bench.REVENUE_SQL,
            tuple(bench.REVENUE_PARAMS),
            ("text", "timestamptz", "timestamptz"),
            ("count", "total"),
            0.0,
        )
        catalog = Catalog({"revenue": query})
        for index in (0, 1, 7, 3499):
            assert catalog.bind(query, bench.revenue_variables(index)) == bench.revenue_args(index)

    def test_revenue_questions_are_distinct_for_many_indices(self) -> None:
        """Each job of the revenue runs asks its own question (no accidental coalescing)."""
        questions = {str(bench.revenue_variables(i)) for i in range(3500)}
        assert len(questions) == 3500

    def test_delivered_task_reads_the_context_result(self) -> None:
        """The taskId and the result columns come out of a context delivery body."""
        body = {"userId": "u", "context": {"offload": {"n": 1, "taskId": "t", "timestamp": 5}}}
        assert bench._delivered_task(body) == ("t", {"n": 1})
        assert bench._delivered_task({"other": 1}) == (None, None)

    def test_task_id_of_a_202(self) -> None:
        """The taskId of an accepted answer; None for a body that is not one."""
        assert bench.task_id_of(b'{"status":"accepted","taskId":"abc"}') == "abc"
        assert bench.task_id_of(b"nonsense") is None


class TestConfig:
    def test_the_service_config_survives_toml_and_validation(self) -> None:
        """The written config file reads back as the same valid config, queries included."""
        data = bench.service_config(8123, "http://127.0.0.1:9", queue={"capacity": 5})
        text = dump_toml(data)
        parsed = parse_config(tomllib.loads(text))
        assert parsed.queue.capacity == 5
        assert parsed.queue.group_commit_ms == 0
        assert parsed.server.port == 8123
        assert parsed.queries["revenue_cached"].cache_ttl_s == 600
        assert parsed.queries["revenue"].sql == bench.REVENUE_SQL
        assert parsed.cognigy.rate_limit_per_minute == bench.RATE_LIMIT_PER_MINUTE

    def test_a_bad_override_is_refused_before_a_child_starts(self) -> None:
        """A typo in the bench's own overrides fails in the bench, naming the key."""
        with pytest.raises(ConfigError, match=r"queue\.capacityy"):
            bench.service_config(8123, "http://127.0.0.1:9", queue={"capacityy": 5})

    def test_default_output_names_the_day_and_keeps_quick_runs_apart(self) -> None:
        """bench/results-<day>.json for a full run; a quick run never replaces it."""
        day = dt.date(2026, 12, 3)
        assert bench.default_output(bench.Plan.pick(False), day) == Path(
            "bench/results-2026-12-03.json"
        )
        assert bench.default_output(bench.Plan.pick(True), day) == Path(
            "bench/results-2026-12-03-quick.json"
        )


def _load(per_s: float, p99_ms: float) -> dict[str, Any]:
    cpu = dict.fromkeys(
        ("server_pct", "loadgen_pct", "postgres_pct", "others_pct", "machine_pct", "steal_pct"),
        10.0,
    )
    return {"per_s": per_s, "p50_ms": p99_ms / 2, "p99_ms": p99_ms, "cpu": cpu}


def _commit(jobs: int, batches: int) -> dict[str, Any]:
    return {
        "accepted": jobs,
        "insert_batches": batches,
        "jobs_per_batch": round(jobs / batches, 2),
        "by_xmin": {"p50": 1.0, "max": 9},
    }


def _results() -> dict[str, Any]:
    """A results document shaped like a real run's, with round numbers."""
    levels = {
        str(c): {
            "bare": _load(4000, 5),
            "service": _load(2400, 15),
            "group_commit": _commit(1000, 100 if c > 1 else 1000),
            "ratio": 0.6,
        }
        for c in (1, 16, 64)
    }
    window = {"1": {**_load(300, 4), "group_commit": _commit(300, 300)}}
    e2e: dict[str, Any] = {}
    for name in ("trivial", "revenue"):
        e2e[name] = {"concurrency": 32, "jobs_per_s": 600.0, **_load(0, 100), "jobs": 10}
        e2e[f"{name}_c1"] = {"p50_ms": 4.0}
        e2e[f"raw_{name}_c1"] = {"p50_ms": 1.0}
        e2e[f"raw_{name}"] = {"per_s": 1000.0}
        e2e[f"overhead_{name}"] = {
            "e2e_p50_ms": 4.0,
            "raw_p50_ms": 1.0,
            "overhead_ms": 3.0,
            "ratio": 4.0,
            "pairs": 100,
            "throughput_vs_raw": 0.6,
        }
    for key, runs in (("coalescing", 993), ("coalescing_slow", 10), ("coalescing_cached", 10)):
        e2e[key] = {
            "queries_run": runs,
            "delivered": 1000,
            "distinct_parameter_sets": 10,
            "one_result_per_set": True,
        }
    e2e["inline"] = {
        **_load(900, 20),
        "sample_pushed_to_cognigy": 0,
        "sample_answers": {"200 answered": 50},
    }
    memory = {
        "queue_depth": 9992,
        "queued": {"rss_mb": 60.0},
        "idle": {"rss_mb": 50.0},
        "bytes_per_queued_job": 1000,
    }
    return {
        "accept": {"levels": levels, "group_commit_window": window},
        "e2e": e2e,
        "memory": memory,
    }


class TestReport:
    def test_every_target_gets_a_verdict(self) -> None:
        """Each target row says ok or MISS by its own figure; info rows have no verdict."""
        rows = {row.measure: row for row in bench.report_rows(_results())}
        assert rows["1 accept c=64 full/bare"].ok is True
        assert rows["1 accept c=64 full"].ok is True  # p99 15 ms < 20 ms
        assert rows["1 accept c=1 full/bare"].ok is None
        assert rows["5 group commit c=64"].ok is True
        assert rows["2 e2e trivial c=32"].ok is True
        assert rows["2 e2e trivial c=1"].ok is True  # 3 ms/job < 5 ms
        assert rows["3 coalescing, no cache, 30 ms query"].ok is False
        assert rows["3 coalescing, no cache, 1 s query"].ok is True
        assert rows["3 coalescing, cache_ttl_s"].ok is True
        assert rows["4 memory, 9,992 queued"].ok is True
        assert rows["7 inline Prefer: wait=5 trivial"].ok is True

    def test_the_table_lines_up_and_marks_misses(self) -> None:
        """The rendered table has one line per row plus a header, and shows MISS."""
        rows = bench.report_rows(_results())
        table = bench.render_table(rows).splitlines()
        assert len(table) == len(rows) + 2
        assert table[0].startswith("measure")
        assert any(line.endswith("MISS") for line in table)

    def test_repeated_windows_report_the_median_run_and_every_figure(self) -> None:
        """Three windows: the middle one is reported, whole (its own latencies and CPU), and
        the table shows all three rates with their steal."""
        runs = [_load(2700, 40), _load(4300, 21), _load(3500, 30)]
        runs[0]["cpu"]["steal_pct"] = 29.0
        chosen = bench.median_run(runs, "per_s")
        assert (chosen["per_s"], chosen["p99_ms"]) == (3500, 30)
        assert chosen["runs"] == [2700, 4300, 3500]
        assert chosen["runs_steal_pct"] == [29.0, 10.0, 10.0]
        assert bench.median_run(runs[:1], "per_s") == runs[0]  # one window: as measured
        results = _results()
        results["accept"]["levels"]["64"]["service"] = chosen
        results["accept"]["levels"]["64"]["bare"] = bench.median_run(runs, "per_s")
        rows = {row.measure: row for row in bench.report_rows(results)}
        text = rows["1 accept c=64 runs"].measured
        assert "2,700 / 4,300 / 3,500 (steal 29 / 10 / 10%)" in text


@pytest.mark.anyio
async def test_the_load_generator_measures_a_real_server() -> None:
    """The raw HTTP client drives the bare endpoint on loopback: every request answered,
    a positive rate, latencies for each, and CPU figures for the server (this process)."""
    import os

    async with run_uvicorn(bench._bare_app()) as url:
        port = int(url.rsplit(":", 1)[1])
        raw = bench.build_request(bench.WEBHOOK_PATH, b"{}", {})
        load = await bench.hammer(port, (os.getpid(), None), bench.constant(raw), 4, 0.05, 0.3)
        answers, seconds = await bench.burst(port, [raw] * 20, 4)
    assert load.statuses and set(load.statuses) == {202}
    assert load.rate > 0 and len(load.latencies_s) == sum(load.statuses.values())
    assert load.errors == 0
    assert load.cpu["server_pct"] > 0
    assert [status for status, _ in answers] == [202] * 20
    assert seconds > 0


def test_children_get_the_loop_and_parser_app_serve_would_pick() -> None:
    """uvloop and httptools are chosen exactly when they are importable, as app.serve does."""
    found = bench._fast_modules()
    options = bench.uvicorn_fast_options()
    assert ("loop" in options) == found["uvloop"]
    assert ("http" in options) == found["httptools"]
    assert set(options.values()) <= {"uvloop", "httptools"}
