"""A/B assignment (split, stickiness, weights' identity), the models file's weights, and the report."""

from __future__ import annotations

import math
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from dspy_service.errors import ConfigError
from dspy_service.experiments import (
    VariantAssigner,
    canonical_weights,
    experiments_report,
    histogram_quantile,
    normalize_weights,
)
from dspy_service.metrics import Metrics
from dspy_service.models_config import load_models_config

USERS = [f"user-{i}" for i in range(10_000)]


def within_four_sigma(counts: Counter[str], weights: dict[str, float], n: int) -> None:
    for name, weight in weights.items():
        sigma = math.sqrt(n * weight * (1 - weight))
        assert abs(counts[name] - n * weight) <= 4 * sigma, (name, counts[name], n * weight)


def test_ten_thousand_users_split_by_weight() -> None:
    """10,000 user ids split 90/10 within four binomial standard deviations (fixed ids: cannot flake)."""
    weights = {"baseline": 0.9, "cot": 0.1}
    assigner = VariantAssigner(weights)
    counts = Counter(assigner.assign(user) for user in USERS)
    assert set(counts) == {"baseline", "cot"}
    within_four_sigma(counts, weights, len(USERS))


def test_three_way_split_passes_chi_square() -> None:
    """A three-way split of 10,000 users passes a chi-square test at p = 0.0001 (critical 18.42, 2 dof)."""
    weights = {"a": 0.5, "b": 0.3, "c": 0.2}
    counts = Counter(VariantAssigner(weights).assign(user) for user in USERS)
    chi_square = sum((counts[k] - len(USERS) * w) ** 2 / (len(USERS) * w) for k, w in weights.items())
    assert chi_square < 18.42, counts


def test_requests_without_user_are_random_by_weight() -> None:
    """No user id: each request draws at random by weight (seeded here, so the check is deterministic)."""
    weights = {"baseline": 0.75, "cot": 0.25}
    assigner = VariantAssigner(weights, rng=random.Random(7))
    counts = Counter(assigner.assign(None) for _ in range(10_000))
    within_four_sigma(counts, weights, 10_000)
    assert len({VariantAssigner(weights).assign(None) for _ in range(200)}) == 2


def test_same_user_always_gets_the_same_variant() -> None:
    """A user's variant never changes across calls or assigners built from the same weights in any
    order or scale."""
    first = VariantAssigner({"baseline": 0.5, "cot": 0.5})
    again = VariantAssigner({"cot": 1, "baseline": 1})
    for user in USERS[:1000]:
        variant = first.assign(user)
        assert all(first.assign(user) == variant for _ in range(5))
        assert again.assign(user) == variant


def test_assignment_does_not_depend_on_the_process() -> None:
    """Another interpreter, with another hash seed, assigns every user the same variant."""
    weights = {"baseline": 0.6, "cot": 0.4}
    here = [VariantAssigner(weights).assign(user) for user in USERS[:500]]
    script = (
        "from dspy_service.experiments import VariantAssigner\n"
        f"a = VariantAssigner({weights!r})\n"
        "print(','.join(a.assign(f'user-{i}') for i in range(500)))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        env={"PYTHONHASHSEED": "12345", "PATH": ""},
        capture_output=True,
        text=True,
        check=True,
    )
    assert done.stdout.strip().split(",") == here


def test_new_weights_are_a_new_experiment() -> None:
    """The weights' identity ignores order and scale but changes with the split itself."""
    assert canonical_weights({"a": 9, "b": 1}) == canonical_weights({"b": 0.1, "a": 0.9})
    assert canonical_weights({"a": 0.9, "b": 0.1}) != canonical_weights({"a": 0.8, "b": 0.2})
    assert canonical_weights({"a": 1, "b": 0}) == canonical_weights({"a": 1})


def test_zero_weight_variant_is_never_assigned() -> None:
    """A variant with weight 0 (paused) gets no assigned traffic, wherever it sorts."""
    for weights in ({"a": 1.0, "z": 0.0}, {"a": 0.0, "m": 1.0, "z": 0.0}):
        assigner = VariantAssigner(weights)
        assert {assigner.assign(user) for user in USERS[:2000]} == {k for k, w in weights.items() if w}


def test_user_points_lie_in_the_unit_interval() -> None:
    """Every user maps into [0, 1)."""
    assigner = VariantAssigner({"a": 1.0})
    assert all(0.0 <= assigner.point(user) < 1.0 for user in USERS)


@pytest.mark.parametrize("weights", [{"a": -1.0, "b": 2.0}, {"a": 0.0}, {"a": math.nan}, {"a": math.inf}])
def test_bad_weights_are_refused(weights: dict[str, float]) -> None:
    """Negative, non-finite and all-zero weights are refused."""
    with pytest.raises(ValueError, match="weight"):
        normalize_weights(weights)


