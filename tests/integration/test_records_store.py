"""The records store against real databases (a SQLite file and PostgreSQL on 127.0.0.1:5432):
migrations from an empty database, batched writes, counted drops (queue full, database locked,
hung, refusing connections or dropped mid-run) with recovery, refused records, and retention."""

from __future__ import annotations

import asyncio
import io
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Connection, event, func, inspect, select
from sqlalchemy.ext.asyncio import AsyncEngine

from dspy_service.records import (
    FeedbackMetrics,
    LoggedPrediction,
    Receipt,
    RecordStore,
    RecordsUnavailable,
    create_engine,
    current_revision,
    delete_older_than,
    head_revision,
    run_db_upgrade,
    upgrade_to_head,
)
from dspy_service.records.schema import Base, FeedbackRow, PredictionRow, ReceiptRow
from tests.support.postgres import SilentServer, admin, database_of, drop_database, fresh_database
from tests.support.processes import free_port

BACKENDS = ["sqlite", "postgresql"]
TABLES = {"receipts", "predictions", "feedback", "alembic_version"}


@pytest.fixture(params=BACKENDS)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database: a SQLite file, or a fresh PostgreSQL database dropped afterwards."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/data/records.db"
    else:
        with fresh_database("dspy_records") as url:
            yield url


@pytest.fixture
def pg_url() -> Iterator[str]:
    with fresh_database("dspy_records") as url:
        yield url


def receipt(request_id: str, **fields: Any) -> Receipt:
    values: dict[str, Any] = {"model": "gpt", "model_served": "gpt", "variant": "baseline", **fields}
    return Receipt(request_id=request_id, **values)


def logged(question: str) -> LoggedPrediction:
    return LoggedPrediction(inputs={"question": question}, outputs={"answer": question.upper()})


@asynccontextmanager
async def open_store(url: str, *, migrate: bool = True, **options: Any) -> AsyncIterator[RecordStore]:
    store = RecordStore(url, **options)
    await store.start(migrate=migrate)
    try:
        yield store
    finally:
        await store.close(timeout_secs=5)


async def count(engine: AsyncEngine, table: type[Base]) -> int:
    async with engine.connect() as connection:
        return int((await connection.execute(select(func.count()).select_from(table))).scalar_one())


async def eventually(predicate: Any, *, within: float = 10.0, what: str) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within} s waiting for {what}")
        await asyncio.sleep(0.02)


# --- migrations ----------------------------------------------------------------------------------


async def test_migrations_build_the_schema_from_an_empty_database(db_url: str) -> None:
    """upgrade_to_head on nothing makes the three tables at the head revision, exactly as the models
    describe them; a second run changes nothing."""
    assert await asyncio.to_thread(current_revision, db_url) is None
    assert await asyncio.to_thread(upgrade_to_head, db_url) == head_revision()
    assert await asyncio.to_thread(upgrade_to_head, db_url) == head_revision()
    engine = create_engine(db_url)
    try:
        async with engine.connect() as connection:

            def examine(sync: Connection) -> tuple[set[str], list[Any]]:
                context = MigrationContext.configure(sync)
                return set(inspect(sync).get_table_names()), compare_metadata(context, Base.metadata)

            tables, differences = await connection.run_sync(examine)
    finally:
        await engine.dispose()
    assert tables == TABLES
    assert differences == []


def test_replicas_migrating_at_once_all_succeed(db_url: str) -> None:
    """Four processes starting together migrate one empty database: each ends at head, none fails on
    a table another has just made (PostgreSQL's advisory lock, SQLite's lock file)."""
    script = (
        "import sys; from dspy_service.records import upgrade_to_head; print(upgrade_to_head(sys.argv[1]))"
    )
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", script, db_url], stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        for _ in range(4)
    ]
    outcomes = [process.communicate(timeout=60) for process in processes]
    assert [process.returncode for process in processes] == [0] * 4, [err.decode() for _, err in outcomes]
    assert [out.decode().strip() for out, _ in outcomes] == [head_revision()] * 4


