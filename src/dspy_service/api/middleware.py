"""Request context as plain ASGI middleware: request ID, body-size limit, one access-log line; and,
while tracing is on, the request's span.

The request ID comes from a valid `X-Request-ID` header, else a new UUID; a handler may replace it
(from the body's `request_id`) through `scope["state"]["request_id"]` before it responds. It is
echoed in the `X-Request-ID` response header and bound to every log line of the request.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import time
from typing import TYPE_CHECKING, Any

import orjson
import structlog
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dspy_service.api.responses import send_error
from dspy_service.errors import ShuttingDown
from dspy_service.logs import AccessLog
from dspy_service.metrics import Metrics

if TYPE_CHECKING:
    from dspy_service.tracing import Tracing

_VALID_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:\-]{0,127}$")
_QUIET_PATHS = frozenset({"/health", "/ready", "/metrics"})  # probes and scrapes would drown the log
_VARIANT_NIBBLE = "89ab"


def new_request_id() -> str:
    """A version 7 UUID (RFC 9562) as 32 hex digits: the Unix time in milliseconds, then 74 random
    bits (Python 3.11 has no uuid.uuid7, and uuid.uuid4() costs three times as much as this).

    Time-ordered on purpose: the receipts table indexes request IDs, and a B-tree takes keys that
    come in order at its right edge, a page written per few dozen receipts, where random ones land
    each on another page (a page read and written per receipt: the writer thread's CPU per receipt
    went from 11-22 us to 5-7 us, docs/scaling.md)."""
    raw = os.urandom(10).hex()
    return f"{time.time_ns() // 1_000_000:012x}7{raw[:3]}{_VARIANT_NIBBLE[int(raw[3], 16) & 3]}{raw[4:19]}"


class BodyTooLarge(Exception):
    pass


class RequestContextMiddleware:
    def __init__(self, app: ASGIApp, *, max_body_bytes: int, metrics: Metrics, access_log: AccessLog) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.metrics = metrics
        self.access_log = access_log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        request_id = None
        content_length = None
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                candidate = value.decode("latin-1")
                if _VALID_ID.match(candidate):
                    request_id = candidate
            elif name == b"content-length":
                content_length = value
        if request_id is None:
            request_id = new_request_id()
        log_fields: dict[str, Any] = {}
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        state["log"] = log_fields
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(request_id=request_id)
        status = 500

        response_started = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                response_started = True
                status = message["status"]
                message["headers"] = [
                    *message.get("headers", ()),
                    (b"x-request-id", state["request_id"].encode()),
                ]
            await send(message)

        max_bytes = self.max_body_bytes
        if content_length is not None and (not content_length.isdigit() or int(content_length) > max_bytes):
            await self._refuse_too_large(state, send_with_id)
        else:
            received = 0

            async def limited_receive() -> Message:
                nonlocal received
                message = await receive()
                if message["type"] == "http.request":
                    received += len(message.get("body", b""))
                    if received > max_bytes:
                        raise BodyTooLarge
                return message

            try:
                await self.app(scope, limited_receive, send_with_id)
            except BodyTooLarge:
                await self._refuse_too_large(state, send_with_id)
            except asyncio.CancelledError:
                # The server is stopping and its grace period is over (a client that leaves does not
                # cancel us): the client gets the JSON error shape, not a plain-text 500.
                if not response_started:
                    self.metrics.count_error("shutting_down")
                    refusal = ShuttingDown("the service stopped before this request finished; retry it")
                    with contextlib.suppress(Exception):
                        await send_error(
                            send_with_id, refusal, state["request_id"], [(b"connection", b"close")]
                        )
                log_fields["cut_off_by_shutdown"] = True
                self._log_request(scope, state, log_fields, status, started)
                raise
        self._log_request(scope, state, log_fields, status, started)
        structlog.contextvars.clear_contextvars()

    def _log_request(
        self, scope: Scope, state: dict[str, Any], log_fields: dict[str, Any], status: int, started: float
    ) -> None:
        path = scope["path"]
        if status >= 400 or path not in _QUIET_PATHS:
            log_fields["method"] = scope["method"]
            log_fields["path"] = path
            log_fields["status"] = status
            log_fields["latency_ms"] = round((time.perf_counter() - started) * 1000, 3)
            self.access_log.request_completed(state["request_id"], log_fields)

    async def _refuse_too_large(self, state: dict[str, Any], send: Send) -> None:
        self.metrics.count_error("payload_too_large")
        body = orjson.dumps(
            {
                "error": {
                    "type": "payload_too_large",
                    "message": f"request body exceeds MAX_BODY_BYTES ({self.max_body_bytes} bytes)",
                    "request_id": state["request_id"],
                }
            }
        )
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


class TracingMiddleware:
    """The server span of each HTTP request; installed only while tracing is on, just inside
    RequestContextMiddleware (whose request ID and log fields it reads).

    A valid incoming `traceparent` is the span's parent. Its trace and span IDs are bound to every
    log line of the request (`trace_id`, `span_id`), the access-log line included; at the end the
    span takes the request's outcome from that line's fields (model, variant, cache level, tokens,
    cost) and its status code.
    """

    def __init__(self, app: ASGIApp, *, tracing: Tracing) -> None:
        self.app = app
        self.tracing = tracing

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = self.tracing.start_request(scope)
        log_fields: dict[str, Any] = scope["state"]["log"]
        if request.trace_id:
            structlog.contextvars.bind_contextvars(trace_id=request.trace_id, span_id=request.span_id)
            log_fields["trace_id"] = request.trace_id
            log_fields["span_id"] = request.span_id
        status = 500
        error: BaseException | None = None

        async def send_and_note_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note_status)
        except BodyTooLarge:
            status = 413  # answered by RequestContextMiddleware
            raise
        except BaseException as exc:
            error = exc  # answered 500 by Starlette's outermost middleware
            raise
        finally:
            self.tracing.end_request(request, scope, status=status, log_fields=log_fields, error=error)
