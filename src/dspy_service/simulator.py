"""An OpenAI-compatible chat-completions server that plays the language-model provider.

Tests, benchmarks and the no-key demo talk to it over real HTTP through DSPy's real client path.
It reads which output fields a DSPy adapter (ChatAdapter or JSONAdapter) asks for and answers every
one of them with a value of the field's type, as the adapter's notes in the system message describe it
(int, float, bool, a Literal's choice, or a value that follows the JSON schema given for lists, dicts
and pydantic models), so that DSPy's real parsing runs. It plays a ``dspy.ReAct`` agent: it calls the
first listed tool with arguments of the listed names and types, then, once the trajectory holds an
observation, finishes. Answers are the same for the same input. It reports token usage from its own
(deterministic) tokenizer, and has knobs to play a slow, failing or dead provider:

- ``latency_ms``     delay before answering (plus up to ``jitter_ms`` more)
- ``error_rate``     share of calls answered with ``error_status`` (0.0 to 1.0)
- ``error_status``   HTTP status of injected errors (500, 429, 400 ...)
- ``retry_after``    seconds put in a ``Retry-After`` header on injected errors, if set
- ``hang``           never answer (the client must time out)
- ``fail_next``      answer the next N calls with ``error_status``, whatever ``error_rate`` says
- ``error_code``     the ``code`` in injected errors' bodies (e.g. ``context_length_exceeded``)

Knobs are set by command-line flags at start and at run time by ``POST /_sim/config``;
``GET /_sim/stats`` counts calls and tokens, ``POST /_sim/reset`` zeroes the counts.
"""

from __future__ import annotations

import ast
import asyncio
import hashlib
import random
import re
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

_TOKEN_RE = re.compile(r"\w+|[^\w\s]")
_MARKER_RE = re.compile(r"\[\[ ## (\w+) ## \]\]")
_FIELD_DECL_RE = re.compile(r"^\d+\. `(\w+)` \((.*?)\)(?::|$)", re.MULTILINE)
_TEMPLATE_LINE_RE = re.compile(r"^\{\w+\}.*$", re.MULTILINE)
_JSON_TEMPLATE_LINE_RE = re.compile(r'^\s*"\w+": ("(?:[^"\\]|\\.)*"),?$', re.MULTILINE)
_NOTE_RE = re.compile(r"\{(\w+)\} +# note: the value you produce (.+)")
_LITERAL_ANNOTATION_RE = re.compile(r"Literal\[(.*)\]", re.DOTALL)
_TOOL_LINE_RE = re.compile(
    r"^\s*\(\d+\) (\S+?)(?:, whose description is <desc>.*</desc>)?\. It takes arguments (\{.*\})\.\s*$",
    re.MULTILINE,
)
_OBSERVATION_RE = re.compile(r"\[\[ ## observation_\d+ ## \]\]")
_JSON_HINT_FIELD_RE = re.compile(r"(?:fields: |, then )`(\w+)`")
_RESPOND_HINT = "Respond with the corresponding output fields"
_JSON_RESPOND_HINT = "Respond with a JSON object in the following order of fields:"
_BOOL_NOTE = "must be True or False"
_INT_NOTE = "must be a single int value"
_FLOAT_NOTE = "must be a single float value"
_LITERAL_NOTE = "must exactly match (no extra characters) one of: "
_ENUM_NOTE = "must be one of: "
_SCHEMA_NOTE = "must adhere to the JSON schema: "
_FINISH_TOOL = "finish"
_MAX_DEPTH = 4  # past this nesting, optional parts of a (possibly recursive) schema are left out
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
    # send an error event inside the stream after this many chunks, as OpenAI and gateways do when
    # their upstream connection drops (`data: {"error": ...}`), then end the stream
    stream_error_after: int | None = None
    stream_hang_after: int | None = None  # stop sending (the connection stays open) after this many
    answer_pad_chars: int = 0  # make every text answer this many characters longer (large answers)
    error_code: str | None = None  # the `code` of injected errors' bodies (context_length_exceeded ...)

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
    # X-Request-ID and traceparent headers of the latest calls (up to 100), as callers sent them
    request_ids: list[str] = field(default_factory=list)
    traceparents: list[str] = field(default_factory=list)


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


def _system_text(messages: list[dict[str, Any]]) -> str:
    return next((_message_text(m) for m in messages if m.get("role") == "system"), "")


def _last_user_text(messages: list[dict[str, Any]]) -> str:
    return next((_message_text(m) for m in reversed(messages) if m.get("role") == "user"), "")


