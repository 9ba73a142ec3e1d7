"""The `/v1/programs` listing's schemas, and both rendered endpoints (the listing, /openapi.json)
following the services' current programs and models file across a reload."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, cast

import orjson
import pydantic
from jsonschema import Draft202012Validator  # type: ignore[import-untyped]  # no stubs installed

from dspy_service.api.openapi import OpenAPIEndpoint
from dspy_service.api.programs import ProgramsEndpoint, describe_program, inputs_schema
from dspy_service.models_config import ModelsConfig
from dspy_service.programs import FieldSpec, InputSchema, LoadedProgram
from dspy_service.settings import Settings
from tests.support.schema_types import Unruly

if TYPE_CHECKING:
    from dspy_service.services import Services


class Ticket(pydantic.BaseModel):
    subject: str


class Other:
    class Ticket(pydantic.BaseModel):  # the same name, another model
        number: int


class Module:
    """Stands for a program's dspy.Module: something the collector can free."""


def program(variant: str, *fields: FieldSpec, fingerprint: str = "0" * 24) -> LoadedProgram:
    return LoadedProgram(
        variant=variant,
        kind="module",
        origin="tests:Program",
        module=Module(),
        inputs=InputSchema(variant, fields),
        output_specs=(FieldSpec(name="answer", annotation=str),),
        main_output="answer",
        fingerprint=fingerprint,
        is_async=False,
    )


def config_for(*variants: str) -> ModelsConfig:
    return ModelsConfig.model_validate(
        {
            "default_variant": variants[0],
            "models": {"gpt-4": {"key": "gpt-4", "name": "openai/gpt-4"}},
            "variants": {key: {"key": key, "module": "tests.programs:Program"} for key in variants},
        }
    )


def test_definitions_of_all_fields_are_gathered_at_the_top() -> None:
    """Pydantic models of several fields are one `$defs` of the inputs schema, refs that resolve; two
    different models of one name are kept apart under their field's name."""
    triage = program(
        "triage",
        FieldSpec(name="tickets", annotation=list[Ticket]),
        FieldSpec(name="others", annotation=list[Other.Ticket], required=False),
    )
    schema = inputs_schema(triage)
    assert set(schema["$defs"]) == {"Ticket", "others.Ticket"}
    assert schema["properties"]["others"]["items"] == {"$ref": "#/$defs/others.Ticket"}
    Draft202012Validator.check_schema(schema)
    check = Draft202012Validator(schema)
    assert check.is_valid({"tickets": [{"subject": "a"}], "others": [{"number": 1}]})
    assert not check.is_valid({"tickets": [{"subject": "a"}], "others": [{"subject": "a"}]})
    assert not check.is_valid({"others": []})  # tickets is required


def test_the_inputs_schema_is_the_programs_own_where_nothing_is_moved() -> None:
    """Without definitions to gather, it is exactly InputSchema.json_schema()."""
    plain = program("plain", FieldSpec(name="question", annotation=str), FieldSpec(name="n", annotation=int))
    assert inputs_schema(plain) == plain.inputs.json_schema()


def test_a_schema_hook_that_raises_leaves_the_field_as_any_value() -> None:
    """A user's type that raises while being described is `{}` in the listing, not a failed request."""
    odd = program(
        "odd", FieldSpec(name="question", annotation=str), FieldSpec(name="hook", annotation=Unruly)
    )
    entry = describe_program(odd, config_for("odd").variants["odd"])
    hook = entry["inputs"][1]
    assert (hook["name"], hook["type"], hook["schema"]) == ("hook", "Unruly", {})
    assert entry["inputs_schema"]["properties"]["hook"] == {}
    orjson.dumps(entry)


def test_both_endpoints_follow_a_reload_of_programs_and_models_file(tmp_path: Path) -> None:
    """The listing and /openapi.json read the services' current programs and models file: the same
    body while nothing changes, a new one once a reload has replaced them; neither keeps the
    replaced programs alive (a reload's retirement frees them)."""
    before = {"a": program("a", FieldSpec(name="question", annotation=str), fingerprint="1" * 24)}
    old_module = weakref.ref(before["a"].module)
    services = SimpleNamespace(
        settings=Settings(_env_file=tmp_path / "none"),
        models_config=config_for("a"),
        programs=before,
        keyring=None,
    )
    listing = ProgramsEndpoint(cast("Services", services))
    openapi = OpenAPIEndpoint(cast("Services", services))
    first, first_doc = listing.body(), openapi.body()
    assert listing.body() is first
    assert openapi.body() is first_doc
    assert orjson.loads(first)["programs"]["a"]["fingerprint"] == "1" * 24

    del before
    services.models_config = config_for("a", "b")  # what a SIGHUP reload does
    services.programs = {
        "a": program("a", FieldSpec(name="question", annotation=str), fingerprint="2" * 24),
        "b": program("b", FieldSpec(name="tags", annotation=list[str])),
    }
    reloaded = orjson.loads(listing.body())
    assert reloaded["programs"]["a"]["fingerprint"] == "2" * 24
    assert set(reloaded["programs"]) == {"a", "b"}
    assert "Inputs_b" in orjson.loads(openapi.body())["components"]["schemas"]
    gc.collect()
    assert old_module() is None
