"""Security and hostile input against real service processes: API keys, CORS, size and time limits,
rate limits shared through Redis, daily budgets, and inputs meant to break parsing, logs or headers.

Two kinds of services are started once for the module: `secured` (keys file with tenants, CORS `*`,
a 1 s body timeout, MAX_INPUT_CHARS=2000, budgets) and a `pair` of processes sharing one Redis with
RATE_LIMIT and METRICS_PUBLIC=true.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import statistics
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.conftest import ServiceFactory, base_env
from tests.support.processes import LOOPBACK, RedisServer, ServiceProcess, Simulator, wait_until
from tests.support.redis_keys import DEFAULT_PREFIX, STATE_PREFIX

KEY_ACME = "sk-acme-" + "a1" * 12  # stored only as its SHA-256, tenant acme
KEY_PLAIN = "sk-plain-" + "b2" * 12  # stored in plain text, no tenant, an operator key
KEY_FRUGAL = "sk-frugal-" + "c3" * 12  # tenant frugal, with a tiny daily budget
SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:\-]{0,127}$")

MODELS_YAML = """
models:
  gpt-3.5-turbo:
    name: openai/gpt-3.5-turbo
    cost_per_1k_input_tokens: 0.0005
    cost_per_1k_output_tokens: 0.0015
  budgeted:
    name: openai/gpt-4
    cost_per_1k_input_tokens: 0.001
    cost_per_1k_output_tokens: 0.001
    max_output_tokens: 100
    max_retries: 0
variants:
  baseline: {signature: "question -> answer"}
budgets:
  models: {budgeted: {daily_usd: 0.01}}
  tenants: {frugal: {daily_usd: 0.05}}
"""


def spend_elsewhere(redis: RedisServer, scope: str, name: str, usd: float) -> None:
    """Today's spend of a budget as other replicas would have added it, straight into Redis."""
    day = time.strftime("%Y-%m-%d", time.gmtime())
    redis.command("INCRBYFLOAT", f"{STATE_PREFIX}spend:{day}:{scope}:{name}", str(usd))


def unique(text: str = "question") -> str:
    return f"{text} {uuid.uuid4().hex}"


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def assert_error(response: httpx.Response, status: int, error_type: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    assert error["type"] == error_type
    assert error["request_id"] == response.headers["x-request-id"]
    return error


def raw_request(port: int, payload: bytes, *, timeout: float = 5) -> bytes:
    """Send bytes as they are (httpx refuses malformed headers) and read until the server closes."""
    with socket.create_connection((LOOPBACK, port), timeout=timeout) as sock:
        sock.sendall(payload)
        chunks = []
        while True:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                break
            if not chunk:
                break
            chunks.append(chunk)
            if b"\r\n\r\n" in b"".join(chunks) and b"connection: close" not in b"".join(chunks).lower():
                break  # a complete keep-alive answer: headers are what we check
        return b"".join(chunks)


@pytest.fixture(scope="module")
def secured(
    redis_server: RedisServer, simulator: Simulator, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServiceProcess]:
    workdir = tmp_path_factory.mktemp("secured")
    keys = workdir / "api-keys.txt"
    digest = hashlib.sha256(KEY_ACME.encode()).hexdigest()
    keys.write_text(
        f"# who may call\nsha256:{digest} acme\n"
        f"{KEY_PLAIN} role:operator  # ops, no tenant\n"
        f"{KEY_FRUGAL} frugal\n"
    )
    models = workdir / "models.yaml"
    models.write_text(MODELS_YAML)
    env = {
        **base_env(redis_server, simulator),
        "API_KEYS_FILE": str(keys),
        "MODELS_CONFIG": str(models),
        "CORS_ALLOW_ORIGINS": "*",
        "BODY_READ_TIMEOUT_SECS": "1",
        "MAX_INPUT_CHARS": "2000",
    }
    service = ServiceProcess(env, workdir, "secured")
    service.http.headers.update(bearer(KEY_PLAIN))
    service.start()
    yield service
    service.stop()


@pytest.fixture(scope="module")
def pair_tenant() -> str:
    return f"team-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def pair(
    redis_server: RedisServer,
    simulator: Simulator,
    tmp_path_factory: pytest.TempPathFactory,
    pair_tenant: str,
) -> Iterator[tuple[ServiceProcess, ServiceProcess]]:
    """Two replicas on one Redis with RATE_LIMIT=6/minute and an open /metrics."""
    workdir = tmp_path_factory.mktemp("pair")
    env = {
        **base_env(redis_server, simulator),
        "API_KEYS": f"{KEY_ACME} {pair_tenant},{KEY_PLAIN}",
        "RATE_LIMIT": "6/minute",
        "METRICS_PUBLIC": "true",
    }
    services = (ServiceProcess(env, workdir, "replica-a"), ServiceProcess(env, workdir, "replica-b"))
    for service in services:
        service.start(wait=False)
    for service in services:
        wait_until(service._ready, timeout=60, what=f"{service.log_path} to be ready")
    yield services
    for service in services:
        service.stop()


