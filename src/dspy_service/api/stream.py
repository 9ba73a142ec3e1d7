"""`POST /v1/predict/stream`: one prediction as server-sent events.

The body is the `/v1/predict` body. The reply is `text/event-stream` with these events:

    event: chunk    data: {"field": "answer", "text": "The capital", "predictor": "predict"}
                    the provider's tokens, as they come (`predictor`: which of the program's
                    predictors wrote them; null for a cache hit's one chunk)
    event: result   data: <the /v1/predict response body>               last, with the same metadata
    event: error    data: {"error": {...}}                              instead of `result`, on failure

A cache hit is one `chunk` holding the whole main output, then `result`. The response starts with the
first chunk: a request that fails before any output (unknown model, budget, breaker open, provider
down) gets the ordinary JSON error with its status code, as on `/v1/predict`. A client that goes away
mid-stream cancels the upstream call, so nothing is spent on an answer nobody reads.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator
from typing import TYPE_CHECKING, Any

import orjson
from starlette.types import Receive, Scope, Send

from dspy_service.api.responses import error_body
from dspy_service.api.routes import log_result, prediction_body, read_prediction_input
from dspy_service.errors import ServiceError
from dspy_service.logs import get_logger
from dspy_service.results import Prediction, StreamChunk

if TYPE_CHECKING:
    from dspy_service.services import Services

_log = get_logger("dspy_service.api.stream")

_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),  # proxies such as nginx must pass events on, not buffer them
]


def sse_event(event: str, data: Any) -> bytes:
    return b"event: " + event.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


async def _until_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class StreamEndpoint:
    def __init__(self, services: Services) -> None:
        self._predictor = services.predictor
        self._lifecycle = services.lifecycle
        self._metrics = services.metrics
        self._validation_context = {"max_input_chars": services.settings.max_input_chars}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = await read_prediction_input(scope, receive, self._validation_context, "stream")
        if request is None:
            return
        state = scope["state"]
        self._lifecycle.in_flight += 1
        # The stream runs in its own task so that a disconnect (seen by `receive`) can cancel it.
        streaming = asyncio.ensure_future(self._respond(self._predictor.stream(request), send, state))
        watcher = asyncio.ensure_future(_until_disconnect(receive))
        try:
            await asyncio.wait((streaming, watcher), return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
            left = not streaming.done()
            if left:
                streaming.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await streaming
            self._lifecycle.in_flight -= 1
        if left:
            state["log"]["client_disconnected"] = True
            self._metrics.count_error("client_disconnected")
            return
        streaming.result()  # an error before the first event: the app's handler answers it

    async def _respond(
        self, events: AsyncGenerator[StreamChunk | Prediction, None], send: Send, state: dict[str, Any]
    ) -> None:
        try:
            item = await anext(events)  # errors from here propagate: nothing is sent yet
            await send({"type": "http.response.start", "status": 200, "headers": _HEADERS})
            try:
                while isinstance(item, StreamChunk):
                    data = {"field": item.field, "text": item.text, "predictor": item.predictor}
                    await send(
                        {"type": "http.response.body", "body": sse_event("chunk", data), "more_body": True}
                    )
                    item = await anext(events)
                log_result(state["log"], item)
                tail = sse_event("result", prediction_body(state["request_id"], item))
            except ServiceError as exc:
                self._metrics.count_error(exc.type)
                state["log"]["error"] = exc.type
                tail = sse_event("error", error_body(exc.type, exc.message, state["request_id"]))
            except Exception as exc:  # the response has started: the client still gets an ending
                _log.exception("stream.unexpected_error", error=type(exc).__name__)
                self._metrics.count_error("internal")
                state["log"]["error"] = "internal_error"
                message = "the service failed unexpectedly; see its logs"
                tail = sse_event("error", error_body("internal_error", message, state["request_id"]))
            await send({"type": "http.response.body", "body": tail, "more_body": False})
        finally:
            await events.aclose()
