"""The body read timeout: a trickled body is answered 408 and the connection closed; a cancellation
that is not the timeout's own (a shutdown) is never turned into a 408."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest
from prometheus_client import CollectorRegistry
from starlette.types import Message, Receive, Scope, Send

from dspy_service.api.limits import BodyReadTimeoutMiddleware
from dspy_service.metrics import Metrics


async def read_body_app(scope: Scope, receive: Receive, send: Send) -> None:
    while (await receive()).get("more_body", False):
        pass
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


def post_scope() -> dict[str, Any]:
    return {
        "type": "http",
        "path": "/v1/predict",
        "headers": [(b"content-length", b"100")],
        "state": {"request_id": "rid-1"},
    }


class Client:
    """Feeds body chunks with a pause between them and records what the app sends."""

    def __init__(self, pause: float, chunks: int) -> None:
        self.pause = pause
        self.left = chunks
        self.sent: list[Message] = []

    async def receive(self) -> Message:
        await asyncio.sleep(self.pause)
        self.left -= 1
        return {"type": "http.request", "body": b"x", "more_body": self.left > 0}

    async def send(self, message: Message) -> None:
        self.sent.append(message)


def middleware(timeout: float) -> BodyReadTimeoutMiddleware:
    return BodyReadTimeoutMiddleware(
        read_body_app, timeout_secs=timeout, metrics=Metrics(CollectorRegistry())
    )


async def test_a_body_in_time_is_served() -> None:
    """A body that completes within the timeout reaches the app untouched."""
    client = Client(pause=0.01, chunks=3)
    await middleware(1.0)(post_scope(), client.receive, client.send)
    assert client.sent[0]["status"] == 200


async def test_a_trickled_body_gets_408_and_connection_close() -> None:
    """Chunks keep coming, but the whole body is not there within the timeout: 408, error shape."""
    client = Client(pause=0.05, chunks=1000)
    await middleware(0.3)(post_scope(), client.receive, client.send)
    start, body = client.sent
    assert start["status"] == 408
    assert (b"connection", b"close") in start["headers"]
    error = orjson.loads(body["body"])["error"]
    assert (error["type"], error["request_id"]) == ("request_timeout", "rid-1")


async def test_someone_elses_cancellation_propagates() -> None:
    """A shutdown cancelling the request while it reads its body is not answered as a timeout."""
    client = Client(pause=10, chunks=1)
    task = asyncio.create_task(middleware(5.0)(post_scope(), client.receive, client.send))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert client.sent == []
