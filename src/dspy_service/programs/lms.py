"""Language models: one dspy.LM per configured model, built once, and bounded copies carrying
per-request LM options. DSPy's native (lm15) client is used where it can serve the model."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import threading
import urllib.request
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

from dspy_service.costs import Price
from dspy_service.logs import get_logger
from dspy_service.models_config import ModelSpec

# Keep DSPy's price map local: it would otherwise fetch a remote copy (5 s timeout) on first use.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import dspy
from dspy.utils.exceptions import LMError

_log = get_logger("dspy_service.programs")

LM_OPTIONS = frozenset({"temperature", "max_tokens", "top_p", "stop", "seed"})
_MAX_LM_COPIES = 256


HeaderSource = Callable[[], list[tuple[str, str]]]  # headers for the provider call being made now

_TAGGING: dict[type, type] = {}


def _tagging(transport: type) -> type:
    """lm15's transport class, with the headers of the call in progress (the request's ID, the
    trace's `traceparent`) added to every HTTP request it sends: lm15's request types carry no
    headers of their own, so the transport is the one place to add them."""
    found = _TAGGING.get(transport)
    if found is None:

        class Tagged(transport):  # type: ignore[misc]  # a class chosen at run time
            headers_of: HeaderSource | None = None

            def stream(self, request: Any) -> Any:
                extra = self.headers_of() if self.headers_of is not None else None
                if extra:
                    request = dataclasses.replace(request, headers=[*request.headers, *extra])
                return super().stream(request)

        found = _TAGGING[transport] = Tagged
    return found


def _build_lm(
    spec: ModelSpec, *, api_key: str | None, api_base: str | None, headers_of: HeaderSource | None = None
) -> Any:
    """DSPy's native engine where it can serve the model, else its LiteLLM engine.

    With engine "auto", an OPENAI_BASE_URL in the environment sends every call through LiteLLM
    (a 10 s import on the first call and more CPU per call) even though we pass the address
    explicitly; asking for the native engine by name avoids that.

    For an OpenAI Chat Completions model the native engine's client is built once and handed to
    DSPy as a custom engine (see `_ChatEngine`); any other provider keeps DSPy's own native engine.
    """
    from dspy._vendor.lm15.errors import LM15Error
    from dspy.clients.backend_selection import select_backend

    options: dict[str, Any] = {
        "api_key": api_key or "unused",
        "api_base": api_base,
        "timeout": spec.request_timeout_secs,
        "cache": False,
        "num_retries": 0,  # retries are ours: bounded by the request deadline, with backoff and jitter
    }
    if spec.max_output_tokens is not None:
        options["max_tokens"] = spec.max_output_tokens
    try:
        lm = dspy.LM(spec.name, engine="lm15", **options)
        route = select_backend(lm).resolution
    except (LM15Error, LMError, ValueError, TypeError) as exc:
        _log.info("lm.litellm_engine", model=spec.name, reason=str(exc))
        return dspy.LM(spec.name, **options)
    if route is None or route.provider != _CHAT_PROVIDER or route.declared or route.compat is not None:
        return lm
    try:
        engine = _ChatEngine(
            route.model,
            api_key=options["api_key"],
            api_base=api_base,
            timeout_secs=spec.request_timeout_secs,
            capabilities_of=lm,
            headers_of=headers_of,
        )
    except (ImportError, AttributeError, TypeError) as exc:  # a DSPy upgrade moved lm15's transports
        _log.warning("lm.dspy_native_engine", model=spec.name, reason=f"{type(exc).__name__}: {exc}")
        return lm
    extra = {"max_tokens": spec.max_output_tokens} if spec.max_output_tokens is not None else {}
    return dspy.LM(
        spec.name, engine=engine, async_engine=engine.async_engine, cache=False, num_retries=0, **extra
    )


# The one provider `_ChatEngine` serves. Its token counts are the provider's own (DSPy adjusts
# Anthropic's, Gemini's and xAI's by provider), and requests reach it in OpenAI's own spelling.
_CHAT_PROVIDER = "openai-chat"


class _ChatEngine:
    """DSPy's native (lm15) client for one OpenAI-compatible chat model, given to DSPy as a custom
    engine (`dspy.LM(engine=..., async_engine=...)`, DSPy's public engine contract).

    Through engine="lm15" DSPy works out on every call, in Python and in worker threads, what
    does not change between calls: it selects the backend again (building lm15 engines and routers
    to do so), looks up the model's capabilities and resolves the route, the last two each behind a
    thread hop. This engine resolves once and keeps the provider client, with its keep-alive
    connection pool, per event loop. Measured here (bench/dspy_probe.py, `run_program`, provider at
    0 ms): 2.4 ms of CPU per call with engine="lm15", 1.6 ms with this engine, and as much less
    latency; at 1 connection with the provider at 50 ms, about 1.5 ms less per miss.

    The wire is the same: DSPy builds the same canonical request, the same lm15 provider client
    sends it over the same transport with the same timeouts, and lm15 errors are translated into
    DSPy's by DSPy at the same boundary. DSPy's own (advisory) cost estimate is not made, since
    the service prices usage itself; token usage is recorded as before.
    """

    def __init__(
        self,
        model: str,
        *,
        api_key: str,
        api_base: str | None,
        timeout_secs: float,
        capabilities_of: Any,
        headers_of: HeaderSource | None = None,
    ) -> None:
        self._headers_of = headers_of
        self._model = model
        self._api_key = api_key
        self._api_base = api_base
        self._timeout = timeout_secs
        # lm15 reads HTTP(S)_PROXY/ALL_PROXY/NO_PROXY from the environment on every request (a scan of
        # the whole environment each time). Where none of them is set there is nothing to read, and
        # the transport is built not to look.
        self._trust_env = bool(urllib.request.getproxies())
        self._sync_router = self._new_sync_router()
        self._lock = threading.Lock()
        self._async_clients: dict[asyncio.AbstractEventLoop, tuple[Any, Any]] = {}  # router, client
        # Capability hints for DSPy's adapters, as DSPy's own native engine reports them.
        self.supports_function_calling = bool(capabilities_of.supports_function_calling)
        self.supports_reasoning = bool(capabilities_of.supports_reasoning)
        self.supports_response_schema = bool(capabilities_of.supports_response_schema)
        self.supported_params = frozenset(capabilities_of.supported_params)
        self.async_engine = _AsyncChatEngine(self)

    def _new_sync_router(self) -> Any:
        from dspy.lm15 import LMRouter

        return LMRouter(self._router_config(asynchronous=False))

    def _router_config(self, *, asynchronous: bool) -> Any:
        """As DSPy configures lm15 for the model; the transport as lm15 would build it from these
        timeouts (an LM's `timeout` bounds the next byte, the send and a free connection)."""
        from dspy._vendor.lm15.transports import StdlibAsyncTransport, StdlibTransport
        from dspy.lm15 import RouterConfig

        transport = _tagging(StdlibAsyncTransport if asynchronous else StdlibTransport)(
            read_timeout=self._timeout,
            write_timeout=self._timeout,
            pool_timeout=self._timeout,
            trust_env=self._trust_env,
        )
        transport.headers_of = self._headers_of
        return RouterConfig(
            api_keys={_CHAT_PROVIDER: self._api_key},
            base_urls={_CHAT_PROVIDER: self._api_base} if self._api_base else None,
            transport=transport,
        )

    def _routed(self, request: Any) -> Any:
        return dataclasses.replace(request, model=self._model)

    def _client(self) -> Any:
        return self._sync_router.lm(f"{_CHAT_PROVIDER}:{self._model}")

    def _async_client(self) -> Any:
        """The async client of the running loop: an lm15 connection pool belongs to one loop."""
        loop = asyncio.get_running_loop()
        found = self._async_clients.get(loop)
        if found is None:
            from dspy.lm15 import AsyncLMRouter

            with self._lock:
                for stale in [known for known in self._async_clients if known.is_closed()]:
                    del self._async_clients[stale]  # its sockets close with the collected pool
                router = AsyncLMRouter(self._router_config(asynchronous=True))
                found = (router, router.lm(f"{_CHAT_PROVIDER}:{self._model}"))
                self._async_clients[loop] = found
        return found[1]

    async def aclose(self) -> None:
        """Close the connections opened on this event loop, and the synchronous ones."""
        with self._lock:
            found = self._async_clients.pop(asyncio.get_running_loop(), None)
        try:
            if found is not None:
                await found[0].aclose()
        finally:
            # A closed router would build lm15's default transport next, not ours: start a new one.
            closed, self._sync_router = self._sync_router, self._new_sync_router()
            closed.close()

    def complete(self, request: Any) -> Any:
        return self._client().complete(self._routed(request))

    def stream(self, request: Any) -> Iterator[Any]:
        return iter(self._client().stream(self._routed(request)))


class _AsyncChatEngine:
    """The async half of `_ChatEngine` (DSPy takes the pair as one unit)."""

    def __init__(self, engine: _ChatEngine) -> None:
        self._engine = engine
        self.supports_function_calling = engine.supports_function_calling
        self.supports_reasoning = engine.supports_reasoning
        self.supports_response_schema = engine.supports_response_schema
        self.supported_params = engine.supported_params

    async def complete(self, request: Any) -> Any:
        engine = self._engine
        return await engine._async_client().complete(engine._routed(request))

    def stream(self, request: Any) -> AsyncIterator[Any]:
        engine = self._engine
        stream: AsyncIterator[Any] = engine._async_client().stream(engine._routed(request))
        return stream


class LanguageModels:
    """One dspy.LM per configured model, plus bounded copies carrying per-request LM options."""

    def __init__(
        self,
        models: dict[str, ModelSpec],
        *,
        api_key: str | None,
        base_url: str | None,
        headers_of: HeaderSource | None = None,
    ) -> None:
        """`headers_of` gives the headers to send with each provider call (X-Request-ID, traceparent);
        DSPy's native OpenAI-compatible client sends them, other providers' clients do not."""
        self._base: dict[str, Any] = {}
        self._copies: OrderedDict[tuple[str, tuple[tuple[str, Any], ...]], Any] = OrderedDict()
        for key, spec in models.items():
            model_key = os.environ.get(spec.api_key_env) if spec.api_key_env else None
            self._base[key] = _build_lm(
                spec, api_key=model_key or api_key, api_base=spec.api_base or base_url, headers_of=headers_of
            )

    def base(self, model: str) -> Any:
        """The model's LM as configured, without per-request options (pinned predictors use it)."""
        return self._base[model]

    def get(self, model: str, options: dict[str, Any]) -> Any:
        base = self._base[model]
        if not options:
            return base
        marker = (
            model,
            tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in options.items())),
        )
        found = self._copies.get(marker)
        if found is None:
            found = base.copy(**options)
            self._copies[marker] = found
            if len(self._copies) > _MAX_LM_COPIES:
                self._copies.popitem(last=False)
        else:
            self._copies.move_to_end(marker)
        return found

    async def aclose(self) -> None:
        """Close the provider connections opened on this event loop (copies share their model's)."""
        for lm in self._base.values():
            await lm.aclose()
            if isinstance(lm.engine, _ChatEngine):  # DSPy leaves a custom engine's connections to us
                await lm.engine.aclose()


def dspy_version() -> str:
    return str(dspy.__version__)


def bundled_price(model_id: str) -> Price | None:
    """DSPy's bundled price for a provider model id ("openai/gpt-4o"), if it knows one."""
    from dspy.clients.model_metadata import model_info, rate

    provider, _, name = model_id.partition("/")
    if not name:
        provider, name = "openai", model_id
    info = model_info(provider, name)
    input_rate = rate(info, "input_cost_per_token") if info else None
    output_rate = rate(info, "output_cost_per_token") if info else None
    if input_rate is None or output_rate is None:
        return None
    return Price(input_rate, output_rate, "dspy")
