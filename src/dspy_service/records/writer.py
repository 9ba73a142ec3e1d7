"""The records writer: receipts (and logged predictions) go through a bounded in-process queue and
are inserted in batches by a background task, never on the request path.

`submit` appends to the queue and returns; when the queue is full, or the writer is closed, the
record is dropped and counted. The task writes up to `batch_size` records per transaction, as soon
as that many are waiting or `flush_interval_secs` after the first one came. When the database fails
the batch is retried with backoff for up to `retry_for_secs`, then dropped and counted, so an outage
costs records (counted by kind through `on_dropped`, the wiring's `dspy_records_dropped_total`),
never predictions; the queue keeps taking records meanwhile, up to its bound. A record the database
refuses for itself (a value it cannot store) is dropped alone: the rest of its batch is kept.

Written by hand rather than with a task queue library: a deque, two events and one task are all it
takes, and everything stays in this process (the records are not worth an external broker).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func, insert, select, text
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError, SQLAlchemyError, StatementError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from dspy_service.logs import get_logger
from dspy_service.records.entries import LoggedPrediction, Receipt
from dspy_service.records.schema import PredictionRow, ReceiptRow
from dspy_service.records.sqlite_receipts import insert_chunks

_log = get_logger("dspy_service.records.writer")

RECEIPT = "receipt"
PREDICTION = "prediction"
FEEDBACK = "feedback"
KINDS = (RECEIPT, PREDICTION, FEEDBACK)

DropHook = Callable[[str, int], None]
_Key = tuple[str, str | None]  # (request ID, tenant)

_FIRST_RETRY_SECS = 0.05
_MAX_RETRY_SECS = 2.0


def _refused_for_itself(exc: BaseException) -> bool:
    """A failure that retrying cannot cure: the database (or the conversion to its types) refused
    this data, not the connection. Anything else (a refused or hung connection, a database that is
    locked, gone or shutting down, a missing table) may pass, and is retried."""
    if isinstance(
        exc, (DataError, IntegrityError, TypeError, ValueError, ArithmeticError, _RowidsNotConsecutive)
    ):
        return True  # ArithmeticError: SQLite's "Python int too large to convert"
    if isinstance(exc, DBAPIError):
        # asyncpg's errors reach us as a generic DBAPIError carrying the SQLSTATE: class 22 is a
        # data exception (a value out of range, a NUL in a text), 23 an integrity violation.
        sqlstate = str(getattr(exc.orig, "sqlstate", None) or "")
        return sqlstate.startswith(("22", "23"))
    # Raised while binding parameters (a JSON value that cannot be encoded, say), before the driver.
    return isinstance(exc, StatementError)


class _RowidsNotConsecutive(Exception):
    """SQLite did not number a batch's rows one after another (never seen: see below)."""


async def _insert_receipts_returning_ids(
    connection: AsyncConnection, rows: list[dict[str, Any]]
) -> list[int]:
    """Insert receipts and return their ids, in the order of `rows`.

    PostgreSQL: INSERT ... RETURNING, which SQLAlchemy batches and sorts back into parameter order.
    SQLite has no form of RETURNING whose order follows the parameters, so SQLAlchemy would fall
    back to one statement per row (a fourth of the speed); instead the batch is inserted as usual
    and its ids read off: inside our write transaction no other connection can insert, and SQLite
    gives a row without an explicit rowid the largest one plus one, so the batch holds the
    `len(rows)` ids ending at last_insert_rowid(). Checked, and written row by row if ever not so.
    """
    if connection.dialect.name != "sqlite":
        statement = insert(ReceiptRow).returning(ReceiptRow.id, sort_by_parameter_order=True)
        return list((await connection.execute(statement, rows)).scalars())
    await connection.execute(insert(ReceiptRow), rows)
    last = int((await connection.execute(text("SELECT last_insert_rowid()"))).scalar_one())
    first = last - len(rows) + 1
    in_range = select(func.count()).select_from(ReceiptRow).where(ReceiptRow.id.between(first, last))
    if (await connection.execute(in_range)).scalar_one() != len(rows):
        raise _RowidsNotConsecutive(f"{len(rows)} receipts were not numbered {first}..{last}")
    return list(range(first, last + 1))


