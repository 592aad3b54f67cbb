"""build_request: the four delivery modes of SPEC §3, value mapping and URL safety."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from typing import Any
from urllib.parse import unquote

import httpx
import pytest

from cognigy_offload.cognigy import build_request
from cognigy_offload.config import CognigyConfig
from cognigy_offload.errors import DeliveryError
from cognigy_offload.models import EXACT_DECODER
from tests.conftest import target

API = "https://api.example.test"
ENDPOINT = "https://endpoint.example.test/"
TASK = "5b0c7a52-1d0e-4f57-9a57-5a0f0d2f7c1e"
TS = 1796292000
RESULT: dict[str, Any] = {"count": 100000, "total": Decimal("7499925000.00")}


def config(**changes: Any) -> CognigyConfig:
    return CognigyConfig(api_url=API, endpoint_url=ENDPOINT, **changes)


def decode(body: bytes) -> Any:
    return EXACT_DECODER.decode(body)


def test_context_mode() -> None:
    """POST /new/v2.0/sessions/{sessionId}/context/inject with userId and the result object."""
    out = build_request(config(), target("context"), RESULT, TASK, TS)
    assert out.method == "POST"
    assert out.url == f"{API}/new/v2.0/sessions/sess_41c7/context/inject"
    assert out.needs_api_auth is True
    assert decode(out.body) == {
        "userId": "usr_9b3e7f2a",
        "context": {
            "offload": {
                "count": 100000,
                "total": Decimal("7499925000.00"),
                "taskId": TASK,
                "timestamp": TS,
            }
        },
    }
    assert b'"total":7499925000.00' in out.body


@pytest.mark.parametrize("mode", ["inject", "notify"])
def test_endpoint_modes(mode: str) -> None:
    """POST {endpoint_url}/{mode}/{URLToken} with userId, sessionId, empty text, data; no auth."""
    out = build_request(config(result_key="dbResult"), target(mode), RESULT, TASK, TS)
    assert out.method == "POST"
    assert out.url == f"https://endpoint.example.test/{mode}/a1b2c3"
    assert out.needs_api_auth is False
    assert decode(out.body) == {
        "userId": "usr_9b3e7f2a",
        "sessionId": "sess_41c7",
        "text": "",
        "data": {
            "dbResult": {
                "count": 100000,
                "total": Decimal("7499925000.00"),
                "taskId": TASK,
                "timestamp": TS,
            }
        },
    }


def test_variables_mode() -> None:
    """PATCH conversation variables: the summary string, the timestamp, then each column."""
    out = build_request(config(), target("variables"), RESULT, TASK, TS)
    assert out.method == "PATCH"
    assert out.url == f"{API}/api/v1/conversations/conv_8f4a2c1d/variables"
    assert out.needs_api_auth is True
    assert decode(out.body) == {
        "variables": [
            {"name": "db_query_result", "value": "count:100000|total:7499925000.00"},
            {"name": "db_query_timestamp", "value": str(TS)},
            {"name": "count", "value": 100000},
            {"name": "total", "value": Decimal("7499925000.00")},
        ]
    }


def test_variables_summary_formats_every_type_in_column_order() -> None:
    """Integers as they are, other numbers with two decimals, null as empty, text verbatim."""
    result = {
        "z_first": 3,
        "avg": Decimal("12.346"),
        "ratio": 0.5,
        "label": "enterprise",
        "missing": None,
        "day": dt.date(2024, 1, 31),
        "bad": Decimal("NaN"),
    }
    out = build_request(config(), target("variables"), result, TASK, TS)
    variables = decode(out.body)["variables"]
    assert variables[0]["value"] == (
        "z_first:3|avg:12.35|ratio:0.50|label:enterprise|missing:|day:2024-01-31|bad:"
    )
    assert [v["name"] for v in variables[2:]] == list(result)
    assert variables[-1]["value"] is None


def test_big_integers_and_decimals_stay_exact() -> None:
    """Integers beyond 2^53 and decimals with many digits reach Cognigy digit for digit."""
    result = {
        "big": 2**70,
        "negative": -(2**64) - 1,
        "exact": Decimal("12345678901234567890.123456789"),
        "sum": Decimal("0.1") + Decimal("0.2"),
    }
    out = build_request(config(), target("context"), result, TASK, TS)
    assert b'"big":1180591620717411303424' in out.body
    assert b'"negative":-18446744073709551617' in out.body
    assert b'"exact":12345678901234567890.123456789' in out.body
    assert b'"sum":0.3' in out.body
    values = decode(out.body)["context"]["offload"]
    assert values["big"] == 2**70 and values["exact"] == result["exact"]


@pytest.mark.parametrize(
    "value", [Decimal("NaN"), Decimal("Infinity"), Decimal("-Infinity"), float("nan"), float("inf")]
)
def test_non_finite_numbers_become_null(value: Any) -> None:
    """NaN and ±Infinity are not JSON: they are delivered as null."""
    out = build_request(config(), target("context"), {"v": value}, TASK, TS)
    assert decode(out.body)["context"]["offload"]["v"] is None


def test_other_values_map_by_the_spec_rule() -> None:
    """Text as strings, dates and timestamps as ISO 8601, json as parsed JSON, NULL as null."""
    result = {
        "text": 'ünïcode "quoted"',
        "day": dt.date(2024, 12, 31),
        "at": dt.datetime(2024, 1, 1, 12, 30, tzinfo=dt.UTC),
        "doc": {"a": [1, Decimal("2.50"), None], "b": {"c": "d"}},
        "none": None,
        "flag": True,
    }
    out = build_request(config(), target("inject"), result, TASK, TS)
    values = decode(out.body)["data"]["offload"]
    assert values["text"] == 'ünïcode "quoted"'
    assert values["day"] == "2024-12-31"
    assert values["at"] == "2024-01-01T12:30:00+00:00"
    assert values["doc"] == {"a": [1, Decimal("2.50"), None], "b": {"c": "d"}}
    assert values["none"] is None and values["flag"] is True


def test_the_jobs_own_fields_win_over_columns_of_the_same_name() -> None:
    """A column named taskId or timestamp cannot forge the job's identity."""
    result = {"taskId": "forged", "timestamp": 1, "n": 1}
    values = decode(build_request(config(), target("context"), result, TASK, TS).body)
    assert values["context"]["offload"] == {"taskId": TASK, "timestamp": TS, "n": 1}


