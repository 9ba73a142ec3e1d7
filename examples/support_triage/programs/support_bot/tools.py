"""The one tool of the program: looking an order up in a tiny bundled table (`data/orders.csv`).

In a real deployment this would call the order system's API. A tool is an ordinary function: its
name, type hints and docstring are what `dspy.Tool` shows the model, so keep them plain and exact
(and the docstring on one line: it is shown as it is written).
It must be safe to call from several requests at once (the table is only read).
"""

from __future__ import annotations

import csv
import functools
import io
import re
from importlib import resources

# Order numbers as customers write them: A-1001, a1001, #A-1001.
ORDER_ID = re.compile(r"#?\b([Aa])-?(\d{4})\b")


@functools.cache
def _orders() -> dict[str, dict[str, str]]:
    text = resources.files(__package__).joinpath("data/orders.csv").read_text("utf-8")
    return {row["order_id"]: row for row in csv.DictReader(io.StringIO(text))}


def normalize_order_id(text: str) -> str:
    """`#a1001` and `A-1001` are the same order: `A-1001`."""
    found = ORDER_ID.search(text.strip())
    return f"A-{found.group(2)}" if found else text.strip().upper()


def find_order_ids(ticket: str) -> list[str]:
    """Every order number written in the ticket, normalized, in order of appearance."""
    return list(dict.fromkeys(f"A-{match.group(2)}" for match in ORDER_ID.finditer(ticket)))


def lookup_order(order_id: str) -> str:
    """Look up an order by its number (e.g. A-1001): its item, total, status and any note on it."""
    key = normalize_order_id(order_id)
    row = _orders().get(key)
    if row is None:
        return f"No order {key} on file."
    note = f"; note: {row['note']}" if row["note"] else ""
    return (
        f"Order {key}: {row['item']}, {row['total_usd']} USD, placed {row['placed']}, "
        f"status {row['status']}{note}."
    )
