"""The JSON Schema of a `/v1/predict` body for this deployment's variants, for `/openapi.json`.

A body names a variant (or none: the default, or with A/B testing the weighted variants when they
all take the same inputs) and gives that variant's inputs in one of two forms:

- `inputs`: the input fields by name, typed (`Inputs_<variant>`, from the program's annotations);
- `input`: the first input field (when it is text), the further fields in `parameters` (the older
  form, marked deprecated).

Which `inputs` fit depends on `variant`, a sibling field, so no discriminator can pick the schema:
the body is a `oneOf` with one branch per variant and form, each a closed object whose `variant` is
a `const` (or null for the unnamed branch). The branches exclude each other by construction. The
common fields (`request_id`, `use_cache`, `user_id`) come from `PredictRequest` itself.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from typing import Any

from dspy_service.api.programs import inputs_schema, rename_refs
from dspy_service.api.schemas import MAX_PARAMETERS, PredictRequest
from dspy_service.models_config import ModelsConfig
from dspy_service.programs import LoadedProgram
from dspy_service.settings import Settings

INT64 = {"type": "integer", "minimum": -(2**63), "maximum": 2**63 - 1}
_SCHEMAS = "#/components/schemas/"
_ANY_VALUE = {"$ref": _SCHEMAS + "ParameterValue1"}  # any JSON value `parameters` and `inputs` take
_NULL = {"type": "null"}
_COMMON_FIELDS = ("request_id", "use_cache", "user_id")

LM_OPTION_SCHEMAS: dict[str, Any] = {
    "temperature": {"type": "number", "minimum": 0, "maximum": 2},
    "top_p": {"type": "number", "minimum": 0, "maximum": 1},
    "max_tokens": {"type": "integer", "minimum": 1, "maximum": 32_768},
    "seed": INT64,
    "stop": {
        "anyOf": [
            {"type": "string", "minLength": 1},
            {"type": "array", "items": {"type": "string", "minLength": 1}, "maxItems": 4},
        ]
    },
}


def component_names(keys: list[str], prefix: str, taken: set[str] | None = None) -> dict[str, str]:
    """`prefix + key` for each key, with the characters a component name may not hold replaced
    (and a suffix where two keys would then share a name, or take one of `taken`)."""
    names: dict[str, str] = {}
    taken = set(taken or ())
    for key in keys:
        base = prefix + re.sub(r"[^A-Za-z0-9._-]", "_", key)
        name, n = base, 2
        while name in taken:
            name, n = f"{base}_{n}", n + 1
        taken.add(name)
        names[key] = name
    return names


def _bounded(schema: Any) -> Any:
    """Numbers within 64-bit integers' range, as the service accepts them anywhere in a body."""
    if isinstance(schema, list):
        return [_bounded(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    bounded = {key: _bounded(value) for key, value in schema.items()}
    types = bounded.get("type")
    types = types if isinstance(types, list) else [types]
    if "integer" in types or "number" in types:
        if "minimum" not in bounded and "exclusiveMinimum" not in bounded:
            bounded["minimum"] = INT64["minimum"]
        if "maximum" not in bounded and "exclusiveMaximum" not in bounded:
            bounded["maximum"] = INT64["maximum"]
    return bounded


def _typed_inputs(
    program: LoadedProgram, name: str, components: dict[str, Any], reserved: set[str]
) -> dict[str, Any]:
    """The program's `inputs` schema with its definitions moved into `components` (as
    `<name>.<definition>`, none of `reserved`), numbers bounded, and fields of no known type as any
    JSON value."""
    schema = inputs_schema(program)
    own = schema.pop("$defs", {})
    moved = component_names(list(own), name + ".", reserved | set(components))

    def rename(definition: str) -> str:
        return _SCHEMAS + moved.get(definition, definition)

    for definition, body in own.items():
        components[moved[definition]] = _bounded(rename_refs(body, rename))
    typed: dict[str, Any] = _bounded(rename_refs(schema, rename))
    typed["properties"] = {
        field: _or_any_value(property_schema) for field, property_schema in typed["properties"].items()
    }
    typed["description"] = f"`inputs` of variant {program.variant!r}: its input fields by name"
    return typed


def _or_any_value(schema: dict[str, Any]) -> dict[str, Any]:
    """A field of no known type (`Any`, or a type pydantic cannot describe) takes any JSON value
    within the limits of a body (nesting, 64-bit integers), as `parameters` does."""
    return schema if set(schema) - {"description"} else {**_ANY_VALUE, **schema}


def _takes_text_input(program: LoadedProgram) -> bool:
    fields = program.inputs.fields
    return bool(fields) and fields[0].annotation is str


class _VariantForms:
    """The two forms of one variant's body: refs to its `inputs` schema and its `parameters` schema
    for the `input` form (None: no `input` form, its first input field is not text)."""

    def __init__(
        self, program: LoadedProgram, name: str, components: dict[str, Any], reserved: set[str]
    ) -> None:
        inputs = _typed_inputs(program, "Inputs_" + name, components, reserved)
        components["Inputs_" + name] = inputs
        self.key = (inputs["properties"], inputs["required"])  # equal keys: interchangeable forms
        self.inputs_ref = {"$ref": _SCHEMAS + "Inputs_" + name}
        self.parameters_ref: dict[str, Any] | None = None
        self.parameters_required = False
        if not _takes_text_input(program):
            return
        further = {k: v for k, v in inputs["properties"].items() if k != program.input_fields[0]}
        if not further:
            self.parameters_ref = {"$ref": _SCHEMAS + "LMOptions"}
            return
        required = [k for k in inputs["required"] if k in further]
        components["Parameters_" + name] = {
            "type": "object",
            "description": f"LM options, and the input fields of variant {program.variant!r} after "
            "the first (the older form of `inputs`)",
            "properties": {
                **LM_OPTION_SCHEMAS,
                **{k: {**v, "deprecated": True} for k, v in further.items()},
            },
            "required": required,
            "additionalProperties": False,
            "maxProperties": MAX_PARAMETERS,
        }
        self.parameters_ref = {"$ref": _SCHEMAS + "Parameters_" + name}
        self.parameters_required = bool(required)


def _branches(
    forms: _VariantForms, common: dict[str, Any], text_input: dict[str, Any], variant: str | None
) -> list[dict[str, Any]]:
    """The variant's branches: `variant` set to it (or, `variant` None, absent or null)."""
    named = variant is not None
    head = {"model": common["model"], "variant": {"const": variant} if named else _NULL}
    rest = {name: common[name] for name in _COMMON_FIELDS}
    label = repr(variant) if named else "no `variant`"
    shapes = []
    if forms.parameters_ref is not None:
        shapes.append(
            (
                f"{label} with `input`",
                {"input": text_input, "inputs": _NULL, "parameters": forms.parameters_ref},
                ["model", "input", *(["parameters"] if forms.parameters_required else [])],
            )
        )
    shapes.append(
        (
            f"{label} with `inputs`",
            {"input": _NULL, "inputs": forms.inputs_ref, "parameters": {"$ref": _SCHEMAS + "LMOptions"}},
            ["model", "inputs"],
        )
    )
    return [
        {
            "title": title,
            "type": "object",
            "properties": {**head, **properties, **rest},
            "required": [*required, *(["variant"] if named else [])],
            "additionalProperties": False,
        }
        for title, properties, required in shapes
    ]


def _unnamed_variant(config: ModelsConfig, forms: Mapping[str, _VariantForms]) -> str | None:
    """The variant a body without `variant` gets, if its schema is known: the default one, or with
    A/B testing the weighted ones when they all take the same inputs (else: name the variant)."""
    if not config.ab_testing_enabled:
        return config.default_variant if config.default_variant in forms else None
    weighted = [key for key, weight in config.ab_weights.items() if weight > 0]
    if not weighted or any(key not in forms for key in weighted):
        return None
    first = forms[weighted[0]]
    same = all(
        forms[key].key == first.key and (forms[key].parameters_ref is None) == (first.parameters_ref is None)
        for key in weighted
    )
    return weighted[0] if same else None


def predict_request_components(
    settings: Settings, config: ModelsConfig, programs: Mapping[str, LoadedProgram]
) -> dict[str, Any]:
    """`PredictRequest` (the body), `LMOptions`, and per variant `Inputs_<variant>` (with the
    definitions it refers to) and `Parameters_<variant>`: components of the OpenAPI document."""
    pydantic_schema = PredictRequest.model_json_schema()
    common = {name: copy.deepcopy(pydantic_schema["properties"][name]) for name in _COMMON_FIELDS}
    common["model"] = {"enum": sorted(config.models), "description": "a model of the models file"}
    text_input = {
        **next(s for s in pydantic_schema["properties"]["input"]["anyOf"] if s.get("type") == "string"),
        "maxLength": settings.max_input_chars,
        "description": "the first input field's text",
    }
    components: dict[str, Any] = {
        "LMOptions": {
            "type": "object",
            "description": "LM options",
            "properties": LM_OPTION_SCHEMAS,
            "additionalProperties": False,
            "default": {},
        }
    }
    names = component_names(list(programs), "")
    reserved = {prefix + name for name in names.values() for prefix in ("Inputs_", "Parameters_")}
    forms = {
        key: _VariantForms(program, names[key], components, reserved) for key, program in programs.items()
    }
    branches = [branch for key in programs for branch in _branches(forms[key], common, text_input, key)]
    unnamed = _unnamed_variant(config, forms)
    if unnamed is not None:
        branches.extend(_branches(forms[unnamed], common, text_input, None))
    components["PredictRequest"] = {
        "description": (
            "A prediction request: a `model`, a `variant` (or none: "
            + (f"{unnamed!r}" if unnamed is not None else "not allowed here, name one")
            + "), and that variant's inputs, either as `inputs` (its input fields by name, typed: "
            "`Inputs_<variant>`) or as `input` (the first input field, when it is text). Give one of "
            f"the two; text in all inputs together is at most {settings.max_input_chars} characters "
            "(MAX_INPUT_CHARS). One branch per variant and form; `GET /v1/programs` describes each "
            "variant's fields."
        ),
        "oneOf": branches,
    }
    return components
