"""`WORKERS=2`: two service processes behind one port, metrics added up across them, a dead worker
replaced, and SIGTERM draining both before the supervisor exits 0."""

from __future__ import annotations

import os
import re
import signal
import uuid

import httpx

from tests.integration.conftest import ServiceFactory
from tests.support.processes import ServiceProcess, Simulator, wait_until

_BREAKER_SERIES = re.compile(r'^dspy_circuit_breaker_state\{model="gpt-4",pid="(\d+)"\} ', re.MULTILINE)


def scrape(service: ServiceProcess) -> str:
    with httpx.Client(base_url=service.url, timeout=10) as client:  # a new connection: any worker
        return client.get("/metrics").text


def worker_pids(service: ServiceProcess) -> set[int]:
    """Workers alive, as the merged metrics see them (each worker's breaker gauges carry its pid)."""
    try:
        return {int(pid) for pid in _BREAKER_SERIES.findall(scrape(service))}
    except httpx.TransportError:  # a connection the killed worker had accepted
        return set()


def total(service: ServiceProcess, name: str, **labels: str) -> float:
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    found = re.search(rf"^{name}\{{{re.escape(wanted)}\}} ([0-9.e+]+)$", scrape(service), re.M)
    return float(found[1]) if found else 0.0


def predict_on_new_connection(service: ServiceProcess, body: dict[str, str]) -> dict[str, object]:
    # A connection of its own each time, so the kernel may hand it to either worker.
    with httpx.Client(base_url=service.url, timeout=30) as client:
        response = client.post("/v1/predict", json=body)
    assert response.status_code == 200, response.text
    result: dict[str, object] = response.json()
    return result


def test_two_workers_share_the_port_and_their_metrics(
    service_factory: ServiceFactory, sim: Simulator
) -> None:
    service = service_factory("workers", WORKERS="2")
    wait_until(lambda: len(worker_pids(service)) == 2, timeout=60, what="both workers to be up")
    pids = worker_pids(service)
    assert service.process is not None
    assert service.process.pid not in pids  # the supervisor serves nothing itself

    # The same question on 40 new connections: one provider call (the first), then the worker that
    # made it answers from memory and the other finds the answer in Redis once, then in its memory.
    body = {"model": "gpt-4", "input": f"shared {uuid.uuid4().hex}"}
    levels = [predict_on_new_connection(service, body)["metadata"]["cache_level"] for _ in range(40)]  # type: ignore[index]
    print(f"cache levels over 40 requests: { {level: levels.count(level) for level in set(levels)} }")
    assert levels[0] is None
    assert "redis" in levels, "every request went to the same worker"
    assert sim.stats()["calls"] == 1

    # Whichever worker answers /metrics, it reports all 40 predictions (and the two breakers' pids).
    for _ in range(6):
        metrics = scrape(service)
        assert 'dspy_predictions_total{model="gpt-4",status="success",variant="baseline"} 40.0' in metrics
        assert "dspy_active_predictions 0.0" in metrics

    # A worker that dies is replaced, and its gauges leave the scrape with it.
    victim = min(pids)
    os.kill(victim, signal.SIGKILL)
    wait_until(
        lambda: victim not in worker_pids(service) and len(worker_pids(service)) == 2,
        timeout=60,
        what="the dead worker to be replaced",
    )
    print(f"workers {sorted(pids)} -> {sorted(worker_pids(service))} after killing {victim}")
    for _ in range(10):
        predict_on_new_connection(service, body)
    assert total(service, "dspy_predictions_total", model="gpt-4", status="success", variant="baseline") == 50

    # SIGTERM: both workers drain and stop, and the supervisor exits 0.
    current = worker_pids(service)
    service.signal(signal.SIGTERM)
    assert service.wait(timeout=40) == 0
    wait_until(lambda: not any(alive(pid) for pid in current), timeout=10, what="the workers to exit")
    drained = [line for line in service.log_lines() if line.get("event") == "service.drained"]
    assert len(drained) == 2


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
