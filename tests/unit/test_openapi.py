"""The OpenAPI document describes this deployment: its limits, whether auth is on, its error shape,
and each variant's typed `inputs`, so that a body is valid by the document exactly when the service's
own validation (PredictRequest, routing, the program's InputSchema) accepts it."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import orjson
import pydantic
import pytest
from jsonschema import Draft202012Validator  # type: ignore[import-untyped]  # no stubs installed
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from dspy_service.api.openapi import build_openapi
from dspy_service.api.routes import prediction_input
from dspy_service.api.schemas import PredictRequest
from dspy_service.errors import InvalidRequest
from dspy_service.models_config import ModelsConfig, VariantSpec, load_models_config
from dspy_service.programs import FieldSpec, InputSchema, LoadedProgram, load_program
from dspy_service.routing import split_parameters
from dspy_service.settings import DEFAULT_MODELS_CONFIG, Settings
from tests.support.schema_types import Unruly

TYPED = "question: str, tags: list[str], level: Literal['low','high'] -> answer"
NUMBERS = "question: str, score: float, urgent: bool -> answer"
COMPONENT_NAME = re.compile(r"^[a-zA-Z0-9._-]+$")


class Ticket(pydantic.BaseModel):
    subject: str
    priority: int = 3


class Address(pydantic.BaseModel):
    city: str


class Customer(pydantic.BaseModel):
    name: str
    address: Address


class Opaque:
    """No JSON Schema describes it."""


@pytest.fixture(autouse=True)
def _no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RATE_LIMIT", "METRICS_PUBLIC", "MAX_INPUT_CHARS", "API_KEYS", "API_KEYS_FILE"):
        monkeypatch.delenv(name, raising=False)


def settings_of(tmp_path: Path, **settings: Any) -> Settings:
    return Settings(_env_file=tmp_path / "none", **settings)


def packaged(
    extra: dict[str, str] | None = None, **top: Any
) -> tuple[ModelsConfig, dict[str, LoadedProgram]]:
    """The packaged models file (plus signature variants `extra`), and its programs loaded."""
    config = load_models_config(DEFAULT_MODELS_CONFIG)
    variants = dict(config.variants)
    for key, signature in (extra or {}).items():
        variants[key] = VariantSpec(key=key, signature=signature)
    config = ModelsConfig.model_validate({**config.model_dump(), "variants": variants, **top})
    return config, {key: load_program(spec, "models.yaml") for key, spec in config.variants.items()}


def program(variant: str, *fields: FieldSpec) -> LoadedProgram:
    """A module program described by its input fields alone (all the document needs of it)."""
    return LoadedProgram(
        variant=variant,
        kind="module",
        origin="tests:Program",
        module=None,
        inputs=InputSchema(variant, fields),
        output_specs=(),
        main_output=None,
        fingerprint="0" * 24,
        is_async=True,
    )


def config_for(*variants: str, **top: Any) -> ModelsConfig:
    return ModelsConfig.model_validate(
        {
            "default_variant": variants[0],
            "models": {"gpt-4": {"key": "gpt-4", "name": "openai/gpt-4"}},
            "variants": {key: {"key": key, "module": "tests.programs:Program"} for key in variants},
            **top,
        }
    )


def document(tmp_path: Path, *, auth: bool, **settings: Any) -> dict[str, Any]:
    config, programs = packaged()
    return build_openapi(settings_of(tmp_path, **settings), config, auth=auth, programs=programs)


def validator(doc: dict[str, Any], component: str) -> Draft202012Validator:
    """Validates against one component schema, its `$ref`s resolved within the document."""
    registry: Registry[Any] = Registry().with_resource(
        "urn:openapi", Resource.from_contents(doc, default_specification=DRAFT202012)
    )
    return Draft202012Validator({"$ref": f"urn:openapi#/components/schemas/{component}"}, registry=registry)


def service_accepts(body: dict[str, Any], config: ModelsConfig, programs: dict[str, LoadedProgram]) -> bool:
    """What the service does with the body before any call: its own validation, step by step."""
    try:
        parsed = PredictRequest.model_validate_json(json.dumps(body))
    except pydantic.ValidationError:
        return False
    program = programs.get(parsed.variant or config.default_variant)
    if parsed.model not in config.models or program is None:
        return False  # 404
    try:
        given, _ = split_parameters(prediction_input(parsed, None), program)
        program.inputs.validate(given)
    except InvalidRequest:
        return False
    return True


def request_branches(doc: dict[str, Any]) -> list[dict[str, Any]]:
    branches: list[dict[str, Any]] = doc["components"]["schemas"]["PredictRequest"]["oneOf"]
    return branches


def refs(value: Any) -> list[str]:
    if isinstance(value, dict):
        found = [value["$ref"]] if isinstance(value.get("$ref"), str) else []
        return found + [ref for item in value.values() for ref in refs(item)]
    if isinstance(value, list):
        return [ref for item in value for ref in refs(item)]
    return []


def test_limits_and_names_come_from_the_deployment(tmp_path: Path) -> None:
    """MAX_INPUT_CHARS, the models and the variants of the models file appear in the request schema."""
    doc = document(tmp_path, auth=False, max_input_chars=1234)
    body = doc["paths"]["/v1/predict"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/PredictRequest"}
    branches = request_branches(doc)
    assert {b["properties"]["variant"].get("const") for b in branches} == {"baseline", "cot", None}
    for branch in branches:
        assert branch["additionalProperties"] is False
        assert branch["properties"]["model"]["enum"] == ["gpt-3.5-turbo", "gpt-4"]
        if "input" in branch["required"]:
            assert branch["properties"]["input"]["maxLength"] == 1234
    assert doc["components"]["schemas"]["LMOptions"]["additionalProperties"] is False


def test_auth_appears_only_when_it_is_on(tmp_path: Path) -> None:
    """With keys: a bearer scheme, 401s and security on all but the probes; without: none of it."""
    off = document(tmp_path, auth=False)
    assert "securitySchemes" not in off["components"]
    assert "401" not in off["paths"]["/costs"]["get"]["responses"]
    on = document(tmp_path, auth=True)
    assert on["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"
    for path in ("/costs", "/config", "/metrics", "/openapi.json", "/v1/programs"):
        operation = on["paths"][path]["get"]
        assert operation["security"] == [{"bearerAuth": []}]
        assert "WWW-Authenticate" in operation["responses"]["401"]["headers"]
    assert on["paths"]["/health"]["get"]["security"] == []
    public = document(tmp_path, auth=True, metrics_public=True)
    assert "security" not in public["paths"]["/metrics"]["get"]


def test_429_is_documented_when_a_limit_can_answer_it(tmp_path: Path) -> None:
    """RATE_LIMIT (or budgets) bring 429 with Retry-After; otherwise it is not a possible answer."""
    assert "429" not in document(tmp_path, auth=False)["paths"]["/v1/predict"]["post"]["responses"]
    limited = document(tmp_path, auth=False, rate_limit="10/second")
    assert "Retry-After" in limited["paths"]["/v1/predict"]["post"]["responses"]["429"]["headers"]


def test_every_error_type_is_in_the_error_schema(tmp_path: Path) -> None:
    """The error schema's `type` enum lists the new security errors with the old ones."""
    types = document(tmp_path, auth=True)["components"]["schemas"]["Error"]["properties"]["error"]
    for name in ("unauthorized", "rate_limited", "budget_exceeded", "request_timeout", "invalid_request"):
        assert name in types["properties"]["type"]["enum"]


