"""`POST /v1/predict`, `GET /costs`, `GET /config`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import orjson
import structlog
from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from dspy_service.api.deps import is_operator, require_operator, services_of
from dspy_service.api.probes import redis_view
from dspy_service.api.responses import JSONResponse, send_json
from dspy_service.api.schemas import PredictRequest, describe_validation_error
from dspy_service.costs import rows_of
from dspy_service.errors import InvalidRequest
from dspy_service.results import Prediction
from dspy_service.routing import PredictionInput
from dspy_service.settings import redact_url
from dspy_service.timefmt import utc_now_iso

if TYPE_CHECKING:
    from dspy_service.services import Services


def prediction_body(request_id: str, result: Prediction) -> dict[str, Any]:
    """The JSON object `/v1/predict` answers with; also each successful item of a batch."""
    return {
        "request_id": request_id,
        "model": result.model,
        "model_served": result.model_served,
        "variant": result.variant,
        "output": result.output,
        "outputs": result.outputs,
        "metadata": {
            "latency_ms": round(result.latency_ms, 3),
            "cached": result.cache_level is not None,
            "cache_level": result.cache_level,
            "coalesced": result.coalesced,
            "input_tokens": result.input_tokens,
            "output_tokens": result.output_tokens,
            "cost_usd": result.cost_usd,
            "cost_saved_usd": result.cost_saved_usd,
            "cost_known": result.cost_usd is not None,
            "usage_by_model": {name: usage.to_json() for name, usage in result.usage_by_model.items()},
            "timestamp": utc_now_iso(),
        },
    }


async def read_prediction_input(
    scope: Scope,
    receive: Receive,
    validation_context: dict[str, Any],
    source: Literal["predict", "stream"] = "predict",
) -> PredictionInput | None:
    """Read and validate a `/v1/predict` body (None if the client left before sending it all); a
    `request_id` in the body becomes the request's ID from here on."""
    chunks = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    try:
        parsed = PredictRequest.model_validate_json(b"".join(chunks), context=validation_context)
    except ValidationError as exc:
        raise InvalidRequest(describe_validation_error(exc)) from None
    state = scope["state"]
    if parsed.request_id is not None:
        state["request_id"] = parsed.request_id
        structlog.contextvars.bind_contextvars(request_id=parsed.request_id)
    log_fields = state["log"]
    log_fields["model"] = parsed.model
    log_fields["variant"] = parsed.variant
    return prediction_input(parsed, state.get("tenant"), state["request_id"], source)


def prediction_input(
    parsed: PredictRequest,
    tenant: str | None,
    request_id: str | None = None,
    source: Literal["predict", "batch", "stream"] = "predict",
) -> PredictionInput:
    """A validated request body (a single request's or a batch item's) as the predictor's input.
    (`input` or `inputs`, exactly one, is checked here rather than by a pydantic model validator:
    a plain comparison, not a validator call, on every request.)"""
    if (parsed.input is None) == (parsed.inputs is None):
        raise InvalidRequest(
            "give `input` (the first input field) or `inputs` (the input fields by name), not "
            + ("both" if parsed.input is not None else "neither")
        )
    return PredictionInput(
        model=parsed.model,
        variant=parsed.variant,
        parameters=parsed.parameters,
        use_cache=parsed.use_cache,
        input=parsed.input,
        inputs=parsed.inputs,
        user_id=parsed.user_id,
        tenant=tenant,
        request_id=request_id,
        source=source,
    )


def log_result(log_fields: dict[str, Any], result: Prediction) -> None:
    """What the request's access-log line says about its prediction."""
    log_fields["variant"] = result.variant
    log_fields["model_served"] = result.model_served
    log_fields["cache_level"] = result.cache_level
    log_fields["coalesced"] = result.coalesced
    log_fields["input_tokens"] = result.input_tokens
    log_fields["output_tokens"] = result.output_tokens
    log_fields["cost_usd"] = result.cost_usd


class PredictEndpoint:
    """`POST /v1/predict` as a plain ASGI app.

    It is the route every client call takes, so it skips Starlette's Request and Response objects:
    read the body, validate it, predict, write one JSON message. Errors are raised as ServiceError
    and rendered by the app's one error handler like every other route's.
    """

    def __init__(self, services: Services) -> None:
        self._predictor = services.predictor
        self._lifecycle = services.lifecycle
        self._validation_context = {"max_input_chars": services.settings.max_input_chars}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = await read_prediction_input(scope, receive, self._validation_context)
        if request is None:
            return  # the client went away before sending its body
        state = scope["state"]
        lifecycle = self._lifecycle
        lifecycle.in_flight += 1
        try:
            result = await self._predictor.predict(request)
        finally:
            lifecycle.in_flight -= 1
        log_result(state["log"], result)
        await send_json(send, orjson.dumps(prediction_body(state["request_id"], result)))


async def costs(request: Request) -> Response:
    """The cost totals: all of them for operators; a client key's own tenant's rows (named
    model:variant, as the service-wide ones), or none for a key without a tenant."""
    totals, scope = await services_of(request).ledger.snapshot()
    if is_operator(request):
        visible = rows_of(totals, None)
    else:
        tenant = request.scope["state"].get("tenant")
        visible = rows_of(totals, tenant) if tenant is not None else {}
    headers = {"X-Costs-Scope": scope}
    epoch = services_of(request).epoch
    if scope == "fleet" and epoch is not None and epoch.since is not None:
        headers["X-Costs-Since"] = epoch.since  # the fleet totals count from then (redis_epoch.py)
    return JSONResponse(visible, headers=headers)


async def config(request: Request) -> Response:
    require_operator(request, "/config")
    services = services_of(request)
    models_config = services.models_config
    view = {
        "service": services.settings.public_view(),
        "redis": redis_view(services, detailed=True),
        "provider": services.provider_description,
        "default_variant": models_config.default_variant,
        "ab_testing_enabled": models_config.ab_testing_enabled,
        "models": {
            key: {
                "name": spec.name,
                "cost_per_1k_input_tokens": spec.cost_per_1k_input_tokens,
                "cost_per_1k_output_tokens": spec.cost_per_1k_output_tokens,
                "max_retries": spec.max_retries,
                "request_timeout_secs": spec.request_timeout_secs,
                "api_base": redact_url(spec.api_base) if spec.api_base else None,
                "api_key_env": spec.api_key_env,
                "fallbacks": list(spec.fallbacks),
            }
            for key, spec in models_config.models.items()
        },
        "variants": {
            key: {
                "kind": spec.kind,
                "signature": spec.signature,
                "module": spec.module,
                "program": str(spec.program) if spec.program else None,
                "saved": str(spec.saved) if spec.saved else None,
                "models": dict(spec.models),
                "output_field": spec.output_field,
                "fingerprint": services.programs[key].fingerprint,
            }
            for key, spec in models_config.variants.items()
        },
        "auth": {  # never the keys: how many there are and the tenants they name
            "enabled": services.keyring is not None,
            "keys": len(services.keyring) if services.keyring is not None else 0,
            "tenants": services.keyring.tenants if services.keyring is not None else [],
            "metrics_public": services.settings.metrics_public,
        },
        "budgets": models_config.budgets.model_dump(mode="json"),
    }
    return JSONResponse(view)
