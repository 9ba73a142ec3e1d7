"""Users' own DSPy programs served over real HTTP: modules with several predictors (synchronous and
asynchronous), typed inputs and outputs, ReAct tools, pinned predictors, whole saved programs."""

from __future__ import annotations

import concurrent.futures
import json
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.conftest import ServiceFactory
from tests.support.metrics_text import sample_value
from tests.support.processes import RedisServer, ServiceProcess, Simulator, run_service_expecting_failure
from tests.support.redis_keys import STATE_PREFIX

PROGRAMS_DIR = Path(__file__).resolve().parents[1] / "programs"

MODELS = """
models:
  gpt-3.5-turbo:
    name: openai/gpt-3.5-turbo
    cost_per_1k_input_tokens: 0.0005
    cost_per_1k_output_tokens: 0.0015
  gpt-4:
    name: openai/gpt-4
    cost_per_1k_input_tokens: 0.03
    cost_per_1k_output_tokens: 0.06
"""

VARIANTS = """
default_variant: sync
variants:
  sync: {module: "qa_bot.pipeline:SyncPipeline"}
  async: {module: "qa_bot.pipeline:AsyncPipeline"}
  factory: {module: "qa_bot.pipeline:make_pipeline"}
  pinned: {module: "qa_bot.pipeline:AsyncPipeline", models: {draft: gpt-4}, output_field: answer}
  slow: {module: "qa_bot.pipeline:SlowPipeline"}
  typed: {module: "qa_bot.typed:TypedProfile", output_field: customer}
  code: {module: "qa_bot.typed:CodeOnly"}
  unencodable: {module: "qa_bot.typed:Unencodable"}
  surrogate: {module: "qa_bot.typed:LoneSurrogate"}
  agent: {module: "qa_bot.agent:make_agent"}
  broken_agent: {module: "qa_bot.agent:make_broken_agent"}
  plain: {signature: "question -> answer"}
"""


def write_models(directory: Path, variants: str = VARIANTS, models: str = MODELS) -> Path:
    path = directory / "models.yaml"
    path.write_text(models + variants, encoding="utf-8")
    return path


def program_env(models_file: Path, **extra: str) -> dict[str, str]:
    return {"MODELS_CONFIG": str(models_file), "PROGRAMS_PATH": str(PROGRAMS_DIR), **extra}


@pytest.fixture(scope="module")
def programs_service(
    redis_server: Any, simulator: Simulator, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServiceProcess]:
    from tests.integration.conftest import base_env

    workdir = tmp_path_factory.mktemp("programs")
    env = {**base_env(redis_server, simulator), **program_env(write_models(workdir))}
    service = ServiceProcess(env, workdir, "programs")
    service.start()
    yield service
    service.stop()


_counter = iter(range(1_000_000))


def unique(text: str) -> str:
    return f"{text} #{next(_counter)}-{time.monotonic_ns()}"


def predict(service: ServiceProcess, **body: Any) -> httpx.Response:
    return service.http.post("/v1/predict", json={"model": "gpt-3.5-turbo", **body})


@pytest.mark.parametrize("variant", ["sync", "async", "factory"])
def test_a_two_predictor_module_answers_with_every_output_field(
    programs_service: ServiceProcess, sim: Simulator, variant: str
) -> None:
    """A module with two predictors (sync forward, aforward, or built by a factory) makes both calls,
    and answers with every field of its Prediction, `output` being the first that is not reasoning."""
    question = unique("How do I reset my password?")
    response = predict(programs_service, variant=variant, inputs={"question": question, "notes": ["a", "b"]})
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body["outputs"]) == {"reasoning", "answer"}
    assert body["output"] == body["outputs"]["answer"]
    assert sim.stats()["calls"] == 2  # rewrite, then draft
    meta = body["metadata"]
    usage = meta["usage_by_model"]
    assert set(usage) == {"gpt-3.5-turbo"}
    assert usage["gpt-3.5-turbo"]["calls"] == 2
    assert meta["input_tokens"] == usage["gpt-3.5-turbo"]["input_tokens"] == sim.stats()["prompt_tokens"]
    assert meta["output_tokens"] == sim.stats()["completion_tokens"]
    # the same request again is a hit, whether its inputs come as `inputs` or `input` + parameters
    again = predict(programs_service, variant=variant, input=question, parameters={"notes": ["a", "b"]})
    assert again.json()["metadata"]["cache_level"] == "memory"
    assert again.json()["outputs"] == body["outputs"]


