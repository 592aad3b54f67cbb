"""Pure webhook validation: body decoding (400 / 422 naming the field) and parameter coercion.

Every refusal is a RequestError with the status and JSON path SPEC §2 asks for; no input
raises anything else (which the web layer would turn into a 500).
"""

from __future__ import annotations

import datetime as dt
import json
import uuid
from collections.abc import Awaitable, Callable
from decimal import Decimal
from typing import Any

import pytest
from starlette.types import Message

from cognigy_offload.errors import RequestError
from cognigy_offload.models import WebhookRequest
from cognigy_offload.queries import MAX_TEXT_CHARS, Catalog, ParamError, Query, _coerce
from cognigy_offload.web import _prefer_wait_s, decode_webhook, read_body
from tests.conftest import REVENUE_QUERY, SAMPLE_BODY

VALID = SAMPLE_BODY


def encode(**changes: Any) -> bytes:
    """The valid body with top-level keys replaced (a value of ... removes the key)."""
    data = {k: v for k, v in {**VALID, **changes}.items() if v is not ...}
    return json.dumps(data).encode()


def refusal(body: bytes) -> RequestError:
    """The RequestError decode_webhook raises for ``body``."""
    with pytest.raises(RequestError) as caught:
        decode_webhook(body)
    return caught.value


