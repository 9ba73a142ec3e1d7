"""The most a request may cost: what a budget holds before the request goes upstream (budgets.py
settles it to what was spent)."""

from __future__ import annotations

from typing import Any

import orjson

from dspy_service.costs import PriceLookup
from dspy_service.models_config import DEFAULT_MAX_OUTPUT_TOKENS, ModelSpec
from dspy_service.programs import formatted_prompt_bytes
from dspy_service.routing import Route

# Tokens a provider adds around each message of a chat (role markers): a bound for a few messages.
_MESSAGE_FRAMING_BYTES = 64


def worst_case(route: Route, spec: ModelSpec, prices: PriceLookup) -> dict[str, float]:
    """The most a run with `spec` serving could cost, per model, as the program's structure tells:
    each call's prompt at most its bytes (no token is shorter than a byte): the predictor's own
    text, the request's inputs and every earlier call's completion (a pipeline may feed them on),
    and each completion at most the completion limit. A program that calls a predictor more often
    than its structure shows (a loop in its own code) can exceed it; its settled spend still
    counts in full."""
    limit = completion_limit(route.lm_options, spec)
    input_bytes = len(orjson.dumps(route.canonical_inputs))
    models = route.config.models
    charges: dict[str, float] = {}
    earlier_calls = 0
    predictors = route.program.predictors
    exact = None
    if len(predictors) == 1 and predictors[0].max_calls == 1:  # one call: its prompt, formatted
        exact = formatted_prompt_bytes(predictors[0].predictor, route.inputs)
    for info in predictors:
        serving = models[info.model] if info.model is not None else spec
        price = prices(serving.name)
        calls = info.max_calls
        prompt = (
            exact + _MESSAGE_FRAMING_BYTES
            if exact is not None
            else calls * (info.static_prompt_bytes + input_bytes)
            + limit * (calls * earlier_calls + calls * (calls - 1) // 2)
        )
        earlier_calls += calls
        if price is not None:
            cost = prompt * price.input_per_token + calls * limit * price.output_per_token
            charges[serving.key] = charges.get(serving.key, 0.0) + cost
    charges.setdefault(spec.key, 0.0)
    return charges


def completion_limit(options: dict[str, Any], spec: ModelSpec) -> int:
    """The most tokens a completion may have: the request's max_tokens, capped by the model's."""
    cap = spec.max_output_tokens or DEFAULT_MAX_OUTPUT_TOKENS
    requested = options.get("max_tokens")
    return min(int(requested), cap) if requested is not None else cap