def test_a_pinned_predictor_calls_its_own_model_and_is_charged_to_it(
    programs_service: ServiceProcess, sim: Simulator
) -> None:
    """`models: {draft: gpt-4}` sends the draft step to gpt-4 and the rest to the request's model;
    each model's tokens are priced at its own price and counted on its own /costs row."""
    before = programs_service.http.get("/costs").json()
    body = predict(
        programs_service, variant="pinned", inputs={"question": unique("Where is my order?")}
    ).json()
    assert sim.stats()["by_model"] == {"gpt-3.5-turbo": 1, "gpt-4": 1}
    usage = body["metadata"]["usage_by_model"]
    assert set(usage) == {"gpt-3.5-turbo", "gpt-4"}
    cheap, dear = usage["gpt-3.5-turbo"], usage["gpt-4"]
    assert cheap["cost_usd"] == pytest.approx(
        cheap["input_tokens"] * 0.0005 / 1000 + cheap["output_tokens"] * 0.0015 / 1000
    )
    assert dear["cost_usd"] == pytest.approx(
        dear["input_tokens"] * 0.03 / 1000 + dear["output_tokens"] * 0.06 / 1000
    )
    assert body["metadata"]["cost_usd"] == pytest.approx(cheap["cost_usd"] + dear["cost_usd"])
    assert body["metadata"]["input_tokens"] == cheap["input_tokens"] + dear["input_tokens"]

    def row(costs: dict[str, Any], name: str) -> dict[str, Any]:
        return costs.get(name) or {"total_requests": 0, "total_cost_usd": 0.0}

    def settled() -> dict[str, Any]:
        return dict(programs_service.http.get("/costs").json())

    after = settled()
    gained_cheap = (
        row(after, "gpt-3.5-turbo:pinned")["total_cost_usd"]
        - row(before, "gpt-3.5-turbo:pinned")["total_cost_usd"]
    )
    gained_dear = row(after, "gpt-4:pinned")["total_cost_usd"] - row(before, "gpt-4:pinned")["total_cost_usd"]
    assert gained_cheap == pytest.approx(cheap["cost_usd"])
    assert gained_dear == pytest.approx(dear["cost_usd"])
    # the request is counted once, on the model it asked for
    assert (
        row(after, "gpt-3.5-turbo:pinned")["total_requests"]
        - row(before, "gpt-3.5-turbo:pinned")["total_requests"]
        == 1
    )
    assert row(after, "gpt-4:pinned")["total_requests"] == row(before, "gpt-4:pinned")["total_requests"]
    metrics = programs_service.http.get("/metrics").text
    assert sample_value(metrics, "dspy_prediction_cost_total", model="gpt-4", variant="pinned") > 0


def test_typed_outputs_arrive_as_json_of_their_types(
    programs_service: ServiceProcess, sim: Simulator
) -> None:
    """int, float, bool, list, Literal and a pydantic model (nested) come back as JSON of those
    kinds, parsed by DSPy from what the provider wrote; `output_field` picks the model."""
    response = predict(programs_service, variant="typed", inputs={"text": unique("Ann, 41"), "level": "high"})
    assert response.status_code == 200, response.text
    outputs = response.json()["outputs"]
    assert isinstance(outputs["count"], int)
    assert not isinstance(outputs["count"], bool)
    assert isinstance(outputs["score"], float)
    assert isinstance(outputs["active"], bool)
    assert isinstance(outputs["labels"], list)
    assert all(isinstance(x, str) for x in outputs["labels"])
    assert outputs["tier"] in ("free", "pro", "enterprise")
    customer = outputs["customer"]
    assert set(customer) == {"name", "age", "address", "tags"}
    assert isinstance(customer["age"], int)
    assert set(customer["address"]) == {"city", "postcode"}
    assert response.json()["output"] == customer


