"""Every Prometheus metric of the service, built on an injected registry.

Label children used on the hot path are resolved once per (model, variant) and reused, so a
request costs a dictionary lookup and a few `inc()` calls, not a label resolution per metric.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    multiprocess,
)

DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

BREAKER_STATE_VALUES = {"closed": 0, "open": 1, "half_open": 2}


@dataclass(frozen=True, slots=True)
class RouteMetrics:
    """Pre-resolved children for one (model, variant) pair."""

    ledger_name: str  # "model:variant", the cost ledger's row for the pair
    success: Counter
    error: Counter
    duration_memory: Histogram
    duration_redis: Histogram
    duration_none: Histogram
    cost: Counter
    saved: Counter
    input_tokens: Counter
    output_tokens: Counter


class Metrics:
    """The service's metric families; one instance per app, on its own registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        # `*_created` series double the scrape and no dashboard or alert reads them.
        disable_created_metrics()  # type: ignore[no-untyped-call]  # prometheus_client leaves it unannotated
        self.registry = registry
        self.scrape_registry = registry  # what /metrics exposes
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            # WORKERS>1 (workers.py): every worker's samples, read from the shared directory.
            self.scrape_registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(self.scrape_registry)  # type: ignore[no-untyped-call]
        self.predictions = Counter(
            "dspy_predictions_total",
            "Predictions served, by model, variant and status.",
            ["model", "variant", "status"],
            registry=registry,
        )
        self.duration = Histogram(
            "dspy_prediction_duration_seconds",
            "Prediction latency in seconds, by cache level.",
            ["model", "variant", "cache_level"],
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.cache_operations = Counter(
            "dspy_cache_operations_total",
            "Cache lookups by level and outcome (hit or miss).",
            ["level", "operation"],
            registry=registry,
        )
        self.breaker_state = Gauge(
            "dspy_circuit_breaker_state",
            "Circuit breaker state per model: 0 closed, 1 open, 2 half-open.",
            ["model"],
            registry=registry,
            multiprocess_mode="liveall",  # with WORKERS>1 each worker's own breakers, by pid
        )
        self.cost = Counter(
            "dspy_prediction_cost",
            "Money spent on the provider in USD, by model and variant.",
            ["model", "variant"],
            registry=registry,
        )
        self.cost_saved = Counter(
            "dspy_cost_saved",
            "Money the cache saved in USD (what hits would have cost).",
            ["model", "variant"],
            registry=registry,
        )
        self.tokens = Counter(
            "dspy_token_usage",
            "Provider-reported tokens by model, variant and type (input, output).",
            ["model", "variant", "type"],
            registry=registry,
        )
        self.active = Gauge(
            "dspy_active_predictions",
            "Predictions in flight.",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.errors = Counter("dspy_errors", "Errors by type.", ["type"], registry=registry)
        self.redis_connected = Gauge(
            "dspy_redis_connected",
            "1 while Redis answers, 0 while it does not, by role: state (REDIS_URL: costs, budgets, rate "
            "limits) and cache (REDIS_CACHE_URL, when the cache has a Redis of its own).",
            ["role"],
            registry=registry,
            multiprocess_mode="livemax",
        )
        self.redis_state_lost = Counter(
            "dspy_redis_state_lost",
            "Times the state Redis came back without its data (its epoch marker changed): fleet totals "
            "and budget spend count again from then.",
            registry=registry,
        )
        self.records_dropped = Counter(
            "dspy_records_dropped",
            "Records the records store could not keep (queue full, or the database down past the retry "
            "time), by kind: receipt, prediction (the prediction log) or feedback.",
            ["kind"],
            registry=registry,
        )
        self.feedback = Counter(
            "dspy_feedback",
            "Feedback values kept (POST /v1/feedback), by variant and metric.",
            ["variant", "metric"],
            registry=registry,
        )
        self.redis_batches_recovered = Counter(
            "dspy_redis_batches_recovered",
            "Batches of cost totals or budget spend that Redis had confirmed but lost in a failover (the "
            "new primary had not received them), found after reconnecting and applied once, by purpose.",
            ["purpose"],
            registry=registry,
        )
        self.redis_command_errors = Counter(
            "dspy_redis_command_errors",
            "Redis operations that failed without Redis being down, by error: a command Redis refused "
            "(OOM, WRONGTYPE, ...) or pool_busy (no pooled connection free within the timeout). Each "
            "fails open; the link stays up.",
            ["error"],
            registry=registry,
        )
        self.unpriced = Counter(
            "dspy_unpriced_predictions",
            "Predictions whose cost could not be computed (no known price).",
            ["model"],
            registry=registry,
        )
        self.unmetered_calls = Counter(
            "dspy_unmetered_provider_calls",
            "Provider calls cut off after reaching the provider (timeout, dropped connection, deadline, a "
            "stream's client gone) before it reported their tokens: spend that may have happened and is "
            "not in the cost figures.",
            ["model"],
            registry=registry,
        )
        self.budget_spent_ratio = Gauge(
            "dspy_budget_spent_ratio",
            "Share of today's (UTC) budget spent fleet-wide, by scope (model, tenant) and name.",
            ["scope", "name"],
            registry=registry,
            multiprocess_mode="livemax",
        )
        self.tool_calls = Counter(
            "dspy_tool_calls",
            "Tool calls made by programs (ReAct and other tool users), by variant, tool and status "
            "(ok, or error when the tool raised: the program sees the error, the request does not fail).",
            ["variant", "tool", "status"],
            registry=registry,
        )
        self.program_threads_busy = Gauge(
            "dspy_program_threads_busy",
            "Threads running programs that have only a synchronous forward (PROGRAM_THREADS is the "
            "pool's size); a thread past its request's deadline counts until it returns.",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.cache_skipped = Counter(
            "dspy_cache_skipped",
            "Answers stored in neither cache level, by reason (too_large: over CACHE_MAX_ENTRY_BYTES).",
            ["reason"],
            registry=registry,
        )
        self.cache_skipped_too_large = self.cache_skipped.labels("too_large")
        self.cache_hit_memory = self.cache_operations.labels("memory", "hit")
        self.cache_miss_memory = self.cache_operations.labels("memory", "miss")
        self.cache_hit_redis = self.cache_operations.labels("redis", "hit")
        self.cache_miss_redis = self.cache_operations.labels("redis", "miss")
        self._routes: dict[tuple[str, str], RouteMetrics] = {}
        self._errors: dict[str, Counter] = {}

    def route(self, model: str, variant: str) -> RouteMetrics:
        found = self._routes.get((model, variant))
        if found is None:
            found = RouteMetrics(
                ledger_name=f"{model}:{variant}",
                success=self.predictions.labels(model, variant, "success"),
                error=self.predictions.labels(model, variant, "error"),
                duration_memory=self.duration.labels(model, variant, "memory"),
                duration_redis=self.duration.labels(model, variant, "redis"),
                duration_none=self.duration.labels(model, variant, "none"),
                cost=self.cost.labels(model, variant),
                saved=self.cost_saved.labels(model, variant),
                input_tokens=self.tokens.labels(model, variant, "input"),
                output_tokens=self.tokens.labels(model, variant, "output"),
            )
            self._routes[(model, variant)] = found
        return found

    def count_error(self, error_type: str) -> None:
        child = self._errors.get(error_type)
        if child is None:
            child = self._errors[error_type] = self.errors.labels(error_type)
        child.inc()

    def set_breaker_state(self, model: str, state: str) -> None:
        self.breaker_state.labels(model).set(BREAKER_STATE_VALUES[state])
