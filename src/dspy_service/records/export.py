"""Training data from production: logged predictions of a variant, with their feedback, as JSONL.

Each line loads as a DSPy example:

    import json, dspy
    examples = [dspy.Example(**line["example"]).with_inputs(*line["inputs"])
                for line in map(json.loads, open("train.jsonl"))]

(`example` holds the input and the output fields; `inputs` names the input fields.) Only
predictions logged with the prediction log on (PREDICTION_LOG) can be exported, and only answered
ones; the file is written next to its destination and moved into place when complete.
"""

from __future__ import annotations

import asyncio
import os
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, BinaryIO

import orjson
from sqlalchemy import Select, exists, select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from dspy_service.records.schema import FeedbackRow, PredictionRow, ReceiptRow

_CHUNK = 500
_AGE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNIT_SECS = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 604_800}


def parse_since(text: str, now: datetime | None = None) -> datetime:
    """`--since`: an age (`90m`, `12h`, `7d`, `2w`) back from now, or an ISO date or time (UTC when
    it names no zone). ValueError naming the problem otherwise."""
    match = _AGE.match(text)
    if match:
        seconds = float(match.group(1)) * _UNIT_SECS[match.group(2)]
        return (now or datetime.now(UTC)) - timedelta(seconds=seconds)
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(
            f"since {text!r} is neither an age (such as 7d, 12h, 30m) nor an ISO date (2025-01-31)"
        ) from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _feedback_value(kind: str, number: float | None, text: str | None) -> Any:
    if kind == "boolean":
        return number is not None and number >= 0.5
    if kind == "float":
        return number
    return text


def _query(variant: str, metric: str | None, min_value: float | None, since: datetime | None) -> Select[Any]:
    query = (
        select(
            ReceiptRow.id,
            ReceiptRow.request_id,
            ReceiptRow.model,
            ReceiptRow.variant,
            ReceiptRow.fingerprint,
            ReceiptRow.created_at,
            PredictionRow.inputs,
            PredictionRow.outputs,
        )
        .join(PredictionRow, PredictionRow.receipt_id == ReceiptRow.id)
        .where(ReceiptRow.variant == variant, ReceiptRow.ok.is_(True))
        .order_by(ReceiptRow.id)
    )
    if since is not None:
        query = query.where(ReceiptRow.created_at >= since)
    if metric is not None:
        given = (FeedbackRow.receipt_id == ReceiptRow.id) & (FeedbackRow.metric == metric)
        if min_value is not None:
            given = given & (FeedbackRow.value_num >= min_value)
        query = query.where(exists().where(given))
    return query


async def _feedback_of(connection: AsyncConnection, ids: list[int]) -> dict[int, dict[str, Any]]:
    rows = await connection.execute(
        select(
            FeedbackRow.receipt_id,
            FeedbackRow.metric,
            FeedbackRow.kind,
            FeedbackRow.value_num,
            FeedbackRow.value_text,
        )
        .where(FeedbackRow.receipt_id.in_(ids))
        .order_by(FeedbackRow.receipt_id, FeedbackRow.metric)
    )
    feedback: dict[int, dict[str, Any]] = {}
    for receipt_id, metric, kind, number, text in rows:
        feedback.setdefault(receipt_id, {})[metric] = _feedback_value(kind, number, text)
    return feedback


def _line(row: Any, feedback: dict[str, Any]) -> bytes:
    inputs: dict[str, Any] = row.inputs
    return orjson.dumps(
        {
            "example": {**inputs, **row.outputs},
            "inputs": list(inputs),
            "request_id": row.request_id,
            "variant": row.variant,
            "model": row.model,
            "fingerprint": row.fingerprint,
            "feedback": feedback,
            "created_at": row.created_at.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        },
        default=str,
    )


async def export_jsonl(
    engine: AsyncEngine,
    variant: str,
    *,
    out_path: Path,
    metric: str | None = None,
    min_value: float | None = None,
    since: datetime | None = None,
) -> int:
    """Write the logged predictions of `variant` (made since `since`; with `metric`, only those
    given that feedback, of at least `min_value` when given) to `out_path`, one JSON line each, and
    return how many."""
    if min_value is not None and metric is None:
        raise ValueError("a minimum value needs the metric it applies to")
    partial = out_path.with_name(f".{out_path.name}.partial")
    handle: BinaryIO = await asyncio.to_thread(partial.open, "wb")
    count = 0
    try:
        async with engine.connect() as connection:
            result = await connection.stream(
                _query(variant, metric, min_value, since).execution_options(yield_per=_CHUNK)
            )
            async for chunk in result.partitions():
                feedback = await _feedback_of(connection, [row.id for row in chunk])
                text = b"".join(_line(row, feedback.get(row.id, {})) + b"\n" for row in chunk)
                await asyncio.to_thread(handle.write, text)
                count += len(chunk)
        await asyncio.to_thread(handle.close)
        await asyncio.to_thread(os.replace, partial, out_path)
    except BaseException:
        handle.close()
        partial.unlink(missing_ok=True)
        raise
    return count