def test_db_upgrade_command_reports_and_fails_cleanly(tmp_path: Path) -> None:
    """`dspy-service db upgrade` says which revision the database is at; against a server that is not
    there it exits 1 with the reason and never the password."""
    out, err = io.StringIO(), io.StringIO()
    assert run_db_upgrade(f"sqlite:///{tmp_path}/r.db", out=out, err=err) == 0
    assert f"schema at revision {head_revision()}" in out.getvalue()
    url = f"postgresql://app:s3cret-pass@127.0.0.1:{free_port()}/records"
    assert run_db_upgrade(url, out=out, err=err) == 1
    assert "cannot migrate postgresql://***@127.0.0.1" in err.getvalue()
    assert "s3cret-pass" not in err.getvalue()


async def test_a_store_that_cannot_migrate_says_so_at_start() -> None:
    """start() against a server that is not there: RecordsUnavailable naming the database, its
    password redacted, within the connect timeout."""
    url = f"postgresql://app:s3cret-pass@127.0.0.1:{free_port()}/records"
    store = RecordStore(url, connect_timeout_secs=0.5)
    with pytest.raises(RecordsUnavailable) as caught:
        await store.start()
    await store.close()
    assert caught.value.message.startswith("cannot migrate postgresql://***@127.0.0.1:")
    assert "s3cret-pass" not in caught.value.message


# --- the writer ----------------------------------------------------------------------------------


async def test_receipts_are_written_in_batches(db_url: str) -> None:
    """250 receipts with batch_size 100: two full batches go at once, in one transaction each; the
    last 50 wait for the interval (or a flush) and go in a third."""
    async with open_store(db_url, batch_size=100, flush_interval_secs=60) as store:
        commits: list[int] = []
        event.listen(store.engine.sync_engine, "commit", lambda _: commits.append(1))
        for i in range(250):
            store.submit(receipt(f"r{i}"), logged(f"q{i}") if i % 2 else None)
        await eventually(lambda: store.writer.written["receipt"] == 200, what="two full batches")
        await asyncio.sleep(0.3)
        assert store.writer.written["receipt"] == 200  # the rest waits for the interval
        assert await count(store.engine, ReceiptRow) == 200
        assert await store.writer.flush(10)
        assert await count(store.engine, ReceiptRow) == 250
        assert await count(store.engine, PredictionRow) == 125
        assert len(commits) == 3
        async with store.engine.connect() as connection:
            pairs = await connection.execute(
                select(ReceiptRow.request_id, PredictionRow.inputs).join(
                    PredictionRow, PredictionRow.receipt_id == ReceiptRow.id
                )
            )
            assert sorted((request_id, inputs["question"]) for request_id, inputs in pairs) == sorted(
                (f"r{i}", f"q{i}") for i in range(1, 250, 2)
            )  # each logged prediction belongs to its own receipt
        assert store.writer.dropped == {"receipt": 0, "prediction": 0, "feedback": 0}


@pytest.mark.parametrize("size", [1, 9, 10, 49, 50, 51, 137, 500])
async def test_batches_of_any_size_keep_every_receipt_in_order(size: int, tmp_path: Path) -> None:
    """Receipts alone go to SQLite in multi-row INSERTs of 50, 10 and 1 rows: on and around those
    sizes each receipt is kept once, with its own values, numbered in the order it came."""
    url = f"sqlite:///{tmp_path}/records.db"
    async with open_store(url, batch_size=size, flush_interval_secs=60) as store:
        for i in range(size):
            store.submit(receipt(f"r{i}", input_tokens=i, latency_ms=i / 4))
        assert await store.writer.flush(10)
        async with store.engine.connect() as connection:
            rows = (
                await connection.execute(
                    select(ReceiptRow.request_id, ReceiptRow.input_tokens, ReceiptRow.latency_ms).order_by(
                        ReceiptRow.id
                    )
                )
            ).all()
    assert [tuple(row) for row in rows] == [(f"r{i}", i, i / 4) for i in range(size)]
    assert store.writer.written["receipt"] == size


