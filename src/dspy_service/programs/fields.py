"""A program's input and output fields, their types and JSON Schemas, and the validation of a
request's inputs against them.

Input fields come from the type hints of a custom module's `forward`/`aforward`, else from the
signature of the program (a built-in module's, or its first predictor's). DSPy itself only warns when
a value does not match its field's type; the service refuses it before anything is called.
"""

from __future__ import annotations

import inspect
import typing
from dataclasses import dataclass
from typing import Any

import orjson
import pydantic
from pydantic import ConfigDict, TypeAdapter, ValidationError

from dspy_service.errors import InvalidRequest

# Output fields that hold a program's working, not its answer: never the default `output`.
WORKING_FIELDS = frozenset({"reasoning", "trajectory"})


@dataclass(frozen=True, slots=True)
class FieldSpec:
    """One input or output field: its name, its Python annotation and what it is called in errors."""

    name: str
    annotation: Any
    required: bool = True
    description: str | None = None

    @property
    def type_name(self) -> str:
        return type_name(self.annotation)

    def json_schema(self) -> dict[str, Any]:
        schema: dict[str, Any]
        try:
            schema = TypeAdapter(self.annotation).json_schema()
        except (pydantic.PydanticSchemaGenerationError, pydantic.PydanticUserError, TypeError):
            schema = {}  # a type pydantic cannot describe: anything JSON
        if self.description:
            schema.setdefault("description", self.description)
        return schema


def type_name(annotation: Any) -> str:
    """`list[str]`, `Literal['a', 'b']`, `Ticket`: the annotation as a reader would write it."""
    if annotation is Any or annotation is inspect.Parameter.empty:
        return "any JSON value"
    if isinstance(annotation, type) and not typing.get_args(annotation):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def signature_fields(fields: dict[str, Any]) -> tuple[FieldSpec, ...]:
    """A DSPy signature's `input_fields` or `output_fields` as FieldSpecs."""
    specs = []
    for name, info in fields.items():
        extra = info.json_schema_extra or {}
        description = extra.get("desc") if isinstance(extra, dict) else None
        desc = description if isinstance(description, str) and description != f"${{{name}}}" else None
        specs.append(FieldSpec(name=name, annotation=info.annotation, description=desc))
    return tuple(specs)


def forward_fields(module: Any) -> tuple[FieldSpec, ...] | None:
    """The named parameters of a module's own `aforward` (else `forward`), with their type hints;
    None when it takes only `**kwargs` (as the built-in modules do) or defines neither."""
    for name in ("aforward", "forward"):
        method = getattr(type(module), name, None)
        if method is None or getattr(method, "__module__", "").startswith("dspy."):
            continue
        parameters = list(inspect.signature(method).parameters.values())[1:]  # without self
        named = [p for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        if not named:
            return None
        try:
            hints = typing.get_type_hints(method, include_extras=False)
        except (NameError, TypeError):
            hints = {}
        return tuple(
            FieldSpec(
                name=p.name,
                annotation=hints.get(p.name, Any),
                required=p.default is inspect.Parameter.empty,
            )
            for p in named
        )
    return None


class InputSchema:
    """Validates a request's inputs by name and gives them in two forms: the values the program is
    called with (pydantic models built, numbers of their declared type) and a canonical JSON form for
    the cache key, so that equal inputs written differently (`5` and `5.0` for a float) share a key.

    Programs whose inputs are all plain text (most signatures) are checked by hand: a few type
    checks, no pydantic model on the hot path.
    """

    def __init__(self, variant: str, fields: tuple[FieldSpec, ...]) -> None:
        self.variant = variant
        self.fields = fields
        self.names = tuple(field.name for field in fields)
        self._by_name = {field.name: field for field in fields}
        self._text_only = all(field.annotation is str for field in fields)
        self._model: type[pydantic.BaseModel] | None = None
        if not self._text_only:
            definitions: dict[str, Any] = {
                field.name: (field.annotation, ... if field.required else None) for field in fields
            }
            self._model = pydantic.create_model(
                f"Inputs_{variant}",
                __config__=ConfigDict(extra="forbid", strict=True, arbitrary_types_allowed=True),
                **definitions,
            )

    def validate(self, given: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """(values to call the program with, canonical form); InvalidRequest naming each bad field."""
        unknown = [name for name in given if name not in self._by_name]
        if unknown:
            raise InvalidRequest(
                f"inputs.{unknown[0]} is not an input field of variant {self.variant!r}; "
                f"its inputs: {', '.join(self.names) or '(none)'}"
            )
        if self._model is None:
            for field in self.fields:
                value = given.get(field.name)
                if value is None and field.name not in given:
                    if field.required:
                        raise InvalidRequest(f"inputs.{field.name} is required (expected str)")
                elif not isinstance(value, str):
                    raise InvalidRequest(f"inputs.{field.name} must be a string (expected str)")
            return given, given
        try:
            # As JSON, strictly: what JSON Schema allows (a list for a set or tuple, an ISO string for
            # a date) is accepted, and nothing is coerced ("5" is not an int); an integral number
            # such as 5.0 is an integer to JSON Schema, so to us.
            parsed = self._model.model_validate_json(orjson.dumps(_integral_floats_as_ints(given)))
        except ValidationError as exc:
            raise InvalidRequest(self._describe(exc)) from None
        values = {name: getattr(parsed, name) for name in self.names if name in given}
        canonical = parsed.model_dump(mode="json", exclude_unset=True)
        return values, canonical

    def _describe(self, exc: ValidationError) -> str:
        problems = []
        for error in exc.errors(include_input=False, include_url=False)[:10]:
            location = error["loc"]
            field = self._by_name.get(str(location[0])) if location else None
            where = ".".join(str(part) for part in location)
            expected = f" (expected {field.type_name})" if field is not None else ""
            problems.append(f"inputs.{where}: {error['msg']}{expected}")
        return "; ".join(problems)

    def json_schema(self) -> dict[str, Any]:
        """The object schema of `inputs` (OpenAPI and `/v1/programs`); the fields' definitions
        (pydantic models) gathered in one top-level `$defs`, where their `$ref`s point."""
        properties: dict[str, Any] = {}
        definitions: dict[str, Any] = {}
        for field in self.fields:
            schema = field.json_schema()
            definitions.update(schema.pop("$defs", {}))
            properties[field.name] = schema
        document: dict[str, Any] = {
            "type": "object",
            "properties": properties,
            "required": [field.name for field in self.fields if field.required],
            "additionalProperties": False,
        }
        if definitions:
            document["$defs"] = definitions
        return document


def _integral_floats_as_ints(value: Any) -> Any:
    """5.0 as 5, in lists and objects too: JSON Schema's integers include integral numbers."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**63:
        return int(value)
    if isinstance(value, list):
        return [_integral_floats_as_ints(item) for item in value]
    if isinstance(value, dict):
        return {key: _integral_floats_as_ints(item) for key, item in value.items()}
    return value


def main_output(output_fields: tuple[str, ...], configured: str | None) -> str | None:
    """The field that becomes a response's `output`: the configured one, else the first output that
    is not the program's working (reasoning, trajectory)."""
    if configured is not None:
        return configured
    return next((name for name in output_fields if name not in WORKING_FIELDS), None)
