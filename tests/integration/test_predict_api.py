"""The public contract of the endpoints, seen over real HTTP from a running service."""

from __future__ import annotations

import time
import uuid
from typing import Any

import httpx

from tests.integration.conftest import TEST_API_KEY, ServiceFactory
from tests.support.processes import ServiceProcess, Simulator, wait_until


def unique(text: str = "question") -> str:
    return f"{text} {uuid.uuid4().hex}"


def test_predict_returns_the_spec_fields_and_every_output(
    shared_service: ServiceProcess, sim: Simulator
) -> None:
    """A miss answers with the spec's fields, the main output and all output fields."""
    response = shared_service.http.post(
        "/v1/predict",
        json={"model": "gpt-3.5-turbo", "variant": "cot", "input": unique("Why is the sky blue?")},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) >= {"request_id", "model", "variant", "output", "outputs", "metadata"}
    assert body["model"] == "gpt-3.5-turbo"
    assert body["variant"] == "cot"
    assert set(body["outputs"]) == {"reasoning", "answer"}
    assert body["output"] == body["outputs"]["answer"]
    meta = body["metadata"]
    assert set(meta) >= {
        "latency_ms",
        "cached",
        "cache_level",
        "input_tokens",
        "output_tokens",
        "cost_usd",
        "timestamp",
    }
    assert meta["cached"] is False
    assert meta["cache_level"] is None
    assert meta["input_tokens"] > 0
    assert meta["output_tokens"] > 0
    assert meta["timestamp"].endswith("Z")
    assert response.headers["x-request-id"] == body["request_id"]


def test_default_variant_is_used_when_none_is_named(shared_service: ServiceProcess, sim: Simulator) -> None:
    """Without `variant`, the models file's default_variant (baseline) serves."""
    body = shared_service.http.post("/v1/predict", json={"model": "gpt-4", "input": unique()}).json()
    assert body["variant"] == "baseline"
    assert set(body["outputs"]) == {"answer"}


def test_request_id_from_header_and_from_body(shared_service: ServiceProcess, sim: Simulator) -> None:
    """The body's request_id wins over X-Request-ID; both are echoed in body, header and logs."""
    by_header = shared_service.http.post(
        "/v1/predict", json={"model": "gpt-4", "input": unique()}, headers={"X-Request-ID": "hdr-123"}
    )
    assert by_header.json()["request_id"] == "hdr-123"
    assert by_header.headers["x-request-id"] == "hdr-123"
    by_body = shared_service.http.post(
        "/v1/predict",
        json={"model": "gpt-4", "input": unique(), "request_id": "body-456"},
        headers={"X-Request-ID": "hdr-789"},
    )
    assert by_body.json()["request_id"] == "body-456"
    assert by_body.headers["x-request-id"] == "body-456"

    def logged() -> list[dict[str, Any]]:
        return [line for line in shared_service.log_lines() if line.get("request_id") == "body-456"]

    # The access line is written once the response has gone out, so it may trail the response a little.
    wait_until(
        lambda: any(line["event"] == "request.completed" for line in logged()),
        timeout=5,
        what="the request's access-log line",
    )
    lines = logged()
    completed = next(line for line in lines if line["event"] == "request.completed")
    assert completed["model"] == "gpt-4"
    assert completed["variant"] == "baseline"
    assert completed["input_tokens"] > 0
    assert completed["cost_usd"] > 0
    assert "latency_ms" in completed


def test_generated_request_id_is_a_time_ordered_uuid(shared_service: ServiceProcess, sim: Simulator) -> None:
    """Without any request ID a new version 7 UUID is made and echoed: unique, and ordered by the
    millisecond it was made in (what keeps the receipts' request-ID index cheap)."""
    ids: list[str] = []
    for _ in range(5):
        before = time.time_ns() // 1_000_000
        response = shared_service.http.post("/v1/predict", json={"model": "gpt-4", "input": unique()})
        after = time.time_ns() // 1_000_000
        request_id = response.json()["request_id"]
        assert response.headers["x-request-id"] == request_id
        parsed = uuid.UUID(request_id)
        assert (parsed.version, parsed.variant) == (7, uuid.RFC_4122)
        assert before <= int(request_id[:12], 16) <= after  # its first 48 bits: the Unix time in ms
        ids.append(request_id)
        time.sleep(0.002)  # the next one in a later millisecond
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)