async def test_a_receipt_reads_back_as_it_was_whichever_way_it_was_written(db_url: str) -> None:
    """Receipts alone go to SQLite as plain tuples (the writer's fast path), receipts with a logged
    prediction through SQLAlchemy: both read back through the schema with the same values, the time
    as an aware UTC datetime to the microsecond and the per-model usage as JSON."""
    from dspy_service.results import ModelUsage

    created = 1_764_590_400.123456  # 2025-12-01 12:00:00.123456 UTC
    usage = {"gpt-4": ModelUsage(calls=2, input_tokens=30, output_tokens=7, cost_usd=0.0013)}
    fields: dict[str, Any] = {
        "tenant": "acme",
        "source": "stream",
        "ok": False,
        "error_type": "provider_timeout",
        "coalesced": True,
        "input_tokens": 30,
        "output_tokens": 7,
        "cost_usd": None,
        "cost_saved_usd": 0.5,
        "usage_by_model": usage,
        "unmetered_calls": 1,
        "latency_ms": 12.5,
        "created_at": created,
    }
    async with open_store(db_url, flush_interval_secs=60) as store:
        store.submit(receipt("fast", **fields))
        assert await store.writer.flush(10)
        store.submit(receipt("slow", **fields), logged("q"))
        assert await store.writer.flush(10)
        async with store.engine.connect() as connection:
            result = await connection.execute(select(*ReceiptRow.__table__.columns))
            rows = {row.request_id: row for row in result}
    expected_time = datetime(2025, 12, 1, 12, 0, 0, 123456, tzinfo=UTC)
    for name in ("fast", "slow"):
        row = rows[name]
        assert row.created_at == expected_time
        assert (row.tenant, row.source, row.ok, row.error_type, row.coalesced) == (
            "acme",
            "stream",
            False,
            "provider_timeout",
            True,
        )
        assert (row.input_tokens, row.output_tokens, row.cost_usd, row.cost_saved_usd) == (30, 7, None, 0.5)
        assert (row.unmetered_calls, row.latency_ms) == (1, 12.5)
        assert row.usage_by_model == {
            "gpt-4": {"calls": 2, "input_tokens": 30, "output_tokens": 7, "cost_usd": 0.0013}
        }


async def test_a_partial_batch_goes_after_the_interval(db_url: str) -> None:
    """Three receipts and a batch size of 1000: written within the flush interval, unasked."""
    async with open_store(db_url, batch_size=1000, flush_interval_secs=0.2) as store:
        for i in range(3):
            store.submit(receipt(f"r{i}", tenant="acme"))
        await eventually(lambda: store.writer.written["receipt"] == 3, within=5, what="the interval flush")
        async with store.engine.connect() as connection:
            rows = (await connection.execute(select(ReceiptRow).order_by(ReceiptRow.id))).all()
        assert [row.request_id for row in rows] == ["r0", "r1", "r2"]
        assert rows[0].tenant == "acme"
        assert rows[0].created_at.tzinfo is not None


async def test_a_full_queue_drops_and_counts(db_url: str) -> None:
    """queue_size 3 and a writer not yet running: the 4th and 5th receipts (one with a logged
    prediction) are dropped and counted by kind through the hook; the three queued are written."""
    hooked: list[tuple[str, int]] = []
    store = RecordStore(db_url, queue_size=3, on_dropped=lambda kind, n: hooked.append((kind, n)))
    await asyncio.to_thread(upgrade_to_head, db_url)
    for i in range(5):
        store.submit(receipt(f"r{i}"), logged("q") if i == 4 else None)
    assert store.writer.dropped == {"receipt": 2, "prediction": 1, "feedback": 0}
    assert sorted(hooked) == [("prediction", 1), ("receipt", 1), ("receipt", 1)]
    await store.start(migrate=False)
    assert await store.writer.flush(10)
    assert await count(store.engine, ReceiptRow) == 3
    await store.close()


