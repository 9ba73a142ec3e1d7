"""How handlers reach the services built at start-up (kept on the app's state)."""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

from starlette.requests import Request

from dspy_service.errors import Forbidden

if TYPE_CHECKING:
    from dspy_service.services import Services


def services_of(request: Request) -> Services:
    return cast("Services", request.app.state.services)


def is_operator(request: Request) -> bool:
    """Whether the caller may see everything: an operator key, or any caller with API keys off."""
    services = services_of(request)
    if services.keyring is None:
        return True
    return bool(request.scope.get("state", {}).get("role") == "operator")


def require_operator(request: Request, what: str) -> None:
    """Forbidden (403) unless the caller holds an operator key (ADMIN_API_KEYS, role:operator)."""
    if not is_operator(request):
        raise Forbidden(f"{what} is for operator keys (ADMIN_API_KEYS); this key is a client key")
