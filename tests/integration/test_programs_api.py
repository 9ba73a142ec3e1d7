"""`GET /v1/programs` of a real service: every kind of variant described as it is served (origin,
fields with their JSON Schemas, predictors and pins, tools, execution, streaming), the same
fingerprints as `/config`, each variant's typed `inputs` in `/openapi.json`, and the same access
rule as `/config`.

The models file in the test's directory holds a signature variant with a state file of demos, a
chain_of_thought with typed fields, and two `module:` variants from a package written next to it
(found through PROGRAMS_PATH's default, the models file's directory): a two-predictor program with
a pydantic-typed input, a tool and a pinned predictor, and an async one whose input has a type no
JSON Schema describes.
"""

from __future__ import annotations

import signal
import textwrap
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import dspy
import httpx
import jsonschema  # type: ignore[import-untyped]  # no stubs installed
import pytest

from tests.integration.conftest import ServiceFactory, base_env
from tests.support.processes import RedisServer, ServiceProcess, Simulator, wait_until

API_KEY = "sk-programs-" + "a1" * 12

MODELS_FILE = """
default_variant: plain
models:
  fast:
    name: openai/gpt-3.5-turbo
    cost_per_1k_input_tokens: 0.0005
    cost_per_1k_output_tokens: 0.0015
  strong:
    name: openai/gpt-4
    cost_per_1k_input_tokens: 0.03
    cost_per_1k_output_tokens: 0.06
variants:
  plain:
    signature: "question -> answer"
    program: plain.json
  graded:
    signature: >-
      question: str, level: Literal['low', 'high'], hints: list[str]
      -> answer: str, confidence: float
    module: chain_of_thought
  triage:
    module: support_kit.triage:Triage
    models: {draft: strong}
    output_field: reply
  odd:
    module: support_kit.odd:build_odd
"""

TRIAGE = '''
from typing import Literal

import dspy
import pydantic


class Ticket(pydantic.BaseModel):
    subject: str
    body: str
    priority: int = 3


class Classify(dspy.Signature):
    """Sort a support ticket into a category."""

    ticket: Ticket = dspy.InputField()
    category: Literal["billing", "bug", "other"] = dspy.OutputField()


class Draft(dspy.Signature):
    """Draft a reply to a support ticket."""

    ticket: Ticket = dspy.InputField()
    category: str = dspy.InputField()
    reply: str = dspy.OutputField(desc="the reply to send")


def lookup_policy(topic: str) -> str:
    """Look up the support policy on a topic."""
    return f"policy on {topic}"


class Triage(dspy.Module):
    def __init__(self) -> None:
        super().__init__()
        self.classify = dspy.Predict(Classify)
        self.draft = dspy.ChainOfThought(Draft)
        self.lookup = dspy.Tool(lookup_policy)

    def forward(self, ticket: Ticket, tags: list[str] | None = None) -> dspy.Prediction:
        category = self.classify(ticket=ticket).category
        return self.draft(ticket=ticket, category=category)
'''

ODD = '''
import dspy


class Opaque:
    """A type pydantic cannot describe: no JSON Schema for it."""


class Odd(dspy.Module):
    def __init__(self) -> None:
        super().__init__()
        self.answer = dspy.Predict("question -> answer")

    async def aforward(self, question: str, hook: Opaque | None = None) -> dspy.Prediction:
        return await self.answer.acall(question=question)


def build_odd() -> Odd:
    return Odd()
'''


def write_programs(directory: Path) -> Path:
    """The models file, the demos' state file and the program package; returns the models file."""
    package = directory / "support_kit"
    package.mkdir()
    (package / "__init__.py").write_text("", encoding="utf-8")
    (package / "triage.py").write_text(textwrap.dedent(TRIAGE), encoding="utf-8")
    (package / "odd.py").write_text(textwrap.dedent(ODD), encoding="utf-8")
    plain = dspy.Predict("question -> answer")
    plain.demos = [
        dspy.Example(question="What is 2 + 2?", answer="4"),
        dspy.Example(question="What colour is the sky?", answer="Blue"),
    ]
    plain.save(str(directory / "plain.json"))
    models = directory / "models.yaml"
    models.write_text(MODELS_FILE, encoding="utf-8")
    return models


@pytest.fixture(scope="module")
def served(
    redis_server: RedisServer, simulator: Simulator, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServiceProcess]:
    """One service for the listing tests (none of them changes it)."""
    directory = tmp_path_factory.mktemp("programs")
    env = {**base_env(redis_server, simulator), "MODELS_CONFIG": str(write_programs(directory))}
    service = ServiceProcess(env, directory, "programs")
    service.start()
    yield service
    service.stop()


@pytest.fixture(scope="module")
def listing(served: ServiceProcess) -> dict[str, Any]:
    response = served.http.get("/v1/programs")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    body: dict[str, Any] = response.json()
    return body


