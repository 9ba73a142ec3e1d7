"""Serving: one service process, from its settings and models file to its uvicorn server, with
the draining shutdown (SIGTERM) and the programs' reload (SIGHUP). `dspy-service serve` runs it
directly (WORKERS=1) or in each worker process of workers.py."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterator
from types import FrameType
from typing import TYPE_CHECKING

import uvicorn
import uvloop
from pydantic import ValidationError

from dspy_service.errors import ConfigError
from dspy_service.logs import configure_logging, get_logger

if TYPE_CHECKING:
    from dspy_service.models_config import ModelsConfig
    from dspy_service.services import Lifecycle, Services
    from dspy_service.settings import Settings

_log = get_logger("dspy_service.serving")

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
    A second signal stops at once. `on_started` runs once the service is started and listening."""

    def __init__(
        self,
        config: uvicorn.Config,
        *,
        lifecycle: Lifecycle,
        grace_secs: float,
        on_started: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(config)
        self._lifecycle = lifecycle
        self._grace = grace_secs
        self._drain_started: float | None = None
        self._on_started = on_started

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started and self._on_started is not None:
            self._on_started()

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


class Hangups:
    """SIGHUP before the service can reload: remembered, not fatal (its default action ends the
    process), and handed to the reloader once the service has started (`serve`).

    A worker process starts with SIGHUP blocked (workers.py), so one sent while it imports waits
    until `install` has put this handler in place."""

    def __init__(self) -> None:
        self.received = False

    def install(self) -> None:
        signal.signal(signal.SIGHUP, self._record)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})

    def _record(self, sig: int, frame: FrameType | None) -> None:
        self.received = True


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def load_configuration() -> tuple[Settings, ModelsConfig] | int:
    """Settings and the models file, or exit code 2 with the problem on stderr."""
    from dspy_service.models_config import load_models_config
    from dspy_service.settings import Settings, url_secrets

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
    secrets = settings.secret_values()
    for spec in models_config.models.values():
        secrets += url_secrets(spec.api_base)
    configure_logging(settings.log_level, settings.log_format, secrets)
    return settings, models_config


def warn_simulated(base_url: str) -> None:
    _log.warning(
        "provider.simulated",
        detail="OPENAI_API_KEY is not set: predictions are answered by the built-in simulator, "
        "not a real model. Set OPENAI_API_KEY (and optionally OPENAI_BASE_URL) for real answers.",
        simulator=base_url,
    )


def run_service(
    settings: Settings,
    models_config: ModelsConfig,
    hangups: Hangups,
    sock: socket.socket | None = None,
    simulator_url: str | None = None,
) -> int:
    """Serve until stopped; the process's exit code."""
    try:
        # uvicorn.run() would pick uvloop itself; serving a Server object ourselves, we must.
        return uvloop.run(serve(settings, models_config, hangups, sock, simulator_url))
    finally:
        # The closed loop left SIGHUP to its default action: the process ends without it.
        signal.signal(signal.SIGHUP, signal.SIG_IGN)


def run_worker(sock: socket.socket, simulator_url: str | None) -> int:
    """One worker process of a WORKERS>1 service (workers.py)."""
    hangups = Hangups()
    hangups.install()
    loaded = load_configuration()
    if isinstance(loaded, int):
        return loaded
    settings, models_config = loaded
    return run_service(settings, models_config, hangups, sock, simulator_url)


async def serve(
    settings: Settings,
    models_config: ModelsConfig,
    hangups: Hangups,
    sock: socket.socket | None = None,
    simulator_url: str | None = None,
) -> int:
    if settings.otel_traces_endpoint is None:
        from dspy_service.tracing import keep_opentelemetry_unloaded

        keep_opentelemetry_unloaded()  # tracing off: redis-py must not load it (~85 ms of start-up)
    from dspy_service.app import create_app
    from dspy_service.reloading import ProgramReloader
    from dspy_service.services import build_services

    simulator_server = None
    base_url = simulator_url
    if settings.uses_simulator and base_url is None:
        from dspy_service.simulator import create_simulator_app

        port = settings.simulator_port or free_port("127.0.0.1")
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
        warn_simulated(base_url)
    try:
        services = build_services(settings, models_config=models_config, base_url=base_url)
    except ConfigError as exc:
        print(f"dspy-service: configuration error: {exc}", file=sys.stderr)
        return 2
    app = create_app(services)
    reloader = ProgramReloader(services, base_url=base_url)

    def reload_on_hangup() -> None:
        # uvicorn captures SIGINT and SIGTERM only; SIGHUP is ours from here on.
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, reloader.request)
        if hangups.received:  # one came during start-up: the file may have changed since it was read
            reloader.request()

    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=_CONNECTION_CLOSE_SECS,
        server_header=False,
        # uvicorn believes X-Forwarded-For from loopback by default; we believe no proxy unless told.
        proxy_headers=bool(settings.forwarded_allow_ips),
        forwarded_allow_ips=settings.forwarded_allow_ips or None,
    )
    server = GracefulServer(
        config,
        lifecycle=services.lifecycle,
        grace_secs=settings.shutdown_grace_secs,
        on_started=reload_on_hangup,
    )
    simulator_task = None
    if simulator_server is not None:
        simulator_task = asyncio.create_task(simulator_server.serve())
    metrics_server, metrics_task = _start_metrics_server(settings, services)
    try:
        await server.serve(sockets=[sock] if sock is not None else None)
    finally:
        if simulator_server is not None and simulator_task is not None:
            simulator_server.should_exit = True
            await simulator_task
        if metrics_server is not None and metrics_task is not None:
            metrics_server.should_exit = True
            await metrics_task
    return 0 if server.started else 1


def _start_metrics_server(
    settings: Settings, services: Services
) -> tuple[uvicorn.Server | None, asyncio.Task[None] | None]:
    """With METRICS_PORT, /metrics on a port of its own (SO_REUSEPORT, so every worker of a
    WORKERS>1 service can listen on it; their samples are the same multiprocess files)."""
    if not settings.metrics_port:
        return None, None
    from dspy_service.app import create_metrics_app

    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    listener.bind((settings.host, settings.metrics_port))
    listener.listen(64)
    server = _EmbeddedServer(
        uvicorn.Config(create_metrics_app(services), log_config=None, access_log=False, lifespan="off")
    )
    return server, asyncio.create_task(server.serve(sockets=[listener]))