class TestDecodeWebhook:
    def test_the_sample_body_decodes_and_extra_keys_are_ignored(self) -> None:
        """SPEC §2's sample is accepted; unknown keys do not matter."""
        payload = decode_webhook(encode(extra={"nested": [1, 2]}, another=None))
        assert isinstance(payload, WebhookRequest)
        assert payload.userId == "usr_9b3e7f2a"
        assert payload.variables["date_range"] == "2024-01-01_to_2024-12-31"

    @pytest.mark.parametrize(
        "body",
        [
            b"",
            b"{",
            encode()[:-1],
            encode()[:20],
            b'{"userId": "\xff\xfe", "variables": {}}',
            b'{"userId": "u", "variables": {"a": "\xc3"}}',
            b"\xef\xbb\xbf" + encode(),
            encode() + b" trailing",
            b'{"userId": "u", "variables": {"a": NaN}}',
            b"{'userId': 'u', 'variables': {}}",
            b'{"userId": "\\ud800", "variables": {}}',
        ],
        ids=[
            "empty",
            "brace",
            "truncated-end",
            "truncated-middle",
            "invalid-utf8-key",
            "invalid-utf8-value",
            "bom",
            "trailing-garbage",
            "nan",
            "single-quotes",
            "lone-surrogate",
        ],
    )
    def test_a_body_that_is_not_json_is_a_400(self, body: bytes) -> None:
        """Truncated, non-UTF-8 or otherwise malformed JSON is a 400 invalid_json."""
        error = refusal(body)
        assert (error.status, error.code, error.field) == (400, "invalid_json", None)

    @pytest.mark.parametrize(
        ("body", "field"),
        [
            (encode(userId=...), "$.userId"),
            (encode(userId=None), "$.userId"),
            (encode(userId=""), "$.userId"),
            (encode(userId=42), "$.userId"),
            (encode(userId=10**40), "$.userId"),
            (encode(userId="u" * 513), "$.userId"),
            (encode(variables=...), "$.variables"),
            (encode(variables=None), "$.variables"),
            (encode(variables=[]), "$.variables"),
            (encode(variables="a=b"), "$.variables"),
            (encode(query=""), "$.query"),
            (encode(query=7), "$.query"),
            (encode(query="q" * 129), "$.query"),
            (encode(sessionId=["s"]), "$.sessionId"),
            (encode(sessionId=""), "$.sessionId"),
            (encode(conversationId={"id": 1}), "$.conversationId"),
            (encode(URLToken=False), "$.URLToken"),
            (b"[]", "$"),
            (b"null", "$"),
            (b'"text"', "$"),
            (b"12", "$"),
        ],
    )
    def test_a_schema_error_is_a_422_naming_the_field(self, body: bytes, field: str) -> None:
        """Wrong types, nulls, empty and over-long strings name the offending JSON path."""
        error = refusal(body)
        assert (error.status, error.field) == (422, field)
        assert error.detail.endswith(".")

    @pytest.mark.parametrize(
        "raw",
        [b"9" * 5000, b"-" + b"9" * 5000, b"1e999", b"-1e999", b"1" + b"0" * 5000 + b".5"],
        ids=["huge-int", "huge-negative-int", "float-overflow", "negative-overflow", "long-float"],
    )
    def test_an_out_of_range_number_is_a_422(self, raw: bytes) -> None:
        """A number no type can hold is refused under $.variables, not a crash."""
        error = refusal(b'{"userId": "u", "variables": {"a": ' + raw + b"}}")
        assert (error.status, error.field) == (422, "$.variables")
        nested = refusal(b'{"userId": "u", "variables": {"a": {"b": ' + raw + b"}}}")
        assert (nested.status, nested.field) == (422, "$.variables")  # never `[...]`

    @pytest.mark.parametrize("body", [b"", b"  \r\n "])
    def test_an_empty_body_is_a_400_that_says_so(self, body: bytes) -> None:
        error = refusal(body)
        assert (error.status, error.code) == (400, "invalid_json")
        assert error.detail == "The body is empty; send the webhook as a JSON object."

    @pytest.mark.parametrize("depth", [1_000, 100_000])
    @pytest.mark.parametrize("opener", [b"[", b'{"a":'])
    def test_deeply_nested_json_is_a_422(self, depth: int, opener: bytes) -> None:
        """Nesting deep enough to exhaust the stack is refused, never a RecursionError."""
        closer = b"]" if opener == b"[" else b"}"
        nested = opener * depth + (b"1" if opener != b"[" else b"") + closer * depth
        error = refusal(b'{"userId": "u", "variables": {"a": ' + nested + b"}}")
        assert (error.status, error.field) == (422, "$.variables")

    def test_moderate_nesting_is_accepted(self) -> None:
        """A variable nested a few dozen levels is still a valid body."""
        nested = b"[" * 50 + b"]" * 50
        payload = decode_webhook(b'{"userId": "u", "variables": {"a": ' + nested + b"}}")
        assert isinstance(payload.variables["a"], list)

    def test_ten_thousand_keys_decode_for_the_web_layer_to_count(self) -> None:
        """A 10,000-key object decodes; web.py then refuses more than MAX_VARIABLES keys."""
        variables = {f"k{i}": i for i in range(10_000)}
        payload = decode_webhook(json.dumps({"userId": "u", "variables": variables}).encode())
        assert len(payload.variables) == 10_000

    def test_a_nul_character_survives_decoding_for_the_catalog_to_refuse(self) -> None:
        """\\u0000 is valid JSON; the catalog refuses it where PostgreSQL text cannot hold it."""
        payload = decode_webhook(b'{"userId": "u", "variables": {"s": "a\\u0000b"}}')
        assert payload.variables["s"] == "a\x00b"


REVENUE = REVENUE_QUERY
TYPED = Query(
    name="typed",
    sql="SELECT ...",
    params=("n", "filter.limit"),
    pg_types=("int4", "int8"),
    columns=("x",),
    cache_ttl_s=0,
)
CATALOG = Catalog({"revenue": REVENUE, "typed": TYPED})
GOOD_VARIABLES = {"customer_segment": "enterprise", "date_range": "2024-01-01_to_2024-12-31"}
SEGMENT = "$.variables.customer_segment"
RANGE = "$.variables.date_range"
AGGREGATION = "$.variables.aggregation_type"


def bind_refusal(query: Query, variables: dict[str, Any]) -> RequestError:
    """The RequestError Catalog.bind raises for ``variables``."""
    with pytest.raises(RequestError) as caught:
        CATALOG.bind(query, variables)
    return caught.value