def _digest(*parts: str) -> int:
    return int(hashlib.sha256(":".join(parts).encode()).hexdigest()[:8], 16)


def _choose(choices: list[Any], digest: int) -> Any:
    return choices[digest % len(choices)] if choices else ""


# -- what the adapter asks for -------------------------------------------------------------------


@dataclass(frozen=True)
class OutputField:
    """An output field the adapter asked for.

    ``annotation`` is the type as the prompt names it (``int``, ``Literal['a', 'b']``, ``Person``);
    ``note`` is what the adapter's field structure says the value must be (``must be a single int
    value``, ``must adhere to the JSON schema: {...}``), empty for plain text.
    """

    name: str
    annotation: str = "str"
    note: str = ""


def _output_annotations(system: str) -> dict[str, str]:
    """Field name to annotation, from the "Your output fields are:" list."""
    if "Your output fields are:" not in system:
        return {}
    section = system.split("Your output fields are:", 1)[1].split("All interactions", 1)[0]
    return dict(_FIELD_DECL_RE.findall(section))


def _field_templates(system: str) -> list[str]:
    """The ``{name}  # note: ...`` templates of the adapter's field structure.

    ChatAdapter writes them as lines of their own; JSONAdapter as the string values of a JSON
    object, one per line, so there the note is JSON-escaped and is decoded first.
    """
    templates = _TEMPLATE_LINE_RE.findall(system)
    for quoted in _JSON_TEMPLATE_LINE_RE.findall(system):
        try:
            decoded = orjson.loads(quoted)
        except orjson.JSONDecodeError:
            continue
        if isinstance(decoded, str):
            templates.append(decoded)
    return templates


def _output_notes(system: str) -> dict[str, str]:
    notes: dict[str, str] = {}
    for template in _field_templates(system):
        match = _NOTE_RE.fullmatch(template.strip())
        if match:
            notes.setdefault(match.group(1), match.group(2).strip())
    return notes


def _requested_names(last_user: str) -> list[str]:
    """Output field names, in order, from the adapter's closing reminder in the user message."""
    if _RESPOND_HINT in last_user:
        tail = last_user.split(_RESPOND_HINT, 1)[1]
        return [name for name in _MARKER_RE.findall(tail) if name != "completed"]
    if _JSON_RESPOND_HINT in last_user:
        return _JSON_HINT_FIELD_RE.findall(last_user[last_user.index(_JSON_RESPOND_HINT) :])
    return []


def _requested_fields(messages: list[dict[str, Any]]) -> list[OutputField]:
    """The output fields the adapter asked for, in order (``answer`` if it named none)."""
    system = _system_text(messages)
    annotations = _output_annotations(system)
    notes = _output_notes(system)
    names = _requested_names(_last_user_text(messages)) or list(annotations) or ["answer"]
    return [
        OutputField(name, annotations.get(name, "str"), notes.get(name, "")) for name in dict.fromkeys(names)
    ]


def _last_input(messages: list[dict[str, Any]]) -> str:
    """The last user message without the adapter's reminder: what answers are seeded from."""
    text = _last_user_text(messages)
    for hint in (_RESPOND_HINT, _JSON_RESPOND_HINT):
        text = text.split(hint, 1)[0]
    return text


def _wants_json(body: dict[str, Any], messages: list[dict[str, Any]]) -> bool:
    """JSON mode was asked for, or the prompt is JSONAdapter's (which may go without it)."""
    response_format = body.get("response_format") or {}
    if isinstance(response_format, dict) and response_format.get("type") in ("json_object", "json_schema"):
        return True
    return _JSON_RESPOND_HINT in _last_user_text(messages)


# -- values --------------------------------------------------------------------------------------


def _text_for(name: str, seed: str) -> str:
    if "capital of France" in seed and name == "answer":
        return "The capital of France is Paris."
    # The echo leaves out the adapter's field markers: a streaming parser would take one for the
    # start of the next field.
    echo = _MARKER_RE.sub("", seed).strip()[-60:]
    return f"Simulated {name} #{_digest(name, seed) % 100_000} for: {echo}"


def _literal_choices(spec: OutputField) -> list[Any]:
    """A Literal's choices, as Python values from the annotation if it reads as one, else as the
    note's strings (DSPy parses either form)."""
    match = _LITERAL_ANNOTATION_RE.fullmatch(spec.annotation)
    if match:
        try:
            return list(ast.literal_eval(f"({match.group(1)},)"))
        except (ValueError, SyntaxError):
            pass
    if spec.note.startswith(_LITERAL_NOTE):
        return spec.note.removeprefix(_LITERAL_NOTE).split("; ")
    return []


