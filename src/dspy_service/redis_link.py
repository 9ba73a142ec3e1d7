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

from redis.exceptions import ClusterDownError, RedisClusterException, RedisError, SlotNotCoveredError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from dspy_service.background import stop_task
from dspy_service.logs import get_logger
from dspy_service.metrics import Metrics
from dspy_service.redis_clients import NodeStatus, RedisClient, open_client, ping, reset, survey
from dspy_service.redis_topology import RedisTopology, parse_topology

T = TypeVar("T")

KEY_PREFIX = "dspy-service:v1:"


def key_prefix(namespace: str) -> str:
    """`dspy-service:v1:<namespace>:`, the namespace (SERVICE_NAME) made safe for a key: the keys
    under it (cache entries, rate-limit windows) spread over a cluster's slots."""
    safe = _safe(namespace)
    return f"{KEY_PREFIX}{safe}:" if safe else KEY_PREFIX


def state_prefix(namespace: str) -> str:
    """`dspy-service:v1:{<namespace>}:`: a hash tag puts every key under it in one cluster slot,
    so that the scripts that touch several of them at once (the apply-once batches of cost totals
    and budget spend, the all-or-nothing budget reservation) run on one node, and the epoch marker
    lives beside the state it vouches for. This state is small and written a few times a second
    per replica; the cache and the rate limits, which take every request, spread over all slots."""
    return f"{KEY_PREFIX}{{{_safe(namespace) or 'default'}}}:"


