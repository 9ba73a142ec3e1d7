"""The request contract's limits: input length from MAX_INPUT_CHARS, and what `parameters` may hold."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from pydantic import ValidationError

from dspy_service.api.schemas import MAX_PARAMETER_DEPTH, PredictRequest


def parse(body: bytes | str, **context: Any) -> PredictRequest:
    return PredictRequest.model_validate_json(body, context=context or None)


def nested(depth: int) -> Any:
    value: Any = "leaf"
    for level in range(depth):
        value = [value] if level % 2 else {"k": value}
    return value


def test_input_length_follows_the_setting() -> None:
    """The limit is the `max_input_chars` context (MAX_INPUT_CHARS), 100000 without one."""
    body = orjson.dumps({"model": "m", "input": "x" * 50})
    assert parse(body, max_input_chars=50).input == "x" * 50
    with pytest.raises(ValidationError, match="at most 49 characters"):
        parse(body, max_input_chars=49)
    with pytest.raises(ValidationError, match="at most 100000"):
        parse(orjson.dumps({"model": "m", "input": "x" * 100_001}))


def test_nesting_up_to_the_limit_is_accepted_deeper_is_refused() -> None:
    """`parameters` values may nest MAX_PARAMETER_DEPTH levels; one more is a validation error."""
    ok = orjson.dumps({"model": "m", "input": "x", "parameters": {"p": nested(MAX_PARAMETER_DEPTH)}})
    assert parse(ok).parameters["p"] == nested(MAX_PARAMETER_DEPTH)
    deep = orjson.dumps({"model": "m", "input": "x", "parameters": {"p": nested(MAX_PARAMETER_DEPTH + 1)}})
    with pytest.raises(ValidationError, match="nest at most"):
        parse(deep)


@pytest.mark.parametrize("depth", [100, 250, 5_000, 200_000])
def test_absurd_nesting_is_a_validation_error_not_a_crash(depth: int) -> None:
    """However deep the JSON nests, the answer is a ValidationError (never RecursionError)."""
    body = '{"model":"m","input":"x","parameters":{"p":' + "[" * depth + "]" * depth + "}}"
    with pytest.raises(ValidationError):
        parse(body)


@pytest.mark.parametrize(
    ("value", "mention"),
    [
        ("100000000000000000000000000000", "64 bits"),
        ("-9223372036854775809", "64 bits"),
        ("1e400", "finite"),
        ('[1, {"a": -1e999}]', "finite"),
    ],
)
def test_numbers_that_cannot_be_hashed_or_sent_are_refused(value: str, mention: str) -> None:
    """Integers beyond 64 bits and infinities would break the cache key (orjson): refused up front."""
    with pytest.raises(ValidationError, match=mention):
        parse('{"model":"m","input":"x","parameters":{"seed":' + value + "}}")


def test_64_bit_integers_are_accepted() -> None:
    """The edges of the 64-bit range are fine."""
    body = '{"model":"m","input":"x","parameters":{"a":9223372036854775807,"b":-9223372036854775808}}'
    assert parse(body).parameters == {"a": 2**63 - 1, "b": -(2**63)}


def test_error_messages_do_not_echo_the_input() -> None:
    """The validation message names the problem, not the client's text."""
    with pytest.raises(ValidationError) as caught:
        parse(orjson.dumps({"model": "m", "input": "secret-text " * 10}), max_input_chars=5)
    assert "secret-text" not in str(caught.value.errors(include_input=False))
