"""`GET /v1/programs`: every variant's program as this process serves it.

For each variant: its kind (signature, module, saved) and where it came from, its fingerprint and
when it was loaded, its input and output fields with their JSON Schemas (from the annotations:
`Literal` as `enum`, pydantic models as object schemas), the object schema of `inputs`, its
predictors (signature, demos, pinned model), its tools, how it runs (on the event loop or in a
program thread) and which fields stream. The programs and the models file are read from the services
on every request (a reload replaces both); the body is rendered again only when they have changed.

The schemas here are also what `/openapi.json` documents for `inputs` (api/openapi.py).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Hashable, Mapping
from typing import TYPE_CHECKING, Any

import orjson
from starlette.types import Receive, Scope, Send

from dspy_service.api.responses import send_json
from dspy_service.logs import get_logger
from dspy_service.models_config import ModelsConfig, VariantSpec
from dspy_service.programs import FieldSpec, LoadedProgram

if TYPE_CHECKING:
    from dspy_service.services import Services

_log = get_logger("dspy_service.api.programs")

_LOCAL_DEFS = "#/$defs/"


def field_schema(spec: FieldSpec, variant: str) -> dict[str, Any]:
    """The field's JSON Schema, self-contained (a pydantic model's definitions under its own `$defs`);
    `{}` (any JSON value) when its annotation cannot be described. Never raises."""
    try:
        return spec.json_schema()
    except Exception as exc:  # a user's type may run any code of its own while pydantic describes it
        _log.warning(
            "programs.schema_failed",
            variant=variant,
            field=spec.name,
            type=spec.type_name,
            error=f"{type(exc).__name__}: {exc}",
        )
        return {"description": spec.description} if spec.description else {}


def rename_refs(schema: Any, rename: Callable[[str], str]) -> Any:
    """A copy of `schema` in which every `$ref` to `#/$defs/<name>` points to `rename(name)`."""
    if isinstance(schema, dict):
        copied = {key: rename_refs(value, rename) for key, value in schema.items()}
        ref = copied.get("$ref")
        if isinstance(ref, str) and ref.startswith(_LOCAL_DEFS):
            copied["$ref"] = rename(ref.removeprefix(_LOCAL_DEFS))
        return copied
    if isinstance(schema, list):
        return [rename_refs(item, rename) for item in schema]
    return schema


def _merge_defs(field: str, schema: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """`schema` with its own `$defs` moved into `defs`: under their names where those are free (or
    hold the same definition), else all of them under `<field>.<name>`."""
    own = schema.pop("$defs", None) or {}
    clash = any(name in defs and defs[name] != definition for name, definition in own.items())
    names = {name: f"{field}.{name}" if clash else name for name in own}

    def rename(name: str) -> str:
        return _LOCAL_DEFS + names.get(name, name)

    for name, definition in own.items():
        defs[names[name]] = rename_refs(definition, rename)
    renamed: dict[str, Any] = rename_refs(schema, rename)
    return renamed


def inputs_schema(
    program: LoadedProgram, field_schemas: Mapping[str, dict[str, Any]] | None = None
) -> dict[str, Any]:
    """The object schema of `inputs` for this program, self-contained: the definitions its fields
    refer to (pydantic models) gathered under one top-level `$defs`. Same shape as
    `InputSchema.json_schema()`, whose per-field `$defs` would not resolve from inside a property.
    `field_schemas`: the fields' schemas (`field_schema`) when the caller has them already."""
    fields = program.inputs.fields
    if field_schemas is None:
        field_schemas = {spec.name: field_schema(spec, program.variant) for spec in fields}
    defs: dict[str, Any] = {}
    properties = {
        spec.name: _merge_defs(spec.name, copy.deepcopy(field_schemas[spec.name]), defs) for spec in fields
    }
    schema: dict[str, Any] = {
        "type": "object",
        "properties": properties,
        "required": [spec.name for spec in fields if spec.required],
        "additionalProperties": False,
    }
    if defs:
        schema["$defs"] = defs
    return schema


def _field(spec: FieldSpec, schema: dict[str, Any], *, required: bool | None) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": spec.name, "type": spec.type_name}
    if required is not None:
        entry["required"] = required
    entry["description"] = spec.description
    entry["schema"] = schema
    return entry


