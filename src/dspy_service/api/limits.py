"""Abuse limits as plain ASGI middleware: request rate per client, and a deadline for reading a body.

`RateLimitMiddleware` counts requests to the prediction routes (`/v1/predict...`) and feedback
(`/v1/feedback`, each a database write), never probes, per
tenant or API key (per client address when authentication is off); over the limit: 429
`rate_limited` with `Retry-After`, before the body is read. A batch counts as many requests as it has
items (the endpoint counts the rest once it has read them), and requests refused with 401 are
counted per client address (auth.py), so guessing keys is rate-limited too.

`BodyReadTimeoutMiddleware` gives the whole request body BODY_READ_TIMEOUT_SECS to arrive; a client
trickling it slower gets 408 `request_timeout` and the connection is closed. (uvicorn times out idle
connections, not a body that keeps arriving byte by byte.)
"""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dspy_service.api.responses import send_error
from dspy_service.errors import RateLimited, RequestTimeout
from dspy_service.metrics import Metrics
from dspy_service.ratelimit import RateLimiter

LIMITED_PREFIX = "/v1/predict"  # /v1/predict and the routes under it (batch, stream)
FEEDBACK_PATH = "/v1/feedback"


_MAX_IDENTITY_CHARS = 80  # longer identities (a long address, say) are counted under their hash


def client_identity(scope: Scope) -> str:
    """Whom a request is counted against: its tenant, else its API key, else its client address
    (the peer's, or the one a trusted proxy forwarded: FORWARDED_ALLOW_IPS)."""
    state = scope.get("state") or {}
    if (tenant := state.get("tenant")) is not None:
        return f"tenant:{tenant}"
    if (key_id := state.get("api_key_id")) is not None:
        return f"key:{key_id}"
    return address_identity(scope)


def address_identity(scope: Scope, kind: str = "addr") -> str:
    client = scope.get("client")
    identity = f"{kind}:{client[0] if client else 'unknown'}"
    if len(identity) > _MAX_IDENTITY_CHARS:
        identity = f"{kind}:sha256:{hashlib.sha256(identity.encode()).hexdigest()[:32]}"
    return identity


async def refuse_if_limited(
    limiter: RateLimiter, metrics: Metrics, identity: str, send: Send, state: dict[str, Any], weight: int = 1
) -> bool:
    """Count `weight` requests of `identity`; over the limit, answer 429 and say True."""
    retry_after = await limiter.hit(identity, weight)
    if retry_after is None:
        return False
    metrics.count_error("rate_limited")
    if (log_fields := state.get("log")) is not None:
        log_fields["rate_limited"] = True
    refusal = RateLimited(
        f"more than {limiter.limit} requests in {limiter.period} s; slow down", retry_after=retry_after
    )
    await send_error(send, refusal, state.get("request_id"))
    return True


class RateLimitMiddleware:
    def __init__(self, app: ASGIApp, *, limiter: RateLimiter, metrics: Metrics) -> None:
        self.app = app
        self.limiter = limiter
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and (
            scope["path"].startswith(LIMITED_PREFIX) or scope["path"] == FEEDBACK_PATH
        ):
            state = scope.setdefault("state", {})
            if await refuse_if_limited(self.limiter, self.metrics, client_identity(scope), send, state):
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