async def test_a_record_the_database_refuses_is_dropped_alone(db_url: str) -> None:
    """One receipt whose token count no column can hold, among good ones: it alone is dropped."""
    async with open_store(db_url, batch_size=10, flush_interval_secs=0.05) as store:
        store.submit(receipt("good-1"))
        store.submit(receipt("bad", input_tokens=2**70))
        store.submit(receipt("good-2"), logged("kept"))
        assert await store.writer.flush(20)
        assert store.writer.dropped["receipt"] == 1
        assert store.writer.written == {"receipt": 2, "prediction": 1}
        async with store.engine.connect() as connection:
            ids = (await connection.execute(select(ReceiptRow.request_id).order_by(ReceiptRow.id))).scalars()
            assert list(ids) == ["good-1", "good-2"]


async def test_sqlite_locked_drops_counted_then_recovers(tmp_path: Path) -> None:
    """Another process holds the SQLite file's write lock: submits stay instant, the batch is retried
    for retry_for_secs and then dropped (counted), feedback on a pending receipt is a 503, not a false
    404; once the lock goes, new receipts are written."""
    url = f"sqlite:///{tmp_path}/records.db"
    hooked: list[tuple[str, int]] = []
    options: dict[str, Any] = {
        "retry_for_secs": 1.0,
        "command_timeout_secs": 0.2,
        "flush_interval_secs": 0.05,
        "feedback_wait_secs": 0.3,
        "on_dropped": lambda kind, n: hooked.append((kind, n)),
    }
    metrics = FeedbackMetrics.model_validate({"metrics": {"helpful": {"type": "boolean"}}})
    async with open_store(url, **options) as store:
        holder = sqlite3.connect(tmp_path / "records.db", isolation_level=None)
        holder.execute("BEGIN EXCLUSIVE")
        started = time.perf_counter()
        for i in range(1000):
            store.submit(receipt(f"down-{i}"), logged("q"))
        assert time.perf_counter() - started < 0.5  # a list append each, whatever the database does
        with pytest.raises(RecordsUnavailable, match="not written yet"):
            await store.record_feedback(
                metrics, request_id="down-0", metric="helpful", value=True, tenant=None
            )
        await eventually(lambda: store.writer.dropped["receipt"] == 1000, what="the outage's drops")
        assert store.writer.dropped == {"receipt": 1000, "prediction": 1000, "feedback": 1}
        assert ("feedback", 1) in hooked
        holder.execute("ROLLBACK")
        holder.close()
        for i in range(5):
            store.submit(receipt(f"up-{i}"))
        assert await store.writer.flush(10)
        assert await count(store.engine, ReceiptRow) == 5
        assert store.writer.written["receipt"] == 5


@pytest.mark.parametrize("kind", ["silent", "refused"])
async def test_an_unreachable_postgres_costs_records_not_time(kind: str) -> None:
    """A server that accepts and never answers, or a port where nothing listens: every attempt
    ends within the connect timeout, the batch is dropped and counted after retry_for_secs, no
    exception escapes, and closing the store is bounded."""
    silent = SilentServer().start() if kind == "silent" else None
    url = silent.url if silent is not None else f"postgresql://postgres@127.0.0.1:{free_port()}/x"
    try:
        store = RecordStore(url, connect_timeout_secs=0.3, retry_for_secs=1.0, flush_interval_secs=0.05)
        await store.start(migrate=False)
        started = time.perf_counter()
        for i in range(100):
            store.submit(receipt(f"r{i}"))
        assert time.perf_counter() - started < 0.5
        await eventually(lambda: store.writer.dropped["receipt"] == 100, within=10, what="drops")
        store.submit(receipt("late"))
        closing = time.perf_counter()
        await store.close(timeout_secs=1.0)
        assert time.perf_counter() - closing < 3.0
        assert store.writer.dropped["receipt"] == 101
        assert store.writer.written["receipt"] == 0
        if silent is not None:
            assert silent.connections > 0  # it did try, and the timeout, not luck, ended the wait
    finally:
        if silent is not None:
            silent.stop()


