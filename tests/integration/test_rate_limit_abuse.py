"""Rate limits that a client cannot step around: batches count their items, guessed keys are
limited too, and a forged X-Forwarded-For changes nothing unless a proxy is trusted."""

from __future__ import annotations

import uuid
from pathlib import Path

from tests.integration.conftest import ServiceFactory
from tests.support.processes import RedisServer, Simulator


def test_a_batch_counts_as_many_requests_as_it_has_items(
    service_factory: ServiceFactory, sim: Simulator, redis_server: RedisServer
) -> None:
    """With 10 requests a minute, a batch of 20 items is refused (429) without a provider call; a
    batch of 5 passes and leaves room for 5 more requests, not 9."""
    redis_server.command("FLUSHALL")
    service = service_factory(RATE_LIMIT="10/minute")
    big = {"requests": [{"model": "gpt-4", "input": f"item {n} {uuid.uuid4().hex}"} for n in range(20)]}
    refused = service.http.post("/v1/predict/batch", json=big)
    assert refused.status_code == 429, refused.text
    assert refused.json()["error"]["type"] == "rate_limited"
    assert "counts as 20 requests" in refused.json()["error"]["message"]
    assert sim.stats()["calls"] == 0


def test_requests_with_a_wrong_key_are_rate_limited_per_address(
    service_factory: ServiceFactory, sim: Simulator, redis_server: RedisServer
) -> None:
    """Guessing keys is limited like calling with one: past the limit, a wrong key gets 429, not 401."""
    redis_server.command("FLUSHALL")
    service = service_factory(RATE_LIMIT="5/minute", API_KEYS="sk-the-only-right-key-000000 acme")
    statuses = [
        service.http.post(
            "/v1/predict",
            json={"model": "gpt-4", "input": "x"},
            headers={"Authorization": f"Bearer sk-guess-{n:020d}"},
        ).status_code
        for n in range(8)
    ]
    assert statuses == [401] * 5 + [429] * 3


def test_a_forged_forwarded_for_header_is_ignored_unless_a_proxy_is_trusted(
    service_factory: ServiceFactory, sim: Simulator, redis_server: RedisServer
) -> None:
    """By default no proxy is trusted: requests claiming other addresses in X-Forwarded-For all count
    against the real peer. With FORWARDED_ALLOW_IPS naming the proxy, each forwarded address counts
    on its own."""
    redis_server.command("FLUSHALL")

    def statuses(service_url_env: dict[str, str], name: str) -> list[int]:
        service = service_factory(name, RATE_LIMIT="3/minute", **service_url_env)
        return [
            service.http.post(
                "/v1/predict",
                json={"model": "gpt-4", "input": f"forged {n}"},
                headers={"X-Forwarded-For": f"203.0.113.{n}"},
            ).status_code
            for n in range(5)
        ]

    assert statuses({}, "untrusting") == [200, 200, 200, 429, 429]
    redis_server.command("FLUSHALL")
    assert statuses({"FORWARDED_ALLOW_IPS": "127.0.0.1"}, "behind-proxy") == [200] * 5


def test_feedback_counts_against_the_same_limit(
    service_factory: ServiceFactory, sim: Simulator, redis_server: RedisServer, tmp_path: Path
) -> None:
    """Each feedback is a database write: a client flooding /v1/feedback meets the rate limit
    (429, counted with its predictions), and nothing past the limit reaches the database."""
    redis_server.command("FLUSHALL")
    service = service_factory(
        RATE_LIMIT="4/minute",
        FEEDBACK_ENABLED="true",
        DATA_DIR=str(tmp_path / "data"),
        SERVICE_NAME="fb-limit",
    )
    asked = service.http.post("/v1/predict", json={"model": "gpt-4", "input": f"rated {uuid.uuid4().hex}"})
    assert asked.status_code == 200, asked.text
    request_id = asked.json()["request_id"]
    statuses = [
        service.http.post(
            "/v1/feedback", json={"request_id": request_id, "metric": "helpful", "value": True}
        ).status_code
        for _ in range(5)
    ]
    assert statuses[3:] == [429, 429], statuses
    assert all(status != 429 for status in statuses[:3]), statuses
