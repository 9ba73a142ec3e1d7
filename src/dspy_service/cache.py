"""The response cache: its key, the in-process level, the Redis level, and the two together.

Lookup order is memory, then Redis (a Redis hit is copied into memory), then the program. The Redis
level fails open: while Redis is down or slow the cache is the memory level alone.
"""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import orjson
from cachetools import TTLCache

from dspy_service.metrics import Metrics
from dspy_service.redis_link import RedisLink

if TYPE_CHECKING:
    from dspy_service.tracing import Tracing

CacheLevel = Literal["memory", "redis"]


def cache_namespace(*, service_name: str, provider: str, dspy_version: str) -> str:
    """What every key of this deployment shares: its service name (staging and production may share
    a Redis), the provider endpoint in use (a simulator's answers must never reach a real
    deployment), DSPy's version (it writes the prompts) and the cached answers' format."""
    return f"{service_name}|{provider}|dspy {dspy_version}|format {_FORMAT}"


def cache_key(
    *,
    namespace: str,
    scope: str | None,
    model: str,
    model_id: str,
    variant: str,
    program_fingerprint: str,
    inputs: dict[str, Any],
    parameters: dict[str, Any],
) -> str:
    """One hash over everything that changes the answer, with `parameters` in canonical (sorted) form.

    `model_id` is the provider model behind the public name and `program_fingerprint` the hash of the
    program's code and state, so a re-pointed model or a re-optimized program never serves old
    answers. `inputs` are the program's inputs in canonical form (validated, as JSON), so `input`
    and the equivalent `inputs` share a key; `parameters` are the checked LM options (`max_tokens`
    5 and 5.0 are one). `scope` is the tenant with CACHE_SCOPE=tenant, else None.
    """
    base = route_key(
        namespace=namespace,
        model=model,
        model_id=model_id,
        variant=variant,
        program_fingerprint=program_fingerprint,
    )
    return request_key(base, scope, inputs, parameters)


def route_key(*, namespace: str, model: str, model_id: str, variant: str, program_fingerprint: str) -> bytes:
    """What the keys of one model and variant share (the predictor keeps it per route): it keys the
    hash of each request's own part, so that part alone is hashed per request."""
    material = orjson.dumps([namespace, model, model_id, variant, program_fingerprint])
    return hashlib.blake2b(material, digest_size=32).digest()


def request_key(base: bytes, scope: str | None, inputs: dict[str, Any], parameters: dict[str, Any]) -> str:
    material = orjson.dumps([scope, inputs, parameters], option=orjson.OPT_SORT_KEYS)
    return hashlib.blake2b(material, digest_size=20, key=base).hexdigest()


_FORMAT = 2  # of a cached answer's bytes: entries of another format are misses


@dataclass(frozen=True, slots=True)
class CachedAnswer:
    """What a prediction produced, as the cache keeps it: every output field once, and which of
    them is the response's `output`."""

    outputs: dict[str, Any]
    main_output: str | None
    model_served: str
    input_tokens: int
    output_tokens: int
    cost_usd: float | None

    @property
    def output(self) -> Any:
        return self.outputs.get(self.main_output) if self.main_output is not None else None

    def to_bytes(self) -> bytes:
        return orjson.dumps(
            [
                _FORMAT,
                self.outputs,
                self.main_output,
                self.model_served,
                self.input_tokens,
                self.output_tokens,
                self.cost_usd,
            ]
        )

    @classmethod
    def from_bytes(cls, raw: bytes) -> CachedAnswer:
        version, outputs, main_output, model_served, input_tokens, output_tokens, cost_usd = orjson.loads(raw)
        if version != _FORMAT or not isinstance(outputs, dict):
            raise ValueError(f"cached answer of format {version!r}")
        return cls(outputs, main_output, model_served, int(input_tokens), int(output_tokens), cost_usd)


# What an entry costs in memory beyond its answer's JSON: the dataclass, the dict, the key, the
# cache's own bookkeeping. An estimate, so that small answers are not counted as free.
ENTRY_OVERHEAD_BYTES = 1024