async def test_postgres_dropped_mid_run_and_back(pg_url: str) -> None:
    """The database is dropped under a running writer (connections killed): what comes meanwhile is
    dropped and counted; once it is back (re-created, migrated) new receipts are written again,
    through a pool whose dead connections were replaced."""
    async with open_store(
        pg_url, connect_timeout_secs=1.0, retry_for_secs=1.0, flush_interval_secs=0.05
    ) as store:
        for i in range(5):
            store.submit(receipt(f"before-{i}"))
        assert await store.writer.flush(10)
        name = database_of(pg_url)
        drop_database(name)
        for i in range(7):
            store.submit(receipt(f"during-{i}"), logged("q"))
        await eventually(lambda: store.writer.dropped["receipt"] == 7, what="the outage's drops")
        assert store.writer.dropped["prediction"] == 7
        admin(f'CREATE DATABASE "{name}"')
        await asyncio.to_thread(upgrade_to_head, pg_url)
        for i in range(3):
            store.submit(receipt(f"after-{i}"))
        assert await store.writer.flush(10)
        assert store.writer.written["receipt"] == 8
        assert await count(store.engine, ReceiptRow) == 3


async def test_close_writes_what_is_queued(db_url: str) -> None:
    """Shutdown: what is still queued is written before the store closes; later submits are counted
    as dropped, not raised."""
    async with open_store(db_url, flush_interval_secs=60) as store:
        for i in range(10):
            store.submit(receipt(f"r{i}"))
    assert store.writer.written["receipt"] == 10
    store.submit(receipt("after-close"))
    assert store.writer.dropped["receipt"] == 1
    check = create_engine(db_url)
    try:
        assert await count(check, ReceiptRow) == 10
    finally:
        await check.dispose()


# --- retention -----------------------------------------------------------------------------------


async def test_retention_deletes_old_records_only(db_url: str) -> None:
    """Receipts older than the retention go, with their logged predictions and feedback, in
    batches; younger ones and theirs stay."""
    now = time.time()
    metrics = FeedbackMetrics.model_validate({"metrics": {"helpful": {"type": "boolean"}}})
    async with open_store(db_url) as store:
        for i in range(5):
            store.submit(receipt(f"old-{i}", created_at=now - 40 * 86_400), logged("old"))
        for i in range(2):
            store.submit(receipt(f"new-{i}", created_at=now - 86_400), logged("new"))
        assert await store.writer.flush(10)
        for request_id in ("old-0", "old-3", "new-1"):
            outcome = await store.record_feedback(
                metrics, request_id=request_id, metric="helpful", value=True, tenant=None
            )
            assert outcome.status == "created"
        deleted = await delete_older_than(store.engine, 30, batch_size=2)
        assert (deleted.receipts, deleted.predictions, deleted.feedback) == (5, 5, 2)
        async with store.engine.connect() as connection:
            kept = (await connection.execute(select(ReceiptRow.request_id).order_by(ReceiptRow.id))).scalars()
            assert list(kept) == ["new-0", "new-1"]
        assert await count(store.engine, PredictionRow) == 2
        assert await count(store.engine, FeedbackRow) == 1
        again = await delete_older_than(store.engine, 30, now=datetime.now(UTC) + timedelta(days=0))
        assert again.receipts == 0


async def test_the_retention_task_runs_at_start(db_url: str) -> None:
    """With retention_days set, the store's periodic task deletes old receipts without being asked."""
    async with open_store(db_url) as store:
        store.submit(receipt("ancient", created_at=time.time() - 100 * 86_400))
        store.submit(receipt("recent"))
        assert await store.writer.flush(10)
    async with open_store(db_url, retention_days=30, retention_interval_secs=0.1) as store:
        engine = store.engine

        async def remaining() -> int:
            return await count(engine, ReceiptRow)

        deadline = time.monotonic() + 10
        while await remaining() != 1:
            assert time.monotonic() < deadline, "retention did not run"
            await asyncio.sleep(0.05)
