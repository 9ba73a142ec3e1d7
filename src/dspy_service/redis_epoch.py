"""Noticing a state Redis that came back empty.

A Redis restarted without persistence, or a failover to a stale replica, answers as if nothing had
happened, and the fleet's cost totals and budget spend are silently gone (a 60 s outage with a
restart left `/costs` counting 86k requests of 168k served). The state Redis therefore keeps an
epoch marker: the time its counters began, written once (SET NX) by the first replica that finds it
missing. A replica that saw one epoch and later finds another (or none) knows the state was lost:
it logs `redis.state_lost`, counts it, and `/costs` says since when its totals count.

The marker is checked when Redis comes back after an outage, and before each cost flush,
so that a state emptied under a live connection (FLUSHALL, a failover the client did not notice) is
seen within one flush interval, and before this replica's next flush lands in it.

An epoch this replica saw begin (it noticed the loss, or it wrote the first marker) is handed to the
`on_begun` listeners (cost_recovery.py rebuilds the totals from the receipts) at each check until
the state carries `rebuilt:<epoch>` (a listener elsewhere in the fleet may have written it): the time
from which the rebuilt totals count, which `since` then reports (X-Costs-Since) instead of the epoch.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from dspy_service.logs import get_logger
from dspy_service.metrics import Metrics
from dspy_service.redis_link import RedisLink
from dspy_service.timefmt import utc_now_iso

_log = get_logger("dspy_service.redis_epoch")

EpochListener = Callable[[str], Awaitable[None]]  # hears an epoch this replica saw begin


def epoch_key(link: RedisLink) -> str:
    return link.state_prefix + "epoch"


def rebuilt_key(link: RedisLink, epoch: str) -> str:
    """Where the state says that epoch's totals were rebuilt, and from when they count."""
    return f"{link.state_prefix}rebuilt:{epoch}"


class StateEpoch:
    def __init__(self, link: RedisLink, metrics: Metrics) -> None:
        self._link = link
        self.key = epoch_key(link)
        self._metrics = metrics
        self.marker: str | None = None  # the epoch marker last read: when the state's counters began
        self.since: str | None = None  # when the fleet totals count from (the marker, or the rebuild's)
        self._begun: str | None = None  # an epoch this replica saw begin, not yet rebuilt
        self._listeners: list[EpochListener] = []

    def on_begun(self, listener: EpochListener) -> None:
        """Call `listener(epoch)` at each check while an epoch this replica saw begin is not rebuilt."""
        self._listeners.append(listener)

    async def check(self) -> None:
        """Read (or start) the epoch; a change from the one seen before is a lost state."""

        async def read_or_start(client: Any) -> tuple[bool, Any, Any]:
            # One command at a time, not a pipeline: redis-py's cluster pipelines do not follow the
            # ASK and TRYAGAIN replies of a slot being migrated (the state's slot may be).
            started = await client.set(self.key, utc_now_iso(), nx=True)
            raw = await client.get(self.key)
            rebuilt = await client.get(rebuilt_key(self._link, _text(raw))) if raw is not None else None
            return bool(started), raw, rebuilt

        read = await self._link.call(read_or_start)
        if read is None or read[1] is None:
            return  # Redis away (or the marker gone again between the two commands): nothing learned
        started, raw, rebuilt = read
        epoch = _text(raw)
        if self.marker is not None and epoch != self.marker:
            self._metrics.redis_state_lost.inc()
            _log.error(
                "redis.state_lost",
                previous_epoch=self.marker,
                epoch=epoch,
                detail="the state Redis came back without its data (a restart without persistence, or "
                "a failover to a stale replica): fleet cost totals and today's budget spend count again "
                "from now (rebuilt from the receipts where they are kept, FEEDBACK_ENABLED). Give it AOF "
                "persistence and maxmemory-policy noeviction.",
            )
            self._begun = epoch
        elif started:
            self._begun = epoch  # the first marker: any spend before it is only in the receipts
        self.marker = epoch
        if rebuilt is not None:
            self.since = min(_text(rebuilt), epoch)
            if self._begun == epoch:
                self._begun = None
            return
        self.since = epoch
        if self._begun == epoch:
            for listener in self._listeners:
                await listener(epoch)  # quick: a rebuild runs in a task of its own


def _text(raw: Any) -> str:
    return raw.decode() if isinstance(raw, bytes) else str(raw)