# --- access --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v1/predict"),
        ("GET", "/costs"),
        ("GET", "/config"),
        ("GET", "/metrics"),
        ("GET", "/openapi.json"),
    ],
)
def test_every_endpoint_but_the_probes_needs_a_key(secured: ServiceProcess, method: str, path: str) -> None:
    """Missing, wrong and non-Bearer credentials get 401 with the error shape and a Bearer challenge."""
    body = {"model": "gpt-3.5-turbo", "input": unique()} if method == "POST" else None
    for headers, invalid in (
        ({"Authorization": ""}, False),
        (bearer("sk-wrong-" + "0" * 20), True),
        ({"Authorization": f"Basic {KEY_PLAIN}"}, False),  # only Bearer counts
        (bearer(KEY_PLAIN[:-1]), True),
    ):
        response = httpx.request(method, secured.url + path, json=body, headers=headers, timeout=10)
        assert_error(response, 401, "unauthorized")
        challenge = response.headers["www-authenticate"]
        assert challenge.startswith("Bearer")
        assert ('error="invalid_token"' in challenge) == invalid
        assert KEY_PLAIN not in response.text
    allowed = secured.http.request(method, path, json=body)
    assert allowed.status_code == 200, allowed.text


def test_probes_are_open(secured: ServiceProcess) -> None:
    """/health and /ready answer without a key (the platform's probes have none)."""
    for path in ("/health", "/ready"):
        assert httpx.get(secured.url + path, timeout=10).status_code == 200


def test_metrics_are_open_only_with_metrics_public(
    secured: ServiceProcess, pair: tuple[ServiceProcess, ServiceProcess]
) -> None:
    """METRICS_PUBLIC=true opens /metrics for scrapers without a key; otherwise it needs one."""
    assert httpx.get(secured.url + "/metrics", timeout=10).status_code == 401
    assert httpx.get(pair[0].url + "/metrics", timeout=10).status_code == 200
    assert httpx.get(pair[0].url + "/costs", timeout=10).status_code == 401


def test_a_hashed_key_names_its_tenant_in_the_log_never_the_key(secured: ServiceProcess) -> None:
    """The tenant of a `sha256:` key goes into the request's log line; the key nowhere."""
    request_id = f"tenant-log-{uuid.uuid4().hex}"
    response = httpx.post(
        secured.url + "/v1/predict",
        json={"model": "gpt-3.5-turbo", "input": unique(), "request_id": request_id},
        headers=bearer(KEY_ACME),
        timeout=30,
    )
    assert response.status_code == 200, response.text

    def logged() -> list[dict[str, Any]]:
        return [line for line in secured.log_lines() if line.get("request_id") == request_id]

    wait_until(lambda: any(line.get("event") == "request.completed" for line in logged()), timeout=5)
    access = next(line for line in logged() if line.get("event") == "request.completed")
    assert access["tenant"] == "acme"
    assert re.fullmatch(r"[0-9a-f]{16}", access["key_id"])
    text = secured.log_text()
    for key in (KEY_ACME, KEY_PLAIN, KEY_FRUGAL):
        assert key not in text
    assert hashlib.sha256(KEY_ACME.encode()).hexdigest() not in text


