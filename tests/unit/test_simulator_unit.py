"""The simulator answers what DSPy's adapters ask for, and real DSPy parses its answers.

The first tests call the answer composer directly; the rest drive real DSPy (``dspy.LM``, its
adapters, ``dspy.ReAct``, streaming) over real HTTP against the simulator served in-process.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any, Literal

import dspy
import pydantic
import pytest
import uvicorn

from dspy_service.simulator import SchemaFaker, Simulator, _compose_answer, count_tokens, create_simulator_app
from tests.support.processes import LOOPBACK, free_port, wait_until


class Address(pydantic.BaseModel):
    city: str
    zip_code: int


class Person(pydantic.BaseModel):
    name: str
    age: int
    nicknames: list[str]
    address: Address
    role: Literal["admin", "user"]


class TypedAnswer(dspy.Signature):  # type: ignore[misc]  # dspy is Any to mypy
    """Answer with values of many types."""

    question: str = dspy.InputField()
    count: int = dspy.OutputField()
    score: float = dspy.OutputField()
    ok: bool = dspy.OutputField()
    tags: list[str] = dspy.OutputField()
    label: Literal["positive", "negative"] = dspy.OutputField()
    person: Person = dspy.OutputField()
    extra: dict[str, Any] = dspy.OutputField()


class Labelled(dspy.Signature):  # type: ignore[misc]  # dspy is Any to mypy
    """Label a text."""

    text: str = dspy.InputField()
    label: Literal["positive", "negative", "neutral"] = dspy.OutputField()


# -- the composer alone --------------------------------------------------------------------------


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


@pytest.mark.parametrize("adapter", [dspy.ChatAdapter(), dspy.JSONAdapter()], ids=["chat", "json"])
def test_composed_answer_parses_with_the_adapter_that_asked(adapter: Any) -> None:
    """The answer to an adapter's own prompt goes through that adapter's parser, and is the same
    answer for the same input."""
    messages = adapter.format(TypedAnswer, demos=[], inputs={"question": "what is there?"})
    as_json = isinstance(adapter, dspy.JSONAdapter)
    content = _compose_answer(messages, as_json=as_json)
    assert content == _compose_answer(messages, as_json=as_json)
    parsed = adapter.parse(TypedAnswer, content)
    assert isinstance(parsed["person"], Person)
    assert parsed["label"] in ("positive", "negative")


def test_schema_faker_follows_bounds_formats_optionals_and_recursion() -> None:
    """What pydantic writes into a schema, the faked value satisfies."""

    class Node(pydantic.BaseModel):
        name: str = pydantic.Field(min_length=12, max_length=20)
        weight: int = pydantic.Field(ge=10, le=12)
        ratio: float = pydantic.Field(gt=0, lt=1)
        seen: pydantic.AwareDatetime
        parent: Node | None = None
        children: list[Node] = []
        pair: tuple[int, str]

    schema = Node.model_json_schema()
    value = SchemaFaker(schema, "seed").value(schema, "node")
    node = Node.model_validate(value)
    assert 10 <= node.weight <= 12
    assert node.parent is not None  # optional parts are filled in while the nesting is shallow


# -- real DSPy over HTTP -------------------------------------------------------------------------


class _ServedSimulator:
    """The simulator app served by uvicorn on a free loopback port, in a background thread."""

    def __init__(self) -> None:
        self.port = free_port()
        self.app = create_simulator_app()
        config = uvicorn.Config(self.app, host=LOOPBACK, port=self.port, log_level="warning", lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="simulator", daemon=True)

    @property
    def api_base(self) -> str:
        return f"http://{LOOPBACK}:{self.port}/v1"

    @property
    def simulator(self) -> Simulator:
        simulator: Simulator = self.app.state.simulator
        return simulator

    def start(self) -> None:
        self.thread.start()
        wait_until(lambda: self.server.started, timeout=10, what="the in-process simulator to start")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def served() -> Iterator[_ServedSimulator]:
    served = _ServedSimulator()
    served.start()
    try:
        yield served
    finally:
        served.stop()


@pytest.fixture
def lm(served: _ServedSimulator) -> Iterator[Any]:
    """A real dspy.LM pointed at the simulator, as the current LM; no answer comes from a cache."""
    dspy.configure_cache(enable_disk_cache=False, enable_memory_cache=False)
    model = dspy.LM("openai/sim-model", api_base=served.api_base, api_key="x", cache=False)
    with dspy.context(lm=model, adapter=dspy.ChatAdapter()):
        yield model


def _assert_typed(prediction: Any) -> None:
    assert isinstance(prediction.count, int)
    assert isinstance(prediction.score, float)
    assert isinstance(prediction.ok, bool)
    assert isinstance(prediction.tags, list)
    assert prediction.tags
    assert all(isinstance(tag, str) for tag in prediction.tags)
    assert prediction.label in ("positive", "negative")
    assert isinstance(prediction.person, Person)
    assert isinstance(prediction.person.address, Address)
    assert isinstance(prediction.person.address.zip_code, int)
    assert all(isinstance(nickname, str) for nickname in prediction.person.nicknames)
    assert prediction.person.role in ("admin", "user")
    assert isinstance(prediction.extra, dict)


def test_typed_outputs_parse_through_the_chat_adapter_in_one_call(lm: Any, served: _ServedSimulator) -> None:
    """int, float, bool, list[str], Literal, a nested pydantic model and a dict parse at the first
    try: one provider call, no fallback to JSONAdapter."""
    calls_before = served.simulator.stats.calls
    prediction = dspy.Predict(TypedAnswer)(question="Describe the team.")
    _assert_typed(prediction)
    assert served.simulator.stats.calls == calls_before + 1


def test_typed_outputs_parse_through_the_json_adapter(lm: Any, served: _ServedSimulator) -> None:
    """With JSONAdapter the answer is a JSON object that DSPy parses into the same types."""
    calls_before = served.simulator.stats.calls
    with dspy.context(adapter=dspy.JSONAdapter()):
        prediction = dspy.Predict(TypedAnswer)(question="Describe the team.")
    _assert_typed(prediction)
    assert served.simulator.stats.calls == calls_before + 1


def test_chain_of_thought_keeps_the_capital_of_france_answer(lm: Any) -> None:
    """Plain text fields keep their old answers, which other tests rely on."""
    prediction = dspy.ChainOfThought("question -> answer")(question="What is the capital of France?")
    assert prediction.answer == "The capital of France is Paris."
    assert isinstance(prediction.reasoning, str)


def test_literal_choice_is_deterministic_and_depends_on_the_input(lm: Any) -> None:
    """The same text gets the same label; different texts get different labels."""
    predict = dspy.Predict(Labelled)
    labels = [predict(text=f"review number {i}").label for i in range(12)]
    assert set(labels) <= {"positive", "negative", "neutral"}
    assert len(set(labels)) > 1
    assert predict(text="review number 3").label == labels[3]


@pytest.mark.parametrize("adapter", [dspy.ChatAdapter(), dspy.JSONAdapter()], ids=["chat", "json"])
def test_react_calls_the_tool_with_its_argument_names_then_finishes(lm: Any, adapter: Any) -> None:
    """ReAct's agent calls the listed tool with arguments of the right names and types, then
    chooses `finish`, and the extraction step answers."""
    calls: list[dict[str, Any]] = []

    def lookup_population(city: str, year: int) -> str:
        """The population of a city in a year."""
        calls.append({"city": city, "year": year})
        return f"{city} had 2,100,000 people in {year}."

    with dspy.context(adapter=adapter):
        prediction = dspy.ReAct("question -> answer", tools=[lookup_population])(
            question="How many people lived in Paris in 2020?"
        )
    assert calls
    assert all(isinstance(call["city"], str) and isinstance(call["year"], int) for call in calls)
    trajectory = prediction.trajectory
    assert trajectory["tool_name_0"] == "lookup_population"
    assert set(trajectory["tool_args_0"]) == {"city", "year"}
    assert "2,100,000" in trajectory["observation_0"]
    assert trajectory["tool_name_1"] == "finish"
    assert isinstance(prediction.answer, str)
    assert prediction.answer


async def test_streamed_typed_answer_parses(lm: Any, served: _ServedSimulator) -> None:
    """Streamed (``stream: true``) answers carry typed fields that parse as well."""
    streams_before = served.simulator.stats.streams_completed
    program = dspy.streamify(
        dspy.Predict(TypedAnswer),
        stream_listeners=[dspy.streaming.StreamListener(signature_field_name="label")],
    )
    chunks: list[Any] = []
    async for chunk in program(question="Describe the team."):
        chunks.append(chunk)
    final = chunks[-1]
    assert isinstance(final, dspy.Prediction)
    _assert_typed(final)
    streamed = "".join(c.chunk for c in chunks if isinstance(c, dspy.streaming.StreamResponse))
    assert streamed.strip() == final.label
    assert served.simulator.stats.streams_completed == streams_before + 1
