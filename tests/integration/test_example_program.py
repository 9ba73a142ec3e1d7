"""The shipped example (examples/support_triage) served as a newcomer would serve it: its own models
file and PROGRAMS_PATH, over real HTTP, against the simulator."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from dspy_service.simulator import count_tokens
from tests.integration.conftest import ServiceFactory
from tests.support.metrics_text import sample_value
from tests.support.processes import ServiceProcess, Simulator

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "support_triage"
MODELS_FILE = EXAMPLE / "models.yaml"
PROGRAMS = EXAMPLE / "programs"
STATE_FILE = EXAMPLE / "triage.json"

ORDER_TICKET = "I was charged twice for order A-1001 this month. Please refund the duplicate."
PLAIN_TICKET = "The desktop app crashes every time I open it since the last update."


def start_example(service_factory: ServiceFactory, models_file: Path = MODELS_FILE) -> ServiceProcess:
    return service_factory("example", MODELS_CONFIG=str(models_file), PROGRAMS_PATH=str(PROGRAMS))


def predict(service: ServiceProcess, ticket: str, **body: Any) -> dict[str, Any]:
    request = {
        "model": "gpt-3.5-turbo",
        "variant": "triage",
        "inputs": {"ticket": ticket, "customer_tier": "pro"},
        **body,
    }
    response = service.http.post("/v1/predict", json=request)
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


def demo_counts(service: ServiceProcess) -> dict[str, int]:
    """Demos per predictor of the triage variant, as GET /v1/programs lists them."""
    triage = service.http.get("/v1/programs").json()["programs"]["triage"]
    return {predictor["name"]: predictor["demos"] for predictor in triage["predictors"]}


def test_triage_answers_typed_outputs_priced_per_model(
    service_factory: ServiceFactory, sim: Simulator
) -> None:
    """The example answers every typed field (Literal, float, a pydantic object, lists), calls its
    tool for the order the ticket names, and prices the pinned gpt-4 draft apart from the rest."""
    service = start_example(service_factory)

    result = predict(service, ORDER_TICKET)

    outputs = result["outputs"]
    assert outputs["category"] in ("billing", "technical", "account", "other")
    assert outputs["urgency"] in ("low", "medium", "high")
    assert isinstance(outputs["confidence"], float)
    assert 0.0 <= outputs["confidence"] <= 1.0
    assert set(outputs["summary"]) == {"subject", "product_area", "sentiment"}
    assert outputs["summary"]["sentiment"] in ("calm", "frustrated", "angry")
    assert outputs["articles"]
    assert all(isinstance(article, str) for article in outputs["articles"])
    assert outputs["order_ids"] == ["A-1001"]
    assert result["output"] == outputs["reply"]  # output_field: reply
    assert outputs["reasoning"]

    # classify, two ReAct turns (lookup_order, then finish), the extract step: the request's model;
    # the draft: gpt-4, as pinned. The simulator saw each provider model called that often.
    usage = result["metadata"]["usage_by_model"]
    assert {name: entry["calls"] for name, entry in usage.items()} == {"gpt-3.5-turbo": 4, "gpt-4": 1}
    assert sim.stats()["by_model"] == {"gpt-3.5-turbo": 4, "gpt-4": 1}
    gpt4 = usage["gpt-4"]
    assert gpt4["cost_usd"] == pytest.approx(
        gpt4["input_tokens"] * 0.03 / 1000 + gpt4["output_tokens"] * 0.06 / 1000
    )
    metadata = result["metadata"]
    assert metadata["input_tokens"] == sum(entry["input_tokens"] for entry in usage.values())
    assert metadata["output_tokens"] == sum(entry["output_tokens"] for entry in usage.values())
    assert metadata["cost_usd"] == pytest.approx(sum(entry["cost_usd"] for entry in usage.values()))

    metrics = service.http.get("/metrics").text
    assert (
        sample_value(metrics, "dspy_tool_calls_total", variant="triage", tool="lookup_order", status="ok")
        == 1
    )

    listing = service.http.get("/v1/programs").json()["programs"]["triage"]
    assert listing["execution"] == "thread"  # forward only: it runs in a program thread
    assert {p["name"]: p["model"] for p in listing["predictors"]}["draft.predict"] == "gpt-4"
    assert "lookup_order" in listing["tools"]


def test_optimized_demos_reach_the_prompt(
    service_factory: ServiceFactory, sim: Simulator, tmp_path: Path
) -> None:
    """The demos BootstrapFewShot wrote to triage.json are loaded (GET /v1/programs counts them per
    predictor) and are in the prompts the provider receives: the same request costs at least the
    demos' tickets in prompt tokens more than without the state file, and the answers (seeded on
    the request's own input) are the same."""
    state = orjson.loads(STATE_FILE.read_bytes())
    # A ticket without an order number calls classify and draft only; every one of their demos
    # carries its ticket into the prompt (DSPy's ChatAdapter renders complete and partial demos).
    demo_tokens = sum(
        count_tokens(demo["ticket"])
        for name in ("classify", "draft.predict")
        for demo in state[name]["demos"]
    )
    assert demo_tokens > 0
    raw = yaml.safe_load(MODELS_FILE.read_text(encoding="utf-8"))
    del raw["variants"]["triage"]["program"]
    unoptimized_file = tmp_path / "models-unoptimized.yaml"
    unoptimized_file.write_text(yaml.safe_dump(raw), encoding="utf-8")

    spent = {}
    listed = {}
    for name, models_file in (("optimized", MODELS_FILE), ("unoptimized", unoptimized_file)):
        service = start_example(service_factory, models_file)
        sim.http.post("/_sim/reset").raise_for_status()
        result = predict(service, PLAIN_TICKET, use_cache=False)
        stats = sim.stats()
        assert stats["calls"] == 2  # classify and draft: no order, no agent
        spent[name] = (stats["prompt_tokens"], stats["completion_tokens"], result["outputs"])
        listed[name] = demo_counts(service)
        service.stop()

    assert listed["optimized"] == {
        name: len(entry["demos"]) for name, entry in state.items() if name != "metadata"
    }
    assert set(listed["unoptimized"].values()) == {0}

    optimized, unoptimized = spent["optimized"], spent["unoptimized"]
    print(f"prompt tokens: {optimized[0]} with triage.json, {unoptimized[0]} without")
    print(f"tokens of the demos' tickets alone: {demo_tokens}")
    assert optimized[0] - unoptimized[0] >= demo_tokens
    assert optimized[1:] == unoptimized[1:]