def _value_for(spec: OutputField, seed: str) -> Any:
    """A value for one field that DSPy's adapters parse into the field's type; the same for the
    same field and input."""
    if spec.note:
        return _value_from_note(spec, seed)
    return _value_from_annotation(spec, seed)


def _value_from_note(spec: OutputField, seed: str) -> Any:
    note, digest = spec.note, _digest(spec.name, seed)
    if note.startswith(_BOOL_NOTE):
        return digest % 2 == 0
    if note.startswith(_INT_NOTE):
        return digest % 100
    if note.startswith(_FLOAT_NOTE):
        return round((digest % 10_000) / 100, 2)
    if note.startswith(_LITERAL_NOTE):
        return _choose(_literal_choices(spec), digest)
    if note.startswith(_ENUM_NOTE):
        return _choose(note.removeprefix(_ENUM_NOTE).split("; "), digest)
    if note.startswith(_SCHEMA_NOTE):
        try:
            schema = orjson.loads(note.removeprefix(_SCHEMA_NOTE))
        except orjson.JSONDecodeError:
            return _text_for(spec.name, seed)
        return SchemaFaker(schema, seed).value(schema, spec.name)
    return _text_for(spec.name, seed)


def _value_from_annotation(spec: OutputField, seed: str) -> Any:
    """For prompts without DSPy's field notes: go by the annotation's name alone."""
    digest = _digest(spec.name, seed)
    kind = spec.annotation.lower()
    if kind.startswith("int"):
        return digest % 100
    if kind.startswith("float"):
        return round((digest % 10_000) / 100, 2)
    if kind.startswith("bool"):
        return digest % 2 == 0
    if kind.startswith("literal["):
        return _choose(_literal_choices(spec), digest)
    if kind.startswith("list"):
        return [f"item-{digest % 7}", f"item-{digest % 11}"]
    return _text_for(spec.name, seed)


