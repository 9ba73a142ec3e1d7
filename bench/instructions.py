"""Instructions per memory hit, receipts off and on, counted by callgrind: deterministic where
`make bench`'s timings swing with the machine (a difference of a few microseconds, such as a
receipt's, is lost in its noise on a shared VM).

    .venv/bin/python -m bench.instructions [--hits 3000] [--src ../other-checkout]

Starts redis-server, the simulator and two services under `valgrind --tool=callgrind` (receipts
off, FEEDBACK_ENABLED on), sends one miss and warm-up hits, then counts only the hits (callgrind's
instrumentation switched on around them with callgrind_control) and prints instructions per hit.
Needs valgrind; takes about a minute.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench.processes import free_port

_BODY = {"model": "gpt-3.5-turbo", "input": "What is the capital of France?"}
# valgrind's gdbserver names its pipes after USER and HOST; the service's HOST is an address.
_NAMES = {"USER": "root", "LOGNAME": "root", "HOST": "127.0.0.1"}


def _control(pid: int, switch: str) -> None:
    subprocess.run(
        ["callgrind_control", "-i", switch, str(pid)],
        env={**os.environ, **_NAMES},
        check=True,
        stdout=subprocess.DEVNULL,
    )


def _total(out: Path) -> int:
    """The instructions counted while instrumentation was on (the file's last `totals:` line)."""
    totals = [int(line.split()[1]) for line in out.read_text().splitlines() if line.startswith("totals:")]
    if not totals:
        raise RuntimeError(f"{out}: no totals")
    return totals[-1]


def _wait_ready(url: str) -> None:
    for _ in range(600):
        try:
            if httpx.get(url + "/ready", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise RuntimeError(f"{url} never became ready")


def count(src: Path, hits: int, work: Path) -> dict[str, float]:
    """Instructions per memory hit of the service in `src`, receipts off and on."""
    redis_port, simulator_port = free_port(), free_port()
    started = [
        subprocess.Popen(
            ["redis-server", "--port", str(redis_port), "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
        ),
        subprocess.Popen(
            [sys.executable, "-m", "dspy_service.cli", "simulate", "--port", str(simulator_port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        ),
    ]
    services: dict[str, tuple[subprocess.Popen[bytes], str, Path]] = {}
    try:
        for feedback in ("false", "true"):
            port = free_port()
            out = work / f"callgrind-{feedback}.out"
            env = {
                **os.environ,
                **_NAMES,
                "PYTHONPATH": str(src / "src"),
                "PORT": str(port),
                "REDIS_URL": f"redis://127.0.0.1:{redis_port}",
                "OPENAI_API_KEY": "bench",
                "OPENAI_BASE_URL": f"http://127.0.0.1:{simulator_port}/v1",
                "LOG_FORMAT": "json",
                "FEEDBACK_ENABLED": feedback,
                "DATA_DIR": str(work / f"data-{feedback}"),
            }
            command = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}"]
            log = (work / f"service-{feedback}.log").open("wb")
            process = subprocess.Popen(
                [*command, sys.executable, "-m", "dspy_service.cli", "serve"],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            services[feedback] = (process, f"http://127.0.0.1:{port}", out)
        for process, url, _ in services.values():
            _wait_ready(url)
            with httpx.Client(base_url=url, timeout=60) as client:
                for _ in range(300):  # a miss, then hits
                    client.post("/v1/predict", json=_BODY)
                time.sleep(2)
                _control(process.pid, "on")
                for _ in range(hits):
                    level = client.post("/v1/predict", json=_BODY).json()["metadata"]["cache_level"]
                    if level != "memory":
                        raise RuntimeError(f"expected a memory hit, got {level}")
                time.sleep(3)  # the writer's last batch (written within a second)
                _control(process.pid, "off")
    finally:
        for process, _, _ in services.values():
            process.send_signal(signal.SIGTERM)
        for process, _, _ in services.values():
            try:
                process.wait(120)
            except subprocess.TimeoutExpired:
                process.kill()
        for process in started:
            process.terminate()
    return {feedback: _total(out) / hits for feedback, (_, _, out) in services.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.instructions", description=__doc__)
    parser.add_argument("--hits", type=int, default=3000)
    parser.add_argument("--src", type=Path, default=Path(__file__).resolve().parent.parent)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="dspy-instructions-") as work:
        per_hit = count(args.src.resolve(), args.hits, Path(work))
    off, on = per_hit["false"], per_hit["true"]
    print(f"{args.src}: memory hit {off / 1000:,.1f}k instructions, receipts on {on / 1000:,.1f}k")
    print(f"a receipt adds {(on - off) / 1000:,.1f}k instructions per hit ({100 * (on - off) / off:.1f}%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
