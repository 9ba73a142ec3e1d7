"""JSON responses rendered with orjson, and the one error shape."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.responses import Response

from dspy_service.errors import ServiceError


class JSONResponse(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def error_body(error_type: str, message: str, request_id: str | None) -> dict[str, Any]:
    return {"error": {"type": error_type, "message": message, "request_id": request_id}}


def error_response(exc: ServiceError, request_id: str | None) -> JSONResponse:
    headers = {}
    if exc.retry_after is not None:
        headers["Retry-After"] = str(max(1, round(exc.retry_after)))
    return JSONResponse(
        error_body(exc.type, exc.message, request_id), status_code=exc.status, headers=headers
    )
