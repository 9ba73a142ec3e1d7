"""TLS with a private CA (and client certificates) and ACL users with only the commands the service
documents, against real redis-server processes with certificates the tests make."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dspy_service.redis_topology import ACL_CLUSTER_COMMANDS, ACL_COMMANDS
from tests.integration.conftest import TEST_API_KEY
from tests.support.metrics_text import sample_value
from tests.support.processes import ServiceProcess, Simulator, wait_until
from tests.support.redis_topologies import (
    AclRedisServer,
    RedisClusterProcesses,
    TlsMaterial,
    TlsRedisServer,
    probe_client,
)

pytestmark = pytest.mark.timeout(180)
ACL_PASSWORD = "acl-user-password-5531"
TLS_PASSWORD = "tls-password-8873"


@pytest.fixture(scope="module")
def material(tmp_path_factory: pytest.TempPathFactory) -> TlsMaterial:
    return TlsMaterial.create(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def tls_redis(material: TlsMaterial, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsRedisServer]:
    server = TlsRedisServer(tmp_path_factory.mktemp("tls-redis"), material, password=TLS_PASSWORD)
    server.start()
    yield server
    server.stop()


def service_env(simulator: Simulator, **env: str) -> dict[str, str]:
    return {
        "OPENAI_API_KEY": TEST_API_KEY,
        "OPENAI_BASE_URL": simulator.api_base,
        "LOG_FORMAT": "json",
        "COSTS_FLUSH_INTERVAL_SECS": "0.2",
        "SERVICE_NAME": f"tls-{uuid.uuid4().hex[:8]}",
        **env,
    }


def ask(service: ServiceProcess, question: str) -> dict[str, Any]:
    response = service.http.post("/v1/predict", json={"model": "gpt-3.5-turbo", "input": question})
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def test_a_verified_tls_connection_serves_the_fleet(
    tls_redis: TlsRedisServer, material: TlsMaterial, simulator: Simulator, sim: Simulator, tmp_path: Path
) -> None:
    env = service_env(simulator, REDIS_URL=tls_redis.url, REDIS_TLS_CA_FILE=str(material.ca_file))
    a, b = ServiceProcess(env, tmp_path, "a"), ServiceProcess(env, tmp_path, "b")
    for service in (a, b):
        service.start()
    try:
        question = f"over tls {uuid.uuid4().hex}"
        ask(a, question)
        assert ask(b, question)["metadata"]["cache_level"] == "redis"  # through the TLS Redis
        health = a.http.get("/health").json()
        assert health["redis_connected"] is True
        assert health["redis"]["state"]["tls"] is True
        keys = tls_redis.client().keys(f"dspy-service:v1:{env['SERVICE_NAME']}:cache:*")
        assert len(keys) == 1
        config = a.http.get("/config").text
        assert TLS_PASSWORD not in config
        assert TLS_PASSWORD not in a.log_text()
    finally:
        for service in (a, b):
            service.stop()


def test_a_certificate_from_the_wrong_ca_is_refused_and_the_memory_cache_serves(
    tls_redis: TlsRedisServer, material: TlsMaterial, simulator: Simulator, sim: Simulator, tmp_path: Path
) -> None:
    env = service_env(simulator, REDIS_URL=tls_redis.url, REDIS_TLS_CA_FILE=str(material.wrong_ca_file))
    service = ServiceProcess(env, tmp_path, "wrong-ca")
    service.start()
    try:
        unavailable = [line for line in service.log_lines() if line.get("event") == "redis.unavailable"]
        assert unavailable, service.log_text()
        assert "certificate verify failed" in unavailable[0]["reason"]
        assert TLS_PASSWORD not in service.log_text()
        question = f"no redis {uuid.uuid4().hex}"
        ask(service, question)
        assert ask(service, question)["metadata"]["cache_level"] == "memory"
        assert service.http.get("/health").json()["redis_connected"] is False
        assert sim.stats()["calls"] == 1
    finally:
        service.stop()


def test_a_client_certificate_is_presented_when_the_server_asks(
    material: TlsMaterial, simulator: Simulator, sim: Simulator, tmp_path: Path
) -> None:
    server = TlsRedisServer(tmp_path / "mtls", material, require_client_cert=True)
    (tmp_path / "mtls").mkdir()
    server.start()
    try:
        with_cert = service_env(
            simulator,
            REDIS_URL=server.url,
            REDIS_TLS_CA_FILE=str(material.ca_file),
            REDIS_TLS_CERT_FILE=str(material.client_cert),
            REDIS_TLS_KEY_FILE=str(material.client_key),
        )
        service = ServiceProcess(with_cert, tmp_path, "mtls")
        service.start()
        assert service.http.get("/health").json()["redis_connected"] is True
        service.stop()
        without = {
            k: v for k, v in with_cert.items() if not k.startswith(("REDIS_TLS_CERT", "REDIS_TLS_KEY"))
        }
        refused = ServiceProcess(without, tmp_path, "no-cert")
        refused.start()
        assert refused.http.get("/health").json()["redis_connected"] is False
        assert any(line.get("event") == "redis.unavailable" for line in refused.log_lines())
        refused.stop()
    finally:
        server.stop()


BUDGETED_MODELS = """
models:
  gpt-3.5-turbo:
    name: openai/gpt-3.5-turbo
    cost_per_1k_input_tokens: 0.0005
    cost_per_1k_output_tokens: 0.0015
    max_output_tokens: 100
