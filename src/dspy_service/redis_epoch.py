"""Noticing a state Redis that came back empty.

A Redis restarted without persistence, or a failover to a stale replica, answers as if nothing had
happened, and the fleet's cost totals and budget spend are silently gone (a 60 s outage with a
restart left `/costs` counting 86k requests of 168k served). The state Redis therefore keeps an
epoch marker: the time its counters began, written once (SET NX) by the first replica that finds it
missing. A replica that saw one epoch and later finds another (or none) knows the state was lost:
it logs `redis.state_lost`, counts it, and `/costs` says since when its totals count.
"""

from __future__ import annotations

from typing import Any

from dspy_service.logs import get_logger
from dspy_service.metrics import Metrics
from dspy_service.redis_link import RedisLink
from dspy_service.timefmt import utc_now_iso

_log = get_logger("dspy_service.redis_epoch")


class StateEpoch:
    def __init__(self, link: RedisLink, metrics: Metrics) -> None:
        self._link = link
        self._key = link.state_prefix + "epoch"
        self._metrics = metrics
        self.since: str | None = None  # when the state Redis's counters began, as far as we know

    async def check(self) -> None:
        """Read (or start) the epoch; a change from the one seen before is a lost state."""

        async def read_or_start(client: Any) -> Any:
            await client.set(self._key, utc_now_iso(), nx=True)
            return await client.get(self._key)

        raw = await self._link.call(read_or_start)
        if raw is None:
            return  # Redis away: nothing learned
        epoch = raw.decode() if isinstance(raw, bytes) else str(raw)
        if self.since is not None and epoch != self.since:
            self._metrics.redis_state_lost.inc()
            _log.error(
                "redis.state_lost",
                previous_epoch=self.since,
                epoch=epoch,
                detail="the state Redis came back without its data (a restart without persistence, or "
                "a failover to a stale replica): fleet cost totals and today's budget spend count again "
                "from now. Give it AOF persistence and maxmemory-policy noeviction.",
            )
        self.since = epoch
