"""structlog set-up: JSON lines in production, readable console lines in a terminal."""

from __future__ import annotations

import datetime as dt
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
_LEVEL_NAMES = {"warn": "warning", "exception": "error", "critical": "error"}


def _json_line(logger: Any, method_name: str, event: MutableMapping[str, Any]) -> bytes:
    """Level, UTC timestamp, redaction, traceback and msgspec JSON in one step: the same
    line as structlog's add_log_level/TimeStamper/JSONRenderer chain at a third of its
    cost (a few lines are written per job, so this is on the hot path)."""
    event["level"] = _LEVEL_NAMES.get(method_name, method_name)
    event["timestamp"] = dt.datetime.now(dt.UTC).isoformat().replace("+00:00", "Z")
    _redact(logger, method_name, event)
    if "exc_info" in event:
        event = structlog.processors.format_exc_info(logger, method_name, event)
    return _ENCODER.encode(event)


def configure(log_format: str = "auto", level: str = "info") -> None:
    """Configure structlog for the process (called once by the CLI, never by the library)."""
    use_console = log_format == "console" or (log_format == "auto" and sys.stderr.isatty())
    processors: list[Any] = [structlog.contextvars.merge_contextvars]
    factory: Any
    if use_console:
        processors += [
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _redact,
            structlog.processors.format_exc_info,
            structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty()),
        ]
        factory = structlog.PrintLoggerFactory(file=sys.stderr)
    else:
        processors.append(_json_line)
        factory = structlog.BytesLoggerFactory(file=sys.stderr.buffer)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=factory,
        cache_logger_on_first_use=True,
    )
    # uvicorn and asyncpg log through the standard library: keep them at warning and up.
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(name)s %(message)s")
