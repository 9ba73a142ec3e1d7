"""`POST /v1/predict/batch` over real HTTP: order, per-item errors, the shared cache, costs, limits."""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest

from tests.support.processes import ServiceProcess, Simulator


def unique(text: str = "question") -> str:
    return f"{text} {uuid.uuid4().hex}"


def batch(service: ServiceProcess, items: list[Any]) -> dict[str, Any]:
    response = service.http.post("/v1/predict/batch", json={"requests": items})
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    assert len(result["results"]) == len(items)
    return result


def metric_value(service: ServiceProcess, name: str, **labels: str) -> float:
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    prefix = f"{name}{{{wanted}}} "
    for line in service.http.get("/metrics").text.splitlines():
        if line.startswith(prefix):
            return float(line.split(" ")[-1])
    return 0.0


def test_results_keep_the_order_of_the_requests(shared_service: ServiceProcess, sim: Simulator) -> None:
    """Each result answers the item at its position, with the fields /v1/predict returns."""
    items: list[dict[str, Any]] = [
        {"model": "gpt-4", "input": unique("first")},
        {"model": "gpt-3.5-turbo", "variant": "cot", "input": unique("second")},
        {"model": "gpt-4", "variant": "cot", "input": unique("third"), "request_id": "my-third"},
        {"model": "gpt-3.5-turbo", "input": unique("fourth"), "parameters": {"temperature": 0.3}},
    ]
    body = batch(shared_service, items)
    assert (body["succeeded"], body["failed"]) == (4, 0)
    for item, result in zip(items, body["results"], strict=True):
        assert result["status"] == 200
        assert result["model"] == item["model"]
        assert result["variant"] == item.get("variant", "baseline")
        assert set(result["metadata"]) >= {"cached", "cache_level", "cost_usd", "latency_ms"}
        # The answer is the one a single request gets: it is served from the cache the batch filled.
        single = shared_service.http.post("/v1/predict", json=item).json()
        assert single["metadata"]["cache_level"] == "memory"
        assert single["output"] == result["output"]
    assert body["results"][2]["request_id"] == "my-third"
    assert body["results"][0]["request_id"] == f"{body['request_id']}.0"
    assert sim.stats()["calls"] == 4


def test_a_bad_item_fails_alone(shared_service: ServiceProcess, sim: Simulator) -> None:
    """Unknown model, unknown parameter and a malformed item get their own errors (counted like single
    requests' errors); the good items around them still answer."""
    not_found = metric_value(shared_service, "dspy_errors_total", type="not_found")
    invalid = metric_value(shared_service, "dspy_errors_total", type="invalid_request")
    items: list[Any] = [
        {"model": "gpt-4", "input": unique("good")},
        {"model": "no-such-model", "input": unique()},
        {"model": "gpt-4", "input": unique(), "parameters": {"colour": "blue"}},
        {"model": "gpt-4"},
        "not an object",
        {"model": "gpt-4", "input": unique("also good")},
    ]
    body = batch(shared_service, items)
    statuses = [result["status"] for result in body["results"]]
    assert statuses == [200, 404, 422, 422, 422, 200]
    assert (body["succeeded"], body["failed"]) == (2, 4)
    errors = [result["error"] for result in body["results"] if result["status"] != 200]
    assert [e["type"] for e in errors] == [
        "not_found",
        "invalid_request",
        "invalid_request",
        "invalid_request",
    ]
    assert "no-such-model" in errors[0]["message"]
    assert "parameters.colour" in errors[1]["message"]
    assert "input" in errors[2]["message"]
    assert all(e["request_id"] for e in errors)
    assert body["results"][0]["output"]
    assert body["results"][5]["output"]
    assert metric_value(shared_service, "dspy_errors_total", type="not_found") == not_found + 1
    assert metric_value(shared_service, "dspy_errors_total", type="invalid_request") == invalid + 3


def test_a_provider_failure_is_that_items_error(shared_service: ServiceProcess, sim: Simulator) -> None:
    """A provider refusing one item's call fails that item only; cache hits in the batch still answer."""
    cached = unique("cached")
    batch(shared_service, [{"model": "gpt-4", "input": cached}])
    sim.configure(error_rate=1.0, error_status=400, error_code="context_length_exceeded")
    body = batch(shared_service, [{"model": "gpt-4", "input": cached}, {"model": "gpt-4", "input": unique()}])
    first, second = body["results"]
    assert first["status"] == 200
    assert first["metadata"]["cache_level"] == "memory"
    assert second["status"] == 422  # the input is too long: the client's to fix
    assert second["error"]["type"] == "invalid_request"


def test_identical_items_share_one_provider_call(shared_service: ServiceProcess, sim: Simulator) -> None:
    """Identical items in a batch make one upstream call (coalesced or cached); a later batch hits."""
    question = unique()
    body = batch(shared_service, [{"model": "gpt-4", "input": question}] * 3)
    assert sim.stats()["calls"] == 1
    results = body["results"]
    assert len({r["output"] for r in results}) == 1
    assert sum(1 for r in results if r["metadata"]["cost_usd"]) == 1
    again = batch(shared_service, [{"model": "gpt-4", "input": question}])["results"][0]
    assert again["metadata"]["cache_level"] == "memory"
    assert sim.stats()["calls"] == 1


def costs_row(service: ServiceProcess, name: str) -> dict[str, Any]:
    row: dict[str, Any] = service.http.get("/costs").json().get(name, {})
    return row


def test_each_item_is_accounted_in_costs(shared_service: ServiceProcess, sim: Simulator) -> None:
    """/costs grows by every item: its requests, tokens, cost and cache hits."""
    before = costs_row(shared_service, "gpt-4:cot")
    questions = [unique() for _ in range(3)]
    body = batch(
        shared_service,
        [{"model": "gpt-4", "variant": "cot", "input": q} for q in [*questions, questions[0]]],
    )
    results = body["results"]
    after = costs_row(shared_service, "gpt-4:cot")
    assert after["total_requests"] - before.get("total_requests", 0) == 4
    assert after["total_input_tokens"] - before.get("total_input_tokens", 0) == sum(
        r["metadata"]["input_tokens"] for r in results
    )
    assert after["total_cost_usd"] - before.get("total_cost_usd", 0) == pytest.approx(
        sum(r["metadata"]["cost_usd"] for r in results)
    )
    assert after["cache_hits"] - before.get("cache_hits", 0) == 1
    assert sim.stats()["calls"] == 3


def test_items_run_concurrently_up_to_the_bound(shared_service: ServiceProcess, sim: Simulator) -> None:
    """16 slow items with BATCH_CONCURRENCY=8 take about two provider latencies: neither one (no bound)
    nor sixteen (one at a time)."""
    sim.configure(latency_ms=300)
    started = time.monotonic()
    body = batch(shared_service, [{"model": "gpt-4", "input": unique()} for _ in range(16)])
    elapsed = time.monotonic() - started
    assert body["succeeded"] == 16
    assert 0.6 <= elapsed < 2.4, elapsed


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (
            {"requests": [{"model": "gpt-4", "input": "x"}] * 33},
            "at most 32 items per batch (BATCH_MAX_ITEMS)",
        ),
        ({"requests": []}, "requests"),
        ({"items": []}, "requests"),
        ([{"model": "gpt-4", "input": "x"}], "body"),
    ],
)
def test_a_bad_envelope_is_refused(shared_service: ServiceProcess, payload: Any, message: str) -> None:
    """Too many items, none, or no `requests` list: 422 for the whole batch, naming the problem."""
    response = shared_service.http.post("/v1/predict/batch", json=payload)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request"
    assert message in error["message"]
