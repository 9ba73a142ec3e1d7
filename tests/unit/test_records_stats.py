"""The quality report built from feedback sums: each figure against a hand computation, the
differences from the default variant, and the report's shape."""

from __future__ import annotations

import math
import statistics
from typing import Any

import pytest

from dspy_service.feedback_metrics import FeedbackMetrics
from dspy_service.records.intervals import t_quantile
from dspy_service.records.stats import Sums, quality_report

METRICS = FeedbackMetrics.model_validate(
    {
        "metrics": {
            "helpful": {"type": "boolean"},
            "rating": {"type": "float", "min": 1, "max": 5},
            "note": {"type": "comment"},
        }
    }
)


def sums_of(values: list[float]) -> Sums:
    return Sums(count=len(values), total=sum(values), squares=sum(v * v for v in values))


BASELINE_HELPFUL = [1.0] * 8 + [0.0] * 2  # 8 of 10
TUNED_HELPFUL = [1.0] * 38 + [0.0] * 2  # 38 of 40
BASELINE_RATING = [4, 5, 3, 4, 5, 2, 4, 4, 5, 3]
TUNED_RATING = [5, 5, 4, 5, 5, 4, 5, 5]


def report() -> dict[str, Any]:
    groups = {
        ("gpt", "baseline"): {
            "helpful": sums_of(BASELINE_HELPFUL),
            "rating": sums_of([float(v) for v in BASELINE_RATING]),
            "note": Sums(count=3),
        },
        ("gpt", "tuned"): {
            "helpful": sums_of(TUNED_HELPFUL[:20]),
            "rating": sums_of([float(v) for v in TUNED_RATING]),
        },
        ("claude", "tuned"): {"helpful": sums_of(TUNED_HELPFUL[20:])},
    }
    return quality_report(
        groups, default_variant="baseline", metrics=METRICS, variants=("baseline", "tuned", "new")
    )


def wilson(x: float, n: float, z: float = 1.959963984540054) -> tuple[float, float]:
    p = x / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return centre - half, centre + half


def test_boolean_mean_and_wilson_interval_by_hand() -> None:
    """baseline: 8 of 10 helpful, mean 0.8, Wilson (0.490162, 0.943318)."""
    entry = report()["variants"]["baseline"]["helpful"]
    assert entry["count"] == 10
    assert entry["mean"] == 0.8
    low, high = wilson(8, 10)
    assert entry["ci95"] == pytest.approx([low, high], abs=1e-6)
    assert entry["ci95"] == pytest.approx([0.4902, 0.9433], abs=5e-5)  # the published figures
    assert entry["vs_default"] is None  # the default variant is not compared with itself


def test_boolean_difference_from_the_default_by_hand() -> None:
    """tuned (every model): 38/40 against 8/10: d = 0.15, Newcombe's interval from the two Wilson
    intervals, which here includes 0."""
    entry = report()["variants"]["tuned"]["helpful"]
    assert (entry["count"], entry["mean"]) == (40, 0.95)
    l1, u1 = wilson(38, 40)
    l2, u2 = wilson(8, 10)
    d = 0.95 - 0.8
    expected = [
        d - math.sqrt((0.95 - l1) ** 2 + (u2 - 0.8) ** 2),
        d + math.sqrt((u1 - 0.95) ** 2 + (0.8 - l2) ** 2),
    ]
    vs = entry["vs_default"]
    assert vs["difference"] == pytest.approx(d, abs=1e-6)
    assert vs["ci95"] == pytest.approx(expected, abs=1e-6)
    assert vs["excludes_zero"] is (expected[0] > 0 or expected[1] < 0)
    assert vs["excludes_zero"] is False


def test_float_mean_and_t_interval_by_hand() -> None:
    """baseline ratings: mean 3.9, s = 0.994429, t(0.975, 9) = 2.262157 (table): 3.9 ± 0.711372."""
    entry = report()["variants"]["baseline"]["rating"]
    s = statistics.stdev(BASELINE_RATING)
    half = 2.262157 * s / math.sqrt(10)
    assert (entry["count"], entry["mean"]) == (10, 3.9)
    assert entry["ci95"] == pytest.approx([3.9 - half, 3.9 + half], abs=1e-5)


def test_float_difference_is_welchs_by_hand() -> None:
    """tuned vs baseline ratings: d = 4.75 - 3.9 = 0.85; s1²/n1 = (1.5/7)/8 = 0.026786 and
    s2²/n2 = 0.988889/10 = 0.098889, so se² = 0.125675 and the Welch-Satterthwaite
    df = se⁴ / (0.026786²/7 + 0.098889²/9) = 13.28; t(0.975, 13.28) lies between the table's 2.160
    (df 13) and 2.145 (df 14); the interval excludes zero."""
    vs = report()["variants"]["tuned"]["rating"]["vs_default"]
    v1, n1 = statistics.variance(TUNED_RATING), len(TUNED_RATING)
    v2, n2 = statistics.variance(BASELINE_RATING), len(BASELINE_RATING)
    se2 = v1 / n1 + v2 / n2
    df = se2**2 / ((v1 / n1) ** 2 / (n1 - 1) + (v2 / n2) ** 2 / (n2 - 1))
    assert se2 == pytest.approx(0.125675, abs=1e-6)
    assert df == pytest.approx(13.28, abs=0.01)
    assert vs["difference"] == pytest.approx(0.85, abs=1e-6)
    assert vs["df"] == pytest.approx(df, abs=1e-5)
    quantile = t_quantile(0.975, df)
    assert 2.145 < quantile < 2.160
    half = quantile * math.sqrt(se2)
    assert vs["ci95"] == pytest.approx([0.85 - half, 0.85 + half], abs=1e-5)
    assert vs["excludes_zero"] is True


def test_per_model_rows_compare_with_the_same_models_default() -> None:
    """gpt:tuned is compared with gpt:baseline; claude has no baseline, so nothing to compare."""
    by_model = report()["by_model"]
    assert set(by_model) == {"gpt:baseline", "gpt:tuned", "claude:tuned"}
    gpt = by_model["gpt:tuned"]["helpful"]
    assert (gpt["count"], gpt["mean"]) == (20, 1.0)
    assert gpt["vs_default"]["difference"] == pytest.approx(0.2)
    assert by_model["claude:tuned"]["helpful"]["vs_default"] is None


def test_comments_are_counted_and_variants_without_feedback_are_listed() -> None:
    """A comment metric has a count only; a variant nobody gave feedback on shows zero counts."""
    variants = report()["variants"]
    assert variants["baseline"]["note"] == {"count": 3}
    assert variants["new"]["helpful"] == {"count": 0, "vs_default": None}
    assert variants["tuned"]["note"] == {"count": 0}


def test_one_rating_has_a_mean_but_no_interval() -> None:
    """n = 1: mean shown, interval null, and a difference without an interval."""
    groups = {("m", "a"): {"rating": sums_of([4.0])}, ("m", "b"): {"rating": sums_of([3.0, 5.0])}}
    view = quality_report(groups, default_variant="a", metrics=METRICS)
    assert view["variants"]["a"]["rating"] == {"count": 1, "mean": 4.0, "ci95": None, "vs_default": None}
    assert view["variants"]["b"]["rating"]["vs_default"] == {
        "difference": 0.0,
        "ci95": None,
        "excludes_zero": None,
    }
