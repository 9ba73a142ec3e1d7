"""JSON responses rendered with orjson, and the one error shape."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import orjson
from starlette.responses import Response
from starlette.types import Send

from dspy_service.errors import ServiceError


class JSONResponse(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def error_body(error_type: str, message: str, request_id: str | None) -> dict[str, Any]:
    return {"error": {"type": error_type, "message": message, "request_id": request_id}}


async def send_error(
    send: Send,
    exc: ServiceError,
    request_id: str | None,
    headers: Sequence[tuple[bytes, bytes]] = (),
) -> None:
    """Answer with the error shape straight from ASGI middleware (no Starlette response object)."""
    body = orjson.dumps(error_body(exc.type, exc.message, request_id))
    extra = list(headers)
    if exc.retry_after is not None:
        extra.append((b"retry-after", str(max(1, math.ceil(exc.retry_after))).encode()))
    await send_json(send, body, exc.status, extra)


async def send_json(
    send: Send, body: bytes, status: int = 200, headers: Sequence[tuple[bytes, bytes]] = ()
) -> None:
    """One JSON response, already encoded, straight from ASGI (the hot routes skip Starlette's)."""
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def error_response(exc: ServiceError, request_id: str | None) -> JSONResponse:
    headers = {}
    if exc.retry_after is not None:
        headers["Retry-After"] = str(max(1, round(exc.retry_after)))
    return JSONResponse(
        error_body(exc.type, exc.message, request_id), status_code=exc.status, headers=headers
    )
