"""Services with receipts and feedback on, for the feedback and experiment tests: a records database
of each kind (a SQLite file under DATA_DIR, or a fresh PostgreSQL database dropped afterwards), a
models file with feedback metrics, replicas sharing the database, and the HTTP calls the tests make.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx

from tests.support.postgres import fresh_database
from tests.support.processes import ServiceProcess, wait_until

BACKENDS = ("sqlite", "postgresql")
METRICS = {
    "helpful": {"type": "boolean"},
    "rating": {"type": "float", "min": 1, "max": 5},
    "note": {"type": "comment", "max_length": 50},
}


@contextlib.contextmanager
def records_database(backend: str, workdir: Path) -> Iterator[dict[str, str]]:
    """The environment that points a service at an empty records database of this kind."""
    if backend == "sqlite":
        yield {"DATA_DIR": str(workdir / "data")}  # the default URL: sqlite under DATA_DIR
    else:
        with fresh_database("dspy_feedback_api") as url:
            yield {"DATABASE_URL": url}


def write_models_file(path: Path, models: tuple[str, ...] = ("gpt-4",), **top: Any) -> Path:
    """Every model is the simulator's gpt-4 under another name (a test of its own, figures of its
    own); variants baseline (Predict, the default) and tuned (ChainOfThought); the feedback metrics."""
    config = {
        "models": {
            name: {
                "name": "openai/gpt-4",
                "cost_per_1k_input_tokens": 0.03,
                "cost_per_1k_output_tokens": 0.06,
            }
            for name in models
        },
        "variants": {
            "baseline": {"signature": "question -> answer", "module": "predict"},
            "tuned": {"signature": "question -> answer", "module": "chain_of_thought"},
        },
        "feedback": {"metrics": METRICS},
        **top,
    }
    path.write_text(json.dumps(config), encoding="utf-8")
    return path


def start_replicas(env: Mapping[str, str], workdir: Path, *names: str) -> list[ServiceProcess]:
    """Services with the same environment (so the same database), started side by side."""
    services = [ServiceProcess(env, workdir, name) for name in names]
    try:
        for service in services:
            service.start(wait=False)
        for service in services:
            wait_until(lambda s=service: _ready(s), timeout=60, what=f"{service.log_path} to be ready")
    except BaseException:
        for service in services:
            service.stop()
        raise
    return services


def _ready(service: ServiceProcess) -> bool:
    if service.process is not None and service.process.poll() is not None:
        raise RuntimeError(f"service exited with {service.process.returncode}:\n{service.log_text()}")
    try:
        return service.http.get("/ready").status_code == 200
    except httpx.HTTPError:
        return False


def bearer(key: str | None) -> dict[str, str]:
    return {} if key is None else {"Authorization": f"Bearer {key}"}


def predict(service: ServiceProcess, key: str | None = None, **body: Any) -> dict[str, Any]:
    """One answered /v1/predict (model gpt-4 unless given)."""
    response = service.http.post("/v1/predict", json={"model": "gpt-4", **body}, headers=bearer(key))
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    return answer


def give(
    service: ServiceProcess, request_id: str, metric: str, value: Any, key: str | None = None
) -> httpx.Response:
    body = {"request_id": request_id, "metric": metric, "value": value}
    return service.http.post("/v1/feedback", json=body, headers=bearer(key))


def experiments(service: ServiceProcess, key: str | None = None, **params: str) -> dict[str, Any]:
    response = service.http.get("/v1/experiments", params=params, headers=bearer(key))
    assert response.status_code == 200, response.text
    report: dict[str, Any] = response.json()
    return report
