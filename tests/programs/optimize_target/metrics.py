"""Metrics as DSPy calls them, `(example, prediction, trace=None)`, for `optimize --metric`."""

from __future__ import annotations

from typing import Any


def echoes_question(example: Any, prediction: Any, trace: Any = None) -> bool:
    """The answer repeats the question's last word (the simulator's answers echo their input)."""
    last_word = str(example.question).split()[-1].strip("?")
    return last_word in str(prediction.answer)


def not_a_number(example: Any, prediction: Any, trace: Any = None) -> str:
    """A broken metric: returns text, which can be neither a score nor a pass."""
    return "yes"


NOT_CALLABLE = 42
