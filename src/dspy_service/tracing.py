"""OpenTelemetry tracing: off unless an OTLP endpoint is configured; then a server span per request,
with child spans for the memory and Redis cache lookups and one per upstream LM call attempt.

Off (the default), nothing of OpenTelemetry is imported and every hook on the request path is one
`is None` check. On, spans go over OTLP/HTTP through a batching processor, which the SDK configures
from the standard `OTEL_*` variables (headers, timeout, sampler, batch sizes); the service shuts it
down, flushing what is left, when it stops. Tests hand `build_tracing` a tracer provider of their own.

Coalesced predictions: identical concurrent misses share one upstream task, which the first request
starts. The task inherits that request's context, so the `lm.call` spans sit under the first
request's span only; the others get `dspy.coalesced=true` and no LM span of their own.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

from dspy_service.logs import get_logger
from dspy_service.settings import Settings, redact_url

if TYPE_CHECKING:
    from contextvars import Token

    from opentelemetry.context import Context
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Span
    from starlette.types import Scope

    from dspy_service.programs import ProgramRun

_log = get_logger("dspy_service.tracing")

DEFAULT_SERVICE_NAME = "dspy-service"
_INSTRUMENTATION = "dspy_service"

# What the request's access-log line says that its span should say too: log field -> attribute.
_REQUEST_ATTRIBUTES = {
    "model": "dspy.model",
    "model_served": "dspy.model_served",
    "variant": "dspy.variant",
    "coalesced": "dspy.coalesced",
    "input_tokens": "dspy.input_tokens",
    "output_tokens": "dspy.output_tokens",
    "cost_usd": "dspy.cost_usd",
    "tenant": "dspy.tenant",
    "batch_items": "dspy.batch_items",
    "batch_failed": "dspy.batch_failed",
    "error": "dspy.error",  # a stream that failed after its first event (the status is already 200)
}

# redis-py imports OpenTelemetry's metrics API and SDK whenever they are installed, for an optional
# feature of its own that the service does not use: about 85 ms of start-up for nothing.
_UNUSED_WHILE_OFF = ("opentelemetry.sdk", "opentelemetry.metrics")


def keep_opentelemetry_unloaded() -> None:
    """Make later imports of OpenTelemetry's SDK and metrics API fail as if they were not installed
    (a None entry in sys.modules does that). For `dspy-service serve` with tracing off, before redis
    is imported; a module already imported is left alone."""
    for name in _UNUSED_WHILE_OFF:
        if name not in sys.modules:
            sys.modules[name] = None  # type: ignore[assignment]  # None: "not importable", by design


class RequestSpan:
    """The span of one HTTP request, while it is the current span."""

    __slots__ = ("span", "span_id", "token", "trace_id")

    def __init__(self, span: Span, token: Token[Context], trace_id: str, span_id: str) -> None:
        self.span = span
        self.token = token
        self.trace_id = trace_id  # 32 hex digits, as in `traceparent` (empty if the span has no trace)
        self.span_id = span_id


class Tracing:
    """Tracing while it is on: the tracer, and the few span shapes the service makes."""

    def __init__(self, provider: TracerProvider, *, service_version: str, owns_provider: bool) -> None:
        from opentelemetry import context, propagate, trace

        self._provider = provider
        self._owns_provider = owns_provider
        self._tracer = provider.get_tracer(_INSTRUMENTATION, service_version)
        self._propagator = propagate.get_global_textmap()  # W3C traceparent unless OTEL_PROPAGATORS
        self._carrier_headers = frozenset(name.encode("latin-1") for name in self._propagator.fields)
        self._context = context
        self._trace = trace

    # -- the request span (api/middleware.py: TracingMiddleware) ------------------------------------

    def start_request(self, scope: Scope) -> RequestSpan:
        """Start the server span of an HTTP request, as a child of the caller's `traceparent` if it
        sent a valid one, and make it current."""
        carrier = {
            name.decode("latin-1"): value.decode("latin-1")
            for name, value in scope["headers"]
            if name in self._carrier_headers
        }
        parent = self._propagator.extract(carrier) if carrier else None
        method = scope["method"]
        attributes: dict[str, Any] = {
            "http.request.method": method,
            "url.path": scope["path"],
            "url.scheme": scope.get("scheme", "http"),
            "network.protocol.version": scope.get("http_version", "1.1"),
        }
        if client := scope.get("client"):
            attributes["client.address"] = client[0]
        span = self._tracer.start_span(
            method, context=parent, kind=self._trace.SpanKind.SERVER, attributes=attributes
        )
        token = self._context.attach(self._trace.set_span_in_context(span, parent))
        ids = span.get_span_context()
        if not ids.is_valid:
            return RequestSpan(span, token, "", "")
        return RequestSpan(span, token, f"{ids.trace_id:032x}", f"{ids.span_id:016x}")

    def end_request(
        self,
        request: RequestSpan,
        scope: Scope,
        *,
        status: int,
        log_fields: dict[str, Any],
        error: BaseException | None = None,
    ) -> None:
        """Name the span after the route, give it the request's outcome (the facts of its log line)
        and end it."""
        span = request.span
        try:
            if span.is_recording():
                route = getattr(scope.get("route"), "path", None)
                if isinstance(route, str):
                    span.update_name(f"{scope['method']} {route}")
                    span.set_attribute("http.route", route)
                span.set_attribute("http.response.status_code", status)
                state = scope.get("state") or {}
                if (request_id := state.get("request_id")) is not None:
                    span.set_attribute("dspy.request_id", request_id)
                for field, attribute in _REQUEST_ATTRIBUTES.items():
                    value = log_fields.get(field)
                    if value is not None:
                        span.set_attribute(attribute, value)
                if "cache_level" in log_fields:  # a prediction was answered: null is a miss
                    span.set_attribute("dspy.cache_level", log_fields["cache_level"] or "none")
                    span.set_attribute("dspy.cost_known", log_fields.get("cost_usd") is not None)
                if status >= 500:
                    error_type = type(error).__name__ if error is not None else str(status)
                    span.set_attribute("error.type", error_type)
                    span.set_status(self._trace.StatusCode.ERROR)
            span.end()
        finally:
            self._context.detach(request.token)

    # -- child spans ---------------------------------------------------------------------------------

    def span(self, name: str) -> AbstractContextManager[Span]:
        """A child span of the current one, current while the `with` block runs (cache lookups)."""
        return self._tracer.start_as_current_span(name)

    def propagation_headers(self) -> list[tuple[str, str]]:
        """`traceparent` (and `tracestate`) of the current span, for a call to the provider."""
        from opentelemetry import propagate

        carrier: dict[str, str] = {}
        propagate.inject(carrier)
        return list(carrier.items())

    def start_tool_span(self, tool: str, variant: str) -> Span:
        """A `tool.call` span for one tool call of a program, ended by the caller (tools.py): a
        tool's start and end arrive as two DSPy callbacks, not one block."""
        return self._tracer.start_span(
            "tool.call", attributes={"dspy.tool": tool, "dspy.variant": variant}, record_exception=False
        )

    async def lm_call(
        self, call: Awaitable[ProgramRun], model: str, model_id: str, attempt: int
    ) -> ProgramRun:
        """Await one upstream attempt (a program run with one model) inside an `lm.call` span: the
        model, the provider's model id, the attempt (1 for the first), the tokens the provider
        reported and, on failure, its kind (`timeout`, `server`, `rate_limit`, ...)."""
        with self._tracer.start_as_current_span(
            "lm.call",
            kind=self._trace.SpanKind.CLIENT,
            attributes={"dspy.model": model, "gen_ai.request.model": model_id, "dspy.attempt": attempt},
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            try:
                run = await call
            except BaseException as exc:
                # ProgramFailed carries its kind and the tokens spent anyway; a cancellation is the
                # request's deadline (or the client of a stream going away).
                kind = getattr(exc, "kind", None)
                if kind is None:
                    kind = "cancelled" if isinstance(exc, asyncio.CancelledError) else type(exc).__name__
                _set_usage(span, getattr(exc, "usage_by_model", None) or {})
                span.set_attribute("error.type", kind)
                span.set_status(self._trace.StatusCode.ERROR, kind)
                raise
            _set_usage(span, run.usage_by_model)
            return run

    async def close(self) -> None:
        """Flush what is still queued; shut the provider down if it is ours (off the event loop:
        the exporter blocks while it sends)."""
        if self._owns_provider:
            await asyncio.to_thread(self._provider.shutdown)
        else:
            await asyncio.to_thread(self._provider.force_flush)


def _set_usage(span: Span, usage_by_model: dict[str, tuple[int, int, int]]) -> None:
    span.set_attribute("gen_ai.usage.input_tokens", sum(tokens[0] for tokens in usage_by_model.values()))
    span.set_attribute("gen_ai.usage.output_tokens", sum(tokens[1] for tokens in usage_by_model.values()))


def build_tracing(settings: Settings, provider: TracerProvider | None = None) -> Tracing | None:
    """Tracing with the given provider (tests), else with an OTLP/HTTP exporter when an endpoint is
    configured, else None: off, and nothing of OpenTelemetry imported."""
    if provider is not None:
        return Tracing(provider, service_version=settings.service_version, owns_provider=False)
    endpoint = settings.otel_traces_endpoint
    if endpoint is None:
        return None
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    # OTEL_RESOURCE_ATTRIBUTES apply; OTEL_SERVICE_NAME (also from .env) wins over them.
    resource = Resource.create({"service.version": settings.service_version})
    service_name = settings.otel_service_name
    if not service_name and str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        service_name = DEFAULT_SERVICE_NAME
    if service_name:
        resource = resource.merge(Resource({"service.name": service_name}))
    provider = TracerProvider(resource=resource, shutdown_on_exit=False)  # the lifespan shuts it down
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    _log.info(
        "tracing.enabled",
        endpoint=redact_url(endpoint),
        service_name=resource.attributes.get("service.name"),
    )
    return Tracing(provider, service_version=settings.service_version, owns_provider=True)