variants:
  baseline: {signature: "question -> answer"}
budgets:
  models: {gpt-3.5-turbo: {daily_usd: 100}}
  tenants: {acme: {daily_usd: 100}}
"""


def exercise_everything(service: ServiceProcess, headers: dict[str, str]) -> None:
    """Misses, hits from Redis, budget holds and settles, rate-limit counters, cost flushes, /costs."""
    questions = [f"acl {n} {uuid.uuid4().hex}" for n in range(4)]
    for question in questions * 2:
        body = {"model": "gpt-3.5-turbo", "input": question}
        response = service.http.post("/v1/predict", json=body, headers=headers)
        assert response.status_code == 200, response.text
    time.sleep(0.6)  # flushes
    costs = service.http.get("/costs", headers=headers)
    assert costs.headers["X-Costs-Scope"] == "fleet"


def test_an_acl_user_with_the_documented_commands_is_enough(
    simulator: Simulator, sim: Simulator, tmp_path: Path
) -> None:
    """Everything the service does runs as a user allowed only ACL_COMMANDS on ~dspy-service:*,
    and Redis refused nothing (ACL LOG is empty)."""
    server = AclRedisServer(tmp_path, "dspy", ACL_PASSWORD, ACL_COMMANDS)
    server.start()
    models = tmp_path / "models.yaml"
    models.write_text(BUDGETED_MODELS, encoding="utf-8")
    env = service_env(
        simulator,
        REDIS_URL=server.url,
        MODELS_CONFIG=str(models),
        RATE_LIMIT="1000/minute",
        API_KEYS="sk-acl-client-key-0001 acme",
        ADMIN_API_KEYS="sk-acl-operator-key-0002",
    )
    service = ServiceProcess(env, tmp_path, "acl")
    service.start()
    try:
        exercise_everything(service, {"Authorization": "Bearer sk-acl-client-key-0001"})
        operator = {"Authorization": "Bearer sk-acl-operator-key-0002"}
        metrics = service.http.get("/metrics", headers=operator).text
        assert sample_value(metrics, "dspy_redis_command_errors_total") == 0.0
        assert sample_value(metrics, "dspy_redis_connected", role="state") == 1.0
        assert server.acl_log() == []
        admin = server.admin_client()
        assert admin.keys("*ratelimit*")
        assert admin.keys("*spend*")
        assert admin.keys("*costs*")
        assert ACL_PASSWORD not in service.log_text()
        assert ACL_PASSWORD not in service.http.get("/config", headers=operator).text
    finally:
        service.stop()
        server.stop()


def test_an_acl_user_without_a_needed_command_fails_open_and_is_counted(
    simulator: Simulator, sim: Simulator, tmp_path: Path
) -> None:
    """A user missing EVALSHA (the cost flush) still gets answers; the refusals are counted as
    NOPERM command errors, not taken for an outage."""
    server = AclRedisServer(tmp_path, "dspy", ACL_PASSWORD, [c for c in ACL_COMMANDS if c != "evalsha"])
    server.start()
    service = ServiceProcess(service_env(simulator, REDIS_URL=server.url), tmp_path, "acl-short")
    service.start()
    try:
        exercise_everything(service, {})
        metrics = service.http.get("/metrics").text
        assert sample_value(metrics, "dspy_redis_command_errors_total", error="NOPERM") > 0
        assert sample_value(metrics, "dspy_redis_connected", role="state") == 1.0
        assert any(entry["object"] == "evalsha" for entry in server.acl_log())
    finally:
        service.stop()
        server.stop()


def test_an_acl_user_on_every_cluster_node_needs_only_the_documented_commands(
    simulator: Simulator, sim: Simulator, tmp_path: Path
) -> None:
    """ACLs are per node in a cluster: the user is made on all six, with ACL_COMMANDS and
    ACL_CLUSTER_COMMANDS; predictions, hits and flushes run and no node refused anything."""
    cluster = RedisClusterProcesses(tmp_path / "cluster")
    (tmp_path / "cluster").mkdir()
    cluster.start()
    rules = ["on", f">{ACL_PASSWORD}", "resetkeys", "~dspy-service:*", "resetchannels", "-@all"]
    rules += [f"+{command}" for command in (*ACL_COMMANDS, *ACL_CLUSTER_COMMANDS)]
    for port in cluster.ports:
        with probe_client(port) as admin:
            admin.execute_command("ACL SETUSER", "dspy", *rules)
    seeds = cluster.seed_url.replace("redis://", f"redis://dspy:{ACL_PASSWORD}@")
    service = ServiceProcess(
        service_env(simulator, REDIS_URL=seeds, REDIS_CLUSTER="true"), tmp_path, "acl-cl"
    )
    service.start()
    try:
        exercise_everything(service, {})
        wait_until(
            lambda: service.http.get("/health").json()["redis"]["state"]["nodes_known"] >= 6,
            timeout=10,
            what="the cluster's nodes in /health",
        )
        metrics = service.http.get("/metrics").text
        assert sample_value(metrics, "dspy_redis_command_errors_total") == 0.0
        for port in cluster.ports:
            with probe_client(port) as admin:
                assert admin.acl_log() == [], port
    finally:
        service.stop()
        cluster.stop()
