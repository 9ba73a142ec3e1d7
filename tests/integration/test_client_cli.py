"""The client CLI (`dspy-service predict | costs`) run as a real subprocess against a running service."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from tests.support.processes import LOOPBACK, ServiceProcess, Simulator, free_port, run_cli


def unique(text: str = "question") -> str:
    return f"{text} {uuid.uuid4().hex}"


def test_predict_prints_the_answer(shared_service: ServiceProcess, sim: Simulator) -> None:
    """`predict` prints the program's answer, the one the service gives over HTTP, and exits 0."""
    question = unique("What is the capital of France?")
    done = run_cli(
        "predict", question, "--model", "gpt-3.5-turbo", "--variant", "cot", url=shared_service.url
    )
    assert done.returncode == 0, done.stderr
    again = shared_service.http.post(
        "/v1/predict", json={"model": "gpt-3.5-turbo", "variant": "cot", "input": question}
    ).json()
    assert again["metadata"]["cache_level"] == "memory"
    assert done.stdout == again["output"] + "\n"
    assert done.stderr == ""


def test_predict_json_prints_the_whole_response(shared_service: ServiceProcess, sim: Simulator) -> None:
    """`--json` prints the full response; `--param` values are parsed as JSON (an integer stays one:
    the same request over HTTP hits the cache entry the CLI filled); `-v` reports on stderr."""
    question = unique()
    done = run_cli(
        "predict",
        question,
        "-m",
        "gpt-4",
        "--param",
        "max_tokens=100",
        "--json",
        "-v",
        url=shared_service.url,
    )
    assert done.returncode == 0, done.stderr
    body = json.loads(done.stdout)
    assert body["model"] == "gpt-4"
    assert body["variant"] == "baseline"
    assert body["metadata"]["cache_level"] is None
    assert "variant=baseline" in done.stderr
    assert f"request_id={body['request_id']}" in done.stderr
    same = shared_service.http.post(
        "/v1/predict", json={"model": "gpt-4", "input": question, "parameters": {"max_tokens": 100}}
    ).json()
    assert same["metadata"]["cache_level"] == "memory"


def test_no_cache_skips_the_cache(shared_service: ServiceProcess, sim: Simulator) -> None:
    """`--no-cache` sends use_cache=false: every run reaches the provider."""
    question = unique()
    for _ in range(2):
        done = run_cli("predict", question, "-m", "gpt-4", "--no-cache", "--json", url=shared_service.url)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["metadata"]["cache_level"] is None
    assert sim.stats()["calls"] == 2


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["-m", "no-such-model"], "not_found: unknown model 'no-such-model'"),
        (["-m", "gpt-4", "--param", "colour=blue"], "invalid_request: parameters.colour"),
    ],
)
def test_a_service_error_is_reported_with_its_request_id(
    shared_service: ServiceProcess, extra: list[str], expected: str
) -> None:
    """An error answer prints the service's message, status and request ID to stderr and exits 1."""
    done = run_cli("predict", unique(), *extra, "--request-id", "cli-test-42", url=shared_service.url)
    assert done.returncode == 1
    assert done.stdout == ""
    assert expected in done.stderr
    assert "request id cli-test-42" in done.stderr


def test_an_unreachable_service_is_said_plainly() -> None:
    """Nothing listening: a clear message naming the URL and how to point elsewhere, exit 3."""
    url = f"http://{LOOPBACK}:{free_port()}"
    done = run_cli("predict", "hello", "-m", "gpt-4", url=url)
    assert done.returncode == 3
    assert f"cannot connect to {url} (connection refused)" in done.stderr
    assert "DSPY_SERVICE_URL" in done.stderr


def test_a_malformed_param_is_a_usage_error() -> None:
    """`--param` without `=` is refused by the argument parser (exit 2) before any request."""
    done = run_cli("predict", "hello", "-m", "gpt-4", "--param", "temperature", url=None)
    assert done.returncode == 2
    assert "is not KEY=VALUE" in done.stderr


def test_costs_prints_an_aligned_table(shared_service: ServiceProcess, sim: Simulator) -> None:
    """`costs` prints one aligned row per model:variant with the /costs figures, and the scope."""
    shared_service.http.post("/v1/predict", json={"model": "gpt-4", "variant": "cot", "input": unique()})
    done = run_cli("costs", url=shared_service.url)
    assert done.returncode == 0, done.stderr
    totals = shared_service.http.get("/costs").json()
    lines = done.stdout.splitlines()
    header, rule = lines[0], lines[1]
    titles = "model:variant requests hits input tokens output tokens cost USD saved USD"
    assert header.split() == titles.split()
    assert set(rule) == {"-", " "}
    # the rows, without the scope and since lines and the notes on uncounted spend (other tests'
    # rows in the shared Redis may have cut-off calls)
    table = [
        line
        for line in lines[2:]
        if not line.startswith(("scope:", "since:")) and not line.endswith("not included")
    ]
    assert all(len(line) == len(header) for line in table)
    row = next(line for line in table if line.startswith("gpt-4:cot "))
    cells = row.split()
    figures = totals["gpt-4:cot"]
    assert int(cells[1].replace(",", "")) == figures["total_requests"]
    assert int(cells[2].replace(",", "")) == figures["cache_hits"]
    assert float(cells[5]) == pytest.approx(figures["total_cost_usd"], abs=1e-6)
    assert lines[-2].startswith("scope: fleet")
    assert lines[-1].startswith("since: ")  # when the state Redis began these totals
    as_json = run_cli("costs", "--json", url=shared_service.url)
    assert json.loads(as_json.stdout)["gpt-4:cot"]["total_requests"] == figures["total_requests"]


class _Recorder(BaseHTTPRequestHandler):
    """Answers like the service and remembers the Authorization header of each request."""

    seen: list[str | None] = []  # noqa: RUF012 (one recorder per test, reset by the fixture)

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length", "0")))
        authorization = self.headers.get("authorization")
        type(self).seen.append(authorization)
        if authorization == "Bearer good-key":
            self._answer(200, {"request_id": "r1", "output": "Paris", "metadata": {}})
        else:
            self._answer(401, {"error": {"type": "unauthorized", "message": "bad key", "request_id": "r2"}})

    def _answer(self, status: int, body: dict[str, Any]) -> None:
        payload = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def recorder() -> Iterator[str]:
    _Recorder.seen = []
    server = ThreadingHTTPServer((LOOPBACK, 0), _Recorder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://{LOOPBACK}:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def test_api_key_is_sent_as_a_bearer_token(recorder: str) -> None:
    """The key from DSPY_SERVICE_API_KEY (or --api-key, which wins) goes as `Authorization: Bearer`."""
    done = run_cli("predict", "hi", "-m", "gpt-4", url=recorder, DSPY_SERVICE_API_KEY="good-key")
    assert (done.returncode, done.stdout) == (0, "Paris\n")
    refused = run_cli(
        "predict", "hi", "-m", "gpt-4", "--api-key", "bad-key", url=recorder, DSPY_SERVICE_API_KEY="good-key"
    )
    assert refused.returncode == 1
    assert "unauthorized: bad key (HTTP 401, request id r2)" in refused.stderr
    no_key = run_cli("predict", "hi", "-m", "gpt-4", url=recorder)
    assert no_key.returncode == 1
    assert _Recorder.seen == ["Bearer good-key", "Bearer bad-key", None]
