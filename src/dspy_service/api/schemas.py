"""The public request and response contract of `/v1/predict`."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

REQUEST_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:\-]{0,127}$"
MAX_PARAMETERS = 32
MAX_INPUT_CHARS = 100_000
USER_ID_PATTERN = r"^[^\x00-\x1f\x7f-\x9f]+$"  # any text without control characters


class PredictRequest(BaseModel):
    """Body of POST /v1/predict. Unknown fields are refused, types are not coerced."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    request_id: str | None = Field(default=None, pattern=REQUEST_ID_PATTERN)
    model: str = Field(min_length=1, max_length=200)
    variant: str | None = Field(default=None, min_length=1, max_length=200)
    input: str = Field(min_length=1, max_length=MAX_INPUT_CHARS)
    parameters: dict[str, Any] = Field(default_factory=dict, max_length=MAX_PARAMETERS)
    use_cache: bool = True
    user_id: str | None = Field(default=None, min_length=1, max_length=256, pattern=USER_ID_PATTERN)


class BatchRequest(BaseModel):
    """Body of POST /v1/predict/batch: `/v1/predict` bodies, each validated on its own (a bad item
    fails alone); how many are allowed is BATCH_MAX_ITEMS, checked by the endpoint."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    requests: list[Any] = Field(min_length=1)


def describe_validation_error(exc: ValidationError) -> str:
    """One readable sentence per problem, naming the field; input values are not echoed."""
    problems = []
    for error in exc.errors(include_input=False, include_url=False):
        where = ".".join(str(part) for part in error["loc"]) or "body"
        problems.append(f"{where}: {error['msg']}")
    return "; ".join(problems[:10])