def test_health_reports_components(shared_service: ServiceProcess) -> None:
    """/health has the spec's fields: version, uptime, Redis, breakers."""
    body = shared_service.http.get("/health").json()
    assert body["status"] == "healthy"
    assert body["version"] == "0.1.0"
    assert body["redis_connected"] is True
    assert body["python_initialized"] is True
    assert isinstance(body["uptime_secs"], int)
    assert isinstance(body["cache_size"], int)
    assert body["circuit_breakers"] == {"gpt-3.5-turbo": "closed", "gpt-4": "closed"}
    assert "warning" not in body  # a real (simulated-by-test) provider is configured, not the demo


def test_ready_is_200_when_started(shared_service: ServiceProcess) -> None:
    """/ready answers 200 once the service has started."""
    response = shared_service.http.get("/ready")
    assert response.status_code == 200
    assert response.json()["ready"] is True


def test_metrics_expose_the_eight_spec_families(shared_service: ServiceProcess, sim: Simulator) -> None:
    """/metrics carries every metric family the spec names, with their labels."""
    question = unique()
    shared_service.http.post("/v1/predict", json={"model": "gpt-4", "input": question})
    shared_service.http.post("/v1/predict", json={"model": "gpt-4", "input": question})
    shared_service.http.post("/v1/predict", json={"model": "nope", "input": question})
    text = shared_service.http.get("/metrics").text
    for family in (
        'dspy_predictions_total{model="gpt-4",status="success",variant="baseline"}',
        'dspy_prediction_duration_seconds_bucket{cache_level="memory",le="0.001",model="gpt-4",variant="baseline"}',
        'dspy_cache_operations_total{level="memory",operation="hit"}',
        'dspy_circuit_breaker_state{model="gpt-4"} 0.0',
        'dspy_prediction_cost_total{model="gpt-4",variant="baseline"}',
        'dspy_token_usage_total{model="gpt-4",type="input",variant="baseline"}',
        "dspy_active_predictions 0.0",
        'dspy_errors_total{type="not_found"}',
    ):
        assert family.split(" ")[0] in text, family


def test_config_shows_settings_without_secrets(service_factory: ServiceFactory) -> None:
    """/config shows the effective configuration; the API key and Redis password never appear."""
    service = service_factory(REDIS_URL="redis://:hunter2-redis-pass@127.0.0.1:1/0")
    response = service.http.get("/config")
    assert response.status_code == 200
    text = response.text
    assert TEST_API_KEY not in text
    assert "hunter2-redis-pass" not in text
    body = response.json()
    assert body["service"]["openai_api_key"] == "***"
    assert body["service"]["redis_url"] == "redis://***@127.0.0.1:1/0"
    assert body["service"]["memory_cache_size"] == 10000
    assert body["service"]["circuit_breaker_failure_threshold"] == 5
    assert set(body["models"]) == {"gpt-3.5-turbo", "gpt-4"}
    assert set(body["variants"]) == {"baseline", "cot"}
    service.http.post("/v1/predict", json={"model": "gpt-4", "input": unique()})
    for endpoint in ("/health", "/metrics", "/costs"):
        assert "hunter2" not in service.http.get(endpoint).text
    logs = service.log_text()
    assert TEST_API_KEY not in logs
    assert "hunter2-redis-pass" not in logs


def test_large_responses_are_gzipped(shared_service: ServiceProcess) -> None:
    """A response over 1 kB is gzip-compressed for a client that accepts it, plain otherwise."""
    with httpx.Client(base_url=shared_service.url) as raw:
        compressed = raw.get("/config", headers={"Accept-Encoding": "gzip"})
        assert compressed.headers["content-encoding"] == "gzip"
        plain = raw.get("/config", headers={"Accept-Encoding": "identity"})
        assert "content-encoding" not in plain.headers
    assert len(plain.content) > 1024
    assert int(compressed.headers["content-length"]) < len(plain.content)
    assert compressed.json() == plain.json()


def test_cors_is_off_unless_configured(shared_service: ServiceProcess) -> None:
    """No CORS headers for a cross-origin request when CORS_ALLOW_ORIGINS is empty."""
    response = shared_service.http.get("/health", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in response.headers


def test_the_request_id_goes_upstream_with_the_provider_call(
    shared_service: ServiceProcess, sim: Simulator
) -> None:
    """Each provider call carries the request's X-Request-ID, so our logs join a gateway's."""
    response = shared_service.http.post(
        "/v1/predict",
        json={"model": "gpt-4", "variant": "cot", "input": unique("Which request is this?")},
        headers={"X-Request-ID": "join-me-0042"},
    )
    assert response.status_code == 200, response.text
    assert sim.stats()["request_ids"] == ["join-me-0042"]