@pytest.mark.parametrize(
    "ident", ["a/b", "a?b=c", "a#frag", "..", ".", "a b", "ünï", "a%2Fb", "x/../../admin"]
)
@pytest.mark.parametrize(
    ("mode", "field", "prefix", "suffix"),
    [
        ("context", "sessionId", "/new/v2.0/sessions/", "/context/inject"),
        ("variables", "conversationId", "/api/v1/conversations/", "/variables"),
        ("inject", "URLToken", "/inject/", ""),
        ("notify", "URLToken", "/notify/", ""),
    ],
)
def test_identifiers_are_one_percent_encoded_path_segment(
    ident: str, mode: str, field: str, prefix: str, suffix: str
) -> None:
    """Whatever the identifier holds, the route stays the same and the segment decodes back."""
    out = build_request(config(), target(mode, **{field: ident}), RESULT, TASK, TS)
    url = httpx.URL(out.url)  # what the client will actually send
    path = url.raw_path.decode()
    assert url.query == b""
    assert path.startswith(prefix) and path.endswith(suffix)
    segment = path[len(prefix) : len(path) - len(suffix)]
    assert "/" not in segment and "?" not in segment and "#" not in segment
    assert unquote(segment) == ident


@pytest.mark.parametrize(
    ("mode", "missing"),
    [("context", "sessionId"), ("variables", "conversationId"), ("inject", "URLToken")],
)
def test_a_missing_identifier_is_a_clear_delivery_error(mode: str, missing: str) -> None:
    """The web layer checks this first; if a job still lacks it, the error names the field."""
    with pytest.raises(DeliveryError) as info:
        build_request(config(), target(mode, **{missing: None}), RESULT, TASK, TS)
    assert info.value.kind == "invalid_target"
    assert missing in info.value.detail


@pytest.mark.parametrize("mode", ["context", "inject", "notify", "variables"])
def test_a_body_over_max_payload_bytes_is_not_built(mode: str) -> None:
    """Over max_payload_bytes: DeliveryError payload_too_large with the sizes in the detail."""
    result = {"blob": "x" * 5000}
    with pytest.raises(DeliveryError) as info:
        build_request(config(max_payload_bytes=4096), target(mode), result, TASK, TS)
    error = info.value
    assert error.kind == "payload_too_large"
    assert error.http_status is None
    assert "4096" in error.detail and "max_payload_bytes" in error.detail


def test_a_body_at_the_limit_is_built() -> None:
    """The limit is inclusive: exactly max_payload_bytes still goes."""
    size = len(build_request(config(), target("context"), RESULT, TASK, TS).body)
    out = build_request(config(max_payload_bytes=size), target("context"), RESULT, TASK, TS)
    assert len(out.body) == size


def test_new_task_ids_are_random_version_4_uuids_never_repeated() -> None:
    """new_task_id (the accept path's cheaper uuid4) gives valid, distinct version-4 ids,
    also when threads ask at the same time."""
    import threading
    import uuid

    from cognigy_offload.models import new_task_id

    seen: list[uuid.UUID] = []

    def take() -> None:
        seen.extend(new_task_id() for _ in range(5_000))

    threads = [threading.Thread(target=take) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(seen)) == len(seen) == 20_000
    for task_id in seen[::997]:
        assert task_id.version == 4 and task_id.variant == uuid.RFC_4122
        assert uuid.UUID(str(task_id)) == task_id and hash(uuid.UUID(str(task_id))) == hash(task_id)