class RecordWriter:
    def __init__(
        self,
        engine: AsyncEngine,
        *,
        queue_size: int = 10_000,
        batch_size: int = 500,
        flush_interval_secs: float = 1.0,
        retry_for_secs: float = 30.0,
        on_dropped: DropHook | None = None,
    ) -> None:
        if queue_size < 1 or batch_size < 1:
            raise ValueError("queue_size and batch_size must be at least 1")
        self._engine = engine
        self._queue_size = queue_size
        self._batch_size = batch_size
        self._interval = flush_interval_secs
        self._retry_for = retry_for_secs
        self._on_dropped = on_dropped
        self._queue: deque[Receipt] = deque()
        self._pending: dict[_Key, int] = {}  # queued or being written, by request
        self._submitted = 0  # records ever queued, and of those written or dropped: flush() waits on
        self._settled = 0
        self._arrived = asyncio.Event()  # the queue is not empty
        self._hurry = asyncio.Event()  # a full batch, a flush asked for, or closing: write now
        self._progress = asyncio.Event()  # replaced after each batch: what flush() waits on
        self._closing = False
        self._close_by = float("inf")
        self._queue_full_unlogged = 0
        self._task: asyncio.Task[None] | None = None
        self.dropped = dict.fromkeys(KINDS, 0)
        self.written = dict.fromkeys((RECEIPT, PREDICTION), 0)

    # --- the request path -------------------------------------------------------------------------

    def submit(self, receipt: Receipt, logged: LoggedPrediction | None = None) -> None:
        """Queue a receipt (and its logged prediction); never waits, never raises. Call it from the
        event loop's thread."""
        try:
            if self._closing or len(self._queue) >= self._queue_size:
                if not self._closing:
                    self._queue_full_unlogged += 1
                self._count_dropped(RECEIPT, 1)
                if logged is not None:
                    self._count_dropped(PREDICTION, 1)
                return
            if logged is not None:
                receipt.logged = logged
            self._queue.append(receipt)
            self._submitted += 1
            key = (receipt.request_id, receipt.tenant)
            self._pending[key] = self._pending.get(key, 0) + 1
            if len(self._queue) == 1:
                self._arrived.set()
            elif len(self._queue) >= self._batch_size:
                self._hurry.set()
        except Exception:  # a bug here must cost a record, never a prediction
            _log.exception("records.submit_failed")

    def count_dropped(self, kind: str, count: int = 1) -> None:
        """Count records of `kind` lost elsewhere (feedback the database could not take)."""
        self._count_dropped(kind, count)

    def _count_dropped(self, kind: str, count: int) -> None:
        self.dropped[kind] = self.dropped.get(kind, 0) + count
        if self._on_dropped is not None:
            try:
                self._on_dropped(kind, count)
            except Exception:
                _log.exception("records.drop_hook_failed", kind=kind)

    # --- state for the feedback path and for tests ------------------------------------------------

    @property
    def queued(self) -> int:
        return len(self._queue)

    def is_pending(self, request_id: str, tenant: str | None) -> bool:
        """Whether a receipt of this request is queued or being written right now."""
        return (request_id, tenant) in self._pending

    async def flush(self, timeout_secs: float) -> bool:
        """Write everything submitted so far now; True when all of it is written or dropped within
        `timeout_secs`."""
        target = self._submitted
        try:
            async with asyncio.timeout(timeout_secs):
                while self._settled < target:
                    progress = self._progress
                    self._hurry.set()
                    self._arrived.set()
                    await progress.wait()
        except TimeoutError:
            return False
        return True

    async def wait_written(self, request_id: str, tenant: str | None, timeout_secs: float) -> bool:
        """Write now if this request's receipt is still queued; True once it is written (or was
        never pending), False if it is still pending after `timeout_secs`."""
        if not self.is_pending(request_id, tenant):
            return True
        await self.flush(timeout_secs)
        return not self.is_pending(request_id, tenant)

    # --- the background task ----------------------------------------------------------------------

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="records-writer")

    async def close(self, timeout_secs: float = 5.0) -> None:
        """Stop taking records, write what is queued within `timeout_secs`, drop (and count) the rest."""
        self._closing = True
        self._close_by = time.monotonic() + timeout_secs
        self._hurry.set()
        self._arrived.set()
        task = self._task
        if task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(task), timeout_secs)
            except TimeoutError:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._queue:
            left = list(self._queue)
            self._queue.clear()
            self._settle(left, written=False, reason="shutdown")
        self._log_queue_full()

    async def _run(self) -> None:
        while True:
            if not self._queue:
                if self._closing:
                    return
                self._arrived.clear()
                await self._arrived.wait()
                continue
            if len(self._queue) < self._batch_size and not self._closing and not self._hurry.is_set():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._interval):
                        await self._hurry.wait()
            self._hurry.clear()
            batch = [self._queue.popleft() for _ in range(min(self._batch_size, len(self._queue)))]
            try:
                await self._write(batch)
            except asyncio.CancelledError:
                self._settle(batch, written=False, reason="shutdown")
                raise
            except Exception:  # never let the task die: lose this batch, counted, and go on
                _log.exception("records.write_unexpected_error", records=len(batch))
                self._settle(batch, written=False, reason="unexpected_error")
            self._log_queue_full()

    async def _write(self, batch: list[Receipt]) -> None:
        started = time.monotonic()
        delay = _FIRST_RETRY_SECS
        failures = 0
        while True:
            try:
                await self._insert(batch)
            except Exception as exc:
                if _refused_for_itself(exc):
                    await self._write_one_by_one(batch)
                    return
                if not isinstance(exc, (SQLAlchemyError, OSError, TimeoutError)):
                    raise
                failures += 1
                now = time.monotonic()
                if failures == 1:
                    _log.warning("records.write_failed", records=len(batch), error=type(exc).__name__)
                if now + delay - started > self._retry_for or now + delay > self._close_by:
                    self._settle(batch, written=False, reason="database_unavailable")
                    return
                await asyncio.sleep(delay)
                delay = min(delay * 2, _MAX_RETRY_SECS)
            else:
                if failures:
                    _log.info("records.write_recovered", records=len(batch), attempts=failures + 1)
                self._settle(batch, written=True)
                return

    async def _write_one_by_one(self, batch: list[Receipt]) -> None:
        for receipt in batch:
            try:
                await self._insert([receipt])
            except Exception as exc:
                error = type(exc).__name__
                _log.warning("records.record_refused", request_id=receipt.request_id, error=error)
                self._settle([receipt], written=False, reason="refused")
            else:
                self._settle([receipt], written=True)

    async def _insert(self, batch: Sequence[Receipt]) -> None:
        if self._engine.dialect.name == "sqlite" and all(receipt.logged is None for receipt in batch):
            # The common case (receipts only, on the embedded default) without SQLAlchemy, in a few
            # multi-row INSERTs (sqlite_receipts says why).
            async with self._engine.begin() as connection:
                for statement, chunks in insert_chunks(batch):
                    await connection.exec_driver_sql(statement, chunks)
            return
        rows: list[dict[str, Any]] = []
        for receipt in batch:
            row = receipt.row()
            row["created_at"] = datetime.fromtimestamp(receipt.created_at, UTC)
            rows.append(row)
        logged = [(i, entry) for i, receipt in enumerate(batch) if (entry := receipt.logged) is not None]
        async with self._engine.begin() as connection:
            if not logged:
                await connection.execute(insert(ReceiptRow), rows)
                return
            ids = await _insert_receipts_returning_ids(connection, rows)
            await connection.execute(
                insert(PredictionRow),
                [
                    {"receipt_id": ids[index], "inputs": dict(entry.inputs), "outputs": dict(entry.outputs)}
                    for index, entry in logged
                ],
            )

    def _settle(self, items: Sequence[Receipt], *, written: bool, reason: str = "") -> None:
        receipts = len(items)
        predictions = sum(1 for receipt in items if receipt.logged is not None)
        for receipt in items:
            key = (receipt.request_id, receipt.tenant)
            left = self._pending.get(key, 0) - 1
            if left > 0:
                self._pending[key] = left
            else:
                self._pending.pop(key, None)
        self._settled += receipts
        if written:
            self.written[RECEIPT] += receipts
            self.written[PREDICTION] += predictions
        else:
            _log.warning("records.dropped", reason=reason, receipts=receipts, predictions=predictions)
            self._count_dropped(RECEIPT, receipts)
            if predictions:
                self._count_dropped(PREDICTION, predictions)
        progress, self._progress = self._progress, asyncio.Event()
        progress.set()

    def _log_queue_full(self) -> None:
        if self._queue_full_unlogged:
            _log.warning("records.dropped", reason="queue_full", receipts=self._queue_full_unlogged)
            self._queue_full_unlogged = 0
