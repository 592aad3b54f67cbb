"""structlog set-up: JSON lines in production, readable console lines in a terminal."""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any

import msgspec
import structlog

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}
SECRET_KEYS = frozenset(
    {
        "authorization",
        "client_secret",
        "access_token",
        "api_key",
        "token",
        "x-api-key",
        "password",
        "secret",
    }
)


def _redact(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Never let a secret-named field reach the output, whoever logged it."""
    for key in list(event):
        if key.lower() in SECRET_KEYS:
            event[key] = "<redacted>"
    return event


_ENCODER = msgspec.json.Encoder(enc_hook=str, decimal_format="number")


def _to_json(event: Any, **_: Any) -> str:
    """JSON-encode a log line with msgspec: several times faster than json.dumps."""
    return _ENCODER.encode(event).decode()


def configure(log_format: str = "auto", level: str = "info") -> None:
    """Configure structlog for the process (called once by the CLI, never by the library)."""
    renderer: Any
    use_console = log_format == "console" or (log_format == "auto" and sys.stderr.isatty())
    if use_console:
        renderer = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    else:
        renderer = structlog.processors.JSONRenderer(serializer=_to_json)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _redact,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    # uvicorn and asyncpg log through the standard library: keep them at warning and up.
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(name)s %(message)s")
