"""OpenTelemetry tracing over real HTTP, with real Redis and the simulator as the provider.

In process, with the SDK's in-memory exporter handed to `build_services`: the span tree of a miss, a
memory hit, a Redis hit, a retry, a coalesced pair and a stream. As `dspy-service serve`: off by
default (no OpenTelemetry module loaded, log lines unchanged), and on with OTEL_EXPORTER_OTLP_ENDPOINT
(spans exported over OTLP/HTTP to a receiver of our own, trace IDs in the JSON log lines).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from dspy_service.app import create_app
from dspy_service.services import build_services
from dspy_service.settings import DEFAULT_MODELS_CONFIG, Settings
from tests.integration.conftest import TEST_API_KEY, base_env
from tests.support.processes import LOOPBACK, RedisServer, ServiceProcess, Simulator, free_port, wait_until


def unique(text: str = "question") -> str:
    return f"{text} {uuid.uuid4().hex}"


def new_traceparent() -> tuple[str, str, str]:
    """(header, trace ID, parent span ID), as a caller that traces would send them."""
    trace_id, parent_id = os.urandom(16).hex(), os.urandom(8).hex()
    return f"00-{trace_id}-{parent_id}-01", trace_id, parent_id


# -- in process, with the in-memory exporter ----------------------------------------------------------


@dataclass
class TracedService:
    http: httpx.Client
    exporter: InMemorySpanExporter

    def request_span(self, trace_id: str, name: str = "POST /v1/predict") -> ReadableSpan:
        """The request's server span, once it has ended (it ends just after the response is sent)."""
        found: list[ReadableSpan] = []

        def ended() -> bool:
            found[:] = [
                span
                for span in self.exporter.get_finished_spans()
                if span.name == name and span.context.trace_id == int(trace_id, 16)
            ]
            return bool(found)

        wait_until(ended, timeout=10, what=f"the {name} span of trace {trace_id}")
        assert len(found) == 1, found
        return found[0]

    def children(self, parent: ReadableSpan) -> list[ReadableSpan]:
        return sorted(
            (
                span
                for span in self.exporter.get_finished_spans()
                if span.parent is not None and span.parent.span_id == parent.context.span_id
            ),
            key=lambda span: span.start_time or 0,
        )


TracedFactory = Callable[..., TracedService]


@pytest.fixture
def traced_service(redis_server: RedisServer, sim: Simulator) -> Iterator[TracedFactory]:
    """Start the app in this process (uvicorn in a thread) with tracing on through an in-memory
    exporter; settings beyond Redis and the simulator come as keyword arguments."""
    started: list[tuple[uvicorn.Server, threading.Thread, httpx.Client]] = []

    def start(**overrides: Any) -> TracedService:
        exporter = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        port = free_port()
        settings = Settings(
            _env_file=None,
            redis_url=redis_server.url,
            openai_api_key=TEST_API_KEY,
            openai_base_url=sim.api_base,
            host=LOOPBACK,
            port=port,
            **overrides,
        )
        app = create_app(build_services(settings, tracer_provider=provider))
        server = uvicorn.Server(
            uvicorn.Config(app, host=LOOPBACK, port=port, log_config=None, access_log=False, lifespan="on")
        )
        thread = threading.Thread(target=server.run, name=f"traced-service-{port}", daemon=True)
        thread.start()
        wait_until(lambda: server.started, timeout=30, what="the in-process service to start")
        http = httpx.Client(base_url=f"http://{LOOPBACK}:{port}", timeout=30)
        started.append((server, thread, http))
        return TracedService(http, exporter)

    yield start
    for server, thread, http in started:
        http.close()
        server.should_exit = True
        thread.join(timeout=30)
        assert not thread.is_alive(), "the in-process service did not stop"