@pytest.mark.parametrize(
    ("variant", "inputs", "named"),
    [
        ("typed", {"text": "x", "level": "medium"}, "inputs.level"),  # not one of the Literal's
        ("typed", {"text": 5, "level": "low"}, "inputs.text"),  # a number for a string
        ("typed", {"level": "low"}, "inputs.text"),  # missing
        ("typed", {"text": "x", "level": "low", "mood": "sad"}, "inputs.mood"),  # unknown
        ("sync", {"question": "q", "notes": "not a list"}, "inputs.notes"),
        ("sync", {"question": "q", "notes": [1, 2]}, "inputs.notes.0"),
        ("code", {"a": "1", "b": 2}, "inputs.a"),  # a string is not an int: no coercion
        ("code", {"a": 1.5, "b": 2}, "inputs.a"),
    ],
)
def test_a_mistyped_missing_or_unknown_input_is_a_422_naming_it(
    programs_service: ServiceProcess, sim: Simulator, variant: str, inputs: dict[str, Any], named: str
) -> None:
    """Inputs are checked against the program's declared types before anything is called."""
    response = predict(programs_service, variant=variant, inputs=inputs)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request"
    assert named in error["message"]
    assert "expected" in error["message"] or "not an input field" in error["message"]
    assert error["request_id"] == response.headers["x-request-id"]
    assert sim.stats()["calls"] == 0


def test_input_and_inputs_together_are_refused(programs_service: ServiceProcess) -> None:
    """A request gives `input` or `inputs`, never both, and never neither."""
    both = predict(programs_service, variant="sync", input="q", inputs={"question": "q"})
    assert both.status_code == 422
    assert "not both" in both.json()["error"]["message"]
    neither = predict(programs_service, variant="sync")
    assert neither.status_code == 422
    assert "neither" in neither.json()["error"]["message"]


def test_a_program_without_lm_calls_answers_with_zero_tokens(
    programs_service: ServiceProcess, sim: Simulator
) -> None:
    """A pure code path is served like any program, and spends nothing."""
    body = predict(programs_service, variant="code", inputs={"a": 2, "b": 40}).json()
    assert body["outputs"] == {"total": 42}
    assert body["output"] == 42
    assert (body["metadata"]["input_tokens"], body["metadata"]["cost_usd"]) == (0, 0.0)
    assert body["metadata"]["usage_by_model"] == {}
    assert sim.stats()["calls"] == 0


@pytest.mark.parametrize("variant", ["unencodable", "surrogate"])
def test_an_output_that_cannot_be_json_is_a_502_and_not_cached(
    programs_service: ServiceProcess, variant: str
) -> None:
    """An integer beyond 64 bits, a lone surrogate: refused as the program's failure (502, never a
    500), and nothing is cached (the same request fails the same way again)."""
    question = unique("big")
    for _ in range(2):
        response = predict(programs_service, variant=variant, inputs={"question": question})
        assert response.status_code == 502, response.text
        assert "cannot be encoded as JSON" in response.json()["error"]["message"]


def test_a_react_agent_calls_its_tool_and_the_calls_are_counted(
    programs_service: ServiceProcess, sim: Simulator
) -> None:
    """A ReAct program calls its Python tool (observed through DSPy's callbacks: a metric per tool);
    a tool that raises is shown to the model, counted as an error, and the request still answers."""
    ok = predict(programs_service, variant="agent", inputs={"question": unique("Weather in Oslo?")})
    assert ok.status_code == 200, ok.text
    trajectory = ok.json()["outputs"]["trajectory"]
    assert trajectory["tool_name_0"] == "lookup_weather"
    assert "sunny" in trajectory["observation_0"]
    assert ok.json()["output"] == ok.json()["outputs"]["answer"]
    failing = predict(programs_service, variant="broken_agent", inputs={"question": unique("Weather?")})
    assert failing.status_code == 200, failing.text
    assert "weather service is down" in str(failing.json()["outputs"]["trajectory"]["observation_0"])
    metrics = programs_service.http.get("/metrics").text
    assert (
        sample_value(metrics, "dspy_tool_calls_total", variant="agent", tool="lookup_weather", status="ok")
        >= 1
    )
    assert (
        sample_value(
            metrics, "dspy_tool_calls_total", variant="broken_agent", tool="broken_tool", status="error"
        )
        >= 1
    )


def test_synchronous_programs_run_in_parallel_and_the_probes_stay_fast(
    programs_service: ServiceProcess, sim: Simulator
) -> None:
    """Eight requests to a program that holds its thread for a second finish in about a second in
    all (they run in the program thread pool, not one after another on the event loop), and
    /health answers promptly meanwhile."""
    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(max_workers=9) as pool:
        calls = [
            pool.submit(predict, programs_service, variant="slow", inputs={"question": unique(f"slow {n}")})
            for n in range(8)
        ]
        time.sleep(0.3)  # every request is now inside its sleep
        probe_started = time.monotonic()
        health = programs_service.http.get("/health")
        probe_secs = time.monotonic() - probe_started
        busy = sample_value(programs_service.http.get("/metrics").text, "dspy_program_threads_busy")
        statuses = [call.result().status_code for call in calls]
    elapsed = time.monotonic() - started
    print(f"8 slow sync requests: {elapsed:.2f} s in all; /health in {probe_secs * 1000:.1f} ms; busy {busy}")
    assert statuses == [200] * 8
    assert health.status_code == 200
    assert probe_secs < 0.5
    assert busy == 8
    assert elapsed < 8 * 1.0  # not one after another


