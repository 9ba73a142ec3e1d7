"""Tokens and cost, as the provider reported them; fleet-wide totals across replicas."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import ServiceFactory
from tests.support.processes import (
    LOOPBACK,
    RedisServer,
    ServiceProcess,
    Simulator,
    free_port,
    run_cli,
    wait_until,
)

GPT4_IN, GPT4_OUT = 0.03 / 1000, 0.06 / 1000


def unique(text: str = "question") -> str:
    return f"{text} {uuid.uuid4().hex}"


def ask(service: ServiceProcess, **body: Any) -> dict[str, Any]:
    response = service.http.post("/v1/predict", json={"model": "gpt-4", **body})
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


def metric_value(text: str, name: str, **labels: str) -> float:
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    prefix = f"{name}{{{wanted}}} " if labels else f"{name} "
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line.split(" ")[-1])
    return 0.0


@pytest.fixture
def isolated_redis(redis_server: RedisServer) -> RedisServer:
    redis_server.command("FLUSHALL")
    return redis_server


def test_tokens_and_cost_are_what_the_provider_reported(
    service_factory: ServiceFactory, sim: Simulator, isolated_redis: RedisServer
) -> None:
    """Per-response tokens equal the simulator's usage figures; cost is tokens times configured prices."""
    service = service_factory()
    body = ask(service, input=unique(), variant="cot")
    stats = sim.stats()
    meta = body["metadata"]
    assert stats["calls"] == 1
    assert meta["input_tokens"] == stats["prompt_tokens"]
    assert meta["output_tokens"] == stats["completion_tokens"]
    assert meta["cost_usd"] == pytest.approx(
        stats["prompt_tokens"] * GPT4_IN + stats["completion_tokens"] * GPT4_OUT
    )
    assert meta["cost_known"] is True
    metrics = service.http.get("/metrics").text
    labels = {"model": "gpt-4", "variant": "cot"}
    assert metric_value(metrics, "dspy_token_usage_total", type="input", **labels) == stats["prompt_tokens"]
    assert (
        metric_value(metrics, "dspy_token_usage_total", type="output", **labels) == stats["completion_tokens"]
    )
    assert metric_value(metrics, "dspy_prediction_cost_total", **labels) == pytest.approx(meta["cost_usd"])


def test_costs_endpoint_totals_by_model_and_variant(
    service_factory: ServiceFactory, sim: Simulator, isolated_redis: RedisServer
) -> None:
    """/costs has the spec's shape per model:variant, plus cache hits and savings."""
    service = service_factory()
    question = unique()
    miss = ask(service, input=question)
    ask(service, input=question)
    ask(service, input=unique(), model="gpt-3.5-turbo")
    costs = service.http.get("/costs").json()
    assert set(costs) == {"gpt-4:baseline", "gpt-3.5-turbo:baseline"}
    row = costs["gpt-4:baseline"]
    assert set(row) >= {
        "total_requests",
        "total_input_tokens",
        "total_output_tokens",
        "total_cost_usd",
        "last_updated",
    }
    assert row["total_requests"] == 2
    assert row["cache_hits"] == 1
    assert row["total_input_tokens"] == miss["metadata"]["input_tokens"]
    assert row["total_output_tokens"] == miss["metadata"]["output_tokens"]
    assert row["total_cost_usd"] == pytest.approx(miss["metadata"]["cost_usd"])
    assert row["cost_saved_usd"] == pytest.approx(miss["metadata"]["cost_usd"])
    assert row["last_updated"].endswith("Z")


def _models_file(tmp_path: Path) -> Path:
    config = {
        "models": {
            "mystery": {"name": "openai/sim-model-nobody-prices"},
            "bundled": {"name": "openai/gpt-4o-mini"},
        },
        "variants": {"baseline": {"signature": "question -> answer"}},
    }
    path = tmp_path / "models.yaml"
    path.write_text(json.dumps(config))
    return path


def test_unknown_price_is_null_and_flagged_never_zero(
    service_factory: ServiceFactory, sim: Simulator, isolated_redis: RedisServer, tmp_path: Path
) -> None:
    """No configured or bundled price: cost null, cost_known false, counted as unpriced."""
    service = service_factory(MODELS_CONFIG=str(_models_file(tmp_path)))
    meta = ask(service, input=unique(), model="mystery")["metadata"]
    assert meta["cost_usd"] is None
    assert meta["cost_known"] is False
    assert meta["input_tokens"] > 0
    row = service.http.get("/costs").json()["mystery:baseline"]
    assert row["unpriced_requests"] == 1
    metrics = service.http.get("/metrics").text
    assert (
        metric_value(metrics, "dspy_unpriced_predictions_total", model="openai/sim-model-nobody-prices") == 1
    )


def test_bundled_dspy_prices_fill_in_for_unconfigured_models(
    service_factory: ServiceFactory, sim: Simulator, isolated_redis: RedisServer, tmp_path: Path
) -> None:
    """Without configured prices, DSPy's bundled price data prices a model it knows."""
    service = service_factory(MODELS_CONFIG=str(_models_file(tmp_path)))
    meta = ask(service, input=unique(), model="bundled")["metadata"]
    assert meta["cost_known"] is True
    assert meta["cost_usd"] > 0


