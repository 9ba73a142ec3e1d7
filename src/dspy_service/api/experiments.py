"""`GET /v1/experiments`: the A/B report per variant, read from this replica's own metrics."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from dspy_service.api.deps import require_operator, services_of
from dspy_service.api.responses import JSONResponse
from dspy_service.experiments import experiments_report


async def experiments(request: Request) -> Response:
    require_operator(request, "/v1/experiments")  # every tenant's traffic, by variant
    services = services_of(request)
    config = services.models_config
    samples = (sample for family in services.metrics.registry.collect() for sample in family.samples)
    report = experiments_report(
        samples,
        variants=config.variants,
        enabled=config.ab_testing_enabled,
        weights=config.ab_weights,
        default_variant=config.default_variant,
    )
    return JSONResponse(report)
