"""Domain errors. Each carries a stable `type` and the HTTP status the API maps it to;
nothing here knows about HTTP frameworks."""

from __future__ import annotations


class ServiceError(Exception):
    """A failure a client should see as a structured error."""

    type: str = "internal_error"
    status: int = 500

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after


class InvalidRequest(ServiceError):
    type = "invalid_request"
    status = 422


class NotFound(ServiceError):
    type = "not_found"
    status = 404


class PayloadTooLarge(ServiceError):
    type = "payload_too_large"
    status = 413


class ProviderError(ServiceError):
    type = "provider_error"
    status = 502


class ProviderTimeout(ServiceError):
    type = "provider_timeout"
    status = 504


class CircuitOpen(ServiceError):
    type = "circuit_open"
    status = 503


class Overloaded(ServiceError):
    type = "overloaded"
    status = 503


class ShuttingDown(ServiceError):
    type = "shutting_down"
    status = 503


class Unauthorized(ServiceError):
    type = "unauthorized"
    status = 401


class Forbidden(ServiceError):
    type = "forbidden"
    status = 403


class RequestTimeout(ServiceError):
    type = "request_timeout"
    status = 408


class RateLimited(ServiceError):
    type = "rate_limited"
    status = 429


class BudgetExceeded(ServiceError):
    type = "budget_exceeded"
    status = 429


class ConfigError(Exception):
    """The models file (or another start-up input) is wrong; start-up stops with this message."""
