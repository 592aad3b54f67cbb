"""config.toml loading: strict keys, types, env overrides, and the shipped file."""

from __future__ import annotations

from pathlib import Path

import pytest

from cognigy_offload.config import (
    ConfigError,
    apply_env_overrides,
    find_config_path,
    load_config,
    parse_config,
)
from tests.conftest import ROOT


def test_the_shipped_config_loads_with_the_spec_defaults() -> None:
    """config.toml as shipped is valid and carries SPEC §4's values."""
    config = load_config(ROOT / "config.toml", environ={})
    assert config.server.port == 8080 and config.server.max_body_bytes == 65536
    assert config.queue.capacity == 1000 and config.queue.job_deadline_s == 1500
    assert config.cognigy.delivery == "context" and config.cognigy.auth.kind == "oauth2"
    assert config.token_url == "https://api-trial.cognigy.ai/auth/oauth2/token"
    assert {"revenue", "transaction_count", "average_amount"} <= set(config.queries)
    assert config.queries["revenue"].params == [
        "customer_segment",
        "date_range.start",
        "date_range.end",
    ]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"server": {"prot": 1}}, "server.prot: unknown key"),
        ({"nonsense": {}}, "nonsense: unknown key"),
        ({"server": {"port": "80"}}, "server.port: Expected `int`, got `str`"),
        ({"queue": {"workers": 0}}, "queue.workers: must be greater than 0"),
        ({"cognigy": {"delivery": "email"}}, "cognigy.delivery"),
        ({"cognigy": {"auth": {"kind": "basic"}}}, "cognigy.auth.kind"),
        ({"cognigy": {"auth": {"clientid": "x"}}}, "cognigy.auth.clientid: unknown key"),
        ({"queries": {"q": {"params": []}}}, "queries.q"),
        ({"queries": {"q": {"sql": "SELECT 1", "parms": []}}}, "queries.q.parms: unknown key"),
        ({"database": {"pool_min": 5, "pool_max": 2}}, "database.pool_min"),
        ({"cognigy": {"api_url": "ftp://x"}}, "cognigy.api_url"),
        # Found by a break-it pass: accepted, then failing later or silently misbehaving.
        ({"database": {"statement_timeout_ms": 3_000_000_000}}, "database.statement_timeout_ms"),
        ({"queue": {"workers": 2_000_000_000}}, "queue.workers: must be at most 10000"),
        ({"database": {"connect_timeout_s": -1}}, "database.connect_timeout_s"),
        ({"server": {"max_inline_waits": -5}}, "server.max_inline_waits: must not be negative"),
        ({"queue": {"retention_s": -10}}, "queue.retention_s"),
        ({"cognigy": {"backoff_base_s": -1}}, "cognigy.backoff_base_s"),
        ({"cognigy": {"breaker_cooldown_s": -1}}, "cognigy.breaker_cooldown_s"),
        ({"queue": {"sweep_interval_s": 1e-9}}, "queue.sweep_interval_s: must be at least 0.01"),
    ],
)
def test_bad_keys_and_types_name_the_key(data: dict[str, object], message: str) -> None:
    """Unknown keys, wrong types and impossible values stop start-up naming the key."""
    with pytest.raises(ConfigError) as caught:
        parse_config(data)
    assert any(message in problem for problem in caught.value.problems), caught.value.problems


def test_env_overrides_reach_nested_sections_and_parse_toml_values() -> None:
    """COGNIGY_OFFLOAD__SECTION__KEY sets a key; values are read as TOML when they are."""
    data: dict[str, object] = {"server": {"port": 1}}
    env = {
        "COGNIGY_OFFLOAD__SERVER__PORT": "9090",
        "COGNIGY_OFFLOAD__DATABASE__DSN": "postgresql://u@h/db",
        "COGNIGY_OFFLOAD__COGNIGY__AUTH__KIND": "api_key",
        "COGNIGY_OFFLOAD__QUEUE__JOB_DEADLINE_S": "60.5",
        "UNRELATED": "x",
    }
    config = parse_config(apply_env_overrides(data, env))
    assert config.server.port == 9090
    assert config.database.dsn == "postgresql://u@h/db"
    assert config.cognigy.auth.kind == "api_key"
    assert config.queue.job_deadline_s == 60.5


def test_a_malformed_override_names_the_variable() -> None:
    """An override without SECTION__KEY is refused by name."""
    with pytest.raises(ConfigError, match="COGNIGY_OFFLOAD__PORT"):
        apply_env_overrides({}, {"COGNIGY_OFFLOAD__PORT": "1"})


def test_config_path_order(tmp_path: Path) -> None:
    """--config, else $COGNIGY_OFFLOAD_CONFIG, else ./config.toml."""
    assert find_config_path("a.toml", {"COGNIGY_OFFLOAD_CONFIG": "b.toml"}) == Path("a.toml")
    assert find_config_path(None, {"COGNIGY_OFFLOAD_CONFIG": "b.toml"}) == Path("b.toml")
    assert find_config_path(None, {}) == Path("config.toml")


def test_missing_and_broken_files_are_named(tmp_path: Path) -> None:
    """A missing file or invalid TOML is a ConfigError naming the path."""
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.toml", environ={})
    broken = tmp_path / "broken.toml"
    broken.write_text("[server\nport = 1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(broken, environ={})


NUMBER_KEYS = [
    ("server", "max_wait_s"),
    ("server", "shutdown_grace_s"),
    ("queue", "job_deadline_s"),
    ("queue", "lease_s"),
    ("queue", "sweep_interval_s"),
    ("queue", "retention_s"),
    ("queue", "group_commit_ms"),
    ("database", "connect_timeout_s"),
    ("cognigy", "request_timeout_s"),
    ("cognigy", "backoff_max_s"),
    ("cognigy", "breaker_cooldown_s"),
]


@pytest.mark.parametrize("raw", ["nan", "inf", "-inf", "1e300"])
@pytest.mark.parametrize(("section", "key"), NUMBER_KEYS)
def test_a_number_that_is_not_finite_or_absurd_stops_start_up_naming_the_key(
    section: str, key: str, raw: str
) -> None:
    """nan, inf and 1e300 pass a float type check but break serve later (a crash, or an
    interval PostgreSQL refuses on every webhook): they are config errors, by key, as set
    through the environment."""
    env = {f"COGNIGY_OFFLOAD__{section.upper()}__{key.upper()}": raw}
    with pytest.raises(ConfigError) as caught:
        parse_config(apply_env_overrides({}, env))
    assert any(problem.startswith(f"{section}.{key}:") for problem in caught.value.problems), (
        caught.value.problems
    )


def test_a_query_cache_ttl_must_be_finite() -> None:
    data = {"queries": {"q": {"sql": "SELECT 1", "params": [], "cache_ttl_s": float("inf")}}}
    with pytest.raises(ConfigError, match=r"queries\.q\.cache_ttl_s"):
        parse_config(data)
