"""Optimize the triage program with a real DSPy optimizer and write its state to `triage.json`.

    .venv/bin/python examples/support_triage/optimize.py                # against its own simulator
    .venv/bin/python examples/support_triage/optimize.py --api-base https://api.openai.com/v1 \
        --model openai/gpt-4o-mini --api-key-env OPENAI_API_KEY           # against a real provider

It runs `dspy.BootstrapFewShot` over `trainset.jsonl`: the program answers every training ticket, the
runs whose category matches the label become demos for every predictor they went through (classify,
the ReAct agent's steps, draft), and labelled tickets fill the remaining demo slots. Then
`module.save("triage.json")` writes the demos, which the service loads with `program: triage.json`.

Without `--api-base` it starts the project's provider simulator (`dspy-service simulate`) on a free
port and stops it at the end, so it needs nothing but this checkout. The simulator answers the same
for the same input, so the result is reproducible; its categories are not meant to be right, which
is why only some training tickets pass the metric there.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import dspy
import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "programs"))  # where `support_bot` lives (PROGRAMS_PATH for the service)

from support_bot.triage import Triage  # noqa: E402  (found through the path set just above)

LOOPBACK = "127.0.0.1"


def load_trainset(path: Path) -> list[Any]:
    """The labelled tickets as dspy.Examples whose inputs are `ticket` and `customer_tier`."""
    examples = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            examples.append(dspy.Example(**json.loads(line)).with_inputs("ticket", "customer_tier"))
    return examples


def category_matches(example: Any, prediction: Any, trace: Any = None) -> bool:
    """The metric: the predicted category is the labelled one."""
    return bool(prediction.category == example.category)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


@contextmanager
def simulator() -> Iterator[str]:
    """The project's provider simulator in a subprocess; yields its API base URL."""
    port = _free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "dspy_service.cli", "simulate", "--host", LOOPBACK, "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://{LOOPBACK}:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{url}/_sim/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the simulator did not start on port {port}")
            time.sleep(0.1)
        print(f"simulator: {url}", file=sys.stderr)
        yield f"{url}/v1"
    finally:
        process.terminate()
        process.wait(timeout=10)


def optimize(args: argparse.Namespace, api_base: str) -> None:
    api_key = os.environ.get(args.api_key_env, "") if args.api_key_env else "simulated"
    # DSPy's own response cache off: every call of the run goes to the provider.
    dspy.configure_cache(enable_disk_cache=False, enable_memory_cache=False)
    lm = dspy.LM(args.model, api_base=api_base, api_key=api_key, cache=False)
    # The LM is configured globally, never set on a predictor: a predictor's own `lm` would be saved
    # into triage.json and would win over the model each request asks for.
    dspy.configure(lm=lm)

    trainset = load_trainset(args.trainset)
    optimizer = dspy.BootstrapFewShot(
        metric=category_matches,
        max_bootstrapped_demos=args.max_bootstrapped_demos,
        max_labeled_demos=args.max_labeled_demos,
    )
    program = optimizer.compile(Triage(), trainset=trainset)
    program.save(str(args.out))

    passed = sum(category_matches(example, program(**example.inputs())) for example in trainset)
    print(f"wrote {args.out}")
    print(f"training tickets whose category matches after optimizing: {passed} of {len(trainset)}")
    for name, predictor in program.named_predictors():
        bootstrapped = sum(1 for demo in predictor.demos if demo.get("augmented"))
        print(f"  {name}: {len(predictor.demos)} demos ({bootstrapped} bootstrapped)")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--api-base", help="an OpenAI-compatible API; default: start the simulator")
    parser.add_argument("--model", default="openai/gpt-3.5-turbo", help="the provider model id")
    parser.add_argument("--api-key-env", help="environment variable holding the provider key")
    parser.add_argument("--trainset", type=Path, default=HERE / "trainset.jsonl")
    parser.add_argument("--out", type=Path, default=HERE / "triage.json")
    parser.add_argument("--max-bootstrapped-demos", type=int, default=3)
    parser.add_argument("--max-labeled-demos", type=int, default=4)
    args = parser.parse_args()
    # DSPy's bundled model price data, rather than a download of a newer copy on first use.
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    if args.api_base:
        optimize(args, args.api_base)
        return
    with simulator() as api_base:
        optimize(args, api_base)


if __name__ == "__main__":
    main()
