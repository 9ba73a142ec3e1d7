"""An OpenAI-compatible chat-completions server that plays the language-model provider.

Tests, benchmarks and the no-key demo talk to it over real HTTP through DSPy's real client path.
It reads which output fields a DSPy adapter asks for and answers every one of them, reports token
usage from its own (deterministic) tokenizer, and has knobs to play a slow, failing or dead provider:

- ``latency_ms``     delay before answering (plus up to ``jitter_ms`` more)
- ``error_rate``     share of calls answered with ``error_status`` (0.0 to 1.0)
- ``error_status``   HTTP status of injected errors (500, 429, 400 ...)
- ``retry_after``    seconds put in a ``Retry-After`` header on injected errors, if set
- ``hang``           never answer (the client must time out)
- ``fail_next``      answer the next N calls with ``error_status``, whatever ``error_rate`` says

Knobs are set by command-line flags at start and at run time by ``POST /_sim/config``;
``GET /_sim/stats`` counts calls and tokens, ``POST /_sim/reset`` zeroes the counts.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

_TOKEN_RE = re.compile(r"\w+|[^\w\s]")
_MARKER_RE = re.compile(r"\[\[ ## (\w+) ## \]\]")
_FIELD_DECL_RE = re.compile(r"^\d+\. `(\w+)` \(([^)]*)\)", re.MULTILINE)
_RESPOND_HINT = "Respond with the corresponding output fields"
_HANG_SECONDS = 3600.0


@dataclass
class Knobs:
    """The provider's behaviour; changed at run time through ``/_sim/config``."""

    latency_ms: float = 0.0
    jitter_ms: float = 0.0
    error_rate: float = 0.0
    error_status: int = 500
    retry_after: float | None = None
    hang: bool = False
    fail_next: int = 0
    stream_chunk_ms: float = 1.0  # pause between streamed chunks
    stream_break_after: int | None = None  # cut streams off (connection dropped) after this many chunks

    def update(self, changes: dict[str, Any]) -> None:
        for name, value in changes.items():
            if name not in self.__dataclass_fields__:
                raise ValueError(f"unknown knob {name!r}")
            setattr(self, name, value)


@dataclass
class Stats:
    calls: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    by_model: dict[str, int] = field(default_factory=dict)
    streams_started: int = 0
    streams_completed: int = 0
    streams_abandoned: int = 0  # ended early: the client closed it (or stream_break_after cut it)


def count_tokens(text: str) -> int:
    """The simulator's tokenizer: words and punctuation marks, each one token."""
    return len(_TOKEN_RE.findall(text))


def _message_text(message: dict[str, Any]) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    return ""


