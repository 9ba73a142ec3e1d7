"""Building the service's parts from settings, starting them, and stopping them in order."""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry

from dspy_service.api_keys import Keyring, load_keyring
from dspy_service.breaker import BreakerState, CircuitBreaker
from dspy_service.budgets import Budgets
from dspy_service.cache import MemoryCache, RedisCache, TwoLevelCache, cache_namespace
from dspy_service.costs import CostLedger, Price, configured_price
from dspy_service.errors import ConfigError
from dspy_service.logs import current_request_id, get_logger
from dspy_service.metrics import Metrics
from dspy_service.models_config import ModelsConfig, load_models_config
from dspy_service.predictor import Predictor
from dspy_service.programs import (
    LanguageModels,
    LoadedProgram,
    ProgramThreads,
    ToolObserver,
    bundled_price,
    configure_dspy,
    dspy_version,
    load_program,
    pin_predictors,
    use_program_dirs,
)
from dspy_service.ratelimit import RateLimiter
from dspy_service.redis_epoch import StateEpoch
from dspy_service.redis_link import RedisLink
from dspy_service.settings import Settings, redact_url
from dspy_service.tracing import Tracing, build_tracing

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

    from dspy_service.cost_recovery import CostRecovery
    from dspy_service.recording import Recorder

_log = get_logger("dspy_service.services")
_STOP_STEP_SECS = 10.0  # longest one shutdown step may take (the records writer's drain takes 5)


@dataclass
class Lifecycle:
    started_at: float = field(default_factory=time.monotonic)
    started: bool = False
    draining: bool = False
    in_flight: int = 0  # predictions being served; shutdown waits for them
    # Program threads still running for requests that have ended (their deadline passed): a thread
    # cannot be stopped, so shutdown waits for them too, within the grace period.
    threads_running_on: Callable[[], int] = lambda: 0

    @property
    def busy(self) -> int:
        return self.in_flight + self.threads_running_on()