def test_each_variant_has_its_typed_inputs(tmp_path: Path) -> None:
    """`Inputs_<variant>`: a Literal as an enum, a list as an array, numbers within 64 bits, closed."""
    config, programs = packaged({"typed": TYPED, "numbers": NUMBERS})
    schemas = build_openapi(settings_of(tmp_path), config, auth=False, programs=programs)["components"][
        "schemas"
    ]
    typed = schemas["Inputs_typed"]
    assert typed["properties"]["level"] == {"enum": ["low", "high"], "type": "string"}
    assert typed["properties"]["tags"] == {"type": "array", "items": {"type": "string"}}
    assert (typed["required"], typed["additionalProperties"]) == (["question", "tags", "level"], False)
    assert schemas["Inputs_numbers"]["properties"]["score"] == {
        "type": "number",
        "minimum": -(2**63),
        "maximum": 2**63 - 1,
    }
    assert schemas["Inputs_baseline"]["properties"] == {"question": {"type": "string"}}
    # the older form: `input`, the further fields in `parameters` (required, typed, deprecated)
    parameters = schemas["Parameters_typed"]
    assert parameters["required"] == ["tags", "level"]
    assert parameters["properties"]["level"]["deprecated"] is True
    assert "temperature" in parameters["properties"]


BODIES: list[dict[str, Any]] = [
    {"model": "gpt-4", "input": "hi"},
    {"model": "gpt-4", "inputs": {"question": "hi"}},
    {"model": "gpt-4", "input": "hi", "inputs": None, "variant": None, "request_id": "r-1"},
    {"model": "gpt-4", "input": "hi", "inputs": {"question": "hi"}},
    {"model": "gpt-4"},
    {"model": "gpt-4", "input": None, "inputs": None},
    {"model": "gpt-5", "input": "hi"},
    {"model": "gpt-4", "variant": "nope", "input": "hi"},
    {"model": "gpt-4", "variant": "cot", "inputs": {"question": "hi"}, "parameters": {"temperature": 0.2}},
    {"model": "gpt-4", "variant": "cot", "inputs": {"question": 5}},
    {"model": "gpt-4", "variant": "cot", "inputs": {}},
    {"model": "gpt-4", "variant": "cot", "inputs": {"question": "hi", "extra": "x"}},
    {"model": "gpt-4", "variant": "typed", "inputs": {"question": "q", "tags": ["a"], "level": "low"}},
    {"model": "gpt-4", "variant": "typed", "inputs": {"question": "q", "tags": ["a"], "level": "medium"}},
    {"model": "gpt-4", "variant": "typed", "inputs": {"question": "q", "tags": "a", "level": "low"}},
    {"model": "gpt-4", "variant": "typed", "inputs": {"question": "q", "level": "low"}},
    {"model": "gpt-4", "variant": "typed", "input": "q", "parameters": {"tags": [], "level": "high"}},
    {"model": "gpt-4", "variant": "typed", "input": "q", "parameters": {"tags": []}},
    {"model": "gpt-4", "variant": "typed", "input": "q"},
    {"model": "gpt-4", "variant": "typed", "input": "q", "parameters": {"tags": [1], "level": "high"}},
    {"model": "gpt-4", "variant": "numbers", "inputs": {"question": "q", "score": 1, "urgent": False}},
    {"model": "gpt-4", "variant": "numbers", "inputs": {"question": "q", "score": 0.5, "urgent": 1}},
    {"model": "gpt-4", "variant": "numbers", "inputs": {"question": "q", "score": 2**70, "urgent": True}},
    {"model": "gpt-4", "variant": "numbers", "inputs": {"question": "q", "score": "1", "urgent": True}},
    {"model": "gpt-4", "variant": "numbers", "input": "q", "parameters": {"score": 2.5, "urgent": True}},
]


