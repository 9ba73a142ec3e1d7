"""Tool calls of programs, observed through DSPy's own callback mechanism.

A program that holds a `dspy.Tool` (a ReAct agent's tools, or a tool a custom module keeps) runs
with its variant's `ToolObserver` in `dspy.context(callbacks=...)`; DSPy calls it around every tool
call: counted in `dspy_tool_calls_total{variant,tool,status}` and, with tracing on, a `tool.call`
span. A tool that raises is the program's business (ReAct shows the error to the model): it is
counted as an error, never turned into a failed request here. Programs without tools run with no
callbacks at all, so they pay nothing for it. (A Tool is a pydantic model with no `callbacks`
field, so DSPy's instance-level callbacks cannot be given to it.)
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

import dspy
from dspy.utils.callback import BaseCallback

from dspy_service.metrics import Metrics

if TYPE_CHECKING:
    from opentelemetry.trace import Span

    from dspy_service.tracing import Tracing


class ToolObserver(BaseCallback):  # type: ignore[misc]  # dspy is Any to mypy
    """Counts (and traces) the calls of the tools of one variant."""

    def __init__(self, variant: str, metrics: Metrics, tracing: Tracing | None) -> None:
        self._variant = variant
        self._metrics = metrics
        self._tracing = tracing
        # call id -> (tool name, span): start and end may run in a program's thread
        self._open: dict[str, tuple[str, Span | None]] = {}
        self._lock = threading.Lock()

    def on_tool_start(self, call_id: str, instance: Any, inputs: dict[str, Any]) -> None:
        name = str(getattr(instance, "name", None) or type(instance).__name__)
        span = self._tracing.start_tool_span(name, self._variant) if self._tracing is not None else None
        with self._lock:
            self._open[call_id] = (name, span)

    def on_tool_end(self, call_id: str, outputs: Any, exception: BaseException | None = None) -> None:
        with self._lock:
            name, span = self._open.pop(call_id, ("unknown", None))
        status = "ok" if exception is None else "error"
        self._metrics.tool_calls.labels(self._variant, name, status).inc()
        if span is not None:
            if exception is not None:
                span.set_attribute("error.type", type(exception).__name__)
            span.end()


def program_tools(module: Any) -> list[Any]:
    """Every dspy.Tool a program holds: in ReAct-style `tools` mappings or lists, or as attributes."""
    found: dict[int, Any] = {}
    for _, sub in [("", module), *module.named_sub_modules()]:
        holders = list(vars(sub).values())
        for value in holders:
            candidates = (
                value.values() if isinstance(value, dict) else value if isinstance(value, list) else [value]
            )
            for candidate in candidates:
                if isinstance(candidate, dspy.Tool):
                    found[id(candidate)] = candidate
    return list(found.values())
