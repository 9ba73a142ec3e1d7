"""Redis bursts and Redis's own errors are not outages: a real redis-server, the service over HTTP."""

from __future__ import annotations

import asyncio
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.integration.conftest import ServiceFactory
from tests.support.metrics_text import sample_value
from tests.support.processes import RedisServer, ServiceProcess, Simulator


def disconnections(service: ServiceProcess) -> int:
    return sum(1 for line in service.log_lines() if line.get("event") == "redis.disconnected")


async def burst(url: str, bodies: list[dict[str, str]]) -> list[int]:
    limits = httpx.Limits(max_connections=len(bodies), max_keepalive_connections=len(bodies))
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:
        answers = await asyncio.gather(*(client.post("/v1/predict", json=body) for body in bodies))
    return [answer.status_code for answer in answers]


def test_a_burst_of_memory_hits_with_rate_limits_keeps_redis_up(
    service_factory: ServiceFactory, sim: Simulator
) -> None:
    """500 concurrent requests (memory hits, each checking its rate limit in Redis) want more
    connections than the pool has: they wait for one instead of failing, Redis is never marked
    down, and the rate limit stays fleet-wide."""
    # A generous timeout: what is tested is the pool (exhausting it failed at once, whatever the
    # timeout), not how a 2-core machine busy with 500 requests keeps to 250 ms.
    service = service_factory(RATE_LIMIT="100000/minute", REDIS_TIMEOUT_SECS="2")
    question = f"hot {uuid.uuid4().hex}"
    assert service.http.post("/v1/predict", json={"model": "gpt-4", "input": question}).status_code == 200
    statuses = asyncio.run(burst(service.url, [{"model": "gpt-4", "input": question}] * 500))
    metrics = service.http.get("/metrics").text
    print(
        f"500 concurrent hits with RATE_LIMIT on: {statuses.count(200)} answered, redis.disconnected "
        f"{disconnections(service)} times, pool waits given up "
        f"{sample_value(metrics, 'dspy_redis_command_errors_total', error='pool_busy'):g}"
    )
    assert statuses == [200] * 500
    lost = [line for line in service.log_lines() if line.get("event") == "redis.disconnected"]
    assert lost == []
    assert sample_value(metrics, "dspy_redis_connected") == 1


@pytest.fixture
def full_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of its own with maxmemory 2 MB under noeviction, filled to the brim."""
    server = RedisServer(tmp_path)
    server.start()
    server.command("CONFIG", "SET", "maxmemory", "2mb")
    server.command("CONFIG", "SET", "maxmemory-policy", "noeviction")
    filler = "x" * 10_000
    for n in range(1000):
        if server.command("SET", f"filler:{n}", filler).startswith(b"-OOM"):
            break
    else:
        pytest.fail("redis never filled up")
    yield server
    server.stop()


def test_a_full_redis_refusing_writes_is_not_an_outage(
    service_factory: ServiceFactory, sim: Simulator, full_redis: RedisServer
) -> None:
    """Redis at maxmemory answers every write with OOM: each such write fails open and is counted,
    every request is answered, reads keep working, and the link is never marked down."""
    service = service_factory(REDIS_URL=full_redis.url)
    questions = [f"full {n} {uuid.uuid4().hex}" for n in range(30)]
    statuses = [
        service.http.post("/v1/predict", json={"model": "gpt-4", "input": q}).status_code for q in questions
    ]
    again = service.http.post("/v1/predict", json={"model": "gpt-4", "input": questions[0]})
    metrics = service.http.get("/metrics").text
    refused = sample_value(metrics, "dspy_redis_command_errors_total", error="OOM")
    print(f"Redis full (maxmemory 2 MB, noeviction): {statuses.count(200)} of 30 answered, {refused:g} OOM")
    assert statuses == [200] * 30
    assert again.json()["metadata"]["cache_level"] == "memory"
    assert refused >= 30  # every answer's cache write was refused
    assert disconnections(service) == 0
    assert sample_value(metrics, "dspy_redis_connected") == 1
    lines = [line for line in service.log_lines() if line.get("event") == "redis.command_failed"]
    assert len(lines) == 1  # said once a minute, not once a request
    assert lines[0]["reply"] == "OOM"


def test_a_wrongtype_key_fails_only_its_own_operation(
    service_factory: ServiceFactory, sim: Simulator, redis_server: RedisServer
) -> None:
    """A key of the wrong type where the rate limiter counts (an operator's mistake) fails that
    operation open; Redis stays up for everything else."""
    redis_server.command("FLUSHALL")
    service = service_factory(RATE_LIMIT="1000/minute")
    statuses = [
        service.http.post("/v1/predict", json={"model": "gpt-4", "input": f"ok {n}"}).status_code
        for n in range(3)
    ]
    keys = [
        k.decode()
        for k in subprocess.run(
            ["redis-cli", "-p", str(redis_server.port), "--scan", "--pattern", "*ratelimit*"],
            capture_output=True,
            check=True,
        ).stdout.split()
    ]
    assert keys, "the rate limiter wrote no key"
    for key in keys:
        redis_server.command("DEL", key)
        redis_server.command("LPUSH", key, "not a counter")
    after = service.http.post("/v1/predict", json={"model": "gpt-4", "input": "ok 0"})
    assert statuses == [200] * 3
    assert after.status_code == 200
    metrics = service.http.get("/metrics").text
    assert sample_value(metrics, "dspy_redis_command_errors_total", error="WRONGTYPE") >= 1
    assert disconnections(service) == 0
    assert sample_value(metrics, "dspy_redis_connected") == 1
