"""`dspy-service serve | simulate`, and the client commands `predict | costs` (client_cli.py)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import signal
import socket
import sys
import time
from collections.abc import Iterator
from types import FrameType
from typing import TYPE_CHECKING

import uvicorn
import uvloop
from pydantic import ValidationError

from dspy_service import client_cli
from dspy_service.errors import ConfigError
from dspy_service.logs import configure_logging, get_logger

if TYPE_CHECKING:
    from dspy_service.models_config import ModelsConfig
    from dspy_service.services import Lifecycle
    from dspy_service.settings import Settings

_log = get_logger("dspy_service.cli")

# After the drain, uvicorn closes idle keep-alive connections; this bounds that last step.
_CONNECTION_CLOSE_SECS = 5


class _EmbeddedServer(uvicorn.Server):
    """A second server in the same process (the demo simulator): it leaves signals to the main one."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class GracefulServer(uvicorn.Server):
    """On SIGTERM: readiness turns 503 at once, the listener stays open and in-flight predictions
    finish (up to the grace period), then uvicorn stops, the lifespan flushes and the process exits 0.
    A second signal stops at once."""

    def __init__(self, config: uvicorn.Config, *, lifecycle: Lifecycle, grace_secs: float) -> None:
        super().__init__(config)
        self._lifecycle = lifecycle
        self._grace = grace_secs
        self._drain_started: float | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._drain_started is not None:
            self.should_exit = True
            self.force_exit = sig == signal.SIGINT
            return
        self._drain_started = time.monotonic()
        self._lifecycle.draining = True
        _log.info(
            "service.draining",
            signal=signal.Signals(sig).name,
            grace_secs=self._grace,
            in_flight=self._lifecycle.in_flight,
        )

    async def on_tick(self, counter: int) -> bool:
        if self._drain_started is not None and not self.should_exit:
            in_flight = self._lifecycle.busy
            waited = time.monotonic() - self._drain_started
            if in_flight == 0 or waited >= self._grace:
                _log.info("service.drained", waited_secs=round(waited, 3), still_in_flight=in_flight)
                self.should_exit = True
        return await super().on_tick(counter)


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _load_configuration() -> tuple[Settings, ModelsConfig] | int:
    """Settings and the models file, or exit code 2 with the problem on stderr."""
    from dspy_service.models_config import load_models_config
    from dspy_service.settings import Settings

    try:
        settings = Settings()
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']).upper() or 'settings'}: {err['msg']}"
            for err in exc.errors(include_input=False, include_url=False)
        )
        print(f"dspy-service: invalid environment: {problems}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format)
    try:
        # Checked before DSPy is imported (seconds), so a broken file fails fast.
        models_config = load_models_config(settings.models_config)
    except ConfigError as exc:
        print(f"dspy-service: configuration error: {exc}", file=sys.stderr)
        return 2
    return settings, models_config


def _warn_simulated(base_url: str) -> None:
    _log.warning(
        "provider.simulated",
        detail="OPENAI_API_KEY is not set: predictions are answered by the built-in simulator, "
        "not a real model. Set OPENAI_API_KEY (and optionally OPENAI_BASE_URL) for real answers.",
        simulator=base_url,
    )


def _serve_command() -> int:
    loaded = _load_configuration()
    if isinstance(loaded, int):
        return loaded
    settings, models_config = loaded
    if settings.workers == 1:
        # uvicorn.run() would pick uvloop itself; serving a Server object ourselves, we must.
        return uvloop.run(_serve(settings, models_config))
    from dspy_service.workers import Supervisor

    simulator_port = None
    if settings.uses_simulator:
        simulator_port = settings.simulator_port or _free_port("127.0.0.1")
        _warn_simulated(f"http://127.0.0.1:{simulator_port}/v1")
    try:
        supervisor = Supervisor(
            workers=settings.workers, host=settings.host, port=settings.port, simulator_port=simulator_port
        )
    except OSError as exc:
        print(f"dspy-service: cannot listen on {settings.host}:{settings.port}: {exc}", file=sys.stderr)
        return 1
    return supervisor.run()


def run_worker(sock: socket.socket, simulator_url: str | None) -> int:
    """One worker process of a WORKERS>1 service (workers.py)."""
    loaded = _load_configuration()
    if isinstance(loaded, int):
        return loaded
    settings, models_config = loaded
    return uvloop.run(_serve(settings, models_config, sock, simulator_url))


async def _serve(
    settings: Settings,
    models_config: ModelsConfig,
    sock: socket.socket | None = None,
    simulator_url: str | None = None,
) -> int:
    if settings.otel_traces_endpoint is None:
        from dspy_service.tracing import keep_opentelemetry_unloaded

        keep_opentelemetry_unloaded()  # tracing off: redis-py must not load it (~85 ms of start-up)
    from dspy_service.app import create_app
    from dspy_service.services import build_services

    simulator_server = None
    base_url = simulator_url
    if settings.uses_simulator and base_url is None:
        from dspy_service.simulator import create_simulator_app

        port = settings.simulator_port or _free_port("127.0.0.1")
        base_url = f"http://127.0.0.1:{port}/v1"
        simulator_server = _EmbeddedServer(
            uvicorn.Config(
                create_simulator_app(),
                host="127.0.0.1",
                port=port,
                log_config=None,
                access_log=False,
                lifespan="off",
            )
        )
        _warn_simulated(base_url)
    try:
        services = build_services(settings, models_config=models_config, base_url=base_url)
    except ConfigError as exc:
        print(f"dspy-service: configuration error: {exc}", file=sys.stderr)
        return 2
    app = create_app(services)
    # Everything built so far (DSPy, pydantic's schemas, the programs: ~100,000 objects) lives as
    # long as the process. Frozen, the collector stops scanning it on every full collection, which
    # took ~30 ms each under load: miss p99 at 32 connections 73 -> 37 ms (provider 0 ms), 94 -> 81
    # ms (50 ms), in one bench run with --baseline-src.
    gc.collect()
    gc.freeze()
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=_CONNECTION_CLOSE_SECS,
        server_header=False,
    )
    server = GracefulServer(config, lifecycle=services.lifecycle, grace_secs=settings.shutdown_grace_secs)
    simulator_task = None
    if simulator_server is not None:
        simulator_task = asyncio.create_task(simulator_server.serve())
    try:
        await server.serve(sockets=[sock] if sock is not None else None)
    finally:
        if simulator_server is not None and simulator_task is not None:
            simulator_server.should_exit = True
            await simulator_task
    return 0 if server.started else 1


