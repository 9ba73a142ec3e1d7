"""The processes a benchmark starts: redis-server, the provider simulator, the service, the bare app,
and the driver that runs the module programs through DSPy with no service.

Each is started on a free loopback port, optionally pinned to one CPU core with `taskset`, waited for
until it answers, and stopped (killed if it must be) by whoever registered it for clean-up. Also here:
what the kernel says a process has spent (CPU time, resident memory) and a minimal Redis client.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import httpx

from dspy_service.settings import service_environment

LOOPBACK = "127.0.0.1"
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class BenchSetupError(Exception):
    """Something the benchmark needs could not be started or found, or died: it cannot go on."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def pinned(command: Sequence[str], core: int | None) -> list[str]:
    """The command, run under `taskset -c core` when a core is given."""
    if core is None:
        return list(command)
    return ["taskset", "-c", str(core), *command]


def repin(pid: int, core: int | None) -> None:
    """Move every thread of a running process to one core."""
    if core is not None:
        subprocess.run(
            ["taskset", "-a", "-p", "-c", str(core), str(pid)], check=True, stdout=subprocess.DEVNULL
        )


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of the process (all its threads), from /proc/PID/stat."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat.rsplit(")", 1)[1].split()
    # After the command name: state is field 3, utime field 14, stime field 15 (1-based, see proc(5)).
    utime, stime = int(fields[11]), int(fields[12])
    return (utime + stime) / _CLOCK_TICKS


def process_tree(pid: int) -> list[int]:
    """The process and all its descendants (a WORKERS=N service is a supervisor and N workers)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone since the listing
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, pending = [], [pid]
    while pending:
        current = pending.pop()
        tree.append(current)
        pending.extend(children.get(current, ()))
    return tree


def _tree_total(pid: int, measure: Callable[[int], float]) -> float:
    total = 0.0
    for member in process_tree(pid):
        with contextlib.suppress(OSError):  # a member that exited since the listing
            total += measure(member)
    return total


def tree_cpu_seconds(pid: int) -> float:
    """`cpu_seconds` summed over the process and its live descendants."""
    return _tree_total(pid, cpu_seconds)


def tree_rss_mb(pid: int) -> float:
    """`rss_mb` summed over the process and its live descendants."""
    return _tree_total(pid, rss_mb)


def core_busy_seconds(core: int) -> float:
    """CPU seconds the core has spent busy since boot, time stolen by the hypervisor included."""
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith(f"cpu{core} "):
            user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in line.split()[1:9])
            return (user + nice + system + irq + softirq + steal) / _CLOCK_TICKS
    return 0.0


def rss_mb(pid: int) -> float:
    """Resident memory (VmRSS) of the process in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def clean_environment(extra: Mapping[str, str]) -> dict[str, str]:
    """Our environment without anything that configures the service, plus `extra`."""
    return {**service_environment(os.environ), **extra}


class Process:
    """One child process with a port, a log file and an optional core."""

    name = "process"

    def __init__(self, workdir: Path, core: int | None) -> None:
        self.workdir = workdir
        self.core = core
        self.port = free_port()
        self.log_path = workdir / f"{self.name}-{self.port}.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.spawned_at = 0.0

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def pid(self) -> int:
        if self.process is None:
            raise BenchSetupError(f"{self.name} is not running")
        return self.process.pid

    def command(self) -> list[str]:
        raise NotImplementedError

    def environment(self) -> dict[str, str] | None:
        return None

    def spawn(self) -> None:
        with self.log_path.open("ab") as log:  # the child keeps its own descriptor
            self.spawned_at = time.perf_counter()
            self.process = subprocess.Popen(
                pinned(self.command(), self.core),
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.environment(),
                cwd=self.workdir,  # no stray .env from the checkout
            )

    def answers(self) -> bool:
        raise NotImplementedError

    def ensure_alive(self) -> None:
        if self.process is None or self.process.poll() is not None:
            code = None if self.process is None else self.process.returncode
            raise BenchSetupError(
                f"{self.name} :{self.port} is not running (exit {code}); its log:\n{self.log_tail()}"
            )

    def wait_ready(self, timeout: float, interval: float = 0.01) -> float:
        """Wait until the process answers; return seconds since spawn."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise BenchSetupError(
                    f"{self.name} exited with {self.process.returncode}; its log:\n{self.log_tail()}"
                )
            if self.answers():
                return time.perf_counter() - self.spawned_at
            time.sleep(interval)
        raise BenchSetupError(f"{self.name} did not answer within {timeout} s; its log:\n{self.log_tail()}")

    def start(self, timeout: float = 60) -> float:
        self.spawn()
        return self.wait_ready(timeout)

    def log_tail(self, lines: int = 30) -> str:
        if not self.log_path.exists():
            return "(no log)"
        text = self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


class HttpProcess(Process):
    """A child that serves HTTP and says it is ready on `ready_path`."""

    ready_path = "/ready"

    def answers(self) -> bool:
        try:
            return httpx.get(self.url + self.ready_path, timeout=1).status_code == 200
        except httpx.HTTPError:
            return False


class RedisServer(Process):
    """A redis-server of our own, keeping nothing on disk."""

    name = "redis"

    def command(self) -> list[str]:
        binary = shutil.which("redis-server")
        if binary is None:
            raise BenchSetupError("redis-server is not installed (apt-get install redis-server)")
        return [binary, "--port", str(self.port), "--bind", LOOPBACK, "--save", "", "--appendonly", "no"]

    @property
    def redis_url(self) -> str:
        return f"redis://{LOOPBACK}:{self.port}/0"

    def answers(self) -> bool:
        try:
            return self.command_reply("PING").startswith(b"+PONG")
        except OSError:
            return False

    def command_reply(self, *args: str) -> bytes:
        """Send one command in RESP form and return the whole raw reply."""
        payload = f"*{len(args)}\r\n".encode() + b"".join(
            f"${len(a.encode())}\r\n".encode() + a.encode() + b"\r\n" for a in args
        )
        with socket.create_connection((LOOPBACK, self.port), timeout=2) as sock:
            sock.sendall(payload)
            reply = sock.recv(65536)
            if reply.startswith(b"$"):  # a bulk string: read until all of it is here
                header, _, rest = reply.partition(b"\r\n")
                length = int(header[1:])
                while len(rest) < length + 2:
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    rest += chunk
                return rest[:length]
            return reply

    def stats(self) -> dict[str, int]:
        """Integer fields of INFO stats (total_commands_processed, keyspace_hits, ...)."""
        text = self.command_reply("INFO", "stats").decode()
        found: dict[str, int] = {}
        for line in text.splitlines():
            name, sep, value = line.partition(":")
            if sep and value.strip().isdigit():
                found[name] = int(value)
        return found


class SimulatorProcess(HttpProcess):
    """The project's provider simulator, `dspy-service simulate`."""

    name = "simulator"
    ready_path = "/_sim/health"

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "dspy_service.cli",
            "simulate",
            "--host",
            LOOPBACK,
            "--port",
            str(self.port),
            "--latency-ms",
            "0",
        ]

    def environment(self) -> dict[str, str]:
        return clean_environment({})

    @property
    def api_base(self) -> str:
        return f"{self.url}/v1"

    def configure(self, **knobs: Any) -> None:
        httpx.post(self.url + "/_sim/config", json=knobs, timeout=10).raise_for_status()

    def calls(self) -> int:
        stats: dict[str, Any] = httpx.get(self.url + "/_sim/stats", timeout=10).json()
        return int(stats["calls"])


