"""Budgets cap spend under abuse: a burst of concurrent misses and abandoned streams, against a
real redis-server and the simulator, over real HTTP."""

from __future__ import annotations

import concurrent.futures
import time
import uuid
from pathlib import Path

import httpx
import pytest

from tests.integration.conftest import ServiceFactory
from tests.support.processes import (
    RedisServer,
    ServiceProcess,
    Simulator,
    run_service_expecting_failure,
    wait_until,
)
from tests.support.redis_keys import STATE_PREFIX

PRICE_PER_1K = 0.5  # USD per 1,000 tokens, in and out: a call here costs about 0.1 USD
MODELS = f"""
models:
  metered:
    name: openai/gpt-4
    cost_per_1k_input_tokens: {PRICE_PER_1K}
    cost_per_1k_output_tokens: {PRICE_PER_1K}
    max_output_tokens: 60
    max_retries: 0
variants:
  baseline: {{signature: "question -> answer"}}
budgets:
  models: {{metered: {{daily_usd: 1.0}}}}
"""


@pytest.fixture
def isolated_redis(redis_server: RedisServer) -> RedisServer:
    redis_server.command("FLUSHALL")
    return redis_server


@pytest.fixture
def metered(service_factory: ServiceFactory, isolated_redis: RedisServer, tmp_path: Path) -> ServiceProcess:
    models = tmp_path / "models.yaml"
    models.write_text(MODELS, encoding="utf-8")
    return service_factory(MODELS_CONFIG=str(models))


def fleet_spend(redis: RedisServer) -> float:
    day = time.strftime("%Y-%m-%d", time.gmtime())
    reply = redis.command("GET", f"{STATE_PREFIX}spend:{day}:model:metered")
    lines = reply.split(b"\r\n")
    return float(lines[1]) if reply.startswith(b"$") and len(lines) > 1 and lines[1] else 0.0


def provider_cost(sim: Simulator) -> float:
    stats = sim.stats()
    return float(stats["prompt_tokens"] + stats["completion_tokens"]) * PRICE_PER_1K / 1000


def test_a_burst_of_concurrent_misses_cannot_spend_past_the_budget(
    metered: ServiceProcess, sim: Simulator, isolated_redis: RedisServer
) -> None:
    """50 concurrent misses against a 1 USD budget: each holds its worst case before it goes
    upstream, so the ones that do not fit are refused with 429 and the spend stays under the limit
    (checking before and charging after let such a burst spend 6.54 USD)."""
    sim.configure(latency_ms=300)  # every request is in flight at once

    def ask(n: int) -> httpx.Response:
        body = {"model": "metered", "input": f"burst {n} {uuid.uuid4().hex}"}
        return metered.http.post("/v1/predict", json=body)

    with concurrent.futures.ThreadPoolExecutor(max_workers=50) as pool:
        answers = list(pool.map(ask, range(50)))
    served = [a for a in answers if a.status_code == 200]
    refused = [a for a in answers if a.status_code == 429]
    assert len(served) + len(refused) == 50
    assert all(a.json()["error"]["type"] == "budget_exceeded" for a in refused)
    spent_by_answers = sum(a.json()["metadata"]["cost_usd"] for a in served)
    wait_until(lambda: fleet_spend(isolated_redis) == pytest.approx(spent_by_answers), timeout=5)
    print(
        f"50 concurrent misses, 1 USD budget: {len(served)} served, {len(refused)} refused; "
        f"provider cost {provider_cost(sim):.4f} USD, budget spend {fleet_spend(isolated_redis):.4f} USD"
    )
    assert served, "the budget had room for some of them"
    assert refused, "the budget could not have room for all of them"
    assert provider_cost(sim) <= 1.0
    assert fleet_spend(isolated_redis) <= 1.0

    # Sequentially until it refuses: the spend approaches the limit and never passes it.
    sim.configure(latency_ms=0)
    for n in range(60):
        if ask(1000 + n).status_code == 429:
            break
    else:
        pytest.fail("the budget never refused")
    wait_until(lambda: fleet_spend(isolated_redis) == pytest.approx(provider_cost(sim)), timeout=5)
    print(f"then one at a time until refused: spend {fleet_spend(isolated_redis):.4f} USD of 1 USD")
    assert provider_cost(sim) <= 1.0
    assert fleet_spend(isolated_redis) <= 1.0


