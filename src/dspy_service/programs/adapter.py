"""The adapter programs run with: DSPy's default ChatAdapter, formatting each signature's system
message once."""

from __future__ import annotations

import weakref
from typing import Any

import dspy


class CachingChatAdapter(dspy.ChatAdapter):  # type: ignore[misc]  # dspy is Any to mypy
    """DSPy's ChatAdapter (the one DSPy uses when none is configured), with the system message
    formatted once per signature instead of on every call.

    The system message is a function of the signature alone (its fields, their types and its
    instructions); DSPy rebuilds it per call, building a pydantic TypeAdapter for each field on the
    way, which was about a tenth of a miss's CPU. Overriding `format_system_message` is the
    adapter's documented way to change it; a signature whose state changes is a new class, so a
    new key. Weakly keyed: the signatures of programs a reload retired go with them. Bounded:
    signatures made per call are formatted as before once the map is full.
    """

    _MAX_SIGNATURES = 256

    def __init__(self) -> None:
        super().__init__()
        self._system_messages: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()

    def format_system_message(self, signature: Any) -> str:
        found = self._system_messages.get(signature)
        if found is None:
            found = str(super().format_system_message(signature))
            if len(self._system_messages) < self._MAX_SIGNATURES:
                self._system_messages[signature] = found
        return found


ADAPTER = CachingChatAdapter()


def formatted_prompt_bytes(predictor: Any, inputs: dict[str, Any]) -> int | None:
    """The bytes of the messages `predictor` would send for `inputs` (its demos included), as the
    adapter formats them; None when they cannot be formatted here (the run will say why)."""
    try:
        messages = ADAPTER.format(predictor.signature, predictor.demos, inputs)
    except (TypeError, ValueError, KeyError, AttributeError):
        return None
    return sum(len(str(message.get("content", "")).encode()) for message in messages)
