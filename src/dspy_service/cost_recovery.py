"""Fleet cost totals and today's budget spend rebuilt from the receipts when the state Redis lost them.

When the state Redis comes back empty (redis_epoch.py: `redis.state_lost`; or the very first epoch
marker written while receipts exist, as after the whole fleet and Redis restarted together), `/costs`
and the budgets' spend keys start again from zero. Every prediction's receipt is in the records
database (FEEDBACK_ENABLED), so the receipts made before the new epoch are added to the new state:

- Once for the fleet. Every replica that saw the epoch begin asks; the first to SET NX the claim
  `rebuild-claim:<epoch>` (a lease of CLAIM_SECS) rebuilds, the others leave it. The increments go in
  one Lua script that also checks the epoch marker is still the one rebuilt for, does nothing when
  `rebuilt:<epoch>` is there, and writes it with the increments: a resend after a lost reply, or a
  second replica whose lease began after the first's ran out, adds nothing twice. A rebuild that
  fails (the database down) lets its claim go and is tried again, with backoff, at later checks.
- Before the epoch only: what the fleet counted after it reaches the new state by the normal flushes.
- In the state's one hash slot (`link.state_prefix`), with the commands the ACL list allows.
- `rebuilt:<epoch>` holds when the totals now count from: the oldest receipt added (the retention
  keeps RECORDS_RETENTION_DAYS), or the epoch when there was none. `/costs` says so (X-Costs-Since).

What stays inexact:
- Spend a replica had counted but not yet flushed when the state went, and what it counted before it
  noticed (the epoch is checked before each cost flush, and a budget's spend is sent at once): its
  receipts are older than the epoch and its deltas reach the new state by the normal flush, so it is
  counted twice; at most about one COSTS_FLUSH_INTERVAL_SECS of each replica's traffic (more if Redis
  was unreachable for a while before it came back empty). Twice, for a budget, is its safe side.
- Receipts still queued in a replica's writer when the rebuild reads (it waits RECEIPTS_SETTLE_SECS
  after the epoch first), or dropped (the database down): their spend from before the loss is lost.
- A budget hold taken before the loss and settled after it: the settlement gives back, from a state
  that never had the hold, what the call did not spend (today's spend is low by that much).
- Clocks: replicas' receipt times are compared with the epoch of the replica that wrote it.
- A state Redis that evicts keys (any maxmemory-policy but noeviction) may drop the epoch marker
  alone: the counters are still there, and the receipts are added to them a second time.
- What no receipt knows (records/costs_rebuild.py): spend older than the retention, tokens a
  synchronous program reported after its request ended, holds kept for calls of unknown spend.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import time
import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError

from dspy_service.budgets import Budgets
from dspy_service.costs import CostLedger, CostTotals, rows_of
from dspy_service.logs import get_logger
from dspy_service.records import RecordStore
from dspy_service.records.costs_rebuild import DaySpend, rebuild_cost_totals, spend_today
from dspy_service.records.schema import ReceiptRow
from dspy_service.redis_batches import Command
from dspy_service.redis_epoch import epoch_key, rebuilt_key
from dspy_service.redis_link import RedisLink

_log = get_logger("dspy_service.cost_recovery")

CLAIM_SECS = 300  # a rebuild reads every receipt kept: minutes at worst, for a month of heavy traffic
# Receipts are written in batches at least every second (records/writer.py): those of requests made
# just before the epoch are in the database this long after it.
RECEIPTS_SETTLE_SECS = 2.0
_RETRY_MIN_SECS = 5.0
_RETRY_MAX_SECS = 60.0
_FLUSH_OWN_SECS = 5.0
_DB_FAILURES = (SQLAlchemyError, OSError, TimeoutError)

# KEYS: the epoch marker, `rebuilt:<epoch>`, then each command's key. ARGV: the epoch, when the totals
# count from, then for each command its count of further arguments, its name and those arguments
# (as redis_batches' script). HSETNEWER key field value: HSET unless the hash has a later value
# (the fleet's last_updated since the loss is newer than any receipt before it). Returns 1 when
# applied, 0 when this epoch was rebuilt already, -1 when the epoch is no longer the current one.
_RESTORE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return -1
end
if redis.call('GET', KEYS[2]) then
  return 0
end
local i = 3
for k = 3, #KEYS do
  local count = tonumber(ARGV[i])
  local name = ARGV[i + 1]
  if name == 'HSETNEWER' then
    local all = redis.call('HGETALL', KEYS[k])
    local current = nil
    for j = 1, #all, 2 do
      if all[j] == ARGV[i + 2] then current = all[j + 1] end
    end
    if not current or current < ARGV[i + 3] then
      redis.call('HSET', KEYS[k], ARGV[i + 2], ARGV[i + 3])
    end
  else
    redis.call(name, KEYS[k], unpack(ARGV, i + 2, i + 1 + count))
  end
  i = i + count + 2
end
redis.call('SET', KEYS[2], ARGV[2])
return 1
"""


def parse_epoch(epoch: str) -> datetime:
    """An epoch marker (`2025-01-02T03:04:05.678Z`) as an aware datetime."""
    return datetime.fromisoformat(epoch.replace("Z", "+00:00")).astimezone(UTC)


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="milliseconds")[:-6] + "Z"


