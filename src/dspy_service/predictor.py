"""The prediction path: validate, look up the cache, coalesce, call the program behind breakers
with retries under a deadline, account tokens and cost, store the answer.

Cache hits are served without a task switch (memory) or with one Redis round trip. Identical misses
inside this process share one upstream call: the first request starts it as a task, the others await
the same task, and only that task spends money.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any

import orjson

from dspy_service.breaker import CircuitBreaker
from dspy_service.budgets import Budgets
from dspy_service.cache import CachedAnswer, TwoLevelCache, cache_key
from dspy_service.costs import CostLedger, PriceLookup, Usage, price_usage
from dspy_service.errors import (
    BudgetExceeded,
    CircuitOpen,
    InvalidRequest,
    NotFound,
    Overloaded,
    ProviderError,
    ProviderTimeout,
    ServiceError,
)
from dspy_service.experiments import build_assigner
from dspy_service.logs import get_logger
from dspy_service.metrics import Metrics, RouteMetrics
from dspy_service.models_config import ModelsConfig, ModelSpec
from dspy_service.programs import (
    LM_OPTIONS,
    LanguageModels,
    LoadedProgram,
    ProgramFailed,
    run_program,
    stream_program,
)
from dspy_service.tracing import Tracing

_log = get_logger("dspy_service.predictor")

# Failures that say the provider is unwell: they count against its breaker and may be retried.
_BREAKER_FAILURES = frozenset({"timeout", "transport", "server", "rate_limit"})
# Failures that can strike after the provider has the request and before it reports the tokens.
_UNMETERED_FAILURES = frozenset({"timeout", "transport"})
_BACKOFF_BASE_SECS = 0.2
_BACKOFF_CAP_SECS = 5.0


@dataclass(frozen=True, slots=True)
class PredictionInput:
    model: str
    variant: str | None
    input: str
    parameters: dict[str, Any]
    use_cache: bool
    user_id: str | None = None  # with A/B testing on, keeps a user on one variant
    tenant: str | None = None  # from the API key; its daily budget applies


@dataclass(frozen=True, slots=True)
class Prediction:
    model: str
    model_served: str
    variant: str
    output: Any
    outputs: dict[str, Any]
    cache_level: str | None
    coalesced: bool
    input_tokens: int
    output_tokens: int
    cost_usd: float | None
    cost_saved_usd: float | None
    latency_ms: float


@dataclass(frozen=True, slots=True)
class StreamChunk:
    """Text of one output field, as the provider sends it (a cache hit is one chunk of the whole)."""

    field: str
    text: str


@dataclass(slots=True)
class _Spend:
    """What one request's provider calls spent: the tokens the provider reported, per provider
    model id, and how many calls were cut off before it reported any (spend unknown)."""

    tokens: dict[str, tuple[int, int]]
    unmetered_calls: int = 0

    def add(self, usage_by_model: dict[str, tuple[int, int]]) -> None:
        for model_id, (tokens_in, tokens_out) in usage_by_model.items():
            before_in, before_out = self.tokens.get(model_id, (0, 0))
            self.tokens[model_id] = (before_in + tokens_in, before_out + tokens_out)


class _ChunkQueue:
    """Where a streaming upstream call puts its chunks; remembers whether any went out, because
    after the client has seen part of an answer, retrying or falling back would repeat it."""

    __slots__ = ("emitted", "queue")

    def __init__(self) -> None:
        self.emitted = False
        self.queue: asyncio.Queue[StreamChunk | None] = asyncio.Queue()  # None: the call is over

    def __call__(self, field: str, text: str) -> None:
        self.emitted = True
        self.queue.put_nowait(StreamChunk(field, text))


@dataclass(frozen=True, slots=True)
class _Route:
    model: ModelSpec
    program: LoadedProgram
    inputs: dict[str, Any]
    lm_options: dict[str, Any]
    tenant: str | None = None


def _check_lm_option(name: str, value: Any) -> Any:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if name in ("max_tokens", "seed") and isinstance(value, float) and value.is_integer():
        # 5.0 is an integer in JSON Schema's eyes, so in ours (within 64 bits, as integers are)
        value = int(value) if abs(value) < 2**63 else value
    if name == "temperature" and number and 0 <= value <= 2:
        return float(value)
    if name == "top_p" and number and 0 <= value <= 1:
        return float(value)
    if (
        name == "max_tokens"
        and isinstance(value, int)
        and not isinstance(value, bool)
        and 1 <= value <= 32_768
    ):
        return value
    if name == "seed" and isinstance(value, int) and not isinstance(value, bool):
        return value
    if name == "stop" and (
        (isinstance(value, str) and value)  # DSPy refuses empty stop sequences
        or (isinstance(value, list) and len(value) <= 4 and all(isinstance(s, str) and s for s in value))
    ):
        return value
    expected = {
        "temperature": "a number from 0 to 2",
        "top_p": "a number from 0 to 1",
        "max_tokens": "an integer from 1 to 32768",
        "seed": "an integer",
        "stop": "a non-empty string or a list of up to 4 of them",
    }[name]
    raise InvalidRequest(f"parameters.{name} must be {expected}")


class Predictor:
    def __init__(
        self,
        *,
        config: ModelsConfig,
        programs: dict[str, LoadedProgram],
        lms: LanguageModels,
        cache: TwoLevelCache,
        breakers: dict[str, CircuitBreaker],
        ledger: CostLedger,
        metrics: Metrics,
        prices: PriceLookup,
        request_timeout_secs: float,
        max_in_flight: int,
        budgets: Budgets | None = None,
        tracing: Tracing | None = None,
    ) -> None:
        self._budgets = budgets  # daily spend budgets: checked before a miss goes upstream
        self._tracing = tracing  # None: tracing is off
        self._config = config
        self._programs = programs
        self._lms = lms
        self._cache = cache
        self._breakers = breakers
        self._ledger = ledger
        self._metrics = metrics
        self._prices = prices
        self._deadline = request_timeout_secs
        self._max_in_flight = max_in_flight
        self._upstream: dict[str, asyncio.Task[tuple[CachedAnswer, Usage]]] = {}
        self._upstream_count = 0
        self._random = random.Random()
        self._assigner = build_assigner(config.ab_testing_enabled, config.ab_weights)

    @property
    def upstream_in_flight(self) -> int:
        return self._upstream_count

    def _route(self, request: PredictionInput) -> _Route:
        model = self._config.models.get(request.model)
        if model is None:
            raise NotFound(
                f"unknown model {request.model!r}; known: {', '.join(sorted(self._config.models))}"
            )
        variant = request.variant or (
            self._assigner.assign(request.user_id) if self._assigner else self._config.default_variant
        )
        program = self._programs.get(variant)
        if program is None:
            raise NotFound(f"unknown variant {variant!r}; known: {', '.join(sorted(self._programs))}")
        inputs: dict[str, Any] = {program.input_fields[0]: request.input}
        lm_options: dict[str, Any] = {}
        for name, value in request.parameters.items():
            if name in LM_OPTIONS:
                lm_options[name] = _check_lm_option(name, value)
            elif name in program.input_fields[1:]:
                inputs[name] = value
            else:
                allowed = sorted(LM_OPTIONS | set(program.input_fields[1:]))
                raise InvalidRequest(
                    f"parameters.{name} is not an LM option or an input field of variant {variant!r}; "
                    f"allowed: {', '.join(allowed)}"
                )
        missing = [name for name in program.input_fields[1:] if name not in inputs]
        if missing:
            raise InvalidRequest(
                f"variant {variant!r} needs input field(s) {', '.join(missing)} in parameters"
            )
        return _Route(model, program, inputs, lm_options, request.tenant)

    def _cache_key(self, request: PredictionInput, route: _Route) -> str:
        return cache_key(
            model=route.model.key,
            model_id=route.model.name,
            variant=route.program.variant,
            program_fingerprint=route.program.fingerprint,
            input_text=request.input,
            parameters=request.parameters,
        )

    async def predict(self, request: PredictionInput) -> Prediction:
        started = time.perf_counter()
        route = self._route(request)
        model_key, variant = route.model.key, route.program.variant
        metrics = self._metrics.route(model_key, variant)
        key = None
        if request.use_cache:
            key = self._cache_key(request, route)
            hit = self._cache.get_memory(key)
            if hit is not None:  # answered without awaiting anything: never "in flight"
                return self._served_from_cache(request, metrics, variant, hit, "memory", started)
        self._metrics.active.inc()
        try:
            if key is not None:
                hit = await self._cache.get_redis(key)
                if hit is not None:
                    return self._served_from_cache(request, metrics, variant, hit, "redis", started)
            coalesced = key is not None and key in self._upstream
            if self._budgets is not None and not coalesced:
                await self._budgets.check(model_key, request.tenant)
            answer, usage = await self._call_upstream(key, route)
        except ServiceError as exc:
            if not isinstance(exc, BudgetExceeded):  # a refusal we chose, not a failed prediction
                metrics.error.inc()  # the error's type is counted where it becomes a response
            raise
        finally:
            self._metrics.active.dec()
        return self._answered(request, metrics, variant, answer, usage, coalesced, started)

    async def stream(self, request: PredictionInput) -> AsyncGenerator[StreamChunk | Prediction, None]:
        """`predict`, streaming: the answer's text chunks as the provider sends them, then the
        Prediction. A hit (or a miss that joins an identical `predict` already in flight) is one
        chunk of the main output. A streaming miss is never shared with other requests: its client
        may go away, and closing this generator then cancels the upstream call.

        Errors before the first chunk (unknown model, budget, breaker, provider) raise from the
        first `__anext__`; the caller can still answer them with a status code.
        """
        started = time.perf_counter()
        route = self._route(request)
        model_key, variant = route.model.key, route.program.variant
        metrics = self._metrics.route(model_key, variant)
        main_output = route.program.main_output
        key = None
        if request.use_cache:
            key = self._cache_key(request, route)
            hit = self._cache.get_memory(key)
            if hit is not None:
                result = self._served_from_cache(request, metrics, variant, hit, "memory", started)
                yield StreamChunk(main_output, _chunk_text(result.output))
                yield result
                return
        self._metrics.active.inc()
        try:
            if key is not None:
                hit = await self._cache.get_redis(key)
                if hit is not None:
                    result = self._served_from_cache(request, metrics, variant, hit, "redis", started)
                    yield StreamChunk(main_output, _chunk_text(result.output))
                    yield result
                    return
            shared = self._upstream.get(key) if key is not None else None
            if shared is not None:
                answer, usage = await asyncio.shield(shared)
                result = self._answered(request, metrics, variant, answer, usage, True, started)
                yield StreamChunk(main_output, _chunk_text(result.output))
                yield result
                return
            if self._budgets is not None:
                await self._budgets.check(model_key, request.tenant)
            sink = _ChunkQueue()
            task = self._start_upstream(key, route, sink)
            task.add_done_callback(lambda _: sink.queue.put_nowait(None))
            try:
                while (chunk := await sink.queue.get()) is not None:
                    yield chunk
                answer, usage = task.result()
            finally:
                if not task.done():  # the client went away mid-stream: stop spending on it
                    task.cancel()
                    _log.info("prediction.stream_abandoned", model=model_key, variant=variant)
        except ServiceError as exc:
            if not isinstance(exc, BudgetExceeded):
                metrics.error.inc()
            raise
        finally:
            self._metrics.active.dec()
        yield self._answered(request, metrics, variant, answer, usage, False, started)

    def _answered(
        self,
        request: PredictionInput,
        metrics: RouteMetrics,
        variant: str,
        answer: CachedAnswer,
        usage: Usage,
        coalesced: bool,
        started: float,
    ) -> Prediction:
        latency = time.perf_counter() - started
        metrics.success.inc()
        metrics.duration_none.observe(latency)
        if coalesced:
            # Another request's upstream call answered this one: it spent nothing of its own.
            self._ledger.record_hit(metrics.ledger_name, answer.cost_usd)
            if answer.cost_usd:
                metrics.saved.inc(answer.cost_usd)
            return Prediction(
                request.model,
                answer.model_served,
                variant,
                answer.output,
                answer.outputs,
                None,
                True,
                0,
                0,
                0.0,
                answer.cost_usd,
                latency * 1000,
            )
        return Prediction(
            request.model,
            answer.model_served,
            variant,
            answer.output,
            answer.outputs,
            None,
            False,
            usage.input_tokens,
            usage.output_tokens,
            usage.cost_usd,
            None,
            latency * 1000,
        )

    def _served_from_cache(
        self,
        request: PredictionInput,
        metrics: RouteMetrics,
        variant: str,
        hit: CachedAnswer,
        level: str,
        started: float,
    ) -> Prediction:
        latency = time.perf_counter() - started
        metrics.success.inc()
        (metrics.duration_memory if level == "memory" else metrics.duration_redis).observe(latency)
        if hit.cost_usd:
            metrics.saved.inc(hit.cost_usd)
        self._ledger.record_hit(metrics.ledger_name, hit.cost_usd)
        return Prediction(
            request.model,
            hit.model_served,
            variant,
            hit.output,
            hit.outputs,
            level,
            False,
            0,
            0,
            0.0,
            hit.cost_usd,
            latency * 1000,
        )

    async def _call_upstream(self, key: str | None, route: _Route) -> tuple[CachedAnswer, Usage]:
        task = self._upstream.get(key) if key is not None else None
        if task is None:
            task = self._start_upstream(key, route, None)
        # shield: one waiter going away (client gone, its own deadline) never cancels the shared call.
        return await asyncio.shield(task)

    def _start_upstream(
        self, key: str | None, route: _Route, sink: _ChunkQueue | None
    ) -> asyncio.Task[tuple[CachedAnswer, Usage]]:
        """Start the upstream call as a task (stored under `key` when it succeeds); a non-streaming
        one is registered so that identical requests arriving meanwhile share it."""
        if self._upstream_count >= self._max_in_flight:
            raise Overloaded(
                f"{self._upstream_count} predictions in flight; try again shortly", retry_after=1
            )
        task = asyncio.get_running_loop().create_task(self._produce(key, route, sink))
        self._upstream_count += 1
        task.add_done_callback(self._upstream_done)
        if key is not None and sink is None:
            self._upstream[key] = task
            task.add_done_callback(lambda _: self._upstream.pop(key, None))
        return task

    def _upstream_done(self, task: asyncio.Task[Any]) -> None:
        self._upstream_count -= 1
        if not task.cancelled():
            task.exception()  # mark retrieved; waiters have re-raised it where it mattered

    async def _produce(
        self, key: str | None, route: _Route, sink: _ChunkQueue | None
    ) -> tuple[CachedAnswer, Usage]:
        spent = _Spend({})
        model_served = route.model.key
        deadline_at = time.monotonic() + self._deadline
        try:
            async with asyncio.timeout(self._deadline):
                run, model_served = await self._run_with_fallbacks(route, spent, deadline_at, sink)
        except TimeoutError:
            self._account(route, spent)
            raise ProviderTimeout(
                f"no answer from the provider within the {self._deadline:g} s deadline"
            ) from None
        except (ServiceError, asyncio.CancelledError):
            self._account(route, spent)
            raise
        usage = self._account(route, spent)
        answer = CachedAnswer(
            outputs=run.outputs,
            output=run.outputs.get(route.program.main_output),
            model_served=model_served,
            input_tokens=usage.input_tokens,
            output_tokens=usage.output_tokens,
            cost_usd=usage.cost_usd,
        )
        if key is not None:
            await self._cache.set(key, answer)
        return answer, usage

    def _account(self, route: _Route, spent: _Spend) -> Usage:
        """Every token the provider reported for this request, failed attempts included, is counted,
        and so is every call cut off before the provider reported its tokens: its spend is unknown,
        and the totals say so rather than count it as nothing."""
        usage = price_usage(spent.tokens, self._prices)
        metrics = self._metrics.route(route.model.key, route.program.variant)
        if usage.input_tokens:
            metrics.input_tokens.inc(usage.input_tokens)
        if usage.output_tokens:
            metrics.output_tokens.inc(usage.output_tokens)
        if usage.cost_usd:
            metrics.cost.inc(usage.cost_usd)
        for model_id in usage.unpriced_models:
            self._metrics.unpriced.labels(model_id).inc()
        if spent.tokens or spent.unmetered_calls:
            self._ledger.record_miss(route.model.key, route.program.variant, usage, spent.unmetered_calls)
        if self._budgets is not None:
            self._budgets.record(route.model.key, route.tenant, usage.cost_usd)
        return usage

    async def _run_with_fallbacks(
        self,
        route: _Route,
        spent: _Spend,
        deadline_at: float,
        sink: _ChunkQueue | None,
    ) -> tuple[Any, str]:
        chain = (route.model.key, *route.model.fallbacks)
        last_error: ServiceError | None = None
        for model_key in chain:
            spec = self._config.models[model_key]
            try:
                return await self._run_with_retries(spec, route, spent, deadline_at, sink), model_key
            except (CircuitOpen, ProviderError, ProviderTimeout) as exc:
                last_error = exc
                if sink is not None and sink.emitted:
                    raise  # the client has part of this model's answer: another's would not continue it
                if len(chain) > 1:
                    _log.warning("prediction.fallback", model=model_key, error=exc.type, detail=exc.message)
        assert last_error is not None
        raise last_error

    async def _run_with_retries(
        self,
        spec: ModelSpec,
        route: _Route,
        spent: _Spend,
        deadline_at: float,
        sink: _ChunkQueue | None,
    ) -> Any:
        breaker = self._breakers[spec.key]
        lm = self._lms.get(spec.key, route.lm_options)
        attempt = 0
        while True:
            if not breaker.try_acquire():
                wait = breaker.retry_after()
                raise CircuitOpen(
                    f"circuit breaker for model {spec.key!r} is open", retry_after=max(1.0, wait)
                )
            try:
                if sink is None:
                    call = run_program(route.program, lm, route.inputs)
                else:
                    call = stream_program(route.program, lm, route.inputs, sink)
                if self._tracing is not None:  # one `lm.call` span per attempt (tracing.py)
                    call = self._tracing.lm_call(call, spec.key, spec.name, attempt + 1)
                run = await call
            except ProgramFailed as failure:
                spent.add(failure.usage_by_model)
                if failure.kind in _UNMETERED_FAILURES and failure.connected:
                    self._unmetered(spec, spent)  # sent, and the answer lost: the provider may bill it
                if failure.kind not in _BREAKER_FAILURES:
                    breaker.record_neutral()
                    raise self._client_facing(spec, failure) from None
                breaker.record_failure()
                delay = self._backoff(attempt + 1, failure.retry_after)
                if (
                    attempt >= spec.max_retries
                    or time.monotonic() + delay >= deadline_at
                    or (sink is not None and sink.emitted)  # a retry would repeat what the client has
                ):
                    # Out of retries, or the wait would outlive the request: answer now, not at the deadline.
                    raise self._client_facing(spec, failure) from None
                attempt += 1
                await asyncio.sleep(delay)
                continue
            except BaseException as exc:
                breaker.record_neutral()  # cancelled by the deadline: free a half-open trial slot
                if isinstance(exc, asyncio.CancelledError):  # the deadline, or a stream's client left
                    self._unmetered(spec, spent)
                raise
            breaker.record_success()
            spent.add(run.usage_by_model)
            return run

    def _unmetered(self, spec: ModelSpec, spent: _Spend) -> None:
        spent.unmetered_calls += 1
        self._metrics.unmetered_calls.labels(spec.key).inc()

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        """Exponential backoff with full jitter; a provider's Retry-After is a floor."""
        delay = self._random.uniform(0, min(_BACKOFF_CAP_SECS, _BACKOFF_BASE_SECS * 2 ** (attempt - 1)))
        if retry_after is not None and retry_after > 0:
            delay = max(delay, min(retry_after, _BACKOFF_CAP_SECS * 6))
        return delay

    @staticmethod
    def _client_facing(spec: ModelSpec, failure: ProgramFailed) -> ServiceError:
        if failure.kind == "timeout":
            return ProviderTimeout(f"model {spec.key!r} timed out after {spec.request_timeout_secs:g} s")
        if failure.kind == "rejected":
            return InvalidRequest(
                f"the provider rejected the request for model {spec.key!r}: {failure.message}"
            )
        if failure.kind == "parse":
            return ProviderError(f"model {spec.key!r} answered in a shape the program could not parse")
        status = f" (HTTP {failure.status})" if failure.status else ""
        return ProviderError(f"model {spec.key!r} failed{status}: {failure.kind}")


def _chunk_text(output: Any) -> str:
    """A whole answer as one stream chunk: text as it is, anything else as JSON."""
    return output if isinstance(output, str) else orjson.dumps(output).decode()