def fields(entries: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {entry["name"]: entry for entry in entries}


def test_every_variant_is_listed_with_its_kind_origin_and_state(
    listing: dict[str, Any], served: ServiceProcess
) -> None:
    """Kinds, origins, built-in module, state file, demo counts and the default variant, as loaded."""
    programs = listing["programs"]
    assert listing["default_variant"] == "plain"
    assert set(programs) == {"plain", "graded", "triage", "odd"}
    plain, graded, triage, odd = (programs[k] for k in ("plain", "graded", "triage", "odd"))
    assert (plain["kind"], plain["origin"], plain["module"]) == ("signature", "question -> answer", "predict")
    assert plain["state_file"] == str(served.workdir / "plain.json")
    assert [p["demos"] for p in plain["predictors"]] == [2]
    assert (graded["kind"], graded["module"], graded["state_file"]) == ("signature", "chain_of_thought", None)
    assert graded["origin"].startswith("question: str, level: Literal")
    assert (triage["kind"], triage["origin"], triage["module"]) == (
        "module",
        "support_kit.triage:Triage",
        None,
    )
    assert (odd["kind"], odd["origin"]) == ("module", "support_kit.odd:build_odd")
    for program in programs.values():
        datetime.fromisoformat(program["loaded_at"].replace("Z", "+00:00"))


def test_fingerprints_are_those_of_config(listing: dict[str, Any], served: ServiceProcess) -> None:
    """The fingerprint that keys a variant's cache entries is the one /config shows."""
    config = served.http.get("/config").json()
    assert {key: p["fingerprint"] for key, p in listing["programs"].items()} == {
        key: v["fingerprint"] for key, v in config["variants"].items()
    }


def test_typed_fields_carry_their_json_schemas(listing: dict[str, Any]) -> None:
    """A Literal is an enum, a list an array, a float a number, a pydantic model an object schema,
    an optional parameter of forward is not required; `output` is the main output field."""
    graded = listing["programs"]["graded"]
    inputs = fields(graded["inputs"])
    assert inputs["level"]["schema"] == {"enum": ["low", "high"], "type": "string"}
    assert inputs["level"]["type"] == "Literal['low', 'high']"
    assert inputs["hints"]["schema"] == {"type": "array", "items": {"type": "string"}}
    assert all(entry["required"] for entry in inputs.values())
    outputs = fields(graded["outputs"])
    assert list(outputs) == ["reasoning", "answer", "confidence"]
    assert outputs["confidence"]["schema"] == {"type": "number"}
    assert graded["output"] == "answer"

    triage = listing["programs"]["triage"]
    inputs = fields(triage["inputs"])
    ticket = inputs["ticket"]
    assert (ticket["type"], ticket["required"]) == ("Ticket", True)
    assert ticket["schema"]["type"] == "object"
    assert set(ticket["schema"]["properties"]) == {"subject", "body", "priority"}
    assert ticket["schema"]["required"] == ["subject", "body"]
    assert inputs["tags"]["required"] is False
    assert fields(triage["outputs"])["reply"]["description"] == "the reply to send"
    assert (triage["output"], triage["output_field"]) == ("reply", "reply")


def test_the_inputs_schema_accepts_what_the_program_takes(listing: dict[str, Any]) -> None:
    """`inputs_schema` is a valid, closed object schema: right values pass, wrong ones fail."""
    triage = listing["programs"]["triage"]["inputs_schema"]
    jsonschema.Draft202012Validator.check_schema(triage)
    validator = jsonschema.Draft202012Validator(triage)
    assert validator.is_valid({"ticket": {"subject": "Refund", "body": "Twice charged"}, "tags": ["x"]})
    assert not validator.is_valid({"ticket": {"subject": "Refund"}})  # body missing
    assert not validator.is_valid({"ticket": {"subject": "a", "body": "b"}, "urgent": True})
    graded = jsonschema.Draft202012Validator(listing["programs"]["graded"]["inputs_schema"])
    assert graded.is_valid({"question": "q", "level": "low", "hints": []})
    assert not graded.is_valid({"question": "q", "level": "medium", "hints": []})


def test_predictors_pins_tools_and_streaming(listing: dict[str, Any]) -> None:
    """Each predictor with its signature and pinned model; the tool; how each program runs; the
    text output fields that stream, by predictor."""
    triage = listing["programs"]["triage"]
    assert triage["predictors"] == [
        {"name": "classify", "signature": "ticket -> category", "demos": 0, "model": None},
        {
            "name": "draft.predict",
            "signature": "ticket, category -> reasoning, reply",
            "demos": 0,
            "model": "strong",
        },
    ]
    assert triage["models"] == {"draft": "strong"}
    assert triage["tools"] == ["lookup_policy"]
    assert triage["execution"] == "thread"  # only `forward`
    assert triage["stream_fields"] == [
        {"predictor": "draft.predict", "field": "reasoning"},
        {"predictor": "draft.predict", "field": "reply"},
    ]  # not `category`: a Literal is not streamed as text
    odd = listing["programs"]["odd"]
    assert odd["execution"] == "async"
    assert listing["programs"]["plain"]["execution"] == "async"  # dspy.Predict has aforward
    graded = listing["programs"]["graded"]
    assert graded["predictors"][0]["signature"] == "question, level, hints -> reasoning, answer, confidence"
    assert graded["stream_fields"] == [
        {"predictor": "predict", "field": "reasoning"},
        {"predictor": "predict", "field": "answer"},
    ]


def test_an_annotation_without_a_json_schema_is_any_value(
    listing: dict[str, Any], served: ServiceProcess
) -> None:
    """A type pydantic cannot describe lists as `{}` (any JSON value): no 500, here or in /openapi.json."""
    hook = fields(listing["programs"]["odd"]["inputs"])["hook"]
    assert (hook["schema"], hook["required"]) == ({}, False)
    assert hook["type"].startswith("support_kit.odd.Opaque")
    document = served.http.get("/openapi.json")
    assert document.status_code == 200
    odd = document.json()["components"]["schemas"]["Inputs_odd"]
    assert odd["properties"]["hook"] == {"$ref": "#/components/schemas/ParameterValue1"}


def test_openapi_carries_each_variant_typed_inputs(served: ServiceProcess) -> None:
    """/openapi.json: `Inputs_<variant>` for each variant, a pydantic model as its own component,
    and a PredictRequest branch naming each variant."""
    schemas = served.http.get("/openapi.json").json()["components"]["schemas"]
    assert schemas["Inputs_graded"]["properties"]["level"] == {"enum": ["low", "high"], "type": "string"}
    assert schemas["Inputs_triage"]["properties"]["ticket"]["type"] == "object"
    variants = {branch["properties"]["variant"].get("const") for branch in schemas["PredictRequest"]["oneOf"]}
    assert variants == {"plain", "graded", "triage", "odd", None}  # None: the default, unnamed


def test_a_request_against_the_listed_types_is_checked_before_any_call(
    served: ServiceProcess, sim: Simulator
) -> None:
    """An `inputs` value outside the listed enum is a 422 naming the field; the provider is not called."""
    response = served.http.post(
        "/v1/predict",
        json={
            "model": "fast",
            "variant": "graded",
            "inputs": {"question": "q", "level": "medium", "hints": []},
        },
    )
    assert response.status_code == 422
    assert "inputs.level" in response.json()["error"]["message"]
    assert sim.stats()["calls"] == 0


def test_the_listing_needs_a_key_when_keys_are_on(service_factory: ServiceFactory, tmp_path: Path) -> None:
    """The same rule as /config: with API keys on, no key is a 401; a key gets the listing."""
    service = service_factory(MODELS_CONFIG=str(write_programs(tmp_path)), API_KEYS=f"{API_KEY} team")
    refused = httpx.get(service.url + "/v1/programs", timeout=10)
    assert refused.status_code == 401
    assert refused.json()["error"]["type"] == "unauthorized"
    allowed = httpx.get(
        service.url + "/v1/programs", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=10
    )
    assert allowed.status_code == 200
    assert set(allowed.json()["programs"]) == {"plain", "graded", "triage", "odd"}


def test_a_reload_shows_in_the_listing_and_the_document(
    service_factory: ServiceFactory, tmp_path: Path
) -> None:
    """After SIGHUP with a changed models file: the new variant is listed with its typed inputs,
    every program shows its new `loaded_at`, and /openapi.json documents the new variant's inputs."""
    models = write_programs(tmp_path)
    service = service_factory(MODELS_CONFIG=str(models))
    before = service.http.get("/v1/programs").json()["programs"]
    assert "Inputs_tagged" not in service.http.get("/openapi.json").json()["components"]["schemas"]
    models.write_text(
        MODELS_FILE + '  tagged:\n    signature: "question: str, tags: list[str] -> answer"\n',
        encoding="utf-8",
    )

    def reloaded() -> list[dict[str, Any]]:
        return [line for line in service.log_lines() if line.get("event") == "programs.reloaded"]

    service.signal(signal.SIGHUP)
    wait_until(lambda: bool(reloaded()), timeout=60, what="programs.reloaded")
    after = service.http.get("/v1/programs").json()["programs"]
    assert set(after) == set(before) | {"tagged"}
    assert fields(after["tagged"]["inputs"])["tags"]["schema"] == {
        "type": "array",
        "items": {"type": "string"},
    }
    for key, program in before.items():
        assert after[key]["loaded_at"] > program["loaded_at"]
        assert after[key]["fingerprint"] == program["fingerprint"]  # the same code and state
    schemas = service.http.get("/openapi.json").json()["components"]["schemas"]
    assert schemas["Inputs_tagged"]["properties"]["tags"] == {"type": "array", "items": {"type": "string"}}
