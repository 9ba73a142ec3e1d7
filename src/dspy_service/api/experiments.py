"""`GET /v1/experiments[?since=7d]`: the A/B report per variant.

Latency, errors, cache and cost come from this replica's own metrics. With the records store on
(FEEDBACK_ENABLED or PREDICTION_LOG), `quality` adds what the feedback says of each variant, read
from the database and so fleet-wide; `since` limits it to the predictions made since then. A
database that cannot answer (within QUALITY_TIMEOUT_SECS) leaves the rest of the report standing:
`quality` then says why its figures are missing.
"""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import Response

from dspy_service.api.deps import require_operator, services_of
from dspy_service.api.responses import JSONResponse
from dspy_service.errors import InvalidRequest
from dspy_service.experiments import experiments_report
from dspy_service.models_config import ModelsConfig

if TYPE_CHECKING:
    from dspy_service.recording import Recorder

QUALITY_TIMEOUT_SECS = 5.0


async def experiments(request: Request) -> Response:
    require_operator(request, "/v1/experiments")  # every tenant's traffic, by variant
    services = services_of(request)
    config = services.models_config
    since = _since(request.query_params.get("since"))
    samples = (sample for family in services.metrics.registry.collect() for sample in family.samples)
    report = experiments_report(
        samples,
        variants=config.variants,
        enabled=config.ab_testing_enabled,
        weights=config.ab_weights,
        default_variant=config.default_variant,
    )
    if services.recorder is not None:
        report["quality"] = await quality_section(services.recorder, config, since)
    return JSONResponse(report)


def _since(text: str | None) -> datetime | None:
    """`since` as parse_since reads it (an age such as 7d, 12h, 30m, or an ISO date or time)."""
    if text is None:
        return None
    from dspy_service.records.export import parse_since  # SQLAlchemy only when asked for

    try:
        return parse_since(text)
    except (ValueError, OverflowError) as exc:  # OverflowError: an age beyond the calendar
        message = str(exc) if isinstance(exc, ValueError) else f"since {text!r} reaches back too far"
        raise InvalidRequest(message) from None


async def quality_section(recorder: Recorder, config: ModelsConfig, since: datetime | None) -> dict[str, Any]:
    """The store's quality report with `available: true`, or `available: false` and the reason."""
    from dspy_service.records import RecordsUnavailable

    if not recorder.ready:
        return _missing("the records database has not been reached since start-up (it is retried)", since)
    try:
        async with asyncio.timeout(QUALITY_TIMEOUT_SECS):
            quality = await recorder.store.quality(
                config.default_variant, config.feedback, since, variants=tuple(config.variants)
            )
    except RecordsUnavailable as exc:
        return _missing(exc.message, since)
    except TimeoutError:
        return _missing(f"the records database did not answer within {QUALITY_TIMEOUT_SECS:g} s", since)
    return {"available": True, **quality}


def _missing(reason: str, since: datetime | None) -> dict[str, Any]:
    return {
        "available": False,
        "reason": reason,
        "scope": "fleet",
        "since": None if since is None else since.isoformat(),
    }
