"""Bad input and provider failures: a clear 4xx/5xx with one JSON shape, never a 500 or a hang."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.conftest import ServiceFactory
from tests.support.processes import ServiceProcess, Simulator, run_service_expecting_failure


def unique(text: str = "question") -> str:
    return f"{text} {uuid.uuid4().hex}"


def assert_error(response: httpx.Response, status: int, error_type: str, *mentions: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()
    error = body["error"]
    assert error["type"] == error_type
    assert error["request_id"] == response.headers["x-request-id"]
    for word in mentions:
        assert word in error["message"], (word, error["message"])
    return body


@pytest.mark.parametrize(
    ("payload", "mention"),
    [
        ({"input": "hi"}, "model"),
        ({"model": "gpt-4"}, "input"),
        ({"model": "gpt-4", "input": ""}, "input"),
        ({"model": 7, "input": "hi"}, "model"),
        ({"model": "gpt-4", "input": ["a"]}, "input"),
        ({"model": "gpt-4", "input": "hi", "use_cache": "yes"}, "use_cache"),
        ({"model": "gpt-4", "input": "hi", "parameters": []}, "parameters"),
        ({"model": "gpt-4", "input": "hi", "surprise": 1}, "surprise"),
        ({"model": "gpt-4", "input": "hi", "request_id": "bad id\nInjected: yes"}, "request_id"),
        ({"model": "gpt-4", "input": "hi", "parameters": {"temperature": "hot"}}, "temperature"),
        ({"model": "gpt-4", "input": "hi", "parameters": {"temperature": 9}}, "temperature"),
        ({"model": "gpt-4", "input": "hi", "parameters": {"max_tokens": 0}}, "max_tokens"),
        ({"model": "gpt-4", "input": "hi", "parameters": {"api_key": "x"}}, "api_key"),
        ({"model": "gpt-4", "input": "hi", "parameters": {"question": "again"}}, "question"),
    ],
)
def test_invalid_bodies_are_422_naming_the_field(
    shared_service: ServiceProcess, payload: dict[str, Any], mention: str
) -> None:
    """Each invalid body gets a 422 whose message names the offending field."""
    assert_error(shared_service.http.post("/v1/predict", json=payload), 422, "invalid_request", mention)


def test_malformed_json_and_non_utf8_are_422(shared_service: ServiceProcess) -> None:
    """Broken JSON and bytes that are not UTF-8 are refused as invalid, not a 500."""
    for raw in (b"{not json", b"\xff\xfe\x00garbage", b"", b"[]", b"null"):
        response = shared_service.http.post(
            "/v1/predict", content=raw, headers={"Content-Type": "application/json"}
        )
        assert_error(response, 422, "invalid_request")


def test_unknown_model_and_variant_are_404(shared_service: ServiceProcess) -> None:
    """Unknown names are 404 and the message lists the known ones."""
    assert_error(
        shared_service.http.post("/v1/predict", json={"model": "gpt-9", "input": "hi"}),
        404,
        "not_found",
        "gpt-9",
        "gpt-4",
    )
    assert_error(
        shared_service.http.post("/v1/predict", json={"model": "gpt-4", "variant": "x", "input": "hi"}),
        404,
        "not_found",
        "'x'",
        "baseline",
    )


def test_unknown_route_and_method_use_the_error_shape(shared_service: ServiceProcess) -> None:
    """Routing errors carry the same JSON error shape and request ID."""
    assert_error(shared_service.http.get("/v2/nothing"), 404, "not_found")
    assert_error(shared_service.http.get("/v1/predict"), 405, "method_not_allowed")


def test_body_too_large_is_413(service_factory: ServiceFactory) -> None:
    """A body over MAX_BODY_BYTES is 413, whether it declares its length or streams it."""
    service = service_factory(MAX_BODY_BYTES="2048")
    big = json.dumps({"model": "gpt-4", "input": "x" * 5000}).encode()
    assert_error(service.http.post("/v1/predict", content=big), 413, "payload_too_large")

    def chunks() -> Any:
        yield big[:1000]
        yield big[1000:]

    assert_error(service.http.post("/v1/predict", content=chunks()), 413, "payload_too_large")


def test_provider_error_is_502(shared_service: ServiceProcess, sim: Simulator) -> None:
    """A provider answering 500 (after retries) gives 502 provider_error, never 500."""
    sim.configure(error_rate=1.0, error_status=500)
    response = shared_service.http.post("/v1/predict", json={"model": "gpt-3.5-turbo", "input": unique()})
    assert_error(response, 502, "provider_error", "gpt-3.5-turbo")
    assert sim.stats()["calls"] == 3  # the first try and max_retries (2) more


@pytest.mark.parametrize(
    ("status", "code", "expected_status", "says"),
    [
        (400, "context_length_exceeded", 422, "too long"),  # the client's input: theirs to fix
        (400, "content_policy_violation", 422, "refused the request's content"),
        (400, None, 502, "HTTP 400"),  # an unknown model, a bad parameter: the operator's to fix
        (404, "model_not_found", 502, "HTTP 404"),
        (401, "invalid_api_key", 502, "auth"),
    ],
)
def test_a_provider_refusal_is_the_clients_error_only_when_it_is_about_the_content(
    shared_service: ServiceProcess,
    sim: Simulator,
    status: int,
    code: str | None,
    expected_status: int,
    says: str,
) -> None:
    """Only a refusal of the request's content (too long, a content policy) is a 422; a gateway's
    400/401/404 for an unknown model or a wrong key is a 502. None is retried, and the provider's
    own text (internal model names, routes) stays in the log."""
    sim.configure(error_rate=1.0, error_status=status, error_code=code)
    response = shared_service.http.post("/v1/predict", json={"model": "gpt-3.5-turbo", "input": unique()})
    body = assert_error(
        response, expected_status, "invalid_request" if expected_status == 422 else "provider_error", says
    )
    assert "internal-model" not in response.text
    assert "simulated provider error" not in body["error"]["message"]
    assert sim.stats()["calls"] == 1
    logged = [
        line for line in shared_service.log_lines() if line.get("event") == "prediction.upstream_failed"
    ]
    assert any(
        "internal-model" in str(line.get("detail")) and line.get("status") == status for line in logged
    )


def test_provider_timeout_is_504(service_factory: ServiceFactory, sim: Simulator, tmp_path: Path) -> None:
    """A provider that never answers gives 504 once the model's timeout passes, saying what happened:
    how many attempts, how long in all (a gateway in between may have timed out first)."""
    config = {
        "models": {
            "slow": {
                "name": "openai/gpt-4",
                "request_timeout_secs": 0.5,
                "max_retries": 1,
                "cost_per_1k_input_tokens": 0.03,
                "cost_per_1k_output_tokens": 0.06,
            }
        },
        "variants": {"baseline": {"signature": "question -> answer"}},
    }
    models = tmp_path / "models.yaml"
    models.write_text(json.dumps(config))
    service = service_factory(MODELS_CONFIG=str(models))
    sim.configure(hang=True)
    response = service.http.post("/v1/predict", json={"model": "slow", "input": unique()})
    message = assert_error(response, 504, "provider_timeout", "2 attempts")["error"]["message"]
    seconds = float(message.split("2 attempts, ")[1].split(" s in all")[0])
    assert 1.0 <= seconds < 5


@pytest.mark.parametrize(
    ("models_yaml", "mentions"),
    [
        (
            "models: {m: {name: openai/gpt-4}}\nvariants: {baseline: {signature: 'q -> a', module: react}}",
            ["variants.baseline.module", "predict"],
        ),
        (
            "models: {m: {name: openai/gpt-4}}\n"
            "variants: {baseline: {signature: 'q -> a', program: missing.json}}",
            ["variants.baseline.program", "missing.json"],
        ),
        (
            "models: {m: {name: openai/gpt-4, cost_per_1k_input_tokens: -1, cost_per_1k_output_tokens: 1}}\n"
            "variants: {baseline: {signature: 'q -> a'}}",
            ["models.m.cost_per_1k_input_tokens"],
        ),
        (
            "models: {m: {name: openai/gpt-4}}\nvariants: {baseline: {signature: 'no arrow'}}",
            ["variants.baseline.signature"],
        ),
        (
            "models: {m: {name: openai/gpt-4, fallbacks: [ghost]}}\n"
            "variants: {baseline: {signature: 'q -> a'}}",
            ["ghost"],
        ),
        ("models: [unclosed", ["not valid YAML"]),
    ],
)
def test_a_broken_models_file_stops_start_up_naming_the_problem(
    tmp_path: Path, models_yaml: str, mentions: list[str]
) -> None:
    """Start-up stops (exit 2) with a message naming the file, the entry and the problem."""
    path = tmp_path / "broken-models.yaml"
    path.write_text(models_yaml)
    code, output = run_service_expecting_failure(
        {"MODELS_CONFIG": str(path), "OPENAI_API_KEY": "k", "REDIS_URL": "redis://127.0.0.1:1"}, tmp_path
    )
    assert code == 2, output
    assert str(path) in output
    for word in mentions:
        assert word in output


def test_a_missing_models_file_stops_start_up(tmp_path: Path) -> None:
    """A MODELS_CONFIG path that does not exist is named in the error."""
    code, output = run_service_expecting_failure(
        {"MODELS_CONFIG": str(tmp_path / "nope.yaml"), "OPENAI_API_KEY": "k"}, tmp_path
    )
    assert code == 2
    assert "nope.yaml" in output


def test_an_invalid_environment_stops_start_up_naming_the_variable(tmp_path: Path) -> None:
    """A malformed setting (PORT=abc) stops start-up with exit 2 naming the variable; no traceback."""
    code, output = run_service_expecting_failure({"PORT": "abc", "MEMORY_CACHE_SIZE": "-3"}, tmp_path)
    assert code == 2
    assert "PORT" in output
    assert "MEMORY_CACHE_SIZE" in output
    assert "Traceback" not in output
