"""A signature with outputs of every JSON kind, a pydantic model among them."""

from __future__ import annotations

from typing import Literal

import dspy
import pydantic


class Address(pydantic.BaseModel):
    city: str
    postcode: str


class Customer(pydantic.BaseModel):
    name: str
    age: int
    address: Address
    tags: list[str]


class Profile(dspy.Signature):  # type: ignore[misc]  # dspy is Any to mypy
    """Describe the customer the text talks about."""

    text: str = dspy.InputField()
    level: Literal["low", "high"] = dspy.InputField()
    count: int = dspy.OutputField()
    score: float = dspy.OutputField()
    active: bool = dspy.OutputField()
    labels: list[str] = dspy.OutputField()
    tier: Literal["free", "pro", "enterprise"] = dspy.OutputField()
    customer: Customer = dspy.OutputField()


class TypedProfile(dspy.Module):  # type: ignore[misc]
    def __init__(self) -> None:
        super().__init__()
        self.profile = dspy.Predict(Profile)

    async def aforward(self, text: str, level: Literal["low", "high"]) -> dspy.Prediction:
        return await self.profile.acall(text=text, level=level)


class CodeOnly(dspy.Module):  # type: ignore[misc]
    """Makes no LM call at all: a pure code path."""

    def forward(self, a: int, b: int) -> dspy.Prediction:
        return dspy.Prediction(total=a + b)


class Unencodable(dspy.Module):  # type: ignore[misc]
    """Answers with an integer beyond 64 bits, which JSON cannot carry to most clients."""

    def forward(self, question: str) -> dspy.Prediction:
        return dspy.Prediction(answer=2**70)


class LoneSurrogate(dspy.Module):  # type: ignore[misc]
    """Answers with a string holding a lone surrogate, which is not valid UTF-8 and so not JSON."""

    def forward(self, question: str) -> dspy.Prediction:
        return dspy.Prediction(answer="half a character: \ud800")