MODELS = (
    "models: {m: {name: openai/m}}\nvariants: {baseline: {signature: 'q -> a'}, cot: {signature: 'q -> a'}}\n"
)


def write_models(tmp_path: Path, extra: str) -> Path:
    path = tmp_path / "models.yaml"
    path.write_text(MODELS + extra)
    return path


def test_models_file_weights_are_normalized(tmp_path: Path) -> None:
    """ab_weights in the models file are scaled to sum to 1."""
    config = load_models_config(
        write_models(tmp_path, "ab_testing_enabled: true\nab_weights: {baseline: 9, cot: 1}\n")
    )
    assert config.ab_weights == pytest.approx({"baseline": 0.9, "cot": 0.1})


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("ab_testing_enabled: true\n", "ab_testing_enabled needs ab_weights"),
        ("ab_weights: {baseline: -1, cot: 2}\n", r"ab_weights.*finite number >= 0"),
        ("ab_weights: {baseline: 0, cot: 0}\n", r"ab_weights.*more than 0"),
        ("ab_weights: {baseline: 1, tuned: 1}\n", "unknown variant 'tuned'"),
    ],
)
def test_models_file_refuses_bad_weights(tmp_path: Path, extra: str, message: str) -> None:
    """A models file with unusable A/B weights stops start-up, naming the problem."""
    with pytest.raises(ConfigError, match=message):
        load_models_config(write_models(tmp_path, extra))


@pytest.mark.parametrize(
    ("q", "expected"),
    [(0.25, 0.1), (0.5, 0.5), (0.95, 0.95), (1.0, 1.0)],
)
def test_histogram_quantile_interpolates_like_prometheus(q: float, expected: float) -> None:
    """Linear interpolation inside the bucket holding rank q * total; the first bucket starts at 0."""
    buckets = [(0.1, 10.0), (0.5, 20.0), (1.0, 40.0), (math.inf, 40.0)]
    assert histogram_quantile(q, buckets) == pytest.approx(expected)


def test_histogram_quantile_edges() -> None:
    """A rank in the +Inf bucket answers the highest finite bound; an empty histogram has none."""
    assert histogram_quantile(0.9, [(1.0, 5.0), (math.inf, 10.0)]) == 1.0
    assert histogram_quantile(0.5, [(1.0, 0.0), (math.inf, 0.0)]) is None
    assert histogram_quantile(0.5, []) is None


def test_report_reads_the_service_counters() -> None:
    """Requests, error rate, cache hit ratio, latency quantiles and cost per request, per variant and
    per model:variant, from the metrics the predictor records."""
    metrics = Metrics(CollectorRegistry())
    for model in ("gpt-4", "gpt-3.5-turbo"):
        route = metrics.route(model, "cot")
        route.success.inc(3)
        route.error.inc(1)
        route.duration_memory.observe(0.0005)
        route.duration_none.observe(0.2)
        route.duration_none.observe(0.2)
        route.cost.inc(0.04)
    samples = [s for family in metrics.registry.collect() for s in family.samples]
    report = experiments_report(
        samples,
        variants=["baseline", "cot"],
        enabled=True,
        weights={"baseline": 0.9, "cot": 0.1},
        default_variant="baseline",
    )
    assert report["ab_testing_enabled"] is True
    assert report["weights"] == {"baseline": 0.9, "cot": 0.1}
    assert "bucket" in report["note"]
    cot = report["variants"]["cot"]
    assert (cot["requests"], cot["errors"], cot["cache_hits"]) == (8, 2, 2)
    assert cot["error_rate"] == 0.25
    assert cot["cache_hit_ratio"] == 0.25
    assert cot["cost_usd"] == pytest.approx(0.08)
    assert cot["cost_per_request_usd"] == pytest.approx(0.01)
    # 2 of 6 timed predictions took under 1 ms, 4 between 100 and 250 ms.
    assert cot["latency_ms"]["p50"] == pytest.approx(100 + 150 * (3 - 2) / 4)
    assert cot["latency_ms"]["p95"] == pytest.approx(100 + 150 * (5.7 - 2) / 4)
    assert cot["miss_latency_ms"]["p50"] == pytest.approx(100 + 150 * 2 / 4)
    assert report["by_model"]["gpt-4:cot"]["requests"] == 4
    baseline = report["variants"]["baseline"]
    assert baseline["requests"] == 0
    assert baseline["error_rate"] is None
    assert baseline["latency_ms"] == {"p50": None, "p95": None}
