"""`GET /openapi.json`: the service's OpenAPI 3.1 description of this deployment.

The `/v1/predict` body is derived from `PredictRequest` and the variants' programs (each variant's
typed `inputs`, api/predict_schema.py), with the limits of this deployment filled in; the batch body
from `BatchRequest`; the `/v1/programs` listing from api/programs.py. Responses, error shapes and
headers are described here. Authentication appears only when it is on. The document is rendered
again when a reload replaces the programs or the models file.
"""

from __future__ import annotations

import copy
from collections.abc import Hashable, Mapping
from typing import TYPE_CHECKING, Any

from dspy_service.api.experiment_schemas import experiment_components
from dspy_service.api.predict_schema import INT64, predict_request_components
from dspy_service.api.programs import RenderedJSON, listing_schema, programs_key
from dspy_service.api.schemas import MAX_PARAMETER_DEPTH, BatchRequest
from dspy_service.errors import ServiceError
from dspy_service.models_config import ModelsConfig
from dspy_service.programs import LoadedProgram
from dspy_service.settings import Settings

if TYPE_CHECKING:
    from dspy_service.services import Services

JSON = "application/json"
_REQUEST = {"$ref": "#/components/schemas/PredictRequest"}


def _error_types() -> list[str]:
    # records_unavailable's class is imported only with the records store on: named here, so that
    # the document does not depend on what the process happens to have imported.
    found: set[str] = {"method_not_allowed", "http_error", "internal_error", "records_unavailable"}
    pending: list[type[ServiceError]] = [ServiceError]
    while pending:
        cls = pending.pop()
        found.add(cls.type)
        pending.extend(cls.__subclasses__())
    return sorted(found)


def _parameter_values() -> dict[str, Any]:
    """`ParameterValue<d>`: a JSON value at nesting depth d as `parameters` accepts it (containers up to
    MAX_PARAMETER_DEPTH deep, 64-bit integers, numbers in that range), unrolled level by level."""
    scalars: list[dict[str, Any]] = [
        {"type": "string"},
        {"type": "boolean"},
        {"type": "null"},
        {"type": "number", "minimum": INT64["minimum"], "maximum": INT64["maximum"]},
    ]
    values: dict[str, Any] = {f"ParameterValue{MAX_PARAMETER_DEPTH + 1}": {"anyOf": scalars}}
    for depth in range(MAX_PARAMETER_DEPTH, 0, -1):
        child = {"$ref": f"#/components/schemas/ParameterValue{depth + 1}"}
        values[f"ParameterValue{depth}"] = {
            "anyOf": [
                *scalars,
                {"type": "array", "items": child},
                {"type": "object", "additionalProperties": child},
            ]
        }
    return values


_PREDICT_RESPONSE = {
    "type": "object",
    "required": ["request_id", "model", "model_served", "variant", "output", "outputs", "metadata"],
    "properties": {
        "request_id": {"type": "string"},
        "model": {"type": "string"},
        "model_served": {"type": "string"},
        "variant": {"type": "string"},
        "output": {"description": "the program's main output field"},
        "outputs": {"type": "object", "description": "every output field (GET /v1/programs: their types)"},
        "metadata": {
            "type": "object",
            "required": [
                "latency_ms",
                "cached",
                "cache_level",
                "coalesced",
                "input_tokens",
                "output_tokens",
                "cost_usd",
                "cost_saved_usd",
                "cost_known",
                "usage_by_model",
                "timestamp",
            ],
            "properties": {
                "latency_ms": {"type": "number", "minimum": 0},
                "cached": {"type": "boolean"},
                "cache_level": {"enum": ["memory", "redis", None]},
                "coalesced": {"type": "boolean"},
                "input_tokens": {"type": "integer", "minimum": 0},
                "output_tokens": {"type": "integer", "minimum": 0},
                "cost_usd": {"type": ["number", "null"]},
                "cost_saved_usd": {"type": ["number", "null"]},
                "cost_known": {"type": "boolean"},
                "usage_by_model": {
                    "type": "object",
                    "description": "per public model name the program called",
                    "additionalProperties": {
                        "type": "object",
                        "required": ["calls", "input_tokens", "output_tokens", "cost_usd"],
                        "properties": {
                            "calls": {"type": "integer", "minimum": 0},
                            "input_tokens": {"type": "integer", "minimum": 0},
                            "output_tokens": {"type": "integer", "minimum": 0},
                            "cost_usd": {"type": ["number", "null"]},
                        },
                    },
                },
                "timestamp": {"type": "string"},
            },
        },
    },
}

