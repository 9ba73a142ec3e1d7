"""A full scenario with distinctive secrets in every setting that can hold one, then every response
body, every header and every log line is searched for them: none may appear anywhere."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.integration.conftest import ServiceFactory
from tests.support.processes import RedisServer, Simulator

REDIS_PASSWORD = "rp-SECRET-redis-71x"
PROVIDER_KEY = "sk-SECRET-provider-key-99"
GATEWAY_PASSWORD = "gw-SECRET-pass-42"
CLIENT_KEY = "sk-SECRET-client-key-0001"
QUERY_TOKEN = "qt-SECRET-query-55"
SECRETS = (REDIS_PASSWORD, PROVIDER_KEY, GATEWAY_PASSWORD, CLIENT_KEY, QUERY_TOKEN)


@pytest.fixture
def guarded_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis")
    (tmp_path / "redis").mkdir()
    server.start()
    server.command("CONFIG", "SET", "requirepass", REDIS_PASSWORD)
    yield server
    server.stop()


def test_no_secret_appears_in_any_response_header_or_log_line(
    service_factory: ServiceFactory, sim: Simulator, guarded_redis: RedisServer, tmp_path: Path
) -> None:
    """Secrets in REDIS_URL (?password=), OPENAI_BASE_URL (user info), OPENAI_API_KEY, API_KEYS and a
    model's api_base (?api_key=): after successes, failures, a stream, refusals and every read-only
    endpoint, the scan finds none of them."""
    # Credentials in a URL's user info (a gateway with basic auth, say): the call cannot go through
    # that way, and the failure must not show them either.
    gated = sim.api_base.replace("http://", f"http://gwuser:{GATEWAY_PASSWORD}@")
    side = f"{sim.api_base}?api_key={QUERY_TOKEN}"  # a key as a query parameter: likewise
    models = tmp_path / "models.yaml"
    models.write_text(
        "models:\n"
        "  gpt-4: {name: openai/gpt-4, cost_per_1k_input_tokens: 0.03, cost_per_1k_output_tokens: 0.06}\n"
        f"  side: {{name: openai/gpt-3.5-turbo, api_base: '{side}', max_retries: 0}}\n"
        f"  gated: {{name: openai/gpt-3.5-turbo, api_base: '{gated}', max_retries: 0}}\n"
        "variants:\n  baseline: {signature: 'question -> answer'}\n",
        encoding="utf-8",
    )
    service = service_factory(
        REDIS_URL=f"redis://127.0.0.1:{guarded_redis.port}/0?password={REDIS_PASSWORD}",
        OPENAI_API_KEY=PROVIDER_KEY,
        OPENAI_BASE_URL=sim.api_base,
        API_KEYS=f"{CLIENT_KEY} acme",
        MODELS_CONFIG=str(models),
    )
    auth = {"Authorization": f"Bearer {CLIENT_KEY}"}
    responses: list[httpx.Response] = []

    def call(method: str, path: str, **kwargs: object) -> httpx.Response:
        response = service.http.request(method, path, **kwargs)  # type: ignore[arg-type]
        responses.append(response)
        return response

    ok = call(
        "POST",
        "/v1/predict",
        json={"model": "gpt-4", "input": "What is the capital of France?"},
        headers=auth,
    )
    assert ok.status_code == 200, ok.text
    call("POST", "/v1/predict", json={"model": "side", "input": "side door"}, headers=auth)
    call(
        "POST",
        "/v1/predict",
        json={"model": "gpt-4", "input": "x"},
        headers={"Authorization": "Bearer sk-wrong-0000000000"},
    )
    for status in (500, 400, 401):
        sim.configure(error_rate=1.0, error_status=status)
        call("POST", "/v1/predict", json={"model": "gpt-4", "input": f"fail {status}"}, headers=auth)
    sim.configure(error_rate=0.0)
    call("POST", "/v1/predict", json={"model": "gated", "input": "through the gate"}, headers=auth)
    call("POST", "/v1/predict/stream", json={"model": "gpt-4", "input": "stream it"}, headers=auth)
    call("POST", "/v1/predict/batch", json={"requests": [{"model": "gpt-4", "input": "b"}]}, headers=auth)
    for path in (
        "/health",
        "/ready",
        "/config",
        "/costs",
        "/metrics",
        "/v1/programs",
        "/openapi.json",
        "/v1/experiments",
    ):
        call("GET", path, headers=auth)
    assert guarded_redis.command("DBSIZE") != b":0\r\n", "the service never reached its Redis"

    found = []
    for response in responses:
        text = response.text + "".join(f"{k}: {v}\n" for k, v in response.headers.items())
        found += [(response.request.url.path, secret) for secret in SECRETS if secret in text]
    log = service.log_text()
    found += [("log", secret) for secret in SECRETS if secret in log]
    lines = len(log.splitlines())
    print(f"secret scan: {len(responses)} responses and {lines} log lines, {len(found)} secrets found")
    assert found == []


def test_an_unparsable_redis_url_is_a_clean_error_that_does_not_echo_it(tmp_path: Path) -> None:
    """A password with a `/` breaks the URL: start-up stops (exit 2) saying how to encode it, with
    no traceback and nothing of the password."""
    from tests.support.processes import run_service_expecting_failure

    code, output = run_service_expecting_failure(
        {"REDIS_URL": "redis://:pa55/w0rd-SECRET@127.0.0.1:6379/0", "OPENAI_API_KEY": "k"}, tmp_path
    )
    assert code == 2, output
    assert "REDIS_URL cannot be parsed" in output
    assert "w0rd-SECRET" not in output
    assert "pa55" not in output
    assert "Traceback" not in output