def test_a_synchronous_program_past_its_deadline_answers_504_on_time_and_its_tokens_still_count(
    service_factory: ServiceFactory, sim: Simulator, tmp_path: Path
) -> None:
    """The deadline answers 504 on time even though the thread cannot be stopped; the thread counts
    as busy until it returns, and the tokens it spends afterwards reach the cost totals."""
    models = write_models(
        tmp_path, "default_variant: late\nvariants:\n  late: {module: qa_bot.pipeline:SlowPipeline}\n"
    )
    service = service_factory(**program_env(models, REQUEST_TIMEOUT_SECS="0.5"))
    started = time.monotonic()
    response = predict(service, variant="late", inputs={"question": unique("late")})
    elapsed = time.monotonic() - started
    assert response.status_code == 504, response.text
    assert elapsed < 0.95  # the deadline, not the program's second of sleep
    assert sample_value(service.http.get("/metrics").text, "dspy_program_threads_busy") == 1

    def late_tokens_counted() -> bool:
        row = service.http.get("/costs").json().get("gpt-3.5-turbo:late") or {}
        spent = sim.stats()
        return bool(spent["calls"] == 2 and int(row.get("total_input_tokens", 0)) == spent["prompt_tokens"])

    deadline = time.monotonic() + 10
    while not late_tokens_counted() and time.monotonic() < deadline:
        time.sleep(0.1)
    row = service.http.get("/costs").json().get("gpt-3.5-turbo:late")
    print(f"after the deadline: provider {sim.stats()}; /costs row {row}")
    assert late_tokens_counted(), "the late calls' tokens never reached /costs"
    assert row is not None
    assert row["total_requests"] == 1
    assert sample_value(service.http.get("/metrics").text, "dspy_program_threads_busy") == 0


def stream_events(service: ServiceProcess, body: dict[str, Any]) -> list[tuple[str, Any]]:
    events: list[tuple[str, Any]] = []
    with service.http.stream("POST", "/v1/predict/stream", json=body) as response:
        assert response.status_code == 200
        event = None
        for line in response.iter_lines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                events.append((str(event), json.loads(line[6:])))
    assert events[-1][0] == "result", events[-3:]
    return events


def test_a_module_streams_chunks_naming_their_predictor(
    programs_service: ServiceProcess, sim: Simulator
) -> None:
    """Streaming a two-predictor module: chunks of both predictors' text fields arrive, each naming
    the predictor that wrote it, then the result."""
    body = {"model": "gpt-3.5-turbo", "variant": "async", "inputs": {"question": unique("Stream me")}}
    events = stream_events(programs_service, body)
    chunks = [data for kind, data in events if kind == "chunk"]
    predictors = {chunk["predictor"] for chunk in chunks}
    assert predictors == {"rewrite", "draft.predict"}
    drafted = [c for c in chunks if (c["predictor"], c["field"]) == ("draft.predict", "answer")]
    answer = "".join(c["text"] for c in drafted)
    assert answer.strip() == events[-1][1]["outputs"]["answer"]


def test_a_react_agent_streams_every_step(programs_service: ServiceProcess, sim: Simulator) -> None:
    """A ReAct loop calls its step predictor more than once: its listener is reused, so the thoughts
    of every step stream, then the extraction's answer."""
    body = {"model": "gpt-3.5-turbo", "variant": "agent", "inputs": {"question": unique("Weather in Bern?")}}
    events = stream_events(programs_service, body)
    chunks = [data for kind, data in events if kind == "chunk"]
    thoughts = [c for c in chunks if (c["predictor"], c["field"]) == ("react", "next_thought")]
    steps = sim.stats()["calls"] - 1  # the last call is the extraction
    assert steps >= 2
    streamed = "".join(c["text"] for c in thoughts)
    assert "call lookup_weather" in streamed  # the first step's thought
    assert "so I can finish" in streamed  # the second's
    answer = "".join(c["text"] for c in chunks if c["field"] == "answer")
    assert answer.strip() == events[-1][1]["outputs"]["answer"]


