"""How handlers reach the services built at start-up (kept on the app's state)."""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

from starlette.requests import Request

if TYPE_CHECKING:
    from dspy_service.services import Services


def services_of(request: Request) -> Services:
    return cast("Services", request.app.state.services)
