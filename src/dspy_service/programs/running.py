"""Running a program once: on the event loop (`acall`) when it has `aforward`, else in a bounded pool
of program threads (DSPy's `asyncify`, which carries the request's `dspy.context` into the thread).

DSPy is configured once at start-up (its own response cache, call history and trace off: our cache
is the only cache, so what we count is what was spent, and memory stays bounded). Each run happens
under a per-request `dspy.context`, never changing global settings per request.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import dspy
import orjson

from dspy_service.programs.adapter import ADAPTER as _ADAPTER
from dspy_service.programs.failures import ProgramFailed, UsageByModel, failure_of, usage_totals
from dspy_service.programs.fields import WORKING_FIELDS
from dspy_service.programs.loading import LoadedProgram

_configured = False

ChunkSink = Callable[[str, str, str], None]  # (predictor, output field, text) as tokens arrive
LateUsage = Callable[[UsageByModel], None]


def configure_dspy(program_threads: int = 32) -> None:
    """One-time global DSPy configuration, from the start-up task."""
    global _configured
    if _configured:
        return
    dspy.configure_cache(enable_disk_cache=False, enable_memory_cache=False)
    # No trace either: by default every Predict call appends (module, inputs, prediction) to one
    # process-wide list of up to 10,000 entries, for optimizers; serving never reads it, and it
    # kept about 13 MB alive here (more with longer inputs). Modules that need one (BestOfN,
    # Refine, the optimizers) open their own with dspy.context(trace=[]).
    # async_max_workers bounds asyncify's threads: the pool that runs synchronous programs.
    dspy.configure(disable_history=True, trace=None, async_max_workers=program_threads)
    _configured = True


@dataclass(frozen=True, slots=True)
class ProgramRun:
    outputs: dict[str, Any]  # every field of the returned Prediction, as JSON values
    main_output: str | None  # the field that is the response's `output`
    usage_by_model: UsageByModel  # provider model id -> (input tokens, output tokens)


class _ThreadRun:
    __slots__ = ("abandoned", "done")

    def __init__(self) -> None:
        self.done = False
        self.abandoned = False


class ProgramThreads:
    """Runs synchronous programs in DSPy's asyncify pool (PROGRAM_THREADS threads) and keeps count
    of the threads whose request has gone (its deadline passed): a thread cannot be stopped, so it
    counts against MAX_IN_FLIGHT and shutdown waits for it, and the tokens it spends after its
    request has gone still reach the cost totals (through `on_late`)."""

    def __init__(self, busy_gauge: Any) -> None:
        self._busy_gauge = busy_gauge
        self.abandoned = 0  # threads still running for a request that has ended
        self._idle = asyncio.Event()
        self._idle.set()

    async def call(self, module: Any, inputs: dict[str, Any], on_late: Callable[[], None]) -> Any:
        loop = asyncio.get_running_loop()
        run = _ThreadRun()
        gauge = self._busy_gauge

        def body(**kwargs: Any) -> Any:
            gauge.inc()
            try:
                return module(**kwargs)
            finally:
                gauge.dec()
                loop.call_soon_threadsafe(self._finished, run, on_late)

        try:
            return await dspy.asyncify(body)(**inputs)
        except asyncio.CancelledError:
            if run.done:
                on_late()  # it finished just as its request ended: its tokens are all there
            else:
                run.abandoned = True
                self.abandoned += 1
                self._idle.clear()
            raise

    def _finished(self, run: _ThreadRun, on_late: Callable[[], None]) -> None:
        run.done = True
        if run.abandoned:
            self.abandoned -= 1
            if self.abandoned == 0:
                self._idle.set()
            on_late()

    async def wait_idle(self) -> None:
        """Wait for the threads of ended requests to return (the caller bounds the wait)."""
        await self._idle.wait()


def _to_jsonable(value: Any) -> Any:
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, (list, tuple)):
        return [_to_jsonable(item) for item in value]
    if isinstance(value, dict):
        return {str(k): _to_jsonable(v) for k, v in value.items()}
    dump = getattr(value, "model_dump", None)
    if callable(dump):
        return _to_jsonable(dump(mode="json"))
    return str(value)


def _prediction_fields(prediction: Any) -> dict[str, Any]:
    if isinstance(prediction, dspy.Example):
        return {name: prediction.get(name) for name in prediction.keys()}  # noqa: SIM118  (not a dict)
    if isinstance(prediction, dict):
        return prediction
    return {"output": prediction}  # a custom forward may return a bare value


def _finished(program: LoadedProgram, prediction: Any, tracker: Any) -> ProgramRun:
    usage = usage_totals(tracker)
    outputs = {str(name): _to_jsonable(value) for name, value in _prediction_fields(prediction).items()}
    try:
        orjson.dumps(outputs)
    except (TypeError, orjson.JSONEncodeError) as exc:
        # An integer beyond 64 bits, a lone surrogate: not an answer we can send or cache.
        raise ProgramFailed("unencodable", f"an output cannot be encoded as JSON: {exc}", usage) from None
    main = program.main_output
    if main is None or main not in outputs:
        main = next((name for name in outputs if name not in WORKING_FIELDS), None)
    return ProgramRun(outputs=outputs, main_output=main, usage_by_model=usage)


def _context(program: LoadedProgram, lm: Any, *, streaming: bool = False) -> Any:
    """The run's DSPy settings. Streaming keeps DSPy's own ChatAdapter: streamify checks the
    adapter's class by name and refuses subclasses such as ours."""
    overrides: dict[str, Any] = {"lm": lm, "track_usage": True}
    if not streaming:
        overrides["adapter"] = _ADAPTER
    if program.callbacks:
        overrides["callbacks"] = list(program.callbacks)
    return dspy.context(**overrides)