@dataclass
class Services:
    settings: Settings
    models_config: ModelsConfig
    metrics: Metrics
    programs: dict[str, LoadedProgram]
    cache: TwoLevelCache
    breakers: dict[str, CircuitBreaker]
    ledger: CostLedger
    predictor: Predictor
    lms: LanguageModels
    redis_link: RedisLink | None
    provider_description: str
    lifecycle: Lifecycle
    keyring: Keyring | None = None  # None: authentication is off
    rate_limiter: RateLimiter | None = None
    budgets: Budgets | None = None
    tracing: Tracing | None = None  # None: tracing is off
    threads: ProgramThreads | None = None
    cache_link: RedisLink | None = None  # the cache's own Redis (REDIS_CACHE_URL), if it has one
    epoch: StateEpoch | None = None  # notices a state Redis that came back empty
    recorder: Recorder | None = None  # receipts, feedback, the prediction log (records/)
    recovery: CostRecovery | None = None  # rebuilds lost fleet totals from the receipts
    # Price per provider model id, shared with the predictor (its `prices` is this dict's `get`):
    # a reload updates it in place.
    prices: dict[str, Price | None] = field(default_factory=dict)

    async def start(self) -> None:
        if self.redis_link is not None:
            if self.epoch is not None:  # first among the link's listeners: before anything is flushed
                self.redis_link.on_reconnect(self.epoch.check)
                self.ledger.before_flush = self.epoch.check
                if self.recovery is not None:
                    self.epoch.on_begun(self.recovery.epoch_begun)
            await self.redis_link.start()
            if self.epoch is not None:
                await self.epoch.check()
        if self.cache_link is not None:
            await self.cache_link.start()
        self.ledger.start()
        if self.budgets is not None:
            self.budgets.start()
        if self.recorder is not None:
            await self.recorder.start()
        self.lifecycle.started = True
        self._warn_if_unprotected()
        _log.info(
            "service.started",
            version=self.settings.service_version,
            provider=self.provider_description,
            redis=self.settings.redacted_redis_url(),
            redis_connected=bool(self.redis_link and self.redis_link.connected),
            models=sorted(self.models_config.models),
            variants=sorted(self.programs),
        )

    def _warn_if_unprotected(self) -> None:
        """A real provider key, no API keys and a non-loopback address: anyone who reaches the port
        spends the provider's money. Allowed (a trusted network may front it), but never quietly."""
        settings = self.settings
        if settings.uses_simulator or self.keyring is not None:
            return
        if settings.host in ("127.0.0.1", "localhost", "::1") or settings.host.startswith("127."):
            return
        _log.warning(
            "service.unprotected",
            host=settings.host,
            detail="a real provider is configured, API keys are off and the service listens beyond "
            "loopback: anyone who can reach it spends on your provider account. Set API_KEYS or "
            "API_KEYS_FILE, or bind HOST=127.0.0.1 behind a proxy that authenticates.",
        )

    async def stop(self) -> None:
        # Should shutdown still hang past its bounds, every thread's stack goes to stderr (the log).
        faulthandler.dump_traceback_later(3 * _STOP_STEP_SECS, exit=False)
        try:
            await self._stop()
        finally:
            faulthandler.cancel_dump_traceback_later()

    async def _stop(self) -> None:
        cancelled = 0
        try:
            async with asyncio.timeout(_STOP_STEP_SECS):
                cancelled = await self.predictor.cancel_upstream()  # their spend is counted before the flush
        except TimeoutError:
            _log.error("service.stop_step_timed_out", step="upstream calls", secs=_STOP_STEP_SECS)
        if cancelled:
            _log.warning("service.upstream_cancelled", calls=cancelled, detail="cut off by shutdown")
        if self.threads is not None and self.threads.abandoned:
            # the drain waited for them within the grace period; this is the last word on them
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await self.threads.wait_idle()
            _log.info("service.program_threads", still_running=self.threads.abandoned)
        # Each step is bounded: a step that hangs (a client whose close waits on a dead peer, say)
        # is named in the log and the rest still run, so the process always exits.
        steps: list[tuple[str, Callable[[], Awaitable[Any]]]] = []
        if self.recovery is not None:
            steps.append(("cost recovery", self.recovery.close))
        steps.append(("cost totals", self.ledger.close))
        if self.budgets is not None:
            steps.append(("budgets", self.budgets.close))
        if self.recorder is not None:
            steps.append(("records", self.recorder.close))  # what is queued is written, within a bound
        if self.redis_link is not None:
            steps.append(("redis", self.redis_link.close))
        if self.cache_link is not None:
            steps.append(("cache redis", self.cache_link.close))
        steps.append(("provider clients", self.lms.aclose))
        if self.tracing is not None:
            steps.append(("tracing", self.tracing.close))  # last: the spans of the last requests go out too
        for name, step in steps:
            began = time.monotonic()
            try:
                async with asyncio.timeout(_STOP_STEP_SECS):
                    await step()
                if (took := time.monotonic() - began) > 1.0:
                    _log.warning("service.stop_step_slow", step=name, secs=round(took, 2))
            except TimeoutError:
                _log.error("service.stop_step_timed_out", step=name, secs=_STOP_STEP_SECS)
            except Exception as exc:
                _log.error("service.stop_step_failed", step=name, error=f"{type(exc).__name__}: {exc}"[:300])
        _log.info("service.stopped")


def build_programs(
    settings: Settings,
    models_config: ModelsConfig,
    metrics: Metrics,
    tracing: Tracing | None,
    *,
    api_key: str,
    base_url: str | None,
) -> tuple[dict[str, LoadedProgram], LanguageModels]:
    """Every variant's program, with its pinned predictors given their models' LMs, and the LMs;
    ConfigError for any program that cannot be built (start-up and reloads alike)."""
    use_program_dirs(settings.program_dirs)
    source = str(models_config.source)
    programs = {
        key: load_program(spec, source, callbacks=(ToolObserver(key, metrics, tracing),))
        for key, spec in models_config.variants.items()
    }

    def headers_of() -> list[tuple[str, str]]:
        """The request's ID and trace context, sent with every provider call, so that a gateway's
        logs and traces join ours."""
        request_id = current_request_id()
        headers = [("X-Request-ID", request_id)] if request_id else []
        if tracing is not None:
            headers += tracing.propagation_headers()
        return headers

    lms = LanguageModels(models_config.models, api_key=api_key, base_url=base_url, headers_of=headers_of)
    for program in programs.values():
        pin_predictors(program, lms.base)
    return programs, lms