def test_a_miss_is_a_request_span_with_cache_and_lm_children(traced_service: TracedFactory) -> None:
    """The request span continues the caller's trace; under it: memory lookup, Redis lookup, LM call,
    each with its facts; the request span carries model, variant, cache level, tokens and cost."""
    service = traced_service()
    traceparent, trace_id, parent_id = new_traceparent()
    response = service.http.post(
        "/v1/predict",
        json={"model": "gpt-4", "input": unique("What is the capital of France?")},
        headers={"traceparent": traceparent},
    )
    assert response.status_code == 200, response.text
    meta = response.json()["metadata"]
    assert meta["cache_level"] is None
    assert meta["input_tokens"] > 0

    request = service.request_span(trace_id)
    assert request.kind == SpanKind.SERVER
    assert request.parent is not None
    assert request.parent.span_id == int(parent_id, 16)
    attributes = request.attributes or {}
    assert attributes["http.request.method"] == "POST"
    assert attributes["http.route"] == "/v1/predict"
    assert attributes["http.response.status_code"] == 200
    assert attributes["dspy.request_id"] == response.headers["x-request-id"]
    assert attributes["dspy.model"] == "gpt-4"
    assert attributes["dspy.variant"] == "baseline"
    assert attributes["dspy.cache_level"] == "none"
    assert attributes["dspy.input_tokens"] == meta["input_tokens"]
    assert attributes["dspy.output_tokens"] == meta["output_tokens"]
    assert attributes["dspy.cost_usd"] == pytest.approx(meta["cost_usd"])
    assert request.status.status_code == StatusCode.UNSET

    children = service.children(request)
    assert [span.name for span in children] == ["cache.memory", "cache.redis", "lm.call"]
    memory, redis, lm = children
    assert all(span.context.trace_id == int(trace_id, 16) for span in children)
    assert (memory.attributes or {})["cache.hit"] is False
    assert (redis.attributes or {})["cache.hit"] is False
    lm_attributes = lm.attributes or {}
    assert lm.kind == SpanKind.CLIENT
    assert lm_attributes["dspy.model"] == "gpt-4"
    assert lm_attributes["gen_ai.request.model"] == "openai/gpt-4"
    assert lm_attributes["dspy.attempt"] == 1
    assert lm_attributes["gen_ai.usage.input_tokens"] == meta["input_tokens"]
    assert lm_attributes["gen_ai.usage.output_tokens"] == meta["output_tokens"]
    assert lm.status.status_code == StatusCode.UNSET


def test_a_memory_hit_has_only_the_memory_lookup(traced_service: TracedFactory) -> None:
    """A memory hit: one child (the memory lookup, a hit), cache level `memory`, nothing spent."""
    service = traced_service()
    body = {"model": "gpt-3.5-turbo", "input": unique()}
    assert service.http.post("/v1/predict", json=body).status_code == 200
    traceparent, trace_id, _ = new_traceparent()
    response = service.http.post("/v1/predict", json=body, headers={"traceparent": traceparent})
    assert response.json()["metadata"]["cache_level"] == "memory"

    request = service.request_span(trace_id)
    attributes = request.attributes or {}
    assert attributes["dspy.cache_level"] == "memory"
    assert attributes["dspy.input_tokens"] == 0
    assert attributes["dspy.cost_usd"] == 0.0
    children = service.children(request)
    assert [span.name for span in children] == ["cache.memory"]
    assert (children[0].attributes or {})["cache.hit"] is True


def test_a_redis_hit_has_both_lookups_and_no_lm_call(traced_service: TracedFactory) -> None:
    """Without a memory level, a repeat is a Redis hit: memory miss, Redis hit, cache level `redis`."""
    service = traced_service(memory_cache_size=0)
    body = {"model": "gpt-3.5-turbo", "input": unique()}
    assert service.http.post("/v1/predict", json=body).status_code == 200
    traceparent, trace_id, _ = new_traceparent()
    response = service.http.post("/v1/predict", json=body, headers={"traceparent": traceparent})
    assert response.json()["metadata"]["cache_level"] == "redis"

    request = service.request_span(trace_id)
    assert (request.attributes or {})["dspy.cache_level"] == "redis"
    children = service.children(request)
    assert [(span.name, (span.attributes or {})["cache.hit"]) for span in children] == [
        ("cache.memory", False),
        ("cache.redis", True),
    ]


