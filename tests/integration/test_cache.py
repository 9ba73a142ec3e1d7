"""The two-level cache as a client sees it: levels, TTLs, key isolation, coalescing."""

from __future__ import annotations

import json
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

from tests.integration.conftest import ServiceFactory
from tests.support.processes import RedisServer, ServiceProcess, Simulator
from tests.support.redis_keys import DEFAULT_PREFIX


def unique(text: str = "question") -> str:
    return f"{text} {uuid.uuid4().hex}"


def ask(service: ServiceProcess, **body: Any) -> dict[str, Any]:
    response = service.http.post("/v1/predict", json={"model": "gpt-4", **body})
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


def test_second_identical_request_is_a_memory_hit(shared_service: ServiceProcess, sim: Simulator) -> None:
    """The same request twice: one provider call, the second answered from memory at no cost."""
    question = unique()
    first = ask(shared_service, input=question)
    second = ask(shared_service, input=question)
    assert sim.stats()["calls"] == 1
    assert first["metadata"]["cache_level"] is None
    assert second["metadata"]["cached"] is True
    assert second["metadata"]["cache_level"] == "memory"
    assert second["output"] == first["output"]
    assert second["metadata"]["cost_usd"] == 0
    assert second["metadata"]["cost_saved_usd"] == first["metadata"]["cost_usd"]


def test_use_cache_false_skips_read_and_write(shared_service: ServiceProcess, sim: Simulator) -> None:
    """use_cache=false always calls the provider (so DSPy's own cache is off too) and stores nothing."""
    question = unique()
    for _ in range(2):
        assert ask(shared_service, input=question, use_cache=False)["metadata"]["cache_level"] is None
    assert sim.stats()["calls"] == 2
    assert ask(shared_service, input=question)["metadata"]["cache_level"] is None
    assert sim.stats()["calls"] == 3


def test_key_separates_variant_model_and_parameters(shared_service: ServiceProcess, sim: Simulator) -> None:
    """Requests that differ in model, variant, an LM option or its value never share an entry."""
    question = unique()
    requests: list[dict[str, Any]] = [
        {"input": question},
        {"input": question, "variant": "cot"},
        {"input": question, "model": "gpt-3.5-turbo"},
        {"input": question, "parameters": {"temperature": 0.5}},
        {"input": question, "parameters": {"temperature": 0.7}},
        {"input": question, "parameters": {"temperature": 0.7, "max_tokens": 100}},
    ]
    for body in requests:
        assert ask(shared_service, **body)["metadata"]["cache_level"] is None, body
    assert sim.stats()["calls"] == len(requests)
    # ...and parameter order does not matter: the same options in another order is a hit.
    again = ask(shared_service, input=question, parameters={"max_tokens": 100, "temperature": 0.7})
    assert again["metadata"]["cache_level"] == "memory"
    assert sim.stats()["calls"] == len(requests)


def test_redis_hit_when_memory_level_is_off(service_factory: ServiceFactory, sim: Simulator) -> None:
    """With no memory level, a repeat is a Redis hit."""
    service = service_factory(MEMORY_CACHE_SIZE="0")
    question = unique()
    ask(service, input=question)
    hit = ask(service, input=question)
    assert hit["metadata"]["cache_level"] == "redis"
    assert sim.stats()["calls"] == 1


def test_redis_hit_is_copied_into_memory(service_factory: ServiceFactory, sim: Simulator) -> None:
    """A replica that finds an answer in Redis keeps it in memory: the third request is a memory hit."""
    first = service_factory(name="a")
    second = service_factory(name="b")
    question = unique()
    ask(first, input=question)
    assert ask(second, input=question)["metadata"]["cache_level"] == "redis"
    assert ask(second, input=question)["metadata"]["cache_level"] == "memory"
    assert sim.stats()["calls"] == 1


def test_entries_expire_after_their_ttl(service_factory: ServiceFactory, sim: Simulator) -> None:
    """After both TTLs pass, the same request goes to the provider again."""
    service = service_factory(MEMORY_CACHE_TTL_SECS="1", REDIS_CACHE_TTL_SECS="1")
    question = unique()
    ask(service, input=question)
    assert ask(service, input=question)["metadata"]["cache_level"] == "memory"
    time.sleep(1.3)
    assert ask(service, input=question)["metadata"]["cache_level"] is None
    assert sim.stats()["calls"] == 2


