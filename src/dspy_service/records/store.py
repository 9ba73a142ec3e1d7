"""The records store: one object the service holds, tying the engine, the writer, the retention
task and the queries together.

    store = RecordStore(url, retention_days=30, on_dropped=counter_hook)
    await store.start()            # migrates first (migrate=True), then the background tasks
    store.submit(receipt, logged)  # on the request path: never waits, never raises
    await store.record_feedback(metrics, request_id=..., metric=..., value=..., tenant=...)
    await store.close()            # writes what is queued, within a bound

Feedback right after its prediction: the receipt may still sit in the writer's queue. The store
asks the writer whether that request's receipt is pending and, if so, has it written at once
(bounded by `feedback_wait_secs`) before looking the receipt up, so the client is not told its
request is unknown. If it cannot be written in time the database is failing: RecordsUnavailable
(503) rather than a false 404.
"""

from __future__ import annotations

import asyncio
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from dspy_service.feedback_metrics import FeedbackMetrics
from dspy_service.records.costs_rebuild import DaySpend, rebuild_cost_totals, spend_today
from dspy_service.records.database import RecordsUnavailable, create_engine
from dspy_service.records.entries import LoggedPrediction, Receipt
from dspy_service.records.export import export_jsonl
from dspy_service.records.feedback import FeedbackOutcome, record_feedback
from dspy_service.records.migrate import MIGRATION_ERRORS, describe_failure, upgrade_to_head
from dspy_service.records.retention import RetentionTask
from dspy_service.records.stats import quality_by_variant
from dspy_service.records.writer import FEEDBACK, DropHook, RecordWriter


class RecordStore:
    def __init__(
        self,
        url: str,
        *,
        queue_size: int = 10_000,
        batch_size: int = 500,
        flush_interval_secs: float = 1.0,
        retry_for_secs: float = 30.0,
        retention_days: float | None = None,
        retention_interval_secs: float = 3600.0,
        feedback_wait_secs: float = 5.0,
        connect_timeout_secs: float = 5.0,
        command_timeout_secs: float = 10.0,
        on_dropped: DropHook | None = None,
    ) -> None:
        self.url = url
        self.engine: AsyncEngine = create_engine(
            url, connect_timeout_secs=connect_timeout_secs, command_timeout_secs=command_timeout_secs
        )
        self.writer = RecordWriter(
            self.engine,
            queue_size=queue_size,
            batch_size=batch_size,
            flush_interval_secs=flush_interval_secs,
            retry_for_secs=retry_for_secs,
            on_dropped=on_dropped,
        )
        self._retention = (
            RetentionTask(self.engine, retention_days, interval_secs=retention_interval_secs)
            if retention_days
            else None
        )
        self._feedback_wait = feedback_wait_secs
        self._connect_timeout = connect_timeout_secs

    async def start(self, *, migrate: bool = True) -> None:
        """Migrate the schema to head (in a thread: Alembic is blocking), then start writing and
        the retention rounds. RecordsUnavailable (its message naming the database, password
        redacted) when the database cannot be migrated."""
        if migrate:
            try:
                await asyncio.to_thread(upgrade_to_head, self.url, connect_timeout_secs=self._connect_timeout)
            except MIGRATION_ERRORS as exc:
                raise RecordsUnavailable(describe_failure(self.url, exc)) from exc
        self.writer.start()
        if self._retention is not None:
            self._retention.start()

    async def close(self, timeout_secs: float = 5.0) -> None:
        if self._retention is not None:
            await self._retention.close()
        await self.writer.close(timeout_secs)
        await self.engine.dispose()

    def submit(self, receipt: Receipt, logged: LoggedPrediction | None = None) -> None:
        self.writer.submit(receipt, logged)

    async def record_feedback(
        self, metrics: FeedbackMetrics, *, request_id: str, metric: str, value: Any, tenant: str | None
    ) -> FeedbackOutcome:
        """See feedback.record_feedback; a receipt still queued is written first."""
        metrics.parse(metric, value)  # a value that does not fit is refused before any waiting
        if not await self.writer.wait_written(request_id, tenant, self._feedback_wait):
            self.writer.count_dropped(FEEDBACK)
            raise RecordsUnavailable(
                "feedback cannot be kept now: the request's receipt is not written yet (the records "
                "database is slow or unavailable)",
                retry_after=5,
            )
        try:
            return await record_feedback(
                self.engine, metrics, request_id=request_id, metric=metric, value=value, tenant=tenant
            )
        except RecordsUnavailable:
            self.writer.count_dropped(FEEDBACK)
            raise

    async def quality(
        self,
        default_variant: str,
        metrics: FeedbackMetrics,
        since: datetime | None = None,
        *,
        variants: tuple[str, ...] = (),
    ) -> dict[str, Any]:
        """See stats.quality_by_variant; RecordsUnavailable when the database cannot answer."""
        try:
            return await quality_by_variant(self.engine, default_variant, metrics, since, variants=variants)
        except (SQLAlchemyError, OSError, TimeoutError) as exc:
            raise RecordsUnavailable(
                f"the records database is unavailable ({type(exc).__name__})", retry_after=5
            ) from exc

    async def cost_totals(self, since: datetime | None = None) -> dict[str, dict[str, Any]]:
        return await rebuild_cost_totals(self.engine, since)

    async def spend_today(self, now: datetime | None = None) -> DaySpend:
        return await spend_today(self.engine, now)

    async def export(
        self,
        variant: str,
        *,
        out_path: Path,
        metric: str | None = None,
        min_value: float | None = None,
        since: datetime | None = None,
    ) -> int:
        return await export_jsonl(
            self.engine, variant, out_path=out_path, metric=metric, min_value=min_value, since=since
        )
