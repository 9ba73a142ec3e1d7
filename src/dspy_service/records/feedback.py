"""Feedback: the metrics a models file declares, and one value given on one prediction.

```yaml
feedback:
  metrics:
    helpful: {type: boolean}
    rating: {type: float, min: 1, max: 5}
    note: {type: comment}
```

A value is kept per (receipt, metric): given again, it replaces the earlier one. Only the tenant
that made the request may give it feedback; for anyone else the request is unknown, exactly as a
request ID never seen, so other tenants' request IDs are not revealed.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from sqlalchemy import select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from dspy_service.errors import InvalidRequest
from dspy_service.records.database import RecordsUnavailable
from dspy_service.records.schema import FeedbackRow, ReceiptRow

MetricType = Literal["boolean", "float", "comment"]
DEFAULT_COMMENT_CHARS = 4000
_METRIC_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_.\-]{0,63}$")


class UnknownMetric(InvalidRequest):
    type = "unknown_metric"


class InvalidFeedbackValue(InvalidRequest):
    type = "invalid_feedback_value"


class MetricSpec(BaseModel):
    """One metric: a boolean (stored as 0/1), a float within optional bounds, or a comment."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: MetricType
    min: float | None = None
    max: float | None = None
    max_length: int | None = Field(default=None, ge=1, le=100_000)

    @model_validator(mode="after")
    def _bounds_fit_the_type(self) -> MetricSpec:
        if self.type != "float" and (self.min is not None or self.max is not None):
            raise ValueError(f"min and max apply to float metrics only, not to a {self.type} metric")
        if self.type != "comment" and self.max_length is not None:
            raise ValueError(f"max_length applies to comment metrics only, not to a {self.type} metric")
        for name, bound in (("min", self.min), ("max", self.max)):
            if bound is not None and not math.isfinite(bound):
                raise ValueError(f"{name} must be a finite number")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min ({self.min:g}) is more than max ({self.max:g})")
        return self


@dataclass(frozen=True, slots=True, kw_only=True)
class FeedbackValue:
    kind: MetricType
    number: float | None = None  # booleans as 0/1, floats
    text: str | None = None  # comments


