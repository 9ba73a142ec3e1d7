"""The cache on a Redis of its own (REDIS_CACHE_URL), apart from the state Redis (REDIS_URL)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import ServiceFactory
from tests.support.metrics_text import sample_value
from tests.support.processes import RedisServer, Simulator, wait_until
from tests.support.redis_keys import DEFAULT_PREFIX, STATE_PREFIX


@pytest.fixture
def cache_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "cache-redis")
    (tmp_path / "cache-redis").mkdir()
    server.start()
    yield server
    server.stop()


def keys(redis: RedisServer, pattern: str) -> list[bytes]:
    return [line for line in redis.command("KEYS", pattern).split(b"\r\n") if line.startswith(b"dspy")]


def test_the_cache_can_live_on_its_own_redis_apart_from_the_state(
    service_factory: ServiceFactory, sim: Simulator, redis_server: RedisServer, cache_redis: RedisServer
) -> None:
    """With REDIS_CACHE_URL, answers go to the cache Redis and costs stay on the state Redis; when the
    cache Redis dies, the state link stays up (and the other way round), each with its own gauge."""
    redis_server.command("FLUSHALL")
    service = service_factory(REDIS_CACHE_URL=cache_redis.url)
    question = f"where do I go {uuid.uuid4().hex}"
    assert service.http.post("/v1/predict", json={"model": "gpt-4", "input": question}).status_code == 200
    wait_until(
        lambda: bool(keys(redis_server, STATE_PREFIX + "costs:*")), timeout=5, what="costs in state Redis"
    )
    assert keys(cache_redis, DEFAULT_PREFIX + "cache:*")
    assert not keys(redis_server, DEFAULT_PREFIX + "cache:*")
    assert not keys(cache_redis, STATE_PREFIX + "costs:*")

    cache_redis.kill()
    other = service.http.post("/v1/predict", json={"model": "gpt-4", "input": f"{question} again"})
    assert other.status_code == 200
    health = service.http.get("/health").json()
    metrics = service.http.get("/metrics").text
    assert health["redis_connected"] is True
    assert health["redis_cache_connected"] is False
    assert sample_value(metrics, "dspy_redis_connected", role="state") == 1
    assert sample_value(metrics, "dspy_redis_connected", role="cache") == 0
    assert service.http.get("/costs").headers["x-costs-scope"] == "fleet"


def test_a_state_redis_that_comes_back_empty_is_noticed(
    service_factory: ServiceFactory, sim: Simulator, cache_redis: RedisServer
) -> None:
    """A state Redis restarted without persistence answers as if nothing happened: its epoch marker
    is gone, so the service logs `redis.state_lost`, counts it, and /costs says from when its fleet
    totals count (X-Costs-Since) instead of passing a fresh count off as the whole."""
    state = cache_redis  # a Redis of this test's own, keeping nothing on disk
    service = service_factory(REDIS_URL=state.url)
    assert service.http.post("/v1/predict", json={"model": "gpt-4", "input": "before"}).status_code == 200
    first = service.http.get("/costs").headers["x-costs-since"]
    state.kill()
    state.start()
    service.http.post("/v1/predict", json={"model": "gpt-4", "input": "after the restart"})
    wait_until(
        lambda: any(line.get("event") == "redis.state_lost" for line in service.log_lines()),
        timeout=20,
        what="redis.state_lost",
    )
    costs = service.http.get("/costs")
    assert costs.headers["x-costs-scope"] == "fleet"
    assert costs.headers["x-costs-since"] > first
    assert sample_value(service.http.get("/metrics").text, "dspy_redis_state_lost_total") == 1


def test_deployments_sharing_a_redis_keep_apart(
    service_factory: ServiceFactory, sim: Simulator, redis_server: RedisServer
) -> None:
    """Staging and production (SERVICE_NAME) on one Redis: neither serves the other's answers nor
    counts the other's costs; nor does a service on the built-in simulator serve a real provider's
    (the key covers the provider endpoint)."""
    redis_server.command("FLUSHALL")
    staging = service_factory("staging", SERVICE_NAME="staging")
    production = service_factory("production", SERVICE_NAME="production")
    question = f"shared Redis {uuid.uuid4().hex}"
    body = {"model": "gpt-4", "input": question}
    assert staging.http.post("/v1/predict", json=body).json()["metadata"]["cache_level"] is None
    assert production.http.post("/v1/predict", json=body).json()["metadata"]["cache_level"] is None
    assert staging.http.post("/v1/predict", json=body).json()["metadata"]["cache_level"] == "memory"
    wait_until(
        lambda: staging.http.get("/costs").json().get("gpt-4:baseline", {}).get("total_requests") == 2,
        timeout=5,
        what="staging's own totals",
    )
    assert production.http.get("/costs").json()["gpt-4:baseline"]["total_requests"] == 1

    simulated = service_factory(
        "simulated", SERVICE_NAME="production", OPENAI_API_KEY="", OPENAI_BASE_URL="", SIMULATOR_PORT="0"
    )
    answer = simulated.http.post("/v1/predict", json=body).json()
    assert answer["metadata"]["cache_level"] is None  # not production's answer from the real provider