async def run_program(
    program: LoadedProgram,
    lm: Any,
    inputs: dict[str, Any],
    *,
    threads: ProgramThreads | None = None,
    on_late_usage: LateUsage | None = None,
) -> ProgramRun:
    """Run the program once with `lm` as the default LM; raise ProgramFailed (with spent usage).

    A synchronous program whose request ends first (the deadline) keeps running in its thread;
    what it spends is handed to `on_late_usage` when it returns.
    """
    with _context(program, lm), dspy.track_usage() as tracker:
        try:
            if program.is_async:
                prediction = await program.module.acall(**inputs)
            else:

                def late() -> None:
                    if on_late_usage is not None:
                        on_late_usage(usage_totals(tracker))

                if threads is None:  # no pool to account for it: DSPy's asyncify as it is
                    prediction = await dspy.asyncify(program.module)(**inputs)
                else:
                    prediction = await threads.call(program.module, inputs, late)
        except Exception as exc:  # a user's program may raise anything: it is a failed run, not ours
            raise failure_of(exc, tracker) from exc
    return _finished(program, prediction, tracker)


async def stream_program(
    program: LoadedProgram, lm: Any, inputs: dict[str, Any], on_chunk: ChunkSink
) -> ProgramRun:
    """`run_program`, streaming: the text output fields' tokens of every predictor go to `on_chunk`
    as the provider sends them (DSPy's `streamify`, one reusable listener per predictor and text
    field, so a ReAct loop's repeated calls stream too); the whole run is returned at the end.

    Cancelling the caller cancels DSPy's streaming task, which closes the upstream HTTP stream.
    """
    listeners = [
        dspy.streaming.StreamListener(
            signature_field_name=field, predict=_predictor(program, name), predict_name=name, allow_reuse=True
        )
        for name, field in program.stream_fields
    ]
    streamer = dspy.streamify(program.module, stream_listeners=listeners, is_async_program=program.is_async)
    prediction = None
    with _context(program, lm, streaming=True), dspy.track_usage() as tracker:
        try:
            async for value in streamer(**inputs):
                if isinstance(value, dspy.streaming.StreamResponse):
                    if value.chunk:
                        on_chunk(value.predict_name, value.signature_field_name, value.chunk)
                elif isinstance(value, dspy.Prediction):
                    prediction = value
        except Exception as exc:  # as in run_program: the program's failure
            raise failure_of(exc, tracker) from exc
    if prediction is None:
        raise ProgramFailed(
            "unexpected", "the program's stream ended without a prediction", usage_totals(tracker)
        )
    return _finished(program, prediction, tracker)


def _predictor(program: LoadedProgram, name: str) -> Any:
    return next(info.predictor for info in program.predictors if info.name == name)
