"""A fleet on a real Redis Cluster: three primaries and three replicas on loopback ports, started by
the tests. Cross-replica hits go through the cluster, costs, budgets and rate limits are fleet-wide,
and a primary killed under load costs no request and no spend."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from dspy_service.redis_link import state_prefix
from tests.integration.conftest import TEST_API_KEY
from tests.support.fleet_load import recovered_batches, run_load, two_replicas, wait_for_fleet_totals
from tests.support.metrics_text import sample_value
from tests.support.processes import ServiceProcess, Simulator
from tests.support.redis_topologies import RedisClusterProcesses

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterProcesses]:
    nodes = RedisClusterProcesses(tmp_path_factory.mktemp("cluster"))
    nodes.start()
    yield nodes
    nodes.stop()


@pytest.fixture
def fleet(
    cluster: RedisClusterProcesses, simulator: Simulator, tmp_path: Path
) -> Iterator[tuple[ServiceProcess, ServiceProcess]]:
    """Two replicas of one deployment (a SERVICE_NAME of its own, so tests do not share totals)."""
    name = f"cluster-{uuid.uuid4().hex[:8]}"
    env = {
        "REDIS_URL": cluster.seed_url,
        "REDIS_CLUSTER": "true",
        "SERVICE_NAME": name,
        "OPENAI_API_KEY": TEST_API_KEY,
        "OPENAI_BASE_URL": simulator.api_base,
        "LOG_FORMAT": "json",
        "COSTS_FLUSH_INTERVAL_SECS": "0.2",
    }
    with two_replicas(env, tmp_path) as services:
        yield services


def state_prefix_of(service: ServiceProcess) -> str:
    return state_prefix(service.env["SERVICE_NAME"])


def test_cross_replica_hits_and_fleet_costs_through_the_cluster(
    fleet: tuple[ServiceProcess, ServiceProcess], cluster: RedisClusterProcesses, sim: Simulator
) -> None:
    """What one replica asked, the other answers from the cluster; cache entries spread over the
    primaries while the state keys stay in one slot; /costs adds up both replicas."""
    a, b = fleet
    questions = [f"cluster question {n} {uuid.uuid4().hex}" for n in range(12)]
    for question in questions:
        response = a.http.post("/v1/predict", json={"model": "gpt-3.5-turbo", "input": question})
        assert response.status_code == 200, response.text
    for question in questions:
        response = b.http.post("/v1/predict", json={"model": "gpt-3.5-turbo", "input": question})
        assert response.json()["metadata"]["cache_level"] == "redis", response.text
    assert sim.stats()["calls"] == len(questions)

    name = a.env["SERVICE_NAME"]
    cache_keys = cluster.keys_everywhere(f"dspy-service:v1:{name}:cache:*")
    assert len(cache_keys) == len(questions)
    assert len({cluster.port_for_key(key) for key in cache_keys}) > 1  # spread over the primaries
    state_keys = cluster.keys_everywhere(state_prefix_of(a) + "*")
    assert {cluster.key_slot(key) for key in state_keys} == {cluster.key_slot(state_prefix_of(a) + "epoch")}

    def counted() -> bool:
        row = a.http.get("/costs").json().get("gpt-3.5-turbo:baseline", {})
        return bool(
            row.get("total_requests") == 2 * len(questions) and row.get("cache_hits") == len(questions)
        )

    deadline = time.monotonic() + 10
    while not counted() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert counted(), a.http.get("/costs").text
    health = a.http.get("/health").json()["redis"]["state"]
    assert health["mode"] == "cluster"
    assert health["nodes_known"] >= 6
    assert health["nodes_reachable"] == health["nodes_known"]
    for service in fleet:
        assert sample_value(service.http.get("/metrics").text, "dspy_redis_command_errors_total") == 0.0


def test_budgets_and_rate_limits_hold_fleet_wide_on_a_cluster(
    cluster: RedisClusterProcesses, simulator: Simulator, sim: Simulator, tmp_path: Path
) -> None:
    """The budget's all-or-nothing reservation script and the rate limit's counters run on the
    cluster (a script across slots would be refused with CROSSSLOT and fail open)."""
    models = tmp_path / "models.yaml"
    models.write_text(
        "models:\n"
        "  metered:\n"
        "    name: openai/gpt-4\n"
        "    cost_per_1k_input_tokens: 0.1\n"
        "    cost_per_1k_output_tokens: 0.1\n"
        "    max_output_tokens: 60\n"
        "variants:\n"
        '  baseline: {signature: "question -> answer"}\n'
        "budgets:\n"
        "  models: {metered: {daily_usd: 1.0}}\n",
        encoding="utf-8",
    )
    env = {
        "REDIS_URL": cluster.seed_url,
        "REDIS_CLUSTER": "true",
        "SERVICE_NAME": f"limits-{uuid.uuid4().hex[:8]}",
        "OPENAI_API_KEY": TEST_API_KEY,
        "OPENAI_BASE_URL": simulator.api_base,
        "MODELS_CONFIG": str(models),
        "RATE_LIMIT": "6/minute",
        "API_KEYS": "sk-cluster-client-key-0001 acme",
        "ADMIN_API_KEYS": "sk-cluster-operator-key-0002",
        "COSTS_FLUSH_INTERVAL_SECS": "0.2",
    }
    with two_replicas(env, tmp_path) as (a, b):
        headers = {"Authorization": "Bearer sk-cluster-client-key-0001"}
        statuses = []
        for n in range(8):
            service = (a, b)[n % 2]
            body = {"model": "metered", "input": f"limited {n} {uuid.uuid4().hex}"}
            statuses.append(service.http.post("/v1/predict", json=body, headers=headers).status_code)
        assert statuses[:6] == [200] * 6, statuses
        assert statuses[6:] == [429, 429], statuses  # six a minute across the fleet, not per replica
        day = time.strftime("%Y-%m-%d", time.gmtime())
        spend_key = f"{state_prefix_of(a)}spend:{day}:model:metered"
        spent = float(cluster.client().get(spend_key) or 0)
        provider = (sim.stats()["prompt_tokens"] + sim.stats()["completion_tokens"]) * 0.1 / 1000
        assert spent == pytest.approx(provider, rel=1e-6)  # reserved, then settled to what was spent
        operator = {"Authorization": "Bearer sk-cluster-operator-key-0002"}
        for service in (a, b):
            page = service.http.get("/metrics", headers=operator).text
            assert sample_value(page, "dspy_redis_command_errors_total") == 0.0


def test_a_primary_killed_under_load_costs_no_request_and_no_spend(
    fleet: tuple[ServiceProcess, ServiceProcess], cluster: RedisClusterProcesses, sim: Simulator
) -> None:
    """The primary holding the state slot dies mid-load: every request is answered, its replica takes
    over, and afterwards the fleet totals equal what the responses reported (the batch in doubt at
    the kill is resent and applied once), with no state loss noticed."""
    a, b = fleet
    victim = cluster.port_for_key(state_prefix_of(a) + "epoch")
    promoted: list[int] = []
    since = a.http.get("/costs").headers.get("X-Costs-Since")

    def kill_the_state_primary() -> None:
        cluster.kill(victim)
        promoted.append(cluster.wait_for_failover(victim, timeout=30))

    load = run_load(fleet, workers=6, during=kill_the_state_primary, after_secs=3.0)
    assert load.failures == [], load.failures[:5]
    assert load.requests > 50
    assert promoted
    assert promoted[0] != victim
    assert cluster.port_for_key(state_prefix_of(a) + "epoch") == promoted[0]

    totals = wait_for_fleet_totals(a, load)
    assert totals["total_requests"] == load.requests
    assert totals["total_input_tokens"] == load.input_tokens
    assert totals["total_output_tokens"] == load.output_tokens
    assert totals["total_cost_usd"] == pytest.approx(load.cost_usd, rel=1e-9, abs=1e-12)
    assert totals["cache_hits"] == load.hits
    assert wait_for_fleet_totals(b, load) == totals  # both replicas read the same fleet figures
    print(
        f"state primary killed: {load.requests} requests from two replicas, none failed; fleet totals "
        f"exact; {recovered_batches(fleet):g} confirmed batches found lost and applied once"
    )
    assert a.http.get("/costs").headers.get("X-Costs-Since") == since
    for service in fleet:
        events = [line.get("event") for line in service.log_lines()]
        assert "redis.state_lost" not in events
    cluster.restart(victim)  # back as a replica, for the tests after this one


def test_the_state_slot_resharded_under_load_costs_no_request_and_no_spend(
    fleet: tuple[ServiceProcess, ServiceProcess], cluster: RedisClusterProcesses, sim: Simulator
) -> None:
    """The state's slot moves to another primary key by key while two replicas write to it: clients
    meet ASK and TRYAGAIN during the move and MOVED after it; none becomes a client error, and the
    totals come out exact on the new owner. (A multi-key script whose keys are split between the two
    nodes mid-move is refused with TRYAGAIN until the move ends; redis-py gives up after 16 tries,
    counted as a command error, and that batch is sent again, once, after the move.)"""
    a, _ = fleet
    epoch_key = state_prefix_of(a) + "epoch"
    slot = cluster.key_slot(epoch_key)
    source = cluster.port_for_key(epoch_key)
    target = next(port for port in cluster.primary_ports() if port != source)

    def reshard() -> None:
        cluster.move_slot(slot, target, pause_secs=0.2)

    load = run_load(fleet, workers=6, during=reshard, after_secs=2.0)
    assert load.failures == [], load.failures[:5]
    assert cluster.port_for_key(epoch_key) == target
    totals = wait_for_fleet_totals(a, load)
    assert totals["total_requests"] == load.requests
    assert totals["total_input_tokens"] == load.input_tokens
    assert totals["total_cost_usd"] == pytest.approx(load.cost_usd, rel=1e-9, abs=1e-12)
    print(f"state slot resharded: {load.requests} requests from two replicas, none failed; totals exact")
    for service in fleet:
        page = service.http.get("/metrics").text
        assert sample_value(page, "dspy_redis_connected", role="state") == 1.0
