"""JSON Schemas of the experiment loop's routes for /openapi.json: the `POST /v1/feedback` body (one
branch per metric of the models file, so that a body is valid by the document when the service
would take its value) and answer, and the `GET /v1/experiments` report with its `quality` section
(records/stats.py writes it)."""

from __future__ import annotations

from typing import Any

from dspy_service.api.feedback import MAX_REQUEST_ID_CHARS
from dspy_service.feedback_metrics import DEFAULT_COMMENT_CHARS, FeedbackMetrics, MetricSpec

_REF = "#/components/schemas/"
_COUNT = {"type": "integer", "minimum": 0}
_RATIO = {"type": ["number", "null"], "minimum": 0, "maximum": 1}
_INTERVAL = {
    "type": ["array", "null"],
    "items": {"type": "number"},
    "minItems": 2,
    "maxItems": 2,
    "description": "[low, high] of the 95% interval; null when it cannot be estimated",
}
_REQUEST_ID = {
    "type": "string",
    "minLength": 1,
    "maxLength": MAX_REQUEST_ID_CHARS,
    "description": "the `request_id` of a prediction (a batch item's own, e.g. `<batch id>.<index>`)",
}


def _value_schema(spec: MetricSpec) -> dict[str, Any]:
    if spec.type == "boolean":
        return {"type": "boolean"}
    if spec.type == "float":
        number: dict[str, Any] = {"type": "number"}
        if spec.min is not None:
            number["minimum"] = spec.min
        if spec.max is not None:
            number["maximum"] = spec.max
        return number
    return {
        "type": "string",
        "minLength": 1,
        "maxLength": spec.max_length or DEFAULT_COMMENT_CHARS,
        "pattern": "^(?!\\s*$)[^\\x00]*$",  # not blank, no NUL
        "description": "a text that is not blank, without NUL characters",
    }


def feedback_request_schema(metrics: FeedbackMetrics) -> dict[str, Any]:
    """`FeedbackRequest`: one branch per metric, its value typed and bounded as the metric says."""
    branches = [
        {
            "type": "object",
            "title": f"{name} ({spec.type})",
            "required": ["request_id", "metric", "value"],
            "additionalProperties": False,
            "properties": {
                "request_id": _REQUEST_ID,
                "metric": {"const": name},
                "value": _value_schema(spec),
            },
        }
        for name, spec in sorted(metrics.metrics.items())
    ]
    if not branches:
        return {"not": {}, "description": "the models file declares no feedback metrics (`feedback:`)"}
    return {"oneOf": branches}


FEEDBACK_RECEIPT: dict[str, Any] = {
    "type": "object",
    "required": ["request_id", "metric", "status", "variant", "model"],
    "additionalProperties": False,
    "properties": {
        "request_id": {"type": "string"},
        "metric": {"type": "string"},
        "status": {"enum": ["created", "updated"], "description": "201 created, 200 updated (replaced)"},
        "variant": {"type": "string", "description": "the variant that answered the request"},
        "model": {"type": "string", "description": "the model the request asked for"},
    },
}

_LATENCY = {
    "type": "object",
    "required": ["p50", "p95"],
    "properties": {"p50": {"type": ["number", "null"]}, "p95": {"type": ["number", "null"]}},
}

_TRAFFIC = {
    "type": "object",
    "description": "this replica's counters for one variant (or one model:variant)",
    "required": [
        "requests",
        "errors",
        "error_rate",
        "cache_hits",
        "cache_hit_ratio",
        "latency_ms",
        "miss_latency_ms",
        "cost_usd",
        "cost_per_request_usd",
    ],
    "properties": {
        "weight": {"type": "number", "minimum": 0, "maximum": 1},
        "requests": _COUNT,
        "errors": _COUNT,
        "error_rate": _RATIO,
        "cache_hits": _COUNT,
        "cache_hit_ratio": _RATIO,
        "latency_ms": _LATENCY,
        "miss_latency_ms": _LATENCY,
        "cost_usd": {"type": "number"},
        "cost_per_request_usd": {"type": ["number", "null"]},
    },
}

