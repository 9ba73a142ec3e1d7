"""Settings defaults, secret redaction, and the models file's validation messages."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from dspy_service.errors import ConfigError
from dspy_service.models_config import load_models_config
from dspy_service.settings import DEFAULT_MODELS_CONFIG, Settings, redact_url


def test_defaults_match_the_contract(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """With an empty environment every setting has the documented default."""
    monkeypatch.chdir(tmp_path)
    settings = Settings()
    assert settings.service_name == "complete-production-service"
    assert settings.service_version == "0.1.0"
    assert (settings.host, settings.port) == ("0.0.0.0", 8080)
    assert (settings.log_level, settings.log_format) == ("info", "json")
    assert settings.redis_url.get_secret_value() == "redis://localhost:6379"
    assert settings.memory_cache_size == 10_000
    assert settings.memory_cache_ttl_secs == 300
    assert settings.redis_cache_ttl_secs == 3600
    assert settings.circuit_breaker_failure_threshold == 5
    assert settings.circuit_breaker_success_threshold == 2
    assert settings.circuit_breaker_timeout_secs == 60


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://localhost:6379", "redis://localhost:6379"),
        ("redis://:s3cret@host:6379/0", "redis://***@host:6379/0"),
        ("rediss://user:s3cret@host/1", "rediss://***@host/1"),
    ],
)
def test_redact_url_hides_credentials(url: str, expected: str) -> None:
    """User names and passwords in URLs never show."""
    assert redact_url(url) == expected


def test_public_view_has_no_secrets(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The /config view redacts the API key and the Redis password."""
    monkeypatch.chdir(tmp_path)
    settings = Settings(openai_api_key="sk-very-secret", redis_url="redis://:pw-secret@h:1")
    view = str(settings.public_view())
    assert "sk-very-secret" not in view
    assert "pw-secret" not in view


def test_shipped_models_file_is_valid() -> None:
    """The default models file names gpt-3.5-turbo and gpt-4, baseline and cot."""
    config = load_models_config(DEFAULT_MODELS_CONFIG)
    assert set(config.models) == {"gpt-3.5-turbo", "gpt-4"}
    assert set(config.variants) == {"baseline", "cot"}
    assert config.variants["cot"].module == "chain_of_thought"


def test_prices_must_come_in_pairs(tmp_path: Path) -> None:
    """An input price without an output price is refused, naming the entry."""
    path = tmp_path / "m.yaml"
    path.write_text(
        "models: {x: {name: openai/x, cost_per_1k_input_tokens: 1}}\n"
        "variants: {baseline: {signature: 'a -> b'}}"
    )
    with pytest.raises(ConfigError, match=r"models\.x"):
        load_models_config(path)


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("mysql://svc:pw-77119@db/records", "scheme 'mysql'"),
        ("records.db", "scheme 'missing'"),
        ("postgresql://svc:pw-77119@db/records?sslmode=require", "?ssl=require"),
    ],
)
def test_a_database_url_the_store_cannot_use_stops_start_up_without_quoting_it(
    monkeypatch: pytest.MonkeyPatch, url: str, problem: str
) -> None:
    monkeypatch.setenv("DATABASE_URL", url)
    with pytest.raises(ValidationError) as raised:
        Settings()
    printed = "; ".join(error["msg"] for error in raised.value.errors(include_input=False, include_url=False))
    assert problem in printed
    assert "pw-77119" not in printed
