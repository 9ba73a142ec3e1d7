"""A fleet on a Sentinel-managed primary: one primary, one replica and three sentinels, all real
processes. The service finds the primary through the sentinels and follows it through a manual
failover (SENTINEL FAILOVER, which demotes the old primary while it still takes writes) and a killed
primary, with no failed request and spend counted once."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from dspy_service.redis_link import state_prefix
from tests.integration.conftest import TEST_API_KEY
from tests.support.fleet_load import recovered_batches, run_load, two_replicas, wait_for_fleet_totals
from tests.support.processes import ServiceProcess, Simulator, wait_until
from tests.support.redis_topologies import SentinelGroup

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def sentinel_group(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SentinelGroup]:
    group = SentinelGroup(tmp_path_factory.mktemp("sentinel"))
    group.start()
    yield group
    group.stop()


@pytest.fixture
def fleet(
    sentinel_group: SentinelGroup, simulator: Simulator, tmp_path: Path
) -> Iterator[tuple[ServiceProcess, ServiceProcess]]:
    env = {
        "REDIS_URL": "redis:///0",  # Sentinel mode: the URL gives only scheme, credentials and database
        "REDIS_SENTINELS": sentinel_group.sentinels,
        "REDIS_SENTINEL_MASTER": sentinel_group.master_name,
        "SERVICE_NAME": f"sentinel-{uuid.uuid4().hex[:8]}",
        "OPENAI_API_KEY": TEST_API_KEY,
        "OPENAI_BASE_URL": simulator.api_base,
        "LOG_FORMAT": "json",
        "COSTS_FLUSH_INTERVAL_SECS": "0.2",
    }
    with two_replicas(env, tmp_path) as services:
        yield services


def test_the_primary_is_found_through_the_sentinels(
    fleet: tuple[ServiceProcess, ServiceProcess], sentinel_group: SentinelGroup, sim: Simulator
) -> None:
    a, b = fleet
    question = f"sentinel question {uuid.uuid4().hex}"
    assert a.http.post("/v1/predict", json={"model": "gpt-4", "input": question}).status_code == 200
    again = b.http.post("/v1/predict", json={"model": "gpt-4", "input": question}).json()
    assert again["metadata"]["cache_level"] == "redis"
    assert sim.stats()["calls"] == 1

    def surveyed() -> bool:
        return bool(a.http.get("/health").json()["redis"]["state"]["nodes_known"] == 4)

    wait_until(surveyed, timeout=10, what="the sentinels and the primary in /health")
    health = a.http.get("/health").json()["redis"]["state"]
    assert health["mode"] == "sentinel"
    assert health["nodes_reachable"] == 4  # three sentinels and the primary
    config = a.http.get("/config").json()["redis"]["state"]
    primary = f"127.0.0.1:{sentinel_group.primary_port()}"
    assert {"address": primary, "role": "primary", "reachable": True} in config["nodes"]
    assert config["master_name"] == sentinel_group.master_name


@pytest.mark.parametrize("how", ["SENTINEL FAILOVER", "primary killed"])
def test_a_failover_under_load_costs_no_request_and_no_spend(
    how: str, fleet: tuple[ServiceProcess, ServiceProcess], sentinel_group: SentinelGroup, sim: Simulator
) -> None:
    a, b = fleet
    old = sentinel_group.primary_port()
    new: list[int] = []

    def fail_over() -> None:
        new.append(sentinel_group.failover() if how == "SENTINEL FAILOVER" else sentinel_group.kill_primary())

    load = run_load(fleet, workers=6, during=fail_over, after_secs=3.0)
    assert load.failures == [], load.failures[:5]
    assert new
    assert new[0] != old
    totals = wait_for_fleet_totals(a, load)
    assert totals["total_requests"] == load.requests
    assert totals["total_input_tokens"] == load.input_tokens
    assert totals["total_output_tokens"] == load.output_tokens
    assert totals["total_cost_usd"] == pytest.approx(load.cost_usd, rel=1e-9, abs=1e-12)
    assert wait_for_fleet_totals(b, load) == totals
    print(
        f"{how}: {load.requests} requests from two replicas, none failed; fleet totals exact; "
        f"{recovered_batches(fleet):g} confirmed batches found lost and applied once"
    )
    # The totals are on the new primary, where the sentinels send everyone now.
    row = sentinel_group.client(new[0]).hgetall(
        state_prefix(a.env["SERVICE_NAME"]) + "costs:gpt-3.5-turbo:baseline"
    )
    assert int(row["total_requests"]) == load.requests
    for service in fleet:
        events = [line.get("event") for line in service.log_lines()]
        assert "redis.state_lost" not in events
    if how == "primary killed":
        sentinel_group.restart(old)  # back as a replica of the new primary, for what follows
