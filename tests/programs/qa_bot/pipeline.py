"""A two-predictor pipeline (rewrite the question, then answer it with notes), in a synchronous
flavour (only `forward`) and an asynchronous one (`aforward`)."""

from __future__ import annotations

import time

import dspy


class Rewrite(dspy.Signature):  # type: ignore[misc]  # dspy is Any to mypy
    """Rewrite the question as a short search query."""

    question: str = dspy.InputField()
    query: str = dspy.OutputField()


class Answer(dspy.Signature):  # type: ignore[misc]
    """Answer the question using the notes."""

    question: str = dspy.InputField()
    notes: list[str] = dspy.InputField()
    answer: str = dspy.OutputField()


class SyncPipeline(dspy.Module):  # type: ignore[misc]
    def __init__(self) -> None:
        super().__init__()
        self.rewrite = dspy.Predict(Rewrite)
        self.draft = dspy.ChainOfThought(Answer)

    def forward(self, question: str, notes: list[str] | None = None) -> dspy.Prediction:
        query = self.rewrite(question=question).query
        return self.draft(question=query, notes=notes or [])


class AsyncPipeline(SyncPipeline):
    async def aforward(self, question: str, notes: list[str] | None = None) -> dspy.Prediction:
        query = (await self.rewrite.acall(question=question)).query
        return await self.draft.acall(question=query, notes=notes or [])


class SlowPipeline(SyncPipeline):
    """Synchronous and slow in its own code (as a retrieval step may be): holds its thread."""

    SLEEP_SECS = 1.0

    def forward(self, question: str, notes: list[str] | None = None) -> dspy.Prediction:
        time.sleep(self.SLEEP_SECS)
        return super().forward(question=question, notes=notes)


def make_pipeline() -> SyncPipeline:
    """A zero-argument factory, the other form a `module:` path may name."""
    return SyncPipeline()


class WithOwnLM(SyncPipeline):
    """Sets an LM of its own on a predictor, as a program optimized elsewhere may."""

    def __init__(self) -> None:
        super().__init__()
        self.rewrite.lm = dspy.LM("openai/gpt-4o-mini", api_base="http://127.0.0.1:9/v1", api_key="x")
