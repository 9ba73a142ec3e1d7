"""Python types whose JSON Schema cannot be made, for tests of what the service does then."""

from __future__ import annotations

from typing import Any

from pydantic_core import core_schema


class Unruly:
    """A type whose JSON Schema hook raises something pydantic does not."""

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: Any) -> core_schema.CoreSchema:
        return core_schema.any_schema()

    @classmethod
    def __get_pydantic_json_schema__(cls, schema: Any, handler: Any) -> dict[str, Any]:
        raise RuntimeError("cannot describe myself")
