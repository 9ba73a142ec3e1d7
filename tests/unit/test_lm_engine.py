"""The service's engine for OpenAI chat models sends what DSPy's own native engine sends, reports the
same usage and the same errors, and closes its connections."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal

import dspy
import pytest

from dspy_service import programs
from dspy_service.models_config import ModelSpec, VariantSpec
from dspy_service.programs import lms as programs_lms

_ANSWER = "[[ ## reasoning ## ]]\nshort\n\n[[ ## answer ## ]]\nParis\n\n[[ ## completed ## ]]"


class _Provider(BaseHTTPRequestHandler):
    """Records each request; answers with `status` (and a Retry-After on 429); keeps connections
    alive and counts them."""

    protocol_version = "HTTP/1.1"
    requests: list[tuple[str, dict[str, str], Any]] = []  # noqa: RUF012 -- one server per test
    status = 200
    opened = 0
    open_now = 0
    lock = threading.Lock()

    def setup(self) -> None:
        super().setup()
        with _Provider.lock:
            _Provider.opened += 1
            _Provider.open_now += 1

    def finish(self) -> None:
        super().finish()
        with _Provider.lock:
            _Provider.open_now -= 1

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        headers = {k.lower(): v for k, v in self.headers.items()}
        type(self).requests.append((self.path, headers, json.loads(self.rfile.read(length))))
        if type(self).status == 200:
            body = {
                "id": "chatcmpl-1",
                "object": "chat.completion",
                "created": 0,
                "model": "gpt-3.5-turbo",
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": _ANSWER},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {"prompt_tokens": 100, "completion_tokens": 12, "total_tokens": 112},
            }
        else:
            body = {"error": {"message": "no", "type": "server_error", "code": type(self).status}}
        payload = json.dumps(body).encode()
        self.send_response(type(self).status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        if type(self).status == 429:
            self.send_header("Retry-After", "3")
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:
        return


@pytest.fixture
def provider() -> Iterator[str]:
    _Provider.requests = []
    _Provider.status = 200
    _Provider.opened = _Provider.open_now = 0
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Provider)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()


def _spec(name: str = "openai/gpt-3.5-turbo") -> ModelSpec:
    return ModelSpec(key="m", name=name, request_timeout_secs=5)


def _dspy_own(api_base: str) -> Any:
    """The LM as DSPy runs it with its own native engine."""
    return dspy.LM(
        "openai/gpt-3.5-turbo",
        engine="lm15",
        api_key="k",
        api_base=api_base,
        timeout=5,
        cache=False,
        num_retries=0,
    )


def test_openai_chat_models_get_the_service_engine_and_others_keep_dspys() -> None:
    programs.configure_dspy()
    lm = programs_lms._build_lm(_spec(), api_key="k", api_base="http://127.0.0.1:9/v1")
    assert isinstance(lm.engine, programs_lms._ChatEngine)
    other = programs_lms._build_lm(_spec("anthropic/claude-3-5-haiku-20241022"), api_key="k", api_base=None)
    assert other.engine == "lm15"


@pytest.mark.parametrize("options", [{}, {"temperature": 0.3, "max_tokens": 50, "stop": ["\n\n"], "seed": 7}])
async def test_same_request_usage_and_outputs_as_dspys_own_engine(
    provider: str, options: dict[str, Any]
) -> None:
    programs.configure_dspy()
    program = programs.load_program(
        VariantSpec(key="cot", signature="question -> answer", module="chain_of_thought"), "test"
    )
    ours = programs_lms._build_lm(_spec(), api_key="k", api_base=provider)
    theirs = _dspy_own(provider)
    runs = []
    try:
        for lm in (theirs, ours):
            await programs.run_program(
                program, lm.copy(**options) if options else lm, {"question": "Capital?"}
            )
            runs.append(await programs.run_program(program, lm, {"question": "Capital?"}))
    finally:
        await theirs.aclose()
        await ours.engine.aclose()
    first, second = _Provider.requests[0], _Provider.requests[2]
    assert first[0] == second[0] == "/v1/chat/completions"
    assert {k: v for k, v in first[1].items() if k != "host"} == {
        k: v for k, v in second[1].items() if k != "host"
    }
    assert first[2] == second[2]
    assert runs[0] == runs[1]
    assert runs[1].usage_by_model == {"openai/gpt-3.5-turbo": (100, 12, 1)}  # tokens in, out; calls


@pytest.mark.parametrize("status", [429, 500, 400])
async def test_same_failures_as_dspys_own_engine(provider: str, status: int) -> None:
    programs.configure_dspy()
    _Provider.status = status
    program = programs.load_program(VariantSpec(key="b", signature="question -> answer"), "test")
    ours = programs_lms._build_lm(_spec(), api_key="k", api_base=provider)
    theirs = _dspy_own(provider)
    failures = []
    try:
        for lm in (theirs, ours):
            with pytest.raises(programs.ProgramFailed) as caught:
                await programs.run_program(program, lm, {"question": "q"})
            failure = caught.value
            failures.append((failure.kind, failure.status, failure.retry_after, type(failure.__cause__)))
    finally:
        await theirs.aclose()
        await ours.engine.aclose()
    assert failures[0] == failures[1]
    assert failures[1][1] == status


async def test_one_kept_alive_connection_closed_by_aclose(provider: str) -> None:
    programs.configure_dspy()
    program = programs.load_program(VariantSpec(key="b", signature="question -> answer"), "test")
    lms = programs.LanguageModels({"m": _spec()}, api_key="k", base_url=provider)
    lm = lms.get("m", {})
    for n in range(3):
        await programs.run_program(program, lm.copy(temperature=0.5) if n else lm, {"question": f"q{n}"})
    assert (_Provider.opened, _Provider.open_now) == (1, 1)  # copies share the model's pool
    await lms.aclose()
    for _ in range(200):
        if _Provider.open_now == 0:
            break
        await asyncio.sleep(0.01)
    assert _Provider.open_now == 0
    await programs.run_program(program, lm, {"question": "after"})  # a new connection, closed again
    await lms.aclose()
    assert _Provider.opened == 2


async def test_predictions_leave_no_trace_behind(provider: str) -> None:
    """DSPy's process-wide trace (for optimizers) is off: serving would keep 10,000 calls in it."""
    programs.configure_dspy()
    program = programs.load_program(VariantSpec(key="b", signature="question -> answer"), "test")
    lm = programs_lms._build_lm(_spec(), api_key="k", api_base=provider)
    try:
        await programs.run_program(program, lm, {"question": "q"})
    finally:
        await lm.engine.aclose()
    assert dspy.settings.trace is None


