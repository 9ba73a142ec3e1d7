"""Client keys and operator keys: a tenant sees its own costs and nothing of the others' or of the
service's configuration; operators see everything; /metrics can live on a port of its own."""

from __future__ import annotations

import uuid
from pathlib import Path

import httpx

from tests.integration.conftest import ServiceFactory
from tests.support.processes import LOOPBACK, RedisServer, Simulator, free_port

KEY_ALPHA = "sk-alpha-0123456789abcdef"
KEY_BETA = "sk-beta-0123456789abcdef00"
KEY_LONE = "sk-lone-0123456789abcdef00"  # a client key without a tenant
KEY_OPS = "sk-ops-0123456789abcdef0000"
MODELS = """
models:
  gpt-4: {name: openai/gpt-4, cost_per_1k_input_tokens: 0.03, cost_per_1k_output_tokens: 0.06}
variants:
  baseline: {signature: "question -> answer"}
budgets:
  tenants: {alpha: {daily_usd: 5}, beta: {daily_usd: 5}}
"""


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_client_keys_see_their_own_tenants_costs_only_and_operators_see_all(
    service_factory: ServiceFactory, sim: Simulator, redis_server: RedisServer, tmp_path: Path
) -> None:
    """alpha's /costs holds alpha's requests only (named model:variant), beta's beta's, a key with no
    tenant sees none; /config, /v1/experiments and /metrics are the operators'; /health names no
    tenant and no budget."""
    redis_server.command("FLUSHALL")
    models = tmp_path / "models.yaml"
    models.write_text(MODELS, encoding="utf-8")
    service = service_factory(
        API_KEYS=f"{KEY_ALPHA} alpha,{KEY_BETA} beta,{KEY_LONE}",
        ADMIN_API_KEYS=KEY_OPS,
        MODELS_CONFIG=str(models),
    )
    for key, count in ((KEY_ALPHA, 2), (KEY_BETA, 1)):
        for _ in range(count):
            body = {"model": "gpt-4", "input": f"mine {uuid.uuid4().hex}"}
            assert service.http.post("/v1/predict", json=body, headers=bearer(key)).status_code == 200

    alpha = service.http.get("/costs", headers=bearer(KEY_ALPHA)).json()
    beta = service.http.get("/costs", headers=bearer(KEY_BETA)).json()
    lone = service.http.get("/costs", headers=bearer(KEY_LONE)).json()
    everyone = service.http.get("/costs", headers=bearer(KEY_OPS)).json()
    assert set(alpha) == {"gpt-4:baseline"}
    assert alpha["gpt-4:baseline"]["total_requests"] == 2
    assert beta["gpt-4:baseline"]["total_requests"] == 1
    assert alpha["gpt-4:baseline"]["total_cost_usd"] != beta["gpt-4:baseline"]["total_cost_usd"]
    assert lone == {}
    assert set(everyone) == {"gpt-4:baseline"}
    assert everyone["gpt-4:baseline"]["total_requests"] == 3

    for path in ("/config", "/v1/experiments", "/metrics"):
        refused = service.http.get(path, headers=bearer(KEY_ALPHA))
        assert refused.status_code == 403, (path, refused.text)
        assert refused.json()["error"]["type"] == "forbidden"
        assert service.http.get(path, headers=bearer(KEY_OPS)).status_code == 200, path
    health = service.http.get("/health").text
    assert "alpha" not in health
    assert "beta" not in health
    assert "budget" not in health


def test_metrics_can_be_served_on_a_port_of_their_own(
    service_factory: ServiceFactory, sim: Simulator
) -> None:
    """With METRICS_PORT, /metrics answers there without a key and is not served on the main port."""
    port = free_port()
    service = service_factory(API_KEYS=f"{KEY_ALPHA} alpha", METRICS_PORT=str(port))
    service.http.post("/v1/predict", json={"model": "gpt-4", "input": "count me"}, headers=bearer(KEY_ALPHA))
    scraped = httpx.get(f"http://{LOOPBACK}:{port}/metrics", timeout=10)
    assert scraped.status_code == 200
    assert "dspy_predictions_total" in scraped.text
    assert service.http.get("/metrics", headers=bearer(KEY_ALPHA)).status_code == 404
    assert httpx.get(f"http://{LOOPBACK}:{port}/config", timeout=10).status_code == 404
