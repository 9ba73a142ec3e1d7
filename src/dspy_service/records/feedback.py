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

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from sqlalchemy import select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from dspy_service.feedback_metrics import (
    FeedbackMetrics,
    FeedbackValue,
)
from dspy_service.records.database import RecordsUnavailable
from dspy_service.records.schema import FeedbackRow, ReceiptRow

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
