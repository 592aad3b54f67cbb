"""The query catalog's binding of webhook variables: paths, date ranges and PostgreSQL types."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from typing import Any

import pytest

from cognigy_offload.errors import RequestError
from cognigy_offload.queries import Catalog, Query, lookup, rows_to_result
from tests.conftest import REVENUE_QUERY

REVENUE = REVENUE_QUERY
TYPED = Query(
    name="typed",
    sql="SELECT ...",
    params=("n", "big", "amount", "flag", "day", "id"),
    pg_types=("int4", "int8", "numeric", "bool", "date", "uuid"),
    columns=("x",),
    cache_ttl_s=0,
)
CATALOG = Catalog({"revenue": REVENUE, "typed": TYPED})
VARIABLES = {"customer_segment": "enterprise", "date_range": "2024-01-01_to_2024-12-31"}


def test_date_range_covers_both_days_whole_at_midnight_utc() -> None:
    """.start is the first day, .end the day after the last, as UTC midnights."""
    args = CATALOG.bind(REVENUE, VARIABLES)
    assert args == [
        "enterprise",
        dt.datetime(2024, 1, 1, tzinfo=dt.UTC),
        dt.datetime(2025, 1, 1, tzinfo=dt.UTC),
    ]


def test_a_single_day_range_is_one_day_long() -> None:
    """A range from a day to the same day spans exactly 24 hours."""
    args = CATALOG.bind(REVENUE, {**VARIABLES, "date_range": "2024-02-29_to_2024-02-29"})
    assert args[2] - args[1] == dt.timedelta(days=1)


@pytest.mark.parametrize(
    ("variables", "field", "code"),
    [
        (
            {"date_range": "2024-01-01_to_2024-12-31"},
            "$.variables.customer_segment",
            "missing_parameter",
        ),
        (
            {**VARIABLES, "date_range": "2024-12-31_to_2024-01-01"},
            "$.variables.date_range",
            "invalid_parameter",
        ),
        (
            {**VARIABLES, "date_range": "2024-02-30_to_2024-03-01"},
            "$.variables.date_range",
            "invalid_parameter",
        ),
        ({**VARIABLES, "date_range": 20240101}, "$.variables.date_range", "invalid_parameter"),
        (
            {**VARIABLES, "customer_segment": None},
            "$.variables.customer_segment",
            "invalid_parameter",
        ),
        (
            {**VARIABLES, "customer_segment": ["a"]},
            "$.variables.customer_segment",
            "invalid_parameter",
        ),
        (
            {**VARIABLES, "customer_segment": "a\x00b"},
            "$.variables.customer_segment",
            "invalid_parameter",
        ),
    ],
)
def test_bad_variables_are_422_naming_the_field(
    variables: dict[str, Any], field: str, code: str
) -> None:
    """Every refusal says which variable is wrong, as a JSON path."""
    with pytest.raises(RequestError) as caught:
        CATALOG.bind(REVENUE, variables)
    assert (caught.value.status, caught.value.code, caught.value.field) == (422, code, field)


GOOD_TYPED = {
    "n": "42",
    "big": 2**62,
    "amount": "12.50",
    "flag": "true",
    "day": "2024-05-01",
    "id": "5b0c7a52-1d0e-4f57-9a57-5a0f0d2f7c1e",
}


def test_values_convert_to_the_types_postgresql_reports() -> None:
    """Digits become integers, numbers exact Decimals, dates dates, UUIDs UUIDs."""
    n, big, amount, flag, day, ident = CATALOG.bind(TYPED, GOOD_TYPED)
    assert (n, big, amount, flag, day) == (42, 2**62, Decimal("12.50"), True, dt.date(2024, 5, 1))
    assert str(ident) == GOOD_TYPED["id"]


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("n", 2**31),
        ("n", True),
        ("n", 1.5),
        ("big", 2**63),
        ("amount", "NaN"),
        ("amount", "1e999999"),
        ("flag", "yes"),
        ("day", "2024-13-01"),
        ("id", "nope"),
        ("amount", [1]),
    ],
)
def test_out_of_range_or_mistyped_values_are_refused(name: str, value: Any) -> None:
    """Values PostgreSQL would reject are refused before a job exists."""
    with pytest.raises(RequestError) as caught:
        CATALOG.bind(TYPED, {**GOOD_TYPED, name: value})
    assert caught.value.field == f"$.variables.{name}"


def test_pick_prefers_query_then_aggregation_type() -> None:
    """`query` wins; else variables.aggregation_type; unknown names list the known ones."""
    assert CATALOG.pick("typed", {"aggregation_type": "revenue"}).name == "typed"
    assert CATALOG.pick(None, {"aggregation_type": "revenue"}).name == "revenue"
    with pytest.raises(RequestError, match="known queries: revenue, typed") as caught:
        CATALOG.pick("nope", {})
    assert caught.value.field == "$.query"
    with pytest.raises(RequestError) as missing:
        CATALOG.pick(None, {})
    assert missing.value.code == "missing_query"
    with pytest.raises(RequestError) as typed:
        CATALOG.pick(None, {"aggregation_type": 5})
    assert typed.value.detail.startswith("A query name is a string, got an integer")
    assert typed.value.field == "$.variables.aggregation_type"


def test_nested_variables_are_reached_by_dotted_paths() -> None:
    """A dotted path walks into nested objects and blames the deepest key."""
    assert lookup({"a": {"b": {"c": 1}}}, "a.b.c") == (1, "$.variables.a.b.c")


def test_one_row_gives_its_columns_other_counts_give_rows() -> None:
    """An aggregate's single row is the result object; other row counts are listed."""
    assert rows_to_result(("count", "total"), [(3, Decimal("1.50"))]) == {
        "count": 3,
        "total": Decimal("1.50"),
    }
    assert rows_to_result(("n",), []) == {"rowCount": 0, "rows": []}
    assert rows_to_result(("n",), [(1,), (2,)]) == {"rowCount": 2, "rows": [{"n": 1}, {"n": 2}]}
