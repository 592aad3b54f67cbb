"""structlog set-up: JSON lines in production, readable console lines in a terminal."""

from __future__ import annotations

import asyncio
import atexit
import logging
import math
import sys
import threading
import time
import traceback
from collections.abc import MutableMapping
from typing import Any, BinaryIO

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
    if SECRET_KEYS.isdisjoint(map(str.lower, event)):
        return event  # the usual case, checked without a Python-level loop
    for key in list(event):
        if key.lower() in SECRET_KEYS:
            event[key] = "<redacted>"
    return event


_ENCODER = msgspec.json.Encoder(enc_hook=str, decimal_format="number")
_LEVEL_NAMES = {"warn": "warning", "exception": "error", "critical": "error"}


_second: list[Any] = [None, ""]  # the last whole second seen, and its ISO 8601 text


def _timestamp(now_ns: int) -> str:
    """``2026-12-03T10:00:00.123456Z`` (from time.time_ns()), as structlog's
    TimeStamper(fmt="iso", utc=True) writes it, at a fraction of datetime's cost (the
    second's text is kept)."""
    second, nanos = divmod(now_ns, 1_000_000_000)
    if second != _second[0]:
        _second[0], _second[1] = second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
    return f"{_second[1]}.{nanos // 1000:06d}Z"


def _json_line(logger: Any, method_name: str, event: MutableMapping[str, Any]) -> bytes:
    """Level, UTC timestamp, redaction, traceback and msgspec JSON in one step: the same
    line as structlog's add_log_level/TimeStamper/JSONRenderer chain at a third of its
    cost (a few lines are written per job, so this is on the hot path)."""
    event["level"] = _LEVEL_NAMES.get(method_name, method_name)
    event["timestamp"] = _timestamp(time.time_ns())
    _redact(logger, method_name, event)
    if "exc_info" in event:
        event = structlog.processors.format_exc_info(logger, method_name, event)
    return _ENCODER.encode(event)


class _BatchedWriter:
    """JSON lines written once per event-loop turn: under load one write() carries the
    lines of many jobs instead of a system call each. Outside a running loop (start-up,
    the CLI) and at exit every line is written at once; a crash loses at most one turn."""

    def __init__(self, file: BinaryIO) -> None:
        self._file = file
        self._lines: list[bytes] = []
        self._lock = threading.Lock()  # a library may log from a thread of its own
        atexit.register(self.flush)

    def msg(self, message: bytes) -> None:
        with self._lock:
            self._lines.append(message)
            if len(self._lines) > 1:
                return  # a flush is already scheduled
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()
        else:
            loop.call_soon(self.flush)

    debug = info = warning = warn = error = err = critical = exception = log = msg

    def flush(self) -> None:
        with self._lock:
            if not self._lines:
                return
            data = b"\n".join(self._lines) + b"\n"
            self._lines.clear()
        try:
            self._file.write(data)
            self._file.flush()
        except (OSError, ValueError):  # stderr closed or gone: nowhere left to write
            pass


class _StdlibJson(logging.Handler):
    """uvicorn's and asyncpg's own records as the same JSON lines: a traceback (asyncpg
    logs one every few seconds while PostgreSQL is down) goes into the line's
    ``exception`` field instead of onto two dozen lines that break ``jq``."""

    REPEAT_WINDOW_S = 60.0

    def __init__(self, writer: _BatchedWriter) -> None:
        super().__init__()
        self._writer = writer
        # (logger, message template) -> (window start, lines held back in it)
        self._seen: dict[tuple[str, str], tuple[float, int]] = {}

    def _held_back(self, record: logging.LogRecord) -> int | None:
        """None to hold a repeated warning back; else how many were held back before it.

        While PostgreSQL is down asyncpg warns with a traceback every few seconds per
        pool; one line a minute says the same (with the count of the rest). Errors and
        above are never held back."""
        if record.levelno >= logging.ERROR:
            return 0
        key = (record.name, str(record.msg))
        now = time.monotonic()
        started, held = self._seen.get(key, (-math.inf, 0))
        if now - started < self.REPEAT_WINDOW_S:
            self._seen[key] = (started, held + 1)
            return None
        if len(self._seen) > 1000:  # templates are few; never grow without bound
            self._seen.clear()
        self._seen[key] = (now, 0)
        return held

    def emit(self, record: logging.LogRecord) -> None:
        try:
            held = self._held_back(record)
            if held is None:
                return
            event: dict[str, Any] = {"event": record.getMessage(), "logger": record.name}
            if held:
                event["repeated"] = held  # like lines held back since the last one
            if record.exc_info:
                event["exception"] = "".join(traceback.format_exception(*record.exc_info))
            self._writer.msg(_json_line(None, record.levelname.lower(), event))
        except Exception:
            self.handleError(record)


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
        writer = _BatchedWriter(sys.stderr.buffer)

        def factory(*_: Any) -> _BatchedWriter:
            return writer

    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=factory,
        cache_logger_on_first_use=True,
    )
    # uvicorn and asyncpg log through the standard library: keep them at warning and up.
    if use_console:
        logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(name)s %(message)s")
    else:
        logging.basicConfig(level=logging.WARNING, handlers=[_StdlibJson(writer)])
