"""`WORKERS=N` (N > 1): N service processes sharing one listening socket, under a small supervisor.

Each worker is the same single-process service (its own event loop, memory cache, breakers and
coalescing); the kernel spreads connections over them. Metrics are made whole again with
prometheus_client's multiprocess mode: every worker writes its samples to files in
PROMETHEUS_MULTIPROC_DIR and `/metrics`, whichever worker answers, reads them all.

Written by hand rather than using uvicorn's `--workers`: its workers run plain `uvicorn.Server`, and
ours must run the draining server of serving.py (SIGTERM: readiness 503, in-flight requests finish),
get the address of a simulator shared by all, and have their metric files retired when they exit.

The supervisor forwards SIGTERM/SIGINT to the workers and exits 0 once they all have; a worker that
dies while the service runs is replaced (a crash loop stops the service instead). It forwards SIGHUP
too, and each worker reloads its programs (reloading.py); the supervisor itself reads no models file.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
import time
from multiprocessing.process import BaseProcess
from pathlib import Path
from types import FrameType

from dspy_service.logs import get_logger
from dspy_service.serving import run_worker

_log = get_logger("dspy_service.workers")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
_RESTARTS_ALLOWED = 5  # within _RESTART_WINDOW_SECS, before a crash loop stops the service
_RESTART_WINDOW_SECS = 60.0
_POLL_SECS = 0.2


def prepare_metrics_dir() -> tuple[Path, bool]:
    """The directory for the workers' metric files: PROMETHEUS_MULTIPROC_DIR if set (emptied, as
    prometheus_client requires between runs), else a new temporary one. Returns it and whether we made it."""
    given = os.environ.get(MULTIPROC_ENV)
    if given:
        path = Path(given)
        path.mkdir(parents=True, exist_ok=True)
        for stale in path.glob("*.db"):
            stale.unlink()
        return path, False
    path = Path(tempfile.mkdtemp(prefix="dspy-service-metrics-"))
    os.environ[MULTIPROC_ENV] = str(path)  # inherited by the workers before they import prometheus_client
    return path, True


def listening_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _worker_main(sock: socket.socket, simulator_url: str | None) -> None:
    import sys

    sys.exit(run_worker(sock, simulator_url))


def _simulator_main(port: int) -> None:
    import uvicorn

    from dspy_service.simulator import create_simulator_app

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # stopped by the supervisor, after the workers
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # a terminal's hangup: it has nothing to reload
    uvicorn.run(
        create_simulator_app(), host="127.0.0.1", port=port, log_config=None, access_log=False, lifespan="off"
    )


class Supervisor:
    def __init__(self, *, workers: int, host: str, port: int, simulator_port: int | None) -> None:
        self._count = workers
        self._context = multiprocessing.get_context("spawn")  # no fork of a process holding threads
        self._sock = listening_socket(host, port)
        self._simulator_port = simulator_port
        self._simulator: BaseProcess | None = None
        self._workers: list[BaseProcess] = []
        self._stopping = False
        self._restarts: list[float] = []
        self._metrics_dir: Path | None = None
        self._own_metrics_dir = False

    def _signal(self, sig: int, frame: FrameType | None) -> None:
        first = not self._stopping
        self._stopping = True
        if first:
            _log.info("workers.stopping", signal=signal.Signals(sig).name, workers=len(self._workers))
        for worker in self._workers:
            if worker.is_alive() and worker.pid is not None:
                os.kill(worker.pid, sig)

    def _hangup(self, sig: int, frame: FrameType | None) -> None:
        if self._stopping:  # a worker that is draining has nothing to reload
            _log.info("workers.reload_skipped", reason="the service is stopping")
            return
        pids = []
        for worker in self._workers:
            if worker.is_alive() and worker.pid is not None:
                os.kill(worker.pid, signal.SIGHUP)
                pids.append(worker.pid)
        _log.info("workers.reloading", pids=pids)

    def _start_worker(self, simulator_url: str | None) -> BaseProcess:
        worker = self._context.Process(
            target=_worker_main, args=(self._sock, simulator_url), name="dspy-service-worker"
        )
        # The worker inherits SIGHUP blocked: one sent while it starts (whose default action would
        # end it) waits until its handler is in place (serving.Hangups), then asks for a reload.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
        try:
            worker.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        return worker

    def run(self) -> int:
        from prometheus_client import multiprocess

        signal.signal(signal.SIGHUP, self._hangup)
        self._metrics_dir, self._own_metrics_dir = prepare_metrics_dir()
        simulator_url = None
        if self._simulator_port is not None:
            self._simulator = self._context.Process(
                target=_simulator_main, args=(self._simulator_port,), name="dspy-service-simulator"
            )
            self._simulator.start()
            simulator_url = f"http://127.0.0.1:{self._simulator_port}/v1"
        signal.signal(signal.SIGTERM, self._signal)
        signal.signal(signal.SIGINT, self._signal)
        self._workers = [self._start_worker(simulator_url) for _ in range(self._count)]
        _log.info(
            "workers.started",
            workers=self._count,
            pids=[w.pid for w in self._workers],
            metrics_dir=str(self._metrics_dir),
        )
        failed = False
        try:
            while self._workers:
                time.sleep(_POLL_SECS)
                for worker in list(self._workers):
                    if worker.is_alive():
                        continue
                    assert worker.pid is not None
                    # retire its live gauges; prometheus_client leaves this function unannotated
                    multiprocess.mark_process_dead(worker.pid)  # type: ignore[no-untyped-call]
                    code = worker.exitcode
                    if self._stopping:
                        failed = failed or code != 0
                        self._workers.remove(worker)
                        continue
                    now = time.monotonic()
                    self._restarts = [t for t in self._restarts if now - t < _RESTART_WINDOW_SECS]
                    if len(self._restarts) >= _RESTARTS_ALLOWED:
                        _log.error("workers.crash_loop", exit_code=code, restarts=len(self._restarts))
                        failed = True
                        self._signal(signal.SIGTERM, None)
                        self._workers.remove(worker)
                        continue
                    self._restarts.append(now)
                    replacement = self._start_worker(simulator_url)
                    _log.error("workers.replaced", pid=worker.pid, exit_code=code, new_pid=replacement.pid)
                    self._workers[self._workers.index(worker)] = replacement
        finally:
            self._sock.close()
            if self._simulator is not None:
                self._simulator.terminate()
                self._simulator.join(timeout=5)
            if self._own_metrics_dir and self._metrics_dir is not None:
                shutil.rmtree(self._metrics_dir, ignore_errors=True)
        _log.info("workers.stopped", failed=failed)
        return 1 if failed else 0