class ServiceProcess(HttpProcess):
    """`dspy-service serve`, configured only by the environment given; JSON logs to a file."""

    name = "service"

    def __init__(self, workdir: Path, core: int | None, env: Mapping[str, str]) -> None:
        super().__init__(workdir, core)
        self.env = clean_environment({"PORT": str(self.port), "HOST": LOOPBACK, **env})

    def command(self) -> list[str]:
        return [sys.executable, "-m", "dspy_service.cli", "serve"]

    def environment(self) -> dict[str, str]:
        return self.env


class BareAppProcess(HttpProcess):
    """The bare Starlette app of bench/bare_app.py: the ceiling."""

    name = "bare-app"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "bench.bare_app", "--host", LOOPBACK, "--port", str(self.port)]

    def environment(self) -> dict[str, str]:
        env = clean_environment({})
        root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
        return env


P = TypeVar("P", bound=Process)


@contextlib.contextmanager
def running(process: P, timeout: float = 60) -> Iterator[P]:
    """Start the process, yield it, stop it whatever happens."""
    try:
        process.start(timeout)
        yield process
    finally:
        process.stop()


class DspyDirectProcess(Process):
    """bench/dspy_direct.py: the module programs driven by DSPy in one asyncio loop, no service. It
    is told what to run, one JSON line on its stdin per run, and answers one JSON line on stdout."""

    name = "dspy-direct"
    _MARKER = "BENCH_JSON "

    def __init__(self, workdir: Path, core: int | None, api_base: str) -> None:
        super().__init__(workdir, core)
        self.api_base = api_base

    def command(self) -> list[str]:
        return [sys.executable, "-m", "bench.dspy_direct", "--api-base", self.api_base]

    def environment(self) -> dict[str, str]:
        env = clean_environment({})
        root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
        return env

    def spawn(self) -> None:
        with self.log_path.open("ab") as log:  # its log lines; stdout carries the answers
            self.spawned_at = time.perf_counter()
            self.process = subprocess.Popen(
                pinned(self.command(), self.core),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                bufsize=0,  # unbuffered: a line read is never left in a buffer `select` cannot see
                env=self.environment(),
                cwd=self.workdir,
            )

    def answers(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self, timeout: float = 60) -> float:
        self.spawn()
        self._read_line(lambda line: line == "READY", timeout)
        return time.perf_counter() - self.spawned_at

    def ask(self, command: Mapping[str, Any], timeout: float) -> dict[str, Any]:
        """Send one command and return the JSON it answers with."""
        self.ensure_alive()
        assert self.process is not None
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(command).encode() + b"\n")
        self.process.stdin.flush()
        line = self._read_line(lambda text: text.startswith(self._MARKER), timeout)
        answer: dict[str, Any] = json.loads(line.removeprefix(self._MARKER))
        return answer

    def _read_line(self, wanted: Callable[[str], bool], timeout: float) -> str:
        """The first line on its stdout that is `wanted`, within `timeout` seconds."""
        assert self.process is not None
        assert self.process.stdout is not None
        stdout = self.process.stdout
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([stdout], [], [], left)[0]:
                raise BenchSetupError(
                    f"{self.name} did not answer within {timeout} s; its log:\n{self.log_tail()}"
                )
            raw = stdout.readline()
            if not raw:
                raise BenchSetupError(
                    f"{self.name} exited with {self.process.wait()}; its log:\n{self.log_tail()}"
                )
            line = raw.decode(errors="replace").strip()
            if wanted(line):
                return line

    def stop(self) -> None:
        process = self.process
        super().stop()
        if process is not None:
            for pipe in (process.stdin, process.stdout):
                if pipe is not None:
                    with contextlib.suppress(OSError):
                        pipe.close()
