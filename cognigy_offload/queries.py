"""The query catalog: prepared at start-up, webhook variables bound by PostgreSQL's types.

Also runs a query (READ ONLY, statement_timeout, values always bound as parameters),
shares one run between identical concurrent jobs (single-flight) and keeps results
fresh for ``cache_ttl_s``.
"""

from __future__ import annotations

import datetime as dt
import functools
import math
import re
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

import anyio
import asyncpg

from . import db
from .config import QueryConfig
from .errors import ConfigError, QueryError, QueryTimeout, QueryUnavailable, RequestError
from .models import ENCODER, EXACT_DECODER, json_value

DATE_RANGE = re.compile(r"^(\d{4}-\d{2}-\d{2})_to_(\d{4}-\d{2}-\d{2})$")
MAX_TEXT_CHARS = 10_000
# PostgreSQL's numeric holds up to 131072 digits before the point and 16383 after it.
NUMERIC_MAX_ADJUSTED = 131_071
NUMERIC_MIN_EXPONENT = -16_383
FLOAT4_MAX = 3.4028234663852886e38
_INT_RANGES = {
    "int2": (-(2**15), 2**15 - 1),
    "int4": (-(2**31), 2**31 - 1),
    "int8": (-(2**63), 2**63 - 1),
}
TEXT_TYPES = frozenset({"text", "varchar", "bpchar", "name", "citext"})
SUPPORTED_TYPES = TEXT_TYPES | frozenset(
    {
        "int2",
        "int4",
        "int8",
        "numeric",
        "float4",
        "float8",
        "bool",
        "date",
        "timestamp",
        "timestamptz",
        "uuid",
        "json",
        "jsonb",
    }
)


RECENT_S = 60.0  # how long a run's result may serve jobs accepted while it ran
RECENT_MAX = 10_000


class ParamError(Exception):
    """A webhook variable cannot be bound to its query parameter; says why."""


@dataclass(frozen=True)
class Query:
    """One catalog entry: its SQL, where each parameter comes from and PostgreSQL's types."""

    name: str
    sql: str
    params: tuple[str, ...]
    pg_types: tuple[str, ...]
    columns: tuple[str, ...]
    cache_ttl_s: float
    json_columns: frozenset[int] = frozenset()


def _as_date(text: Any) -> dt.date:
    if not isinstance(text, str):
        raise ParamError(f"expected a date as a YYYY-MM-DD string, got {_kind(text)}")
    try:
        return dt.date.fromisoformat(text)
    except ValueError as exc:
        raise ParamError(f"{text[:40]!r} is not a date (YYYY-MM-DD)") from exc


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    return {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "an array",
        dict: "an object",
    }.get(type(value), type(value).__name__)


def _coerce(value: Any, pg_type: str) -> Any:
    """Turn one JSON value into the Python value asyncpg binds for ``pg_type``."""
    if value is None:
        raise ParamError("must not be null")
    if pg_type in TEXT_TYPES:
        if not isinstance(value, str):
            raise ParamError(f"expected a string, got {_kind(value)}")
        if "\x00" in value:
            raise ParamError("contains a NUL character, which PostgreSQL text cannot hold")
        if len(value) > MAX_TEXT_CHARS:
            raise ParamError(f"longer than {MAX_TEXT_CHARS} characters")
        return value
    if pg_type in _INT_RANGES:
        if isinstance(value, str) and re.fullmatch(r"-?\d{1,20}", value.strip()):
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            raise ParamError(f"expected an integer, got {_kind(value)}")
        low, high = _INT_RANGES[pg_type]
        if not low <= value <= high:
            raise ParamError(f"integer out of range for {pg_type}")
        return value
    if pg_type in ("numeric", "float4", "float8"):
        if isinstance(value, bool) or not isinstance(value, int | float | str | Decimal):
            raise ParamError(f"expected a number, got {_kind(value)}")
        try:
            number = Decimal(str(value).strip()) if len(str(value)) <= 100 else None
        except InvalidOperation:
            number = None
        if number is None or not number.is_finite():
            raise ParamError("expected a finite number")
        if pg_type == "numeric":
            # asyncpg cannot encode what PostgreSQL's numeric cannot hold; the job would fail.
            if number and not (
                number.adjusted() <= NUMERIC_MAX_ADJUSTED
                and number.as_tuple().exponent >= NUMERIC_MIN_EXPONENT  # type: ignore[operator]
            ):
                raise ParamError("number out of range for numeric")
            return number
        as_float = float(number)
        if not math.isfinite(as_float) or (pg_type == "float4" and abs(as_float) > FLOAT4_MAX):
            raise ParamError(f"number out of range for {pg_type}")
        return as_float
    if pg_type == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ParamError(f"expected true or false, got {_kind(value)}")
    if pg_type == "date":
        if isinstance(value, dt.date):
            return value
        return _as_date(value)
    if pg_type in ("timestamp", "timestamptz"):
        return _as_timestamp(value, aware=pg_type == "timestamptz")
    if pg_type == "uuid":
        try:
            return uuid.UUID(str(value)) if isinstance(value, str) else _raise_uuid(value)
        except ValueError as exc:
            raise ParamError("expected a UUID") from exc
    if pg_type in ("json", "jsonb"):
        if pg_type == "jsonb" and _holds_nul(value):
            raise ParamError("contains a NUL character, which PostgreSQL jsonb cannot hold")
        return ENCODER.encode(value).decode()
    raise ParamError(f"unsupported parameter type {pg_type}")


