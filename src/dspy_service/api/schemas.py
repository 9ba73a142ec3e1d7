"""The public request and response contract of `/v1/predict`."""

from __future__ import annotations

import math
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
)

REQUEST_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:\-]{0,127}$"
MAX_PARAMETERS = 32
MAX_INPUT_CHARS = 100_000  # the default; validation context `max_input_chars` (MAX_INPUT_CHARS) overrides it
MAX_PARAMETER_DEPTH = 8  # nesting of lists and objects inside `parameters`
_INT64 = (-(2**63), 2**63 - 1)
USER_ID_PATTERN = r"^[^\x00-\x1f\x7f-\x9f]+$"  # any text without control characters


class PredictRequest(BaseModel):
    """Body of POST /v1/predict. Unknown fields are refused, types are not coerced."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    request_id: str | None = Field(default=None, pattern=REQUEST_ID_PATTERN)
    model: str = Field(min_length=1, max_length=200)
    variant: str | None = Field(default=None, min_length=1, max_length=200)
    input: str | None = Field(default=None, min_length=1)
    inputs: dict[str, Any] | None = Field(default=None, max_length=MAX_PARAMETERS)
    parameters: dict[str, Any] = Field(default_factory=dict, max_length=MAX_PARAMETERS)
    use_cache: bool = True
    user_id: str | None = Field(default=None, min_length=1, max_length=256, pattern=USER_ID_PATTERN)

    @field_validator("input")
    @classmethod
    def _input_within_limit(cls, value: str | None, info: ValidationInfo) -> str | None:
        limit = (info.context or {}).get("max_input_chars", MAX_INPUT_CHARS)
        if value is not None and len(value) > limit:
            raise ValueError(f"at most {limit} characters are allowed (MAX_INPUT_CHARS), not {len(value)}")
        return value

    @field_validator("inputs")
    @classmethod
    def _inputs_within_limit(
        cls, value: dict[str, Any] | None, info: ValidationInfo
    ) -> dict[str, Any] | None:
        if value is None:
            return value
        check_parameter_values(value)
        limit = (info.context or {}).get("max_input_chars", MAX_INPUT_CHARS)
        chars = _text_length(value)
        if chars > limit:
            raise ValueError(f"at most {limit} characters of text are allowed (MAX_INPUT_CHARS), not {chars}")
        return value

    @field_validator("parameters")
    @classmethod
    def _parameters_are_plain(cls, value: dict[str, Any]) -> dict[str, Any]:
        check_parameter_values(value)
        return value


class BatchRequest(BaseModel):
    """Body of POST /v1/predict/batch: `/v1/predict` bodies, each validated on its own (a bad item
    fails alone); how many are allowed is BATCH_MAX_ITEMS, checked by the endpoint."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    requests: list[Any] = Field(min_length=1)


def check_parameter_values(parameters: dict[str, Any]) -> None:
    """Refuse nesting deeper than MAX_PARAMETER_DEPTH, integers beyond 64 bits and non-finite numbers
    (none of them can be hashed into a cache key or sent on); walked without recursion."""
    stack: list[tuple[Any, int]] = [(value, 1) for value in parameters.values()]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict | list):
            if depth > MAX_PARAMETER_DEPTH:
                raise ValueError(f"values may nest at most {MAX_PARAMETER_DEPTH} levels deep")
            children = value.values() if isinstance(value, dict) else value
            stack.extend((child, depth + 1) for child in children)
        elif isinstance(value, int) and not (_INT64[0] <= value <= _INT64[1]):
            raise ValueError("integers must fit in 64 bits")
        elif isinstance(value, float) and not math.isfinite(value):
            raise ValueError("numbers must be finite")


def _text_length(value: Any) -> int:
    """Characters of text in a JSON value (keys and strings), walked without recursion."""
    total = 0
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            total += len(item)
        elif isinstance(item, dict):
            total += sum(len(str(k)) for k in item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return total


def describe_validation_error(exc: ValidationError) -> str:
    """One readable sentence per problem, naming the field; input values are not echoed."""
    problems = []
    for error in exc.errors(include_input=False, include_url=False):
        where = ".".join(str(part) for part in error["loc"]) or "body"
        problems.append(f"{where}: {error['msg']}")
    return "; ".join(problems[:10])
