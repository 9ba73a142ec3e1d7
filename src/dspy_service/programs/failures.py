"""What a failed program run raises: the kind of failure (from DSPy's exception classes), the model
that failed, and the tokens the provider reported before it failed."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Literal

from dspy.utils.exceptions import (
    AdapterParseError,
    ContextWindowExceededError,
    LMAuthError,
    LMBillingError,
    LMError,
    LMInvalidRequestError,
    LMRateLimitError,
    LMServerError,
    LMTimeoutError,
    LMTransportError,
)

FailureKind = Literal[
    "timeout",
    "transport",
    "server",
    "rate_limit",
    "too_long",  # the request's content does not fit the model's context window: the client's to fix
    "content",  # the provider refused the request's content (a content policy): the client's to fix
    "rejected",  # any other refusal (unknown model, bad parameter): the operator's to fix
    "auth",
    "parse",
    "unencodable",
    "unexpected",
]

UsageByModel = dict[str, tuple[int, int, int]]  # provider model id -> (input tokens, output tokens, calls)


class ProgramFailed(Exception):
    """A program run failed; carries what kind of failure and the tokens it spent anyway."""

    def __init__(
        self,
        kind: FailureKind,
        message: str,
        usage_by_model: UsageByModel,
        *,
        status: int | None = None,
        retry_after: float | None = None,
        connected: bool = True,
        model_id: str | None = None,
    ) -> None:
        super().__init__(message)
        self.kind: FailureKind = kind
        self.message = message
        self.usage_by_model = usage_by_model
        self.status = status
        self.retry_after = retry_after
        # False when no connection to the provider was made: nothing was sent, so nothing was spent.
        self.connected = connected
        # The provider model id whose call failed, when DSPy says (a pinned predictor's model, say).
        self.model_id = model_id


def usage_totals(tracker: Any) -> UsageByModel:
    """DSPy's usage tracker as tokens per provider model id."""
    totals: UsageByModel = {}
    calls = {model_id: len(entries) for model_id, entries in tracker.usage_data.items()}
    for model_id, usage in tracker.get_total_tokens().items():
        totals[model_id] = (
            int(usage.get("prompt_tokens") or 0),
            int(usage.get("completion_tokens") or 0),
            calls.get(model_id, 1),
        )
    return totals


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """The exception and what it was raised from (DSPy wraps lm15's transport errors), nearest
    first, into the members of exception groups too: a streamed call's timeout reaches us as the
    context of the error its task group re-raised."""
    queue: list[BaseException] = [exc]
    seen: set[int] = set()
    while queue and len(seen) < 16:
        current = queue.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        queue.extend(getattr(current, "exceptions", ()))
        nearer = current.__cause__ or current.__context__
        if nearer is not None:
            queue.append(nearer)


def _caused_by_timeout(exc: BaseException) -> bool:
    """DSPy reports a read timeout as a transport error; the cause chain says it was a timeout. A
    streamed call's loses its chain (its task group re-raises the error without it), and only
    lm15's message says so: "read timed out mid-body", the wording lm15's contract pins."""
    return any(
        isinstance(seen, TimeoutError)
        or type(seen).__name__ in ("ReadTimeout", "WriteTimeout", "ConnectTimeout")
        or (isinstance(seen, LMTransportError) and "timed out" in str(seen))
        for seen in _causes(exc)
    )


def _never_connected(exc: BaseException) -> bool:
    """lm15 raises ConnectError (ConnectTimeout among them) when no connection was made; matched by
    name, as `_caused_by_timeout` does, so that a DSPy upgrade moving the class cannot break it."""
    return any(any(cls.__name__ == "ConnectError" for cls in type(seen).__mro__) for seen in _causes(exc))


def _classify(exc: Exception) -> FailureKind:
    if isinstance(exc, LMTimeoutError):
        return "timeout"
    if isinstance(exc, LMTransportError):
        return "timeout" if _caused_by_timeout(exc) else "transport"
    if isinstance(exc, LMRateLimitError):
        return "rate_limit"
    if isinstance(exc, LMServerError):
        return "server"
    if isinstance(exc, (LMAuthError, LMBillingError)):
        return "auth"
    if isinstance(exc, ContextWindowExceededError):
        return "too_long"
    if isinstance(exc, LMInvalidRequestError):
        code = str(getattr(exc, "provider_code", "") or "").lower()
        return "content" if "content" in code or "safety" in code else "rejected"
    if isinstance(exc, AdapterParseError):
        return "parse"
    return "unexpected"


def failure_of(exc: Exception, tracker: Any) -> ProgramFailed:
    """What a failed run raises: its kind, and the tokens the provider reported before it failed."""
    if isinstance(exc, (LMError, AdapterParseError)):
        return ProgramFailed(
            _classify(exc),
            str(exc),
            usage_totals(tracker),
            status=getattr(exc, "status", None),
            retry_after=getattr(exc, "retry_after", None),
            connected=not _never_connected(exc),
            model_id=getattr(exc, "model", None),
        )
    return ProgramFailed("unexpected", f"{type(exc).__name__}: {exc}", usage_totals(tracker))
