"""`POST /v1/feedback`: a value for one of the models file's feedback metrics, on one prediction.

`{"request_id": "...", "metric": "helpful", "value": true}`. The first value of a (request, metric)
answers 201 `created`; given again, it replaces the earlier one and answers 200 `updated`. Only the
tenant whose key made the request may give it feedback: for anyone else the request is unknown
(404), exactly as a request ID never seen, so other tenants' request IDs are not revealed.

A receipt made by this process and still queued is written first (RecordStore.record_feedback). One
made by another replica or worker reaches the database within that process's writer interval (1 s),
so a request ID that is not found is looked up once more after UNKNOWN_RETRY_SECS before the 404:
feedback sent right after its prediction, through a load balancer, is not refused.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.requests import Request
from starlette.responses import Response

from dspy_service.api.deps import services_of
from dspy_service.api.responses import JSONResponse
from dspy_service.api.schemas import describe_validation_error
from dspy_service.errors import InvalidRequest, NotFound

if TYPE_CHECKING:
    from dspy_service.records import FeedbackOutcome

MAX_REQUEST_ID_CHARS = 200  # a batch item's ID is the batch's (up to 128) and `.<index>`
UNKNOWN_RETRY_SECS = 1.5  # the writer's flush interval (1 s) and the batch's insert


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    request_id: str = Field(min_length=1, max_length=MAX_REQUEST_ID_CHARS)
    metric: str = Field(min_length=1, max_length=64)
    value: Any  # checked against the metric's type by FeedbackMetrics.parse


async def feedback(request: Request) -> Response:
    services = services_of(request)
    recorder = services.recorder
    if recorder is None or not services.settings.feedback_enabled:
        raise NotFound("feedback is off: the service keeps no receipts (set FEEDBACK_ENABLED=true)")
    try:
        given = FeedbackRequest.model_validate_json(await request.body())
    except ValidationError as exc:
        raise InvalidRequest(describe_validation_error(exc)) from None
    state = request.scope["state"]
    state["log"]["feedback_for"] = given.request_id
    state["log"]["metric"] = given.metric
    metrics = services.models_config.feedback
    tenant = state.get("tenant")

    async def record() -> FeedbackOutcome:
        return await recorder.store.record_feedback(
            metrics, request_id=given.request_id, metric=given.metric, value=given.value, tenant=tenant
        )

    outcome = await record()
    if outcome.status == "unknown_request":
        await asyncio.sleep(UNKNOWN_RETRY_SECS)  # written by another replica, perhaps, any moment now
        outcome = await record()
    if outcome.status == "unknown_request":
        whose = " to this API key's tenant" if services.keyring is not None else ""
        raise NotFound(f"no prediction with request_id {given.request_id!r} is known{whose}")
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
