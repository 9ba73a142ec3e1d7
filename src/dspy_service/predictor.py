"""The prediction path: validate, look up the cache, coalesce, call the program behind breakers
with retries under a deadline, account tokens and cost, store the answer.

Cache hits are served without a task switch (memory) or with one Redis round trip. Identical misses
inside this process share one upstream call: the first request starts it as a task, the others await
the same task, and only that task spends money.

The steps it calls live one level down: routing.py (the request's model, program and checked
inputs), accounting.py (what was spent and where it is counted), worst_case.py (what a budget
holds), upstream_errors.py (a failure as the client sees it), programs/ (running the program).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import AsyncGenerator
from typing import TYPE_CHECKING, Any

import orjson

from dspy_service.accounting import Accountant, PricedSpend, Spend
from dspy_service.breaker import CircuitBreaker
from dspy_service.budgets import Budgets
from dspy_service.cache import CachedAnswer, TwoLevelCache, request_key, route_key
from dspy_service.costs import CostLedger, PriceLookup
from dspy_service.errors import (
    BudgetExceeded,
    CircuitOpen,
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
    LanguageModels,
    LoadedProgram,
    ProgramFailed,
    ProgramRun,
    ProgramThreads,
    run_program,
    stream_program,
)
from dspy_service.results import Prediction, StreamChunk
from dspy_service.routing import PredictionInput, Route, split_parameters
from dspy_service.tracing import Tracing
from dspy_service.upstream_errors import client_facing_error

if TYPE_CHECKING:  # the records store (SQLAlchemy) is imported only when receipts are on
    from dspy_service.recording import Recorder
from dspy_service.worst_case import worst_case

_log = get_logger("dspy_service.predictor")

# Failures that say the provider is unwell: they count against its breaker and may be retried.
_BREAKER_FAILURES = frozenset({"timeout", "transport", "server", "rate_limit"})
# Failures that can strike after the provider has the request and before it reports the tokens.
_UNMETERED_FAILURES = frozenset({"timeout", "transport"})
_BACKOFF_BASE_SECS = 0.2
_BACKOFF_CAP_SECS = 5.0


class _ChunkQueue:
    """Where a streaming upstream call puts its chunks; remembers whether any went out, because
    after the client has seen part of an answer, retrying or falling back would repeat it."""

    __slots__ = ("emitted", "queue")

    def __init__(self) -> None:
        self.emitted = False
        self.queue: asyncio.Queue[StreamChunk | None] = asyncio.Queue()  # None: the call is over

    def __call__(self, predictor: str, field: str, text: str) -> None:
        self.emitted = True
        self.queue.put_nowait(StreamChunk(field=field, text=text, predictor=predictor))


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
        threads: ProgramThreads,
        budgets: Budgets | None = None,
        tracing: Tracing | None = None,
        cache_namespace: str = "",
        tenant_scoped_cache: bool = False,
        stream_idle_secs: float | None = None,
        stream_max_secs: float | None = None,
        recorder: Recorder | None = None,
    ) -> None:
        self.recorder = recorder  # receipts and the prediction log (FEEDBACK_ENABLED); None: off
        self._stream_idle = stream_idle_secs or request_timeout_secs  # longest pause between chunks
        self._stream_max = stream_max_secs or request_timeout_secs  # longest stream in all
        self._cache_namespace = cache_namespace  # deployment, provider, DSPy version (cache.py)
        self._tenant_scoped_cache = tenant_scoped_cache  # CACHE_SCOPE=tenant
        self._route_keys: dict[tuple[str, str, str], bytes] = {}  # (model, variant, fingerprint) -> key base
        self._threads = threads  # runs programs that have only a synchronous forward
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
        self._accountant = Accountant(ledger=ledger, metrics=metrics, prices=prices)
        self._deadline = request_timeout_secs
        self._max_in_flight = max_in_flight
        self._upstream: dict[str, asyncio.Task[tuple[CachedAnswer, PricedSpend]]] = {}
        self._upstream_count = 0
        # every upstream call running (shutdown cancels and awaits them)
        self._tasks: set[asyncio.Task[tuple[CachedAnswer, PricedSpend]]] = set()
        self._random = random.Random()
        self._assigner = build_assigner(config.ab_testing_enabled, config.ab_weights)

    @property
    def upstream_in_flight(self) -> int:
        return self._upstream_count

    async def cancel_upstream(self) -> int:
        """Cancel the upstream calls still running (shutdown, after the grace period) and wait for
        them: each accounts what it spent (its cut-off call as unmetered) before the last flush."""
        running = [task for task in self._tasks if not task.done()]
        for task in running:
            task.cancel()
        if running:
            await asyncio.gather(*running, return_exceptions=True)
        return len(running)

    def replace_programs(
        self, config: ModelsConfig, programs: dict[str, LoadedProgram], lms: LanguageModels
    ) -> None:
        """Serve a reloaded models file from now on; requests in flight finish on what they routed to.
        Breakers of models that are kept survive (the caller adds the new ones)."""
        self._config, self._programs, self._lms = config, programs, lms
        self._assigner = build_assigner(config.ab_testing_enabled, config.ab_weights)

    def _route(self, request: PredictionInput) -> Route:
        config = self._config
        model = config.models.get(request.model)
        if model is None:
            raise NotFound(f"unknown model {request.model!r}; known: {', '.join(sorted(config.models))}")
        variant = request.variant or (
            self._assigner.assign(request.user_id) if self._assigner else config.default_variant
        )
        program = self._programs.get(variant)
        if program is None:
            raise NotFound(f"unknown variant {variant!r}; known: {', '.join(sorted(self._programs))}")
        given, lm_options = split_parameters(request, program)
        inputs, canonical = program.inputs.validate(given)
        pinned = tuple(config.models[key] for key in program.pinned_models) if program.pinned_models else ()
        return Route(
            model=model,
            program=program,
            inputs=inputs,
            canonical_inputs=canonical,
            lm_options=lm_options,
            tenant=request.tenant,
            pinned=pinned,
            config=config,
            lms=self._lms,
        )

    def _cache_key(self, route: Route) -> str:
        spec, program = route.model, route.program
        marker = (spec.key, program.variant, program.fingerprint)
        base = self._route_keys.get(marker)
        if base is None:
            base = route_key(
                namespace=self._cache_namespace,
                model=spec.key,
                model_id=f"{spec.name}@{spec.api_base}" if spec.api_base else spec.name,
                variant=program.variant,
                program_fingerprint=program.fingerprint,
            )
            if len(self._route_keys) < 4096:
                self._route_keys[marker] = base
        scope = route.tenant if self._tenant_scoped_cache else None
        return request_key(base, scope, route.canonical_inputs, route.lm_options)

    async def predict(self, request: PredictionInput) -> Prediction:
        started = time.perf_counter()
        route = self._route(request)
        model_key, variant = route.model.key, route.program.variant
        metrics = self._metrics.route(model_key, variant)
        recorder = self.recorder
        key = None
        if request.use_cache and _cacheable(route):
            key = self._cache_key(route)
            hit = self._cache.get_memory(key)
            if hit is not None:  # answered without awaiting anything: never "in flight"
                result = self._served_from_cache(request, metrics, variant, hit, "memory", started)
                if recorder is not None:
                    recorder.answered(request, route, result)
                return result
        self._metrics.active.inc()
        try:
            if key is not None:
                hit = await self._cache.get_redis(key)
                if hit is not None:
                    result = self._served_from_cache(request, metrics, variant, hit, "redis", started)
                    if recorder is not None:
                        recorder.answered(request, route, result)
                    return result
            coalesced = key is not None and key in self._upstream
            answer, usage = await self._call_upstream(key, route)
        except ServiceError as exc:
            if not isinstance(exc, BudgetExceeded):  # a refusal we chose, not a failed prediction
                metrics.error.inc()  # the error's type is counted where it becomes a response
            if recorder is not None:
                recorder.failed(request, route, exc, (time.perf_counter() - started) * 1000)
            raise
        finally:
            self._metrics.active.dec()
        result = self._answered(request, metrics, variant, answer, usage, coalesced, started)
        if recorder is not None:
            recorder.answered(request, route, result)
        return result

    def stream(self, request: PredictionInput) -> AsyncGenerator[StreamChunk | Prediction, None]:
        """`predict`, streaming (see _stream); with receipts on, its receipt is written when it ends."""
        if self.recorder is None:
            return self._stream(request)
        return self._recorded_stream(request, self.recorder)

    async def _recorded_stream(
        self, request: PredictionInput, recorder: Recorder
    ) -> AsyncGenerator[StreamChunk | Prediction, None]:
        started = time.perf_counter()
        route = self._route(request)
        # aclosing: a client that goes away closes this generator, and the inner one at once (its
        # finally cancels the upstream call), not whenever it is collected.
        async with contextlib.aclosing(self._stream(request, route)) as inner:
            try:
                async for item in inner:
                    if isinstance(item, Prediction):
                        recorder.answered(request, route, item)
                    yield item
            except ServiceError as exc:
                recorder.failed(request, route, exc, (time.perf_counter() - started) * 1000)
                raise

    async def _stream(
        self, request: PredictionInput, route: Route | None = None
    ) -> AsyncGenerator[StreamChunk | Prediction, None]:
        """`predict`, streaming: the answer's text chunks as the provider sends them, then the
        Prediction. A hit (or a miss that joins an identical `predict` already in flight) is one
        chunk of the main output. A streaming miss is never shared with other requests: its client
        may go away, and closing this generator then cancels the upstream call.

        Errors before the first chunk (unknown model, budget, breaker, provider) raise from the
        first `__anext__`; the caller can still answer them with a status code.
        """
        started = time.perf_counter()
        route = route or self._route(request)
        model_key, variant = route.model.key, route.program.variant
        metrics = self._metrics.route(model_key, variant)
        key = None
        if request.use_cache and _cacheable(route):
            key = self._cache_key(route)
            hit = self._cache.get_memory(key)
            if hit is not None:
                result = self._served_from_cache(request, metrics, variant, hit, "memory", started)
                yield _whole_chunk(route, result)
                yield result
                return
        self._metrics.active.inc()
        try:
            if key is not None:
                hit = await self._cache.get_redis(key)
                if hit is not None:
                    result = self._served_from_cache(request, metrics, variant, hit, "redis", started)
                    yield _whole_chunk(route, result)
                    yield result
                    return
            shared = self._upstream.get(key) if key is not None else None
            if shared is not None:
                answer, usage = await asyncio.shield(shared)
                result = self._answered(request, metrics, variant, answer, usage, True, started)
                yield _whole_chunk(route, result)
                yield result
                return
            sink = _ChunkQueue()
            task = self._start_upstream(key, route, sink)
            task.add_done_callback(lambda _: sink.queue.put_nowait(None))
            idle = self._stream_idle
            try:
                while True:
                    # A stream may run past the request deadline while text keeps coming
                    # (STREAM_MAX_SECS caps it); a pause longer than STREAM_IDLE_TIMEOUT_SECS ends it.
                    try:
                        async with asyncio.timeout(idle):
                            chunk = await sink.queue.get()
                    except TimeoutError:
                        task.cancel()
                        raise ProviderTimeout(f"the provider sent nothing for {idle:g} s") from None
                    if chunk is None:
                        break
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
        usage: PricedSpend,
        coalesced: bool,
        started: float,
    ) -> Prediction:
        latency = time.perf_counter() - started
        metrics.success.inc()
        metrics.duration_none.observe(latency)
        if coalesced:  # another request's upstream call answered this one
            return self._spent_nothing(request, metrics, variant, answer, latency, coalesced=True)
        return Prediction(
            model=request.model,
            model_served=answer.model_served,
            variant=variant,
            output=answer.output,
            outputs=answer.outputs,
            latency_ms=latency * 1000,
            input_tokens=usage.total.input_tokens,
            output_tokens=usage.total.output_tokens,
            cost_usd=usage.total.cost_usd,
            usage_by_model=usage.by_model,
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
        return self._spent_nothing(request, metrics, variant, hit, latency, cache_level=level)

    def _spent_nothing(
        self,
        request: PredictionInput,
        metrics: RouteMetrics,
        variant: str,
        answer: CachedAnswer,
        latency: float,
        *,
        cache_level: str | None = None,
        coalesced: bool = False,
    ) -> Prediction:
        """A request answered by work already paid for (a cache hit, another request's call): it
        spends nothing, and what the answer cost is what it saved."""
        if answer.cost_usd:
            metrics.saved.inc(answer.cost_usd)
        self._ledger.record_hit(metrics.ledger_name, answer.cost_usd, request.tenant)
        return Prediction(
            model=request.model,
            model_served=answer.model_served,
            variant=variant,
            output=answer.output,
            outputs=answer.outputs,
            latency_ms=latency * 1000,
            cache_level=cache_level,
            coalesced=coalesced,
            cost_saved_usd=answer.cost_usd,
        )

    async def _call_upstream(self, key: str | None, route: Route) -> tuple[CachedAnswer, PricedSpend]:
        task = self._upstream.get(key) if key is not None else None
        if task is None:
            task = self._start_upstream(key, route, None)
        # shield: one waiter going away (client gone, its own deadline) never cancels the shared call.
        return await asyncio.shield(task)

    def _start_upstream(
        self, key: str | None, route: Route, sink: _ChunkQueue | None
    ) -> asyncio.Task[tuple[CachedAnswer, PricedSpend]]:
        """Start the upstream call as a task (stored under `key` when it succeeds); a non-streaming
        one is registered so that identical requests arriving meanwhile share it."""
        in_flight = self._upstream_count + self._threads.abandoned
        if in_flight >= self._max_in_flight:
            raise Overloaded(f"{in_flight} predictions in flight; try again shortly", retry_after=1)
        task = asyncio.get_running_loop().create_task(self._produce(key, route, sink))
        self._upstream_count += 1
        self._tasks.add(task)
        task.add_done_callback(self._upstream_done)
        if key is not None and sink is None:
            self._upstream[key] = task
            task.add_done_callback(lambda _: self._upstream.pop(key, None))
        return task

    def _upstream_done(self, task: asyncio.Task[Any]) -> None:
        self._upstream_count -= 1
        self._tasks.discard(task)
        if not task.cancelled():
            task.exception()  # mark retrieved; waiters have re-raised it where it mattered

    async def _produce(
        self, key: str | None, route: Route, sink: _ChunkQueue | None
    ) -> tuple[CachedAnswer, PricedSpend]:
        spent = Spend({})
        limit = self._deadline if sink is None else self._stream_max
        deadline_at = time.monotonic() + limit
        try:
            async with asyncio.timeout(limit):
                run, model_served = await self._run_with_fallbacks(route, spent, deadline_at, sink)
        except TimeoutError:
            self._accountant.account(route, spent)
            what = "deadline (REQUEST_TIMEOUT_SECS)" if sink is None else "cap on a stream (STREAM_MAX_SECS)"
            raise ProviderTimeout(f"no complete answer within the request's {limit:g} s {what}") from None
        except (ServiceError, asyncio.CancelledError):
            self._accountant.account(route, spent)
            raise
        usage = self._accountant.account(route, spent, answered=True)
        answer = CachedAnswer(
            outputs=run.outputs,
            main_output=run.main_output,
            model_served=model_served,
            input_tokens=usage.total.input_tokens,
            output_tokens=usage.total.output_tokens,
            cost_usd=usage.total.cost_usd,
        )
        if key is not None:
            await self._cache.set(key, answer)
        return answer, usage

    async def _run_with_fallbacks(
        self,
        route: Route,
        spent: Spend,
        deadline_at: float,
        sink: _ChunkQueue | None,
    ) -> tuple[ProgramRun, str]:
        chain = (route.model.key, *route.model.fallbacks)
        last_error: ServiceError | None = None
        for model_key in chain:
            spec = route.config.models[model_key]
            try:
                run = await self._run_within_budget(spec, route, spent, deadline_at, sink)
                return run, model_key
            except (CircuitOpen, ProviderError, ProviderTimeout, BudgetExceeded) as exc:
                last_error = exc
                if sink is not None and sink.emitted:
                    raise  # the client has part of this model's answer: another's would not continue it
                if len(chain) > 1:
                    _log.warning("prediction.fallback", model=model_key, error=exc.type, detail=exc.message)
        assert last_error is not None
        raise last_error

    async def _run_within_budget(
        self,
        spec: ModelSpec,
        route: Route,
        spent: Spend,
        deadline_at: float,
        sink: _ChunkQueue | None,
    ) -> ProgramRun:
        """`_run_with_retries` with `spec` serving, its worst-case cost held against the budgets it
        counts against first (the serving model's, pinned models', the tenant's), and settled to what
        its attempts spent when they end: given back when nothing was sent, kept when the spend is
        unknown (a call cut off before its tokens were reported)."""
        budgets = self._budgets
        if budgets is None:
            return await self._run_with_retries(spec, route, spent, deadline_at, sink)
        hold = await budgets.reserve(worst_case(route, spec, self._prices), route.tenant)
        tokens_before = dict(spent.tokens)
        unknown_before = spent.unmetered_calls + spent.running_on
        unknown = True
        try:
            run = await self._run_with_retries(spec, route, spent, deadline_at, sink)
            unknown = spent.unmetered_calls + spent.running_on > unknown_before
            return run
        except ServiceError:
            unknown = spent.unmetered_calls + spent.running_on > unknown_before
            raise
        finally:  # a cancellation (the deadline, a stream's client gone) leaves the spend unknown
            by_model = self._accountant.priced_by_model(route, spent.since(tokens_before))
            budgets.settle(hold, by_model, unknown=unknown)

    def _acquire_breakers(self, specs: tuple[ModelSpec, ...]) -> list[CircuitBreaker]:
        """The breakers of every model an attempt may call, acquired; CircuitOpen if one is open."""
        acquired: list[CircuitBreaker] = []
        for spec in specs:
            breaker = self._breakers[spec.key]
            if not breaker.try_acquire():
                for other in acquired:
                    other.record_neutral()
                raise CircuitOpen(
                    f"circuit breaker for model {spec.key!r} is open",
                    retry_after=max(1.0, breaker.retry_after()),
                )
            acquired.append(breaker)
        return acquired

    def _attempt(self, spec: ModelSpec, route: Route, sink: _ChunkQueue | None, attempt: int) -> Any:
        """One run of the program with `spec` as its default model (an awaitable)."""
        options = route.lm_options
        if spec.max_output_tokens is not None and options.get("max_tokens", 0) > spec.max_output_tokens:
            options = {**options, "max_tokens": spec.max_output_tokens}  # the model's cap
        lm = route.lms.get(spec.key, options)
        if sink is None:
            call = run_program(
                route.program,
                lm,
                route.inputs,
                threads=self._threads,
                on_late_usage=lambda tokens: self._accountant.account_late(route, tokens),
            )
        else:
            call = stream_program(route.program, lm, route.inputs, sink)
        if self._tracing is not None:  # one `lm.call` span per attempt (tracing.py)
            call = self._tracing.lm_call(call, spec.key, spec.name, attempt + 1)
        return call

    async def _run_with_retries(
        self,
        spec: ModelSpec,
        route: Route,
        spent: Spend,
        deadline_at: float,
        sink: _ChunkQueue | None,
    ) -> ProgramRun:
        """Run with `spec` as the default model, retrying what the provider may answer next time.
        Every model the attempt may call (the default and pinned ones) must have its breaker
        closed; a failure counts against the breaker of the model that failed, and its retries."""
        models = (spec, *(p for p in route.pinned if p.key != spec.key))
        by_id = {m.name: m for m in reversed(models)}
        attempt = 0
        started = time.monotonic()
        while True:
            breakers = self._acquire_breakers(models)
            try:
                run: ProgramRun = await self._attempt(spec, route, sink, attempt)
            except ProgramFailed as failure:
                spent.add(failure.usage_by_model)
                failed = by_id.get(failure.model_id or "", spec)
                failed_breaker = self._breakers[failed.key]
                for breaker in breakers:
                    if breaker is not failed_breaker or failure.kind not in _BREAKER_FAILURES:
                        breaker.record_neutral()
                if (failure.kind in _UNMETERED_FAILURES and failure.connected) or (
                    failure.kind == "server" and failure.status is None  # an error event mid-stream
                ):
                    # sent, and the answer lost: the provider may bill it
                    self._accountant.unmetered(failed, spent)
                if failure.kind not in _BREAKER_FAILURES:
                    raise client_facing_error(
                        failed, route, failure, attempt + 1, time.monotonic() - started
                    ) from None
                failed_breaker.record_failure()
                delay = self._backoff(attempt + 1, failure.retry_after)
                if (
                    attempt >= failed.max_retries
                    or time.monotonic() + delay >= deadline_at
                    or (sink is not None and sink.emitted)  # a retry would repeat what the client has
                ):
                    # Out of retries, or the wait would outlive the request: answer now, not at the deadline.
                    raise client_facing_error(
                        failed, route, failure, attempt + 1, time.monotonic() - started
                    ) from None
                attempt += 1
                await asyncio.sleep(delay)
                continue
            except BaseException as exc:
                for breaker in breakers:
                    breaker.record_neutral()  # cancelled by the deadline: free a half-open trial slot
                # The deadline, or a stream's client left: the call's spend is unknown. A synchronous
                # program's thread runs on, and reports its tokens when it returns (_account_late).
                if isinstance(exc, asyncio.CancelledError):
                    if route.program.is_async or sink is not None:
                        self._accountant.unmetered(spec, spent)
                    else:
                        spent.running_on += 1
                raise
            for breaker in breakers:
                breaker.record_success()
            spent.add(run.usage_by_model)
            return run

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        """Exponential backoff with full jitter; a provider's Retry-After is a floor."""
        delay = self._random.uniform(0, min(_BACKOFF_CAP_SECS, _BACKOFF_BASE_SECS * 2 ** (attempt - 1)))
        if retry_after is not None and retry_after > 0:
            delay = max(delay, min(retry_after, _BACKOFF_CAP_SECS * 6))
        return delay


def _cacheable(route: Route) -> bool:
    """False for a sampled request (temperature above 0, no seed) to a model with cache_sampled off."""
    if route.model.cache_sampled:
        return True
    options = route.lm_options
    return not (options.get("temperature", 0) > 0 and "seed" not in options)


def _whole_chunk(route: Route, result: Prediction) -> StreamChunk:
    """A whole answer (a hit, or another request's call) as one stream chunk of its main output:
    text as it is, anything else as JSON."""
    output = result.output
    text = output if isinstance(output, str) else orjson.dumps(output).decode()
    field = route.program.main_output or next(iter(result.outputs), "output")
    return StreamChunk(field=field, text=text)
