"""`POST /v1/predict/batch`: several predictions in one request.

Each item is a `/v1/predict` body and takes the same path (cache, coalescing, breaker, deadline, cost);
up to BATCH_CONCURRENCY items of a batch run at once. The reply keeps the request's order: each item
is the object `/v1/predict` would have answered, or that request's error, with the status it would
have had. One failing item never fails the batch; only a malformed envelope (not JSON, no `requests`
list, more than BATCH_MAX_ITEMS items) is an error of the whole request.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import Response

from dspy_service.api.deps import services_of
from dspy_service.api.limits import client_identity
from dspy_service.api.responses import JSONResponse, error_body
from dspy_service.api.routes import prediction_body, prediction_input
from dspy_service.api.schemas import BatchRequest, PredictRequest, describe_validation_error
from dspy_service.errors import InvalidRequest, RateLimited, ServiceError
from dspy_service.logs import get_logger
from dspy_service.metrics import Metrics
from dspy_service.predictor import Predictor

_log = get_logger("dspy_service.api.batch")


async def predict_batch(request: Request) -> Response:
    services = services_of(request)
    settings = services.settings
    try:
        envelope = BatchRequest.model_validate_json(await request.body())
    except ValidationError as exc:
        raise InvalidRequest(describe_validation_error(exc)) from None
    items = envelope.requests
    if len(items) > settings.batch_max_items:
        raise InvalidRequest(
            f"requests: at most {settings.batch_max_items} items per batch (BATCH_MAX_ITEMS), "
            f"got {len(items)}"
        )
    state = request.scope["state"]
    limiter = services.rate_limiter
    if limiter is not None and len(items) > 1:  # the middleware counted the batch as one request
        retry_after = await limiter.hit(client_identity(request.scope), len(items) - 1)
        if retry_after is not None:
            services.metrics.count_error("rate_limited")
            raise RateLimited(
                f"a batch of {len(items)} counts as {len(items)} requests: more than {limiter.limit} "
                f"requests in {limiter.period} s; slow down",
                retry_after=retry_after,
            )
    batch_id: str = state["request_id"]
    limit = asyncio.Semaphore(settings.batch_concurrency)
    scope = _ItemScope(state.get("tenant"), {"max_input_chars": settings.max_input_chars})
    lifecycle = services.lifecycle
    lifecycle.in_flight += 1
    try:
        results = await asyncio.gather(
            *(
                _predict_item(services.predictor, services.metrics, limit, raw, f"{batch_id}.{index}", scope)
                for index, raw in enumerate(items)
            )
        )
    finally:
        lifecycle.in_flight -= 1
    failed = sum(1 for result in results if result["status"] != 200)
    costs = [result["metadata"]["cost_usd"] for result in results if result["status"] == 200]
    log_fields = state["log"]
    log_fields["batch_items"] = len(results)
    log_fields["batch_failed"] = failed
    log_fields["cost_usd"] = None if None in costs else sum(costs)
    return JSONResponse(
        {"request_id": batch_id, "succeeded": len(results) - failed, "failed": failed, "results": results}
    )


@dataclass(frozen=True, slots=True)
class _ItemScope:
    """What every item of a batch shares: the caller's tenant (budgets) and the validation limits."""

    tenant: str | None
    context: dict[str, Any]


async def _predict_item(
    predictor: Predictor,
    metrics: Metrics,
    limit: asyncio.Semaphore,
    raw: Any,
    default_id: str,
    scope: _ItemScope,
) -> dict[str, Any]:
    """One item's answer: the `/v1/predict` body with status 200, or its error with its status."""
    try:
        parsed = PredictRequest.model_validate(raw, context=scope.context)
    except ValidationError as exc:
        return _item_error(metrics, InvalidRequest(describe_validation_error(exc)), default_id)
    request_id = parsed.request_id or default_id
    async with limit:
        try:
            result = await predictor.predict(prediction_input(parsed, scope.tenant, request_id, "batch"))
        except ServiceError as exc:
            return _item_error(metrics, exc, request_id)
        except Exception as exc:  # a bug in one item must not take the others' answers with it
            _log.exception("batch.item_unexpected_error", request_id=request_id, error=type(exc).__name__)
            metrics.count_error("internal")
            body = error_body("internal_error", "the service failed unexpectedly; see its logs", request_id)
            return {"status": 500, **body}
    return {"status": 200, **prediction_body(request_id, result)}


def _item_error(metrics: Metrics, exc: ServiceError, request_id: str) -> dict[str, Any]:
    metrics.count_error(exc.type)  # counted as the app's error handler counts a single request's
    body = error_body(exc.type, exc.message, request_id)
    if exc.retry_after is not None:
        body["error"]["retry_after"] = max(1, round(exc.retry_after))
    return {"status": exc.status, **body}
