"""The receipt of an answered prediction, built by position on the request path, and the values the
SQLite writer binds for it."""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any, cast

from dspy_service.recording import answered_receipt
from dspy_service.records.entries import Receipt
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
        coalesced=True,
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
        coalesced=True,
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
    """One receipt's values line up with COLUMNS, as SQLAlchemy would store them; a batch of 67 is
    a chunk of 50, one of 10 and seven single rows, every value once, in order."""
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
    batch = [Receipt(request_id=f"r{i}", model="m", model_served="m", variant="v") for i in range(67)]
    chunks = list(insert_chunks(batch))
    assert [(statement.count("(?"), len(values)) for statement, values in chunks] == [
        (50, 1),
        (10, 1),
        (1, 7),
    ]
    ids = [value for _, values in chunks for chunk in values for value in chunk[:: len(COLUMNS)]]
    assert ids == [f"r{i}" for i in range(67)]