class TestPick:
    def test_the_query_key_wins_over_aggregation_type(self) -> None:
        """``query`` names the query; ``variables.aggregation_type`` is the fallback."""
        assert CATALOG.pick("typed", {"aggregation_type": "revenue"}) is TYPED
        assert CATALOG.pick(None, {"aggregation_type": "revenue"}) is REVENUE

    @pytest.mark.parametrize(
        ("query", "variables", "field", "code"),
        [
            ("revenu", {}, "$.query", "unknown_query"),
            ("revenue' OR '1'='1", {}, "$.query", "unknown_query"),
            (None, {"aggregation_type": "nope"}, "$.variables.aggregation_type", "unknown_query"),
            (None, {"aggregation_type": 5}, "$.variables.aggregation_type", "unknown_query"),
            (None, {"aggregation_type": None}, "$.variables.aggregation_type", "unknown_query"),
            (None, {"aggregation_type": ["revenue"]}, AGGREGATION, "unknown_query"),
            (None, {}, "$.query", "missing_query"),
        ],
    )
    def test_an_unknown_or_missing_query_is_a_422(
        self, query: str | None, variables: dict[str, Any], field: str, code: str
    ) -> None:
        """A typo in the query name is named, with the known names listed."""
        with pytest.raises(RequestError) as caught:
            CATALOG.pick(query, variables)
        assert (caught.value.status, caught.value.code, caught.value.field) == (422, code, field)
        if code == "unknown_query":
            assert "revenue, typed" in caught.value.detail

    def test_a_long_unknown_name_is_cut_in_the_detail(self) -> None:
        """An attacker's 100 kB query name is not echoed whole."""
        with pytest.raises(RequestError) as caught:
            CATALOG.pick(None, {"aggregation_type": "x" * 100_000})
        assert len(caught.value.detail) < 200


class TestBind:
    def test_a_date_range_splits_into_whole_days(self) -> None:
        """.start is the first day at midnight UTC, .end the day after the last day."""
        segment, start, end = CATALOG.bind(REVENUE, GOOD_VARIABLES)
        assert segment == "enterprise"
        assert start == dt.datetime(2024, 1, 1, tzinfo=dt.UTC)
        assert end == dt.datetime(2025, 1, 1, tzinfo=dt.UTC)

    @pytest.mark.parametrize(
        "segment",
        [
            "enterprise' OR '1'='1",
            "'; DROP TABLE transactions; --",
            "$1",
            "$2::text) OR (1=1",
            "\\x00",
            "e" * MAX_TEXT_CHARS,
            "企業",
        ],
    )
    def test_sql_in_a_text_variable_is_bound_verbatim(self, segment: str) -> None:
        """Hostile text is a value passed through unchanged, never SQL."""
        args = CATALOG.bind(REVENUE, {**GOOD_VARIABLES, "customer_segment": segment})
        assert args[0] == segment

    @pytest.mark.parametrize(
        ("changes", "field", "code"),
        [
            ({"customer_segment": ...}, SEGMENT, "missing_parameter"),
            ({"date_range": ...}, RANGE, "missing_parameter"),
            ({"customer_segment": None}, SEGMENT, "invalid_parameter"),
            ({"customer_segment": 42}, SEGMENT, "invalid_parameter"),
            ({"customer_segment": ["smb"]}, SEGMENT, "invalid_parameter"),
            ({"customer_segment": "a\x00b"}, SEGMENT, "invalid_parameter"),
            ({"customer_segment": "e" * (MAX_TEXT_CHARS + 1)}, SEGMENT, "invalid_parameter"),
            ({"date_range": "2024-13-01_to_2024-12-31"}, RANGE, "invalid_parameter"),
            ({"date_range": "2024-12-31_to_2024-01-01"}, RANGE, "invalid_parameter"),
            ({"date_range": "2024-01-01_to_9999-12-31"}, RANGE, "invalid_parameter"),
            ({"date_range": "last year"}, RANGE, "invalid_parameter"),
            ({"date_range": ""}, RANGE, "invalid_parameter"),
            ({"date_range": None}, RANGE, "invalid_parameter"),
            ({"date_range": 20240101}, RANGE, "invalid_parameter"),
            ({"date_range": {"end": "2024-01-01"}}, RANGE, "invalid_parameter"),
        ],
    )
    def test_a_bad_parameter_is_a_422_naming_the_variable(
        self, changes: dict[str, Any], field: str, code: str
    ) -> None:
        """A missing, null, mistyped or malformed variable names its JSON path."""
        merged = {**GOOD_VARIABLES, **changes}
        error = bind_refusal(REVENUE, {k: v for k, v in merged.items() if v is not ...})
        assert (error.status, error.code, error.field) == (422, code, field)

    def test_a_nul_character_is_named_as_the_reason(self) -> None:
        """The 422 for a NUL says why: PostgreSQL text cannot hold it."""
        error = bind_refusal(REVENUE, {**GOOD_VARIABLES, "customer_segment": "ent\x00erprise"})
        assert "NUL" in error.detail

    def test_a_nested_parameter_path_is_named(self) -> None:
        """A dotted parameter path blames the nested key."""
        error = bind_refusal(TYPED, {"n": 1, "filter": {"limit": "many"}})
        assert (error.status, error.field) == (422, "$.variables.filter.limit")
        assert CATALOG.bind(TYPED, {"n": "7", "filter": {"limit": 2**40}}) == [7, 2**40]


