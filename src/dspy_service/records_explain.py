"""Why `dspy-service export` found nothing to write: the first of its filters (variant, --since,
the prediction log, answered, --metric, --min) that left no prediction, in one sentence a user can
act on (most often: PREDICTION_LOG was off, so no inputs and outputs were kept)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, exists, func, select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from dspy_service.records.schema import FeedbackRow, PredictionRow, ReceiptRow

_LISTED_VARIANTS = 10


def _stamp(moment: datetime) -> str:
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")


async def _count(connection: AsyncConnection, *conditions: ColumnElement[bool], logged: bool = False) -> int:
    query = select(func.count()).select_from(ReceiptRow)
    if logged:
        query = query.join(PredictionRow, PredictionRow.receipt_id == ReceiptRow.id)
    return int((await connection.execute(query.where(*conditions))).scalar_one())


def _plural(count: int, word: str) -> str:
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


async def why_empty(
    engine: AsyncEngine,
    variant: str,
    *,
    metric: str | None,
    min_value: float | None,
    since: datetime | None,
) -> str:
    """The reason an export of `variant` with these filters holds no line."""
    async with engine.connect() as connection:
        if await _count(connection) == 0:
            return (
                "the database holds no predictions at all: the service records them only with "
                "FEEDBACK_ENABLED=true or PREDICTION_LOG=sampled|all, in its own DATABASE_URL (default: "
                "records.db under its DATA_DIR); is this the database it writes to?"
            )
        conditions: list[ColumnElement[bool]] = [ReceiptRow.variant == variant]
        total = await _count(connection, *conditions)
        if total == 0:
            return await _unknown_variant(connection, variant)
        subject = f"{_plural(total, 'prediction')} of variant {variant!r}"
        if since is not None:
            conditions.append(ReceiptRow.created_at >= since)
            recent = await _count(connection, *conditions)
            if recent == 0:
                latest = (
                    await connection.execute(
                        select(func.max(ReceiptRow.created_at)).where(ReceiptRow.variant == variant)
                    )
                ).scalar_one()
                # max() keeps the column's type: an aware datetime, as every timestamp read back
                return f"none of the {subject} was made since {_stamp(since)} (the latest: {_stamp(latest)})"
            subject = f"{_plural(recent, 'prediction')} of variant {variant!r} since {_stamp(since)}"
        logged = await _count(connection, *conditions, logged=True)
        if logged == 0:
            return (
                f"none of the {subject} is in the prediction log: PREDICTION_LOG was off when they were "
                "made (the service keeps inputs and outputs only with PREDICTION_LOG=all, or a share of "
                "them with sampled)"
            )
        conditions.append(ReceiptRow.ok.is_(True))
        answered = await _count(connection, *conditions, logged=True)
        if answered == 0:
            return (
                f"the {_plural(logged, 'logged prediction')} of variant {variant!r} all failed: only "
                "answered ones are exported"
            )
        return await _why_no_feedback(connection, conditions, answered, variant, metric, min_value)


async def _unknown_variant(connection: AsyncConnection, variant: str) -> str:
    rows = await connection.execute(
        select(ReceiptRow.variant).distinct().order_by(ReceiptRow.variant).limit(_LISTED_VARIANTS + 1)
    )
    names = [str(name) for name in rows.scalars()]
    listed = ", ".join(names[:_LISTED_VARIANTS]) + (", ..." if len(names) > _LISTED_VARIANTS else "")
    return f"no prediction of variant {variant!r} is recorded (variants with predictions: {listed})"


async def _why_no_feedback(
    connection: AsyncConnection,
    conditions: list[ColumnElement[bool]],
    answered: int,
    variant: str,
    metric: str | None,
    min_value: float | None,
) -> str:
    subject = f"{_plural(answered, 'logged answered prediction')} of variant {variant!r}"
    if metric is None:  # export_jsonl found none where these counts find some: written meanwhile
        return f"{subject} appeared while the export ran; run it again"
    given: Any = (FeedbackRow.receipt_id == ReceiptRow.id) & (FeedbackRow.metric == metric)
    with_metric = await _count(connection, *conditions, exists().where(given), logged=True)
    if with_metric == 0:
        return f"none of the {subject} has feedback {metric!r}"
    return (
        f"none of the {subject} with feedback {metric!r} ({with_metric}) has a value of at least "
        f"{min_value:g}"
    )