def test_each_attempt_is_its_own_lm_span(traced_service: TracedFactory, sim: Simulator) -> None:
    """A failed attempt and its retry are two `lm.call` spans: the first an error of kind `server`."""
    service = traced_service()
    sim.configure(fail_next=1, error_status=500)
    traceparent, trace_id, _ = new_traceparent()
    response = service.http.post(
        "/v1/predict", json={"model": "gpt-4", "input": unique()}, headers={"traceparent": traceparent}
    )
    assert response.status_code == 200, response.text

    lm_calls = [span for span in service.children(service.request_span(trace_id)) if span.name == "lm.call"]
    assert [(span.attributes or {})["dspy.attempt"] for span in lm_calls] == [1, 2]
    failed, succeeded = lm_calls
    assert (failed.attributes or {})["error.type"] == "server"
    assert failed.status.status_code == StatusCode.ERROR
    assert "error.type" not in (succeeded.attributes or {})
    assert succeeded.status.status_code == StatusCode.UNSET


def test_a_provider_failure_marks_the_request_span_as_an_error(
    traced_service: TracedFactory, sim: Simulator
) -> None:
    """Every attempt failing: a 502, the request span an error, one failed LM span per attempt."""
    service = traced_service()
    sim.configure(error_rate=1.0, error_status=500)
    traceparent, trace_id, _ = new_traceparent()
    response = service.http.post(
        "/v1/predict", json={"model": "gpt-4", "input": unique()}, headers={"traceparent": traceparent}
    )
    assert response.status_code == 502, response.text

    request = service.request_span(trace_id)
    assert request.status.status_code == StatusCode.ERROR
    assert (request.attributes or {})["http.response.status_code"] == 502
    lm_calls = [span for span in service.children(request) if span.name == "lm.call"]
    assert [(span.attributes or {})["error.type"] for span in lm_calls] == ["server"] * 3  # max_retries 2


def test_coalesced_requests_share_the_first_ones_lm_span(
    traced_service: TracedFactory, sim: Simulator
) -> None:
    """Two identical concurrent misses make one upstream call; its span is under the request that
    started it, and the other request span says `dspy.coalesced`."""
    service = traced_service()
    sim.configure(latency_ms=400)
    body = {"model": "gpt-4", "input": unique()}
    first, second = new_traceparent(), new_traceparent()

    def post(traceparent: str) -> httpx.Response:
        return service.http.post("/v1/predict", json=body, headers={"traceparent": traceparent})

    with ThreadPoolExecutor(max_workers=1) as pool:
        leader = pool.submit(post, first[0])
        wait_until(lambda: sim.stats()["calls"] >= 1, timeout=10, what="the first call upstream")
        follower = post(second[0])
    assert leader.result().status_code == follower.status_code == 200
    assert follower.json()["metadata"]["coalesced"] is True

    leader_span, follower_span = service.request_span(first[1]), service.request_span(second[1])
    assert (leader_span.attributes or {})["dspy.coalesced"] is False
    assert (follower_span.attributes or {})["dspy.coalesced"] is True
    assert [span.name for span in service.children(leader_span)] == ["cache.memory", "cache.redis", "lm.call"]
    assert [span.name for span in service.children(follower_span)] == ["cache.memory", "cache.redis"]
    assert sum(span.name == "lm.call" for span in service.exporter.get_finished_spans()) == 1


def test_a_streamed_miss_has_its_lm_span_under_the_stream_request(traced_service: TracedFactory) -> None:
    """`/v1/predict/stream` is traced like `/v1/predict`: its LM call sits under its request span."""
    service = traced_service()
    traceparent, trace_id, _ = new_traceparent()
    with service.http.stream(
        "POST",
        "/v1/predict/stream",
        json={"model": "gpt-4", "input": unique()},
        headers={"traceparent": traceparent},
    ) as response:
        assert response.status_code == 200
        events = response.read().decode()
    assert "event: result" in events

    request = service.request_span(trace_id, "POST /v1/predict/stream")
    assert (request.attributes or {})["dspy.cache_level"] == "none"
    assert [span.name for span in service.children(request)] == ["cache.memory", "cache.redis", "lm.call"]


# -- `dspy-service serve`, tracing off and on --------------------------------------------------------

# Runs `dspy-service serve` as the console script does, and writes the names of the modules it had
# loaded when it exits.
_SERVE_AND_LIST_MODULES = """
import atexit, json, sys
def dump():
    with open(sys.argv[1], "w") as out:
        json.dump(sorted(name for name, module in sys.modules.items() if module is not None), out)
atexit.register(dump)
from dspy_service.cli import main
sys.exit(main(["serve"]))
"""


def _serve_command(modules_path: Path) -> Sequence[str]:
    return [sys.executable, "-c", _SERVE_AND_LIST_MODULES, str(modules_path)]