@pytest.mark.parametrize(
    ("signature", "module", "instructions"),
    [
        ("question -> answer", "predict", None),
        ("question, context: list[str] -> answer: int, confidence: float", "chain_of_thought", "Be brief."),
    ],
)
async def test_run_program_prompts_as_dspys_default_adapter(
    provider: str, signature: str, module: Literal["predict", "chain_of_thought"], instructions: str | None
) -> None:
    """The service's adapter keeps the system message per signature: the prompts stay DSPy's own,
    on the first call and on the next ones."""
    programs.configure_dspy()
    spec = VariantSpec(key="v", signature=signature, module=module, instructions=instructions)
    program = programs.load_program(spec, "test")
    extra = {"context": ["Paris is in France.", "So is Lyon."]} if "context" in signature else {}
    lm = programs_lms._build_lm(_spec(), api_key="k", api_base=provider)

    async def first_prompt(call: Any) -> Any:
        _Provider.requests = []
        with contextlib.suppress(Exception):  # the canned answer may not parse: the prompt is what counts
            await call()
        return _Provider.requests[0][2]["messages"]

    try:
        for question in ("Capital of France?", "Capital of Spain?"):
            inputs = {"question": question, **extra}

            async def dspys_own(inputs: dict[str, Any] = inputs) -> None:
                with dspy.context(lm=lm):  # DSPy's default adapter
                    await program.module.acall(**inputs)

            async def ours(inputs: dict[str, Any] = inputs) -> None:
                await programs.run_program(program, lm, inputs)

            assert await first_prompt(ours) == await first_prompt(dspys_own)
    finally:
        await lm.engine.aclose()
