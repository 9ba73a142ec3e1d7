"""Real processes for the tests: redis-server, the provider simulator and the service itself.

Each is started on a free loopback port, waited for until it answers, and stopped (killed if it
must be) by the fixture that made it.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx

from dspy_service.settings import service_environment

LOOPBACK = "127.0.0.1"


def run_cli(*args: str, url: str | None, **env: str) -> subprocess.CompletedProcess[str]:
    """The client CLI (`dspy-service ...`) as a subprocess, pointed at `url`, with none of the
    caller's own DSPY_SERVICE_* settings."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("DSPY_SERVICE_")}
    if url is not None:
        environment["DSPY_SERVICE_URL"] = url
    return subprocess.run(
        [sys.executable, "-m", "dspy_service.cli", *args],
        env={**environment, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def wait_until(predicate: Any, *, timeout: float, interval: float = 0.05, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout} s waiting for {what}")


class RedisServer:
    """A redis-server of our own, keeping nothing on disk; can be killed and restarted on its port."""

    def __init__(self, workdir: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
        self.binary = binary
        self.workdir = workdir
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{LOOPBACK}:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                LOOPBACK,
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_until(self._answers, timeout=10, what="redis-server to answer PING")

    def _answers(self) -> bool:
        try:
            with socket.create_connection((LOOPBACK, self.port), timeout=0.2) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def command(self, *args: str) -> bytes:
        """Send one command in RESP form and return the raw reply (enough for FLUSHALL, DBSIZE)."""
        payload = f"*{len(args)}\r\n".encode() + b"".join(
            f"${len(a.encode())}\r\n".encode() + a.encode() + b"\r\n" for a in args
        )
        with socket.create_connection((LOOPBACK, self.port), timeout=2) as sock:
            sock.sendall(payload)
            return sock.recv(65536)

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=10)
            self.process = None

    def stop(self) -> None:
        self.kill()


class Simulator:
    """The project's provider simulator, as a real HTTP server in its own process."""

    def __init__(self, log_path: Path) -> None:
        self.port = free_port()
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None
        self.http = httpx.Client(base_url=self.url, timeout=10)

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def api_base(self) -> str:
        return f"{self.url}/v1"

    def start(self) -> None:
        with self.log_path.open("ab") as log:  # the child keeps its own descriptor
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "dspy_service.cli",
                    "simulate",
                    "--host",
                    LOOPBACK,
                    "--port",
                    str(self.port),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        wait_until(self._answers, timeout=30, what="the simulator to start")

    def _answers(self) -> bool:
        try:
            return self.http.get("/_sim/health").status_code == 200
        except httpx.HTTPError:
            return False

    def configure(self, **knobs: Any) -> None:
        self.http.post("/_sim/config", json=knobs).raise_for_status()

    def reset(self) -> None:
        self.configure(
            latency_ms=0,
            jitter_ms=0,
            error_rate=0,
            error_status=500,
            retry_after=None,
            hang=False,
            fail_next=0,
            stream_chunk_ms=1,
            stream_break_after=None,
            answer_pad_chars=0,
            error_code=None,
            stream_error_after=None,
            stream_hang_after=None,
        )
        self.http.post("/_sim/reset").raise_for_status()

    def stats(self) -> dict[str, Any]:
        result: dict[str, Any] = self.http.get("/_sim/stats").json()
        return result

    def stop(self) -> None:
        self.http.close()
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=10)


class PortTaken(RuntimeError):
    """The port chosen for a service was bound by another process before the service could."""


class ServiceProcess:
    """`dspy-service serve` in its own process, configured only by the environment given.

    `command` replaces the default `python -m dspy_service.cli serve` (e.g. to observe the process).
    """

    def __init__(
        self,
        env: Mapping[str, str],
        workdir: Path,
        name: str = "service",
        command: Sequence[str] | None = None,
    ) -> None:
        self.command = list(command or [sys.executable, "-m", "dspy_service.cli", "serve"])
        self._own_port = "PORT" not in env  # ours to change if another process takes it first
        self.port = free_port()
        self.workdir = workdir
        self.log_path = workdir / f"{name}-{self.port}.log"
        self.env = {**service_environment(os.environ), "PORT": str(self.port), "HOST": LOOPBACK, **env}
        self.process: subprocess.Popen[bytes] | None = None
        self.http = httpx.Client(base_url=self.url, timeout=30)

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def start(self, *, wait: bool = True) -> None:
        # free_port() only finds a port free now: with tests running in parallel (make test runs two
        # workers) another process may bind it before the service does. Then: another port.
        for attempt in range(3):
            try:
                self._start(wait=wait)
                return
            except PortTaken:
                if attempt == 2 or not self._own_port:
                    raise
                self.port = free_port()
                self.env["PORT"] = str(self.port)
                self.http.close()
                self.http = httpx.Client(base_url=self.url, timeout=30)

    def _start(self, *, wait: bool) -> None:
        with self.log_path.open("ab") as log:  # the child keeps its own descriptor
            self.process = subprocess.Popen(
                self.command,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.workdir,  # no stray .env from the checkout
            )
        if wait:
            wait_until(self._ready, timeout=60, what=f"the service to be ready (log: {self.log_path})")

    def _ready(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            text = self.log_text()
            if f"('{LOOPBACK}', {self.port}): address already in use" in text:
                raise PortTaken(self.port)
            raise RuntimeError(f"service exited with {self.process.returncode}:\n{text}")
        try:
            return self.http.get("/ready").status_code == 200
        except httpx.HTTPError:
            return False

    def log_text(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace") if self.log_path.exists() else ""

    def log_lines(self) -> list[dict[str, Any]]:
        import json

        lines = []
        for line in self.log_text().splitlines():
            try:
                lines.append(json.loads(line))
            except ValueError:
                continue
        return lines

    def signal(self, sig: signal.Signals) -> None:
        assert self.process is not None
        self.process.send_signal(sig)

    def wait(self, timeout: float) -> int:
        assert self.process is not None
        return self.process.wait(timeout=timeout)

    def stop(self) -> None:
        self.http.close()
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)


def run_service_expecting_failure(
    env: Mapping[str, str], workdir: Path, timeout: float = 60
) -> tuple[int, str]:
    """Start the service and expect it to exit on its own; return (exit code, output)."""
    full_env = {**service_environment(os.environ), "PORT": str(free_port()), "HOST": LOOPBACK, **env}
    done = subprocess.run(
        [sys.executable, "-m", "dspy_service.cli", "serve"],
        env=full_env,
        cwd=workdir,
        capture_output=True,
        timeout=timeout,
        check=False,
    )
    return done.returncode, (done.stdout + done.stderr).decode("utf-8", errors="replace")


def kill_quietly(process: subprocess.Popen[bytes] | None) -> None:
    if process is not None and process.poll() is None:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=5)
