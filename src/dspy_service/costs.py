"""Usage to cost, and the cost totals per `model:variant` (this replica's and the fleet's).

Cost is computed from the provider's own token counts and the model's configured prices, else the
price data DSPy ships; where no price is known the cost is None (reported as null), never zero.

Totals are kept locally and, when Redis is configured, added to fleet-wide hashes in Redis every
COSTS_FLUSH_INTERVAL_SECS. Deltas that could not reach Redis stay pending and are flushed when it
returns, so an outage loses nothing; a flush whose reply was lost is resent as it was, under its
token, so it is never counted twice (see redis_batches).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, fields
from typing import Any

from dspy_service.background import stop_task
from dspy_service.logs import get_logger
from dspy_service.models_config import ModelSpec
from dspy_service.redis_batches import BatchWriter, Command
from dspy_service.redis_link import KEY_PREFIX, RedisLink
from dspy_service.timefmt import utc_now_iso

_log = get_logger("dspy_service.costs")

PriceLookup = Callable[[str], "Price | None"]
_COST_DECIMALS = 12


@dataclass(frozen=True, slots=True)
class Price:
    input_per_token: float
    output_per_token: float
    source: str  # "configured" or "dspy"

    def cost(self, input_tokens: int, output_tokens: int) -> float:
        return input_tokens * self.input_per_token + output_tokens * self.output_per_token


def configured_price(spec: ModelSpec) -> Price | None:
    if spec.cost_per_1k_input_tokens is None or spec.cost_per_1k_output_tokens is None:
        return None
    return Price(spec.cost_per_1k_input_tokens / 1000, spec.cost_per_1k_output_tokens / 1000, "configured")


@dataclass(frozen=True, slots=True)
class Usage:
    """Provider-reported tokens of one prediction, summed over every LM call it made, and their cost."""

    input_tokens: int
    output_tokens: int
    cost_usd: float | None
    unpriced_models: tuple[str, ...] = ()


def price_usage(usage_by_model: dict[str, tuple[int, int, int]], prices: PriceLookup) -> Usage:
    """Sum tokens over the LMs a program called and price each LM's share with its own price
    (`usage_by_model`: provider model id -> input tokens, output tokens, calls)."""
    total_in = total_out = 0
    cost: float | None = 0.0
    unpriced: list[str] = []
    for model_id, (input_tokens, output_tokens, _) in usage_by_model.items():
        total_in += input_tokens
        total_out += output_tokens
        price = prices(model_id)
        if price is None:
            unpriced.append(model_id)
            cost = None
        elif cost is not None:
            cost += price.cost(input_tokens, output_tokens)
    if cost is not None:
        # Binary floats turn 127 x $0.00003 + 40 x $0.00006 into 0.006209999999999999; a
        # trillionth of a dollar is far below any token price, so rounding there loses nothing.
        cost = round(cost, _COST_DECIMALS)
    return Usage(total_in, total_out, cost, tuple(unpriced))


@dataclass(slots=True)
class CostTotals:
    total_requests: int = 0
    total_input_tokens: int = 0
    total_output_tokens: int = 0
    total_cost_usd: float = 0.0
    cache_hits: int = 0
    cost_saved_usd: float = 0.0
    unpriced_requests: int = 0
    # Provider calls cut off before the provider reported their tokens: their spend is unknown.
    unmetered_calls: int = 0
    last_updated: str | None = None

    def add(self, other: CostTotals) -> None:
        self.total_requests += other.total_requests
        self.total_input_tokens += other.total_input_tokens
        self.total_output_tokens += other.total_output_tokens
        self.total_cost_usd += other.total_cost_usd
        self.cache_hits += other.cache_hits
        self.cost_saved_usd += other.cost_saved_usd
        self.unpriced_requests += other.unpriced_requests
        self.unmetered_calls += other.unmetered_calls
        if other.last_updated and (self.last_updated is None or other.last_updated > self.last_updated):
            self.last_updated = other.last_updated

    def to_json(self) -> dict[str, Any]:
        view = asdict(self)
        view["total_cost_usd"] = round(self.total_cost_usd, 10)
        view["cost_saved_usd"] = round(self.cost_saved_usd, 10)
        return view

    @classmethod
    def from_redis(cls, raw: dict[bytes, bytes]) -> CostTotals:
        totals = cls()
        for field in fields(cls):
            value = raw.get(field.name.encode())
            if value is None:
                continue
            text = value.decode()
            if field.name == "last_updated":
                totals.last_updated = text
            elif field.name in ("total_cost_usd", "cost_saved_usd"):
                setattr(totals, field.name, float(text))
            else:
                setattr(totals, field.name, int(text))
        return totals


_INT_FIELDS = (
    "total_requests",
    "total_input_tokens",
    "total_output_tokens",
    "cache_hits",
    "unpriced_requests",
    "unmetered_calls",
)
_FLOAT_FIELDS = ("total_cost_usd", "cost_saved_usd")


_now = utc_now_iso

# A tenant's own rows, beside the fleet's per model:variant: what a client key may see of /costs.
TENANT_ROW_PREFIX = "@"


def tenant_row(tenant: str, name: str) -> str:
    return f"{TENANT_ROW_PREFIX}{tenant}/{name}"


def rows_of(totals: dict[str, Any], tenant: str | None) -> dict[str, Any]:
    """The /costs rows one caller may see: with `tenant`, that tenant's own rows (named
    model:variant); without, the service-wide rows."""
    if tenant is None:
        return {name: row for name, row in totals.items() if not name.startswith(TENANT_ROW_PREFIX)}
    prefix = f"{TENANT_ROW_PREFIX}{tenant}/"
    return {name[len(prefix) :]: row for name, row in totals.items() if name.startswith(prefix)}


class CostLedger:
    def __init__(self, link: RedisLink | None, flush_interval_secs: float) -> None:
        self._link = link
        self._interval = flush_interval_secs
        self._local: dict[str, CostTotals] = {}
        self._pending: dict[str, CostTotals] = {}
        prefix = link.state_prefix if link is not None else KEY_PREFIX
        self._rows_prefix = prefix + "costs:"  # a hash per row
        self._index = prefix + "costs-index"  # the set of row names
        self._writer = BatchWriter(link, "costs", self._increments) if link is not None else None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        # Run before each periodic flush: the epoch check (redis_epoch.py), so that a state Redis
        # emptied under a live connection is noticed before this replica's next flush lands in it.
        self.before_flush: Callable[[], Awaitable[None]] | None = None

    def record_miss(
        self,
        model: str,
        variant: str,
        usage: Usage,
        unmetered_calls: int = 0,
        *,
        requests: int = 1,
        tenant: str | None = None,
    ) -> None:
        """A request's spend on `model` (requests=0: the spend of a model the request's program pinned
        a predictor to, counted on that model's row; the request is counted on its own model's).
        A tenant's request is counted on the tenant's own row too (`tenant_row`)."""
        delta = CostTotals(
            total_requests=requests,
            total_input_tokens=usage.input_tokens,
            total_output_tokens=usage.output_tokens,
            total_cost_usd=usage.cost_usd or 0.0,
            unpriced_requests=requests if usage.cost_usd is None else 0,
            unmetered_calls=unmetered_calls,
            last_updated=_now(),
        )
        name = f"{model}:{variant}"
        self._apply(name, delta)
        if tenant is not None:
            self._apply(tenant_row(tenant, name), delta)

    def record_hit(self, name: str, saved_usd: float | None, tenant: str | None = None) -> None:
        """A request answered without spending (`name` is "model:variant"); on the hot path, so the
        rows are updated in place rather than through a delta object."""
        now = _now()
        saved = saved_usd or 0.0
        rows = (self._local, self._pending) if self._link is not None else (self._local,)
        names = (name,) if tenant is None else (name, tenant_row(tenant, name))
        for table in rows:
            for row_name in names:
                row = table.get(row_name)
                if row is None:
                    row = table[row_name] = CostTotals()
                row.total_requests += 1
                row.cache_hits += 1
                row.cost_saved_usd += saved
                row.last_updated = now

    def _apply(self, name: str, delta: CostTotals) -> None:
        self._local.setdefault(name, CostTotals()).add(delta)
        if self._link is not None:
            self._pending.setdefault(name, CostTotals()).add(delta)

    def _unsent(self) -> dict[str, CostTotals]:
        """What this replica has counted that Redis has not confirmed."""
        unsent: dict[str, CostTotals] = {}
        in_doubt = self._writer.in_doubt if self._writer is not None else None
        for batch in (in_doubt or {}, self._pending):
            for name, delta in batch.items():
                unsent.setdefault(name, CostTotals()).add(delta)
        return unsent

    def start(self) -> None:
        if self._link is not None:
            self._link.on_reconnect(self._flush_after_outage)
            self._task = asyncio.get_running_loop().create_task(self._flush_forever(), name="costs-flush")

    async def close(self) -> None:
        self._stopping = True
        await stop_task(self._task)
        if not await self.flush():
            _log.warning(
                "costs.unflushed", entries=len(self._unsent()), detail="Redis unreachable at shutdown"
            )

    async def _flush_after_outage(self) -> None:
        await self.flush()

    async def _flush_forever(self) -> None:
        while not self._stopping:
            await asyncio.sleep(self._interval)
            if self.before_flush is not None:
                await self.before_flush()
            await self.flush()

    async def flush(self) -> bool:
        """Add unsent deltas to the fleet totals; True when nothing is left unsent."""
        if self._writer is None:
            return True
        return await self._writer.flush(self._take_pending) and not self._pending

    def _take_pending(self) -> dict[str, CostTotals] | None:
        batch, self._pending = self._pending, {}
        return batch or None

    async def snapshot(self) -> tuple[dict[str, dict[str, Any]], str]:
        """Totals per `model:variant` and their scope: "fleet" (from Redis) or "replica"."""
        link = self._link
        if link is not None and link.connected:
            await self.flush()

            async def read(client: Any) -> dict[str, CostTotals]:
                names = sorted(member.decode() for member in await client.smembers(self._index))
                pipe = client.pipeline(transaction=False)
                for name in names:
                    pipe.hgetall(self._rows_prefix + name)
                rows = await pipe.execute()
                return {name: CostTotals.from_redis(row) for name, row in zip(names, rows, strict=True)}

            fleet = await link.call(read)
            if fleet is not None:
                for name, delta in self._unsent().items():
                    fleet.setdefault(name, CostTotals()).add(delta)
                return {name: totals.to_json() for name, totals in sorted(fleet.items())}, "fleet"
        return {name: totals.to_json() for name, totals in sorted(self._local.items())}, "replica"

    def forget_confirmed(self) -> None:
        """See BatchWriter.forget_confirmed (the state was lost and is rebuilt from the receipts)."""
        if self._writer is not None:
            self._writer.forget_confirmed()

    def restore_commands(self, rows: dict[str, CostTotals]) -> list[Command]:
        """The commands that add `rows` (rebuilt from the receipts: cost_recovery.py) to the fleet
        totals, as a flush adds its deltas."""
        return self._increments(rows)

    def _increments(self, batch: dict[str, CostTotals]) -> list[Command]:
        commands: list[Command] = []
        for name, delta in batch.items():
            key = self._rows_prefix + name
            commands += [
                ("HINCRBY", key, field, value) for field in _INT_FIELDS if (value := getattr(delta, field))
            ]
            commands += [
                ("HINCRBYFLOAT", key, field, value)
                for field in _FLOAT_FIELDS
                if (value := getattr(delta, field))
            ]
            if delta.last_updated:
                commands.append(("HSET", key, "last_updated", delta.last_updated))
            commands.append(("SADD", self._index, name))
        return commands
