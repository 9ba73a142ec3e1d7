"""Classify the question's topic, then answer it knowing the topic: two predictors, so that an
optimizer's demos and the models file's pins can be seen per predictor."""

from __future__ import annotations

from typing import Literal

import dspy

Topic = Literal["geography", "science", "other"]


class Classify(dspy.Signature):  # type: ignore[misc]  # dspy is Any to mypy
    """Name the topic of the question."""

    question: str = dspy.InputField()
    topic: Topic = dspy.OutputField()


class Answer(dspy.Signature):  # type: ignore[misc]
    """Answer the question in one sentence."""

    question: str = dspy.InputField()
    topic: Topic = dspy.InputField()
    answer: str = dspy.OutputField()


class TopicAnswer(dspy.Module):  # type: ignore[misc]
    def __init__(self) -> None:
        super().__init__()
        self.classify = dspy.Predict(Classify)
        self.answer = dspy.Predict(Answer)

    def forward(self, question: str) -> dspy.Prediction:
        topic = self.classify(question=question).topic
        answer = self.answer(question=question, topic=topic).answer
        return dspy.Prediction(topic=topic, answer=answer)


class OnlyAsync(dspy.Module):  # type: ignore[misc]
    """A program with `aforward` alone: the service serves it, DSPy's optimizers cannot run it."""

    def __init__(self) -> None:
        super().__init__()
        self.answer = dspy.Predict("question -> answer")

    async def aforward(self, question: str) -> dspy.Prediction:
        return await self.answer.acall(question=question)
