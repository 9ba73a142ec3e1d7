"""What the log says: tracebacks as text, background work without a stranger's request ID, and
sampling of successful requests' lines."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tests.integration.conftest import ServiceFactory
from tests.support.processes import RedisServer, Simulator, wait_until


def test_a_foreign_loggers_traceback_is_logged_as_text() -> None:
    """uvicorn, DSPy or redis logging an exception gives its traceback as text in the JSON line,
    not `<traceback object at ...>`."""
    script = (
        "import logging\n"
        "from dspy_service.logs import configure_logging\n"
        "configure_logging('info', 'json')\n"
        "try:\n"
        "    raise ValueError('boom in a library')\n"
        "except ValueError:\n"
        "    logging.getLogger('uvicorn.error').exception('Exception in ASGI application')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60
    )
    line = json.loads(done.stdout.strip().splitlines()[-1])
    assert "traceback object" not in done.stdout
    assert "Traceback (most recent call last)" in line["exception"]
    assert "ValueError: boom in a library" in line["exception"]


def test_background_work_does_not_log_with_the_request_id_that_woke_it(
    service_factory: ServiceFactory, sim: Simulator, tmp_path: Path
) -> None:
    """The probe that a request meeting a dead Redis starts reports `redis.reconnected` later under
    no request's ID (it used to carry the ID of the request that first met the dead Redis)."""
    redis = RedisServer(tmp_path / "redis")
    (tmp_path / "redis").mkdir()
    redis.start()
    try:
        service = service_factory(REDIS_URL=redis.url, COSTS_FLUSH_INTERVAL_SECS="60")
        redis.kill()
        response = service.http.post("/v1/predict", json={"model": "gpt-4", "input": "while Redis is gone"})
        assert response.status_code == 200
        redis.start()

        def reconnected() -> list[dict[str, object]]:
            return [line for line in service.log_lines() if line.get("event") == "redis.reconnected"]

        wait_until(lambda: bool(reconnected()), timeout=20, what="redis.reconnected")
        assert "request_id" not in reconnected()[0]
    finally:
        redis.stop()


def test_successful_requests_lines_can_be_sampled_and_errors_never_are(
    service_factory: ServiceFactory, sim: Simulator
) -> None:
    """ACCESS_LOG_SAMPLE_RATE=0 drops successful requests' lines; every error still has its line."""
    service = service_factory(ACCESS_LOG_SAMPLE_RATE="0")
    for n in range(5):
        assert (
            service.http.post("/v1/predict", json={"model": "gpt-4", "input": f"ok {n}"}).status_code == 200
        )
    bad = service.http.post("/v1/predict", json={"model": "nope", "input": "x"})
    assert bad.status_code == 404

    def predict_lines() -> list[dict[str, Any]]:
        lines = [line for line in service.log_lines() if line.get("event") == "request.completed"]
        return [line for line in lines if line.get("path") == "/v1/predict"]

    # The line is written once the response has gone out: on a loaded machine, a moment after it.
    wait_until(lambda: bool(predict_lines()), timeout=5, what="the error's access-log line")
    time.sleep(0.2)  # and no other line after it
    assert [line["status"] for line in predict_lines()] == [404]
    assert predict_lines()[0]["request_id"] == bad.headers["x-request-id"]
