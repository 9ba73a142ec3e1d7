"""What the prediction path tells the records store: a receipt for every prediction that reached a
program (answered or failed; FEEDBACK_ENABLED), and, as PREDICTION_LOG says, what was asked and
answered.

Called on the request path, so it only builds small objects and appends them to the store's queue
(`RecordStore.submit`, which never waits and never raises); the database is the writer's business.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import random
import time
from typing import Literal

from dspy_service.errors import ServiceError
from dspy_service.logs import get_logger
from dspy_service.metrics import Metrics
from dspy_service.records import LoggedPrediction, Receipt, RecordStore, RecordsUnavailable
from dspy_service.results import Prediction
from dspy_service.routing import PredictionInput, Route
from dspy_service.settings import Settings, redact_url

_log = get_logger("dspy_service.records")
_RETRY_MIN_SECS = 1.0
_RETRY_MAX_SECS = 30.0

LogMode = Literal["off", "sampled", "all"]


def build_recorder(settings: Settings, metrics: Metrics) -> Recorder:
    """The store and what feeds it, from the settings; nothing touches the database yet."""
    if settings.database_url is None:
        settings.data_dir.mkdir(parents=True, exist_ok=True)

    def dropped(kind: str, count: int) -> None:
        metrics.records_dropped.labels(kind).inc(count)

    store = RecordStore(
        settings.effective_database_url,
        queue_size=settings.records_queue_size,
        retention_days=settings.records_retention_days,
        retention_interval_secs=settings.records_retention_interval_secs,
        on_dropped=dropped,
    )
    return Recorder(
        store,
        log_mode=settings.prediction_log,
        sample_rate=settings.prediction_log_sample_rate,
        excluded_fields=settings.prediction_log_excluded,
        migrate=settings.database_migrate,
    )


class Recorder:
    def __init__(
        self,
        store: RecordStore,
        *,
        log_mode: LogMode = "off",
        sample_rate: float = 0.0,
        excluded_fields: frozenset[str] = frozenset(),
        migrate: bool = True,
    ) -> None:
        self.store = store
        self.ready = False  # the schema is there and the writer runs
        self._migrate = migrate
        self._starting: asyncio.Task[None] | None = None
        self._log_mode = log_mode
        self._sample_rate = sample_rate
        self._excluded = excluded_fields  # input fields never stored (PREDICTION_LOG_EXCLUDE_FIELDS)
        self._random = random.Random()

    async def start(self) -> None:
        """Migrate and start writing; a database that is down does not hold the service up: it is
        tried again in the background, with backoff, and records queue (then drop, counted) meanwhile."""
        if not await self._try_start():
            self._starting = asyncio.get_running_loop().create_task(
                self._start_later(), name="records-start", context=contextvars.Context()
            )

    async def _try_start(self) -> bool:
        try:
            await self.store.start(migrate=self._migrate)
        except RecordsUnavailable as exc:
            _log.error("records.unavailable", database=redact_url(self.store.url), error=exc.message)
            return False
        self.ready = True
        _log.info("records.ready", database=redact_url(self.store.url))
        return True

    async def _start_later(self) -> None:
        delay = _RETRY_MIN_SECS
        while True:
            await asyncio.sleep(delay)
            if await self._try_start():
                return
            delay = min(delay * 2, _RETRY_MAX_SECS)

    async def close(self) -> None:
        if self._starting is not None:
            self._starting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._starting
        await self.store.close()

    def answered(self, request: PredictionInput, route: Route, result: Prediction) -> None:
        if request.request_id is None:
            return
        receipt = answered_receipt(request.request_id, request, route, result)
        logged = None
        if self._log_mode == "all" or (
            self._log_mode == "sampled" and self._random.random() < self._sample_rate
        ):
            inputs = route.inputs
            if self._excluded:
                inputs = {name: value for name, value in inputs.items() if name not in self._excluded}
            logged = LoggedPrediction(inputs=inputs, outputs=result.outputs)
        self.store.submit(receipt, logged)

    def failed(self, request: PredictionInput, route: Route, error: ServiceError, latency_ms: float) -> None:
        if request.request_id is None:
            return
        self.store.submit(
            Receipt(
                request_id=request.request_id,
                model=request.model,
                model_served=request.model,
                variant=route.program.variant,
                fingerprint=route.program.fingerprint,
                tenant=request.tenant,
                source=request.source,
                ok=False,
                error_type=error.type,
                cost_usd=None if error.type in _UNKNOWN_SPEND else 0.0,
                latency_ms=latency_ms,
            )
        )


def answered_receipt(request_id: str, request: PredictionInput, route: Route, result: Prediction) -> Receipt:
    """The receipt of an answered prediction. By position, unlike everywhere else: this runs for
    every answer, a memory hit included, and a dataclass's __init__ takes 15 keywords at 2.6 times
    the cost of 15 positions (entries.py). Keep the order of Receipt's fields."""
    return Receipt(
        request_id,
        request.model,
        result.model_served,
        result.variant,
        route.program.fingerprint,
        request.tenant,
        request.source,
        True,  # ok
        None,  # error_type
        result.cache_level,
        result.coalesced,
        result.input_tokens,
        result.output_tokens,
        result.cost_usd,
        result.cost_saved_usd,
        result.usage_by_model,
        0,  # unmetered_calls
        result.latency_ms,
        time.time(),  # created_at
    )


# Failures after which what was spent is not known (the provider may have run the call).
_UNKNOWN_SPEND = frozenset({"provider_timeout", "timeout", "shutting_down"})