def _raise_uuid(value: Any) -> uuid.UUID:
    raise ParamError(f"expected a UUID string, got {_kind(value)}")


def _as_timestamp(value: Any, *, aware: bool) -> dt.datetime:
    """A date means midnight UTC; a datetime without offset is taken as UTC."""
    if isinstance(value, dt.datetime):
        moment = value
    elif isinstance(value, dt.date):
        moment = dt.datetime.combine(value, dt.time())
    elif isinstance(value, str):
        try:
            moment = dt.datetime.fromisoformat(value.strip())
        except ValueError as exc:
            raise ParamError(f"{value[:40]!r} is not a date or timestamp (ISO 8601)") from exc
    else:
        raise ParamError(f"expected a date or timestamp string, got {_kind(value)}")
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    try:
        # asyncpg converts to UTC too: an offset that leaves years 1-9999 cannot be bound.
        utc = moment.astimezone(dt.UTC)
    except OverflowError as exc:
        raise ParamError(f"{str(value)[:40]!r} is out of range in UTC") from exc
    return moment if aware else utc.replace(tzinfo=None)


def _holds_nul(value: Any) -> bool:
    """True if a string anywhere in a JSON value (keys too) contains NUL."""
    # Iterative: decoded JSON may be nested nearly as deep as the recursion limit.
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if "\x00" in item:
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def _date_range(value: Any) -> tuple[dt.date, dt.date]:
    """``YYYY-MM-DD_to_YYYY-MM-DD`` → (first day, the day after the last day)."""
    if not isinstance(value, str):
        raise ParamError(f"expected a YYYY-MM-DD_to_YYYY-MM-DD string, got {_kind(value)}")
    return _parse_date_range(value)


@functools.lru_cache(maxsize=4096)
def _parse_date_range(value: str) -> tuple[dt.date, dt.date]:
    # Cached: a query names the range twice (start, end), and bots ask the same ranges
    # again and again. Refusals raise and are not cached.
    match = DATE_RANGE.match(value.strip())
    if not match:
        raise ParamError(f"{value[:60]!r} is not a date range YYYY-MM-DD_to_YYYY-MM-DD")
    start, last = _as_date(match.group(1)), _as_date(match.group(2))
    if last < start:
        raise ParamError("the range ends before it starts")
    if last == dt.date.max:
        raise ParamError("the range ends too late")
    return start, last + dt.timedelta(days=1)


def lookup(variables: Mapping[str, Any], path: str) -> tuple[Any, str]:
    """Find the value a parameter path names; returns it with the JSON path to blame.

    ``date_range.start`` / ``.end`` split the seed's range form; any other dotted path
    walks into nested objects.
    """
    head, _, rest = path.partition(".")
    where = f"$.variables.{head}"
    if head not in variables:
        raise _Missing(where)
    value = variables[head]
    if rest in ("start", "end") and isinstance(value, str) and "_to_" in value:
        try:
            start, end = _date_range(value)
        except ParamError as exc:
            raise _Bad(where, str(exc)) from exc
        return (start if rest == "start" else end), where
    for part in rest.split(".") if rest else ():
        if isinstance(value, dict) and part in value:
            value = value[part]
            where = f"{where}.{part}"
            continue
        if rest in ("start", "end"):
            raise _Bad(where, "is not a date range YYYY-MM-DD_to_YYYY-MM-DD")
        raise _Missing(f"{where}.{part}")
    return value, where


class _Missing(Exception):
    def __init__(self, where: str) -> None:
        self.where = where


class _Bad(Exception):
    def __init__(self, where: str, why: str) -> None:
        self.where = where
        self.why = why


