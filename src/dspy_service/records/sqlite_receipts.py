"""Receipts alone (no logged prediction) on SQLite, the embedded default, written without SQLAlchemy.

Every prediction writes a receipt, a memory hit included, so this is the records path `make bench`
measures. By hand because no library does it cheaply enough:

- SQLAlchemy's per-row parameter processing cost as much as SQLite's insert itself, on the event
  loop: the rows are built here as plain values, as SQLAlchemy would store them.
- An executemany of one-row INSERTs binds and steps one row at a time, and Python's sqlite3
  releases the GIL around each step: two GIL hand-overs per row between aiosqlite's thread and a
  busy event loop. Here a batch is an executemany of 50-row INSERTs (then of 10-row and one-row
  ones for the rest), so a step without the GIL takes 50 rows: in one `make bench` run with
  --baseline-src, 1.5 us less CPU per receipt in aiosqlite's thread (5.4-6.9 us against 6.8-8.7).
"""

from __future__ import annotations

import operator
import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import orjson

from dspy_service.records.entries import Receipt

COLUMNS = (
    "request_id",
    "tenant",
    "source",
    "model",
    "model_served",
    "variant",
    "fingerprint",
    "ok",
    "error_type",
    "cache_level",
    "coalesced",
    "input_tokens",
    "output_tokens",
    "cost_usd",
    "cost_saved_usd",
    "usage_by_model",
    "unmetered_calls",
    "latency_ms",
    "created_at",
)


def _bind_none(value: None) -> None:
    return value


# Python's sqlite3 binds an int, a float or a str at once but sends any other value, None included,
# through its adaptation protocol first: with no adapter for None, that is two failed attribute
# lookups (`__adapt__`, `__conform__`), each raising and clearing an AttributeError: 350 ns per NULL
# here against 70 for an integer, 170 with this adapter found. A receipt has two or three NULLs (no
# tenant, no error). The adapter returns None itself, so every sqlite3 connection of the process
# (SQLAlchemy's included) still binds a NULL.
sqlite3.register_adapter(type(None), _bind_none)

_EMPTY_JSON = "{}"
_WIDTH = len(COLUMNS)
# Columns that may hold one value for a whole chunk (a run of memory hits differs only in the
# others); the request ID and the times never do, and are not looked at.
_SHAREABLE = tuple(
    i for i, name in enumerate(COLUMNS) if name not in ("request_id", "latency_ms", "created_at")
)

# Rows per INSERT, largest first: 50 rows of 19 values stay within the 999 values a statement may
# bind before SQLite 3.32. Three sizes, so that a few statements serve every batch size, each
# prepared once (sqlite3 keeps them in its statement cache); a statement sized to each remainder
# would be prepared anew for most batches.
CHUNK_ROWS = (50, 10, 1)


class _Layout:
    """One INSERT of `rows` rows in which the columns `shared` take one value for all the rows (bound
    once, as ?1, ?2, ...: SQLite copies it into each row without another bind), the others one per
    row. `pick` takes a chunk's parameters, in the statement's order, from its flat values."""

    def __init__(self, rows: int, shared: tuple[int, ...]) -> None:
        own = [k for k in range(_WIDTH) if k not in shared]
        number = {k: n + 1 for n, k in enumerate(shared)}
        placeholders = []
        next_number = len(shared) + 1
        for _ in range(rows):
            cells = []
            for k in range(_WIDTH):
                if k in number:
                    cells.append(f"?{number[k]}")
                else:
                    cells.append(f"?{next_number}")
                    next_number += 1
            placeholders.append("(" + ", ".join(cells) + ")")
        self.statement = f"INSERT INTO receipts ({', '.join(COLUMNS)}) VALUES " + ", ".join(placeholders)
        # The shared values (from the first row), then each row's own: one C call per chunk.
        self.pick = operator.itemgetter(*shared, *[row * _WIDTH + k for row in range(rows) for k in own])


_LAYOUTS: dict[tuple[int, tuple[int, ...]], _Layout] = {}


def _layout(rows: int, shared: tuple[int, ...]) -> _Layout:
    layout = _LAYOUTS.get((rows, shared))
    if layout is None:
        if len(_LAYOUTS) >= 64:  # bounded: a few shapes of traffic, each its own statement
            _LAYOUTS.clear()
        layout = _LAYOUTS[rows, shared] = _Layout(rows, shared)
    return layout


def insert_chunks(receipts: Sequence[Receipt]) -> Iterator[tuple[str, list[tuple[Any, ...]]]]:
    """The statements, each with its chunks' values, that insert `receipts` in order: as many
    50-row chunks as fit under one statement (one executemany), then 10-row ones, then rows.

    A column whose value is the same over all the rows of a size (most of them, for a run of
    memory hits: the model, variant, tokens, cost...) is bound once per chunk, not once per row:
    binding is most of what a receipt costs Python's sqlite3 (a text value is encoded, copied and
    freed each time)."""
    values = flat_values(receipts)
    start = 0
    left = len(receipts)
    for rows in CHUNK_ROWS:
        count = left // rows
        if not count:
            continue
        step = rows * _WIDTH
        end = start + count * step
        # Shared: one value over all the rows of this size (a run of memory hits), whichever chunk.
        shared = (
            tuple(k for k in _SHAREABLE if len(set(values[start + k : end : _WIDTH])) == 1)
            if rows > 1
            else ()
        )
        layout = _layout(rows, shared)
        pick = layout.pick
        yield layout.statement, [pick(values[offset : offset + step]) for offset in range(start, end, step)]
        start += count * step
        left -= count * rows


def flat_values(receipts: Iterable[Receipt]) -> list[Any]:
    """The receipts' column values one after another, as SQLAlchemy would store them: booleans as
    0/1, JSON as text, the time as naive UTC 'YYYY-MM-DD HH:MM:SS.ffffff' (what its DateTime reads
    back). The seconds' text is made once per second, not per receipt."""
    values: list[Any] = []
    last_second = -1
    second_text = ""
    for receipt in receipts:
        usage = receipt.usage_by_model
        created = receipt.created_at
        second = int(created)
        if second != last_second:
            second_text = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(second))
            last_second = second
        values += (
            receipt.request_id,
            receipt.tenant,
            receipt.source,
            receipt.model,
            receipt.model_served,
            receipt.variant,
            receipt.fingerprint,
            1 if receipt.ok else 0,
            receipt.error_type,
            receipt.cache_level,
            1 if receipt.coalesced else 0,
            receipt.input_tokens,
            receipt.output_tokens,
            receipt.cost_usd,
            receipt.cost_saved_usd,
            orjson.dumps({name: u.to_json() for name, u in usage.items()}).decode() if usage else _EMPTY_JSON,
            receipt.unmetered_calls,
            receipt.latency_ms,
            # %d truncates as int() does; 0.25 us against 0.41 for an f-string's :06d
            "%s.%06d" % (second_text, (created - second) * 1e6),  # noqa: UP031
        )
    return values