class SchemaFaker:
    """Makes a value that validates against a JSON schema as pydantic writes them.

    Handles ``$defs``/``$ref``, ``anyOf``/``oneOf`` (unions and optionals: the first non-null
    choice), ``allOf``, ``enum``, ``const``, objects, arrays and tuples, string formats and
    numeric bounds. Every value is drawn from a hash of its path and the seed, so the same
    input gives the same value. Past ``_MAX_DEPTH`` only what is required is made, so
    recursive models end.
    """

    def __init__(self, root: Any, seed: str) -> None:
        self.root = root
        self.seed = seed

    def value(self, schema: Any, path: str, depth: int = 0) -> Any:
        if not isinstance(schema, dict) or depth > 4 * _MAX_DEPTH:
            return self._string({}, path)
        if "$ref" in schema:
            return self.value(self._resolve(str(schema["$ref"])), path, depth + 1)
        if "const" in schema:
            return schema["const"]
        if isinstance(schema.get("enum"), list):
            return _choose(schema["enum"], self._digest(path))
        for key in ("anyOf", "oneOf"):
            if isinstance(schema.get(key), list):
                return self._one_of(schema[key], path, depth)
        if isinstance(schema.get("allOf"), list):
            return self.value(self._merged(schema), path, depth)
        kind = _schema_type(schema)
        if kind == "object":
            return self._object(schema, path, depth)
        if kind == "array":
            return self._array(schema, path, depth)
        if kind == "integer":
            return self._integer(schema, path)
        if kind == "number":
            return self._number(schema, path)
        if kind == "boolean":
            return self._digest(path) % 2 == 0
        if kind == "null":
            return None
        return self._string(schema, path)

    def _digest(self, path: str) -> int:
        return _digest(path, self.seed)

    def _resolve(self, ref: str) -> Any:
        """A local JSON pointer such as ``#/$defs/Address``; anything else resolves to a string."""
        node: Any = self.root
        for part in ref.removeprefix("#").strip("/").split("/"):
            if not isinstance(node, dict) or part not in node:
                return {"type": "string"}
            node = node[part]
        return node

    def _merged(self, schema: dict[str, Any]) -> dict[str, Any]:
        merged: dict[str, Any] = {}
        for part in schema["allOf"]:
            resolved = self._resolve(str(part["$ref"])) if isinstance(part, dict) and "$ref" in part else part
            if isinstance(resolved, dict):
                merged.update(resolved)
        merged.update({k: v for k, v in schema.items() if k != "allOf"})
        return merged

    def _one_of(self, options: list[Any], path: str, depth: int) -> Any:
        real = [o for o in options if not (isinstance(o, dict) and o.get("type") == "null")]
        if not real or (depth >= _MAX_DEPTH and len(real) < len(options)):
            return None
        return self.value(real[0], path, depth)

    def _object(self, schema: dict[str, Any], path: str, depth: int) -> dict[str, Any]:
        properties = schema.get("properties")
        if isinstance(properties, dict) and properties:
            required = set(schema.get("required") or ())
            return {
                name: self.value(sub, f"{path}.{name}", depth + 1)
                for name, sub in properties.items()
                if name in required or depth < _MAX_DEPTH
            }
        extra = schema.get("additionalProperties", True)
        if extra is False or depth >= _MAX_DEPTH:
            return {}
        key_schema = schema.get("propertyNames")
        key = str(self.value(key_schema, f"{path}.key", depth + 1)) if key_schema else f"{_leaf(path)}_key"
        return {key: self.value(extra if isinstance(extra, dict) else {}, f"{path}.{key}", depth + 1)}

    def _array(self, schema: dict[str, Any], path: str, depth: int) -> list[Any]:
        prefix = schema.get("prefixItems")
        if isinstance(prefix, list):
            return [self.value(item, f"{path}[{i}]", depth + 1) for i, item in enumerate(prefix)]
        least = int(schema.get("minItems", 0))
        most = schema.get("maxItems")
        count = least if depth >= _MAX_DEPTH else max(least, 2 if most is None else min(2, int(most)))
        items = schema.get("items", {})
        return [self.value(items, f"{path}[{i}]", depth + 1) for i in range(count)]

    def _integer(self, schema: dict[str, Any], path: str) -> int:
        low, high = _bounds(schema, step=1)
        start = int(low) if low is not None else (0 if high is None else int(high) - 99)
        stop = int(high) if high is not None else start + 99
        return start + self._digest(path) % max(stop - start + 1, 1)

    def _number(self, schema: dict[str, Any], path: str) -> float:
        low, high = _bounds(schema, step=0)
        start = low if low is not None else (0.0 if high is None else high - 100.0)
        stop = high if high is not None else start + 100.0
        share = (self._digest(path) % 98 + 1) / 100  # strictly inside, for exclusive bounds
        return round(start + (stop - start) * share, 4)

    def _string(self, schema: dict[str, Any], path: str) -> str:
        digest = self._digest(path)
        text = _formatted_string(str(schema.get("format", "")), digest) or f"{_leaf(path)} {digest % 1000}"
        least = int(schema.get("minLength", 0))
        most = schema.get("maxLength")
        text = text.ljust(least, "x")
        return text[: int(most)] if most is not None else text


def _schema_type(schema: dict[str, Any]) -> str:
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if isinstance(kind, str):
        return kind
    if "properties" in schema or "additionalProperties" in schema:
        return "object"
    if "items" in schema or "prefixItems" in schema:
        return "array"
    return "string"


def _bounds(schema: dict[str, Any], step: int) -> tuple[float | None, float | None]:
    """The schema's (low, high) bounds; exclusive ones moved ``step`` inwards (1 for integers)."""

    def bound(inclusive: str, exclusive: str, inwards: int) -> float | None:
        if inclusive in schema:
            return float(schema[inclusive])
        if exclusive in schema:
            return float(schema[exclusive]) + inwards
        return None

    return bound("minimum", "exclusiveMinimum", step), bound("maximum", "exclusiveMaximum", -step)


def _formatted_string(fmt: str, digest: int) -> str:
    day = digest % 28 + 1
    formats = {
        "date-time": f"2024-01-{day:02d}T12:00:00Z",
        "date": f"2024-01-{day:02d}",
        "time": "12:00:00",
        "email": f"user{digest % 1000}@example.com",
        "uri": f"https://example.com/{digest % 1000}",
        "url": f"https://example.com/{digest % 1000}",
        "uuid": str(uuid.UUID(int=digest)),
    }
    return formats.get(fmt, "")


def _leaf(path: str) -> str:
    return path.rsplit(".", 1)[-1].split("[", 1)[0]


# -- ReAct ---------------------------------------------------------------------------------------


def _is_react_step(fields: list[OutputField]) -> bool:
    return {"next_tool_name", "next_tool_args"} <= {spec.name for spec in fields}