@pytest.mark.parametrize("body", BODIES, ids=[json.dumps(b)[:80] for b in BODIES])
def test_a_body_is_valid_by_the_document_exactly_when_the_service_accepts_it(
    tmp_path: Path, body: dict[str, Any]
) -> None:
    """The document's PredictRequest and the service's own validation agree, body by body."""
    config, programs = packaged({"typed": TYPED, "numbers": NUMBERS})
    doc = build_openapi(settings_of(tmp_path), config, auth=False, programs=programs)
    assert validator(doc, "PredictRequest").is_valid(body) == service_accepts(body, config, programs)


def test_pydantic_models_become_components_with_their_refs_rewritten(tmp_path: Path) -> None:
    """A pydantic model input (nested, in a list) is an object schema among the components, and no
    `$defs` or dangling `$ref` is left in the document."""
    triage = program(
        "triage",
        FieldSpec(name="ticket", annotation=Ticket),
        FieldSpec(name="customers", annotation=list[Customer], required=False),
    )
    doc = build_openapi(settings_of(tmp_path), config_for("triage"), auth=False, programs={"triage": triage})
    schemas = doc["components"]["schemas"]
    inputs = schemas["Inputs_triage"]
    assert inputs["properties"]["ticket"]["type"] == "object"
    assert inputs["properties"]["customers"]["items"] == {
        "$ref": "#/components/schemas/Inputs_triage.Customer"
    }
    customer = schemas["Inputs_triage.Customer"]
    assert customer["properties"]["address"] == {"$ref": "#/components/schemas/Inputs_triage.Address"}
    assert "$defs" not in orjson.dumps(doc).decode()
    for ref in refs(doc):
        assert ref.removeprefix("#/components/schemas/") in schemas or ref.startswith("#/components/headers/")
    check = validator(doc, "PredictRequest")
    good = {"subject": "Refund", "priority": 1}
    assert check.is_valid({"model": "gpt-4", "inputs": {"ticket": good}})
    assert check.is_valid(
        {"model": "gpt-4", "inputs": {"ticket": good, "customers": [{"name": "A", "address": {"city": "X"}}]}}
    )
    assert not check.is_valid({"model": "gpt-4", "inputs": {"ticket": good, "customers": [{"name": "A"}]}})
    assert not check.is_valid({"model": "gpt-4", "input": "text"})  # its first field is not text


