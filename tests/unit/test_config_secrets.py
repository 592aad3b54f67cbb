"""Secrets from the environment: webhook token rotation, weak tokens, no secret in any text."""

from __future__ import annotations

import pytest

from cognigy_offload.config import (
    PLACEHOLDER_SECRETS,
    Config,
    ServerConfig,
    check_delivery_secrets,
    is_loopback,
    load_secrets,
)
from cognigy_offload.errors import ConfigError

STRONG = "s3cr3t-webhook-token-0123456789"
OTHER = "n3xt-webhook-token-abcdefghijkl"
ENV = "COGNIGY_OFFLOAD_WEBHOOK_TOKEN"


def config_on(host: str) -> Config:
    """The default config listening on ``host``."""
    return Config(server=ServerConfig(host=host))


class TestRotation:
    def test_comma_separated_tokens_are_all_accepted(self) -> None:
        """The token variable may hold several tokens, so one can be rotated without downtime."""
        secrets = load_secrets(config_on("0.0.0.0"), {ENV: f" {STRONG} ,, {OTHER} ,"})
        assert secrets.webhook_tokens == (STRONG, OTHER)

    def test_the_variable_named_by_the_config_is_read(self) -> None:
        """server.webhook_token_env names the variable; the default one is then ignored."""
        config = Config(server=ServerConfig(host="0.0.0.0", webhook_token_env="MY_TOKEN"))
        secrets = load_secrets(config, {"MY_TOKEN": STRONG, ENV: OTHER})
        assert secrets.webhook_tokens == (STRONG,)

    def test_cognigy_secrets_come_from_their_variables(self) -> None:
        """The client secret and API key are read from the variables the config names."""
        env = {ENV: STRONG, "COGNIGY_CLIENT_SECRET": "cs-value", "COGNIGY_API_KEY": "ak-value"}
        secrets = load_secrets(config_on("127.0.0.1"), env)
        assert (secrets.client_secret, secrets.api_key) == ("cs-value", "ak-value")


class TestWeakTokens:
    @pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "example.internal", ""])
    def test_a_reachable_server_refuses_an_empty_token(self, host: str) -> None:
        """Start-up stops, naming the key, when a server others can reach has no token."""
        for env in ({}, {ENV: ""}, {ENV: " , ,"}):
            with pytest.raises(ConfigError) as caught:
                load_secrets(config_on(host), env)
            assert "server.webhook_token_env" in str(caught.value)
            assert ENV in str(caught.value)

    @pytest.mark.parametrize(
        "token", [*sorted(PLACEHOLDER_SECRETS - {""}), "CHANGE-ME", "Xq7-short-15chr"]
    )
    def test_a_reachable_server_refuses_a_placeholder_or_short_token(self, token: str) -> None:
        """A placeholder or a token under 16 characters is refused, naming the key."""
        with pytest.raises(ConfigError) as caught:
            load_secrets(config_on("0.0.0.0"), {ENV: token})
        assert "server.webhook_token_env" in str(caught.value)

    def test_a_refused_token_is_not_echoed(self) -> None:
        """The start-up error names the variable, never the weak token it holds."""
        with pytest.raises(ConfigError) as caught:
            load_secrets(config_on("0.0.0.0"), {ENV: f"{STRONG},Xq7-short-15chr"})
        assert "Xq7-short-15chr" not in str(caught.value)
        assert STRONG not in str(caught.value)

    def test_one_weak_token_among_strong_ones_is_refused(self) -> None:
        """Rotation is no back door: every configured token must be strong."""
        with pytest.raises(ConfigError):
            load_secrets(config_on("0.0.0.0"), {ENV: f"{STRONG},change-me"})

    @pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "localhost"])
    def test_a_loopback_server_may_run_without_a_token(self, host: str) -> None:
        """Only a server reachable from this machine alone may go without a (strong) token."""
        assert load_secrets(config_on(host), {}).webhook_tokens == ()
        assert load_secrets(config_on(host), {ENV: "change-me"}).webhook_tokens == ("change-me",)

    @pytest.mark.parametrize(
        ("host", "loopback"),
        [
            ("127.0.0.1", True),
            ("::1", True),
            ("localhost", True),
            ("0.0.0.0", False),
            ("::", False),
            ("127.0.0.1.example.com", False),
            ("localhost.example.com", False),
            ("", False),
        ],
    )
    def test_loopback_detection(self, host: str, loopback: bool) -> None:
        """Only addresses that cannot be reached from another host count as loopback."""
        assert is_loopback(host) is loopback


class TestNoSecretInText:
    def test_secrets_repr_is_redacted(self) -> None:
        """Printing or logging the Secrets object shows none of its values."""
        env = {ENV: STRONG, "COGNIGY_CLIENT_SECRET": "cs-value-123", "COGNIGY_API_KEY": "ak-987"}
        secrets = load_secrets(config_on("0.0.0.0"), env)
        for text in (repr(secrets), str(secrets), f"{secrets!r}", repr([secrets])):
            for value in (STRONG, "cs-value-123", "ak-987"):
                assert value not in text

    def test_missing_delivery_secrets_are_named_not_shown(self) -> None:
        """A missing Cognigy credential is reported by its variable name."""
        secrets = load_secrets(config_on("127.0.0.1"), {})
        problems = check_delivery_secrets(config_on("127.0.0.1"), secrets)
        assert problems == ["cognigy.auth.client_secret_env: $COGNIGY_CLIENT_SECRET is empty"]
