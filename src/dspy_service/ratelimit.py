"""Request rate limits shared by every replica: a sliding-window counter in Redis.

Each identity (an API key's tenant or key id, else a client address) has one counter per fixed
window in Redis; a request adds one to the current window's counter (INCR and EXPIRE in one
pipeline, together with a GET of the previous window: one round trip) and is allowed while

    previous * (share of the previous window still inside the sliding window) + current <= limit.

Counts asked for during one turn of the event loop go to Redis as one pipeline (as the cache's
lookups do): a burst of requests takes one connection and one round trip per turn, not one each,
so it cannot drain the connection pool.

Refused requests count too, so a client that ignores `Retry-After` stays refused. While Redis is down
(or not configured) each process counts on its own, with the same rule: the limit then holds per
process, not per fleet.
"""

from __future__ import annotations

import asyncio
import contextvars
import math
import time
from collections.abc import Callable
from typing import Any

from dspy_service.logs import get_logger
from dspy_service.redis_link import KEY_PREFIX, RedisLink

# Local counters keep at most this many identities per window; beyond it they start again from zero.
_LOCAL_MAX_IDENTITIES = 100_000
_EPSILON = 1e-9  # the weighted count is a float: a request exactly at the limit must not fail on rounding

_log = get_logger("dspy_service.ratelimit")

# A count waiting for the next pipeline: the current and previous windows' keys, how many requests it
# adds, and where the counts go.
_Waiting = tuple[str, str, int, "asyncio.Future[tuple[int, int] | None]"]


class RateLimiter:
    def __init__(
        self,
        link: RedisLink | None,
        *,
        limit: int,
        period_secs: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.limit = limit
        self.period = period_secs
        self._link = link
        self._prefix = (link.prefix if link is not None else KEY_PREFIX) + "ratelimit:"
        self._clock = clock
        self._window = 0
        self._current: dict[str, int] = {}
        self._previous: dict[str, int] = {}
        self._waiting: list[_Waiting] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def hit(self, identity: str, weight: int = 1) -> float | None:
        """Count `weight` requests of `identity` (a batch counts its items): None when they are
        allowed, else seconds until one more would be."""
        now = self._clock()
        window = int(now // self.period)
        elapsed = (now - window * self.period) / self.period
        local_current, local_previous = self._count_locally(identity, window, weight)
        counts = await self._count_in_redis(identity, window, weight)
        current, previous = counts if counts is not None else (local_current, local_previous)
        if previous * (1 - elapsed) + current <= self.limit + _EPSILON:
            return None
        return self._retry_after(current, previous, elapsed)

    async def _count_in_redis(self, identity: str, window: int, weight: int) -> tuple[int, int] | None:
        link = self._link
        if link is None or not link.connected:
            return None
        loop = asyncio.get_running_loop()
        future: asyncio.Future[tuple[int, int] | None] = loop.create_future()
        if not self._waiting:
            loop.call_soon(self._send_batch)
        self._waiting.append(
            (f"{self._prefix}{identity}:{window}", f"{self._prefix}{identity}:{window - 1}", weight, future)
        )
        return await future

    def _send_batch(self) -> None:
        batch, self._waiting = self._waiting, []
        task = asyncio.get_running_loop().create_task(self._count_batch(batch), context=contextvars.Context())
        self._tasks.add(task)  # keep a reference until it is done
        task.add_done_callback(self._tasks.discard)

    async def _count_batch(self, batch: list[_Waiting]) -> None:
        assert self._link is not None
        expiry = 2 * self.period + 1

        async def count(client: Any) -> list[Any]:
            pipe = client.pipeline(transaction=False)
            for current_key, previous_key, weight, _ in batch:
                pipe.incrby(current_key, weight)
                pipe.expire(current_key, expiry)
                pipe.get(previous_key)
            result: list[Any] = await pipe.execute(raise_on_error=False)
            return result

        replies: list[Any] | None = None
        try:
            replies = await self._link.call(count)
        finally:
            for n, (_, _, _, future) in enumerate(batch):
                if future.done():
                    continue
                counted = replies[3 * n : 3 * n + 3] if replies is not None else None
                if counted is None or any(isinstance(reply, Exception) for reply in counted):
                    if counted is not None:  # Redis refused this identity's commands (WRONGTYPE ...)
                        error = next(reply for reply in counted if isinstance(reply, Exception))
                        self._link.command_failed(error)
                    future.set_result(None)
                else:
                    future.set_result((int(counted[0]), int(counted[2] or 0)))

    def _count_locally(self, identity: str, window: int, weight: int = 1) -> tuple[int, int]:
        if window != self._window:
            self._previous = self._current if window == self._window + 1 else {}
            self._current = {}
            self._window = window
        elif len(self._current) >= _LOCAL_MAX_IDENTITIES and identity not in self._current:
            _log.warning("ratelimit.local_reset", identities=len(self._current))
            self._current = {}
        current = self._current[identity] = self._current.get(identity, 0) + weight
        return current, self._previous.get(identity, 0)

    def _retry_after(self, current: int, previous: int, elapsed: float) -> float:
        """Seconds until one more request would fit, if nothing else arrives meanwhile."""
        if current + 1 <= self.limit and previous > 0:
            # Within this window, once enough of the previous window has slid out.
            share = 1 - (self.limit - current - 1) / previous
            wait = (share - elapsed) * self.period
        else:
            # In the next window, where this window becomes the previous one.
            share = max(0.0, 1 - (self.limit - 1) / current)
            wait = (1 - elapsed + share) * self.period
        return float(max(1, math.ceil(wait)))