def _save_whole_program(directory: Path) -> Path:
    """A program saved as DSPy users do: `save(path, save_program=True)` (cloudpickle)."""
    sys.path.insert(0, str(PROGRAMS_DIR))
    try:
        from qa_bot.pipeline import SyncPipeline  # type: ignore[import-not-found]  # PROGRAMS_DIR

        program = SyncPipeline()
        program.rewrite.demos = []
        saved = directory / "packed"
        program.save(str(saved), save_program=True)
    finally:
        sys.path.remove(str(PROGRAMS_DIR))
    return saved


def test_a_whole_saved_program_is_served_only_when_trusted(
    service_factory: ServiceFactory, sim: Simulator, tmp_path: Path
) -> None:
    """A directory written by save_program=True is served with trust_pickle: true, and refused at
    start-up without it (loading it runs code from the file)."""
    _save_whole_program(tmp_path)
    trusted = write_models(
        tmp_path, "default_variant: packed\nvariants:\n  packed: {saved: packed/, trust_pickle: true}\n"
    )
    service = service_factory(**program_env(trusted))
    body = predict(service, variant="packed", inputs={"question": unique("Packed?")}).json()
    assert set(body["outputs"]) == {"reasoning", "answer"}
    assert sim.stats()["calls"] == 2

    untrusted = write_models(tmp_path, "default_variant: packed\nvariants:\n  packed: {saved: packed/}\n")
    code, output = run_service_expecting_failure(program_env(untrusted), tmp_path)
    assert code == 2
    assert "variants.packed" in output
    assert "trust_pickle" in output
    assert "Traceback" not in output


def test_a_program_saved_by_another_dspy_version_loads_with_a_warning_naming_both(
    service_factory: ServiceFactory, sim: Simulator, tmp_path: Path
) -> None:
    """The versions a saved program's metadata records are compared with ours: a mismatch is a
    warning (with both versions) in our JSON log, and the program is served."""
    saved = _save_whole_program(tmp_path)
    metadata = json.loads((saved / "metadata.json").read_text(encoding="utf-8"))
    metadata["dependency_versions"]["dspy"] = "3.0.1"
    (saved / "metadata.json").write_text(json.dumps(metadata), encoding="utf-8")
    models = write_models(
        tmp_path, "default_variant: old\nvariants:\n  old: {saved: packed, trust_pickle: true}\n"
    )
    service = service_factory(**program_env(models))
    assert predict(service, variant="old", inputs={"question": unique("old?")}).status_code == 200
    warnings = [line for line in service.log_lines() if line.get("event") == "program.version_mismatch"]
    assert len(warnings) == 1, warnings
    assert warnings[0]["variant"] == "old"
    assert warnings[0]["dependency"] == "dspy"
    assert warnings[0]["saved_version"] == "3.0.1"
    assert warnings[0]["current_version"] == metadata_version("dspy")


def test_an_lm_a_program_brought_along_is_replaced_by_the_requests_model(
    service_factory: ServiceFactory, sim: Simulator, tmp_path: Path
) -> None:
    """A predictor that arrives with an LM of its own (unreachable here) calls the request's model
    instead, and start-up says so: which model serves is the models file's to say."""
    models = write_models(
        tmp_path, "default_variant: own\nvariants:\n  own: {module: qa_bot.pipeline:WithOwnLM}\n"
    )
    service = service_factory(**program_env(models))
    response = predict(service, variant="own", inputs={"question": unique("own lm?")})
    assert response.status_code == 200, response.text
    assert sim.stats()["by_model"] == {"gpt-3.5-turbo": 2}
    [warning] = [line for line in service.log_lines() if line.get("event") == "program.lm_ignored"]
    assert (warning["variant"], warning["predictor"]) == ("own", "rewrite")


def metadata_version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