def test_config_shows_the_number_of_keys_and_tenants_only(secured: ServiceProcess) -> None:
    """/config tells how many keys there are and which tenants; no key and no digest."""
    response = secured.http.get("/config")
    assert response.json()["auth"] == {
        "enabled": True,
        "keys": 3,
        "tenants": ["acme", "frugal"],
        "metrics_public": False,
    }
    for key in (KEY_ACME, KEY_PLAIN, KEY_FRUGAL):
        assert key not in response.text
        assert hashlib.sha256(key.encode()).hexdigest() not in response.text


def test_wrong_and_missing_keys_take_the_same_time(secured: ServiceProcess) -> None:
    """Medians of 200 wrong-key and 200 missing-key requests (printed; timing is not asserted here)."""
    url = secured.url + "/costs"
    samples: dict[str, list[float]] = {"missing": [], "wrong": [], "right": []}
    headers = {"missing": {}, "wrong": bearer("sk-wrong-" + "9" * 20), "right": bearer(KEY_PLAIN)}
    with httpx.Client(timeout=10) as client:
        for _ in range(20):  # warm the connection and the code paths
            client.get(url, headers=headers["wrong"])
        for _ in range(200):
            for kind in ("missing", "wrong", "right"):  # interleaved, so drift hits all three alike
                started = time.perf_counter()
                status = client.get(url, headers=headers[kind]).status_code
                samples[kind].append(time.perf_counter() - started)
                assert status == (200 if kind == "right" else 401)
    medians = {kind: statistics.median(values) * 1e6 for kind, values in samples.items()}
    print(
        "auth timing medians (µs, HTTP round trip): "
        + ", ".join(f"{kind} {value:.0f}" for kind, value in medians.items())
    )


# --- CORS ----------------------------------------------------------------------------------------


def test_a_wildcard_origin_never_allows_credentials(secured: ServiceProcess) -> None:
    """With CORS_ALLOW_ORIGINS=*, no response says Access-Control-Allow-Credentials; preflights pass."""
    origin = {"Origin": "https://evil.example"}
    preflight = httpx.options(
        secured.url + "/v1/predict",
        headers={
            **origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type",
        },
        timeout=10,
    )
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == "*"
    simple = secured.http.get("/costs", headers={**origin, "Cookie": "session=abc"})
    refused = httpx.get(secured.url + "/costs", headers=origin, timeout=10)
    assert refused.status_code == 401
    for response in (preflight, simple, refused):
        assert "access-control-allow-credentials" not in response.headers


# --- hostile bodies ------------------------------------------------------------------------------


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.mark.parametrize(
    ("raw", "mention"),
    [
        (b"{not json", "JSON"),
        (b'{"model": "gpt-3.5-turbo", "input": "x"', "JSON"),
        (b"\xff\xfe\x00\x01garbage", ""),
        (b'{"model": "gpt-3.5-turbo", "input": "\xc3\x28 invalid utf-8"}', ""),
        (b'{"model": "gpt-3.5-turbo", "input": "\\ud800 lone surrogate"}', ""),
        (b'{"model": 1, "input": true}', "model"),
        (b'{"model": "gpt-3.5-turbo", "input": "x", "parameters": "no"}', "parameters"),
        (b'{"model": "gpt-3.5-turbo", "input": "x", "admin": true}', "admin"),
        (b'{"model": "gpt-3.5-turbo", "input": "x", "parameters": {"seed": 1e999}}', "finite"),
        (
            b'{"model": "gpt-3.5-turbo", "input": "x", "parameters": {"seed": 1234567890123456789012345678}}',
            "64 bits",
        ),
        (
            b'{"model": "gpt-3.5-turbo", "input": "x", "parameters": {"stop": ' + nested(9).encode() + b"}}",
            "nest",
        ),
        (
            b'{"model": "gpt-3.5-turbo", "input": "x", "parameters": {"stop": '
            + nested(100_000).encode()
            + b"}}",
            "",
        ),
        (json.dumps({"model": "gpt-3.5-turbo", "input": "x" * 2001}).encode(), "MAX_INPUT_CHARS"),
        (json.dumps({"model": "gpt-3.5-turbo", "input": "y" * 900_000}).encode(), "MAX_INPUT_CHARS"),
        (json.dumps({"model": "m" * 10_000, "input": "x"}).encode(), "model"),
        (
            json.dumps(
                {"model": "gpt-3.5-turbo", "input": "x", "parameters": {f"p{i}": 1 for i in range(40)}}
            ).encode(),
            "parameters",
        ),
    ],
)
def test_hostile_bodies_are_422(secured: ServiceProcess, raw: bytes, mention: str) -> None:
    """Broken JSON, bad bytes, wrong types, unknown fields, huge or deep values: 422, never a 5xx."""
    response = secured.http.post("/v1/predict", content=raw, headers={"Content-Type": "application/json"})
    error = assert_error(response, 422, "invalid_request")
    assert mention in error["message"]
    assert len(error["message"]) < 2000  # the input is never echoed back


