"""Cost totals and today's spend rebuilt from the receipts, for when Redis has lost the fleet's
counters (`redis.state_lost`): `/costs` rows in the shape of costs.CostTotals.to_json, per
`model:variant` and per `@tenant/model:variant`, and the day's (UTC) spend per model and per tenant
that the budgets count.

Each receipt is counted as the cost ledger counted it (accounting.py): a hit or coalesced answer is
a request on its row that saved what it would have cost; any other prediction that spent (or was
answered) is a request on its own model's row with that model's share of the tokens and cost, and
every other model it spent on (a pinned predictor's, a fallback) gets its share with no request.
What receipts cannot rebuild: spend older than the retention, the tokens a synchronous program
reported after its request had ended, and budget holds kept for calls whose spend is unknown.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from dspy_service.costs import CostTotals, tenant_row
from dspy_service.records.schema import ReceiptRow

_CHUNK = 2000

_COLUMNS = (
    ReceiptRow.model,
    ReceiptRow.variant,
    ReceiptRow.tenant,
    ReceiptRow.ok,
    ReceiptRow.cache_level,
    ReceiptRow.coalesced,
    ReceiptRow.input_tokens,
    ReceiptRow.output_tokens,
    ReceiptRow.cost_usd,
    ReceiptRow.cost_saved_usd,
    ReceiptRow.usage_by_model,
    ReceiptRow.unmetered_calls,
    ReceiptRow.created_at,
)


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="milliseconds")[:-6] + "Z"


def _shares(row: Any) -> dict[str, tuple[int, int, float | None]]:
    """Public model -> (input tokens, output tokens, cost) of one receipt; a receipt written without
    a per-model split counts everything on its own model."""
    usage: dict[str, Any] = row.usage_by_model or {}
    if not usage:
        if not (row.input_tokens or row.output_tokens or row.cost_usd):
            return {}
        return {row.model: (row.input_tokens, row.output_tokens, row.cost_usd)}
    return {
        name: (int(share.get("input_tokens", 0)), int(share.get("output_tokens", 0)), share.get("cost_usd"))
        for name, share in usage.items()
    }


def _receipt_deltas(row: Any) -> list[tuple[str, CostTotals]]:
    """The (row name, delta) pairs one receipt adds to the ledger, tenant rows included."""
    stamp = _iso(row.created_at)
    name = f"{row.model}:{row.variant}"
    deltas: list[tuple[str, CostTotals]] = []
    if row.cache_level is not None or row.coalesced:
        deltas.append(
            (
                name,
                CostTotals(
                    total_requests=1,
                    cache_hits=1,
                    cost_saved_usd=row.cost_saved_usd or 0.0,
                    last_updated=stamp,
                ),
            )
        )
    else:
        shares = _shares(row)
        if row.ok or shares or row.unmetered_calls:
            tokens_in, tokens_out, cost = shares.pop(row.model, (0, 0, 0.0))
            own = CostTotals(
                total_requests=1,
                total_input_tokens=tokens_in,
                total_output_tokens=tokens_out,
                total_cost_usd=cost or 0.0,
                unpriced_requests=1 if cost is None else 0,
                unmetered_calls=row.unmetered_calls,
                last_updated=stamp,
            )
            deltas.append((name, own))
        for other, (tokens_in, tokens_out, cost) in shares.items():
            share = CostTotals(
                total_input_tokens=tokens_in,
                total_output_tokens=tokens_out,
                total_cost_usd=cost or 0.0,
                last_updated=stamp,
            )
            deltas.append((f"{other}:{row.variant}", share))
    if row.tenant is not None:
        deltas += [(tenant_row(row.tenant, row_name), delta) for row_name, delta in deltas]
    return deltas


async def rebuild_cost_totals(
    engine: AsyncEngine, since: datetime | None = None, *, until: datetime | None = None
) -> dict[str, dict[str, Any]]:
    """`/costs` rows (name -> CostTotals.to_json()) from every receipt kept (made since `since`, and
    before `until`)."""
    query = select(*_COLUMNS).order_by(ReceiptRow.id).execution_options(yield_per=_CHUNK)
    if since is not None:
        query = query.where(ReceiptRow.created_at >= since)
    if until is not None:
        query = query.where(ReceiptRow.created_at < until)
    totals: dict[str, CostTotals] = {}
    async with engine.connect() as connection:
        result = await connection.stream(query)
        async for partition in result.partitions():
            for row in partition:
                for name, delta in _receipt_deltas(row):
                    totals.setdefault(name, CostTotals()).add(delta)
    return {name: row.to_json() for name, row in sorted(totals.items())}


@dataclass(frozen=True, slots=True, kw_only=True)
class DaySpend:
    """One UTC day's spend in USD, as the budgets count it: per public model, and per tenant (the
    sum of its requests' spend on every model)."""

    day: str  # YYYY-MM-DD
    by_model: dict[str, float] = field(default_factory=dict)
    by_tenant: dict[str, float] = field(default_factory=dict)


async def spend_today(
    engine: AsyncEngine, now: datetime | None = None, *, until_now: bool = False
) -> DaySpend:
    """What was spent today (UTC), per model and per tenant, from the receipts (with `until_now`,
    only those made before `now`)."""
    moment = (now or datetime.now(UTC)).astimezone(UTC)
    midnight = moment.replace(hour=0, minute=0, second=0, microsecond=0)
    before = (ReceiptRow.created_at < moment,) if until_now else ()
    query = (
        select(*_COLUMNS)
        .where(
            *before,
            ReceiptRow.created_at >= midnight,
            ReceiptRow.cache_level.is_(None),
            ReceiptRow.coalesced.is_(False),
        )
        .order_by(ReceiptRow.id)
        .execution_options(yield_per=_CHUNK)
    )
    by_model: dict[str, float] = {}
    by_tenant: dict[str, float] = {}
    async with engine.connect() as connection:
        result = await connection.stream(query)
        async for partition in result.partitions():
            for row in partition:
                spent = 0.0
                for name, (_, _, cost) in _shares(row).items():
                    if cost:
                        by_model[name] = by_model.get(name, 0.0) + cost
                        spent += cost
                if row.tenant is not None and spent:
                    by_tenant[row.tenant] = by_tenant.get(row.tenant, 0.0) + spent
    return DaySpend(
        day=midnight.date().isoformat(),
        by_model={name: round(usd, 12) for name, usd in sorted(by_model.items())},
        by_tenant={name: round(usd, 12) for name, usd in sorted(by_tenant.items())},
    )