_STREAM_CHUNK = {
    "type": "object",
    "description": "the data of a `chunk` event of /v1/predict/stream",
    "required": ["field", "text", "predictor"],
    "properties": {
        "field": {"type": "string", "description": "the output field the text belongs to"},
        "text": {"type": "string"},
        "predictor": {
            "type": ["string", "null"],
            "description": "the predictor that wrote it (GET /v1/programs: stream_fields); null for "
            "a cache hit's one chunk of the whole main output",
        },
    },
}

_BATCH_RESPONSE = {
    "type": "object",
    "required": ["request_id", "succeeded", "failed", "results"],
    "properties": {
        "request_id": {"type": "string"},
        "succeeded": {"type": "integer", "minimum": 0},
        "failed": {"type": "integer", "minimum": 0},
        "results": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["status"],
                "properties": {"status": {"type": "integer"}},
                "description": "status 200 with a /v1/predict answer, or that item's status with `error`",
            },
        },
    },
}

_HEALTH = {
    "type": "object",
    "required": ["status", "version", "uptime_secs", "redis_connected", "circuit_breakers", "provider"],
    "properties": {
        "status": {"const": "healthy"},
        "version": {"type": "string"},
        "uptime_secs": {"type": "integer", "minimum": 0},
        "redis_connected": {"type": "boolean", "description": "the state Redis (REDIS_URL) answers"},
        "redis_cache_connected": {
            "type": "boolean",
            "description": "the cache's Redis answers (REDIS_CACHE_URL, else the same as redis_connected)",
        },
        "python_initialized": {"type": "boolean"},
        "cache_size": {"type": "integer", "minimum": 0},
        "circuit_breakers": {
            "type": "object",
            "additionalProperties": {"enum": ["closed", "open", "half_open"]},
        },
        "provider": {"type": "string"},
        "warning": {"type": "string"},
        "redis": {
            "type": "object",
            "description": "each Redis role (state, cache): its topology and how many of its nodes answer",
            "additionalProperties": {"type": "object"},
        },
    },
}

_READY = {
    "type": "object",
    "required": ["ready", "checks"],
    "properties": {"ready": {"type": "boolean"}, "checks": {"type": "object"}},
}

_COST_TOTALS = {
    "type": "object",
    "required": ["total_requests", "total_cost_usd", "cache_hits"],
    "properties": {
        "total_requests": {"type": "integer", "minimum": 0},
        "total_input_tokens": {"type": "integer", "minimum": 0},
        "total_output_tokens": {"type": "integer", "minimum": 0},
        "total_cost_usd": {"type": "number"},
        "cache_hits": {"type": "integer", "minimum": 0},
        "cost_saved_usd": {"type": "number"},
        "unpriced_requests": {"type": "integer", "minimum": 0},
        "unmetered_calls": {"type": "integer", "minimum": 0},
        "last_updated": {"type": ["string", "null"]},
    },
}


def _error_schema() -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["error"],
        "additionalProperties": False,
        "properties": {
            "error": {
                "type": "object",
                "required": ["type", "message", "request_id"],
                "additionalProperties": False,
                "properties": {
                    "type": {"enum": _error_types()},
                    "message": {"type": "string"},
                    "request_id": {"type": ["string", "null"]},
                },
            }
        },
    }