class FeedbackMetrics(BaseModel):
    """The models file's `feedback:` section."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    metrics: dict[str, MetricSpec] = Field(default_factory=dict)

    @field_validator("metrics")
    @classmethod
    def _names_are_plain(cls, metrics: dict[str, MetricSpec]) -> dict[str, MetricSpec]:
        for name in metrics:
            if not _METRIC_NAME.match(name):
                raise ValueError(
                    f"metric name {name!r} must start with a letter and hold only letters, digits, "
                    "'_', '.' or '-' (64 characters at most)"
                )
        return metrics

    def of_type(self, *types: MetricType) -> dict[str, MetricSpec]:
        return {name: spec for name, spec in self.metrics.items() if spec.type in types}

    def parse(self, metric: str, value: Any) -> FeedbackValue:
        """The value as stored; UnknownMetric or InvalidFeedbackValue (naming the problem) if it
        cannot be."""
        spec = self.metrics.get(metric)
        if spec is None:
            known = ", ".join(sorted(self.metrics)) or "none are configured"
            raise UnknownMetric(f"unknown feedback metric {metric!r} (known: {known})")
        if spec.type == "boolean":
            if not isinstance(value, bool):
                raise InvalidFeedbackValue(f"metric {metric!r} takes true or false, not {_shown(value)}")
            return FeedbackValue(kind="boolean", number=1.0 if value else 0.0)
        if spec.type == "float":
            return FeedbackValue(kind="float", number=_number(metric, spec, value))
        return FeedbackValue(kind="comment", text=_comment(metric, spec, value))


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _number(metric: str, spec: MetricSpec, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidFeedbackValue(f"metric {metric!r} takes a number, not {_shown(value)}")
    number = float(value)
    if not math.isfinite(number):
        raise InvalidFeedbackValue(f"metric {metric!r} takes a finite number, not {_shown(value)}")
    low = -math.inf if spec.min is None else spec.min
    high = math.inf if spec.max is None else spec.max
    if not low <= number <= high:
        if spec.min is not None and spec.max is not None:
            allowed = f"from {spec.min:g} to {spec.max:g}"
        elif spec.min is not None:
            allowed = f"of at least {spec.min:g}"
        else:
            allowed = f"of at most {high:g}"
        raise InvalidFeedbackValue(f"metric {metric!r} takes a number {allowed}, not {number:g}")
    return number


def _comment(metric: str, spec: MetricSpec, value: Any) -> str:
    if not isinstance(value, str):
        raise InvalidFeedbackValue(f"metric {metric!r} takes a text, not {_shown(value)}")
    limit = spec.max_length or DEFAULT_COMMENT_CHARS
    if not value.strip():
        raise InvalidFeedbackValue(f"metric {metric!r} takes a text that is not empty")
    if len(value) > limit:
        raise InvalidFeedbackValue(f"metric {metric!r} takes a text of at most {limit} characters")
    if "\x00" in value:  # PostgreSQL's text cannot hold NUL
        raise InvalidFeedbackValue(f"metric {metric!r} takes a text without NUL characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidFeedbackValue(f"metric {metric!r} takes valid Unicode text") from None
    return value


FeedbackStatus = Literal["created", "updated", "unknown_request"]


@dataclass(frozen=True, slots=True, kw_only=True)
class FeedbackOutcome:
    status: FeedbackStatus
    request_id: str
    metric: str
    variant: str | None = None  # the receipt's, for dspy_feedback_total{variant,metric}
    model: str | None = None

    @property
    def found(self) -> bool:
        return self.status != "unknown_request"


async def record_feedback(
    engine: AsyncEngine,
    metrics: FeedbackMetrics,
    *,
    request_id: str,
    metric: str,
    value: Any,
    tenant: str | None,
    now: datetime | None = None,
) -> FeedbackOutcome:
    """Keep `value` for `metric` on the request's receipt (the latest one of that request ID made by
    `tenant`), replacing an earlier value. UnknownMetric / InvalidFeedbackValue for a value that
    does not fit; RecordsUnavailable when the database cannot be reached."""
    parsed = metrics.parse(metric, value)
    try:
        async with engine.begin() as connection:
            return await _upsert(connection, parsed, request_id, metric, tenant, now or datetime.now(UTC))
    except (SQLAlchemyError, OSError, TimeoutError) as exc:
        raise RecordsUnavailable(
            f"feedback cannot be kept now: the records database is unavailable ({type(exc).__name__})",
            retry_after=5,
        ) from exc


async def _upsert(
    connection: AsyncConnection,
    parsed: FeedbackValue,
    request_id: str,
    metric: str,
    tenant: str | None,
    now: datetime,
) -> FeedbackOutcome:
    query = (
        select(ReceiptRow.id, ReceiptRow.variant, ReceiptRow.model, FeedbackRow.id)
        .outerjoin(FeedbackRow, (FeedbackRow.receipt_id == ReceiptRow.id) & (FeedbackRow.metric == metric))
        .where(ReceiptRow.request_id == request_id, ReceiptRow.tenant.is_not_distinct_from(tenant))
        .order_by(ReceiptRow.id.desc())
        .limit(1)
    )
    found = (await connection.execute(query)).first()
    if found is None:
        return FeedbackOutcome(status="unknown_request", request_id=request_id, metric=metric)
    receipt_id, variant, model, existing = found
    dialect = postgresql if connection.dialect.name == "postgresql" else sqlite
    values = {"kind": parsed.kind, "value_num": parsed.number, "value_text": parsed.text, "updated_at": now}
    statement = dialect.insert(FeedbackRow).values(
        receipt_id=receipt_id, request_id=request_id, tenant=tenant, metric=metric, created_at=now, **values
    )
    statement = statement.on_conflict_do_update(index_elements=["receipt_id", "metric"], set_=values)
    await connection.execute(statement)
    return FeedbackOutcome(
        status="created" if existing is None else "updated",
        request_id=request_id,
        metric=metric,
        variant=variant,
        model=model,
    )
