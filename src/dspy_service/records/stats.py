"""Quality per variant from feedback: for each metric, its count, mean and 95% interval, and each
variant's difference from the default variant, per variant (every model together) and per
`model:variant` (against the same model's default variant).

The database sums (count, sum, sum of squares per model, variant and metric); the intervals are
computed here from those sums (intervals.py). Figures come from every replica's receipts, so they
are fleet-wide.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from dspy_service.feedback_metrics import FeedbackMetrics, MetricType
from dspy_service.records.intervals import (
    Difference,
    Interval,
    newcombe_difference,
    t_interval,
    welch_difference,
    wilson_interval,
)
from dspy_service.records.schema import FeedbackRow, ReceiptRow

_DECIMALS = 6

NOTE = (
    "95% intervals: Wilson score for boolean metrics (their mean is the share of true), Student's t "
    "for float metrics; differences from the default variant: Newcombe's hybrid score interval for "
    "booleans, Welch's t for floats. Comments are counted only."
)


@dataclass(slots=True)
class Sums:
    """One metric's feedback on one group of receipts."""

    count: int = 0
    total: float = 0.0
    squares: float = 0.0

    def add(self, other: Sums) -> None:
        self.count += other.count
        self.total += other.total
        self.squares += other.squares

    @property
    def mean(self) -> float:
        return self.total / self.count

    @property
    def variance(self) -> float:
        """The sample variance (n - 1); 0 for fewer than two values."""
        if self.count < 2:
            return 0.0
        return max(0.0, (self.squares - self.total * self.total / self.count) / (self.count - 1))


def _round(value: float) -> float:
    return round(value, _DECIMALS)


def _interval_json(interval: Interval | None) -> list[float] | None:
    return None if interval is None else [_round(interval.low), _round(interval.high)]


def summarize(kind: MetricType, sums: Sums) -> dict[str, Any]:
    """count, mean and 95% interval of one metric in one group."""
    if kind == "comment" or sums.count == 0:
        return {"count": sums.count}
    if kind == "boolean":
        interval: Interval | None = wilson_interval(sums.total, sums.count)
    else:
        interval = t_interval(sums.count, sums.mean, sums.variance)
    return {"count": sums.count, "mean": _round(sums.mean), "ci95": _interval_json(interval)}


def compare(kind: MetricType, variant: Sums, default: Sums) -> dict[str, Any] | None:
    """(variant - default) with its 95% interval, or None when it cannot be estimated."""
    if kind == "comment" or variant.count == 0 or default.count == 0:
        return None
    difference: Difference | None
    if kind == "boolean":
        difference = newcombe_difference(variant.total, variant.count, default.total, default.count)
    else:
        difference = welch_difference(
            variant.count, variant.mean, variant.variance, default.count, default.mean, default.variance
        )
    if difference is None:
        return {"difference": _round(variant.mean - default.mean), "ci95": None, "excludes_zero": None}
    view: dict[str, Any] = {
        "difference": _round(difference.estimate),
        "ci95": _interval_json(difference.interval),
        "excludes_zero": difference.interval.excludes_zero,
    }
    if difference.df is not None:
        view["df"] = _round(difference.df)
    return view


def _group_view(
    metrics: dict[str, MetricType], sums: dict[str, Sums], default: dict[str, Sums] | None, is_default: bool
) -> dict[str, Any]:
    view: dict[str, Any] = {}
    for metric, kind in metrics.items():
        own = sums.get(metric, Sums())
        entry = summarize(kind, own)
        if kind != "comment":
            baseline = None if is_default or default is None else default.get(metric)
            entry["vs_default"] = None if baseline is None else compare(kind, own, baseline)
        view[metric] = entry
    return view


async def feedback_sums(
    engine: AsyncEngine, metrics: FeedbackMetrics, since: datetime | None = None
) -> dict[tuple[str, str], dict[str, Sums]]:
    """(model, variant) -> metric -> sums of the feedback on receipts made since `since`."""
    kinds = {name: spec.type for name, spec in metrics.metrics.items()}
    if not kinds:
        return {}
    value = FeedbackRow.value_num
    query = (
        select(
            ReceiptRow.model,
            ReceiptRow.variant,
            FeedbackRow.metric,
            FeedbackRow.kind,
            func.count(FeedbackRow.id),
            func.coalesce(func.sum(value), 0.0),
            func.coalesce(func.sum(value * value), 0.0),
        )
        .join(ReceiptRow, ReceiptRow.id == FeedbackRow.receipt_id)
        .where(FeedbackRow.metric.in_(kinds))
        .group_by(ReceiptRow.model, ReceiptRow.variant, FeedbackRow.metric, FeedbackRow.kind)
    )
    if since is not None:
        query = query.where(ReceiptRow.created_at >= since)
    groups: dict[tuple[str, str], dict[str, Sums]] = {}
    async with engine.connect() as connection:
        for model, variant, metric, kind, count, total, squares in await connection.execute(query):
            if kinds[metric] != kind:  # given while the metric had another type: not comparable
                continue
            sums = Sums(int(count), float(total or 0.0), float(squares or 0.0))
            groups.setdefault((model, variant), {})[metric] = sums
    return groups


def quality_report(
    groups: dict[tuple[str, str], dict[str, Sums]],
    *,
    default_variant: str,
    metrics: FeedbackMetrics,
    variants: tuple[str, ...] = (),
) -> dict[str, Any]:
    """The JSON-ready report from the per (model, variant) sums; `variants` are listed even
    without feedback."""
    kinds = {name: spec.type for name, spec in sorted(metrics.metrics.items())}
    per_variant: dict[str, dict[str, Sums]] = {name: {} for name in variants}
    for (_, variant), sums in groups.items():
        mine = per_variant.setdefault(variant, {})
        for metric, metric_sums in sums.items():
            mine.setdefault(metric, Sums()).add(metric_sums)
    default = per_variant.get(default_variant)
    by_model: dict[str, Any] = {}
    for (model, variant), sums in sorted(groups.items()):
        model_default = groups.get((model, default_variant))
        by_model[f"{model}:{variant}"] = _group_view(kinds, sums, model_default, variant == default_variant)
    return {
        "scope": "fleet",
        "default_variant": default_variant,
        "metrics": {name: metrics.metrics[name].model_dump(exclude_none=True) for name in kinds},
        "note": NOTE,
        "variants": {
            name: _group_view(kinds, sums, default, name == default_variant)
            for name, sums in sorted(per_variant.items())
        },
        "by_model": by_model,
    }


async def quality_by_variant(
    engine: AsyncEngine,
    default_variant: str,
    metrics: FeedbackMetrics,
    since: datetime | None = None,
    *,
    variants: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Feedback per variant and per `model:variant`: each metric's count, mean and 95% interval,
    and its difference from the default variant (see quality_report)."""
    groups = await feedback_sums(engine, metrics, since)
    report = quality_report(groups, default_variant=default_variant, metrics=metrics, variants=variants)
    report["since"] = None if since is None else since.isoformat()
    return report
