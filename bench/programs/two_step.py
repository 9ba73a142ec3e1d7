"""The bench's module program: two `dspy.Predict` steps, rewrite a question into a search query, then
answer it from both; two provider calls per run, as a small pipeline of a user's own makes.

Two flavours of the same program, served as `module:` variants (PROGRAMS_PATH=bench/programs):

- `TwoStepAsync` has `aforward`: the service runs it with `acall` on its event loop;
- `TwoStepSync` has only `forward`: the service runs it in its program thread pool (DSPy's asyncify).

Built once and shared by concurrent runs, as DSPy intends: no per-run state on `self`.
"""

from __future__ import annotations

from typing import Any

import dspy


class TwoStepSync(dspy.Module):  # type: ignore[misc]  # dspy is Any to mypy
    """Rewrite, then answer: only a synchronous `forward`."""

    def __init__(self) -> None:
        super().__init__()
        self.rewrite = dspy.Predict("question -> query")
        self.answer = dspy.Predict("question, query -> answer")

    def forward(self, question: str) -> Any:
        query = self.rewrite(question=question).query
        return self.answer(question=question, query=query)


class TwoStepAsync(TwoStepSync):
    """The same two steps with `aforward`: each predictor awaited with `acall`."""

    async def aforward(self, question: str) -> Any:
        rewritten = await self.rewrite.acall(question=question)
        return await self.answer.acall(question=question, query=rewritten.query)
