"""The one Redis connection of a process, and whether Redis is answering right now.

Redis is a cache here, never a dependency: every operation has a short timeout, a connection failure
or a timeout marks the link down, and while it is down no request waits on Redis at all. A background
probe pings it with backoff and marks it up again when it answers, so the service heals without a
restart.

Not every failure is an outage. A command Redis refuses (OOM under `maxmemory`, WRONGTYPE, a script
error) fails that one operation open and is counted (`dspy_redis_command_errors_total`); the link
stays up. A burst that wants more connections than the pool has waits for one, within the
operation's timeout, instead of failing: operations take one of `max_connections` slots first, and
one that cannot get a slot in time is given up (counted as `pool_busy`), never taken for a dead Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from dspy_service.logs import get_logger
from dspy_service.metrics import Metrics

T = TypeVar("T")

KEY_PREFIX = "dspy-service:v1:"


def key_prefix(namespace: str) -> str:
    """`dspy-service:v1:<namespace>:`, the namespace (SERVICE_NAME) made safe for a key."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", namespace)[:64]
    return f"{KEY_PREFIX}{safe}:" if safe else KEY_PREFIX


REDIS_FAILURES = (RedisError, OSError, TimeoutError)
# The failures that say Redis is unreachable (rather than refusing one command).
_OUTAGES = (RedisConnectionError, RedisTimeoutError, OSError, TimeoutError)
MAX_CONNECTIONS = 64
_LOG_EVERY_SECS = 60.0

_log = get_logger("dspy_service.redis")


