"""A prediction request, and where it goes: its model, its variant's program, its inputs checked
against the program's declared types, and its LM options checked one by one."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from dspy_service.errors import InvalidRequest
from dspy_service.models_config import ModelsConfig, ModelSpec
from dspy_service.programs import LM_OPTIONS, LanguageModels, LoadedProgram


# Not frozen: a frozen dataclass sets each field through object.__setattr__, about three times the
# cost of a plain one, and one is built on every request (a memory hit included). Never mutated.
@dataclass(slots=True)
class PredictionInput:
    model: str
    variant: str | None
    parameters: dict[str, Any]
    use_cache: bool
    input: str | None = None  # the first input field's value, the short form
    inputs: dict[str, Any] | None = None  # the program's input fields by name, as typed JSON
    user_id: str | None = None  # with A/B testing on, keeps a user on one variant
    tenant: str | None = None  # from the API key; its daily budget applies
    request_id: str | None = None  # its receipt's (a batch item's own)
    source: Literal["predict", "batch", "stream"] = "predict"


# Not frozen: a frozen dataclass sets each field through object.__setattr__, about three times the
# cost of a plain one, and one is built on every request (a memory hit included). Never mutated.
@dataclass(slots=True)
class Route:
    """A request resolved: the model it asked for, the program, the values to call it with, their
    canonical form (for the cache key) and the LM options."""

    model: ModelSpec
    program: LoadedProgram
    inputs: dict[str, Any]
    canonical_inputs: dict[str, Any]
    lm_options: dict[str, Any]
    # The models file and LMs it was routed with: a reload swaps the predictor's, and a request in
    # flight finishes (retries, fallbacks, pricing) on the set it started on.
    config: ModelsConfig = field(repr=False)
    lms: LanguageModels = field(repr=False)
    tenant: str | None = None
    pinned: tuple[ModelSpec, ...] = field(default=())  # models the program's pinned predictors call


_EXPECTED = {
    "temperature": "a number from 0 to 2",
    "top_p": "a number from 0 to 1",
    "max_tokens": "an integer from 1 to 32768",
    "seed": "an integer",
    "stop": "a non-empty string or a list of up to 4 of them",
}


def check_lm_option(name: str, value: Any) -> Any:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if name in ("max_tokens", "seed") and isinstance(value, float) and value.is_integer():
        # 5.0 is an integer in JSON Schema's eyes, so in ours (within 64 bits, as integers are)
        value = int(value) if abs(value) < 2**63 else value
    if name == "temperature" and number and 0 <= value <= 2:
        return float(value)
    if name == "top_p" and number and 0 <= value <= 1:
        return float(value)
    if (
        name == "max_tokens"
        and isinstance(value, int)
        and not isinstance(value, bool)
        and 1 <= value <= 32_768
    ):
        return value
    if name == "seed" and isinstance(value, int) and not isinstance(value, bool):
        return value
    if name == "stop" and (
        (isinstance(value, str) and value)  # DSPy refuses empty stop sequences
        or (isinstance(value, list) and len(value) <= 4 and all(isinstance(s, str) and s for s in value))
    ):
        return value
    raise InvalidRequest(f"parameters.{name} must be {_EXPECTED[name]}")


def split_parameters(
    request: PredictionInput, program: LoadedProgram
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the program's inputs by name, LM options) from `input`/`inputs` and `parameters`.

    `input` is the first input field; further input fields may also come in `parameters` (the older
    form, kept working), LM options always do.
    """
    names = program.input_fields
    if request.inputs is not None:
        given = dict(request.inputs)
    elif names:
        given = {names[0]: request.input}
    else:
        raise InvalidRequest(
            f"variant {program.variant!r} takes no input fields: send `inputs: {{}}` rather than `input`"
        )
    lm_options: dict[str, Any] = {}
    for name, value in request.parameters.items():
        if name in LM_OPTIONS:
            lm_options[name] = check_lm_option(name, value)
        elif name in names and name not in given:
            given[name] = value
        else:
            allowed = sorted(LM_OPTIONS | (set(names) - set(given)))
            raise InvalidRequest(
                f"parameters.{name} is not an LM option or an input field of variant "
                f"{program.variant!r} not given already; allowed: {', '.join(allowed)}"
            )
    return given, lm_options
