"""`POST /v1/predict/stream` over real HTTP: server-sent events from DSPy's streaming path, fed by the
simulator's real chunked stream; cache hits, errors before and after the first chunk, and a client
that hangs up mid-stream."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson

from tests.integration.conftest import ServiceFactory
from tests.support.processes import ServiceProcess, Simulator, wait_until

PREDICT_FIELDS = {"request_id", "model", "model_served", "variant", "output", "outputs", "metadata"}


def unique(text: str = "question") -> str:
    return f"{text} {uuid.uuid4().hex}"


def sse_events(lines: Iterator[str]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(event, data) pairs from a text/event-stream, as they arrive."""
    event = None
    for line in lines:
        if line.startswith("event: "):
            event = line[len("event: ") :]
        elif line.startswith("data: "):
            assert event is not None, f"data without an event: {line!r}"
            yield event, orjson.loads(line[len("data: ") :])
            event = None


def stream(service: ServiceProcess, body: dict[str, Any]) -> tuple[httpx.Response, list[tuple[str, Any]]]:
    with service.http.stream("POST", "/v1/predict/stream", json=body) as response:
        if response.status_code != 200:
            response.read()
            return response, []
        return response, list(sse_events(response.iter_lines()))


def metric_value(service: ServiceProcess, name: str, **labels: str) -> float:
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    prefix = f"{name}{{{wanted}}} " if labels else f"{name} "
    for line in service.http.get("/metrics").text.splitlines():
        if line.startswith(prefix):
            return float(line.split(" ")[-1])
    return 0.0