def test_what_the_fuzzer_found_stays_fixed(secured: ServiceProcess) -> None:
    """Empty stop sequences were a 502 (DSPy refuses them): now a 422 naming `stop`. An integral float
    for an integer option (JSON Schema calls 5.0 an integer) was refused: now accepted."""
    for stop in ("", ["", "x"]):
        body = {"model": "gpt-3.5-turbo", "input": unique(), "parameters": {"stop": stop}}
        assert (
            "stop"
            in assert_error(secured.http.post("/v1/predict", json=body), 422, "invalid_request")["message"]
        )
    body = {"model": "gpt-3.5-turbo", "input": unique(), "parameters": {"max_tokens": 50.0, "seed": 7.0}}
    assert secured.http.post("/v1/predict", json=body).status_code == 200


def test_nul_and_odd_unicode_in_input_are_served(secured: ServiceProcess) -> None:
    """NUL, right-to-left marks and emoji are just text: no 5xx."""
    text = unique("a\u0000b\u202ec\U0001f600")
    response = secured.http.post("/v1/predict", json={"model": "gpt-3.5-turbo", "input": text})
    assert response.status_code == 200, response.text


def test_a_body_over_max_body_bytes_is_413_even_when_streamed(secured: ServiceProcess) -> None:
    """The 1 MiB default holds whether the body declares its length or arrives in chunks."""
    big = json.dumps({"model": "gpt-3.5-turbo", "input": "z" * 1_100_000}).encode()
    assert_error(secured.http.post("/v1/predict", content=big), 413, "payload_too_large")

    def chunks() -> Iterator[bytes]:
        for start in range(0, len(big), 100_000):
            yield big[start : start + 100_000]

    assert_error(secured.http.post("/v1/predict", content=chunks()), 413, "payload_too_large")


