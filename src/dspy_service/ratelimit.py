"""Request rate limits shared by every replica: a sliding-window counter in Redis.

Each identity (an API key's tenant or key id, else a client address) has one counter per fixed
window in Redis; a request adds one to the current window's counter (INCR and EXPIRE in one
pipeline, together with a GET of the previous window: one round trip) and is allowed while

    previous * (share of the previous window still inside the sliding window) + current <= limit.

Refused requests count too, so a client that ignores `Retry-After` stays refused. While Redis is down
(or not configured) each process counts on its own, with the same rule: the limit then holds per
process, not per fleet.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

from dspy_service.logs import get_logger
from dspy_service.redis_link import KEY_PREFIX, RedisLink

RATE_PREFIX = KEY_PREFIX + "ratelimit:"
# Local counters keep at most this many identities per window; beyond it they start again from zero.
_LOCAL_MAX_IDENTITIES = 100_000
_EPSILON = 1e-9  # the weighted count is a float: a request exactly at the limit must not fail on rounding

_log = get_logger("dspy_service.ratelimit")


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
        self._clock = clock
        self._window = 0
        self._current: dict[str, int] = {}
        self._previous: dict[str, int] = {}

    async def hit(self, identity: str) -> float | None:
        """Count one request of `identity`: None when it is allowed, else seconds until one would be."""
        now = self._clock()
        window = int(now // self.period)
        elapsed = (now - window * self.period) / self.period
        local_current, local_previous = self._count_locally(identity, window)
        counts = await self._count_in_redis(identity, window)
        current, previous = counts if counts is not None else (local_current, local_previous)
        if previous * (1 - elapsed) + current <= self.limit + _EPSILON:
            return None
        return self._retry_after(current, previous, elapsed)

    async def _count_in_redis(self, identity: str, window: int) -> tuple[int, int] | None:
        link = self._link
        if link is None or not link.connected:
            return None
        current_key = f"{RATE_PREFIX}{identity}:{window}"
        previous_key = f"{RATE_PREFIX}{identity}:{window - 1}"
        expiry = 2 * self.period + 1

        async def count(client: Any) -> list[Any]:
            pipe = client.pipeline(transaction=False)
            pipe.incr(current_key)
            pipe.expire(current_key, expiry)
            pipe.get(previous_key)
            result: list[Any] = await pipe.execute()
            return result

        replies = await link.call(count)
        if replies is None:
            return None
        return int(replies[0]), int(replies[2] or 0)

    def _count_locally(self, identity: str, window: int) -> tuple[int, int]:
        if window != self._window:
            self._previous = self._current if window == self._window + 1 else {}
            self._current = {}
            self._window = window
        elif len(self._current) >= _LOCAL_MAX_IDENTITIES and identity not in self._current:
            _log.warning("ratelimit.local_reset", identities=len(self._current))
            self._current = {}
        current = self._current[identity] = self._current.get(identity, 0) + 1
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