def test_a_miss_streams_each_field_as_the_provider_sends_it(
    shared_service: ServiceProcess, sim: Simulator
) -> None:
    sim.configure(stream_chunk_ms=40)  # about half a second of streaming for a CoT answer
    body = {"model": "gpt-4", "variant": "cot", "input": unique("Why is the sky blue?")}
    seen_while_streaming: dict[str, Any] | None = None
    events: list[tuple[str, Any]] = []
    with shared_service.http.stream("POST", "/v1/predict/stream", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["x-request-id"]
        for event in sse_events(response.iter_lines()):
            if not events:
                seen_while_streaming = sim.stats()  # the provider is still sending
            events.append(event)
    print(f"stream: {len(events)} events; provider at the first chunk: {seen_while_streaming}")
    assert seen_while_streaming is not None
    assert seen_while_streaming["streams_started"] == 1
    assert seen_while_streaming["streams_completed"] == 0, "the first chunk came only after the whole answer"

    kinds = [kind for kind, _ in events]
    assert kinds[-1] == "result"
    assert set(kinds[:-1]) == {"chunk"}
    assert len(kinds) > 5
    result = events[-1][1]
    assert set(result) == PREDICT_FIELDS
    streamed: dict[str, str] = {}
    for _, chunk in events[:-1]:
        assert chunk["predictor"] == "predict"  # the ChainOfThought's one predictor, by its name
        streamed[chunk["field"]] = streamed.get(chunk["field"], "") + chunk["text"]
    # Every token of every text field arrives, in order, and adds up to the final answer.
    assert set(streamed) == {"reasoning", "answer"}
    assert streamed["answer"].strip() == result["output"] == result["outputs"]["answer"]
    assert streamed["reasoning"].strip() == result["outputs"]["reasoning"]
    meta = result["metadata"]
    assert meta["cached"] is False
    assert meta["cache_level"] is None
    assert meta["input_tokens"] > 0
    assert meta["output_tokens"] > 0
    assert meta["cost_usd"] > 0
    stats = sim.stats()
    assert (stats["calls"], stats["streams_completed"]) == (1, 1)
    # The tokens the provider reported for its stream are the ones we count.
    assert (meta["input_tokens"], meta["output_tokens"]) == (
        stats["prompt_tokens"],
        stats["completion_tokens"],
    )

    # The streamed answer is cached like any other: /v1/predict and a second stream are hits.
    again = shared_service.http.post("/v1/predict", json=body).json()
    assert again["metadata"]["cache_level"] == "memory"
    assert again["output"] == result["output"]
    response, hit_events = stream(shared_service, body)
    assert [kind for kind, _ in hit_events] == ["chunk", "result"]
    assert hit_events[0][1] == {"field": "answer", "text": result["output"], "predictor": None}
    hit = hit_events[1][1]
    assert hit["metadata"]["cache_level"] == "memory"
    assert hit["metadata"]["cost_usd"] == 0
    assert hit["metadata"]["cost_saved_usd"] == meta["cost_usd"]
    assert sim.stats()["calls"] == 1


def test_a_redis_hit_streams_at_once(
    shared_service: ServiceProcess, service_factory: Any, sim: Simulator
) -> None:
    """Another replica's answer, found in Redis, is one chunk and the result."""
    body = {"model": "gpt-3.5-turbo", "input": unique("redis")}
    first = shared_service.http.post("/v1/predict", json=body).json()
    other = service_factory("replica")
    _response, events = stream(other, body)
    assert [kind for kind, _ in events] == ["chunk", "result"]
    assert events[0][1]["text"] == first["output"]
    assert events[1][1]["metadata"]["cache_level"] == "redis"
    assert sim.stats()["calls"] == 1


def test_a_stream_joins_an_identical_prediction_in_flight(
    shared_service: ServiceProcess, sim: Simulator
) -> None:
    sim.configure(latency_ms=600)
    body = {"model": "gpt-4", "input": unique("shared")}
    answers: list[dict[str, Any]] = []
    first = threading.Thread(
        target=lambda: answers.append(shared_service.http.post("/v1/predict", json=body).json())
    )
    first.start()
    wait_until(lambda: sim.stats()["calls"] == 1, timeout=10, what="the first call to reach the provider")
    _response, events = stream(shared_service, body)
    first.join(timeout=20)
    assert [kind for kind, _ in events] == ["chunk", "result"]
    assert events[1][1]["metadata"]["coalesced"] is True
    assert events[1][1]["output"] == answers[0]["output"]
    assert sim.stats()["calls"] == 1


def test_errors_before_the_first_chunk_are_ordinary_json_errors(
    shared_service: ServiceProcess, sim: Simulator
) -> None:
    response, _ = stream(shared_service, {"model": "no-such-model", "input": "x"})
    assert response.status_code == 404
    assert response.json()["error"]["type"] == "not_found"
    assert response.json()["error"]["request_id"] == response.headers["x-request-id"]

    response, _ = stream(shared_service, {"model": "gpt-4", "input": "x", "parameters": {"nope": 1}})
    assert response.status_code == 422
    assert "parameters.nope" in response.json()["error"]["message"]

    response = shared_service.http.post(
        "/v1/predict/stream", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert response.status_code == 422

    sim.configure(error_rate=1.0, error_status=500)
    response, _ = stream(shared_service, {"model": "gpt-3.5-turbo", "input": unique("down")})
    assert response.status_code == 502
    assert response.json()["error"]["type"] == "provider_error"
    # Nothing had reached the client yet, so the model's retries were all spent, as on /v1/predict.
    retries = shared_service.http.get("/config").json()["models"]["gpt-3.5-turbo"]["max_retries"]
    assert sim.stats()["calls"] == 1 + retries


def test_a_failure_mid_stream_ends_with_an_error_event_and_no_retry(
    shared_service: ServiceProcess, sim: Simulator
) -> None:
    """Once the client holds part of an answer, a retry would repeat it: the stream ends with `error`."""
    sim.configure(stream_break_after=7)  # "[[ ## answer ## ]]" is the first five
    body = {"model": "gpt-4", "variant": "baseline", "input": unique("cut off")}
    unmetered_before = metric_value(shared_service, "dspy_unmetered_provider_calls_total", model="gpt-4")
    response, events = stream(shared_service, body)
    print(f"cut-off stream: {[kind for kind, _ in events]}")
    assert response.status_code == 200
    kinds = [kind for kind, _ in events]
    assert kinds[-1] == "error"
    assert "result" not in kinds
    assert kinds.count("chunk") >= 1
    error = events[-1][1]["error"]
    assert error["type"] == "provider_error"
    assert error["request_id"] == response.headers["x-request-id"]
    assert sim.stats()["calls"] == 1, "a stream the client had started reading was retried"
    # The provider had the request and never reported its tokens: the call counts as cut off.
    assert (
        metric_value(shared_service, "dspy_unmetered_provider_calls_total", model="gpt-4")
        == unmetered_before + 1
    )
    # Nothing half-done was cached: the next request goes to the provider again.
    sim.configure(stream_break_after=None)
    after = shared_service.http.post("/v1/predict", json=body).json()
    assert after["metadata"]["cache_level"] is None
    assert sim.stats()["calls"] == 2


def test_a_client_that_hangs_up_frees_the_upstream_call(
    shared_service: ServiceProcess, sim: Simulator
) -> None:
    sim.configure(stream_chunk_ms=300)  # several seconds for the whole answer
    body = {"model": "gpt-4", "variant": "cot", "input": unique("long answer")}
    disconnects_before = metric_value(shared_service, "dspy_errors_total", type="client_disconnected")
    unmetered_before = metric_value(shared_service, "dspy_unmetered_provider_calls_total", model="gpt-4")
    with (
        httpx.Client(base_url=shared_service.url, timeout=30) as client,
        client.stream("POST", "/v1/predict/stream", json=body) as response,
    ):
        assert response.status_code == 200
        first = next(sse_events(response.iter_lines()))
        assert first[0] == "chunk"
    # leaving the block closes the connection mid-stream
    wait_until(
        lambda: sim.stats()["streams_abandoned"] == 1, timeout=5, what="the provider to see the stream closed"
    )
    stats = sim.stats()
    print(f"after hanging up: provider {stats}")
    assert stats["streams_completed"] == 0
    wait_until(
        lambda: metric_value(shared_service, "dspy_active_predictions") == 0,
        timeout=5,
        what="no prediction left in flight",
    )
    assert (
        metric_value(shared_service, "dspy_errors_total", type="client_disconnected")
        == disconnects_before + 1
    )
    # The provider never reported the abandoned stream's tokens: the call is counted as cut off.
    assert (
        metric_value(shared_service, "dspy_unmetered_provider_calls_total", model="gpt-4")
        == unmetered_before + 1
    )
    line = next(
        entry
        for entry in shared_service.log_lines()
        if entry.get("event") == "request.completed" and entry.get("client_disconnected")
    )
    assert line["path"] == "/v1/predict/stream"
    # The abandoned answer was not cached: asking again calls the provider again.
    sim.configure(stream_chunk_ms=1)
    again = shared_service.http.post("/v1/predict", json=body).json()
    assert again["metadata"]["cache_level"] is None


def test_a_stream_that_keeps_producing_outlives_the_request_deadline(
    service_factory: ServiceFactory, sim: Simulator
) -> None:
    """A stream whose text keeps coming runs past REQUEST_TIMEOUT_SECS (capped by STREAM_MAX_SECS):
    only a pause longer than STREAM_IDLE_TIMEOUT_SECS ends it."""
    service = service_factory(REQUEST_TIMEOUT_SECS="1", STREAM_IDLE_TIMEOUT_SECS="1")
    sim.configure(stream_chunk_ms=150)  # a CoT answer of ~40 words: about 6 s in all
    body = {"model": "gpt-4", "variant": "cot", "input": unique("Take your time")}
    started = time.monotonic()
    response, events = stream(service, body)
    took = time.monotonic() - started
    print(f"a 150 ms/chunk stream with a 1 s deadline: {took:.1f} s, ended with {events[-1][0]}")
    assert response.status_code == 200
    assert events[-1][0] == "result"
    assert took > 1.5


def test_a_stream_that_stops_mid_answer_ends_at_the_idle_timeout(
    service_factory: ServiceFactory, sim: Simulator
) -> None:
    """A provider that stops sending mid-stream: the stream ends with a provider_timeout error event
    after STREAM_IDLE_TIMEOUT_SECS (not at the model's read timeout as a transport failure), and the
    cut-off call is counted as unmetered."""
    service = service_factory(REQUEST_TIMEOUT_SECS="30", STREAM_IDLE_TIMEOUT_SECS="1")

    def unmetered() -> int:
        return int((service.http.get("/costs").json().get("gpt-4:cot") or {}).get("unmetered_calls", 0))

    before = unmetered()
    sim.configure(stream_hang_after=8)
    body = {"model": "gpt-4", "variant": "cot", "input": unique("Stop halfway")}
    started = time.monotonic()
    _, events = stream(service, body)
    took = time.monotonic() - started
    print(f"a stream that hangs mid-answer: {events[-1]} after {took:.1f} s")
    assert events[-1][0] == "error"
    assert events[-1][1]["error"]["type"] == "provider_timeout"
    assert took < 5
    wait_until(lambda: unmetered() == before + 1, timeout=5, what="the cut-off call in /costs")


def test_a_hung_stream_past_the_models_timeout_is_a_504(
    service_factory: ServiceFactory, sim: Simulator, tmp_path: Path
) -> None:
    """The model's own read timeout on a stream that hangs before its first text is a timeout (504
    `provider_timeout`), as on /v1/predict, not a 502 transport failure."""
    models = tmp_path / "models.yaml"
    models.write_text(
        "models:\n  quick: {name: openai/gpt-4, request_timeout_secs: 1, max_retries: 0}\n"
        "variants:\n  baseline: {signature: 'question -> answer'}\n",
        encoding="utf-8",
    )
    service = service_factory(MODELS_CONFIG=str(models), REQUEST_TIMEOUT_SECS="20")
    sim.configure(stream_hang_after=1)
    started = time.monotonic()
    with service.http.stream(
        "POST", "/v1/predict/stream", json={"model": "quick", "input": unique("hang")}
    ) as response:
        response.read()
    assert response.status_code == 504, response.text
    assert response.json()["error"]["type"] == "provider_timeout"
    assert time.monotonic() - started < 5


def test_an_error_event_inside_a_stream_is_a_provider_failure(
    service_factory: ServiceFactory, sim: Simulator
) -> None:
    """`data: {"error": ...}` mid-stream (a gateway whose upstream dropped) is a server failure: 502
    before any text, counted against the breaker, its spend unmetered, the provider's text in the log only."""
    service = service_factory()
    sim.configure(stream_error_after=1)
    with service.http.stream(
        "POST", "/v1/predict/stream", json={"model": "gpt-4", "input": unique("dropped")}
    ) as response:
        response.read()
    assert response.status_code == 502, response.text
    assert "upstream connection dropped" not in response.text
    logged = [line for line in service.log_lines() if line.get("event") == "prediction.upstream_failed"]
    assert logged[-1]["kind"] == "server"
    assert "upstream connection dropped" in logged[-1]["detail"]