def _simulate(args: argparse.Namespace) -> int:
    from dspy_service.simulator import Knobs, create_simulator_app

    configure_logging("info", "json")
    knobs = Knobs(
        latency_ms=args.latency_ms,
        jitter_ms=args.jitter_ms,
        error_rate=args.error_rate,
        error_status=args.error_status,
        hang=args.hang,
    )
    uvicorn.run(
        create_simulator_app(knobs), host=args.host, port=args.port, log_config=None, access_log=False
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dspy-service", description="Serve DSPy programs over HTTP.")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("serve", help="run the HTTP service (configured from the environment)")
    simulate = commands.add_parser("simulate", help="run the OpenAI-compatible provider simulator")
    simulate.add_argument("--host", default="127.0.0.1")
    simulate.add_argument("--port", type=int, default=8099)
    simulate.add_argument("--latency-ms", type=float, default=0.0)
    simulate.add_argument("--jitter-ms", type=float, default=0.0)
    simulate.add_argument("--error-rate", type=float, default=0.0)
    simulate.add_argument("--error-status", type=int, default=500)
    simulate.add_argument("--hang", action="store_true")
    client_cli.add_commands(commands)
    args = parser.parse_args(argv)
    if args.command in ("predict", "costs"):
        return client_cli.run(args)
    if args.command == "serve":
        return _serve_command()
    return _simulate(args)


if __name__ == "__main__":
    sys.exit(main())
