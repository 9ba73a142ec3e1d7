"""Running `wrk` with bench/post.lua and reading the JSON line its `done()` prints."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from bench.processes import BenchSetupError, pinned

LUA_SCRIPT = Path(__file__).resolve().parent / "post.lua"
_MARKER = "BENCH_JSON "


@dataclass(frozen=True, slots=True)
class WrkResult:
    requests: int
    duration_s: float
    errors_socket: int  # connect, read, write and timeout errors
    errors_status: int  # responses with status >= 400
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    max_ms: float

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.duration_s if self.duration_s > 0 else 0.0

    @property
    def errors(self) -> int:
        return self.errors_socket + self.errors_status


def ensure_wrk() -> str:
    """The path of `wrk`, installing the Debian package first if it is missing."""
    found = shutil.which("wrk")
    if found is not None:
        return found
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise BenchSetupError("wrk is not installed and cannot be installed here: apt-get install wrk")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    print("bench: installing wrk (apt-get) ...", flush=True)
    for command in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "wrk"]):
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise BenchSetupError(f"{' '.join(command)} failed:\n{done.stdout}{done.stderr}")
    found = shutil.which("wrk")
    if found is None:
        raise BenchSetupError("apt-get installed wrk but it is not on PATH")
    return found


def parse_output(stdout: str) -> WrkResult:
    line = next((ln for ln in stdout.splitlines() if ln.startswith(_MARKER)), None)
    if line is None:
        raise ValueError(f"wrk printed no {_MARKER.strip()} line:\n{stdout}")
    data = json.loads(line[len(_MARKER) :])
    errors = data["errors"]
    latency = data["latency_us"]
    return WrkResult(
        requests=int(data["requests"]),
        duration_s=int(data["duration_us"]) / 1e6,
        errors_socket=int(errors["connect"] + errors["read"] + errors["write"] + errors["timeout"]),
        errors_status=int(errors["status"]),
        p50_ms=latency["p50"] / 1000,
        p90_ms=latency["p90"] / 1000,
        p99_ms=latency["p99"] / 1000,
        mean_ms=latency["mean"] / 1000,
        max_ms=latency["max"] / 1000,
    )


def run_wrk(
    *,
    wrk: str,
    url: str,
    path: str,
    body_file: Path,
    connections: int,
    duration_s: int,
    core: int | None,
    unique: str | None = None,
    cycle: int | None = None,
) -> WrkResult:
    """One wrk run: one thread, `connections` keep-alive connections, for `duration_s` seconds."""
    env = {**os.environ, "BENCH_PATH": path, "BENCH_BODY_FILE": str(body_file)}
    if unique is not None:
        env["BENCH_UNIQUE"] = unique
        if cycle is not None:
            env["BENCH_CYCLE"] = str(cycle)
    command = pinned(
        [
            wrk,
            "-t1",
            f"-c{connections}",
            f"-d{duration_s}s",
            "--timeout",
            "10s",
            "-s",
            str(LUA_SCRIPT),
            url,
        ],
        core,
    )
    done = subprocess.run(
        command, env=env, capture_output=True, text=True, check=False, timeout=duration_s + 60
    )
    if done.returncode != 0:
        raise RuntimeError(f"wrk exited with {done.returncode}:\n{done.stdout}{done.stderr}")
    return parse_output(done.stdout)