def _batch_request_schema(max_items: int) -> dict[str, Any]:
    """`BatchRequest`'s schema with BATCH_MAX_ITEMS. Its items stay any JSON value: each is validated
    on its own (a bad item fails alone, in a 200), so no item is a schema violation of the body."""
    schema = copy.deepcopy(BatchRequest.model_json_schema())
    schema["properties"]["requests"]["maxItems"] = max_items
    schema["properties"]["requests"]["items"] = {"description": "a PredictRequest, validated on its own"}
    return schema


def _error(description: str, *headers: str) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": description,
        "headers": {"X-Request-ID": {"$ref": "#/components/headers/RequestID"}},
        "content": {JSON: {"schema": {"$ref": "#/components/schemas/Error"}}},
    }
    for header in headers:
        response["headers"][header] = {"$ref": f"#/components/headers/{header}"}
    return response


def _ok(description: str, schema: dict[str, Any], media_type: str = JSON) -> dict[str, Any]:
    return {
        "description": description,
        "headers": {"X-Request-ID": {"$ref": "#/components/headers/RequestID"}},
        "content": {media_type: {"schema": schema}},
    }


def build_openapi(
    settings: Settings,
    config: ModelsConfig,
    *,
    auth: bool,
    programs: Mapping[str, LoadedProgram],
) -> dict[str, Any]:
    """The OpenAPI document for this deployment: its settings, its models file, and its variants'
    programs (each one's typed `inputs`)."""
    protected: dict[str, Any] = {"security": [{"bearerAuth": []}]} if auth else {}
    unauthorized = {"401": _error("missing or unknown API key", "WWW-Authenticate")} if auth else {}
    # Operator-only routes: a client key gets 403 (api/deps.py require_operator).
    forbidden = (
        {"403": _error("a client key: this route is for operator keys (ADMIN_API_KEYS)")} if auth else {}
    )
    metrics_protected = protected if not settings.metrics_public else {}
    metrics_unauthorized = {**unauthorized, **forbidden} if not settings.metrics_public else {}
    rate_limited = (
        {"429": _error("rate limit (RATE_LIMIT) or daily budget spent", "Retry-After")}
        if settings.rate_limit_rule is not None or config.budgets.models or config.budgets.tenants
        else {}
    )
    predict = {
        "post": {
            "operationId": "predict",
            "summary": "Run a DSPy program on one input",
            **protected,
            "requestBody": {
                "required": True,
                "content": {JSON: {"schema": _REQUEST}},
            },
            "responses": {
                "200": _ok("the program's answer", _PREDICT_RESPONSE),
                **unauthorized,
                "404": _error("unknown model or variant"),
                "408": _error("the request body did not arrive within BODY_READ_TIMEOUT_SECS"),
                "413": _error("body over MAX_BODY_BYTES"),
                "422": _error("invalid JSON or body, unknown field or parameter, an input of the wrong type"),
                **rate_limited,
                "502": _error("the provider failed or answered in an unparseable shape"),
                "503": _error("circuit breaker open or too many predictions in flight", "Retry-After"),
                "504": _error("no answer within the model's timeout or the request deadline"),
            },
        }
    }

    # Same body and errors; the answer is server-sent events (`chunk`..., then `result` or `error`).
    events = {
        "description": "each event: `chunk` (data: a StreamChunk: {field, text, predictor}), then one "
        "`result` (data: the /v1/predict body) or one `error` (data: the error body)",
        "type": "object",
        "required": ["event", "data"],
        "properties": {"event": {"enum": ["chunk", "result", "error"]}, "data": {"type": "string"}},
    }
    predict_stream = {
        "post": {
            **predict["post"],
            "operationId": "predictStream",
            "summary": "Run a DSPy program on one input, streaming its output as server-sent events",
            "responses": {
                **predict["post"]["responses"],
                "200": _ok(
                    "the answer's tokens as they arrive, then the result", events, "text/event-stream"
                ),
            },
        }
    }

    def get(operation_id: str, summary: str, responses: dict[str, Any], **extra: Any) -> dict[str, Any]:
        return {"get": {"operationId": operation_id, "summary": summary, **extra, "responses": responses}}

    batch_rate_limited = (
        {"429": _error("rate limit (RATE_LIMIT)", "Retry-After")}
        if settings.rate_limit_rule is not None
        else {}
    )
    batch = {
        "post": {
            "operationId": "predictBatch",
            "summary": "Several predictions in one request; each item fails or succeeds on its own",
            **protected,
            "requestBody": {
                "required": True,
                "content": {
                    JSON: {
                        "schema": _batch_request_schema(settings.batch_max_items),
                    }
                },
            },
            "responses": {
                "200": _ok("one result per item, in order, each with its own status", _BATCH_RESPONSE),
                **unauthorized,
                "408": _error("the request body did not arrive within BODY_READ_TIMEOUT_SECS"),
                "413": _error("body over MAX_BODY_BYTES"),
                "422": _error("not JSON, no `requests` list, or more than BATCH_MAX_ITEMS items"),
                **batch_rate_limited,
            },
        }
    }

    # 429 on routes without a rate limit of their own: only for callers guessing keys (api/auth.py).
    guessing_limited = (
        {
            "429": _error(
                "RATE_LIMIT: too many requests without a valid API key from this address", "Retry-After"
            )
        }
        if auth and settings.rate_limit_rule is not None
        else {}
    )
    experiments = get(
        "experiments",
        "A/B report per variant: traffic from this replica's counters, quality from the feedback "
        "(fleet-wide, with the records store on)",
        {
            "200": _ok("report", {"$ref": "#/components/schemas/Experiments"}),
            **unauthorized,
            **forbidden,
            "422": _error("`since` is neither an age (7d, 12h, 30m) nor an ISO date or time"),
            **guessing_limited,
        },
        parameters=[
            {
                "name": "since",
                "in": "query",
                "required": False,
                "description": "quality of the predictions made since then: an age (`7d`, `12h`, `30m`, "
                "`2w`) or an ISO date or time (UTC unless it names a zone); default: all kept",
                "schema": {"type": "string"},
            }
        ],
        **protected,
    )
    paths = {
        "/v1/predict": predict,
        "/v1/predict/batch": batch,
        "/v1/predict/stream": predict_stream,
        "/v1/experiments": experiments,
        "/health": get("health", "Liveness", {"200": _ok("serving", _HEALTH)}, security=[]),
        "/ready": get(
            "ready",
            "Readiness",
            {
                "200": _ok("ready for traffic", _READY),
                "503": _ok("starting, draining or without Redis", _READY),
            },
            security=[],
        ),
        "/metrics": get(
            "metrics",
            "Prometheus metrics",
            {"200": _ok("Prometheus text format", {"type": "string"}, "text/plain"), **metrics_unauthorized},
            **metrics_protected,
        ),
        "/costs": get(
            "costs",
            "Cost totals per model:variant (a client key: its own tenant's)",
            {
                "200": {
                    **_ok("totals", {"type": "object", "additionalProperties": _COST_TOTALS}),
                    "headers": {
                        "X-Request-ID": {"$ref": "#/components/headers/RequestID"},
                        "X-Costs-Scope": {"required": True, "schema": {"enum": ["fleet", "replica"]}},
                        "X-Costs-Since": {
                            "description": "with the fleet scope: when the state Redis began its totals",
                            "schema": {"type": "string", "format": "date-time"},
                        },
                    },
                },
                **unauthorized,
            },
            **protected,
        ),
        "/v1/programs": get(
            "programs",
            "Every variant's program: its kind, origin, fields with their JSON Schemas, predictors",
            {"200": _ok("the programs this process serves", listing_schema()), **unauthorized},
            **protected,
        ),
        "/config": get(
            "config",
            "The effective configuration, secrets redacted",
            {"200": _ok("configuration", {"type": "object"}), **unauthorized, **forbidden},
            **protected,
        ),
        "/openapi.json": get(
            "openapi",
            "This document",
            {"200": _ok("OpenAPI 3.1", {"type": "object"}), **unauthorized},
            **protected,
        ),
    }
    if settings.metrics_port:
        del paths["/metrics"]  # served on METRICS_PORT, not here
    if settings.feedback_enabled:
        paths["/v1/feedback"] = _feedback_path(protected, unauthorized, guessing_limited)
    components: dict[str, Any] = {
        "schemas": {
            "Error": _error_schema(),
            "StreamChunk": _STREAM_CHUNK,
            **_parameter_values(),
            **predict_request_components(settings, config, programs),
            **experiment_components(config.feedback, feedback=settings.feedback_enabled),
        },
        "headers": {
            "RequestID": {"required": True, "schema": {"type": "string", "minLength": 1}},
            "Retry-After": {"required": True, "schema": {"type": "integer", "minimum": 1}},
            "WWW-Authenticate": {"required": True, "schema": {"type": "string", "pattern": "^Bearer"}},
        },
    }
    if auth:
        components["securitySchemes"] = {"bearerAuth": {"type": "http", "scheme": "bearer"}}
    return {
        "openapi": "3.1.0",
        "info": {
            "title": settings.service_name,
            "version": settings.service_version,
            "description": "DSPy programs behind POST /v1/predict, with cache, breakers and cost accounting.",
        },
        "paths": paths,
        "components": components,
    }