def _requested_fields(messages: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """Output fields (name, type) that the adapter asked for, in order."""
    system = next((_message_text(m) for m in messages if m.get("role") == "system"), "")
    types: dict[str, str] = {}
    if "Your output fields are:" in system:
        section = system.split("Your output fields are:", 1)[1].split("All interactions", 1)[0]
        types = {name: kind for name, kind in _FIELD_DECL_RE.findall(section)}
    last_user = next((_message_text(m) for m in reversed(messages) if m.get("role") == "user"), "")
    if _RESPOND_HINT in last_user:
        names = [n for n in _MARKER_RE.findall(last_user.split(_RESPOND_HINT, 1)[1]) if n != "completed"]
    else:
        names = list(types)
    if not names:
        names = ["answer"]
    return [(name, types.get(name, "str")) for name in dict.fromkeys(names)]


def _last_input(messages: list[dict[str, Any]]) -> str:
    last_user = next((_message_text(m) for m in reversed(messages) if m.get("role") == "user"), "")
    return last_user.split(_RESPOND_HINT, 1)[0]


def _value_for(name: str, kind: str, seed: str) -> Any:
    digest = int(hashlib.sha256(f"{name}:{seed}".encode()).hexdigest()[:8], 16)
    kind = kind.lower()
    if kind.startswith("int"):
        return digest % 100
    if kind.startswith("float"):
        return round((digest % 10_000) / 100, 2)
    if kind.startswith("bool"):
        return digest % 2 == 0
    if kind.startswith("list"):
        return [f"item-{digest % 7}", f"item-{digest % 11}"]
    if "capital of France" in seed and name == "answer":
        return "The capital of France is Paris."
    # The echo leaves out the adapter's field markers: a streaming parser would take one for the
    # start of the next field.
    echo = _MARKER_RE.sub("", seed).strip()[-60:]
    return f"Simulated {name} #{digest % 100_000} for: {echo}"


def _compose_answer(messages: list[dict[str, Any]], as_json: bool) -> str:
    seed = _last_input(messages)
    values = {name: _value_for(name, kind, seed) for name, kind in _requested_fields(messages)}
    if as_json:
        return orjson.dumps(values).decode()
    parts = []
    for name, value in values.items():
        rendered = value if isinstance(value, str) else orjson.dumps(value).decode()
        parts.append(f"[[ ## {name} ## ]]\n{rendered}")
    parts.append("[[ ## completed ## ]]")
    return "\n\n".join(parts)


def _json_error(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    body = {"error": {"message": message, "type": "simulated_error", "code": status}}
    return Response(orjson.dumps(body), status_code=status, media_type="application/json", headers=headers)


class Simulator:
    """The simulator's state and its HTTP handlers."""

    def __init__(self, knobs: Knobs | None = None) -> None:
        self.knobs = knobs or Knobs()
        self.stats = Stats()
        self._random = random.Random(1234)

    async def chat_completions(self, request: Request) -> Response:
        try:
            body = orjson.loads(await request.body())
            messages = list(body["messages"])
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return _json_error(400, "body must be JSON with a 'messages' list")
        model = str(body.get("model", "unknown"))
        stats = self.stats
        stats.calls += 1
        stats.by_model[model] = stats.by_model.get(model, 0) + 1
        knobs = self.knobs
        if knobs.hang:
            await asyncio.sleep(_HANG_SECONDS)
        delay = knobs.latency_ms + (self._random.random() * knobs.jitter_ms if knobs.jitter_ms else 0.0)
        if delay > 0:
            await asyncio.sleep(delay / 1000)
        forced = knobs.fail_next > 0
        if forced:
            knobs.fail_next -= 1
        if forced or (knobs.error_rate > 0 and self._random.random() < knobs.error_rate):
            stats.errors += 1
            headers = {"Retry-After": f"{knobs.retry_after:g}"} if knobs.retry_after is not None else None
            return _json_error(knobs.error_status, f"simulated provider error {knobs.error_status}", headers)

        response_format = body.get("response_format") or {}
        as_json = isinstance(response_format, dict) and response_format.get("type") in (
            "json_object",
            "json_schema",
        )
        content = _compose_answer(messages, as_json)
        prompt_tokens = sum(count_tokens(_message_text(m)) for m in messages)
        completion_tokens = count_tokens(content)
        stats.prompt_tokens += prompt_tokens
        stats.completion_tokens += completion_tokens
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }
        completion_id = f"chatcmpl-sim-{stats.calls}"
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return StreamingResponse(
                self._stream(completion_id, model, content, usage if include_usage else None),
                media_type="text/event-stream",
            )
        payload = {
            "id": completion_id,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": content},
                    "finish_reason": "stop",
                }
            ],
            "usage": usage,
        }
        return Response(orjson.dumps(payload), media_type="application/json")

    async def _stream(
        self, completion_id: str, model: str, content: str, usage: dict[str, int] | None
    ) -> Any:
        created = int(time.time())

        def chunk(delta: dict[str, Any], finish: str | None, extra: dict[str, Any] | None = None) -> bytes:
            payload: dict[str, Any] = {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            }
            if extra:
                payload.update(extra)
            return b"data: " + orjson.dumps(payload) + b"\n\n"

        stats = self.stats
        stats.streams_started += 1
        finished = False
        try:
            yield chunk({"role": "assistant", "content": ""}, None)
            for sent, piece in enumerate(re.findall(r"\S+\s*", content)):
                if self.knobs.stream_break_after is not None and sent >= self.knobs.stream_break_after:
                    raise ConnectionAbortedError("simulated stream cut off")  # uvicorn drops the connection
                yield chunk({"content": piece}, None)
                await asyncio.sleep(self.knobs.stream_chunk_ms / 1000)
            finished = True
        finally:
            if finished:
                stats.streams_completed += 1
            else:
                stats.streams_abandoned += 1
        yield chunk({}, "stop")
        if usage is not None:
            tail = {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": [],
                "usage": usage,
            }
            yield b"data: " + orjson.dumps(tail) + b"\n\n"
        yield b"data: [DONE]\n\n"

    async def models(self, request: Request) -> Response:
        return Response(orjson.dumps({"object": "list", "data": []}), media_type="application/json")

    async def get_config(self, request: Request) -> Response:
        return Response(orjson.dumps(asdict(self.knobs)), media_type="application/json")

    async def set_config(self, request: Request) -> Response:
        try:
            changes = orjson.loads(await request.body())
            if not isinstance(changes, dict):
                raise ValueError("body must be a JSON object")
            self.knobs.update(changes)
        except (orjson.JSONDecodeError, ValueError) as exc:
            return _json_error(400, str(exc))
        return Response(orjson.dumps(asdict(self.knobs)), media_type="application/json")

    async def get_stats(self, request: Request) -> Response:
        return Response(orjson.dumps(asdict(self.stats)), media_type="application/json")

    async def reset(self, request: Request) -> Response:
        self.stats = Stats()
        return Response(orjson.dumps(asdict(self.stats)), media_type="application/json")

    async def health(self, request: Request) -> Response:
        return Response(b'{"status":"ok"}', media_type="application/json")


def create_simulator_app(knobs: Knobs | None = None) -> Starlette:
    simulator = Simulator(knobs)
    routes = [
        Route("/v1/chat/completions", simulator.chat_completions, methods=["POST"]),
        Route("/chat/completions", simulator.chat_completions, methods=["POST"]),
        Route("/v1/models", simulator.models, methods=["GET"]),
        Route("/_sim/config", simulator.get_config, methods=["GET"]),
        Route("/_sim/config", simulator.set_config, methods=["POST"]),
        Route("/_sim/stats", simulator.get_stats, methods=["GET"]),
        Route("/_sim/reset", simulator.reset, methods=["POST"]),
        Route("/_sim/health", simulator.health, methods=["GET"]),
    ]
    app = Starlette(routes=routes)
    app.state.simulator = simulator
    return app
