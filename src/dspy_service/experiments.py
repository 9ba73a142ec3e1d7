"""A/B testing of variants: assignment by weight, sticky per user, and the per-variant report.

Assignment is built once from the models file's `ab_weights`: the weights are normalized, sorted by
variant name and turned into cumulative bounds, so assigning a request costs one hash (or one random
draw) and one bisection. A `user_id` is hashed with BLAKE2b together with the weights' canonical form
and mapped to [0, 1): the same user lands on the same variant in every process for as long as the
weights stand; new weights are a new experiment and shuffle users afresh.

The report reads the service's own Prometheus counters back (never adding work to the hot path):
requests and errors from `dspy_predictions_total`, cache hits and latency quantiles from the
`dspy_prediction_duration_seconds` histogram, spend from `dspy_prediction_cost_total`.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import math
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

_UNIT = 1.0 / (1 << 53)  # 53 random bits scaled into [0, 1), as random.random() does

QUANTILE_NOTE = (
    "p50/p95 are estimates from the dspy_prediction_duration_seconds histogram buckets "
    "(linear interpolation within a bucket, as Prometheus' histogram_quantile); "
    "only successful predictions are timed"
)


def normalize_weights(weights: Mapping[str, float]) -> dict[str, float]:
    """Weights scaled to sum to 1; each must be a finite number >= 0 and their sum > 0."""
    for name, weight in weights.items():
        if not math.isfinite(weight) or weight < 0:
            raise ValueError(f"weight of {name!r} must be a finite number >= 0, not {weight!r}")
    total = math.fsum(weights.values())
    if total <= 0:
        raise ValueError("weights must add up to more than 0")
    return {name: weight / total for name, weight in weights.items()}


def canonical_weights(weights: Mapping[str, float]) -> str:
    """One text per set of weights, whatever their order or scale: the experiment's identity."""
    normalized = normalize_weights(weights)
    kept = {name: round(weight, 12) for name, weight in sorted(normalized.items()) if weight > 0}
    return json.dumps(kept, sort_keys=True, separators=(",", ":"))


class VariantAssigner:
    """Picks the variant of a request that did not name one: by weight, sticky per user id."""

    def __init__(self, weights: Mapping[str, float], *, rng: random.Random | None = None) -> None:
        normalized = normalize_weights(weights)
        self.weights = dict(sorted(normalized.items()))
        self.fingerprint = canonical_weights(normalized)
        self._names = tuple(self.weights)
        bounds = []
        running = 0.0
        for weight in self.weights.values():
            running += weight
            bounds.append(running)
        bounds[-1] = 1.0  # no rounding gap at the top: every point of [0, 1) falls in some variant
        for i in range(len(bounds) - 2, -1, -1):  # zero-weight variants at the end never get a point
            if self.weights[self._names[i + 1]] == 0:
                bounds[i] = 1.0
            else:
                break
        self._bounds = tuple(bounds)
        self._hasher = hashlib.blake2b(self.fingerprint.encode() + b"\x00", digest_size=8)
        self._random = rng or random.Random()

    def point(self, user_id: str) -> float:
        """The user's fixed point in [0, 1) under these weights."""
        hasher = self._hasher.copy()
        hasher.update(user_id.encode())
        return (int.from_bytes(hasher.digest(), "big") >> 11) * _UNIT

    def assign(self, user_id: str | None) -> str:
        """The variant for this user (always the same one), or a random one by weight without a user."""
        point = self._random.random() if user_id is None else self.point(user_id)
        return self._names[bisect.bisect_right(self._bounds, point)]


def build_assigner(enabled: bool, weights: Mapping[str, float]) -> VariantAssigner | None:
    """The assigner for a models file, or None when A/B testing is off (the default variant serves)."""
    return VariantAssigner(weights) if enabled and weights else None


# --- The report, from the metrics registry -------------------------------------------------------


class MetricSample(Protocol):
    """What the report needs of a Prometheus sample (prometheus_client's Sample fits)."""

    @property
    def name(self) -> str: ...
    @property
    def labels(self) -> dict[str, str]: ...
    @property
    def value(self) -> float: ...


def histogram_quantile(q: float, buckets: Iterable[tuple[float, float]]) -> float | None:
    """The q-quantile of a histogram given as (upper bound, cumulative count) pairs, as Prometheus
    computes it: find the bucket holding rank q * total and interpolate linearly inside it (the first
    bucket starts at 0; a rank in the +Inf bucket answers the highest finite bound). None if empty."""
    ordered = sorted(buckets)
    if not ordered or ordered[-1][1] <= 0:
        return None
    total = ordered[-1][1]
    rank = q * total
    lower, below = 0.0, 0.0
    for upper, cumulative in ordered:
        if cumulative >= rank and cumulative > below:
            if math.isinf(upper):
                return lower
            if upper <= 0:
                return upper
            return lower + (upper - lower) * (rank - below) / (cumulative - below)
        lower, below = upper, cumulative
    return lower