class MemoryCache:
    """Bounded LRU with one TTL for every entry (cachetools' TTLCache), bounded both in entries and
    in bytes: each entry weighs its answer's JSON size plus ENTRY_OVERHEAD_BYTES, and at least
    max_bytes / max_entries, so that neither bound can be exceeded."""

    def __init__(self, max_entries: int, ttl_secs: float, max_bytes: int | None = None) -> None:
        self._entries: TTLCache[str, tuple[CachedAnswer, int]] | None = None
        if max_entries > 0 and (max_bytes is None or max_bytes > 0):
            budget = max_bytes if max_bytes is not None else max_entries * 64 * 1024
            floor = max(1, budget // max_entries)
            self._entries = TTLCache(
                maxsize=budget, ttl=ttl_secs, getsizeof=lambda entry: max(floor, entry[1])
            )
            self.max_bytes = budget
        else:
            self.max_bytes = 0

    def get(self, key: str) -> CachedAnswer | None:
        if self._entries is None:
            return None
        found = self._entries.get(key)
        return found[0] if found is not None else None

    def set(self, key: str, answer: CachedAnswer, size: int) -> None:
        """Keep `answer` (whose JSON is `size` bytes); one larger than the whole bound is not kept."""
        if self._entries is not None:
            weight = size + ENTRY_OVERHEAD_BYTES
            if weight <= self.max_bytes:
                self._entries[key] = (answer, weight)

    @property
    def current_bytes(self) -> int:
        return int(self._entries.currsize) if self._entries is not None else 0

    def __len__(self) -> int:
        if self._entries is None:
            return 0
        self._entries.expire()
        return len(self._entries)


class RedisCache:
    """The shared level: entries under one versioned prefix, each with REDIS_CACHE_TTL_SECS.

    Lookups are batched: every GET asked for during one turn of the event loop goes to Redis as a
    single MGET. redis-py's asyncio client spends about 150 us of CPU per command, more than the rest
    of a cache hit; under concurrency one MGET shares that cost among all waiting requests, and alone
    a request pays only one extra loop turn. (No Redis client for asyncio does this automatically.)
    """

    def __init__(self, link: RedisLink, ttl_secs: int) -> None:
        self._link = link
        self._prefix = link.prefix + "cache:"
        # Entries spread over a cluster's slots, and one MGET must stay in one slot: the cluster
        # client splits it by slot (a pipelined MGET per node).
        self._clustered = link.topology.mode == "cluster"
        self._ttl = ttl_secs
        self._waiting: list[tuple[str, asyncio.Future[bytes | None]]] = []
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def available(self) -> bool:
        return self._link.connected

    async def get(self, key: str) -> tuple[CachedAnswer, int] | None:
        """The entry under `key` and its size in bytes, or None."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[bytes | None] = loop.create_future()
        if not self._waiting:
            loop.call_soon(self._send_batch)
        self._waiting.append((self._prefix + key, future))
        raw = await future
        if raw is None:
            return None
        try:
            return CachedAnswer.from_bytes(raw), len(raw)
        except (orjson.JSONDecodeError, ValueError, TypeError):
            return None  # an entry of another shape is a miss; the next set overwrites it

    def _send_batch(self) -> None:
        batch, self._waiting = self._waiting, []
        task = asyncio.get_running_loop().create_task(self._fetch(batch), context=contextvars.Context())
        self._tasks.add(task)  # keep a reference until it is done
        task.add_done_callback(self._tasks.discard)

    async def _fetch(self, batch: list[tuple[str, asyncio.Future[bytes | None]]]) -> None:
        keys = [key for key, _ in batch]
        values: Any = None
        try:
            values = await self._link.call(self._mget(keys))
        finally:
            found = values if isinstance(values, list) and len(values) == len(batch) else [None] * len(batch)
            for (_, future), value in zip(batch, found, strict=True):
                if not future.done():
                    future.set_result(value if isinstance(value, bytes) else None)

    def _mget(self, keys: list[str]) -> Callable[[Any], Awaitable[Any]]:
        if self._clustered:
            return lambda client: client.mget_nonatomic(keys)
        return lambda client: client.mget(keys)

    async def set(self, key: str, payload: bytes) -> None:
        await self._link.call(lambda client: client.set(self._prefix + key, payload, ex=self._ttl))


class TwoLevelCache:
    def __init__(
        self,
        memory: MemoryCache,
        redis: RedisCache | None,
        metrics: Metrics,
        tracing: Tracing | None = None,
        *,
        max_entry_bytes: int = 1024 * 1024,
    ) -> None:
        self._max_entry_bytes = max_entry_bytes
        self.memory = memory
        self.redis = redis
        self._metrics = metrics
        self._tracing = tracing  # None: tracing is off (one check per lookup)

    def get_memory(self, key: str) -> CachedAnswer | None:
        """The synchronous first level: the hot path checks it without awaiting anything."""
        if self._tracing is None:
            found = self.memory.get(key)
        else:
            with self._tracing.span("cache.memory") as span:
                found = self.memory.get(key)
                span.set_attribute("cache.hit", found is not None)
        if found is None:
            self._metrics.cache_miss_memory.inc()
        else:
            self._metrics.cache_hit_memory.inc()
        return found

    async def get_redis(self, key: str) -> CachedAnswer | None:
        if self.redis is None or not self.redis.available:
            return None
        if self._tracing is None:
            found = await self.redis.get(key)
        else:
            with self._tracing.span("cache.redis") as span:
                found = await self.redis.get(key)
                span.set_attribute("cache.hit", found is not None)
        if found is None:
            self._metrics.cache_miss_redis.inc()
            return None
        self._metrics.cache_hit_redis.inc()
        answer, size = found
        self.memory.set(key, answer, size)
        return answer

    async def set(self, key: str, answer: CachedAnswer) -> None:
        """Store in both levels; an answer over CACHE_MAX_ENTRY_BYTES in neither (and counted)."""
        payload = answer.to_bytes()
        if len(payload) > self._max_entry_bytes:
            self._metrics.cache_skipped_too_large.inc()
            return
        self.memory.set(key, answer, len(payload))
        if self.redis is not None and self.redis.available:
            await self.redis.set(key, payload)
