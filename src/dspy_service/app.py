"""`create_app(settings)`: the ASGI app, with its services built and handed down by the lifespan."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import AsyncIterator

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from dspy_service.api import batch, experiments, feedback, probes, routes, stream
from dspy_service.api.auth import AuthMiddleware
from dspy_service.api.compression import CompressionMiddleware
from dspy_service.api.limits import BodyReadTimeoutMiddleware, RateLimitMiddleware
from dspy_service.api.openapi import OpenAPIEndpoint
from dspy_service.api.programs import ProgramsEndpoint
from dspy_service.api.responses import JSONResponse, error_body, error_response
from dspy_service.errors import ServiceError
from dspy_service.logs import AccessLog, get_logger
from dspy_service.services import Services

_log = get_logger("dspy_service.app")


def _request_id(request: Request) -> str | None:
    state = request.scope.get("state") or {}
    return state.get("request_id")


async def _service_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ServiceError)
    request.app.state.services.metrics.count_error(exc.type)
    return error_response(exc, _request_id(request))


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return JSONResponse(
        error_body(kind, str(exc.detail), _request_id(request)),
        status_code=exc.status_code,
        headers=exc.headers,
    )


async def _unexpected(request: Request, exc: Exception) -> Response:
    _log.exception("request.unexpected_error", error=type(exc).__name__)
    services: Services = request.app.state.services
    services.metrics.count_error("internal")
    return JSONResponse(
        error_body("internal_error", "the service failed unexpectedly; see its logs", _request_id(request)),
        status_code=500,
    )


def create_app(services: Services) -> Starlette:
    from dspy_service.api.middleware import RequestContextMiddleware, TracingMiddleware

    settings = services.settings

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await services.start()
        # Everything start-up built (DSPy, pydantic's schemas, the programs: ~100,000 objects; the
        # Redis clients; with receipts, SQLAlchemy's engine and Alembic's migration: ~50,000 more)
        # lives as long as the process. Frozen, the collector stops scanning it on every full
        # collection, which took 25-30 ms each under load (about 1 ms after): miss p99 at 32
        # connections 73 -> 37 ms (provider 0 ms), 94 -> 81 ms (50 ms), in one bench run with
        # --baseline-src. Here, once the services have started, rather than before: what they
        # build is frozen too. (A reload frees the programs it replaces and freezes their
        # successors: reloading.py.)
        gc.collect()
        gc.freeze()
        try:
            yield
        finally:
            services.lifecycle.draining = True
            await services.stop()

    middleware = [
        Middleware(
            RequestContextMiddleware,
            max_body_bytes=settings.max_body_bytes,
            metrics=services.metrics,
            access_log=AccessLog(
                level=settings.log_level, fmt=settings.log_format, sample_rate=settings.access_log_sample_rate
            ),
        ),
        Middleware(
            BodyReadTimeoutMiddleware, timeout_secs=settings.body_read_timeout_secs, metrics=services.metrics
        ),
    ]
    if services.tracing is not None:  # off: not in the chain at all
        middleware.insert(1, Middleware(TracingMiddleware, tracing=services.tracing))
    if settings.cors_origins:
        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=settings.cors_origins,
                allow_methods=["GET", "POST"],
                allow_headers=["Content-Type", "Authorization", "X-Request-ID"],
                expose_headers=["X-Request-ID"],
                allow_credentials="*" not in settings.cors_origins,
            )
        )
    # Inside CORS (preflights need no key), outside the routes: 401 and 429 come before any body is read.
    if services.keyring is not None:
        middleware.append(
            Middleware(
                AuthMiddleware,
                keyring=services.keyring,
                metrics=services.metrics,
                metrics_public=settings.metrics_public,
                limiter=services.rate_limiter,
            )
        )
    if services.rate_limiter is not None:
        middleware.append(
            Middleware(RateLimitMiddleware, limiter=services.rate_limiter, metrics=services.metrics)
        )
    middleware.append(Middleware(CompressionMiddleware, minimum_size=1024))
    app = Starlette(
        routes=[
            Route("/v1/predict", routes.PredictEndpoint(services), methods=["POST"]),
            Route("/v1/predict/batch", batch.predict_batch, methods=["POST"]),
            Route("/v1/predict/stream", stream.StreamEndpoint(services), methods=["POST"]),
            Route("/v1/experiments", experiments.experiments, methods=["GET"]),
            Route("/v1/feedback", feedback.feedback, methods=["POST"]),
            Route("/v1/programs", ProgramsEndpoint(services), methods=["GET"]),
            Route("/health", probes.health, methods=["GET"]),
            Route("/ready", probes.ready, methods=["GET"]),
            Route("/metrics", probes.metrics, methods=["GET"]),
            Route("/costs", routes.costs, methods=["GET"]),
            Route("/config", routes.config, methods=["GET"]),
            Route("/openapi.json", OpenAPIEndpoint(services), methods=["GET"]),
        ],
        middleware=middleware,
        exception_handlers={
            ServiceError: _service_error,
            HTTPException: _http_error,
            Exception: _unexpected,
        },
        lifespan=lifespan,
    )
    app.state.services = services
    return app


def create_metrics_app(services: Services) -> Starlette:
    """The app of METRICS_PORT: `/metrics` alone, without API keys (the port is for the scraper,
    and is kept off the public network by the shipped Compose and Kubernetes files)."""

    async def scrape(request: Request) -> Response:
        return Response(generate_latest(services.metrics.scrape_registry), media_type=CONTENT_TYPE_LATEST)

    return Starlette(routes=[Route("/metrics", scrape, methods=["GET"])])
