"""Start-up on a bare machine: no Redis, no provider key."""

from __future__ import annotations

import uuid

from tests.integration.conftest import ServiceFactory
from tests.support.processes import free_port


def test_starts_and_serves_with_redis_down(service_factory: ServiceFactory) -> None:
    """With Redis unreachable: one warning, ready, predictions served from memory and the provider."""
    service = service_factory(REDIS_URL=f"redis://127.0.0.1:{free_port()}/0")
    health = service.http.get("/health").json()
    assert health["redis_connected"] is False
    assert service.http.get("/ready").status_code == 200
    question = f"q {uuid.uuid4().hex}"
    first = service.http.post("/v1/predict", json={"model": "gpt-4", "input": question})
    second = service.http.post("/v1/predict", json={"model": "gpt-4", "input": question})
    assert first.status_code == second.status_code == 200
    assert second.json()["metadata"]["cache_level"] == "memory"
    costs = service.http.get("/costs")
    assert costs.headers["x-costs-scope"] == "replica"
    assert costs.json()["gpt-4:baseline"]["total_requests"] == 2
    warnings = [line for line in service.log_lines() if line.get("event") == "redis.unavailable"]
    assert len(warnings) == 1
    assert warnings[0]["level"] == "warning"


def test_redis_required_makes_readiness_depend_on_it(service_factory: ServiceFactory) -> None:
    """REDIS_REQUIRED=true: /ready is 503 while Redis is unreachable; /health stays 200."""
    service = service_factory(
        REDIS_URL=f"redis://127.0.0.1:{free_port()}/0", REDIS_REQUIRED="true", wait=False
    )
    from tests.support.processes import wait_until

    def answers() -> bool:
        try:
            return service.http.get("/health").status_code == 200
        except Exception:
            return False

    wait_until(answers, timeout=60, what="the service to answer /health")
    ready = service.http.get("/ready")
    assert ready.status_code == 503
    assert ready.json()["checks"]["redis"] == "required but unreachable"


def test_without_a_key_the_builtin_simulator_answers_and_says_so(service_factory: ServiceFactory) -> None:
    """No OPENAI_API_KEY and no base URL: the embedded simulator serves, loudly flagged."""
    service = service_factory(OPENAI_API_KEY="", OPENAI_BASE_URL="", SIMULATOR_PORT="0")
    health = service.http.get("/health").json()
    assert "simulator" in health["provider"]
    assert "OPENAI_API_KEY" in health["warning"]
    response = service.http.post(
        "/v1/predict",
        json={"model": "gpt-3.5-turbo", "input": "What is the capital of France?", "use_cache": False},
    )
    assert response.status_code == 200, response.text
    assert "Paris" in response.json()["output"]
    assert any(
        line.get("event") == "provider.simulated" and line["level"] == "warning"
        for line in service.log_lines()
    )
