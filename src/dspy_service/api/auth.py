"""API-key authentication as plain ASGI middleware.

Runs inside RequestContextMiddleware, so a 401 carries the request ID. Every path needs
`Authorization: Bearer <key>` except the probes (and `/metrics` with METRICS_PUBLIC=true). A missing
key goes through the same hash-and-compare as a wrong one, so the two take the same time. The
key's tenant (if it names one) goes to `scope["state"]["tenant"]` and the request's log line; a
short digest prefix (`key_id`) tells keys without a tenant apart. The key itself goes nowhere.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

from dspy_service.api.limits import address_identity, refuse_if_limited
from dspy_service.api.responses import send_error
from dspy_service.api_keys import Keyring
from dspy_service.errors import Unauthorized
from dspy_service.metrics import Metrics
from dspy_service.ratelimit import RateLimiter

PROBE_PATHS = frozenset({"/health", "/ready"})

_MISSING = Unauthorized("an API key is required: send 'Authorization: Bearer <key>'")
_INVALID = Unauthorized("the API key is not valid")
_CHALLENGE_MISSING = [(b"www-authenticate", b'Bearer realm="dspy-service"')]
_CHALLENGE_INVALID = [(b"www-authenticate", b'Bearer realm="dspy-service", error="invalid_token"')]


def bearer_token(scope: Scope) -> bytes:
    """The credentials of an `Authorization: Bearer ...` header, or b"" when there is none."""
    for name, value in scope["headers"]:
        if name == b"authorization":
            scheme, _, token = value.partition(b" ")
            return token.strip() if scheme.lower() == b"bearer" else b""
    return b""


class AuthMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        *,
        keyring: Keyring,
        metrics: Metrics,
        metrics_public: bool,
        limiter: RateLimiter | None = None,
    ) -> None:
        self.app = app
        self.keyring = keyring
        self.limiter = limiter  # counts refused requests per client address (RATE_LIMIT)
        self.metrics = metrics
        self.open_paths = PROBE_PATHS | {"/metrics"} if metrics_public else PROBE_PATHS

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.open_paths:
            await self.app(scope, receive, send)
            return
        presented = bearer_token(scope)
        key = self.keyring.identify(presented)  # also for a missing key: same work, same time
        state = scope.setdefault("state", {})
        log_fields = state.get("log")
        if key is None:
            limiter = self.limiter
            if limiter is not None and await refuse_if_limited(
                limiter, self.metrics, address_identity(scope, "unauthenticated"), send, state
            ):
                return  # guessing keys is limited like calling with one
            self.metrics.count_error("unauthorized")
            if log_fields is not None:
                log_fields["auth"] = "invalid_key" if presented else "missing_key"
            refusal, challenge = (
                (_INVALID, _CHALLENGE_INVALID) if presented else (_MISSING, _CHALLENGE_MISSING)
            )
            await send_error(send, refusal, state.get("request_id"), challenge)
            return
        state["tenant"] = key.tenant
        state["api_key_id"] = key.key_id
        state["role"] = key.role
        if log_fields is not None:
            log_fields["key_id"] = key.key_id
            if key.tenant is not None:
                log_fields["tenant"] = key.tenant
        await self.app(scope, receive, send)
