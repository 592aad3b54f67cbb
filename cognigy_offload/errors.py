"""The exception hierarchy of cognigy-offload.

Third-party errors (asyncpg, httpx, tomllib) are translated into these at the one
module that talks to that party, always with ``raise ... from exc``.

    OffloadError
    ├── ConfigError               config file, environment or queries are invalid
    ├── RequestError              a webhook request is refused (carries HTTP status and field)
    ├── StoreError                the job table cannot be reached or written
    │   └── StoreUnavailable      PostgreSQL does not answer (connection refused, restarted)
    ├── QueryError                an aggregation query failed (bad data, permission, ...)
    │   ├── QueryTimeout          it ran into statement_timeout
    │   └── QueryUnavailable      the database went away while it ran: retry it
    └── DeliveryError             a push to Cognigy failed for good (kind, http_status)
        └── TokenError            the OAuth2 token request failed
"""

from __future__ import annotations


class OffloadError(Exception):
    """Root of every error this package raises on purpose."""


class ConfigError(OffloadError):
    """Raised when config.toml, an environment override or a query definition is invalid."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("; ".join(problems))


class RequestError(OffloadError):
    """Raised when a webhook request is refused; maps to the JSON error shape of SPEC §2."""

    def __init__(
        self,
        status: int,
        code: str,
        detail: str,
        field: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.status = status
        self.code = code
        self.detail = detail
        self.field = field
        self.headers = headers or {}
        super().__init__(detail)


class StoreError(OffloadError):
    """Raised when the job table cannot be read or written."""


class StoreUnavailable(StoreError):
    """Raised when PostgreSQL does not answer (refused, restarting, pool closed)."""


class QueryError(OffloadError):
    """Raised when an aggregation query fails for a reason a retry will not fix."""

    kind = "query"


class QueryTimeout(QueryError):
    """Raised when an aggregation query runs into statement_timeout."""

    kind = "query_timeout"


class QueryUnavailable(QueryError):
    """Raised when the database went away while a query ran; the job is retried."""

    kind = "database_unavailable"


class DeliveryError(OffloadError):
    """Raised when a push to Cognigy fails for good; ``kind`` names why (SPEC §3)."""

    def __init__(self, kind: str, detail: str, http_status: int | None = None) -> None:
        self.kind = kind
        self.detail = detail
        self.http_status = http_status
        super().__init__(detail)


class TokenError(DeliveryError):
    """Raised when the OAuth2 token endpoint does not give a usable token."""


class DeadlineExceeded(OffloadError):
    """Raised when a job's deadline passed before its next delivery attempt could start."""


class LeaseLost(OffloadError):
    """Raised when another claim of the job (a newer fencing epoch) took it from this worker."""