def test_tracing_is_off_by_default_and_loads_nothing_of_opentelemetry(
    redis_server: RedisServer, sim: Simulator, tmp_path: Path
) -> None:
    """No OTLP endpoint: no OpenTelemetry module is loaded (start-up time), a `traceparent` changes
    nothing, and log lines carry no trace IDs."""
    modules_path = tmp_path / "modules.json"
    service = ServiceProcess(
        base_env(redis_server, sim), tmp_path, "untraced", command=_serve_command(modules_path)
    )
    try:
        service.start()
        body = {"model": "gpt-4", "input": unique()}
        for _ in range(2):  # a miss, then a memory hit
            response = service.http.post(
                "/v1/predict", json=body, headers={"traceparent": new_traceparent()[0]}
            )
            assert response.status_code == 200, response.text
        wait_until(
            lambda: sum(line.get("event") == "request.completed" for line in service.log_lines()) >= 2,
            timeout=10,
            what="the access-log lines",
        )
        service.signal(signal.SIGTERM)
        assert service.wait(timeout=30) == 0
    finally:
        service.stop()
    loaded = [name for name in json.loads(modules_path.read_text()) if name.startswith("opentelemetry.")]
    assert loaded == []
    for line in service.log_lines():
        assert not {"trace_id", "span_id"} & set(line), line


