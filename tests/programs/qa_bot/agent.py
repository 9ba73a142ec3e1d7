"""A ReAct agent with Python tools, one of which always raises."""

from __future__ import annotations

import dspy

CALLS: list[str] = []


def lookup_weather(city: str) -> str:
    """Look up today's weather in a city."""
    return f"It is sunny in {city}."


def broken_tool(city: str) -> str:
    """A tool that always fails."""
    raise RuntimeError("the weather service is down")


def make_agent() -> dspy.Module:
    return dspy.ReAct("question -> answer", tools=[lookup_weather], max_iters=3)


def make_broken_agent() -> dspy.Module:
    return dspy.ReAct("question -> answer", tools=[broken_tool], max_iters=3)