def _listed_tools(system: str) -> dict[str, dict[str, Any]]:
    """Tool name to its args' JSON schemas, from ReAct's ``(1) name, whose description is ...
    It takes arguments {...}.`` lines (the args are a Python dict's repr)."""
    tools: dict[str, dict[str, Any]] = {}
    for name, args_text in _TOOL_LINE_RE.findall(system):
        try:
            args = ast.literal_eval(args_text)
        except (ValueError, SyntaxError):
            args = {}
        tools.setdefault(name, args if isinstance(args, dict) else {})
    return tools


def _tool_arguments(arg_schemas: dict[str, Any], seed: str) -> dict[str, Any]:
    """Every listed arg: its default if it has one, else a value of its type."""
    faker = SchemaFaker({}, seed)  # dspy.Tool inlines $refs in args, so there are no $defs to look up
    return {
        name: schema["default"]
        if isinstance(schema, dict) and "default" in schema
        else faker.value(schema, name)
        for name, schema in arg_schemas.items()
    }


def _react_step(fields: list[OutputField], messages: list[dict[str, Any]], seed: str) -> dict[str, Any]:
    """One turn of ReAct's loop: call the first real tool until an observation is in the
    trajectory, then ``finish``."""
    system = _system_text(messages)
    tools = _listed_tools(system)
    name_field = next(spec for spec in fields if spec.name == "next_tool_name")
    choices = [str(choice) for choice in _literal_choices(name_field)] or list(tools)
    callable_tools = [choice for choice in choices if choice != _FINISH_TOOL]
    observed = _OBSERVATION_RE.search(_last_user_text(messages)) is not None
    if observed or not callable_tools:
        turn: dict[str, Any] = {
            "next_thought": "The observation gives me what I need, so I can finish.",
            "next_tool_name": _FINISH_TOOL,
            "next_tool_args": {},
        }
    else:
        tool = callable_tools[0]
        turn = {
            "next_thought": f"I should call {tool} to collect the information I need.",
            "next_tool_name": tool,
            "next_tool_args": _tool_arguments(tools.get(tool, {}), seed),
        }
    return {spec.name: turn[spec.name] if spec.name in turn else _value_for(spec, seed) for spec in fields}


# -- the answer ----------------------------------------------------------------------------------


def _answer_values(messages: list[dict[str, Any]]) -> dict[str, Any]:
    seed = _last_input(messages)
    fields = _requested_fields(messages)
    if _is_react_step(fields):
        return _react_step(fields, messages, seed)
    return {spec.name: _value_for(spec, seed) for spec in fields}


def _compose_answer(messages: list[dict[str, Any]], as_json: bool, pad_chars: int = 0) -> str:
    values = _answer_values(messages)
    if pad_chars > 0:
        values = {
            name: f"{value} {'x' * pad_chars}" if isinstance(value, str) else value
            for name, value in values.items()
        }
    if as_json:
        return orjson.dumps(values).decode()
    parts = []
    for name, value in values.items():
        rendered = value if isinstance(value, str) else orjson.dumps(value).decode()
        parts.append(f"[[ ## {name} ## ]]\n{rendered}")
    parts.append("[[ ## completed ## ]]")
    return "\n\n".join(parts)


def _json_error(
    status: int, message: str, headers: dict[str, str] | None = None, code: str | None = None
) -> Response:
    body = {"error": {"message": message, "type": "simulated_error", "code": code or status}}
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
        for header, seen in (("x-request-id", stats.request_ids), ("traceparent", stats.traceparents)):
            if (value := request.headers.get(header)) is not None:
                seen.append(value)
                del seen[:-100]
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
            message = f"simulated provider error {knobs.error_status} (internal-model-7b-secret-route)"
            return _json_error(knobs.error_status, message, headers, knobs.error_code)

        content = _compose_answer(messages, _wants_json(body, messages), self.knobs.answer_pad_chars)
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
                knobs = self.knobs
                if knobs.stream_break_after is not None and sent >= knobs.stream_break_after:
                    raise ConnectionAbortedError("simulated stream cut off")  # uvicorn drops the connection
                if knobs.stream_error_after is not None and sent >= knobs.stream_error_after:
                    error = {"message": "upstream connection dropped", "type": "server_error", "code": None}
                    yield b"data: " + orjson.dumps({"error": error}) + b"\n\n"
                    return
                if knobs.stream_hang_after is not None and sent >= knobs.stream_hang_after:
                    await asyncio.sleep(_HANG_SECONDS)
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
