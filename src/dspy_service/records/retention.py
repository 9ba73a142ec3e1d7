"""Retention: receipts older than `RECORDS_RETENTION_DAYS` are deleted, with their logged
prediction and their feedback, by a periodic task, a bounded batch per transaction (a long delete
would hold locks the writer is waiting for)."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import delete, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from dspy_service.logs import get_logger
from dspy_service.records.schema import FeedbackRow, PredictionRow, ReceiptRow

_log = get_logger("dspy_service.records.retention")


@dataclass(frozen=True, slots=True, kw_only=True)
class Deleted:
    receipts: int = 0
    predictions: int = 0
    feedback: int = 0


async def delete_older_than(
    engine: AsyncEngine, days: float, *, batch_size: int = 1000, now: datetime | None = None
) -> Deleted:
    """Delete every receipt made more than `days` ago, with its logged prediction and feedback."""
    cutoff = (now or datetime.now(UTC)) - timedelta(days=days)
    receipts = predictions = feedback = 0
    while True:
        async with engine.begin() as connection:
            ids = list(
                (
                    await connection.execute(
                        select(ReceiptRow.id)
                        .where(ReceiptRow.created_at < cutoff)
                        .order_by(ReceiptRow.id)
                        .limit(batch_size)
                    )
                ).scalars()
            )
            if not ids:
                break
            # Explicit deletes rather than ON DELETE CASCADE alone: the rows counted, whatever the backend.
            feedback += (
                await connection.execute(delete(FeedbackRow).where(FeedbackRow.receipt_id.in_(ids)))
            ).rowcount
            predictions += (
                await connection.execute(delete(PredictionRow).where(PredictionRow.receipt_id.in_(ids)))
            ).rowcount
            receipts += (await connection.execute(delete(ReceiptRow).where(ReceiptRow.id.in_(ids)))).rowcount
        if len(ids) < batch_size:
            break
    return Deleted(receipts=receipts, predictions=predictions, feedback=feedback)


class RetentionTask:
    """Runs `delete_older_than` now and then every `interval_secs`; a failure is logged and tried
    again at the next round."""

    def __init__(self, engine: AsyncEngine, days: float, *, interval_secs: float = 3600.0) -> None:
        if days <= 0:
            raise ValueError("retention days must be more than 0")
        self._engine = engine
        self._days = days
        self._interval = interval_secs
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="records-retention")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def run_once(self) -> Deleted | None:
        try:
            deleted = await delete_older_than(self._engine, self._days)
        except (SQLAlchemyError, OSError, TimeoutError) as exc:
            _log.warning("records.retention_failed", error=type(exc).__name__)
            return None
        if deleted.receipts:
            _log.info(
                "records.retention_deleted",
                days=self._days,
                receipts=deleted.receipts,
                predictions=deleted.predictions,
                feedback=deleted.feedback,
            )
        return deleted

    async def _run(self) -> None:
        while True:
            await self.run_once()
            await asyncio.sleep(self._interval)