class RedisLink:
    """A Redis client with a known up/down state and fail-fast calls while down."""

    def __init__(
        self,
        url: str,
        *,
        timeout: float,
        metrics: Metrics,
        redacted_url: str,
        role: str = "state",
        namespace: str = "",
        probe_min_secs: float = 0.5,
        probe_max_secs: float = 5.0,
    ) -> None:
        self.client: aioredis.Redis = aioredis.Redis.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0),
            max_connections=MAX_CONNECTIONS,
        )
        self._slots = asyncio.Semaphore(MAX_CONNECTIONS)  # one per pooled connection
        self._last_logged: dict[str, float] = {}  # command error kind -> when it was last logged
        self.timeout = timeout
        self.connected = False
        self._metrics = metrics
        self._redacted_url = redacted_url
        self._probe_min = probe_min_secs
        self._probe_max = probe_max_secs
        self._probe_task: asyncio.Task[None] | None = None
        self._closed = False
        self._listeners: list[Callable[[], Awaitable[None]]] = []
        self.role = role  # "state" (REDIS_URL) or "cache" (REDIS_CACHE_URL)
        # Every key of this deployment starts with this: SERVICE_NAME keeps deployments (staging and
        # production, say) apart when they share a Redis.
        self.prefix = key_prefix(namespace)
        self._connected_gauge = metrics.redis_connected.labels(role)
        self._connected_gauge.set(0)

    def on_reconnect(self, listener: Callable[[], Awaitable[None]]) -> None:
        """Run `listener` each time Redis comes back (e.g. to flush pending totals)."""
        self._listeners.append(listener)

    async def start(self) -> bool:
        """Try Redis once; if it is not there, start probing in the background. Never raises."""
        if await self._ping():
            self._mark_up(first=True)
        else:
            _log.warning(
                "redis.unavailable", url=self._redacted_url, detail="running on the memory cache alone"
            )
            self._ensure_probe()
        return self.connected

    async def call(self, operation: Callable[[aioredis.Redis], Awaitable[T]]) -> T | None:
        """Run one Redis operation with the link's timeout; None on any failure (and the link down
        when Redis could not be reached)."""
        if not self.connected:
            return None
        slots = self._slots
        if slots.locked():  # every connection is in use: wait for one, briefly
            try:
                async with asyncio.timeout(self.timeout):
                    await slots.acquire()
            except TimeoutError:
                self._metrics.redis_command_errors.labels("pool_busy").inc()
                return None
        else:
            await slots.acquire()  # free: taken at once, without a task switch
        try:
            async with asyncio.timeout(self.timeout):
                return await operation(self.client)
        except _OUTAGES as exc:
            self.mark_down(exc)
            return None
        except RedisError as exc:  # Redis answered, refusing this one command: not an outage
            self.command_failed(exc)
            return None
        finally:
            slots.release()

    def command_failed(self, exc: BaseException) -> None:
        """Count (and now and then log) a command Redis refused; the link stays up."""
        kind = _error_kind(exc)
        self._metrics.redis_command_errors.labels(kind).inc()
        now = time.monotonic()
        if now - self._last_logged.get(kind, -_LOG_EVERY_SECS) >= _LOG_EVERY_SECS:  # a full Redis
            self._last_logged[kind] = now  # refuses every write: one line a minute says so
            _log.warning("redis.command_failed", error=type(exc).__name__, reply=kind, url=self._redacted_url)

    def mark_down(self, exc: BaseException) -> None:
        self._metrics.count_error("redis_error")
        if self.connected:
            self.connected = False
            self._connected_gauge.set(0)
            _log.warning(
                "redis.disconnected",
                role=self.role,
                url=self._redacted_url,
                error=type(exc).__name__,
                detail=str(exc),
            )
        self._ensure_probe()

    async def close(self) -> None:
        self._closed = True
        if self._probe_task is not None:
            self._probe_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._probe_task
        with contextlib.suppress(*REDIS_FAILURES):
            await self.client.aclose()

    async def _ping(self) -> bool:
        try:
            async with asyncio.timeout(self.timeout):
                return bool(await self.client.ping())
        except REDIS_FAILURES:
            return False

    def _mark_up(self, *, first: bool = False) -> None:
        self.connected = True
        self._connected_gauge.set(1)
        _log.info("redis.connected" if first else "redis.reconnected", role=self.role, url=self._redacted_url)

    def _ensure_probe(self) -> None:
        if self._closed or (self._probe_task is not None and not self._probe_task.done()):
            return
        self._probe_task = asyncio.get_running_loop().create_task(
            self._probe(),
            name="redis-probe",
            context=contextvars.Context(),  # not the request that met it
        )

    async def _probe(self) -> None:
        delay = self._probe_min
        while not self._closed:
            await asyncio.sleep(delay)
            # Drop pooled sockets that died with the old server before trusting the link again.
            with contextlib.suppress(*REDIS_FAILURES):
                await self.client.connection_pool.disconnect()
            if await self._ping():
                self._mark_up()
                for listener in self._listeners:
                    await listener()
                return
            delay = min(delay * 2, self._probe_max)


# redis-py turns some error replies into classes of their own and strips their prefix.
_ERROR_REPLIES = {
    "OutOfMemoryError": "OOM",
    "NoScriptError": "NOSCRIPT",
    "ReadOnlyError": "READONLY",
    "NoPermissionError": "NOPERM",
    "BusyLoadingError": "LOADING",
}


def _error_kind(exc: BaseException) -> str:
    """The error reply's code (OOM, WRONGTYPE, ...), for the metric's label."""
    named = _ERROR_REPLIES.get(type(exc).__name__)
    if named is not None:
        return named
    text = str(exc)
    if text.startswith("Command # "):  # a pipeline's: "Command # 1 (INCR k) of pipeline caused error: ..."
        text = text.partition("caused error: ")[2]
    word = text.split(" ", 1)[0]
    return word if word.isupper() and word.isalpha() and len(word) <= 16 else type(exc).__name__[:32]


async def run_quietly(link: RedisLink | None, operation: Callable[[aioredis.Redis], Awaitable[Any]]) -> Any:
    """`link.call(operation)` when there is a link, else None."""
    if link is None:
        return None
    return await link.call(operation)