def test_abandoned_streams_are_charged_at_their_reservation(
    metered: ServiceProcess, sim: Simulator, isolated_redis: RedisServer
) -> None:
    """A stream whose client leaves before the provider reports its tokens: its spend is unknown, so
    its budget keeps the whole reservation (counting it as nothing left budgets at 0 % while four
    abandoned streams cost 8.9 USD at the provider). Of ten such streams, those admitted are charged
    at least what the provider saw, and once their holds fill the budget the rest are refused."""
    sim.configure(stream_chunk_ms=100)
    admitted = refused = 0
    for n in range(10):
        body = {"model": "metered", "input": f"abandon {n} {uuid.uuid4().hex}"}
        with metered.http.stream("POST", "/v1/predict/stream", json=body) as response:
            if response.status_code == 429:
                refused += 1
                continue
            assert response.status_code == 200
            admitted += 1
            for line in response.iter_lines():
                if line.startswith("event: chunk"):
                    break  # the client leaves after its first chunk
    wait_until(lambda: sim.stats()["streams_abandoned"] == admitted, timeout=10)
    wait_until(lambda: fleet_spend(isolated_redis) >= provider_cost(sim) > 0, timeout=5)
    print(
        f"10 streams abandoned after their first chunk: {admitted} admitted, {refused} refused; provider "
        f"cost {provider_cost(sim):.4f} USD; budget spend {fleet_spend(isolated_redis):.4f} USD of 1 USD"
    )
    assert admitted >= 1
    assert refused >= 1
    assert fleet_spend(isolated_redis) <= 1.0
    costs = metered.http.get("/costs").json()["metered:baseline"]
    assert costs["unmetered_calls"] == admitted


def test_a_tenant_budget_with_an_unpriced_model_stops_start_up(tmp_path: Path) -> None:
    """A tenant with a budget could spend without limit on a model no price is known for: start-up
    stops (exit 2) naming the tenant and the model."""
    models = tmp_path / "models.yaml"
    models.write_text(
        "models:\n"
        "  priced: {name: openai/gpt-4, cost_per_1k_input_tokens: 0.03, cost_per_1k_output_tokens: 0.06}\n"
        "  mystery: {name: openai/house-model-without-a-price}\n"
        "variants:\n  baseline: {signature: 'question -> answer'}\n"
        "budgets:\n  tenants: {acme: {daily_usd: 5}}\n",
        encoding="utf-8",
    )
    env = {"MODELS_CONFIG": str(models), "OPENAI_API_KEY": "k", "REDIS_URL": "redis://127.0.0.1:1"}
    code, output = run_service_expecting_failure(env, tmp_path)
    assert code == 2, output
    assert "budgets.tenants.acme" in output
    assert "'mystery'" in output
    assert "Traceback" not in output


def test_coalesced_requests_report_that_they_spent_nothing(metered: ServiceProcess, sim: Simulator) -> None:
    """Identical misses arriving together share one provider call, budget or not: the one that made
    it reports its cost, the others `coalesced: true` and 0 USD, and /costs counts all three."""
    sim.configure(latency_ms=300)
    body = {"model": "metered", "input": f"together {uuid.uuid4().hex}"}
    with concurrent.futures.ThreadPoolExecutor(max_workers=3) as pool:
        answers = list(pool.map(lambda _: metered.http.post("/v1/predict", json=body).json(), range(3)))
    metas = sorted((a["metadata"] for a in answers), key=lambda m: m["coalesced"])
    assert sim.stats()["calls"] == 1
    assert [m["coalesced"] for m in metas] == [False, True, True]
    assert metas[0]["cost_usd"] > 0
    assert [m["cost_usd"] for m in metas[1:]] == [0.0, 0.0]
    row = metered.http.get("/costs").json()["metered:baseline"]
    assert row["total_requests"] == 3
    assert row["total_cost_usd"] == pytest.approx(metas[0]["cost_usd"])
