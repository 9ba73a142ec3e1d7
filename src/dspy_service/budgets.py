"""Daily spend budgets per model and per tenant, counted fleet-wide in Redis.

Spend is kept per UTC day under `dspy-service:v1:spend:<day>:<scope>:<name>` (INCRBYFLOAT, expiring
after 48 h). `check` reads the fleet's figures (one MGET) before a cache miss goes upstream and
refuses it once a budget is spent; `record` adds a call's cost locally at once and to Redis right
after. While Redis is down the last fleet figures seen plus this replica's own spend decide, and the
unsent spend is added when Redis returns; a send whose reply was lost is resent as it was, under its
token, so it is never counted twice (see redis_batches). Requests already in flight when a budget
runs out may overshoot it by their own cost.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from dspy_service.errors import BudgetExceeded
from dspy_service.logs import get_logger
from dspy_service.metrics import Metrics
from dspy_service.models_config import BudgetsConfig
from dspy_service.redis_batches import BatchWriter, Command
from dspy_service.redis_link import KEY_PREFIX, RedisLink

SPEND_PREFIX = KEY_PREFIX + "spend:"
SPEND_EXPIRY_SECS = 48 * 3600
_DAY_SECS = 86_400

_log = get_logger("dspy_service.budgets")

# (scope, name, daily limit in USD)
_Limit = tuple[str, str, float]


class Budgets:
    def __init__(
        self,
        config: BudgetsConfig,
        link: RedisLink | None,
        metrics: Metrics,
        *,
        refresh_secs: float = 10.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._models = {name: limit.daily_usd for name, limit in config.models.items()}
        self._tenants = {name: limit.daily_usd for name, limit in config.tenants.items()}
        self._link = link
        self._metrics = metrics
        self._refresh_secs = refresh_secs
        self._clock = clock
        self._fleet: dict[str, float] = {}  # Redis key -> last fleet total seen
        self._pending: dict[str, float] = {}  # Redis key -> spend not yet sent to Redis
        self._writer = BatchWriter(link, "budgets", _increments) if link is not None else None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._refresh_task: asyncio.Task[None] | None = None
        self._day = ""

    def __bool__(self) -> bool:
        return bool(self._models or self._tenants)

    def _limits(self, model: str, tenant: str | None) -> list[_Limit]:
        limits = []
        if (model_limit := self._models.get(model)) is not None:
            limits.append(("model", model, model_limit))
        if tenant is not None and (tenant_limit := self._tenants.get(tenant)) is not None:
            limits.append(("tenant", tenant, tenant_limit))
        return limits

    def _key(self, scope: str, name: str) -> str:
        day = datetime.fromtimestamp(self._clock(), UTC).date().isoformat()
        if day != self._day:
            self._start_day(day)
        return f"{SPEND_PREFIX}{day}:{scope}:{name}"

    def _start_day(self, day: str) -> None:
        """A new UTC day: yesterday's figures go (unsent spend of yesterday is still sent)."""
        self._day = day
        self._fleet = {key: value for key, value in self._fleet.items() if f":{day}:" in key}

    def seconds_to_midnight(self) -> float:
        return _DAY_SECS - self._clock() % _DAY_SECS

    def spent(self, scope: str, name: str) -> float:
        """Today's spend as this replica knows it: the fleet's last figure plus what is not sent yet."""
        key = self._key(scope, name)
        in_doubt = self._writer.in_doubt if self._writer is not None else None
        unsent = self._pending.get(key, 0.0) + (in_doubt.get(key, 0.0) if in_doubt else 0.0)
        return self._fleet.get(key, 0.0) + unsent

    async def check(self, model: str, tenant: str | None) -> None:
        """Raise BudgetExceeded when the model's or the tenant's budget for today is spent."""
        limits = self._limits(model, tenant)
        if not limits:
            return
        await self._read_fleet([self._key(scope, name) for scope, name, _ in limits])
        for scope, name, limit in limits:
            spent = self._publish(scope, name, limit)
            if spent >= limit:
                raise BudgetExceeded(
                    f"the daily budget of {scope} {name!r} ({limit:g} USD) is spent; "
                    "cached answers are still served",
                    retry_after=self.seconds_to_midnight(),
                )

    def record(self, model: str, tenant: str | None, usd: float | None) -> None:
        """Add a call's cost to every budget it counts against; sent to Redis right away."""
        if not usd or usd <= 0:
            return
        limits = self._limits(model, tenant)
        for scope, name, limit in limits:
            key = self._key(scope, name)
            self._pending[key] = self._pending.get(key, 0.0) + usd
            self._publish(scope, name, limit)
        if limits and self._link is not None:
            task = asyncio.get_running_loop().create_task(self.flush())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _publish(self, scope: str, name: str, limit: float) -> float:
        spent = self.spent(scope, name)
        self._metrics.budget_spent_ratio.labels(scope, name).set(spent / limit)
        return spent

    async def _read_fleet(self, keys: list[str]) -> None:
        link = self._link
        if link is None or not link.connected:
            return
        values = await link.call(lambda client: client.mget(keys))
        if values is not None:
            for key, value in zip(keys, values, strict=True):
                self._see_fleet(key, float(value) if value is not None else 0.0)

    def _see_fleet(self, key: str, total: float) -> None:
        # A day's total only grows: a read that raced a later write must not lower it.
        self._fleet[key] = max(self._fleet.get(key, 0.0), total)

    async def flush(self) -> bool:
        """Add unsent spend to Redis (INCRBYFLOAT and EXPIRE, atomically); True when nothing is left.

        Spend counts in `spent` until Redis has confirmed it, so a check meanwhile counts it (perhaps
        twice, for a moment: the safe side of a budget), never not at all.
        """
        if self._writer is None:
            return True
        return await self._writer.flush(self._take_pending, self._applied) and not self._pending

    def _take_pending(self) -> dict[str, float] | None:
        batch, self._pending = self._pending, {}
        return batch or None

    async def _applied(self, batch: dict[str, float], replies: list[Any] | None) -> None:
        if replies is None:  # applied by an earlier send, whose totals we never saw
            await self._read_fleet(list(batch))
        else:
            for key, total in zip(batch, replies[::2], strict=True):
                self._see_fleet(key, float(total))

    async def refresh(self) -> None:
        """Send unsent spend and re-read every budget's figure, so the gauges are right even on an idle
        replica and drop to zero after midnight."""
        await self.flush()
        limits = [("model", name, limit) for name, limit in self._models.items()]
        limits += [("tenant", name, limit) for name, limit in self._tenants.items()]
        await self._read_fleet([self._key(scope, name) for scope, name, _ in limits])
        for scope, name, limit in limits:
            self._publish(scope, name, limit)

    def start(self) -> None:
        if not self:
            return
        if self._link is not None:
            self._link.on_reconnect(self._refresh_after_outage)
        self._refresh_task = asyncio.get_running_loop().create_task(self._refresh_forever(), name="budgets")

    async def _refresh_after_outage(self) -> None:
        await self.refresh()

    async def _refresh_forever(self) -> None:
        while True:
            await self.refresh()
            await asyncio.sleep(self._refresh_secs)

    async def close(self) -> None:
        if self._refresh_task is not None:
            self._refresh_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresh_task
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if not await self.flush():
            in_doubt = self._writer.in_doubt if self._writer is not None else None
            unsent = set(self._pending) | set(in_doubt or ())
            _log.warning("budgets.unflushed", entries=len(unsent), detail="Redis unreachable")


def _increments(batch: dict[str, float]) -> list[Command]:
    commands: list[Command] = []
    for key, usd in batch.items():
        commands += [("INCRBYFLOAT", key, usd), ("EXPIRE", key, SPEND_EXPIRY_SECS)]
    return commands
