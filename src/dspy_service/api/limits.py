"""Abuse limits as plain ASGI middleware: request rate per client, and a deadline for reading a body.

`RateLimitMiddleware` counts requests to the prediction routes (`/v1/predict...`), never probes, per
tenant or API key (per client address when authentication is off); over the limit: 429
`rate_limited` with `Retry-After`, before the body is read.

`BodyReadTimeoutMiddleware` gives the whole request body BODY_READ_TIMEOUT_SECS to arrive; a client
trickling it slower gets 408 `request_timeout` and the connection is closed. (uvicorn times out idle
connections, not a body that keeps arriving byte by byte.)
"""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dspy_service.api.responses import send_error
from dspy_service.errors import RateLimited, RequestTimeout
from dspy_service.metrics import Metrics
from dspy_service.ratelimit import RateLimiter

LIMITED_PREFIX = "/v1/predict"  # /v1/predict and the routes under it (batch, stream)


def client_identity(scope: Scope) -> str:
    """Whom a request is counted against: its tenant, else its API key, else its client address."""
    state = scope.get("state") or {}
    if (tenant := state.get("tenant")) is not None:
        return f"tenant:{tenant}"
    if (key_id := state.get("api_key_id")) is not None:
        return f"key:{key_id}"
    client = scope.get("client")
    return f"addr:{client[0] if client else 'unknown'}"


class RateLimitMiddleware:
    def __init__(self, app: ASGIApp, *, limiter: RateLimiter, metrics: Metrics) -> None:
        self.app = app
        self.limiter = limiter
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith(LIMITED_PREFIX):
            retry_after = await self.limiter.hit(client_identity(scope))
            if retry_after is not None:
                self.metrics.count_error("rate_limited")
                state = scope.setdefault("state", {})
                if (log_fields := state.get("log")) is not None:
                    log_fields["rate_limited"] = True
                refusal = RateLimited(
                    f"more than {self.limiter.limit} requests in {self.limiter.period} s; slow down",
                    retry_after=retry_after,
                )
                await send_error(send, refusal, state.get("request_id"))
                return
        await self.app(scope, receive, send)


class _Reading:
    """A request still reading its body: when it must be done, and whether the watchdog cut it off."""

    __slots__ = ("deadline", "expired")

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self.expired = False


class BodyReadTimeoutMiddleware:
    """Requests still reading their body are registered with one watchdog task per app, which every
    fraction of the timeout cancels those past their deadline; they are answered 408. Per request this
    costs a dictionary insert and delete, not a timer (so the cut-off comes up to ~10% late)."""

    def __init__(self, app: ASGIApp, *, timeout_secs: float, metrics: Metrics) -> None:
        self.app = app
        self.timeout = timeout_secs
        self.metrics = metrics
        self._reading: dict[asyncio.Task[Any], _Reading] = {}
        self._watchdog: asyncio.Task[None] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not _has_body(scope):
            await self.app(scope, receive, send)
            return
        task = asyncio.current_task()
        assert task is not None
        reading = self._reading
        entry = reading[task] = _Reading(asyncio.get_running_loop().time() + self.timeout)
        if self._watchdog is None:
            self._watchdog = asyncio.get_running_loop().create_task(self._watch(), name="body-read-watchdog")
        response_started = False

        async def timed_receive() -> Message:
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body", False):
                reading.pop(task, None)
            return message

        async def tracked_send(message: Message) -> None:
            nonlocal response_started
            response_started = True
            await send(message)

        try:
            await self.app(scope, timed_receive, tracked_send)
        except asyncio.CancelledError:
            # The watchdog's cancellation (and nobody else's, e.g. a shutdown's): answer 408 instead.
            if not entry.expired or task.uncancel() > 0 or response_started:
                raise
            self.metrics.count_error("request_timeout")
            state = scope.setdefault("state", {})
            refusal = RequestTimeout(f"the request body did not arrive within {self.timeout:g} s")
            await send_error(send, refusal, state.get("request_id"), [(b"connection", b"close")])
        finally:
            reading.pop(task, None)

    async def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        interval = min(max(self.timeout / 10, 0.05), 1.0)
        while True:
            await asyncio.sleep(interval)
            now = loop.time()
            late = [(task, entry) for task, entry in self._reading.items() if entry.deadline <= now]
            for task, entry in late:
                del self._reading[task]
                entry.expired = True
                task.cancel()


def _has_body(scope: Scope) -> bool:
    name: bytes
    value: bytes
    for name, value in scope["headers"]:
        if name == b"content-length":
            return value != b"0"
        if name == b"transfer-encoding":
            return True
    return False
