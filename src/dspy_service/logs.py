"""The one structlog configuration: JSON lines (or text for humans), request IDs from contextvars.

Our own events are dotted names with key-value context (`request.completed`, `redis.unavailable`).
Foreign loggers (uvicorn, DSPy, redis) go through the same renderer so every line has one shape.
"""

from __future__ import annotations

import logging
import random
import sys
from collections.abc import Callable, Iterable
from typing import Any

import orjson
import structlog

from dspy_service.timefmt import utc_now_iso

_LEVELS = {
    "trace": logging.DEBUG,
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warn": logging.WARNING,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}

# Keys whose values must never reach a log line, whatever a caller passes.
_SECRET_KEYS = frozenset({"api_key", "openai_api_key", "authorization", "password", "redis_url"})


def _drop_secrets(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
    for key in _SECRET_KEYS.intersection(event):
        event[key] = "***"
    return event


def _add_timestamp(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
    event["timestamp"] = utc_now_iso()
    return event


# Secrets shorter than this are not searched for: they would blank ordinary words.
_MIN_SECRET_CHARS = 6


def _serializers(secrets: Iterable[str]) -> tuple[Callable[..., bytes], Callable[..., str]]:
    """The JSON serializers of log lines: each line with every known secret blanked, wherever in
    the line it appears (a provider's error text, a URL in a library's message, a traceback).
    Searching the rendered bytes is one C-level scan per secret; lines without secrets pay nothing more."""
    known = sorted({s.encode() for s in secrets if len(s) >= _MIN_SECRET_CHARS}, key=len, reverse=True)

    def dumps(event: dict[str, Any], **_: Any) -> bytes:
        line = orjson.dumps(event, default=str)
        for secret in known:
            if secret in line:
                line = line.replace(secret, b"***")
        return line

    def text(event: dict[str, Any], **_: Any) -> str:
        return dumps(event).decode()

    return dumps, text


# The JSON serializer configure_logging made last (with the known secrets), for the access log's
# direct path; process-wide, as the logging configuration itself is.
_current_dumps: list[Callable[..., bytes]] = [_serializers(())[0]]


def configure_logging(level: str = "info", fmt: str = "json", secrets: Iterable[str] = ()) -> None:
    """Configure structlog and the stdlib root logger. Safe to call more than once (again with the
    secrets, once they are known)."""
    numeric = _LEVELS.get(level.lower(), logging.INFO)
    dumps, text = _serializers(secrets)
    _current_dumps[0] = dumps
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        _add_timestamp,
        _drop_secrets,
    ]
    renderer: Any
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer(serializer=dumps)
        logger_factory: Any = structlog.BytesLoggerFactory(sys.stdout.buffer)
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=False)
        logger_factory = structlog.PrintLoggerFactory(sys.stdout)
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=logger_factory,
        cache_logger_on_first_use=True,
    )
    foreign_renderer: Any = (
        structlog.processors.JSONRenderer(serializer=text)
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        # format_exc_info: a foreign logger's traceback as text, not "<traceback object at ...>"
        foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared, structlog.processors.format_exc_info],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, foreign_renderer],
    )
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(max(numeric, logging.INFO) if numeric > logging.DEBUG else numeric)
    # Chatty third-party loggers stay at WARNING unless we debug.
    for name in ("LiteLLM", "litellm", "httpx", "httpcore", "dspy", "uvicorn.access"):
        logging.getLogger(name).setLevel(logging.WARNING if numeric > logging.DEBUG else numeric)
    logging.getLogger("uvicorn.access").disabled = True


def current_request_id() -> str | None:
    """The ID of the request being served in this context (bound by the request-ID middleware)."""
    value = structlog.contextvars.get_contextvars().get("request_id")
    return value if isinstance(value, str) else None


def get_logger(name: str) -> Any:
    return structlog.get_logger(name)


class AccessLog:
    """The one line per request (`request.completed`).

    It is written for every request, so in JSON format it is rendered straight with orjson, in the
    same shape the structlog chain gives, instead of running the processor chain; the text format
    goes through structlog.
    """

    def __init__(self, *, level: str, fmt: str, sample_rate: float = 1.0) -> None:
        self.enabled = _LEVELS.get(level.lower(), logging.INFO) <= logging.INFO
        # Successful requests' lines are kept at this rate (errors always): at 150 req/s a full
        # access log is ~4.7 GB a day.
        self._sample_rate = sample_rate
        self._random = random.Random()
        self._json = fmt == "json"
        self._stream = sys.stdout.buffer
        self._fallback = get_logger("dspy_service.access")

    def request_completed(self, request_id: str, fields: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if self._sample_rate < 1.0 and int(fields.get("status") or 0) < 400:
            if self._random.random() >= self._sample_rate:
                return
            fields["sampled"] = self._sample_rate
        if not self._json:
            self._fallback.info("request.completed", **fields)
            return
        fields["event"] = "request.completed"
        fields["request_id"] = request_id
        fields["level"] = "info"
        fields["timestamp"] = utc_now_iso()
        self._stream.write(_current_dumps[0](fields) + b"\n")
        self._stream.flush()