def test_replicas_share_cache_and_report_fleet_wide_costs(
    service_factory: ServiceFactory, sim: Simulator, isolated_redis: RedisServer
) -> None:
    """Two services on one Redis: B hits A's entry from Redis, and both /costs show the same fleet totals."""
    replica_a = service_factory(name="a")
    replica_b = service_factory(name="b")
    question = unique()
    miss = ask(replica_a, input=question)
    hit = ask(replica_b, input=question)
    assert hit["metadata"]["cache_level"] == "redis"
    assert sim.stats()["calls"] == 1
    ask(replica_b, input=unique())

    def both_agree() -> bool:
        a = replica_a.http.get("/costs")
        b = replica_b.http.get("/costs")
        return bool(a.json() == b.json() and a.json().get("gpt-4:baseline", {}).get("total_requests") == 3)

    wait_until(both_agree, timeout=5, what="both replicas to report the same fleet totals")
    fleet = replica_a.http.get("/costs")
    assert fleet.headers["x-costs-scope"] == "fleet"
    row = fleet.json()["gpt-4:baseline"]
    assert row["cache_hits"] == 1
    assert row["total_cost_usd"] > miss["metadata"]["cost_usd"]


def test_costs_survive_a_restart_of_the_replica(
    service_factory: ServiceFactory, sim: Simulator, isolated_redis: RedisServer
) -> None:
    """Fleet totals live in Redis: a replica restarted later still reports what was spent before."""
    first = service_factory(name="first")
    cost = ask(first, input=unique())["metadata"]["cost_usd"]
    first.stop()  # graceful stop flushes pending totals
    second = service_factory(name="second")
    time.sleep(0.1)
    row = second.http.get("/costs").json()["gpt-4:baseline"]
    assert row["total_cost_usd"] == pytest.approx(cost)


def _hanging_model_file(
    tmp_path: Path, *, request_timeout_secs: float, max_retries: int, api_base: str | None = None
) -> Path:
    model: dict[str, Any] = {
        "name": "openai/gpt-4",
        "request_timeout_secs": request_timeout_secs,
        "max_retries": max_retries,
        "cost_per_1k_input_tokens": 0.03,
        "cost_per_1k_output_tokens": 0.06,
    }
    if api_base is not None:
        model["api_base"] = api_base
    config = {
        "models": {"slow": model},
        "variants": {"baseline": {"signature": "question -> answer"}},
    }
    path = tmp_path / "models.yaml"
    path.write_text(json.dumps(config))
    return path


@pytest.mark.parametrize(
    ("how", "request_timeout_secs", "max_retries", "env", "cut_off"),
    [
        # Each attempt times out at the model's timeout, and is retried once: two calls cut off.
        ("the model's timeout, retried", 0.4, 1, {}, 2),
        # The request's deadline cancels the one call in flight.
        ("the request's deadline", 60, 0, {"REQUEST_TIMEOUT_SECS": "1"}, 1),
    ],
)
def test_a_call_cut_off_before_the_provider_reports_tokens_is_counted_never_as_zero(
    service_factory: ServiceFactory,
    sim: Simulator,
    isolated_redis: RedisServer,
    tmp_path: Path,
    how: str,
    request_timeout_secs: float,
    max_retries: int,
    env: dict[str, str],
    cut_off: int,
) -> None:
    """A provider call that got no answer may still be billed: /costs, the metric and the CLI say
    how many such calls there were, instead of letting the zero in the USD figures stand alone."""
    models = _hanging_model_file(tmp_path, request_timeout_secs=request_timeout_secs, max_retries=max_retries)
    service = service_factory(MODELS_CONFIG=str(models), **env)
    sim.configure(hang=True)
    response = service.http.post("/v1/predict", json={"model": "slow", "input": unique()})
    assert response.status_code == 504, response.text
    assert sim.stats()["calls"] == cut_off
    row = service.http.get("/costs").json()["slow:baseline"]
    print(f"\ncut off by {how}: /costs row {row}")
    assert row["unmetered_calls"] == cut_off
    assert row["total_requests"] == 1
    assert row["total_cost_usd"] == 0
    metrics = service.http.get("/metrics").text
    assert metric_value(metrics, "dspy_unmetered_provider_calls_total", model="slow") == cut_off
    shown = run_cli("costs", url=service.url)
    assert shown.returncode == 0, shown.stderr
    assert (
        f"{cut_off} provider call(s) were cut off before the provider reported their tokens" in shown.stdout
    )


def test_a_call_that_answers_is_not_counted_as_cut_off(
    service_factory: ServiceFactory, sim: Simulator, isolated_redis: RedisServer, tmp_path: Path
) -> None:
    """The count is of calls cut off, not of calls: one that answers in time adds nothing to it."""
    models = _hanging_model_file(tmp_path, request_timeout_secs=5, max_retries=0)
    service = service_factory(MODELS_CONFIG=str(models))
    ask(service, input=unique(), model="slow")
    row = service.http.get("/costs").json()["slow:baseline"]
    assert row["unmetered_calls"] == 0
    assert row["total_cost_usd"] > 0
    metrics = service.http.get("/metrics").text
    assert metric_value(metrics, "dspy_unmetered_provider_calls_total", model="slow") == 0


def test_a_provider_never_reached_is_not_counted_as_cut_off(
    service_factory: ServiceFactory, isolated_redis: RedisServer, tmp_path: Path
) -> None:
    """A call that could not connect sent nothing, so it cannot have been billed: it fails, and the
    totals do not claim unknown spend for it."""
    nobody = f"http://{LOOPBACK}:{free_port()}/v1"  # no one listens there: connection refused
    models = _hanging_model_file(tmp_path, request_timeout_secs=5, max_retries=1, api_base=nobody)
    service = service_factory(MODELS_CONFIG=str(models))
    response = service.http.post("/v1/predict", json={"model": "slow", "input": unique()})
    print(f"\nprovider not listening: {response.status_code} {response.json()['error']}")
    assert response.status_code == 502, response.text
    # Nothing was spent and nothing may have been: the model has no row at all.
    assert "slow:baseline" not in service.http.get("/costs").json()
    metrics = service.http.get("/metrics").text
    assert metric_value(metrics, "dspy_unmetered_provider_calls_total", model="slow") == 0