class Catalog:
    """The named queries of config.toml, prepared against the database."""

    def __init__(self, queries: Mapping[str, Query]) -> None:
        self.queries = dict(queries)

    @classmethod
    async def prepare(cls, pool: asyncpg.Pool, configs: Mapping[str, QueryConfig]) -> Catalog:
        """Prepare every query once; bad SQL or an unusable parameter stops start-up."""
        problems: list[str] = []
        queries: dict[str, Query] = {}
        async with db.connection(pool) as conn:
            for name, cfg in configs.items():
                try:
                    stmt = await conn.prepare(cfg.sql)
                except asyncpg.PostgresError as exc:
                    problems.append(f"queries.{name}.sql: PostgreSQL refused it: {exc}")
                    continue
                types = tuple(t.name for t in stmt.get_parameters())
                columns = tuple(a.name for a in stmt.get_attributes())
                json_columns = frozenset(
                    i
                    for i, a in enumerate(stmt.get_attributes())
                    if a.type.name in ("json", "jsonb")
                )
                if len(types) != len(cfg.params):
                    problems.append(
                        f"queries.{name}.params: the SQL has {len(types)} parameters "
                        f"but params lists {len(cfg.params)}"
                    )
                    continue
                for index, pg_type in enumerate(types):
                    if pg_type not in SUPPORTED_TYPES:
                        problems.append(
                            f"queries.{name}.params[{index}]: parameter ${index + 1} has "
                            f"type {pg_type}, which webhook variables cannot fill; cast it "
                            "in the SQL (e.g. $1::text)"
                        )
                queries[name] = Query(
                    name,
                    cfg.sql,
                    tuple(cfg.params),
                    types,
                    columns,
                    cfg.cache_ttl_s,
                    json_columns,
                )
        if problems:
            raise ConfigError(problems)
        return cls(queries)

    def pick(self, query: str | None, variables: Mapping[str, Any]) -> Query:
        """The query a webhook names: ``query``, else ``variables.aggregation_type``."""
        if query is not None:
            name, where = query, "$.query"
        elif "aggregation_type" in variables:
            name, where = variables["aggregation_type"], "$.variables.aggregation_type"
        else:
            raise RequestError(
                422,
                "missing_query",
                "Name the query in `query` or `variables.aggregation_type`.",
                "$.query",
            )
        if not isinstance(name, str) or name not in self.queries:
            known = ", ".join(sorted(self.queries)) or "none"
            said = (
                f"Unknown query {name[:60]!r}"
                if isinstance(name, str)
                else f"A query name is a string, got {_kind(name)}"
            )
            raise RequestError(422, "unknown_query", f"{said}; known queries: {known}.", where)
        return self.queries[name]

    def bind(self, query: Query, variables: Mapping[str, Any]) -> list[Any]:
        """The parameter values of ``query`` from webhook variables, checked by type."""
        args: list[Any] = []
        for path, pg_type in zip(query.params, query.pg_types, strict=True):
            try:
                value, where = lookup(variables, path)
                args.append(_coerce(value, pg_type))
            except _Missing as exc:
                raise RequestError(
                    422,
                    "missing_parameter",
                    f"Query {query.name!r} needs the variable {path!r}.",
                    exc.where,
                ) from None
            except _Bad as exc:
                raise RequestError(
                    422, "invalid_parameter", f"Variable {path!r}: {exc.why}.", exc.where
                ) from None
            except ParamError as exc:
                raise RequestError(
                    422, "invalid_parameter", f"Variable {path!r}: {exc}.", where
                ) from None
        return args


def rows_to_result(
    columns: tuple[str, ...], rows: list[Any], json_columns: frozenset[int] = frozenset()
) -> dict[str, Any]:
    """One row gives its columns; any other count gives ``rowCount`` and ``rows``.

    json/jsonb columns arrive from asyncpg as text and are parsed (numbers kept exact).
    """

    def value(row: Any, index: int) -> Any:
        raw = row[index]
        if index in json_columns and isinstance(raw, str):
            return json_value(EXACT_DECODER.decode(raw))
        return json_value(raw)

    def as_object(row: Any) -> dict[str, Any]:
        return {name: value(row, i) for i, name in enumerate(columns)}

    if len(rows) == 1:
        return as_object(rows[0])
    return {"rowCount": len(rows), "rows": [as_object(row) for row in rows]}


def _check_still_read_only(conn: asyncpg.Connection, query: Query) -> None:
    """A query that switched its session's default to read-write (set_config) ran read
    only itself, but would leave the pooled connection writable for the next one: close
    that connection and fail the job. PostgreSQL 14+ reports the setting with every
    change, so this costs no round trip (older servers do not report it)."""
    mode = getattr(conn.get_settings(), "default_transaction_read_only", "on")
    if mode != "on":
        conn.terminate()
        raise QueryError(
            f"query {query.name!r} switched its connection to read-write "
            "(default_transaction_read_only); the connection was closed"
        )