_DIFFERENCE = {
    "type": "object",
    "description": "this variant's mean minus the default variant's, with its 95% interval (Newcombe "
    "for booleans, Welch for floats)",
    "required": ["difference", "ci95", "excludes_zero"],
    "additionalProperties": False,
    "properties": {
        "difference": {"type": "number"},
        "ci95": _INTERVAL,
        "excludes_zero": {
            "type": ["boolean", "null"],
            "description": "whether the interval lies wholly above or below 0",
        },
        "df": {"type": "number", "description": "Welch-Satterthwaite degrees of freedom (floats)"},
    },
}

_METRIC_QUALITY = {
    "type": "object",
    "description": "one metric's feedback: `mean` and `ci95` (Wilson for booleans, the share of true; "
    "Student's t for floats) when there are values; comments are counted only",
    "required": ["count"],
    "additionalProperties": False,
    "properties": {
        "count": _COUNT,
        "mean": {"type": "number"},
        "ci95": _INTERVAL,
        "vs_default": {
            "anyOf": [{"$ref": _REF + "QualityDifference"}, {"type": "null"}],
            "description": "null for the default variant itself, or while either side has no values",
        },
    },
}

_QUALITY_GROUPS = {
    "type": "object",
    "additionalProperties": {
        "type": "object",
        "description": "per feedback metric",
        "additionalProperties": {"$ref": _REF + "MetricQuality"},
    },
}

_QUALITY = {
    "description": "feedback per variant from the records database (every replica's: fleet-wide), or "
    "why it is missing",
    "oneOf": [
        {
            "type": "object",
            "required": [
                "available",
                "scope",
                "default_variant",
                "metrics",
                "note",
                "since",
                "variants",
                "by_model",
            ],
            "properties": {
                "available": {"const": True},
                "scope": {"const": "fleet"},
                "default_variant": {"type": "string"},
                "metrics": {
                    "type": "object",
                    "description": "the models file's feedback metrics",
                    "additionalProperties": {"type": "object", "required": ["type"]},
                },
                "note": {"type": "string"},
                "since": {"type": ["string", "null"], "description": "predictions made since then only"},
                "variants": {**_QUALITY_GROUPS, "description": "per variant, every model together"},
                "by_model": {
                    **_QUALITY_GROUPS,
                    "description": "per model:variant, compared with the same model's default variant",
                },
            },
        },
        {
            "type": "object",
            "required": ["available", "reason", "scope", "since"],
            "properties": {
                "available": {"const": False},
                "reason": {"type": "string", "description": "why the database did not answer"},
                "scope": {"const": "fleet"},
                "since": {"type": ["string", "null"]},
            },
        },
    ],
}

EXPERIMENTS: dict[str, Any] = {
    "type": "object",
    "required": [
        "ab_testing_enabled",
        "weights",
        "default_variant",
        "scope",
        "note",
        "variants",
        "by_model",
    ],
    "properties": {
        "ab_testing_enabled": {"type": "boolean"},
        "weights": {"type": "object", "additionalProperties": {"type": "number"}},
        "default_variant": {"type": "string"},
        "scope": {"const": "replica", "description": "the traffic figures are this replica's"},
        "note": {"type": "string"},
        "variants": {"type": "object", "additionalProperties": {"$ref": _REF + "VariantTraffic"}},
        "by_model": {"type": "object", "additionalProperties": {"$ref": _REF + "VariantTraffic"}},
        "quality": {"$ref": _REF + "Quality"},
    },
}


def experiment_components(metrics: FeedbackMetrics, *, feedback: bool) -> dict[str, Any]:
    """The component schemas the two routes refer to (the feedback body only when feedback is on)."""
    components: dict[str, Any] = {
        "Experiments": EXPERIMENTS,
        "VariantTraffic": _TRAFFIC,
        "Quality": _QUALITY,
        "MetricQuality": _METRIC_QUALITY,
        "QualityDifference": _DIFFERENCE,
    }
    if feedback:
        components["FeedbackRequest"] = feedback_request_schema(metrics)
        components["FeedbackReceipt"] = FEEDBACK_RECEIPT
    return components
