"""Liveness, readiness and the Prometheus scrape."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import Request
from starlette.responses import Response

from dspy_service.api.deps import require_operator, services_of
from dspy_service.api.responses import JSONResponse
from dspy_service.errors import NotFound

if TYPE_CHECKING:
    from dspy_service.services import Services


async def health(request: Request) -> Response:
    """Liveness: 200 while the process serves; the body says how its parts are doing."""
    services = services_of(request)
    link = services.redis_link
    cache_link = services.cache_link or link
    body = {
        "status": "healthy",
        "version": services.settings.service_version,
        "uptime_secs": int(time.monotonic() - services.lifecycle.started_at),
        "redis_connected": bool(link is not None and link.connected),
        "redis_cache_connected": bool(cache_link is not None and cache_link.connected),
        "python_initialized": True,
        "cache_size": len(services.cache.memory),
        "circuit_breakers": {name: breaker.state for name, breaker in services.breakers.items()},
        "provider": services.provider_description,
        "redis": redis_view(services, detailed=False),
    }
    if services.settings.uses_simulator:
        body["warning"] = "no OPENAI_API_KEY: answers come from the built-in simulator, not a real model"
    return JSONResponse(body)


def redis_view(services: Services, *, detailed: bool) -> dict[str, Any]:
    """Each Redis role's topology and how its nodes answer; addresses only when `detailed` (for
    operators, on /config: a fleet's internal addresses stay off the unauthenticated /health)."""
    view: dict[str, Any] = {}
    for role, link in (("state", services.redis_link), ("cache", services.cache_link)):
        if link is not None:
            view[role] = link.describe() if detailed else link.summary()
    if "cache" not in view and "state" in view:
        view["cache"] = {"shares": "state"}
    return view


async def ready(request: Request) -> Response:
    """Readiness: 503 while starting, while shutting down, or (with REDIS_REQUIRED) without Redis."""
    services = services_of(request)
    link = services.redis_link
    redis_ok = link is not None and link.connected
    checks = {
        "started": services.lifecycle.started,
        "accepting": not services.lifecycle.draining,
        "redis": "connected"
        if redis_ok
        else ("required but unreachable" if services.settings.redis_required else "optional, unreachable"),
    }
    ready_now = services.lifecycle.started and not services.lifecycle.draining
    if services.settings.redis_required and not redis_ok:
        ready_now = False
    return JSONResponse({"ready": ready_now, "checks": checks}, status_code=200 if ready_now else 503)


async def metrics(request: Request) -> Response:
    services = services_of(request)
    if (
        services.settings.metrics_port
        and request.scope.get("server", (None, None))[1] != services.settings.metrics_port
    ):
        raise NotFound("/metrics is served on METRICS_PORT")
    if not services.settings.metrics_public and not services.settings.metrics_port:
        require_operator(request, "/metrics")
    return Response(
        generate_latest(services_of(request).metrics.scrape_registry), media_type=CONTENT_TYPE_LATEST
    )