def test_component_names_are_valid_whatever_the_variant_key(tmp_path: Path) -> None:
    """Variant keys with characters a component name may not hold get distinct, valid names."""
    keys = ("my variant/2", "my_variant_2")
    programs = {key: program(key, FieldSpec(name="question", annotation=str)) for key in keys}
    schemas = build_openapi(settings_of(tmp_path), config_for(*keys), auth=False, programs=programs)[
        "components"
    ]["schemas"]
    inputs = [name for name in schemas if name.startswith("Inputs_")]
    assert sorted(inputs) == ["Inputs_my_variant_2", "Inputs_my_variant_2_2"]
    assert all(COMPONENT_NAME.match(name) for name in schemas)
    # a model of variant `a` and the inputs of a variant named `a.Ticket`: two components
    programs = {
        "a": program("a", FieldSpec(name="tickets", annotation=list[Ticket])),
        "a.Ticket": program("a.Ticket", FieldSpec(name="question", annotation=str)),
    }
    doc = build_openapi(settings_of(tmp_path), config_for(*programs), auth=False, programs=programs)
    schemas = doc["components"]["schemas"]
    assert schemas["Inputs_a.Ticket"]["properties"] == {"question": {"type": "string"}}
    assert schemas["Inputs_a"]["properties"]["tickets"]["items"] == {
        "$ref": "#/components/schemas/Inputs_a.Ticket_2"
    }
    assert schemas["Inputs_a.Ticket_2"]["title"] == "Ticket"


def test_fields_of_no_known_type_take_any_json_value(tmp_path: Path) -> None:
    """`Any`, a type pydantic cannot describe, and one whose schema hook raises: the document is
    still built, and each such field takes any JSON value within a body's limits."""
    odd = program(
        "odd",
        FieldSpec(name="question", annotation=str),
        FieldSpec(name="anything", annotation=Any, required=False),
        FieldSpec(name="opaque", annotation=Opaque, required=False),
        FieldSpec(name="unruly", annotation=Unruly, required=False, description="a hook that raises"),
    )
    schemas = build_openapi(settings_of(tmp_path), config_for("odd"), auth=False, programs={"odd": odd})[
        "components"
    ]["schemas"]
    properties = schemas["Inputs_odd"]["properties"]
    any_value = {"$ref": "#/components/schemas/ParameterValue1"}
    assert properties["anything"] == any_value
    assert properties["opaque"] == any_value
    assert properties["unruly"] == {**any_value, "description": "a hook that raises"}


def test_an_unnamed_variant_is_documented_only_where_its_inputs_are_known(tmp_path: Path) -> None:
    """No `variant`: the default one; with A/B testing, the weighted ones if they take the same
    inputs, else a body must name its variant."""
    text = FieldSpec(name="question", annotation=str)
    same = {"a": program("a", text), "b": program("b", text)}
    ab = {"ab_testing_enabled": True, "ab_weights": {"a": 0.5, "b": 0.5}}

    def unnamed(config: ModelsConfig, programs: dict[str, LoadedProgram]) -> int:
        doc = build_openapi(settings_of(tmp_path), config, auth=False, programs=programs)
        return sum("const" not in b["properties"]["variant"] for b in request_branches(doc))

    assert unnamed(config_for("a", "b"), same) == 2  # `input` and `inputs`
    assert unnamed(config_for("a", "b", **ab), same) == 2
    different = {**same, "b": program("b", FieldSpec(name="topic", annotation=list[str]))}
    assert unnamed(config_for("a", "b", **ab), different) == 0


def test_responses_document_usage_per_model_and_the_chunk_predictor(tmp_path: Path) -> None:
    """metadata.usage_by_model (calls, tokens, cost per public model) and a chunk's `predictor`."""
    doc = document(tmp_path, auth=False)
    response = doc["paths"]["/v1/predict"]["post"]["responses"]["200"]["content"]["application/json"][
        "schema"
    ]
    metadata = response["properties"]["metadata"]
    assert "usage_by_model" in metadata["required"]
    usage = metadata["properties"]["usage_by_model"]["additionalProperties"]
    assert usage["required"] == ["calls", "input_tokens", "output_tokens", "cost_usd"]
    chunk = doc["components"]["schemas"]["StreamChunk"]
    assert chunk["properties"]["predictor"]["type"] == ["string", "null"]
    listing = doc["paths"]["/v1/programs"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert listing["required"] == ["default_variant", "programs"]


def test_every_schema_in_the_document_is_valid_json_schema(tmp_path: Path) -> None:
    """Each component and each response body is a valid JSON Schema (2020-12, as OpenAPI 3.1 uses)."""
    config, programs = packaged({"typed": TYPED, "numbers": NUMBERS})
    doc = build_openapi(settings_of(tmp_path), config, auth=True, programs=programs)
    assert doc["openapi"] == "3.1.0"
    for schema in doc["components"]["schemas"].values():
        Draft202012Validator.check_schema(schema)
    for path in doc["paths"].values():
        for operation in path.values():
            for response in operation["responses"].values():
                for media in response.get("content", {}).values():
                    Draft202012Validator.check_schema(media["schema"])
    batch = doc["paths"]["/v1/predict/batch"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert batch["properties"]["requests"]["maxItems"] == settings_of(tmp_path).batch_max_items
    assert batch["additionalProperties"] is False
