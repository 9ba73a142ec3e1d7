"""Daily spend budgets per model and per tenant, counted fleet-wide in Redis.

Spend is kept per UTC day under `dspy-service:v1:spend:<day>:<scope>:<name>` (INCRBYFLOAT, expiring
after 48 h). Budgets cap spend rather than notice it: before a cache miss goes upstream, `reserve`
holds the call's worst-case cost against every budget it counts against, in one atomic Redis script
that refuses it when any of them would go over (one round trip, as the check it replaces); when the
call ends, `settle` turns the hold into what the provider reported (the difference is sent like any
spend), releases it when nothing was sent, and keeps it whole when the spend is unknown (a call cut
off before its tokens were reported counts as spent at its reservation). So under any concurrency
the settled spend stays within the limit, as long as the worst case is an upper bound (predictor.py).

While Redis is down the last fleet figures seen plus this replica's own spend and holds decide, and
the unsent amounts are added when Redis returns; a send whose reply was lost is resent as it was,
under its token, so it is never counted twice (see redis_batches). A reservation whose reply was lost
is held locally too: if Redis did apply it, it is counted twice, on the safe side of the budget.
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from dspy_service.background import stop_task
from dspy_service.errors import BudgetExceeded
from dspy_service.logs import get_logger
from dspy_service.metrics import Metrics
from dspy_service.models_config import BudgetsConfig
from dspy_service.redis_batches import BatchWriter, Command
from dspy_service.redis_link import KEY_PREFIX, RedisLink

SPEND_EXPIRY_SECS = 48 * 3600
_DAY_SECS = 86_400

_log = get_logger("dspy_service.budgets")

# (scope, name, daily limit in USD)
_Limit = tuple[str, str, float]

# KEYS: the spend keys. ARGV: for each key its amount, then each limit, then each key's spend this
# replica has not sent yet, then the keys' expiry. Refuses ({index, spend}) when any key would go over
# its limit; else adds every amount ({0, totals...}). All or nothing: MULTI cannot branch on a read.
_RESERVE = """
local n = #KEYS
for i = 1, n do
  local spent = tonumber(redis.call('GET', KEYS[i]) or '0') + tonumber(ARGV[2 * n + i])
  if spent + tonumber(ARGV[i]) > tonumber(ARGV[n + i]) then
    return {i, tostring(spent)}
  end
