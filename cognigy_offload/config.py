"""Load config.toml into typed structs (SPEC §4): strict keys, env overrides, secrets from env."""

from __future__ import annotations

import ipaddress
import json
import math
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import msgspec

from .errors import ConfigError

ENV_PREFIX = "COGNIGY_OFFLOAD__"
CONFIG_ENV = "COGNIGY_OFFLOAD_CONFIG"
PLACEHOLDER_SECRETS = frozenset(
    {"", "change-me", "changeme", "secret", "token", "your-token", "your-secret", "xxx", "test"}
)


class _Section(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Base of every config section: a typo in a key must stop start-up."""


class ServerConfig(_Section):
    host: str = "127.0.0.1"
    port: int = 8080
    max_body_bytes: int = 65536
    webhook_token_env: str = "COGNIGY_OFFLOAD_WEBHOOK_TOKEN"
    max_wait_s: float = 5.0
    shutdown_grace_s: float = 20.0
    max_inline_waits: int = 200
    log_format: Literal["auto", "json", "console"] = "auto"
    log_level: Literal["debug", "info", "warning", "error"] = "info"


class QueueConfig(_Section):
    capacity: int = 1000
    workers: int = 8
    job_deadline_s: float = 1500.0
    lease_s: float = 30.0
    sweep_interval_s: float = 5.0
    retention_s: float = 7 * 86400.0
    group_commit_ms: float = 0.0


class DatabaseConfig(_Section):
    dsn: str = ""
    data_dir: str = ".cognigy_offload/pg"
    pool_min: int = 2
    pool_max: int = 10
    statement_timeout_ms: int = 30000
    connect_timeout_s: float = 1.0


class AuthConfig(_Section):
    kind: Literal["oauth2", "api_key"] = "oauth2"
    token_url: str = ""
    client_id: str = "your-client-id"
    client_secret_env: str = "COGNIGY_CLIENT_SECRET"
    scope: str = ""
    api_key_env: str = "COGNIGY_API_KEY"


class CognigyConfig(_Section):
    delivery: Literal["context", "inject", "notify", "variables"] = "context"
    api_url: str = "https://api-trial.cognigy.ai"
    endpoint_url: str = "https://endpoint-trial.cognigy.ai"
    result_key: str = "offload"
    rate_limit_per_minute: int = 100
    refresh_margin_s: float = 60.0
    request_timeout_s: float = 15.0
    max_attempts: int = 6
    max_retry_after_s: float = 120.0
    backoff_base_s: float = 0.5
    backoff_max_s: float = 30.0
    breaker_failures: int = 5
    breaker_cooldown_s: float = 30.0
    max_payload_bytes: int = 60000
    auth: AuthConfig = msgspec.field(default_factory=AuthConfig)


class QueryConfig(_Section):
    sql: str
    params: list[str] = msgspec.field(default_factory=list)
    cache_ttl_s: float = 0.0


class Config(_Section):
    server: ServerConfig = msgspec.field(default_factory=ServerConfig)
    queue: QueueConfig = msgspec.field(default_factory=QueueConfig)
    database: DatabaseConfig = msgspec.field(default_factory=DatabaseConfig)
    cognigy: CognigyConfig = msgspec.field(default_factory=CognigyConfig)
    queries: dict[str, QueryConfig] = msgspec.field(default_factory=dict)

    @property
    def token_url(self) -> str:
        """The OAuth2 token URL: the configured one, else ``{api_url}/auth/oauth2/token``."""
        auth = self.cognigy.auth
        return auth.token_url or f"{self.cognigy.api_url.rstrip('/')}/auth/oauth2/token"


class Secrets(msgspec.Struct, frozen=True):
    """Secret values read from the environment variables the config names."""

    webhook_tokens: tuple[str, ...]
    client_secret: str
    api_key: str

    def __repr__(self) -> str:
        return "Secrets(<redacted>)"


def find_config_path(cli_path: str | None, environ: Mapping[str, str] | None = None) -> Path:
    """Return the config path: --config, else $COGNIGY_OFFLOAD_CONFIG, else ./config.toml."""
    env = os.environ if environ is None else environ
    return Path(cli_path or env.get(CONFIG_ENV) or "config.toml")


def _parse_env_value(raw: str) -> Any:
    """Read an override as a TOML value when it is one (42, true, [..]), else as a string."""
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def apply_env_overrides(data: dict[str, Any], environ: Mapping[str, str]) -> dict[str, Any]:
    """Apply ``COGNIGY_OFFLOAD__SECTION__KEY=value`` overrides onto the raw TOML table."""
    for name, raw in sorted(environ.items()):
        if not name.startswith(ENV_PREFIX):
            continue
        path = [part.lower() for part in name[len(ENV_PREFIX) :].split("__")]
        if len(path) < 2 or not all(path):
            raise ConfigError([f"{name}: an override needs the form {ENV_PREFIX}SECTION__KEY"])
        node = data
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError([f"{name}: {part} is not a section"])
            node = child
        node[path[-1]] = _parse_env_value(raw)
    return data


def _describe_validation_error(exc: msgspec.ValidationError, prefix: str = "") -> str:
    """Turn msgspec's '... - at `$.server.port`' into 'server.port: ...' so the key leads."""
    text = str(exc)
    message, sep, where = text.rpartition(" - at `")
    if not sep:
        message, where = text, "$"
    parts = [p for p in (prefix, where.rstrip("`").removeprefix("$").lstrip(".")) if p]
    named = message.split("`")[1] if message.count("`") >= 2 else ""
    if "unknown field" in message:
        return f"{'.'.join([*parts, named])}: unknown key"
    if "missing required field" in message:
        return f"{'.'.join([*parts, named])}: required key is missing"
    return f"{'.'.join(parts)}: {message}"


def parse_config(data: dict[str, Any]) -> Config:
    """Convert a raw TOML table into a Config, raising ConfigError naming the bad key."""
    # Queries are converted one by one so an error names the query (msgspec reports a
    # dict value's path as `queries[...]`).
    queries = data.get("queries", {})
    if not isinstance(queries, dict):
        raise ConfigError(["queries: must be a table of [queries.NAME] sections"])
    problems: list[str] = []
    parsed: dict[str, QueryConfig] = {}
    for name, raw in queries.items():
        try:
            parsed[name] = msgspec.convert(raw, QueryConfig, strict=True)
        except msgspec.ValidationError as exc:
            problems.append(_describe_validation_error(exc, prefix=f"queries.{name}"))
    try:
        config = msgspec.convert({**data, "queries": {}}, Config, strict=True)
    except msgspec.ValidationError as exc:
        problems.insert(0, _describe_validation_error(exc))
    if problems:
        raise ConfigError(problems)
    config.queries = parsed
    problems = validate_values(config)
    if problems:
        raise ConfigError(problems)
    return config


# Seconds (or milliseconds) beyond this are a typo, and PostgreSQL's intervals and the
# event loop's timers cannot hold much more: about 31 years.
MAX_NUMBER = 1e9


# PostgreSQL's integer: statement_timeout and every count the service binds fit in it.
MAX_INT = 2**31 - 1
MAX_WORKERS = 10_000


def _numbers(value: msgspec.Struct, prefix: str) -> list[tuple[str, float]]:
    """Every number setting (float or int) below a config struct, by its dotted key."""
    found: list[tuple[str, float]] = []
    for name in value.__struct_fields__:
        item = getattr(value, name)
        if isinstance(item, msgspec.Struct):
            found += _numbers(item, f"{prefix}{name}.")
        elif isinstance(item, dict):
            for key, entry in item.items():
                if isinstance(entry, msgspec.Struct):
                    found += _numbers(entry, f"{prefix}{name}.{key}.")
        elif isinstance(item, float | int) and not isinstance(item, bool):
            found.append((f"{prefix}{name}", item))
    return found


def validate_values(config: Config) -> list[str]:
    """Check value ranges that the types alone cannot express."""
    problems: list[str] = []
    for key, value in _numbers(config, ""):
        if isinstance(value, int) and abs(value) > MAX_INT:
            problems.append(f"{key}: must be at most {MAX_INT}, got {value}")
        elif isinstance(value, float) and (not math.isfinite(value) or abs(value) > MAX_NUMBER):
            problems.append(
                f"{key}: must be a finite number of at most {MAX_NUMBER:.0e}, got {value}"
            )
    if config.queue.workers > MAX_WORKERS:
        problems.append(f"queue.workers: must be at most {MAX_WORKERS}, got {config.queue.workers}")
    if config.queue.sweep_interval_s < 0.01:
        problems.append(
            f"queue.sweep_interval_s: must be at least 0.01, got {config.queue.sweep_interval_s}"
        )
    positive = {
        "server.port": config.server.port,
        "server.max_body_bytes": config.server.max_body_bytes,
        "queue.capacity": config.queue.capacity,
        "queue.workers": config.queue.workers,
        "queue.job_deadline_s": config.queue.job_deadline_s,
        "queue.lease_s": config.queue.lease_s,
        "queue.sweep_interval_s": config.queue.sweep_interval_s,
        "queue.retention_s": config.queue.retention_s,
        "database.connect_timeout_s": config.database.connect_timeout_s,
        "database.pool_min": config.database.pool_min,
        "database.pool_max": config.database.pool_max,
        "database.statement_timeout_ms": config.database.statement_timeout_ms,
        "cognigy.rate_limit_per_minute": config.cognigy.rate_limit_per_minute,
        "cognigy.request_timeout_s": config.cognigy.request_timeout_s,
        "cognigy.max_attempts": config.cognigy.max_attempts,
        "cognigy.breaker_failures": config.cognigy.breaker_failures,
        "cognigy.max_payload_bytes": config.cognigy.max_payload_bytes,
    }
    for key, value in positive.items():
        if value <= 0:
            problems.append(f"{key}: must be greater than 0, got {value}")
    if not 0 < config.server.port < 65536:
        problems.append(f"server.port: must be 1-65535, got {config.server.port}")
    if config.database.pool_min > config.database.pool_max:
        problems.append("database.pool_min: must not exceed database.pool_max")
    for key in (
        "server.max_wait_s",
        "server.shutdown_grace_s",
        "cognigy.refresh_margin_s",
        "cognigy.max_retry_after_s",
        "queue.group_commit_ms",
        "server.max_inline_waits",
        "cognigy.backoff_base_s",
        "cognigy.backoff_max_s",
        "cognigy.breaker_cooldown_s",
    ):
        section, name = key.split(".")
        if getattr(getattr(config, section), name) < 0:
            problems.append(f"{key}: must not be negative")
    for key in ("api_url", "endpoint_url"):
        url = getattr(config.cognigy, key)
        if not url.startswith(("http://", "https://")):
            problems.append(f"cognigy.{key}: must start with http:// or https://, got {url!r}")
    if not config.cognigy.result_key:
        problems.append("cognigy.result_key: must not be empty")
    for name, query in config.queries.items():
        if not name.replace("_", "").replace("-", "").isalnum():
            problems.append(f"queries.{name}: a query name uses letters, digits, - and _ only")
        if not query.sql.strip():
            problems.append(f"queries.{name}.sql: must not be empty")
        if query.cache_ttl_s < 0:
            problems.append(f"queries.{name}.cache_ttl_s: must not be negative")
    return problems


def load_config(path: Path, environ: Mapping[str, str] | None = None) -> Config:
    """Read, override from the environment and validate the config file at ``path``."""
    env = os.environ if environ is None else environ
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ConfigError([f"{path}: config file not found"]) from exc
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read config file ({exc.strerror})"]) from exc
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{path}: not valid TOML ({exc})"]) from exc
    return parse_config(apply_env_overrides(data, env))


def is_loopback(host: str) -> bool:
    """True when ``host`` only listens on this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def load_secrets(config: Config, environ: Mapping[str, str] | None = None) -> Secrets:
    """Read the secrets named by the config from the environment, checking they are usable.

    The webhook token variable may hold several tokens separated by commas, so a token
    can be rotated without downtime. An empty or placeholder token is refused unless the
    server listens on loopback only.
    """
    env = os.environ if environ is None else environ
    problems: list[str] = []
    raw_tokens = env.get(config.server.webhook_token_env, "")
    tokens = tuple(t.strip() for t in raw_tokens.split(",") if t.strip())
    weak = [t for t in tokens if t.lower() in PLACEHOLDER_SECRETS or len(t) < 16]
    if not is_loopback(config.server.host):
        if not tokens:
            problems.append(
                f"server.webhook_token_env: ${config.server.webhook_token_env} is empty; "
                "a server reachable from other hosts needs a webhook token"
            )
        elif weak:
            problems.append(
                f"server.webhook_token_env: ${config.server.webhook_token_env} holds a "
                "placeholder or a token shorter than 16 characters"
            )
    client_secret = env.get(config.cognigy.auth.client_secret_env, "")
    api_key = env.get(config.cognigy.auth.api_key_env, "")
    if problems:
        raise ConfigError(problems)
    return Secrets(webhook_tokens=tokens, client_secret=client_secret, api_key=api_key)


def needs_api_auth(config: Config) -> bool:
    """True when the delivery mode calls the REST API (inject/notify use the URLToken)."""
    return config.cognigy.delivery in ("context", "variables")


def check_delivery_secrets(config: Config, secrets: Secrets) -> list[str]:
    """Problems with the Cognigy credentials the chosen delivery mode needs."""
    if not needs_api_auth(config):
        return []
    auth = config.cognigy.auth
    if auth.kind == "oauth2" and not secrets.client_secret:
        return [f"cognigy.auth.client_secret_env: ${auth.client_secret_env} is empty"]
    if auth.kind == "api_key" and not secrets.api_key:
        return [f"cognigy.auth.api_key_env: ${auth.api_key_env} is empty"]
    return []


def dump_toml(data: Mapping[str, Any], prefix: str = "") -> str:
    """Write a config dict as TOML (strings, numbers, booleans, lists, tables), for the
    config files the tests, the demo and the bench hand to child processes."""
    lines: list[str] = []
    tables: list[tuple[str, Mapping[str, Any]]] = []
    for key, value in data.items():
        if isinstance(value, Mapping):
            tables.append((f"{prefix}{key}", value))
        else:
            # JSON strings, numbers, booleans and arrays are valid TOML values.
            lines.append(f"{key} = {json.dumps(value)}")
    text = "\n".join(lines) + ("\n" if lines else "")
    for name, table in tables:
        text += f"\n[{name}]\n" + dump_toml(table, f"{name}.")
    return text