def provider_credentials(settings: Settings, base_url: str | None) -> tuple[str, str | None]:
    """The API key and base URL the LMs are built with (`base_url`: the simulator's, if one serves)."""
    api_key = settings.openai_api_key.get_secret_value() if settings.openai_api_key else None
    return api_key or "simulator", base_url or settings.openai_base_url


def build_breaker(key: str, settings: Settings, metrics: Metrics) -> CircuitBreaker:
    """The breaker of model `key`, reporting its transitions to the metrics and the log."""

    def breaker_changed(name: str, old: BreakerState, new: BreakerState) -> None:
        metrics.set_breaker_state(name, new)
        log = _log.warning if new == "open" else _log.info
        log("breaker.transition", model=name, old=old, new=new)

    breaker = CircuitBreaker(
        key,
        failure_threshold=settings.circuit_breaker_failure_threshold,
        success_threshold=settings.circuit_breaker_success_threshold,
        open_secs=settings.circuit_breaker_timeout_secs,
        on_change=breaker_changed,
    )
    metrics.set_breaker_state(key, "closed")
    return breaker


def build_price_lookup(config: ModelsConfig) -> dict[str, Price | None]:
    """Price per provider model id: configured prices first, else DSPy's bundled data, else None."""
    prices: dict[str, Price | None] = {}
    for spec in config.models.values():
        prices[spec.name] = configured_price(spec) or bundled_price(spec.name)
    return prices


def check_budgets_priced(config: ModelsConfig, prices: dict[str, Price | None]) -> None:
    """ConfigError for a budget whose spend cannot be priced (start-up and reloads alike): a model
    budget of an unpriced model, or a tenant budget while any model a tenant may call is unpriced
    (its spend there would never count against the tenant)."""
    for key in config.budgets.models:
        if prices.get(config.models[key].name) is None:
            raise ConfigError(
                f"{config.source}: budgets.models.{key}: no price is known for this model, so its "
                "spend cannot be counted; give cost_per_1k_input_tokens and cost_per_1k_output_tokens"
            )
    if config.budgets.tenants:
        tenant = next(iter(config.budgets.tenants))
        for key, spec in config.models.items():
            if prices.get(spec.name) is None:
                raise ConfigError(
                    f"{config.source}: budgets.tenants.{tenant}: tenant {tenant!r} has a budget, but "
                    f"model {key!r} has no known price, so what the tenant spends on it could not be "
                    f"counted; give models.{key} cost_per_1k_input_tokens and cost_per_1k_output_tokens"
                )


def build_budgets(
    config: ModelsConfig,
    prices: dict[str, Price | None],
    keyring: Keyring | None,
    link: RedisLink | None,
    metrics: Metrics,
) -> Budgets | None:
    """The models file's budgets, or None without any. A budget whose spend cannot be priced stops
    start-up; one for a tenant no API key names is only a warning (keys change more often)."""
    budgets = config.budgets
    check_budgets_priced(config, prices)
    known_tenants = set(keyring.tenants) if keyring is not None else set()
    for tenant in budgets.tenants:
        if tenant not in known_tenants:
            _log.warning("budget.unknown_tenant", tenant=tenant, detail="no API key names this tenant")
    if not budgets.models and not budgets.tenants:
        return None
    return Budgets(budgets, link, metrics)