class CostRecovery:
    """Hears of each epoch this replica saw begin (StateEpoch.on_begun) and rebuilds it, once."""

    def __init__(
        self,
        link: RedisLink,
        store: RecordStore,
        ledger: CostLedger,
        budgets: Budgets | None,
        *,
        settle_secs: float = RECEIPTS_SETTLE_SECS,
    ) -> None:
        self._link = link
        self._store = store
        self._ledger = ledger
        self._budgets = budgets
        self._settle = settle_secs
        self._epoch_key = epoch_key(link)
        self._script = link.client.register_script(_RESTORE)
        self._task: asyncio.Task[None] | None = None
        self._not_before = 0.0  # monotonic time of the next attempt after a failed one
        self._delay = _RETRY_MIN_SECS
        self._seen: str | None = None  # the last epoch heard of

    async def epoch_begun(self, epoch: str) -> None:
        """Start rebuilding `epoch` in the background unless a rebuild runs or waits to be retried
        (the epoch check, which calls this, runs before each cost flush and must not wait for it)."""
        if epoch != self._seen:
            # The apply-once writers send the batches Redis confirmed lately again when they find
            # their last one missing (a failover's rollback); after a loss of the whole state the
            # receipts bring those back, so sending them too would count them twice.
            self._seen = epoch
            self._ledger.forget_confirmed()
            if self._budgets is not None:
                self._budgets.forget_confirmed()
        if (self._task is not None and not self._task.done()) or time.monotonic() < self._not_before:
            return
        self._task = asyncio.get_running_loop().create_task(
            self._rebuild(epoch), name="cost-recovery", context=contextvars.Context()
        )

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _rebuild(self, epoch: str) -> None:
        try:
            done = await self.rebuild(epoch)
        except Exception:  # never let a bug here take anything else down: log it, try again later
            _log.exception("costs.rebuild_failed", epoch=epoch)
            done = False
        if done:
            self._delay = _RETRY_MIN_SECS
        else:
            self._not_before = time.monotonic() + self._delay
            self._delay = min(self._delay * 2, _RETRY_MAX_SECS)

    async def rebuild(self, epoch: str) -> bool:
        """Claim and rebuild `epoch`; True when nothing is left to do for it here (rebuilt, by us or
        by another replica, or no longer the current epoch)."""
        until = parse_epoch(epoch)
        wait = until.timestamp() + self._settle - time.time()
        if wait > 0:
            await asyncio.sleep(wait)
        token = uuid.uuid4().hex
        claim = f"{self._link.state_prefix}rebuild-claim:{epoch}"

        async def take(client: Any) -> bool:
            return bool(await client.set(claim, token, nx=True, ex=CLAIM_SECS))  # None when held

        claimed = await self._link.call(take)
        if claimed is None:
            return False  # Redis away: tried again later
        if not claimed:  # another replica rebuilds it; should it die, its lease runs out and we retry
            return True
        await self._store.writer.flush(_FLUSH_OWN_SECS)  # this replica's own receipts of before it
        started = time.monotonic()
        try:
            rows, day, oldest = await self._read(until)
        except _DB_FAILURES as exc:
            _log.warning(
                "costs.rebuild_postponed",
                epoch=epoch,
                error=type(exc).__name__,
                detail="the records database did not answer; tried again later",
            )
            await self._release(claim)
            return False
        since = min(_iso(oldest), epoch) if oldest is not None else epoch
        # A row's last_updated is only set where the fleet has none later (counted since the loss).
        commands = [
            ("HSETNEWER", *rest) if name == "HSET" else (name, *rest)
            for name, *rest in self._ledger.restore_commands(rows)
        ]
        if self._budgets is not None:
            commands += self._budgets.restore_commands(day.day, day.by_model, day.by_tenant)
        applied = await self._apply(epoch, since, commands)
        if applied is None:  # perhaps applied, its reply lost: the retry finds rebuilt:<epoch> then
            await self._release(claim)
            return False
        if applied == 1:
            fleet_rows = rows_of(rows, None)  # the service-wide rows, not the tenants' own
            _log.warning(
                "costs.rebuilt",
                epoch=epoch,
                since=since,
                rows=len(rows),
                requests=sum(row.total_requests for row in fleet_rows.values()),
                cost_usd=round(sum(row.total_cost_usd for row in fleet_rows.values()), 10),
                seconds=round(time.monotonic() - started, 3),
                detail="fleet cost totals and today's budget spend rebuilt from the receipts made "
                "before the state Redis came back empty",
            )
            if self._budgets is not None:
                await self._budgets.refresh()
        return True

    async def _release(self, claim: str) -> None:
        """Let the claim go within a second, so that the next attempt (ours or another replica's) may
        take it (with a plain SET: DEL is not among the commands the ACL list allows)."""
        await self._link.call(lambda client: client.set(claim, "released", ex=1))

    async def _read(self, until: datetime) -> tuple[dict[str, CostTotals], DaySpend, datetime | None]:
        """The /costs rows and today's spend from the receipts made before `until`, and the oldest."""
        engine = self._store.engine
        rows = {
            name: CostTotals(**row) for name, row in (await rebuild_cost_totals(engine, until=until)).items()
        }
        day = await spend_today(engine, until, until_now=True)
        async with engine.connect() as connection:
            oldest = (
                await connection.execute(
                    select(func.min(ReceiptRow.created_at)).where(ReceiptRow.created_at < until)
                )
            ).scalar()
        return rows, day, _aware(oldest)

    async def _apply(self, epoch: str, since: str, commands: list[Command]) -> int | None:
        keys = [self._epoch_key, rebuilt_key(self._link, epoch)]
        args: list[str | int | float] = [epoch, since]
        for name, key, *rest in commands:
            keys.append(str(key))
            args += [len(rest), name, *rest]

        async def run(client: Any) -> int:
            return int(await self._script(keys=keys, args=args, client=client))

        return await self._link.call(run)


def _aware(moment: datetime | None) -> datetime | None:
    """min() over the schema's UtcDateTime column comes back raw (SQLite: a naive UTC string)."""
    if moment is None:
        return None
    if isinstance(moment, str):
        moment = datetime.fromisoformat(moment)
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
