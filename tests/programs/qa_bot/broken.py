"""Programs that cannot be built: start-up must stop with a clean message."""

from __future__ import annotations

import dspy


def failing_factory() -> dspy.Module:
    raise RuntimeError("the factory needs a database that is not there")


def not_a_module() -> object:
    return object()
