"""The receipt of an answered prediction, built by position on the request path, and the values the
SQLite writer binds for it."""

from __future__ import annotations

import sqlite3
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
from sqlalchemy import create_engine, select

from dspy_service.recording import answered_receipt
from dspy_service.records.entries import Receipt
from dspy_service.records.schema import Base, ReceiptRow
from dspy_service.records.sqlite_receipts import COLUMNS, flat_values, insert_chunks
from dspy_service.results import ModelUsage


def test_an_answered_receipt_takes_each_field_from_where_it_belongs() -> None:
    """Every value distinct, so a field out of order in the positional constructor shows up."""
    usage = {"gpt-4": ModelUsage(calls=1, input_tokens=11, output_tokens=12, cost_usd=0.5)}
    request = SimpleNamespace(model="gpt-4", tenant="acme", source="batch")
    route = SimpleNamespace(program=SimpleNamespace(fingerprint="f1ngerprint"))
    result = SimpleNamespace(
        model_served="gpt-3.5-turbo",
        variant="tuned",
        cache_level="redis",
        coalesced=False,  # unlike ok: the two booleans cannot trade places unseen
        input_tokens=11,
        output_tokens=12,
        cost_usd=0.25,
        cost_saved_usd=0.125,
        usage_by_model=usage,
        latency_ms=3.5,
    )
    before = time.time()
    receipt = answered_receipt("req-1", cast(Any, request), cast(Any, route), cast(Any, result))
    expected = Receipt(
        request_id="req-1",
        model="gpt-4",
        model_served="gpt-3.5-turbo",
        variant="tuned",
        fingerprint="f1ngerprint",
        tenant="acme",
        source="batch",
        ok=True,
        error_type=None,
        cache_level="redis",
        coalesced=False,  # unlike ok: the two booleans cannot trade places unseen
        input_tokens=11,
        output_tokens=12,
        cost_usd=0.25,
        cost_saved_usd=0.125,
        usage_by_model=usage,
        unmetered_calls=0,
        latency_ms=3.5,
        created_at=receipt.created_at,
    )
    assert receipt == expected
    assert before <= receipt.created_at <= time.time()


def test_the_sqlite_values_follow_the_columns() -> None:
    """One receipt's values line up with COLUMNS, as SQLAlchemy would store them."""
    receipt = Receipt(
        request_id="r",
        model="m",
        model_served="m2",
        variant="v",
        tenant=None,
        ok=False,
        error_type="timeout",
        coalesced=True,
        usage_by_model={"m": ModelUsage(calls=2, input_tokens=3, output_tokens=4, cost_usd=None)},
        created_at=1_764_590_400.000_25,
    )
    row = dict(zip(COLUMNS, flat_values([receipt]), strict=True))
    assert row["tenant"] is None
    assert (row["ok"], row["coalesced"], row["error_type"]) == (0, 1, "timeout")
    assert row["usage_by_model"] == '{"m":{"calls":2,"input_tokens":3,"output_tokens":4,"cost_usd":null}}'
    assert row["created_at"] == "2025-12-01 12:00:00.000250"


def varied(i: int) -> Receipt:
    """Receipt i of a mixed run: tenants, hits and misses, failures and fallbacks in stretches, so
    that chunks share some columns, not others, and not the same ones from chunk to chunk."""
    return Receipt(
        request_id=f"r{i}",
        model="m",
        model_served="m" if i % 7 else "fallback",
        variant="v" if i < 60 else "tuned",
        tenant=None if i < 30 else f"t{i % 3}",
        ok=i % 11 != 5,
        error_type=None if i % 11 != 5 else "timeout",
        cache_level="memory" if i < 100 else None,
        input_tokens=0 if i < 100 else i,
        cost_usd=0.0 if i % 13 else None,
        usage_by_model={}
        if i < 100
        else {"m": ModelUsage(calls=1, input_tokens=i, output_tokens=2, cost_usd=0.5)},
        latency_ms=i / 8,
        created_at=1_764_590_400 + i / 1000,
    )


@pytest.mark.parametrize("size", [1, 10, 50, 67, 150, 500])
def test_chunks_write_every_value_of_every_row(size: int, tmp_path: Path) -> None:
    """The INSERTs insert_chunks makes, run on a SQLite file with the schema, store exactly what each
    receipt holds, in order, whatever its chunk shares: read back through SQLAlchemy."""
    engine = create_engine(f"sqlite:///{tmp_path}/r.db")
    Base.metadata.create_all(engine)
    receipts = [varied(i) for i in range(size)]
    connection = sqlite3.connect(tmp_path / "r.db", isolation_level=None)
    statements = list(insert_chunks(receipts))
    for statement, chunks in statements:
        connection.executemany(statement, chunks)
    connection.close()
    assert len(statements) <= 3
    with engine.connect() as reading:
        rows = reading.execute(select(*ReceiptRow.__table__.columns).order_by(ReceiptRow.id)).all()
    engine.dispose()
    assert len(rows) == size
    plain = [name for name in COLUMNS if name not in ("created_at", "usage_by_model")]
    for receipt, row in zip(receipts, rows, strict=True):
        assert {name: getattr(row, name) for name in plain} == {
            name: getattr(receipt, name) for name in plain
        }
        seconds = int(receipt.created_at)
        micros = int((receipt.created_at - seconds) * 1e6)
        assert row.created_at == datetime.fromtimestamp(seconds, UTC) + timedelta(microseconds=micros)
        assert row.usage_by_model == {name: usage.to_json() for name, usage in receipt.usage_by_model.items()}
    alike = [Receipt(request_id=f"r{i}", model="m", model_served="m", variant="v") for i in range(50)]
    [(_, [values])] = insert_chunks(alike)  # 50 memory hits alike: 16 values once, 3 per row
    assert len(values) == 16 + 3 * 50
