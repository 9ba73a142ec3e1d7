"""`dspy-service serve | simulate`, the client commands `predict | costs` (client_cli.py),
`optimize` (optimize_cli.py), and the records commands `db upgrade | db current | export`
(records_cli.py).

Arguments only: serving one process is serving.py's, several worker processes workers.py's."""

from __future__ import annotations

import argparse
import sys

import uvicorn

from dspy_service import client_cli, optimize_cli, records_cli
from dspy_service.logs import configure_logging
from dspy_service.serving import Hangups, free_port, load_configuration, run_service, warn_simulated


def _serve_command() -> int:
    hangups = Hangups()
    hangups.install()  # from here on a SIGHUP does not end the process
    loaded = load_configuration()
    if isinstance(loaded, int):
        return loaded
    settings, models_config = loaded
    if settings.workers == 1:
        return run_service(settings, models_config, hangups)
    from dspy_service.workers import Supervisor

    simulator_port = None
    if settings.uses_simulator:
        simulator_port = settings.simulator_port or free_port("127.0.0.1")
        warn_simulated(f"http://127.0.0.1:{simulator_port}/v1")
    try:
        supervisor = Supervisor(
            workers=settings.workers, host=settings.host, port=settings.port, simulator_port=simulator_port
        )
    except OSError as exc:
        print(f"dspy-service: cannot listen on {settings.host}:{settings.port}: {exc}", file=sys.stderr)
        return 1
    return supervisor.run()


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
    # A hung request (the `hang` knob) must not hold SIGTERM up: shutdown waits one second for it.
    uvicorn.run(
        create_simulator_app(knobs),
        host=args.host,
        port=args.port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=1,
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
    optimize_cli.add_command(commands)
    records_cli.add_commands(commands)
    args = parser.parse_args(argv)
    if args.command in ("predict", "costs"):
        return client_cli.run(args)
    if args.command == "serve":
        return _serve_command()
    if args.command == "optimize":
        return optimize_cli.run(args)
    if args.command in ("db", "export"):
        return records_cli.run(args)
    return _simulate(args)


if __name__ == "__main__":
    sys.exit(main())