@pytest.mark.parametrize(
    ("variant", "problem"),
    [
        ("{module: qa_bot.nowhere:Thing}", "cannot import 'qa_bot.nowhere'"),
        ("{module: qa_bot.explodes:Thing}", "importing 'qa_bot.explodes' raised ImportError"),
        ("{module: qa_bot.pipeline:Missing}", "has no attribute 'Missing'"),
        ("{module: qa_bot.broken:failing_factory}", "raised RuntimeError: the factory needs a database"),
        ("{module: qa_bot.broken:not_a_module}", "not a dspy.Module"),
        (
            "{module: qa_bot.pipeline:SyncPipeline, models: {drafting: gpt-4}}",
            "models.drafting: names no predictor",
        ),
        ("{module: qa_bot.pipeline:SyncPipeline, models: {draft: gpt-5}}", "unknown model 'gpt-5'"),
        ("{module: qa_bot.pipeline:SyncPipeline, output_field: verdict}", "output_field: 'verdict'"),
        ("{module: qa_bot.pipeline:SyncPipeline, program: state.json}", "does not fit the module"),
        ("{module: qa_bot.pipeline:SyncPipeline, signature: 'a -> b'}", "signature belongs to"),
        ("{module: 'not an import path'}", "import path"),
    ],
)
def test_a_program_that_cannot_be_built_stops_start_up_naming_it(
    tmp_path: Path, variant: str, problem: str
) -> None:
    """Start-up stops (exit 2, no traceback) naming the file, the variant and the problem."""
    (tmp_path / "state.json").write_text('{"predict": {"demos": []}, "metadata": {}}', encoding="utf-8")
    models = write_models(tmp_path, f"default_variant: bad\nvariants:\n  bad: {variant}\n")
    code, output = run_service_expecting_failure(program_env(models), tmp_path)
    assert code == 2, output
    assert str(models) in output
    assert "variants.bad" in output
    assert problem in output
    assert "Traceback" not in output


def test_changing_a_programs_code_invalidates_its_cached_answers(
    service_factory: ServiceFactory, sim: Simulator, tmp_path: Path
) -> None:
    """The fingerprint covers the program's source: restarting the same code keeps its Redis
    entries valid; changing the code and restarting turns them into misses."""
    package = tmp_path / "progs" / "mybot"
    package.mkdir(parents=True)
    source = (
        "import dspy\n\n"
        "class Bot(dspy.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.answer = dspy.Predict('question -> answer')\n\n"
        "    def forward(self, question: str):\n"
        "        return self.answer(question=question)\n"
    )
    (package / "__init__.py").write_text(source, encoding="utf-8")
    models = write_models(tmp_path, "default_variant: bot\nvariants:\n  bot: {module: mybot:Bot}\n")
    env = {"MODELS_CONFIG": str(models), "PROGRAMS_PATH": str(tmp_path / "progs")}
    question = unique("Is the cache still valid?")

    def ask(service: ServiceProcess) -> dict[str, Any]:
        response = predict(service, variant="bot", inputs={"question": question})
        assert response.status_code == 200, response.text
        return dict(response.json())

    first = service_factory("first", **env)
    assert ask(first)["metadata"]["cache_level"] is None
    fingerprint = first.http.get("/config").json()["variants"]["bot"]["fingerprint"]
    first.stop()
    same = service_factory("same", **env)
    assert ask(same)["metadata"]["cache_level"] == "redis"
    assert same.http.get("/config").json()["variants"]["bot"]["fingerprint"] == fingerprint
    same.stop()
    (package / "__init__.py").write_text(source + "\n# the program changed\n", encoding="utf-8")
    changed = service_factory("changed", **env)
    assert ask(changed)["metadata"]["cache_level"] is None
    assert changed.http.get("/config").json()["variants"]["bot"]["fingerprint"] != fingerprint


def test_shutdown_waits_for_a_program_thread_past_its_deadline(
    service_factory: ServiceFactory, sim: Simulator, redis_server: RedisServer, tmp_path: Path
) -> None:
    """SIGTERM while a synchronous program's thread runs on past its request's deadline: the drain
    waits for it (within the grace period), and the tokens it spent late reach the fleet's totals
    before the process exits."""
    variants = "default_variant: drain\nvariants:\n  drain: {module: qa_bot.pipeline:SlowPipeline}\n"
    service = service_factory(**program_env(write_models(tmp_path, variants), REQUEST_TIMEOUT_SECS="0.3"))
    assert predict(service, variant="drain", inputs={"question": unique("drain")}).status_code == 504
    started = time.monotonic()
    service.signal(signal.SIGTERM)
    assert service.wait(timeout=30) == 0
    waited = time.monotonic() - started
    print(f"SIGTERM with a program thread running on: exited after {waited:.2f} s; provider {sim.stats()}")
    assert sim.stats()["calls"] == 2  # the thread finished its program: both predictors called
    raw = redis_server.command("HGET", STATE_PREFIX + "costs:gpt-3.5-turbo:drain", "total_input_tokens")
    assert raw.startswith(b"$"), raw
    assert not raw.startswith(b"$-1"), "no late tokens in Redis"
    assert int(raw.split(b"\r\n")[1]) == sim.stats()["prompt_tokens"]