class _OTLPReceiver(BaseHTTPRequestHandler):
    """An OTLP/HTTP traces endpoint that keeps what it is sent."""

    received: list[ExportTraceServiceRequest]
    lock = threading.Lock()

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["content-length"]))
        export = ExportTraceServiceRequest()
        export.ParseFromString(body)
        with self.lock:
            self.received.append(export)
        reply = ExportTraceServiceResponse().SerializeToString()
        self.send_response(200 if self.path == "/v1/traces" else 404)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def otlp_receiver() -> Iterator[tuple[str, list[ExportTraceServiceRequest]]]:
    received: list[ExportTraceServiceRequest] = []
    handler = type("Receiver", (_OTLPReceiver,), {"received": received})
    server = ThreadingHTTPServer((LOOPBACK, 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://{LOOPBACK}:{server.server_address[1]}", received
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def _exported_spans(received: list[ExportTraceServiceRequest]) -> list[tuple[dict[str, Any], Any]]:
    """(resource attributes, span) for every span received so far."""
    spans: list[tuple[dict[str, Any], Any]] = []
    with _OTLPReceiver.lock:
        for export in received:
            for resource_spans in export.resource_spans:
                resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
                for scope_spans in resource_spans.scope_spans:
                    spans.extend((resource, span) for span in scope_spans.spans)
    return spans


def test_an_otlp_endpoint_turns_tracing_on(
    redis_server: RedisServer,
    sim: Simulator,
    tmp_path: Path,
    otlp_receiver: tuple[str, list[ExportTraceServiceRequest]],
) -> None:
    """OTEL_EXPORTER_OTLP_ENDPOINT set: spans go over OTLP/HTTP under the service's name, the request
    span continues the caller's trace, and every log line of the request carries its trace ID."""
    endpoint, received = otlp_receiver
    models = tmp_path / "models.yaml"  # gpt-4 falls back at once: a log line written mid-request
    models.write_text(
        DEFAULT_MODELS_CONFIG.read_text().replace(
            "    max_retries: 2\n    request_timeout_secs: 60\n",
            "    max_retries: 0\n    request_timeout_secs: 60\n    fallbacks: [gpt-3.5-turbo]\n",
        )
    )
    env = {
        **base_env(redis_server, sim),
        "MODELS_CONFIG": str(models),
        "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
        "OTEL_BSP_SCHEDULE_DELAY": "50",  # milliseconds
    }
    service = ServiceProcess(env, tmp_path, "traced")
    try:
        service.start()
        sim.configure(fail_next=1, error_status=500)
        traceparent, trace_id, parent_id = new_traceparent()
        response = service.http.post(
            "/v1/predict", json={"model": "gpt-4", "input": unique()}, headers={"traceparent": traceparent}
        )
        assert response.status_code == 200, response.text
        assert response.json()["model_served"] == "gpt-3.5-turbo"

        def ours() -> list[tuple[dict[str, Any], Any]]:
            return [(r, s) for r, s in _exported_spans(received) if s.trace_id.hex() == trace_id]

        wait_until(
            lambda: any(span.name == "POST /v1/predict" for _, span in ours()),
            timeout=15,
            what="the request span to be exported",
        )
        resource, request = next((r, s) for r, s in ours() if s.name == "POST /v1/predict")
        assert resource["service.name"] == "dspy-service"
        assert resource["service.version"] == "0.1.0"
        assert request.parent_span_id.hex() == parent_id
        lm_calls = sorted((s for _, s in ours() if s.name == "lm.call"), key=lambda s: s.start_time_unix_nano)
        models_called = [
            next(a.value.string_value for a in span.attributes if a.key == "dspy.model") for span in lm_calls
        ]
        assert models_called == ["gpt-4", "gpt-3.5-turbo"]
        assert all(span.parent_span_id == request.span_id for span in lm_calls)
    finally:
        service.stop()

    lines = service.log_lines()
    assert any(line.get("event") == "tracing.enabled" for line in lines)
    access = [
        line
        for line in lines
        if line.get("event") == "request.completed"
        and line.get("request_id") == response.headers["x-request-id"]
    ]
    assert len(access) == 1
    assert access[0]["trace_id"] == trace_id
    assert access[0]["span_id"] == request.span_id.hex()
    fallback = [line for line in lines if line.get("event") == "prediction.fallback"]
    assert [line["trace_id"] for line in fallback] == [trace_id]


def test_a_tool_call_of_a_program_is_a_span_under_its_lm_call(
    traced_service: TracedFactory, tmp_path: Path
) -> None:
    """A ReAct program's tool call is a `tool.call` span (DSPy's callbacks), in the request's trace
    under the attempt that made it; a tool that raises marks its span with the error."""
    programs_dir = Path(__file__).resolve().parents[1] / "programs"
    models = tmp_path / "models.yaml"
    models.write_text(
        DEFAULT_MODELS_CONFIG.read_text(encoding="utf-8").split("\nvariants:")[0]
        + "\nvariants:\n"
        + "  baseline: {signature: 'question -> answer'}\n"
        + "  agent: {module: 'qa_bot.agent:make_agent'}\n"
        + "  broken: {module: 'qa_bot.agent:make_broken_agent'}\n",
        encoding="utf-8",
    )
    service = traced_service(models_config=models, programs_path=str(programs_dir))
    for variant, tool, error in (
        ("agent", "lookup_weather", None),
        ("broken", "broken_tool", "RuntimeError"),
    ):
        traceparent, trace_id, _ = new_traceparent()
        response = service.http.post(
            "/v1/predict",
            json={"model": "gpt-4", "variant": variant, "inputs": {"question": unique("Weather in Rome?")}},
            headers={"traceparent": traceparent},
        )
        assert response.status_code == 200, response.text
        request = service.request_span(trace_id)
        [lm] = [span for span in service.children(request) if span.name == "lm.call"]
        # the program's own tool, then ReAct's built-in `finish`, each a span
        tools = {
            str((span.attributes or {})["dspy.tool"]): span.attributes or {}
            for span in service.children(lm)
            if span.name == "tool.call"
        }
        assert set(tools) == {tool, "finish"}
        assert tools[tool]["dspy.variant"] == variant
        assert tools[tool].get("error.type") == error
        assert tools["finish"].get("error.type") is None


def test_the_trace_context_goes_upstream_with_the_provider_call(
    traced_service: TracedFactory, sim: Simulator
) -> None:
    """With tracing on, the provider call carries a `traceparent` in the caller's trace, naming the
    attempt's `lm.call` span as its parent, so a gateway's spans join ours."""
    service = traced_service()
    traceparent, trace_id, _ = new_traceparent()
    response = service.http.post(
        "/v1/predict",
        json={"model": "gpt-4", "input": unique("Trace me upstream")},
        headers={"traceparent": traceparent},
    )
    assert response.status_code == 200, response.text
    [sent] = sim.stats()["traceparents"]
    _, sent_trace, sent_parent, _ = sent.split("-")
    assert sent_trace == trace_id
    [lm] = [span for span in service.children(service.request_span(trace_id)) if span.name == "lm.call"]
    assert int(sent_parent, 16) == lm.context.span_id