def describe_program(program: LoadedProgram, configured: VariantSpec | None) -> dict[str, Any]:
    """One variant's entry in the listing (`configured`: its entry in the models file, if any)."""
    variant = program.variant
    inputs = program.inputs.fields
    schemas = {field.name: field_schema(field, variant) for field in inputs}
    return {
        "kind": program.kind,
        "origin": program.origin,
        "module": configured.module if configured is not None and program.kind == "signature" else None,
        "state_file": program.state_file,
        "fingerprint": program.fingerprint,
        "loaded_at": program.loaded_at,
        "execution": "async" if program.is_async else "thread",
        "inputs": [_field(field, schemas[field.name], required=field.required) for field in inputs],
        "inputs_schema": inputs_schema(program, schemas),
        "outputs": [
            _field(field, field_schema(field, variant), required=None) for field in program.output_specs
        ],
        "output": program.main_output,
        "output_field": configured.output_field if configured is not None else None,
        "models": dict(configured.models) if configured is not None else {},
        "predictors": [
            {"name": info.name, "signature": info.signature, "demos": info.demos, "model": info.model}
            for info in program.predictors
        ],
        "tools": list(program.tools),
        "stream_fields": [{"predictor": name, "field": field} for name, field in program.stream_fields],
    }


def programs_listing(programs: Mapping[str, LoadedProgram], config: ModelsConfig) -> dict[str, Any]:
    """The body of `GET /v1/programs`."""
    return {
        "default_variant": config.default_variant,
        "programs": {
            key: describe_program(program, config.variants.get(key)) for key, program in programs.items()
        },
    }


def programs_key(programs: Mapping[str, LoadedProgram]) -> tuple[tuple[str, str, str], ...]:
    """What tells one set of programs from another: each variant, its fingerprint (its code, state
    and settings) and when it was loaded (a reload builds every program anew). A rendered body is
    kept under such a key rather than the programs themselves, so that it never keeps a retired set
    alive after a reload."""
    return tuple((key, program.fingerprint, program.loaded_at) for key, program in programs.items())


class RenderedJSON:
    """A JSON body rendered by `render()` and served until `key()` changes."""

    def __init__(self, render: Callable[[], Any], key: Callable[[], Hashable]) -> None:
        self._render = render
        self._key = key
        self._rendered: tuple[Hashable, bytes] | None = None

    def body(self) -> bytes:
        key = self._key()
        if self._rendered is None or self._rendered[0] != key:
            self._rendered = (key, orjson.dumps(self._render()))
        return self._rendered[1]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send_json(send, self.body())


class ProgramsEndpoint(RenderedJSON):
    """`GET /v1/programs`, from the services' current programs and models file (a reload replaces
    both), rendered again when they have changed."""

    def __init__(self, services: Services) -> None:
        super().__init__(
            lambda: programs_listing(services.programs, services.models_config),
            lambda: (programs_key(services.programs), services.models_config.default_variant),
        )


def listing_schema() -> dict[str, Any]:
    """The JSON Schema of the listing, for `/openapi.json`."""
    field_entry = {
        "type": "object",
        "required": ["name", "type", "description", "schema"],
        "properties": {
            "name": {"type": "string"},
            "type": {"type": "string", "description": "the annotation, as Python writes it"},
            "required": {"type": "boolean"},
            "description": {"type": ["string", "null"]},
            "schema": {"type": "object", "description": "its JSON Schema ({}: any JSON value)"},
        },
    }
    nullable_text = {"type": ["string", "null"]}
    program = {
        "type": "object",
        "required": [
            "kind",
            "origin",
            "state_file",
            "fingerprint",
            "loaded_at",
            "execution",
            "inputs",
            "inputs_schema",
            "outputs",
            "output",
            "predictors",
            "tools",
            "stream_fields",
        ],
        "properties": {
            "kind": {"enum": ["signature", "module", "saved"]},
            "origin": {"type": "string", "description": "the signature, import path or saved directory"},
            "module": nullable_text,
            "state_file": nullable_text,
            "fingerprint": {"type": "string"},
            "loaded_at": {"type": "string"},
            "execution": {"enum": ["async", "thread"]},
            "inputs": {"type": "array", "items": field_entry},
            "inputs_schema": {"type": "object"},
            "outputs": {"type": "array", "items": field_entry},
            "output": nullable_text,
            "output_field": nullable_text,
            "models": {"type": "object", "additionalProperties": {"type": "string"}},
            "predictors": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["name", "signature", "demos", "model"],
                    "properties": {
                        "name": {"type": "string"},
                        "signature": {"type": "string"},
                        "demos": {"type": "integer", "minimum": 0},
                        "model": nullable_text,
                    },
                },
            },
            "tools": {"type": "array", "items": {"type": "string"}},
            "stream_fields": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["predictor", "field"],
                    "properties": {"predictor": {"type": "string"}, "field": {"type": "string"}},
                },
            },
        },
    }
    return {
        "type": "object",
        "required": ["default_variant", "programs"],
        "properties": {
            "default_variant": {"type": "string"},
            "programs": {"type": "object", "additionalProperties": program},
        },
    }
