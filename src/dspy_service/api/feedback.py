"""`POST /v1/feedback`: a value for one of the models file's feedback metrics, on one prediction.

`{"request_id": "...", "metric": "helpful", "value": true}`. Given again for the same request and
metric, the value replaces the earlier one. Only the tenant whose key made the request may give it
feedback: for anyone else the request is unknown (404), exactly as a request ID never seen, so other
tenants' request IDs are not revealed.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.requests import Request
from starlette.responses import Response

from dspy_service.api.deps import services_of
from dspy_service.api.responses import JSONResponse
from dspy_service.api.schemas import describe_validation_error
from dspy_service.errors import InvalidRequest, NotFound


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    request_id: str = Field(min_length=1, max_length=200)
    metric: str = Field(min_length=1, max_length=64)
    value: Any = Field()


async def feedback(request: Request) -> Response:
    services = services_of(request)
    recorder = services.recorder
    if recorder is None or not services.settings.feedback_enabled:
        raise NotFound("feedback is off: the service keeps no receipts (set FEEDBACK_ENABLED=true)")
    try:
        given = FeedbackRequest.model_validate_json(await request.body())
    except ValidationError as exc:
        raise InvalidRequest(describe_validation_error(exc)) from None
    if "value" not in given.model_fields_set:
        raise InvalidRequest("value: Field required")
    tenant = request.scope["state"].get("tenant")
    outcome = await recorder.store.record_feedback(
        services.models_config.feedback,
        request_id=given.request_id,
        metric=given.metric,
        value=given.value,
        tenant=tenant,
    )
    if outcome.status == "unknown_request":
        raise NotFound(f"no prediction with request_id {given.request_id!r} is known to this key")
    services.metrics.feedback.labels(outcome.variant or "", given.metric).inc()
    return JSONResponse(
        {
            "request_id": given.request_id,
            "metric": given.metric,
            "status": outcome.status,
            "variant": outcome.variant,
            "model": outcome.model,
        },
        status_code=201 if outcome.status == "created" else 200,
    )
