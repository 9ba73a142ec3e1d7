"""Who may see a cached answer, and how much the cache may hold: tenants kept apart by default,
the memory level bounded in bytes, oversized answers cached nowhere, sampled requests by policy."""

from __future__ import annotations

import concurrent.futures
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

from tests.integration.conftest import ServiceFactory
from tests.support.metrics_text import sample_value
from tests.support.processes import ServiceProcess, Simulator

KEY_A = "sk-tenant-a-0123456789abcdef"
KEY_B = "sk-tenant-b-0123456789abcdef"
TENANT_KEYS = f"{KEY_A} alpha,{KEY_B} beta"
KEY_OPS = "sk-operator-0123456789abcdef"


def ask(service: ServiceProcess, key: str | None, question: str, **extra: Any) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    body = {"model": "gpt-3.5-turbo", "input": question, **extra}
    return service.http.post("/v1/predict", json=body, headers=headers)


def test_with_api_keys_tenants_do_not_share_cached_answers(
    service_factory: ServiceFactory, sim: Simulator
) -> None:
    """Tenant B asking what tenant A asked gets its own answer (a miss, its own cost), not A's
    cached one; within a tenant the answer is a hit. Nothing tells B that A asked."""
    service = service_factory(API_KEYS=TENANT_KEYS)
    question = f"What did alpha ask? {uuid.uuid4().hex}"
    first = ask(service, KEY_A, question).json()["metadata"]
    again = ask(service, KEY_A, question).json()["metadata"]
    other = ask(service, KEY_B, question).json()["metadata"]
    assert first["cache_level"] is None
    assert again["cache_level"] == "memory"
    assert other["cache_level"] is None
    assert other["cost_usd"] > 0
    assert other["cost_saved_usd"] is None
    assert sim.stats()["calls"] == 2


def test_identical_requests_of_two_tenants_at_once_are_not_coalesced(
    service_factory: ServiceFactory, sim: Simulator
) -> None:
    """Coalescing stays within a tenant: simultaneous identical misses of two tenants make two calls."""
    service = service_factory(API_KEYS=TENANT_KEYS)
    sim.configure(latency_ms=300)
    question = f"Same time? {uuid.uuid4().hex}"
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        answers = list(pool.map(lambda key: ask(service, key, question), [KEY_A, KEY_B, KEY_A, KEY_B]))
    assert all(a.status_code == 200 for a in answers)
    assert sim.stats()["calls"] == 2
    coalesced = [a.json()["metadata"]["coalesced"] for a in answers]
    assert sorted(coalesced) == [False, False, True, True]


def test_cache_scope_global_shares_answers_across_tenants(
    service_factory: ServiceFactory, sim: Simulator
) -> None:
    """CACHE_SCOPE=global is the documented opt-in: every tenant shares the cache."""
    service = service_factory(API_KEYS=TENANT_KEYS, CACHE_SCOPE="global", ADMIN_API_KEYS=KEY_OPS)
    question = f"Shared? {uuid.uuid4().hex}"
    assert ask(service, KEY_A, question).json()["metadata"]["cache_level"] is None
    assert ask(service, KEY_B, question).json()["metadata"]["cache_level"] == "memory"
    assert service.http.get("/config", headers={"Authorization": f"Bearer {KEY_OPS}"}).json()["service"][
        "cache_scope"
    ] == ("global")


def test_an_answer_over_the_entry_limit_is_cached_in_neither_level(
    service_factory: ServiceFactory, sim: Simulator
) -> None:
    """An answer larger than CACHE_MAX_ENTRY_BYTES is served but stored nowhere, and counted."""
    service = service_factory(CACHE_MAX_ENTRY_BYTES="20000")
    sim.configure(answer_pad_chars=30_000)
    question = f"Big? {uuid.uuid4().hex}"
    for _ in range(2):
        response = ask(service, None, question)
        assert response.status_code == 200
        assert len(response.json()["output"]) > 30_000
        assert response.json()["metadata"]["cache_level"] is None
    assert sim.stats()["calls"] == 2
    metrics = service.http.get("/metrics").text
    assert sample_value(metrics, "dspy_cache_skipped_total", reason="too_large") == 2