def _feedback_path(
    protected: dict[str, Any], unauthorized: dict[str, Any], limited: dict[str, Any]
) -> dict[str, Any]:
    return {
        "post": {
            "operationId": "feedback",
            "summary": "A value of one of the models file's feedback metrics, on one prediction",
            "description": "Upsert per (request, metric): the first value is created (201), another "
            "replaces it (200). Only the tenant whose key made the request may give it feedback.",
            **protected,
            "requestBody": {
                "required": True,
                "content": {JSON: {"schema": {"$ref": "#/components/schemas/FeedbackRequest"}}},
            },
            "responses": {
                "201": _ok("the first value of this metric on this request, kept", _FEEDBACK_RECEIPT),
                "200": _ok("an earlier value of this metric on this request, replaced", _FEEDBACK_RECEIPT),
                **unauthorized,
                "404": _error(
                    "no prediction with this request_id was made by this key's tenant (another tenant's "
                    "request is answered exactly as one never made)"
                ),
                "408": _error("the request body did not arrive within BODY_READ_TIMEOUT_SECS"),
                "413": _error("body over MAX_BODY_BYTES"),
                "422": _error(
                    "invalid JSON or body, a missing or unknown field, an unknown metric, a value of the "
                    "wrong type or out of the metric's range"
                ),
                **limited,
                "503": _error("the records database cannot keep the value now", "Retry-After"),
            },
        }
    }


_FEEDBACK_RECEIPT = {"$ref": "#/components/schemas/FeedbackReceipt"}


class OpenAPIEndpoint(RenderedJSON):
    """`GET /openapi.json` for the services' current models file and programs (a reload replaces
    both), rendered again when what the document shows of them has changed."""

    def __init__(self, services: Services) -> None:
        def render() -> dict[str, Any]:
            return build_openapi(
                services.settings,
                services.models_config,
                auth=services.keyring is not None,
                programs=services.programs,
            )

        def key() -> Hashable:
            config = services.models_config
            return (
                programs_key(services.programs),
                tuple(config.models),
                config.default_variant,
                config.ab_testing_enabled,
                tuple(config.ab_weights.items()),
                bool(config.budgets.models or config.budgets.tenants),
                config.feedback.model_dump_json(),
                services.keyring is not None,
            )

        super().__init__(render, key)
