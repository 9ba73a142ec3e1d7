"""The OpenAPI document describes this deployment: its limits, whether auth is on, its error shape."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from dspy_service.api.openapi import build_openapi
from dspy_service.models_config import load_models_config
from dspy_service.settings import DEFAULT_MODELS_CONFIG, Settings


def document(tmp_path: Path, *, auth: bool, **settings: Any) -> dict[str, Any]:
    config = load_models_config(DEFAULT_MODELS_CONFIG)
    return build_openapi(Settings(_env_file=tmp_path / "none", **settings), config, auth=auth)


@pytest.fixture(autouse=True)
def _no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RATE_LIMIT", "METRICS_PUBLIC", "MAX_INPUT_CHARS", "API_KEYS", "API_KEYS_FILE"):
        monkeypatch.delenv(name, raising=False)


def request_schema(doc: dict[str, Any]) -> dict[str, Any]:
    schema: dict[str, Any] = doc["paths"]["/v1/predict"]["post"]["requestBody"]["content"][
        "application/json"
    ]["schema"]
    return schema


def test_limits_and_names_come_from_the_deployment(tmp_path: Path) -> None:
    """MAX_INPUT_CHARS, the models and the variants of the models file appear in the request schema."""
    doc = document(tmp_path, auth=False, max_input_chars=1234)
    properties = request_schema(doc)["properties"]
    assert properties["input"]["maxLength"] == 1234
    assert properties["model"]["examples"] == ["gpt-3.5-turbo", "gpt-4"]
    assert properties["parameters"]["additionalProperties"] is False
    assert request_schema(doc)["additionalProperties"] is False


def test_auth_appears_only_when_it_is_on(tmp_path: Path) -> None:
    """With keys: a bearer scheme, 401s and security on all but the probes; without: none of it."""
    off = document(tmp_path, auth=False)
    assert "securitySchemes" not in off["components"]
    assert "401" not in off["paths"]["/costs"]["get"]["responses"]
    on = document(tmp_path, auth=True)
    assert on["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"
    for path in ("/costs", "/config", "/metrics", "/openapi.json"):
        operation = on["paths"][path]["get"]
        assert operation["security"] == [{"bearerAuth": []}]
        assert "WWW-Authenticate" in operation["responses"]["401"]["headers"]
    assert on["paths"]["/health"]["get"]["security"] == []
    public = document(tmp_path, auth=True, metrics_public=True)
    assert "security" not in public["paths"]["/metrics"]["get"]


def test_429_is_documented_when_a_limit_can_answer_it(tmp_path: Path) -> None:
    """RATE_LIMIT (or budgets) bring 429 with Retry-After; otherwise it is not a possible answer."""
    assert "429" not in document(tmp_path, auth=False)["paths"]["/v1/predict"]["post"]["responses"]
    limited = document(tmp_path, auth=False, rate_limit="10/second")
    assert "Retry-After" in limited["paths"]["/v1/predict"]["post"]["responses"]["429"]["headers"]


def test_every_error_type_is_in_the_error_schema(tmp_path: Path) -> None:
    """The error schema's `type` enum lists the new security errors with the old ones."""
    types = document(tmp_path, auth=True)["components"]["schemas"]["Error"]["properties"]["error"]
    for name in ("unauthorized", "rate_limited", "budget_exceeded", "request_timeout", "invalid_request"):
        assert name in types["properties"]["type"]["enum"]
