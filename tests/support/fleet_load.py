"""Load from several threads against a fleet of services, and the fleet's cost totals checked
against what the responses said was spent: for the Redis failover tests."""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.support.processes import ServiceProcess, wait_until


@dataclass
class LoadResult:
    """What the clients saw: each status, and the spend the successful responses reported."""

    statuses: Counter[int] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    requests: int = 0
    hits: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, response: httpx.Response | None, error: str | None = None) -> None:
        with self.lock:
            self.requests += 1
            if response is None:
                self.failures.append(error or "no response")
                return
            self.statuses[response.status_code] += 1
            if response.status_code != 200:
                self.failures.append(f"{response.status_code}: {response.text[:300]}")
                return
            meta = response.json()["metadata"]
            self.hits += bool(meta["cached"])
            self.input_tokens += meta["input_tokens"]
            self.output_tokens += meta["output_tokens"]
            self.cost_usd += meta["cost_usd"] or 0.0


def run_load(
    services: Sequence[ServiceProcess],
    *,
    workers: int = 6,
    before_secs: float = 1.5,
    after_secs: float = 2.0,
    during: Callable[[], Any] | None = None,
    model: str = "gpt-3.5-turbo",
    repeat_share: int = 3,
) -> LoadResult:
    """Requests from `workers` threads, spread over `services`, while `during` runs (it is called
    after `before_secs`; the load goes on for `after_secs` once it returns). One request in
    `repeat_share` asks a question asked before, so hits (memory and Redis) mix with misses."""
    result = LoadResult()
    stop = threading.Event()
    tag = uuid.uuid4().hex[:8]

    def worker(index: int) -> None:
        client = httpx.Client(timeout=30)
        n = 0
        while not stop.is_set():
            service = services[(index + n) % len(services)]
            question = f"load {tag} {index} {n // repeat_share if n % repeat_share == 0 else n}"
            body = {"model": model, "input": question}
            try:
                result.add(client.post(f"{service.url}/v1/predict", json=body))
            except httpx.HTTPError as exc:
                result.add(None, f"{type(exc).__name__}: {exc}")
            n += 1
        client.close()

    with ThreadPoolExecutor(workers) as pool:
        running = [pool.submit(worker, i) for i in range(workers)]
        time.sleep(before_secs)
        try:
            if during is not None:
                during()
            time.sleep(after_secs)
        finally:
            stop.set()
            for future in running:
                future.result()
    return result


@contextlib.contextmanager
def two_replicas(env: Mapping[str, str], workdir: Path) -> Iterator[tuple[ServiceProcess, ServiceProcess]]:
    """Two replicas of one deployment, started with `env` and stopped afterwards."""
    services = (ServiceProcess(env, workdir, "a"), ServiceProcess(env, workdir, "b"))
    try:
        for service in services:
            service.start()
        yield services
    finally:
        for service in services:
            service.stop()


def recovered_batches(services: Sequence[ServiceProcess]) -> float:
    """dspy_redis_batches_recovered_total summed over the fleet."""
    total = 0.0
    for service in services:
        for line in service.http.get("/metrics").text.splitlines():
            if line.startswith("dspy_redis_batches_recovered_total"):
                total += float(line.rsplit(" ", 1)[1])
    return total


def fleet_totals(service: ServiceProcess) -> dict[str, float]:
    """The service-wide /costs rows summed: requests, tokens and cost (scope must be the fleet's)."""
    response = service.http.get("/costs")
    assert response.status_code == 200, response.text
    totals: dict[str, float] = {}
    for row in response.json().values():
        for name in (
            "total_requests",
            "total_input_tokens",
            "total_output_tokens",
            "total_cost_usd",
            "cache_hits",
        ):
            totals[name] = totals.get(name, 0.0) + row[name]
    totals["fleet"] = float(response.headers.get("X-Costs-Scope", "fleet") == "fleet")
    return dict(totals)


def wait_for_fleet_totals(
    service: ServiceProcess, load: LoadResult, *, timeout: float = 30
) -> dict[str, float]:
    """Wait until the fleet totals count every request the load made and the tokens it reported;
    then check they stay there (a batch applied twice would push them past)."""
    seen: dict[str, float] = {}

    def counted() -> bool:
        seen.update(fleet_totals(service))
        return seen.get("total_requests", 0) >= load.requests - len(load.failures)

    try:
        wait_until(counted, timeout=timeout, interval=0.25, what="the fleet totals to count the load")
    except TimeoutError:
        raise AssertionError(
            f"the fleet totals never counted the load: {seen} against {load.requests} requests, "
            f"{load.input_tokens} input tokens"
        ) from None
    time.sleep(1.0)  # a doubled resend would land within a flush interval or two
    return fleet_totals(service)