class TestCoerce:
    @pytest.mark.parametrize(
        ("value", "pg_type", "expected"),
        [
            (32767, "int2", 32767),
            ("-12", "int4", -12),
            (2**63 - 1, "int8", 2**63 - 1),
            ("1.50", "numeric", Decimal("1.50")),
            (2, "float8", 2.0),
            ("TRUE", "bool", True),
            (False, "bool", False),
            ("2024-02-29", "date", dt.date(2024, 2, 29)),
            ("2024-02-29", "timestamptz", dt.datetime(2024, 2, 29, tzinfo=dt.UTC)),
            ("2024-02-29T12:00:00+02:00", "timestamp", dt.datetime(2024, 2, 29, 10)),
            (
                "0d8b5f2e-4a0e-4d5b-9a57-5a0f0d2f7c1e",
                "uuid",
                uuid.UUID("0d8b5f2e-4a0e-4d5b-9a57-5a0f0d2f7c1e"),
            ),
            ({"a": [1, "x"]}, "jsonb", '{"a":[1,"x"]}'),
        ],
    )
    def test_good_values_bind_as_the_python_type_asyncpg_expects(
        self, value: Any, pg_type: str, expected: Any
    ) -> None:
        """Each supported PostgreSQL type gets the value it can bind."""
        assert _coerce(value, pg_type) == expected

    @pytest.mark.parametrize(
        ("value", "pg_type"),
        [
            (None, "int4"),
            (32768, "int2"),
            (2**63, "int8"),
            (-(2**63) - 1, "int8"),
            (10**4000, "int8"),
            ("9" * 25, "int8"),
            (1.5, "int4"),
            (True, "int4"),
            ("twelve", "int4"),
            (True, "numeric"),
            ("NaN", "numeric"),
            ("Infinity", "numeric"),
            ("sNaN", "numeric"),
            ("1" * 101, "numeric"),
            ("1e999999999", "numeric"),
            ("1e-999999999", "numeric"),
            ("1e131072", "numeric"),
            ("1e-16384", "numeric"),
            ("1e400", "float8"),
            ("-1e400", "float8"),
            ("1e39", "float4"),
            (10**400, "float8"),
            ("inf", "float8"),
            ("yes", "bool"),
            (1, "bool"),
            ("2024-02-30", "date"),
            (20240101, "date"),
            ("2024-01-01T25:00", "timestamptz"),
            (["2024-01-01"], "timestamptz"),
            ("9999-12-31T23:59:59-01:00", "timestamp"),
            ("0001-01-01T00:00:00+01:00", "timestamp"),
            ("9999-12-31T23:59:59-01:00", "timestamptz"),
            ("0001-01-01T00:00:00+01:00", "timestamptz"),
            ("not-a-uuid", "uuid"),
            (12, "uuid"),
            ({"a": "x\x00y"}, "jsonb"),
            ({"k\x00": 1}, "jsonb"),
            ([["deep", {"s": "\x00"}]], "jsonb"),
            ("x", "tsvector"),
        ],
    )
    def test_bad_values_are_a_param_error(self, value: Any, pg_type: str) -> None:
        """A value PostgreSQL would refuse at run time is refused now, as a ParamError."""
        with pytest.raises(ParamError):
            _coerce(value, pg_type)

    def test_json_may_hold_a_nul_where_jsonb_may_not(self) -> None:
        """The json type keeps \\u0000 as written; only jsonb refuses it."""
        assert _coerce({"a": "x\x00y"}, "json") == '{"a":"x\\u0000y"}'