def test_memory_ttl_shorter_than_redis_ttl_falls_back_to_redis(
    service_factory: ServiceFactory, sim: Simulator
) -> None:
    """When only the memory entry has expired, the answer comes from Redis."""
    service = service_factory(MEMORY_CACHE_TTL_SECS="0.5", REDIS_CACHE_TTL_SECS="60")
    question = unique()
    ask(service, input=question)
    time.sleep(0.8)
    assert ask(service, input=question)["metadata"]["cache_level"] == "redis"
    assert sim.stats()["calls"] == 1


def test_keys_live_under_one_versioned_prefix(
    shared_service: ServiceProcess, redis_server: RedisServer, sim: Simulator
) -> None:
    """Cache entries in Redis are under `dspy-service:v1:<SERVICE_NAME>:cache:` and carry a TTL."""
    ask(shared_service, input=unique())
    reply = redis_server.command("KEYS", "*")
    keys = [line for line in reply.decode().split("\r\n") if line.startswith("dspy-service:")]
    assert any(k.startswith(DEFAULT_PREFIX + "cache:") for k in keys)
    # every key is versioned; this service's are under its SERVICE_NAME (others share this Redis)
    assert all(k.startswith("dspy-service:v1:") for k in keys)
    cache_key = next(k for k in keys if k.startswith(DEFAULT_PREFIX + "cache:"))
    ttl = int(redis_server.command("TTL", cache_key).decode().strip(":\r\n"))
    assert 0 < ttl <= 3600


def _write_models_file(path: Path, program: Path | None) -> Path:
    variant = {"signature": "question -> answer", "module": "predict"}
    if program is not None:
        variant["program"] = str(program)
    config = {
        "models": {
            "gpt-4": {
                "name": "openai/gpt-4",
                "cost_per_1k_input_tokens": 0.03,
                "cost_per_1k_output_tokens": 0.06,
            }
        },
        "variants": {"baseline": variant},
    }
    path.write_text(json.dumps(config))
    return path


def _save_program(path: Path, instructions: str) -> Path:
    import dspy

    program = dspy.Predict(dspy.Signature("question -> answer", instructions))
    program.demos = [dspy.Example(question="2+2?", answer="4").with_inputs("question")]
    program.save(str(path))
    return path


def test_a_reoptimized_program_never_serves_old_answers(
    service_factory: ServiceFactory, sim: Simulator, tmp_path: Path
) -> None:
    """Redeploying with a changed saved program changes the key: the old Redis entry is not served."""
    program = _save_program(tmp_path / "program.json", "Answer briefly.")
    models = _write_models_file(tmp_path / "models.yaml", program)
    question = unique()
    before = service_factory(name="v1", MODELS_CONFIG=str(models))
    ask(before, input=question)
    assert ask(before, input=question)["metadata"]["cache_level"] == "memory"
    before.stop()
    _save_program(program, "Answer at length, citing sources.")
    after = service_factory(name="v2", MODELS_CONFIG=str(models))
    assert ask(after, input=question)["metadata"]["cache_level"] is None
    assert sim.stats()["calls"] == 2
    # The loaded program really is the optimized one: its demo reaches the provider's prompt.
    config = after.http.get("/config").json()
    assert config["variants"]["baseline"]["program"] == str(program)


def test_concurrent_identical_misses_make_one_upstream_call(
    shared_service: ServiceProcess, sim: Simulator
) -> None:
    """Twenty identical misses at once: one provider call, twenty identical answers, one payer."""
    sim.configure(latency_ms=400)
    question = unique()

    def one(_: int) -> dict[str, Any]:
        with httpx.Client(base_url=shared_service.url, timeout=30) as client:
            response = client.post("/v1/predict", json={"model": "gpt-4", "input": question})
            assert response.status_code == 200, response.text
            result: dict[str, Any] = response.json()
            return result

    with ThreadPoolExecutor(max_workers=20) as pool:
        results = list(pool.map(one, range(20)))
    assert sim.stats()["calls"] == 1
    assert len({r["output"] for r in results}) == 1
    payers = [r for r in results if r["metadata"]["cost_usd"]]
    assert len(payers) == 1
    others = [r for r in results if not r["metadata"]["cost_usd"]]
    assert all(r["metadata"]["coalesced"] or r["metadata"]["cached"] for r in others)
    assert all(r["metadata"]["cost_saved_usd"] == payers[0]["metadata"]["cost_usd"] for r in others)