def test_sampled_requests_follow_the_models_cache_sampled_policy(
    service_factory: ServiceFactory, sim: Simulator, tmp_path: Path
) -> None:
    """With cache_sampled: false, a request with temperature > 0 and no seed always gets a fresh
    call; with a seed, or at temperature 0, it is cached as usual. The default model caches all."""
    models = tmp_path / "models.yaml"
    models.write_text(
        "models:\n"
        "  fresh: {name: openai/gpt-3.5-turbo, cache_sampled: false,"
        " cost_per_1k_input_tokens: 0.001, cost_per_1k_output_tokens: 0.001}\n"
        "  gpt-3.5-turbo: {name: openai/gpt-3.5-turbo}\n"
        "variants:\n  baseline: {signature: 'question -> answer'}\n",
        encoding="utf-8",
    )
    service = service_factory(MODELS_CONFIG=str(models))

    def levels(model: str, parameters: dict[str, Any]) -> list[str | None]:
        question = f"Sample? {uuid.uuid4().hex}"
        body = {"model": model, "input": question, "parameters": parameters}
        return [
            service.http.post("/v1/predict", json=body).json()["metadata"]["cache_level"] for _ in range(2)
        ]

    assert levels("fresh", {"temperature": 0.7}) == [None, None]
    assert levels("fresh", {"temperature": 0.7, "seed": 3}) == [None, "memory"]
    assert levels("fresh", {}) == [None, "memory"]
    assert levels("gpt-3.5-turbo", {"temperature": 0.7}) == [None, "memory"]


def test_memory_stays_bounded_by_bytes_with_many_large_answers(
    service_factory: ServiceFactory, sim: Simulator
) -> None:
    """2,000 distinct answers of about 100 kB each (200 MB in all) fit nowhere near the process:
    with MEMORY_CACHE_MAX_BYTES at 32 MB the resident memory grows by about that bound, not by 200 MB."""
    service = service_factory(MEMORY_CACHE_MAX_BYTES=str(32 * 1024 * 1024), REDIS_URL="redis://127.0.0.1:1")
    assert service.process is not None
    pid = service.process.pid

    def rss_mb() -> float:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise AssertionError("no VmRSS")

    sim.configure(answer_pad_chars=100_000)
    ask(service, None, "warm up")
    before = rss_mb()
    started = time.monotonic()
    run = uuid.uuid4().hex

    def one(n: int) -> int:
        return ask(service, None, f"answer {n} of {run}").status_code

    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        statuses = list(pool.map(one, range(2000)))
    after = rss_mb()
    took = time.monotonic() - started
    print(f"2,000 answers of ~100 kB in {took:.1f} s: RSS {before:.0f} MB -> {after:.0f} MB (bound 32 MB)")
    assert statuses == [200] * 2000
    assert after - before < 32 + 40  # the bound, plus what the allocator keeps of freed answers


def test_lm_options_written_differently_share_one_key(
    service_factory: ServiceFactory, sim: Simulator
) -> None:
    """`max_tokens: 5` and `5.0`, `temperature: 0` and `0.0`, are one request: the second is a hit."""
    service = service_factory()
    question = f"normalised {uuid.uuid4().hex}"
    first = {"model": "gpt-4", "input": question, "parameters": {"max_tokens": 50, "temperature": 0}}
    second = {"model": "gpt-4", "input": question, "parameters": {"temperature": 0.0, "max_tokens": 50.0}}
    assert service.http.post("/v1/predict", json=first).json()["metadata"]["cache_level"] is None
    assert service.http.post("/v1/predict", json=second).json()["metadata"]["cache_level"] == "memory"