def request_with(
    content_length: bytes | None, chunks: list[bytes]
) -> tuple[str | None, Callable[[], Awaitable[Message]]]:
    """A Content-Length header and an ASGI receive whose body arrives in ``chunks``
    (consumed from the list)."""
    pending = chunks if chunks else [b""]

    async def receive() -> Message:
        chunk = pending.pop(0)
        return {"type": "http.request", "body": chunk, "more_body": bool(pending)}

    declared = content_length.decode("latin-1") if content_length is not None else None
    return declared, receive


class TestReadBody:
    @pytest.mark.anyio
    async def test_a_body_within_the_limit_is_read_whole(self) -> None:
        """Chunks up to the limit are joined."""
        body = await read_body(*request_with(b"6", [b"abc", b"def"]), limit=6)
        assert body == b"abcdef"

    @pytest.mark.anyio
    @pytest.mark.parametrize("declared", [None, b"3"])
    async def test_a_body_growing_past_the_limit_is_a_413(self, declared: bytes | None) -> None:
        """Chunked or under-declared, the body is cut off as soon as it passes the limit."""
        chunks = [b"x" * 4] * 1_000
        with pytest.raises(RequestError) as caught:
            await read_body(*request_with(declared, chunks), limit=10)
        assert caught.value.status == 413
        assert len(chunks) == 1_000 - 3  # three chunks were read, the rest never

    @pytest.mark.anyio
    @pytest.mark.parametrize("declared", [b"11", b"9" * 30, b"9" * 5_000, b"00000000000000000011"])
    async def test_a_declared_length_over_the_limit_is_a_413_before_reading(
        self, declared: bytes
    ) -> None:
        """A Content-Length over the limit is refused from the header alone, however long."""
        with pytest.raises(RequestError) as caught:
            await read_body(*request_with(declared, [b"x"]), limit=10)
        assert caught.value.status == 413

    @pytest.mark.anyio
    @pytest.mark.parametrize(
        "declared", [b"abc", b"-1", b"+5", b"1e3", b"0x10", b"\xb2", b"\xb9\xb2", b"", b"1 2"]
    )
    async def test_a_content_length_that_is_not_a_number_is_a_400(self, declared: bytes) -> None:
        """Anything but ASCII digits is a 400, never an exception from int()."""
        with pytest.raises(RequestError) as caught:
            await read_body(*request_with(declared, [b"{}"]), limit=10)
        assert (caught.value.status, caught.value.field) == (400, None)


class TestPreferWait:
    @pytest.mark.parametrize(
        ("prefer", "expected"),
        [
            ("wait=5", 5.0),
            ("respond-async, wait=3", 3.0),
            ('wait="2.5"', 2.5),
            ("WAIT = 4; foo", 4.0),
            ("wait=100", 10.0),  # capped
            ("wait=99999999999999999999999", 10.0),  # a long number is capped too
            ("wait=1e9", 0.0),  # not delta-seconds: ignored, not read as 1
            ("wait=5x", 0.0),
            ("wait=-1", 0.0),
            ("nowait=5", 0.0),
            ("", 0.0),
            (None, 0.0),
        ],
    )
    def test_only_a_well_formed_wait_counts(self, prefer: str | None, expected: float) -> None:
        """RFC 7240 wait is a number of seconds; anything else in its place is no wait."""
        assert _prefer_wait_s(prefer, 10.0) == expected
