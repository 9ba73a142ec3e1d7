"""The bench's module programs driven directly by DSPy, with no service: N concurrent tasks in one
asyncio loop, each calling the program with a new input as soon as its last call returned.

Run as `python -m bench.dspy_direct --api-base URL`; the bench starts it once (pinned like the
service) and keeps it up, idle between runs, as it keeps the servers. It loads the programs, prints
`READY`, then reads one JSON command per line on stdin and answers each with one line on stdout:

    {"program": "async", "mode": "direct", "tasks": 32, "duration_s": 5, "prefix": "..."}
    BENCH_JSON {"requests": ..., "calls": ..., "duration_us": ..., "errors": ..., "latency_us": {...}}
    {"program": "sync", "mode": "run_program", "check": true, "prefix": "..."}
    BENCH_JSON {"fields": {"answer": "..."}}        (one call, and the fields of its prediction)

Programs: `async` is bench/programs/two_step.py's TwoStepAsync, `sync` its TwoStepSync. Modes:

- `direct`: DSPy as its user drives it: `await program.acall(question=...)` for the async one,
  `await dspy.asyncify(program)(question=...)` for the sync one, with the LM set once by
  `dspy.configure(lm=...)` and DSPy's default adapter;
- `run_program`: the service's own call path (`programs.run_program`: its per-run `dspy.context`,
  its adapter, usage tracking, its program-thread pool for the sync one) without HTTP serving, the
  cache, metrics or logs.

Both share with the service what is not per request, so that what separates them is the service's
own work: the LM built as the service builds it (`programs.lms._build_lm`), DSPy's global settings
as the service sets them (`configure_dspy`: no DSPy cache, history or trace; 32 asyncify threads),
uvloop (uvicorn's loop), and the start-up objects frozen out of the collector's way (`gc.freeze()`).

`requests` counts the calls that returned before the deadline (as wrk counts responses); `calls`
also counts the ones in flight then, which the process waits for before answering, so that CPU
measured around a whole command divides by the calls that spent it.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TextIO

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

MODEL = "openai/gpt-3.5-turbo"
QUESTION = "What is the capital of France?"
PROGRAMS_DIR = Path(__file__).resolve().parent / "programs"
IMPORT_PATHS = {"async": "two_step:TwoStepAsync", "sync": "two_step:TwoStepSync"}
MODES = ("direct", "run_program")

Call = Callable[[str], Awaitable[Any]]


class _NoGauge:
    """Stands in for the service's `dspy_program_threads_busy` gauge."""

    def inc(self) -> None:
        return

    def dec(self) -> None:
        return


def load_calls(api_base: str) -> dict[tuple[str, str], Call]:
    """(program, mode) -> an async call of that program on one question."""
    import dspy

    from dspy_service import programs
    from dspy_service.models_config import ModelSpec, VariantSpec
    from dspy_service.programs import lms

    programs.configure_dspy(32)
    lm = lms._build_lm(ModelSpec(key="gpt-3.5-turbo", name=MODEL), api_key="bench", api_base=api_base)
    dspy.configure(lm=lm)
    programs.use_program_dirs([PROGRAMS_DIR])
    threads = programs.ProgramThreads(_NoGauge())
    calls: dict[tuple[str, str], Call] = {}
    for name, import_path in IMPORT_PATHS.items():
        loaded = programs.load_program(VariantSpec(key=f"two_step_{name}", module=import_path), "bench")
        if loaded.is_async != (name == "async"):
            raise RuntimeError(f"{import_path}: is_async is {loaded.is_async}, expected {name == 'async'}")
        # As its user calls it: acall on the loop, or asyncify's thread for a forward-only module.
        run = loaded.module.acall if loaded.is_async else dspy.asyncify(loaded.module)

        async def direct(question: str, run: Any = run) -> Any:
            return await run(question=question)

        async def service_path(question: str, loaded: Any = loaded) -> Any:
            return await programs.run_program(loaded, lm, {"question": question}, threads=threads)

        calls[name, "direct"] = direct
        calls[name, "run_program"] = service_path
    return calls


def _percentile(ordered: list[float], share: float) -> float:
    if not ordered:
        return 0.0
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


async def run(call: Call, *, tasks: int, duration_s: float, prefix: str) -> dict[str, Any]:
    """`tasks` loops calling `call` with a new question each time until the deadline."""
    latencies: list[float] = []
    late = 0
    errors = 0
    started = time.perf_counter()
    deadline = started + duration_s

    async def worker(task: int) -> None:
        nonlocal late, errors
        n = 0
        while time.perf_counter() < deadline:
            n += 1
            before = time.perf_counter()
            try:
                await call(f"{prefix}-{task}-{n} {QUESTION}")
            except Exception:  # any failed call is counted, as wrk counts a 5xx
                errors += 1
                continue
            after = time.perf_counter()
            if after <= deadline:
                latencies.append(after - before)
            else:
                late += 1

    await asyncio.gather(*(worker(t) for t in range(tasks)))
    ordered = sorted(latencies)
    return {
        "requests": len(latencies),
        "calls": len(latencies) + late,
        "duration_us": int(1e6 * duration_s),
        "errors": errors,
        "latency_us": {
            "p50": 1e6 * _percentile(ordered, 0.50),
            "p90": 1e6 * _percentile(ordered, 0.90),
            "p99": 1e6 * _percentile(ordered, 0.99),
            "mean": 1e6 * statistics.fmean(ordered) if ordered else 0.0,
            "max": 1e6 * ordered[-1] if ordered else 0.0,
        },
    }


async def check(call: Call, prefix: str) -> dict[str, Any]:
    """One call: the output fields of its prediction (of its ProgramRun, for `run_program`)."""
    from dspy_service.programs import ProgramRun

    result = await call(f"{prefix} {QUESTION}")
    if isinstance(result, ProgramRun):
        fields = dict(result.outputs)
    else:
        fields = {name: result.get(name) for name in result.keys()}  # noqa: SIM118 (a Prediction)
    return {"fields": {name: str(value) for name, value in fields.items()}}


async def serve(api_base: str, answers: TextIO) -> None:
    calls = load_calls(api_base)
    gc.collect()
    gc.freeze()
    loop = asyncio.get_running_loop()

    def answer(text: str) -> None:
        answers.write(text + "\n")
        answers.flush()

    answer("READY")
    while line := await loop.run_in_executor(None, sys.stdin.readline):
        command = json.loads(line)
        call = calls[command["program"], command["mode"]]
        prefix = str(command["prefix"])
        if command.get("check"):
            result = await check(call, prefix)
        else:
            result = await run(
                call, tasks=int(command["tasks"]), duration_s=float(command["duration_s"]), prefix=prefix
            )
        answer("BENCH_JSON " + json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description="the bench's module programs driven by DSPy directly")
    parser.add_argument("--api-base", required=True, help="the simulator's /v1 address")
    args = parser.parse_args()
    # Answers go to the stdout the bench reads; anything else printed (log lines) to stderr.
    answers = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    import uvloop

    uvloop.run(serve(args.api_base, answers))


if __name__ == "__main__":
    main()
