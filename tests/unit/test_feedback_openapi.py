"""The OpenAPI document of the experiment loop: /v1/feedback appears with FEEDBACK_ENABLED, its body
schema takes a value exactly when the models file's metric does, and the quality report that
records/stats.py writes (every edge: no values, one value, no variance) fits the Experiments schema."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator  # type: ignore[import-untyped]  # no stubs installed
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from dspy_service.api.openapi import build_openapi
from dspy_service.errors import InvalidRequest
from dspy_service.experiments import experiments_report
from dspy_service.feedback_metrics import FeedbackMetrics
from dspy_service.models_config import ModelsConfig
from dspy_service.programs import InputSchema, LoadedProgram
from dspy_service.records.stats import Sums, quality_report
from dspy_service.settings import Settings

METRICS = {
    "helpful": {"type": "boolean"},
    "rating": {"type": "float", "min": 1, "max": 5},
    "score": {"type": "float"},
    "note": {"type": "comment", "max_length": 10},
}


@pytest.fixture(autouse=True)
def _no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RATE_LIMIT", "API_KEYS", "FEEDBACK_ENABLED", "METRICS_PORT"):
        monkeypatch.delenv(name, raising=False)


def config(metrics: dict[str, Any] | None = None) -> ModelsConfig:
    return ModelsConfig.model_validate(
        {
            "models": {"gpt-4": {"key": "gpt-4", "name": "openai/gpt-4"}},
            "variants": {
                key: {"key": key, "module": "tests.programs:Program"} for key in ("baseline", "tuned")
            },
            "feedback": {"metrics": METRICS if metrics is None else metrics},
        }
    )


def program(variant: str) -> LoadedProgram:
    return LoadedProgram(
        variant=variant,
        kind="module",
        origin="tests:Program",
        module=None,
        inputs=InputSchema(variant, ()),
        output_specs=(),
        main_output=None,
        fingerprint="0" * 24,
        is_async=True,
    )


def document(
    tmp_path: Path, models: ModelsConfig | None = None, *, auth: bool = False, **settings: Any
) -> Any:
    models = models or config()
    return build_openapi(
        Settings(_env_file=tmp_path / "none", **settings),
        models,
        auth=auth,
        programs={key: program(key) for key in models.variants},
    )


def validator(doc: dict[str, Any], component: str) -> Draft202012Validator:
    registry: Registry[Any] = Registry().with_resource(
        "urn:openapi", Resource.from_contents(doc, default_specification=DRAFT202012)
    )
    return Draft202012Validator({"$ref": f"urn:openapi#/components/schemas/{component}"}, registry=registry)


def test_feedback_is_documented_only_where_it_is_served(tmp_path: Path) -> None:
    """Without FEEDBACK_ENABLED POST /v1/feedback answers 404 for everything: it is not in the document."""
    assert "/v1/feedback" not in document(tmp_path)["paths"]
    assert "FeedbackRequest" not in document(tmp_path)["components"]["schemas"]
    on = document(tmp_path, feedback_enabled=True)
    responses = on["paths"]["/v1/feedback"]["post"]["responses"]
    assert set(responses) == {"200", "201", "404", "408", "413", "422", "503"}
    assert (
        "records_unavailable"
        in on["components"]["schemas"]["Error"]["properties"]["error"]["properties"]["type"]["enum"]
    )


def test_401_and_429_appear_with_keys_and_a_rate_limit(tmp_path: Path) -> None:
    """Feedback is not rate-limited itself; with RATE_LIMIT, callers without a valid key are (429)."""
    keyed = document(tmp_path, auth=True, feedback_enabled=True)["paths"]["/v1/feedback"]["post"]
    assert "401" in keyed["responses"]
    assert "429" not in keyed["responses"]
    assert keyed["security"] == [{"bearerAuth": []}]
    limited = document(tmp_path, auth=True, feedback_enabled=True, rate_limit="10/second")
    assert "Retry-After" in limited["paths"]["/v1/feedback"]["post"]["responses"]["429"]["headers"]
    assert "429" in limited["paths"]["/v1/experiments"]["get"]["responses"]


VALUES: list[tuple[str, Any]] = [
    ("helpful", True),
    ("helpful", False),
    ("helpful", 1),
    ("helpful", "true"),
    ("helpful", None),
    ("rating", 1),
    ("rating", 5.0),
    ("rating", 3.5),
    ("rating", 0.99),
    ("rating", 6),
    ("rating", True),
    ("rating", "4"),
    ("score", -1e9),
    ("score", 0),
    ("note", "fine"),
    ("note", "ten chars!"),
    ("note", "eleven char"),
    ("note", " "),
    ("note", " \n\t"),
    ("note", " ok "),
    ("note", "a\x00b"),
    ("note", 5),
    ("stars", 3),
]


@pytest.mark.parametrize(("metric", "value"), VALUES)
def test_a_value_is_valid_by_the_document_exactly_when_the_metric_takes_it(
    tmp_path: Path, metric: str, value: Any
) -> None:
    doc = document(tmp_path, feedback_enabled=True)
    body = {"request_id": "r-1", "metric": metric, "value": value}
    try:
        config().feedback.parse(metric, value)
        accepted = True
    except InvalidRequest:
        accepted = False
    assert validator(doc, "FeedbackRequest").is_valid(body) == accepted


def test_a_body_needs_its_three_fields_and_no_other(tmp_path: Path) -> None:
    check = validator(document(tmp_path, feedback_enabled=True), "FeedbackRequest")
    assert not check.is_valid({"request_id": "r-1", "metric": "helpful"})
    assert not check.is_valid({"metric": "helpful", "value": True})
    assert not check.is_valid({"request_id": "", "metric": "helpful", "value": True})
    assert not check.is_valid({"request_id": "r-1", "metric": "helpful", "value": True, "extra": 1})
    nothing = validator(document(tmp_path, config({}), feedback_enabled=True), "FeedbackRequest")
    assert not nothing.is_valid({"request_id": "r-1", "metric": "helpful", "value": True})


def test_every_quality_report_fits_the_experiments_schema(tmp_path: Path) -> None:
    """Values on both variants, on one side only, a single float (no interval), two floats without
    variance (no Welch interval), a variant without feedback, and the report of a database down."""
    metrics = FeedbackMetrics.model_validate({"metrics": METRICS})
    groups = {
        ("gpt-4", "baseline"): {
            "helpful": Sums(10, 6, 6),
            "rating": Sums(2, 8, 32),
            "score": Sums(1, 3, 9),
            "note": Sums(2),
        },
        ("gpt-4", "tuned"): {"helpful": Sums(10, 9, 9), "rating": Sums(2, 10, 50), "score": Sums(3, 6, 14)},
        ("claude", "tuned"): {"helpful": Sums(1, 1, 1)},
    }
    quality = quality_report(
        groups, default_variant="baseline", metrics=metrics, variants=("baseline", "tuned", "new")
    )
    assert quality["variants"]["tuned"]["rating"]["vs_default"] == {
        "difference": 1.0,
        "ci95": None,
        "excludes_zero": None,
    }
    assert quality["variants"]["baseline"]["score"]["ci95"] is None
    report = experiments_report(
        [], variants=("baseline", "tuned", "new"), enabled=False, weights={}, default_variant="baseline"
    )
    check = validator(document(tmp_path, feedback_enabled=True), "Experiments")
    check.validate({**report, "quality": {"available": True, **quality, "since": None}})
    check.validate(
        {**report, "quality": {"available": False, "reason": "down", "scope": "fleet", "since": None}}
    )
    check.validate(report)  # records off: no quality section
    assert not check.is_valid({**report, "quality": {"available": False, "scope": "fleet", "since": None}})


def test_every_new_schema_is_valid_json_schema(tmp_path: Path) -> None:
    doc = document(tmp_path, auth=True, feedback_enabled=True)
    for name in ("FeedbackRequest", "FeedbackReceipt", "Experiments", "Quality", "MetricQuality"):
        Draft202012Validator.check_schema(doc["components"]["schemas"][name])
    empty = document(tmp_path, config({}), feedback_enabled=True)["components"]["schemas"]["FeedbackRequest"]
    Draft202012Validator.check_schema(empty)
