"""A failed upstream call as the client sees it: what happened, in our words, with the provider's
own text in the log only."""

from __future__ import annotations

from dspy_service.errors import InvalidRequest, ProviderError, ProviderTimeout, ServiceError
from dspy_service.logs import get_logger
from dspy_service.models_config import ModelSpec
from dspy_service.programs import ProgramFailed
from dspy_service.routing import Route
from dspy_service.settings import redact_secrets

_log = get_logger("dspy_service.predictor")


def client_facing_error(
    spec: ModelSpec, route: Route, failure: ProgramFailed, attempts: int = 1, elapsed: float = 0.0
) -> ServiceError:
    """The error the client sees: what happened, in our words. The provider's own text (it may
    carry internal model ids or the prompt) goes to the log, redacted, never to the client."""
    variant = route.program.variant
    if failure.kind not in ("unencodable",):
        _log.warning(
            "prediction.upstream_failed",
            model=spec.key,
            variant=variant,
            kind=failure.kind,
            status=failure.status,
            detail=redact_secrets(failure.message)[:500],
        )
    if failure.kind == "timeout":
        # What happened, not the models file's figure: a gateway in between may time out first.
        tries = "1 attempt" if attempts == 1 else f"{attempts} attempts"
        return ProviderTimeout(
            f"model {spec.key!r} did not answer in time: {tries}, {elapsed:.1f} s in all "
            f"(the model's timeout is {spec.request_timeout_secs:g} s a call)"
        )
    if failure.kind == "too_long":
        return InvalidRequest(f"the input is too long for model {spec.key!r}: its context window is exceeded")
    if failure.kind == "content":
        return InvalidRequest(f"the provider of model {spec.key!r} refused the request's content")
    if failure.kind == "parse":
        return ProviderError(f"model {spec.key!r} answered in a shape the program could not parse")
    if failure.kind == "unencodable":
        return ProviderError(
            f"the program of variant {variant!r} answered with a value that cannot be encoded as JSON"
        )
    if failure.kind == "unexpected":
        return ProviderError(f"the program of variant {variant!r} failed: {failure.message.split(':')[0]}")
    status = f" (HTTP {failure.status})" if failure.status else ""
    return ProviderError(f"model {spec.key!r} failed{status}: {failure.kind}")