def _safe(namespace: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", namespace)[:64]


# RedisClusterException is not a RedisError: the cluster client raises it for a slot no node serves
# (mid-failover) and for a map it cannot read.
REDIS_FAILURES = (RedisError, RedisClusterException, OSError, TimeoutError)
# The failures that say Redis is unreachable (rather than refusing one command): a cluster with a
# slot down (CLUSTERDOWN, or a slot no node serves) is, for that moment, as good as unreachable.
_OUTAGES = (
    RedisConnectionError,
    RedisTimeoutError,
    OSError,
    TimeoutError,
    ClusterDownError,
    SlotNotCoveredError,
)
MAX_CONNECTIONS = 64
_LOG_EVERY_SECS = 60.0
SURVEY_EVERY_SECS = 5.0  # how often each node is asked whether it answers, for /health

_log = get_logger("dspy_service.redis")


class RedisLink:
    """A Redis client with a known up/down state and fail-fast calls while down."""

    def __init__(
        self,
        topology: RedisTopology | str,
        *,
        timeout: float,
        metrics: Metrics,
        redacted_url: str,
        role: str = "state",
        namespace: str = "",
        probe_min_secs: float = 0.5,
        probe_max_secs: float = 5.0,
    ) -> None:
        self.topology = parse_topology(topology) if isinstance(topology, str) else topology
        self.timeout = timeout
        self.client: RedisClient = self._open()
        self._closing: set[asyncio.Task[None]] = set()  # replaced clients being closed
        self.nodes: list[NodeStatus] = []  # each node and whether it answered, as last surveyed
        self._survey_task: asyncio.Task[None] | None = None
        self._slots = asyncio.Semaphore(MAX_CONNECTIONS)  # one per pooled connection
        self._last_logged: dict[str, float] = {}  # command error kind -> when it was last logged
        self.connected = False
        self.metrics = metrics
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
        self.state_prefix = state_prefix(namespace)  # one hash slot (see state_prefix)
        self._connected_gauge = metrics.redis_connected.labels(role)
        self._connected_gauge.set(0)

    def on_reconnect(self, listener: Callable[[], Awaitable[None]]) -> None:
        """Run `listener` each time Redis comes back (e.g. to flush pending totals)."""
        self._listeners.append(listener)

    async def start(self) -> bool:
        """Try Redis once; if it is not there, start probing in the background. Never raises."""
        failure = await self._ping()
        if failure is None:
            self._mark_up(first=True)
        else:
            _log.warning(
                "redis.unavailable",
                role=self.role,
                mode=self.topology.mode,
                url=self._redacted_url,
                error=type(failure).__name__,
                reason=str(failure)[:300],  # e.g. the certificate that failed verification, and why
                detail="running without it until it answers",
            )
            self._ensure_probe()
        self._survey_task = asyncio.get_running_loop().create_task(
            self._survey_forever(), name=f"redis-survey-{self.role}", context=contextvars.Context()
        )
        return self.connected

    async def call(self, operation: Callable[[RedisClient], Awaitable[T]]) -> T | None:
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
                self.metrics.redis_command_errors.labels("pool_busy").inc()
                return None
        else:
            await slots.acquire()  # free: taken at once, without a task switch
        try:
            async with asyncio.timeout(self.timeout):
                return await operation(self.client)
        except _OUTAGES as exc:
            self.mark_down(exc)
            return None
        except (RedisError, RedisClusterException) as exc:  # refused this one command: not an outage
            self.command_failed(exc)
            return None
        finally:
            slots.release()

    def command_failed(self, exc: BaseException) -> None:
        """Count (and now and then log) a command Redis refused; the link stays up."""
        kind = _error_kind(exc)
        self.metrics.redis_command_errors.labels(kind).inc()
        now = time.monotonic()
        if now - self._last_logged.get(kind, -_LOG_EVERY_SECS) >= _LOG_EVERY_SECS:  # a full Redis
            self._last_logged[kind] = now  # refuses every write: one line a minute says so
            _log.warning(
                "redis.command_failed",
                error=type(exc).__name__,
                reply=kind,
                detail=str(exc)[:200],
                url=self._redacted_url,
            )

    def mark_down(self, exc: BaseException) -> None:
        self.metrics.count_error("redis_error")
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
        for task in (self._probe_task, self._survey_task):
            await stop_task(task)
        with contextlib.suppress(*REDIS_FAILURES):
            await self.client.aclose()

    async def _ping(self) -> BaseException | None:
        """None when Redis answers, else what went wrong."""
        try:
            async with asyncio.timeout(self.timeout):
                if await ping(self.client):
                    return None
                return RedisConnectionError("a node did not answer PING")
        except REDIS_FAILURES as exc:
            return exc

    def _open(self) -> RedisClient:
        return open_client(self.topology, timeout=self.timeout, max_connections=MAX_CONNECTIONS)

    def _spawn_close(self, client: RedisClient) -> None:
        async def close() -> None:
            with contextlib.suppress(*REDIS_FAILURES, asyncio.CancelledError):
                async with asyncio.timeout(5):
                    await client.aclose()

        task = asyncio.get_running_loop().create_task(close(), context=contextvars.Context())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def survey(self) -> list[NodeStatus]:
        """Ask every node now (what /health shows is the last survey, at most SURVEY_EVERY_SECS old)."""
        self.nodes = await survey(self.client, self.topology, wait_secs=self.timeout)
        return self.nodes

    async def _survey_forever(self) -> None:
        while not self._closed:
            with contextlib.suppress(*REDIS_FAILURES):
                await self.survey()
            await asyncio.sleep(SURVEY_EVERY_SECS)

    def describe(self) -> dict[str, Any]:
        """The topology, whether it answers, and each node as last surveyed: for /config."""
        return {
            **self.topology.describe(),
            "connected": self.connected,
            "nodes": [node.to_json() for node in self.nodes],
        }

    def summary(self) -> dict[str, Any]:
        """The same without addresses or users, for the unauthenticated /health."""
        return {
            "mode": self.topology.mode,
            "tls": self.topology.tls,
            "connected": self.connected,
            "nodes_known": len(self.nodes),
            "nodes_reachable": sum(node.reachable for node in self.nodes),
            "unreachable_roles": sorted(node.role for node in self.nodes if not node.reachable),
        }

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
            try:
                # Up, and still up once the listeners ran: a link that went down again meanwhile
                # found this probe still running (so started none), and it must go on probing.
                if await self._reconnect() and self.connected:
                    return
            except Exception as exc:  # the probe must outlive anything: it is what heals the link
                _log.warning("redis.probe_failed", role=self.role, error=f"{type(exc).__name__}: {exc}"[:300])
            delay = min(delay * 2, self._probe_max)

    async def _reconnect(self) -> bool:
        # Drop pooled sockets that died with the old server (and a sentinel's idea of the primary)
        # before trusting the link again. A cluster client is replaced whole: closing one in the
        # middle of a resharding or a failover can wait on its own lock for as long as its stuck
        # initialisation takes, and a new one reads the slot map afresh.
        if self.topology.mode == "cluster":
            old, self.client = self.client, self._open()
            self._spawn_close(old)
        else:
            with contextlib.suppress(*REDIS_FAILURES):
                async with asyncio.timeout(self.timeout):
                    await reset(self.client)
        if await self._ping() is not None:
            return False
        self._mark_up()
        for listener in self._listeners:
            await listener()
        return True


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


async def run_quietly(link: RedisLink | None, operation: Callable[[RedisClient], Awaitable[Any]]) -> Any:
    """`link.call(operation)` when there is a link, else None."""
    if link is None:
        return None
    return await link.call(operation)
