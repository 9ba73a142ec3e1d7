"""Faults injected for real: a failing or hanging provider, Redis killed or frozen, SIGTERM.

Each test prints the counts it saw, so a CI log shows what the clients experienced.
"""

from __future__ import annotations

import contextlib
import json
import signal
import statistics
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.conftest import ServiceFactory, base_env
from tests.support.processes import RedisServer, ServiceProcess, Simulator, free_port, wait_until
from tests.support.redis_keys import STATE_PREFIX


def unique(text: str = "question") -> str:
    return f"{text} {uuid.uuid4().hex}"


def post(client: httpx.Client, **body: Any) -> httpx.Response:
    return client.post("/v1/predict", json={"model": "gpt-3.5-turbo", **body})


def metric(service: ServiceProcess, line_prefix: str) -> float:
    for line in service.http.get("/metrics").text.splitlines():
        if line.startswith(line_prefix + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no metric line {line_prefix}")


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server for this test alone: it gets killed."""
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()


def redis_connected(service: ServiceProcess) -> bool:
    return bool(service.http.get("/health").json()["redis_connected"])


def wait_for_redis(service: ServiceProcess) -> None:
    wait_until(lambda: redis_connected(service), timeout=15, what="the service to see Redis again")


@contextlib.contextmanager
def frozen(redis: RedisServer) -> Iterator[None]:
    """Redis stopped (SIGSTOP) for the block: its sockets stay open and nothing answers."""
    assert redis.process is not None
    redis.process.send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        redis.process.send_signal(signal.SIGCONT)


def test_breaker_opens_refuses_fast_and_recovers(service_factory: ServiceFactory, sim: Simulator) -> None:
    """500s open the breaker; 100 requests are then refused at once without reaching the provider;
    after the open time and a healed provider, the success threshold closes it."""
    service = service_factory(CIRCUIT_BREAKER_FAILURE_THRESHOLD="5", CIRCUIT_BREAKER_TIMEOUT_SECS="2")
    sim.configure(error_rate=1.0, error_status=500)
    statuses = [post(service.http, input=unique()).status_code for _ in range(2)]
    # 3 calls each (1 + max_retries 2): the 5th failure opens it during the second request's retries.
    assert statuses == [502, 503]
    assert sim.stats()["calls"] == 5
    assert service.http.get("/health").json()["circuit_breakers"]["gpt-3.5-turbo"] == "open"
    assert metric(service, 'dspy_circuit_breaker_state{model="gpt-3.5-turbo"}') == 1
    calls_before = sim.stats()["calls"]

    latencies, refused = [], Counter[str]()
    for _ in range(100):
        started = time.perf_counter()
        response = post(service.http, input=unique())
        latencies.append(time.perf_counter() - started)
        refused[f"{response.status_code} {response.json()['error']['type']}"] += 1
        assert int(response.headers["retry-after"]) >= 1
    print(
        f"\nopen breaker: {dict(refused)}; latency p50 {statistics.median(latencies) * 1000:.1f} ms, "
        f"max {max(latencies) * 1000:.1f} ms; provider calls during: {sim.stats()['calls'] - calls_before}"
    )
    assert refused == {"503 circuit_open": 100}
    assert sim.stats()["calls"] == calls_before
    assert max(latencies) < 1.0  # a guard against waiting on the provider, not a timing goal

    # Other models are unaffected.
    assert service.http.get("/health").json()["circuit_breakers"]["gpt-4"] == "closed"

    sim.configure(error_rate=0.0)
    time.sleep(2.1)
    assert service.http.get("/health").json()["circuit_breakers"]["gpt-3.5-turbo"] == "half_open"
    assert post(service.http, input=unique()).status_code == 200
    assert service.http.get("/health").json()["circuit_breakers"]["gpt-3.5-turbo"] == "half_open"
    assert post(service.http, input=unique()).status_code == 200
    assert service.http.get("/health").json()["circuit_breakers"]["gpt-3.5-turbo"] == "closed"
    assert metric(service, 'dspy_circuit_breaker_state{model="gpt-3.5-turbo"}') == 0
    transitions = [
        (line["old"], line["new"])
        for line in service.log_lines()
        if line.get("event") == "breaker.transition"
    ]
    assert transitions == [("closed", "open"), ("open", "half_open"), ("half_open", "closed")]


def test_hanging_provider_ends_every_request_by_its_deadline(
    service_factory: ServiceFactory, sim: Simulator
) -> None:
    """With the provider hanging, every request ends with 504 at its deadline; none hangs."""
    service = service_factory(REQUEST_TIMEOUT_SECS="1")
    sim.configure(hang=True)

    def one(_: int) -> tuple[int, str, float]:
        with httpx.Client(base_url=service.url, timeout=10) as client:
            started = time.perf_counter()
            response = post(client, input=unique(), variant="cot")
            return response.status_code, response.json()["error"]["type"], time.perf_counter() - started

    with ThreadPoolExecutor(max_workers=10) as pool:
        results = list(pool.map(one, range(10)))
    durations = [duration for _, _, duration in results]
    print(
        f"\nhanging provider: {Counter((s, t) for s, t, _ in results)}; "
        f"durations {min(durations):.2f}-{max(durations):.2f} s"
    )
    assert all((status, kind) == (504, "provider_timeout") for status, kind, _ in results)
    assert max(durations) < 5  # deadline 1 s; far below the client's 10 s


def test_redis_killed_under_load_costs_no_prediction(
    service_factory: ServiceFactory, sim: Simulator, own_redis: RedisServer
) -> None:
    """600 requests while Redis is killed and restarted: zero failures; afterwards Redis hits return
    and the cost totals kept during the outage reach Redis, without restarting the service."""
    service = service_factory(REDIS_URL=own_redis.url, MEMORY_CACHE_SIZE="0", REDIS_TIMEOUT_SECS="0.2")
    questions = [unique() for _ in range(40)]
    outcomes: Counter[str] = Counter()
    lock = threading.Lock()
    sent = 0  # requests begun
    done = 0  # requests answered
    sent_at_kill = 0

    def one(i: int) -> None:
        nonlocal sent, done
        with lock:
            sent += 1
        with httpx.Client(base_url=service.url, timeout=30) as client:
            response = post(client, input=questions[i % len(questions)])
        level = (
            response.json().get("metadata", {}).get("cache_level") if response.status_code == 200 else None
        )
        with lock:
            done += 1
            outcomes[f"{response.status_code} {level}"] += 1

    def chaos() -> None:
        nonlocal sent_at_kill
        wait_until(lambda: done >= 150, timeout=60, what="150 requests")
        own_redis.kill()
        with lock:
            sent_at_kill = sent
        wait_until(lambda: done >= 400, timeout=60, what="400 requests")
        own_redis.start()

    chaos_thread = threading.Thread(target=chaos)
    chaos_thread.start()
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(one, range(600)))
    chaos_thread.join(timeout=60)
    print(f"\nRedis killed under load: {dict(outcomes)}")
    assert sum(count for key, count in outcomes.items() if key.startswith("200")) == 600

    wait_for_redis(service)
    question = unique()
    post(service.http, input=question)
    assert post(service.http, input=question).json()["metadata"]["cache_level"] == "redis"

    def fleet_total() -> int:
        response = service.http.get("/costs")
        if response.headers.get("x-costs-scope") != "fleet":
            return -1
        return int(response.json()["gpt-3.5-turbo:baseline"]["total_requests"])

    # The killed Redis lost what it held (including totals flushed just before the kill for requests
    # still on their way back to the client), so the bound counts only requests begun after the kill:
    # each was answered and recorded while Redis was down, kept, and flushed when it came back. Nothing
    # may be counted twice.
    begun_after_kill = 600 - sent_at_kill + 2
    try:
        wait_until(
            lambda: fleet_total() >= begun_after_kill, timeout=10, what="pending cost totals to be flushed"
        )
    finally:
        print(
            f"fleet total after the outage: {fleet_total()} requests "
            f"(>= {begun_after_kill} begun after the kill)"
        )
    assert fleet_total() <= 602


def test_frozen_redis_delays_no_request_beyond_its_timeout(
    service_factory: ServiceFactory, sim: Simulator, own_redis: RedisServer
) -> None:
    """A Redis that stops answering (SIGSTOP) costs a request at most the Redis timeout, then nothing."""
    service = service_factory(REDIS_URL=own_redis.url, REDIS_TIMEOUT_SECS="0.2")
    with frozen(own_redis):
        durations = []
        for _ in range(20):
            started = time.perf_counter()
            response = post(service.http, input=unique())
            durations.append(time.perf_counter() - started)
            assert response.status_code == 200
        print(
            f"\nfrozen Redis: first {durations[0] * 1000:.0f} ms, then max {max(durations[1:]) * 1000:.0f} ms"
        )
        assert not redis_connected(service)
        assert max(durations[1:]) < 0.5  # no Redis wait once it is known to be down
    wait_for_redis(service)


def test_a_flush_lost_to_a_frozen_redis_is_not_counted_twice(
    service_factory: ServiceFactory, sim: Simulator, own_redis: RedisServer
) -> None:
    """Cost totals sent to a Redis that froze mid-flush are kept and sent again once it answers; the
    frozen Redis still applies the first copy when it thaws, and the totals count each request once."""
    service = service_factory(
        REDIS_URL=own_redis.url, REDIS_TIMEOUT_SECS="0.2", COSTS_FLUSH_INTERVAL_SECS="3600"
    )
    for _ in range(3):
        assert post(service.http, input=unique()).status_code == 200
    with frozen(own_redis):
        # /costs flushes first: the flush reaches the frozen Redis's socket, times out, and is kept.
        during = service.http.get("/costs")
        assert during.headers["x-costs-scope"] == "replica"
    wait_for_redis(service)
    thawed = service.http.get("/costs")
    assert thawed.headers["x-costs-scope"] == "fleet"
    totals = thawed.json()["gpt-3.5-turbo:baseline"]
    print(f"\nflush lost to a frozen Redis: fleet totals {totals['total_requests']} requests")
    assert totals["total_requests"] == 3
    assert totals["total_cost_usd"] == during.json()["gpt-3.5-turbo:baseline"]["total_cost_usd"]


BUDGETED_MODELS_YAML = """
models:
  gpt-3.5-turbo:
    name: openai/gpt-3.5-turbo
    cost_per_1k_input_tokens: 1.0
    cost_per_1k_output_tokens: 1.0
variants:
  baseline: {signature: "question -> answer"}
budgets:
  models: {gpt-3.5-turbo: {daily_usd: 1000}}
"""


def test_spend_sent_to_a_redis_that_froze_counts_once_against_the_budget(
    service_factory: ServiceFactory, sim: Simulator, own_redis: RedisServer, tmp_path: Path
) -> None:
    """A call's spend, sent to a Redis that froze while the call was upstream, is kept and resent once
    Redis answers; the day's spend in Redis is that call's cost, not twice it."""
    models = tmp_path / "budgeted.yaml"
    models.write_text(BUDGETED_MODELS_YAML)
    service = service_factory(
        REDIS_URL=own_redis.url,
        REDIS_TIMEOUT_SECS="0.2",
        COSTS_FLUSH_INTERVAL_SECS="3600",
        MODELS_CONFIG=str(models),
    )
    sim.configure(latency_ms=1000)
    with ThreadPoolExecutor(max_workers=1) as pool:
        # No cache, so the only Redis call before the provider is the budget check.
        answer = pool.submit(post, service.http, input=unique(), use_cache=False)
        wait_until(lambda: sim.stats()["calls"] == 1, timeout=10, what="the call to reach the provider")
        time.sleep(0.7)
        with frozen(own_redis):
            response = answer.result(timeout=10)
            assert response.status_code == 200
            # The spend went to the frozen Redis right after the call, and its reply never came.
            wait_until(
                lambda: not redis_connected(service), timeout=5, what="the service to find Redis frozen"
            )
    cost = response.json()["metadata"]["cost_usd"]
    assert cost > 0
    day = time.strftime("%Y-%m-%d", time.gmtime())
    key = f"{STATE_PREFIX}spend:{day}:model:gpt-3.5-turbo"

    def spent_in_redis() -> float:
        return float(own_redis.command("GET", key).split(b"\r\n")[1] or 0)

    wait_for_redis(service)
    wait_until(lambda: spent_in_redis() > 0, timeout=5, what="the spend to reach Redis")
    time.sleep(0.5)  # room for a second copy to land, were one sent
    print(f"\nspend sent to a frozen Redis: {spent_in_redis()} USD in Redis for a call costing {cost}")
    assert spent_in_redis() == pytest.approx(cost, rel=1e-9)


def test_sigterm_lets_in_flight_requests_finish(service_factory: ServiceFactory, sim: Simulator) -> None:
    """SIGTERM during 20 slow requests: all 20 finish with 200, /ready says 503 meanwhile, exit code 0."""
    service = service_factory(SHUTDOWN_GRACE_SECS="20")
    sim.configure(latency_ms=2000)
    results: list[int] = []

    def one(_: int) -> None:
        with httpx.Client(base_url=service.url, timeout=30) as client:
            results.append(post(client, input=unique(), use_cache=False).status_code)

    pool = ThreadPoolExecutor(max_workers=20)
    futures = [pool.submit(one, i) for i in range(20)]
    wait_until(lambda: metric(service, "dspy_active_predictions") == 20, timeout=10, what="20 in flight")
    service.signal(signal.SIGTERM)
    ready_statuses = []
    for _ in range(5):
        ready_statuses.append(service.http.get("/ready").status_code)
        time.sleep(0.1)
    for future in futures:
        future.result(timeout=30)
    pool.shutdown()
    exit_code = service.wait(timeout=30)
    print(
        f"\nSIGTERM: request statuses {Counter(results)}, /ready during drain {Counter(ready_statuses)}, "
        f"exit code {exit_code}"
    )
    assert results == [200] * 20
    assert set(ready_statuses) == {503}
    assert exit_code == 0
    events = [line.get("event") for line in service.log_lines()]
    assert "service.draining" in events
    assert "service.stopped" in events


def test_a_request_cut_off_by_shutdown_gets_a_json_error_and_its_spend_is_counted(
    service_factory: ServiceFactory, sim: Simulator, redis_server: RedisServer
) -> None:
    """A request still running when the grace period ends: the client gets `503 shutting_down` as
    JSON (not a plain-text 500), and its cut-off provider call reaches the fleet's totals before the
    process exits (it never did)."""

    def unmetered_in_redis() -> int:
        raw = redis_server.command("HGET", STATE_PREFIX + "costs:gpt-4:baseline", "unmetered_calls")
        return int(raw.split(b"\r\n")[1]) if raw.startswith(b"$") and not raw.startswith(b"$-1") else 0

    before = unmetered_in_redis()
    service = service_factory(SHUTDOWN_GRACE_SECS="0.5", REQUEST_TIMEOUT_SECS="60")
    sim.configure(latency_ms=20_000)
    name = f"cut-{uuid.uuid4().hex[:8]}"
    answers: list[httpx.Response] = []

    def one() -> None:
        with httpx.Client(base_url=service.url, timeout=30) as client:
            answers.append(client.post("/v1/predict", json={"model": "gpt-4", "input": name}))

    thread = threading.Thread(target=one)
    thread.start()
    wait_until(lambda: metric(service, "dspy_active_predictions") == 1, timeout=10, what="1 in flight")
    service.signal(signal.SIGTERM)
    thread.join(timeout=30)
    assert service.wait(timeout=30) == 0
    [answer] = answers
    print(f"\ncut off by shutdown: {answer.status_code} {answer.text[:100]}")
    assert answer.status_code == 503
    assert answer.json()["error"]["type"] == "shutting_down"
    assert answer.json()["error"]["request_id"] == answer.headers["x-request-id"]
    assert unmetered_in_redis() == before + 1


def test_fallback_answers_when_the_primary_is_down(
    service_factory: ServiceFactory, sim: Simulator, tmp_path: Path
) -> None:
    """Primary unreachable: the fallback answers and the response names it; once the primary's breaker
    is open the fallback answers without trying the primary."""
    config = {
        "models": {
            "primary": {
                "name": "openai/gpt-4",
                "api_base": f"http://127.0.0.1:{free_port()}/v1",
                "max_retries": 0,
                "fallbacks": ["backup"],
                "cost_per_1k_input_tokens": 0.03,
                "cost_per_1k_output_tokens": 0.06,
            },
            "backup": {
                "name": "openai/gpt-3.5-turbo",
                "cost_per_1k_input_tokens": 0.0005,
                "cost_per_1k_output_tokens": 0.0015,
            },
        },
        "variants": {"baseline": {"signature": "question -> answer"}},
    }
    models = tmp_path / "models.yaml"
    models.write_text(json.dumps(config))
    service = service_factory(MODELS_CONFIG=str(models), CIRCUIT_BREAKER_FAILURE_THRESHOLD="2")
    served = []
    for _ in range(4):
        response = service.http.post("/v1/predict", json={"model": "primary", "input": unique()})
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["model"] == "primary"
        served.append(body["model_served"])
    print(f"\nfallback: served by {Counter(served)}")
    assert served == ["backup"] * 4
    assert service.http.get("/health").json()["circuit_breakers"]["primary"] == "open"
    assert sim.stats()["by_model"] == {"gpt-3.5-turbo": 4}


def test_too_many_in_flight_are_refused_quickly(service_factory: ServiceFactory, sim: Simulator) -> None:
    """Beyond MAX_IN_FLIGHT upstream calls, new misses get 503 overloaded at once instead of queueing."""
    service = service_factory(MAX_IN_FLIGHT="3")
    sim.configure(latency_ms=1500)

    def one(_: int) -> int:
        with httpx.Client(base_url=service.url, timeout=30) as client:
            return post(client, input=unique(), use_cache=False).status_code

    with ThreadPoolExecutor(max_workers=8) as pool:
        statuses = Counter(pool.map(one, range(8)))
    print(f"\nMAX_IN_FLIGHT=3 with 8 at once: {dict(statuses)}")
    assert statuses == {200: 3, 503: 5}


def test_soak_memory_stays_flat(
    service_factory: ServiceFactory, sim: Simulator, own_redis: RedisServer, simulator: Simulator
) -> None:
    """20,000 mixed requests (hits, misses, errors): resident memory at the end within 10% of its value
    after the first 2,000."""
    env = {**base_env(own_redis, simulator), "MEMORY_CACHE_SIZE": "500", "LOG_LEVEL": "warn"}
    service = service_factory(**env)
    assert service.process is not None
    pid = service.process.pid

    def rss_kib() -> int:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")

    pool_inputs = [unique() for _ in range(300)]
    counts: Counter[int] = Counter()

    def batch(start: int, count: int) -> None:
        def one(i: int) -> int:
            kind = i % 10
            if kind == 0:
                return post(client, input=unique(), use_cache=False).status_code  # miss
            if kind == 1:
                return client.post("/v1/predict", json={"model": "nope", "input": "x"}).status_code  # 404
            if kind == 2:
                return post(client, input=unique()).status_code  # miss, stored (evicts)
            return post(client, input=pool_inputs[i % len(pool_inputs)]).status_code  # mostly hits

        with (
            httpx.Client(base_url=service.url, timeout=30) as client,
            ThreadPoolExecutor(max_workers=8) as pool,
        ):
            counts.update(pool.map(one, range(start, start + count)))

    batch(0, 2000)
    baseline = rss_kib()
    for start in range(2000, 20000, 3000):
        batch(start, 3000)
    final = rss_kib()
    print(
        f"\nsoak: {dict(counts)}; RSS after 2,000: {baseline / 1024:.1f} MiB, "
        f"after 20,000: {final / 1024:.1f} MiB "
        f"({(final - baseline) / baseline:+.1%})"
    )
    assert sum(counts.values()) == 20000
    assert counts[200] == 18000
    assert counts[404] == 2000
    assert final <= baseline * 1.10


def test_retry_honours_the_providers_retry_after(service_factory: ServiceFactory, sim: Simulator) -> None:
    """A 429 with Retry-After: 1 is retried after at least that long, and the request succeeds."""
    service = service_factory()
    sim.configure(fail_next=1, error_status=429, retry_after=1)
    started = time.perf_counter()
    response = post(service.http, input=unique())
    waited = time.perf_counter() - started
    print(
        f"\n429 then success: status {response.status_code} after {waited:.2f} s, "
        f"calls {sim.stats()['calls']}"
    )
    assert response.status_code == 200
    assert sim.stats()["calls"] == 2
    assert waited >= 1.0


def test_no_retry_wait_outlives_the_deadline(service_factory: ServiceFactory, sim: Simulator) -> None:
    """When the provider asks for a wait longer than the request has left, the request ends at once."""
    service = service_factory(REQUEST_TIMEOUT_SECS="2")
    sim.configure(fail_next=1, error_status=429, retry_after=10)
    started = time.perf_counter()
    response = post(service.http, input=unique())
    waited = time.perf_counter() - started
    print(f"\n429 asking 10 s with a 2 s deadline: {response.status_code} after {waited:.2f} s")
    assert response.status_code == 502
    assert response.json()["error"]["type"] == "provider_error"
    assert "429" in response.json()["error"]["message"]
    assert sim.stats()["calls"] == 1
    assert waited < 2.0