def test_a_trickled_body_is_cut_off_with_408(secured: ServiceProcess) -> None:
    """A client sending its body a byte at a time gets 408 after BODY_READ_TIMEOUT_SECS (1 s), and
    the connection is closed."""
    body = json.dumps({"model": "gpt-3.5-turbo", "input": unique()}).encode()
    head = (
        f"POST /v1/predict HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY_PLAIN}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    started = time.monotonic()
    with socket.create_connection((LOOPBACK, secured.port), timeout=10) as sock:
        sock.sendall(head + body[:5])
        answer = b""
        for byte in body[5:]:
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                break  # the server closed the connection: what we want
            sock.settimeout(0.25)
            try:
                answer += sock.recv(65536)
            except TimeoutError:
                continue
            if answer:
                break
        sock.settimeout(5)
        while True:
            try:
                chunk = sock.recv(65536)
            except (TimeoutError, ConnectionResetError):
                break
            if not chunk:
                break
            answer += chunk
    elapsed = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b'"type":"request_timeout"' in answer
    assert b"connection: close" in answer.lower()
    assert 0.9 < elapsed < 5


# --- hostile request IDs and headers -------------------------------------------------------------


def test_hostile_request_ids_are_refused_or_replaced_never_echoed(secured: ServiceProcess) -> None:
    """A body `request_id` with control characters or 10 kB of text is refused (422); such an
    X-Request-ID header is replaced by a fresh ID. Neither reaches the response headers or the log."""
    control = "evil\r\nX-Injected: yes\x1b[31m"
    long_id = "L" * 10_240
    for bad in (control, long_id, "\u202eevil", ""):
        response = secured.http.post(
            "/v1/predict", json={"model": "gpt-3.5-turbo", "input": "x", "request_id": bad}
        )
        assert_error(response, 422, "invalid_request")
        assert SAFE_ID.match(response.headers["x-request-id"])
        assert bad not in response.text or bad == ""
    for header in (long_id, "id with spaces", "semi;colon", "ok%0d%0aX-Injected:%20yes"):
        response = secured.http.get("/costs", headers={"X-Request-ID": header})
        assert response.status_code == 200
        assert response.headers["x-request-id"] != header
        assert re.fullmatch(r"[0-9a-f]{32}", response.headers["x-request-id"])
    wait_until(lambda: "request.completed" in secured.log_text(), timeout=5)
    log = secured.log_path.read_bytes()
    assert long_id.encode() not in log
    assert b"X-Injected" not in log
    assert b"\x1b" not in log
    assert b"\r" not in log


@pytest.mark.parametrize(
    "header_line",
    [
        b"X-Request-ID: abc\rX-Injected: yes",
        b"X-Request-ID: abc\r\n X-Injected: folded",
        b"X-Request-ID: abc\x00X-Injected: nul",
    ],
)
def test_crlf_in_a_header_cannot_inject_response_headers(secured: ServiceProcess, header_line: bytes) -> None:
    """A bare CR, an obsolete line fold or a NUL in X-Request-ID: the server refuses the request (400)
    or replaces the ID; no response ever carries an injected header."""
    answer = raw_request(
        secured.port,
        b"GET /health HTTP/1.1\r\nHost: x\r\n" + header_line + b"\r\nConnection: close\r\n\r\n",
    )
    head = answer.split(b"\r\n\r\n", 1)[0]
    assert head.startswith(b"HTTP/1.1 "), answer[:200]
    assert int(head.split(b" ")[1]) < 500
    assert b"x-injected" not in head.lower()
    for line in head.split(b"\r\n")[1:]:
        if line.lower().startswith(b"x-request-id:"):
            assert SAFE_ID.match(line.split(b":", 1)[1].strip().decode())


# --- rate limits and budgets ---------------------------------------------------------------------


def test_the_rate_limit_is_shared_by_replicas(
    pair: tuple[ServiceProcess, ServiceProcess], redis_server: RedisServer, pair_tenant: str
) -> None:
    """RATE_LIMIT=6/minute holds across two processes on one Redis: 3 requests to each pass, the 7th
    (on either) is 429 `rate_limited` with Retry-After; other keys and the probes are unaffected."""
    question = unique()
    statuses = []
    for index in range(6):
        replica = pair[index % 2]
        response = httpx.post(
            replica.url + "/v1/predict",
            json={"model": "gpt-3.5-turbo", "input": question},
            headers=bearer(KEY_ACME),
            timeout=30,
        )
        statuses.append(response.status_code)
    assert statuses == [200] * 6
    for replica in pair:
        refused = httpx.post(
            replica.url + "/v1/predict",
            json={"model": "gpt-3.5-turbo", "input": question},
            headers=bearer(KEY_ACME),
            timeout=30,
        )
        assert_error(refused, 429, "rate_limited")
        assert 1 <= int(refused.headers["retry-after"]) <= 120
    other = httpx.post(
        pair[1].url + "/v1/predict",
        json={"model": "gpt-3.5-turbo", "input": question},
        headers=bearer(KEY_PLAIN),
        timeout=30,
    )
    assert other.status_code == 200
    for _ in range(10):
        assert httpx.get(pair[0].url + "/health", timeout=10).status_code == 200
    keys = redis_server.command("KEYS", f"{DEFAULT_PREFIX}ratelimit:tenant:{pair_tenant}:*")
    assert pair_tenant.encode() in keys


def test_a_spent_model_budget_refuses_misses_but_serves_hits(
    secured: ServiceProcess, sim: Simulator, redis_server: RedisServer
) -> None:
    """Once `budgeted` spent its 0.01 USD (a call here, the rest by other replicas): a new input (a
    miss) is 429 `budget_exceeded` with Retry-After up to midnight UTC and no provider call; an input
    already cached is still served."""
    first = unique()
    assert secured.http.post("/v1/predict", json={"model": "budgeted", "input": first}).status_code == 200
    spend_elsewhere(redis_server, "model", "budgeted", 0.01)
    calls = sim.stats()["calls"]
    refused = secured.http.post("/v1/predict", json={"model": "budgeted", "input": unique()})
    error = assert_error(refused, 429, "budget_exceeded")
    assert "budgeted" in error["message"]
    assert 1 <= int(refused.headers["retry-after"]) <= 86_400
    assert sim.stats()["calls"] == calls
    hit = secured.http.post("/v1/predict", json={"model": "budgeted", "input": first})
    assert hit.status_code == 200
    assert hit.json()["metadata"]["cached"] is True
    day = time.strftime("%Y-%m-%d", time.gmtime())
    key = f"{STATE_PREFIX}spend:{day}:model:budgeted"
    wait_until(lambda: float(redis_server.command("GET", key).split(b"\r\n")[1] or 0) > 0.01, timeout=5)
    ttl = int(redis_server.command("TTL", key)[1:].strip())
    assert 47 * 3600 < ttl <= 48 * 3600
    metrics = secured.http.get("/metrics").text
    ratio = re.search(r'dspy_budget_spent_ratio\{name="budgeted",scope="model"\} ([0-9.e+-]+)', metrics)
    assert ratio is not None
    assert float(ratio[1]) >= 1
    # A refusal by budget is not a failed prediction: it must not page anyone as an error rate.
    assert 'dspy_errors_total{type="budget_exceeded"}' in metrics
    assert 'dspy_predictions_total{model="budgeted",status="error",variant="baseline"} 0.0' in metrics


def test_a_spent_tenant_budget_refuses_only_that_tenant(
    secured: ServiceProcess, redis_server: RedisServer
) -> None:
    """Tenant frugal's budget runs out (a call here, the rest elsewhere); acme, on the same model,
    is not affected."""
    frugal = bearer(KEY_FRUGAL)
    question = unique()
    assert (
        secured.http.post(
            "/v1/predict", json={"model": "gpt-3.5-turbo", "input": question}, headers=frugal
        ).status_code
        == 200
    )
    spend_elsewhere(redis_server, "tenant", "frugal", 0.05)
    refused = secured.http.post(
        "/v1/predict", json={"model": "gpt-3.5-turbo", "input": unique()}, headers=frugal
    )
    assert "frugal" in assert_error(refused, 429, "budget_exceeded")["message"]
    again = secured.http.post(
        "/v1/predict", json={"model": "gpt-3.5-turbo", "input": question}, headers=frugal
    )
    assert again.status_code == 200  # a hit costs nothing
    batch = secured.http.post(
        "/v1/predict/batch",
        json={
            "requests": [
                {"model": "gpt-3.5-turbo", "input": question},
                {"model": "gpt-3.5-turbo", "input": unique()},
            ]
        },
        headers=frugal,
    )
    assert [item["status"] for item in batch.json()["results"]] == [200, 429]  # batches are no way around it
    acme = secured.http.post(
        "/v1/predict", json={"model": "gpt-3.5-turbo", "input": unique()}, headers=bearer(KEY_ACME)
    )
    assert acme.status_code == 200


def test_a_bad_keys_file_stops_start_up_without_printing_keys(tmp_path: Path) -> None:
    """A short key in API_KEYS_FILE stops start-up (exit 2) naming the line, not the key."""
    from tests.support.processes import run_service_expecting_failure

    keys = tmp_path / "keys"
    keys.write_text(f"{KEY_PLAIN}\nshort-secret acme\n")
    code, output = run_service_expecting_failure(
        {"API_KEYS_FILE": str(keys), "OPENAI_API_KEY": "k", "REDIS_URL": "redis://127.0.0.1:1"}, tmp_path
    )
    assert code == 2, output
    assert f"{keys}:2" in output
    assert "short-secret" not in output
    assert KEY_PLAIN not in output


def test_a_real_provider_without_api_keys_beyond_loopback_warns_loudly(
    service_factory: ServiceFactory, sim: Simulator
) -> None:
    """A provider key, no API keys and HOST beyond loopback: start-up logs `service.unprotected`
    (on loopback, or with keys, it does not)."""
    open_one = service_factory("open", HOST="0.0.0.0")
    on_loopback = service_factory("loopback")
    assert [line["host"] for line in open_one.log_lines() if line.get("event") == "service.unprotected"] == [
        "0.0.0.0"
    ]
    assert not [line for line in on_loopback.log_lines() if line.get("event") == "service.unprotected"]