@dataclass
class _Flight:
    done: anyio.Event = field(default_factory=anyio.Event)
    result: dict[str, Any] | None = None
    error: BaseException | None = None


class Executor:
    """Runs catalog queries; identical concurrent runs are shared, fresh results reused."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        on_run: Callable[[Query, float, str], None] | None = None,
        on_shared: Callable[[Query, str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        acquire_timeout_s: float = db.ACQUIRE_TIMEOUT_S,
    ) -> None:
        self._pool = pool
        # How long a worker waits for a free query connection: with more workers than
        # connections that is the normal case, not an outage.
        self._acquire_timeout_s = acquire_timeout_s
        self._flights: dict[tuple[str, bytes], _Flight] = {}
        self._cache: dict[tuple[str, bytes], tuple[float, dict[str, Any]]] = {}
        # Insertion-ordered: the first entry is the oldest run.
        self._recent: dict[tuple[str, bytes], tuple[float, dict[str, Any]]] = {}
        self._on_run = on_run
        self._on_shared = on_shared
        self._clock = clock
        self.runs = 0

    async def run(
        self, query: Query, args: list[Any], *, accepted_at_s: float | None = None
    ) -> dict[str, Any]:
        """The result of ``query`` with ``args``, running it at most once at a time.

        A job accepted at ``accepted_at_s`` (Unix seconds) also takes the result of a run
        that was still running at that moment, even when its worker asks only after the run
        ended: it is the answer a worker joining that run at acceptance would have shared
        (single-flight), so no fresher than one run's duration, never from before the job
        arrived and the run was already over. Only ``cache_ttl_s`` reuses older results.
        """
        key = (query.name, ENCODER.encode([str(a) if not isinstance(a, str) else a for a in args]))
        cached = self._cache.get(key)
        if cached is not None:
            if cached[0] > self._clock():
                self._shared(query, "cache")
                return cached[1]
            del self._cache[key]
        if accepted_at_s is not None:
            recent = self._recent.get(key)
            if recent is not None and recent[0] >= accepted_at_s:
                self._shared(query, "fresh")
                return recent[1]
        flight = self._flights.get(key)
        if flight is not None:
            self._shared(query, "coalesced")
            await flight.done.wait()
            if flight.error is not None:
                raise flight.error
            assert flight.result is not None
            return flight.result
        flight = self._flights[key] = _Flight()
        try:
            flight.result = await self._execute(query, args)
            self._remember(key, time.time(), flight.result)
            if query.cache_ttl_s > 0:
                self._prune_cache()
                self._cache[key] = (self._clock() + query.cache_ttl_s, flight.result)
            return flight.result
        except BaseException as exc:
            flight.error = exc
            raise
        finally:
            del self._flights[key]
            flight.done.set()

    def _remember(self, key: tuple[str, bytes], ended_s: float, result: dict[str, Any]) -> None:
        """Keep the latest run's result per question for RECENT_S (bounded, oldest out)."""
        self._recent.pop(key, None)
        self._recent[key] = (ended_s, result)
        horizon_s = ended_s - RECENT_S
        while self._recent:
            oldest_key, (oldest_s, _) = next(iter(self._recent.items()))
            if oldest_s >= horizon_s and len(self._recent) <= RECENT_MAX:
                break
            del self._recent[oldest_key]

    def _shared(self, query: Query, how: str) -> None:
        if self._on_shared is not None:
            self._on_shared(query, how)

    def _prune_cache(self) -> None:
        now = self._clock()
        for key in [k for k, (expires, _) in self._cache.items() if expires <= now]:
            del self._cache[key]

    async def _execute(self, query: Query, args: list[Any]) -> dict[str, Any]:
        started = time.perf_counter()
        outcome = "error"
        self.runs += 1
        try:
            # The pool's connections are read-only by default: one statement, one
            # read-only transaction, no BEGIN/COMMIT round trips.
            async with db.connection(self._pool, self._acquire_timeout_s) as conn:
                rows = await conn.fetch(query.sql, *args)
                _check_still_read_only(conn, query)
            outcome = "ok"
            return rows_to_result(query.columns, rows, query.json_columns)
        except asyncpg.QueryCanceledError as exc:
            outcome = "timeout"
            raise QueryTimeout(f"query {query.name!r} ran into statement_timeout") from exc
        except db.UNAVAILABLE_ERRORS as exc:
            outcome = "unavailable"
            raise QueryUnavailable(f"database unavailable while running {query.name!r}") from exc
        except asyncpg.PostgresError as exc:
            raise QueryError(f"query {query.name!r} failed: {exc}") from exc
        finally:
            if self._on_run is not None:
                self._on_run(query, time.perf_counter() - started, outcome)