@dataclass
class _Tally:
    successes: float = 0.0
    errors: float = 0.0
    cache_hits: float = 0.0
    cost_usd: float = 0.0
    # upper bound -> cumulative count, over every cache level, and over misses only
    latency: dict[float, float] = field(default_factory=dict)
    miss_latency: dict[float, float] = field(default_factory=dict)

    def add(self, other: _Tally) -> None:
        self.successes += other.successes
        self.errors += other.errors
        self.cache_hits += other.cache_hits
        self.cost_usd += other.cost_usd
        for mine, theirs in ((self.latency, other.latency), (self.miss_latency, other.miss_latency)):
            for bound, count in theirs.items():
                mine[bound] = mine.get(bound, 0.0) + count

    def to_json(self) -> dict[str, Any]:
        requests = self.successes + self.errors
        return {
            "requests": int(requests),
            "errors": int(self.errors),
            "error_rate": _ratio(self.errors, requests),
            "cache_hits": int(self.cache_hits),
            "cache_hit_ratio": _ratio(self.cache_hits, requests),
            "latency_ms": _quantiles_ms(self.latency),
            "miss_latency_ms": _quantiles_ms(self.miss_latency),
            "cost_usd": round(self.cost_usd, 10),
            "cost_per_request_usd": None if not requests else round(self.cost_usd / requests, 12),
        }


def _ratio(part: float, whole: float) -> float | None:
    return None if not whole else round(part / whole, 6)


def _quantiles_ms(buckets: dict[float, float]) -> dict[str, float | None]:
    view: dict[str, float | None] = {}
    for label, q in (("p50", 0.5), ("p95", 0.95)):
        seconds = histogram_quantile(q, buckets.items())
        view[label] = None if seconds is None else round(seconds * 1000, 3)
    return view


def tally_routes(samples: Iterable[MetricSample]) -> dict[tuple[str, str], _Tally]:
    """Per (model, variant): the counters the report is made of, read from metric samples."""
    tallies: dict[tuple[str, str], _Tally] = {}

    def tally(labels: dict[str, str]) -> _Tally:
        key = (labels["model"], labels["variant"])
        found = tallies.get(key)
        if found is None:
            found = tallies[key] = _Tally()
        return found

    for sample in samples:
        name, labels, value = sample.name, sample.labels, sample.value
        if name == "dspy_predictions_total":
            if labels.get("status") == "success":
                tally(labels).successes += value
            elif labels.get("status") == "error":
                tally(labels).errors += value
        elif name == "dspy_prediction_duration_seconds_bucket":
            entry = tally(labels)
            bound = float(labels["le"])
            entry.latency[bound] = entry.latency.get(bound, 0.0) + value
            if labels["cache_level"] == "none":
                entry.miss_latency[bound] = entry.miss_latency.get(bound, 0.0) + value
        elif name == "dspy_prediction_duration_seconds_count":
            if labels["cache_level"] in ("memory", "redis"):
                tally(labels).cache_hits += value
        elif name == "dspy_prediction_cost_total":
            tally(labels).cost_usd += value
    return tallies


def experiments_report(
    samples: Iterable[MetricSample],
    *,
    variants: Iterable[str],
    enabled: bool,
    weights: Mapping[str, float],
    default_variant: str,
) -> dict[str, Any]:
    """Per variant (all models together) and per `model:variant`: requests, error rate, cache hit
    ratio, p50/p95 latency, cost per request; with the weights in force."""
    routes = tally_routes(samples)
    normalized = normalize_weights(weights) if weights else {}
    per_variant = {name: _Tally() for name in sorted(variants)}
    for (_, variant), entry in routes.items():
        per_variant.setdefault(variant, _Tally()).add(entry)
    return {
        "ab_testing_enabled": enabled,
        "weights": {name: round(weight, 12) for name, weight in sorted(normalized.items())},
        "default_variant": default_variant,
        "scope": "replica",
        "note": QUANTILE_NOTE,
        "variants": {
            name: {"weight": round(normalized.get(name, 0.0), 12), **entry.to_json()}
            for name, entry in per_variant.items()
        },
        "by_model": {
            f"{model}:{variant}": entry.to_json() for (model, variant), entry in sorted(routes.items())
        },
    }
