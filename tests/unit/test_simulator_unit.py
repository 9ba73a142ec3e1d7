"""The simulator reads the fields a DSPy ChatAdapter prompt asks for."""

from __future__ import annotations

from dspy_service.simulator import _compose_answer, count_tokens


def test_answers_every_requested_field_in_chat_adapter_format() -> None:
    """Both `reasoning` and `answer` are answered, then the completed marker."""
    messages = [
        {
            "role": "system",
            "content": "Your output fields are:\n1. `reasoning` (str)\n2. `answer` (int)\nAll interactions",
        },
        {
            "role": "user",
            "content": "[[ ## question ## ]]\nhow many?\n\nRespond with the corresponding output fields, "
            "starting with the field `[[ ## reasoning ## ]]`, then `[[ ## answer ## ]]`, "
            "and then ending with the marker for `[[ ## completed ## ]]`.",
        },
    ]
    content = _compose_answer(messages, as_json=False)
    assert content.index("[[ ## reasoning ## ]]") < content.index("[[ ## answer ## ]]")
    assert content.rstrip().endswith("[[ ## completed ## ]]")
    answer = content.split("[[ ## answer ## ]]")[1].split("[[ ## completed")[0].strip()
    assert answer.isdigit()


def test_token_count_is_words_and_punctuation() -> None:
    """The simulator's tokenizer is deterministic."""
    assert count_tokens("Hello, world!") == 4