def test_typed_inputs_are_checked_against_forward(service_factory: ServiceFactory, sim: Simulator) -> None:
    """The input schema comes from `forward`'s type hints: a value outside the Literal, a missing
    ticket or an unknown field is a 422 naming the field, and the provider is never called; `input`
    fills `ticket` with the default tier and shares its cache entry with the same `inputs`."""
    service = start_example(service_factory)
    refused = {
        "inputs.customer_tier": {"ticket": "Help", "customer_tier": "enterprise"},
        "inputs.ticket": {"customer_tier": "pro"},
        "inputs.priority": {"ticket": "Help", "priority": "high"},
    }
    for field, inputs in refused.items():
        response = service.http.post(
            "/v1/predict", json={"model": "gpt-3.5-turbo", "variant": "triage", "inputs": inputs}
        )
        assert response.status_code == 422, response.text
        assert response.json()["error"]["message"].startswith(field)
    assert (
        "Literal['free', 'pro']"
        in service.http.post(
            "/v1/predict", json={"model": "gpt-3.5-turbo", "inputs": refused["inputs.customer_tier"]}
        ).json()["error"]["message"]
    )
    assert sim.stats()["calls"] == 0

    first = service.http.post("/v1/predict", json={"model": "gpt-3.5-turbo", "input": PLAIN_TICKET}).json()
    assert first["variant"] == "triage"  # default_variant
    again = service.http.post(
        "/v1/predict", json={"model": "gpt-3.5-turbo", "inputs": {"ticket": PLAIN_TICKET}}
    ).json()
    assert again["metadata"]["cached"] is True
    assert again["outputs"] == first["outputs"]


def test_plain_signature_variant_serves_beside_the_module(service_factory: ServiceFactory) -> None:
    """The comparison variant `plain` (a typed signature string) answers from the same file."""
    service = start_example(service_factory)
    response = service.http.post(
        "/v1/predict", json={"model": "gpt-3.5-turbo", "variant": "plain", "input": ORDER_TICKET}
    )
    assert response.status_code == 200, response.text
    result = response.json()
    assert set(result["outputs"]) == {"reasoning", "category", "reply"}
    assert result["outputs"]["category"] in ("billing", "technical", "account", "other")
    assert result["output"] == result["outputs"]["reply"]
    assert set(result["metadata"]["usage_by_model"]) == {"gpt-3.5-turbo"}


def test_cluster_models_file_matches_the_example() -> None:
    """The Kubernetes overlay's models file serves the same variants as the example's, with the
    state file at the path the example's Dockerfile copies it to."""
    local = yaml.safe_load(MODELS_FILE.read_text(encoding="utf-8"))
    cluster = yaml.safe_load((EXAMPLE / "k8s" / "models.yaml").read_text(encoding="utf-8"))
    dockerfile = (EXAMPLE / "Dockerfile").read_text(encoding="utf-8")

    assert cluster["variants"]["triage"].pop("program") == "/app/triage/triage.json"
    assert "COPY models.yaml triage.json /app/triage/" in dockerfile
    assert "PROGRAMS_PATH=/app/triage/programs" in dockerfile
    local["variants"]["triage"].pop("program")
    assert cluster == local
