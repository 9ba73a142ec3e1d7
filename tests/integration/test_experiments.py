"""A/B testing through real HTTP: assignment by weight, stickiness across processes, explicit
variants, and the `/v1/experiments` report."""

from __future__ import annotations

import json
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from dspy_service.experiments import VariantAssigner
from tests.integration.conftest import base_env
from tests.support.processes import RedisServer, ServiceProcess, Simulator, wait_until

WEIGHTS = {"baseline": 0.75, "cot": 0.25}
USERS = [f"ab-user-{i}" for i in range(200)]


def write_models_file(path: Path) -> Path:
    config = {
        "ab_testing_enabled": True,
        "ab_weights": {"baseline": 3, "cot": 1},  # the same split as WEIGHTS, written another way
        "models": {
            "gpt-4": {
                "name": "openai/gpt-4",
                "cost_per_1k_input_tokens": 0.03,
                "cost_per_1k_output_tokens": 0.06,
            }
        },
        "variants": {
            "baseline": {"signature": "question -> answer", "module": "predict"},
            "cot": {"signature": "question -> answer", "module": "chain_of_thought"},
        },
    }
    path.write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def ab_services(
    redis_server: RedisServer, simulator: Simulator, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ServiceProcess, ServiceProcess]]:
    """Two replicas serving the same A/B models file, started side by side."""
    workdir = tmp_path_factory.mktemp("ab")
    env = {
        **base_env(redis_server, simulator),
        "MODELS_CONFIG": str(write_models_file(workdir / "models.yaml")),
    }
    pair = (ServiceProcess(env, workdir, "ab-a"), ServiceProcess(env, workdir, "ab-b"))
    try:
        for service in pair:
            service.start(wait=False)
        for service in pair:
            wait_until(lambda s=service: _ready(s), timeout=60, what=f"{service.log_path} to be ready")
        yield pair
    finally:
        for service in pair:
            service.stop()


def _ready(service: ServiceProcess) -> bool:
    try:
        return service.http.get("/ready").status_code == 200
    except httpx.HTTPError:
        return False


def ask(service: ServiceProcess, **body: Any) -> dict[str, Any]:
    response = service.http.post("/v1/predict", json={"model": "gpt-4", **body})
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


def served_variants(service: ServiceProcess, question: str) -> dict[str, str]:
    return {user: ask(service, input=question, user_id=user)["variant"] for user in USERS}


def test_users_are_assigned_by_weight_and_stay(
    ab_services: tuple[ServiceProcess, ServiceProcess], sim: Simulator
) -> None:
    """200 users without a variant get exactly the variant the weights assign them, both variants
    serve, and asking again changes nobody's variant."""
    service, _ = ab_services
    question = f"Which variant am I? {uuid.uuid4().hex}"
    first = served_variants(service, question)
    expected = VariantAssigner(WEIGHTS)
    assert first == {user: expected.assign(user) for user in USERS}
    counts = Counter(first.values())
    assert set(counts) == {"baseline", "cot"}
    assert 20 <= counts["cot"] <= 80  # 50 expected; the ids are fixed, so this cannot flake
    assert served_variants(service, question) == first
    assert sim.stats()["calls"] == 2  # one miss per variant: the cache key uses the served variant


def test_assignment_is_the_same_on_another_replica(
    ab_services: tuple[ServiceProcess, ServiceProcess], sim: Simulator
) -> None:
    """A second process assigns every user the same variant as the first."""
    first, second = ab_services
    question = f"Same everywhere? {uuid.uuid4().hex}"
    assert served_variants(second, question) == served_variants(first, question)


def test_an_explicit_variant_always_wins(
    ab_services: tuple[ServiceProcess, ServiceProcess], sim: Simulator
) -> None:
    """A request naming its variant gets that variant, whatever its user would be assigned."""
    service, _ = ab_services
    assigner = VariantAssigner(WEIGHTS)
    question = f"Explicit? {uuid.uuid4().hex}"
    for user in USERS[:40]:
        other = "cot" if assigner.assign(user) == "baseline" else "baseline"
        assert ask(service, input=question, user_id=user, variant=other)["variant"] == other


def test_requests_without_user_are_split_at_random(
    ab_services: tuple[ServiceProcess, ServiceProcess], sim: Simulator
) -> None:
    """Without a user id each request draws by weight: both variants serve, near a quarter cot."""
    service, _ = ab_services
    question = f"Anyone? {uuid.uuid4().hex}"
    counts = Counter(ask(service, input=question)["variant"] for _ in range(200))
    # 50 expected, sigma 6.1: outside 6 sigma with probability ~2e-9
    assert 13 <= counts["cot"] <= 87, counts
    assert counts["baseline"] + counts["cot"] == 200


def test_a_bad_user_id_is_refused(ab_services: tuple[ServiceProcess, ServiceProcess]) -> None:
    """user_id: 1 to 256 characters without control characters, else 422 naming the field."""
    service, _ = ab_services
    for bad in ("", "a\nb", "x" * 257):
        response = service.http.post("/v1/predict", json={"model": "gpt-4", "input": "hi", "user_id": bad})
        assert response.status_code == 422, response.text
        assert "user_id" in response.json()["error"]["message"]


def report(service: ServiceProcess) -> dict[str, Any]:
    response = service.http.get("/v1/experiments")
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


def test_experiments_report_counts_what_each_variant_served(
    ab_services: tuple[ServiceProcess, ServiceProcess], sim: Simulator
) -> None:
    """/v1/experiments shows the weights and, per variant, the requests, errors, cache hits, latency
    quantiles and cost per request this replica served."""
    service, _ = ab_services
    before = report(service)
    question = f"Report me {uuid.uuid4().hex}"
    paid = [ask(service, input=question, variant="cot")]
    paid += [ask(service, input=f"{question} {i}", variant="cot") for i in range(2)]
    hits = [ask(service, input=question, variant="cot") for _ in range(3)]
    sim.configure(error_rate=1.0, error_status=400, error_code="context_length_exceeded")
    failed = service.http.post(
        "/v1/predict", json={"model": "gpt-4", "input": f"{question} x", "variant": "cot"}
    )
    assert failed.status_code == 422  # the input was too long: the client's error
    after = report(service)

    assert after["ab_testing_enabled"] is True
    assert after["weights"] == WEIGHTS
    assert after["scope"] == "replica"
    assert "bucket" in after["note"]
    cot, cot_before = after["variants"]["cot"], before["variants"]["cot"]
    assert cot["weight"] == 0.25
    assert cot["requests"] - cot_before["requests"] == 7
    assert cot["errors"] - cot_before["errors"] == 1
    assert cot["cache_hits"] - cot_before["cache_hits"] == len(hits)
    assert cot["error_rate"] == pytest.approx(cot["errors"] / cot["requests"], abs=1e-6)
    assert cot["cache_hit_ratio"] == pytest.approx(cot["cache_hits"] / cot["requests"], abs=1e-6)
    spent = sum(r["metadata"]["cost_usd"] for r in paid)
    assert cot["cost_usd"] - cot_before["cost_usd"] == pytest.approx(spent)
    assert cot["cost_per_request_usd"] == pytest.approx(cot["cost_usd"] / cot["requests"])
    assert 0 < cot["latency_ms"]["p50"] <= cot["latency_ms"]["p95"]
    assert 0 < cot["miss_latency_ms"]["p50"] <= cot["miss_latency_ms"]["p95"]
    assert after["variants"]["baseline"]["requests"] == before["variants"]["baseline"]["requests"]
    assert after["by_model"]["gpt-4:cot"]["requests"] == cot["requests"]
