"""Fixtures that start real processes: redis-server, the simulator, and the service."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.processes import RedisServer, ServiceProcess, Simulator

TEST_API_KEY = "sk-test-never-log-me-4242"

ServiceFactory = Callable[..., ServiceProcess]


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def simulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Simulator]:
    sim = Simulator(tmp_path_factory.mktemp("simulator") / "simulator.log")
    sim.start()
    yield sim
    sim.stop()


@pytest.fixture
def sim(simulator: Simulator) -> Iterator[Simulator]:
    """The shared simulator, with default knobs and zeroed counts for this test."""
    simulator.reset()
    yield simulator
    simulator.reset()


def base_env(redis: RedisServer, simulator: Simulator) -> dict[str, str]:
    return {
        "REDIS_URL": redis.url,
        "OPENAI_API_KEY": TEST_API_KEY,
        "OPENAI_BASE_URL": simulator.api_base,
        "LOG_FORMAT": "json",
        "COSTS_FLUSH_INTERVAL_SECS": "0.2",
    }


@pytest.fixture
def service_factory(
    redis_server: RedisServer, simulator: Simulator, tmp_path: Path
) -> Iterator[ServiceFactory]:
    """Start services with the test's own environment on top of the shared Redis and simulator."""
    started: list[ServiceProcess] = []

    def start(name: str = "service", wait: bool = True, **env: str) -> ServiceProcess:
        service = ServiceProcess({**base_env(redis_server, simulator), **env}, tmp_path, name)
        started.append(service)
        service.start(wait=wait)
        return service

    yield start
    for service in started:
        service.stop()


@pytest.fixture(scope="module")
def shared_service(
    redis_server: RedisServer, simulator: Simulator, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServiceProcess]:
    """One service for a whole test module; tests keep apart by using inputs of their own."""
    service = ServiceProcess(base_env(redis_server, simulator), tmp_path_factory.mktemp("shared"), "shared")
    service.start()
    yield service
    service.stop()