def build_services(
    settings: Settings,
    *,
    models_config: ModelsConfig | None = None,
    registry: CollectorRegistry | None = None,
    base_url: str | None = None,
    tracer_provider: TracerProvider | None = None,
) -> Services:
    """Everything the app needs, built once; raises ConfigError for a broken models file.

    `tracer_provider` turns tracing on with that provider (tests: an in-memory exporter) whatever the
    OTEL_* settings say; without one, an OTLP endpoint in the settings turns it on.
    """
    configure_dspy(settings.program_threads)
    tracing = build_tracing(settings, tracer_provider)
    metrics = Metrics(registry or CollectorRegistry())
    if models_config is None:
        models_config = load_models_config(settings.models_config)
    api_key, provider_url = provider_credentials(settings, base_url)
    programs, lms = build_programs(
        settings, models_config, metrics, tracing, api_key=api_key, base_url=provider_url
    )
    if base_url is not None and settings.uses_simulator:
        provider_description = f"simulator at {base_url}"
    elif provider_url:
        provider_description = f"OpenAI-compatible API at {redact_url(provider_url)}"
    else:
        provider_description = "provider default endpoints"

    link = None
    if settings.redis_url.get_secret_value():
        link = RedisLink(
            settings.redis_topology(),
            timeout=settings.redis_timeout_secs,
            metrics=metrics,
            redacted_url=settings.redacted_redis_url(),
            namespace=settings.service_name,
        )
    cache_link = link
    if (cache_topology := settings.redis_cache_topology()) is not None:
        cache_link = RedisLink(
            cache_topology,
            timeout=settings.redis_timeout_secs,
            metrics=metrics,
            redacted_url=settings.redacted_redis_cache_url() or "",
            role="cache",
            namespace=settings.service_name,
        )
    cache = TwoLevelCache(
        MemoryCache(
            settings.memory_cache_size, settings.memory_cache_ttl_secs, settings.memory_cache_max_bytes
        ),
        RedisCache(cache_link, settings.redis_cache_ttl_secs) if cache_link is not None else None,
        metrics,
        tracing,
        max_entry_bytes=settings.cache_max_entry_bytes,
    )

    breakers = {key: build_breaker(key, settings, metrics) for key in models_config.models}
    ledger = CostLedger(link, settings.costs_flush_interval_secs)
    prices = build_price_lookup(models_config)
    keyring = load_keyring(settings)
    budgets = build_budgets(models_config, prices, keyring, link, metrics)
    rule = settings.rate_limit_rule
    rate_limiter = RateLimiter(link, limit=rule[0], period_secs=rule[1]) if rule is not None else None
    threads = ProgramThreads(metrics.program_threads_busy)
    recorder = recovery = None
    if settings.records_enabled:
        from dspy_service.cost_recovery import CostRecovery  # SQLAlchemy only when records are on
        from dspy_service.recording import build_recorder

        recorder = build_recorder(settings, metrics)
        if link is not None:  # every prediction has a receipt: its spend survives Redis
            recovery = CostRecovery(link, recorder.store, ledger, budgets)
    predictor = Predictor(
        config=models_config,
        programs=programs,
        lms=lms,
        cache=cache,
        breakers=breakers,
        ledger=ledger,
        metrics=metrics,
        prices=prices.get,
        request_timeout_secs=settings.request_timeout_secs,
        max_in_flight=settings.max_in_flight,
        threads=threads,
        budgets=budgets,
        tracing=tracing,
        cache_namespace=cache_namespace(
            service_name=settings.service_name,
            provider="simulator" if settings.uses_simulator else redact_url(provider_url or "default"),
            dspy_version=dspy_version(),
        ),
        tenant_scoped_cache=settings.effective_cache_scope == "tenant",
        stream_idle_secs=settings.stream_idle_timeout_secs,
        stream_max_secs=max(settings.stream_max_secs, settings.request_timeout_secs),
        recorder=recorder,
    )
    return Services(
        settings=settings,
        models_config=models_config,
        metrics=metrics,
        programs=programs,
        cache=cache,
        breakers=breakers,
        ledger=ledger,
        predictor=predictor,
        lms=lms,
        redis_link=link,
        cache_link=cache_link if cache_link is not link else None,
        epoch=StateEpoch(link, metrics) if link is not None else None,
        provider_description=provider_description,
        lifecycle=Lifecycle(threads_running_on=lambda: threads.abandoned),
        threads=threads,
        keyring=keyring,
        rate_limiter=rate_limiter,
        budgets=budgets,
        tracing=tracing,
        prices=prices,
        recorder=recorder,
        recovery=recovery,
    )
