"""What a prediction answers with: the result, its usage per model, and streamed chunks."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class ModelUsage:
    """What one model (by its public name) spent on a prediction."""

    calls: int
    input_tokens: int
    output_tokens: int
    cost_usd: float | None  # None: no price is known for it

    def to_json(self) -> dict[str, Any]:
        return {
            "calls": self.calls,
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "cost_usd": self.cost_usd,
        }


# Not frozen: a frozen dataclass sets each field through object.__setattr__, about three times the
# cost of a plain one, and one is built on every request (a memory hit included). Never mutated.
@dataclass(slots=True)
class Prediction:
    model: str
    model_served: str
    variant: str
    output: Any
    outputs: dict[str, Any]
    latency_ms: float
    cache_level: str | None = None  # memory, redis, or None for an answer made for this request
    coalesced: bool = False  # answered by another request's identical upstream call
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float | None = 0.0  # what this request spent (0 for a hit or a coalesced answer)
    cost_saved_usd: float | None = None  # what a hit saved: the answer's original cost
    usage_by_model: dict[str, ModelUsage] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class StreamChunk:
    """Text of one output field of one predictor, as the provider sends it (a cache hit is one
    chunk of the whole main output, with no predictor)."""

    field: str
    text: str
    predictor: str | None = None