end
local totals = {0}
for i = 1, n do
  totals[#totals + 1] = redis.call('INCRBYFLOAT', KEYS[i], ARGV[i])
  redis.call('EXPIRE', KEYS[i], ARGV[3 * n + 1])
end
return totals
"""


@dataclass(frozen=True, slots=True)
class Hold:
    """A reservation: USD held per spend key, and what each model's and the tenant's share was."""

    amounts: dict[str, float]  # Redis key -> USD held
    models: dict[str, str]  # Redis key -> model it counts (keys of tenant budgets are absent)
    budgets: tuple[_Limit, ...] = ()  # the (scope, name, limit) of each, for the spent-ratio gauge


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
        self._spend_prefix = (link.state_prefix if link is not None else KEY_PREFIX) + "spend:"
        self._metrics = metrics
        self._refresh_secs = refresh_secs
        self._clock = clock
        self._fleet: dict[str, float] = {}  # Redis key -> last fleet total seen
        self._pending: dict[str, float] = {}  # Redis key -> spend not yet sent to Redis
        self._writer = BatchWriter(link, "budgets", _increments) if link is not None else None
        self._reserve_script = link.client.register_script(_RESERVE) if link is not None else None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._refresh_task: asyncio.Task[None] | None = None
        self._stopping = False
        self._day = ""

    def __bool__(self) -> bool:
        return bool(self._models or self._tenants)

    def _key(self, scope: str, name: str) -> str:
        day = datetime.fromtimestamp(self._clock(), UTC).date().isoformat()
        if day != self._day:
            self._start_day(day)
        return f"{self._spend_prefix}{day}:{scope}:{name}"

    def _start_day(self, day: str) -> None:
        """A new UTC day: yesterday's figures go (unsent spend of yesterday is still sent)."""
        self._day = day
        self._fleet = {key: value for key, value in self._fleet.items() if f":{day}:" in key}

    def forget_confirmed(self) -> None:
        """See BatchWriter.forget_confirmed (the state was lost and is rebuilt from the receipts)."""
        if self._writer is not None:
            self._writer.forget_confirmed()

    def restore_commands(
        self, day: str, by_model: dict[str, float], by_tenant: dict[str, float]
    ) -> list[Command]:
        """The commands that add a day's spend (rebuilt from the receipts: cost_recovery.py) to the
        spend keys of the budgets there are, as any spend is added."""
        spend = {f"{self._spend_prefix}{day}:model:{name}": by_model.get(name, 0.0) for name in self._models}
        spend |= {
            f"{self._spend_prefix}{day}:tenant:{name}": by_tenant.get(name, 0.0) for name in self._tenants
        }
        return _increments({key: usd for key, usd in spend.items() if usd})

    def seconds_to_midnight(self) -> float:
        return _DAY_SECS - self._clock() % _DAY_SECS

    def spent(self, scope: str, name: str) -> float:
        """Today's spend as this replica knows it: the fleet's last figure plus what is not sent yet."""
        key = self._key(scope, name)
        return self._fleet.get(key, 0.0) + self._unsent(key)

    def _unsent(self, key: str) -> float:
        """What this replica has counted under `key` that Redis has not confirmed."""
        in_doubt = self._writer.in_doubt if self._writer is not None else None
        return self._pending.get(key, 0.0) + (in_doubt.get(key, 0.0) if in_doubt else 0.0)

    async def reserve(self, charges: dict[str, float], tenant: str | None) -> Hold | None:
        """Hold each model's worst-case cost (`charges`: model -> USD) against its budget and their
        sum against the tenant's; BudgetExceeded, holding nothing, if any would go over. None when
        no budget applies."""
        limits: list[tuple[str, str, float, float, str | None]] = []  # scope, name, limit, amount, model
        for model, usd in charges.items():
            if (model_limit := self._models.get(model)) is not None:
                limits.append(("model", model, model_limit, usd, model))
        if tenant is not None and (tenant_limit := self._tenants.get(tenant)) is not None:
            limits.append(("tenant", tenant, tenant_limit, sum(charges.values()), None))
        if not limits:
            return None
        keys = [self._key(scope, name) for scope, name, *_ in limits]
        amounts = [max(0.0, amount) for *_, amount, _ in limits]
        result = await self._reserve_in_redis(keys, amounts, [limit for _, _, limit, *_ in limits])
        if result is None:  # Redis away: this replica's view decides, and the hold is sent later
            for (scope, name, limit, _, _), amount in zip(limits, amounts, strict=True):
                if self._publish(scope, name, limit) + amount > limit:
                    self._refuse(scope, name, limit)
            for key, amount in zip(keys, amounts, strict=True):
                self._pending[key] = self._pending.get(key, 0.0) + amount
            self._send_soon()
        elif int(result[0]) != 0:
            index = int(result[0]) - 1
            scope, name, limit, _, _ = limits[index]
            self._see_fleet(keys[index], float(result[1]) - self._unsent(keys[index]))
            self._publish(scope, name, limit)
            self._refuse(scope, name, limit)
        else:
            for key, total in zip(keys, result[1:], strict=True):
                self._see_fleet(key, float(total))
        for scope, name, limit, *_ in limits:
            self._publish(scope, name, limit)
        return Hold(
            amounts=dict(zip(keys, amounts, strict=True)),
            models={key: model for key, (*_, model) in zip(keys, limits, strict=True) if model is not None},
            budgets=tuple((scope, name, limit) for scope, name, limit, *_ in limits),
        )

    async def _reserve_in_redis(
        self, keys: list[str], amounts: list[float], limits: list[float]
    ) -> list[Any] | None:
        link, script = self._link, self._reserve_script
        if link is None or script is None or not link.connected:
            return None
        in_doubt = self._writer.in_doubt if self._writer is not None else None
        unsent = [
            max(0.0, self._pending.get(k, 0.0) + (in_doubt.get(k, 0.0) if in_doubt else 0.0)) for k in keys
        ]
        args: list[float | int] = [*amounts, *limits, *unsent, SPEND_EXPIRY_SECS]

        async def run(client: Any) -> list[Any]:
            result: list[Any] = await script(keys=keys, args=args, client=client)
            return result

        return await link.call(run)

    def _refuse(self, scope: str, name: str, limit: float) -> None:
        raise BudgetExceeded(
            f"the daily budget of {scope} {name!r} ({limit:g} USD) is spent, or too little of it is "
            "left for this request's worst-case cost; cached answers are still served",
            retry_after=self.seconds_to_midnight(),
        )

    def settle(self, hold: Hold | None, spent: dict[str, float], *, unknown: bool) -> None:
        """Turn a hold into what was spent (`spent`: model -> USD): the difference goes to Redis like
        any spend. With `unknown` (a call cut off before its tokens were reported) nothing of the
        hold is given back: unknown spend counts as spent."""
        if hold is None:
            return
        for key, held in hold.amounts.items():
            model = hold.models.get(key)
            actual = spent.get(model, 0.0) if model is not None else sum(spent.values())
            delta = max(0.0, actual - held) if unknown else actual - held
            if delta:
                self._pending[key] = self._pending.get(key, 0.0) + delta
        for scope, name, limit in hold.budgets:
            self._publish(scope, name, limit)  # the gauge shows the settled figure, not the hold
        self._send_soon()

    def _send_soon(self) -> None:
        if self._link is not None:
            task = asyncio.get_running_loop().create_task(self.flush(), context=contextvars.Context())
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
        # A day's total falls as well as rises (a settled hold gives back what was not spent): the
        # latest figure Redis gave is the one to trust. Decisions are Redis's own (the reserve script).
        self._fleet[key] = total

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
        while not self._stopping:
            await self.refresh()
            await asyncio.sleep(self._refresh_secs)

    async def close(self) -> None:
        self._stopping = True
        await stop_task(self._refresh_task)
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
