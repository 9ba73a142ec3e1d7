"""DSPy's own cost per call, in isolation, and the exact request body DSPy sends to a provider.

Run as `python -m bench.dspy_probe --api-base URL --calls N --body-out FILE`; prints one JSON line.

1. Body: one call goes to a tiny capturing server in this process; the JSON body DSPy's ChatAdapter and
   its native engine send is written to FILE, so the direct-to-provider scenario posts what the service
   posts.
2. CPU: a loop of `await program.acall(question=...)` against the simulator at URL (it should answer
   at once), with DSPy configured as the service configures it (no DSPy cache, no history). Process
   CPU time (time.process_time, all threads) is read around each call. The loop runs three times: plain,
   with usage tracking (`dspy.context(track_usage=True)` + `dspy.track_usage()`), and through the
   service's own `programs.run_program` with the LM the service builds (`programs.lms._build_lm`): DSPy's
   cost as the service pays it, without HTTP serving, cache, metrics or logs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

MODEL = "openai/gpt-3.5-turbo"
SIGNATURE = "question -> answer"
QUESTION = "What is the capital of France?"
_CANNED = {
    "id": "chatcmpl-probe",
    "object": "chat.completion",
    "created": 0,
    "model": "gpt-3.5-turbo",
    "choices": [
        {
            "index": 0,
            "message": {
                "role": "assistant",
                "content": "[[ ## answer ## ]]\nThe capital of France is Paris.\n\n[[ ## completed ## ]]",
            },
            "finish_reason": "stop",
        }
    ],
    "usage": {"prompt_tokens": 100, "completion_tokens": 12, "total_tokens": 112},
}


class _Capture(BaseHTTPRequestHandler):
    bodies: list[bytes] = []  # noqa: RUF012 -- one capture per process: a class-level record is enough

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        type(self).bodies.append(self.rfile.read(length))
        payload = json.dumps(_CANNED).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:
        return


def _make_lm(api_base: str) -> Any:
    import dspy

    return dspy.LM(MODEL, engine="lm15", api_base=api_base, api_key="bench", cache=False, num_retries=0)


async def capture_body(body_out: Path) -> None:
    """Make one DSPy call to a local capturing server and save the request body it received."""
    import dspy

    server = ThreadingHTTPServer(("127.0.0.1", 0), _Capture)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        lm = _make_lm(f"http://127.0.0.1:{server.server_address[1]}/v1")
        with dspy.context(lm=lm):
            await dspy.Predict(SIGNATURE).acall(question=QUESTION)
    finally:
        server.shutdown()
        server.server_close()
    if not _Capture.bodies:
        raise RuntimeError("DSPy made no request to the capturing server")
    await asyncio.to_thread(body_out.write_bytes, _Capture.bodies[0])


def _summary(samples: list[float], wall: float) -> dict[str, float]:
    return {
        "cpu_ms_median": statistics.median(samples) * 1000,
        "cpu_ms_mean": statistics.fmean(samples) * 1000,
        "calls_per_s": len(samples) / wall if wall > 0 else 0.0,
        "wall_ms_mean": 1000 * wall / len(samples) if samples else 0.0,
    }


async def measure_cpu(api_base: str, calls: int, warmup: int) -> dict[str, Any]:
    """CPU time per `acall`: plain, with usage tracking, and as the service's run_program makes it."""
    import dspy

    from dspy_service import programs
    from dspy_service.models_config import ModelSpec, VariantSpec
    from dspy_service.programs import lms

    lm = _make_lm(api_base)
    program = dspy.Predict(SIGNATURE)
    service_lm = lms._build_lm(ModelSpec(key="probe", name=MODEL), api_key="bench", api_base=api_base)
    loaded = programs.load_program(VariantSpec(key="probe", signature=SIGNATURE), "probe")
    results: dict[str, Any] = {}
    for mode in ("plain", "track_usage", "run_program"):
        samples: list[float] = []
        wall_start = time.perf_counter()
        with dspy.context(lm=lm):
            for i in range(warmup + calls):
                before = time.process_time()
                if i == warmup:
                    wall_start = time.perf_counter()
                if mode == "plain":
                    await program.acall(question=QUESTION)
                elif mode == "run_program":
                    await programs.run_program(loaded, service_lm, {"question": QUESTION})
                else:
                    with dspy.context(track_usage=True), dspy.track_usage():
                        await program.acall(question=QUESTION)
                if i >= warmup:
                    samples.append(time.process_time() - before)
            wall = time.perf_counter() - wall_start
        results[mode] = _summary(samples, wall)
    return results


async def _main(args: argparse.Namespace) -> dict[str, Any]:
    import dspy

    dspy.configure_cache(enable_disk_cache=False, enable_memory_cache=False)
    dspy.configure(disable_history=True)
    await capture_body(args.body_out)
    measured = await measure_cpu(args.api_base, args.calls, args.warmup)
    return {"calls": args.calls, **measured}


def main() -> None:
    parser = argparse.ArgumentParser(description="DSPy's own per-call CPU, in isolation")
    parser.add_argument("--api-base", required=True, help="the simulator's /v1 address (latency 0)")
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--body-out", type=Path, required=True)
    args = parser.parse_args()
    result = asyncio.run(_main(args))
    print("BENCH_JSON " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
