"""POST /v1/feedback over real HTTP, on two replicas sharing a records database (a SQLite file under
DATA_DIR, and a fresh PostgreSQL database): the upsert, tenant isolation, every refusal with its
request ID, feedback right after its prediction (on the same replica and on another), batch items
and streams, dspy_feedback_total, and the OpenAPI document against what is served."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import httpx
import orjson
import pytest
from jsonschema import Draft202012Validator  # type: ignore[import-untyped]  # no stubs installed
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from dspy_service.api.feedback import UNKNOWN_RETRY_SECS
from tests.integration.conftest import base_env
from tests.support.feedback_fleet import (
    BACKENDS,
    bearer,
    experiments,
    give,
    predict,
    records_database,
    start_replicas,
    write_models_file,
)
from tests.support.metrics_text import sample_value
from tests.support.processes import RedisServer, ServiceProcess, Simulator

KEY_ACME = "sk-acme-feedback-0123456789"
KEY_GLOBEX = "sk-globex-feedback-01234567"
KEY_OPS = "sk-ops-feedback-0123456789ab"  # an operator key without a tenant
MODELS = ("gpt-4", "upsert-model", "errors-model", "count-model")


@dataclass(frozen=True)
class Fleet:
    backend: str
    a: ServiceProcess
    b: ServiceProcess


@pytest.fixture(scope="module", params=BACKENDS)
def fleet(
    request: pytest.FixtureRequest,
    redis_server: RedisServer,
    simulator: Simulator,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Fleet]:
    """Two replicas with API keys for tenants acme and globex and an operator key, receipts on,
    sharing one records database of the parameter's kind."""
    backend: str = request.param
    workdir = tmp_path_factory.mktemp(f"feedback-{backend}")
    with records_database(backend, workdir) as database:
        env = {
            **base_env(redis_server, simulator),
            **database,
            "FEEDBACK_ENABLED": "true",
            "MODELS_CONFIG": str(write_models_file(workdir / "models.json", MODELS)),
            "API_KEYS": f"{KEY_ACME} acme,{KEY_GLOBEX} globex",
            "ADMIN_API_KEYS": KEY_OPS,
        }
        a, b = start_replicas(env, workdir, "feedback-a", "feedback-b")
        try:
            yield Fleet(backend, a, b)
        finally:
            a.stop()
            b.stop()


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def error_of(response: httpx.Response) -> dict[str, Any]:
    """The error body, checked to carry the response's own request ID."""
    error: dict[str, Any] = response.json()["error"]
    assert error["request_id"] == response.headers["x-request-id"]
    return error


def test_the_first_value_is_created_and_the_next_replaces_it(fleet: Fleet, sim: Simulator) -> None:
    """201 created, then 200 updated (on the other replica too); /v1/experiments counts one value
    per request and metric, the latest."""
    rid = unique("upsert")
    answer = predict(fleet.a, KEY_ACME, model="upsert-model", input=unique("question"), request_id=rid)
    first = give(fleet.a, rid, "rating", 2, KEY_ACME)
    assert first.status_code == 201, first.text
    assert first.json() == {
        "request_id": rid,
        "metric": "rating",
        "status": "created",
        "variant": answer["variant"],
        "model": "upsert-model",
    }
    again = give(fleet.b, rid, "rating", 4.5, KEY_ACME)
    assert (again.status_code, again.json()["status"]) == (200, "updated")
    assert give(fleet.a, rid, "helpful", True, KEY_ACME).status_code == 201
    assert give(fleet.b, rid, "helpful", False, KEY_ACME).status_code == 200

    quality = experiments(fleet.b, KEY_OPS)["quality"]["by_model"]["upsert-model:baseline"]
    assert quality["rating"]["count"] == 1
    assert quality["rating"]["mean"] == 4.5
    assert quality["helpful"]["count"] == 1
    assert quality["helpful"]["mean"] == 0.0


def test_only_the_requesting_tenant_may_give_feedback(fleet: Fleet, sim: Simulator) -> None:
    """globex, and an operator key without a tenant, get for acme's request ID the 404 a request ID
    never made gets; acme's own feedback is then the first (created); the same request ID made by
    globex is globex's own receipt. Without a key: 401."""
    rid, never = unique("acme"), unique("never")
    predict(fleet.a, KEY_ACME, input=unique("question"), request_id=rid)

    def attempt(request_id: str, key: str) -> httpx.Response:
        body = {"request_id": request_id, "metric": "helpful", "value": True}
        return httpx.post(f"{fleet.b.url}/v1/feedback", json=body, headers=bearer(key), timeout=30)

    with ThreadPoolExecutor(3) as pool:  # each 404 waits UNKNOWN_RETRY_SECS for a late receipt
        globex, unmade, operator = pool.map(
            lambda args: attempt(*args), [(rid, KEY_GLOBEX), (never, KEY_GLOBEX), (rid, KEY_OPS)]
        )
    for refused, asked in ((globex, rid), (unmade, never), (operator, rid)):
        assert refused.status_code == 404, refused.text
        error = error_of(refused)
        assert error["type"] == "not_found"
        assert (
            error["message"] == f"no prediction with request_id {asked!r} is known to this API key's tenant"
        )
    assert set(globex.headers) == set(unmade.headers)

    own = give(fleet.a, rid, "helpful", True, KEY_ACME)
    assert (own.status_code, own.json()["status"], own.json()["variant"]) == (201, "created", "baseline")
    predict(fleet.b, KEY_GLOBEX, input=unique("question"), request_id=rid, variant="tuned")
    theirs = give(fleet.b, rid, "helpful", False, KEY_GLOBEX)
    assert (theirs.status_code, theirs.json()["variant"]) == (201, "tuned")
    assert give(fleet.a, rid, "helpful", False, KEY_ACME).json() == {**own.json(), "status": "updated"}

    anonymous = give(fleet.a, rid, "helpful", True)
    assert anonymous.status_code == 401
    assert error_of(anonymous)["type"] == "unauthorized"


def test_a_value_that_does_not_fit_is_a_422_naming_the_problem(fleet: Fleet, sim: Simulator) -> None:
    """Bad JSON, a missing, extra or mistyped field, an unknown metric, a value of the wrong type or
    out of range: 422, its type and message say which, with the request ID; nothing is kept."""
    rid = unique("refused")
    predict(fleet.a, KEY_ACME, model="errors-model", input=unique("question"), request_id=rid)

    def body(metric: str, value: Any) -> bytes:
        return orjson.dumps({"request_id": rid, "metric": metric, "value": value})

    huge = b'{"request_id": "%s", "metric": "rating", "value": 1%s}' % (rid.encode(), b"0" * 400)
    cases: list[tuple[bytes, str, str]] = [
        (b"{not json", "invalid_request", "body: Invalid JSON"),
        (b"[]", "invalid_request", "body: Input should be an object"),
        (orjson.dumps({"request_id": rid, "metric": "helpful"}), "invalid_request", "value: Field required"),
        (orjson.dumps({"metric": "helpful", "value": True}), "invalid_request", "request_id: Field required"),
        (
            orjson.dumps({"request_id": rid, "metric": "helpful", "value": True, "score": 1}),
            "invalid_request",
            "score: Extra inputs are not permitted",
        ),
        (
            orjson.dumps({"request_id": 42, "metric": "helpful", "value": True}),
            "invalid_request",
            "request_id: Input should be a valid string",
        ),
        (
            body("stars", 5),
            "unknown_metric",
            "unknown feedback metric 'stars' (known: helpful, note, rating)",
        ),
        (
            body("helpful", "yes"),
            "invalid_feedback_value",
            "metric 'helpful' takes true or false, not \"yes\"",
        ),
        (body("helpful", 1), "invalid_feedback_value", "takes true or false, not 1"),
        (body("helpful", None), "invalid_feedback_value", "takes true or false, not null"),
        (body("rating", True), "invalid_feedback_value", "metric 'rating' takes a number, not true"),
        (body("rating", "4"), "invalid_feedback_value", 'takes a number, not "4"'),
        (body("rating", 9), "invalid_feedback_value", "metric 'rating' takes a number from 1 to 5, not 9"),
        (body("rating", 0.5), "invalid_feedback_value", "from 1 to 5, not 0.5"),
        (huge, "invalid_feedback_value", "metric 'rating' takes a finite number"),
        (body("note", "   "), "invalid_feedback_value", "metric 'note' takes a text that is not empty"),
        (body("note", "x" * 51), "invalid_feedback_value", "takes a text of at most 50 characters"),
        (body("note", 5), "invalid_feedback_value", "metric 'note' takes a text, not 5"),
    ]
    for index, (raw, kind, problem) in enumerate(cases):
        headers = {**bearer(KEY_ACME), "Content-Type": "application/json", "X-Request-ID": f"bad-{index}"}
        response = fleet.a.http.post("/v1/feedback", content=raw, headers=headers)
        assert response.status_code == 422, (raw, response.text)
        error = error_of(response)
        assert error["request_id"] == f"bad-{index}"
        assert error["type"] == kind, (raw, error)
        assert problem in error["message"], (raw, error)
    assert not any(
        name.startswith("errors-model:") for name in experiments(fleet.a, KEY_OPS)["quality"]["by_model"]
    )


def test_feedback_right_after_its_prediction_is_accepted(fleet: Fleet, sim: Simulator) -> None:
    """On the replica that answered, the receipt still queued is written at once (no wait for the
    retry of a late receipt); on another replica, its receipt arrives within the retry: 201 both."""
    here = unique("here")
    predict(fleet.a, KEY_ACME, input=unique("question"), request_id=here)
    started = time.monotonic()
    response = give(fleet.a, here, "helpful", True, KEY_ACME)
    assert response.status_code == 201, response.text
    assert time.monotonic() - started < UNKNOWN_RETRY_SECS

    there = unique("there")
    predict(fleet.a, KEY_ACME, input=unique("question"), request_id=there)
    response = give(fleet.b, there, "helpful", True, KEY_ACME)
    assert response.status_code == 201, response.text


def test_batch_items_and_streams_take_feedback(fleet: Fleet, sim: Simulator) -> None:
    """A batch item without its own request_id is `<batch id>.<index>`, one with it keeps it; a
    stream's result names its request_id: each takes feedback on the variant that answered it."""
    own = unique("item")
    items = [
        {"model": "gpt-4", "input": unique("first")},
        {"model": "gpt-4", "input": unique("second"), "request_id": own, "variant": "tuned"},
    ]
    response = fleet.a.http.post("/v1/predict/batch", json={"requests": items}, headers=bearer(KEY_ACME))
    assert response.status_code == 200, response.text
    batch = response.json()
    first, second = batch["results"]
    assert first["request_id"] == f"{batch['request_id']}.0"
    assert second["request_id"] == own
    for result in (first, second):
        given = give(fleet.a, result["request_id"], "rating", 5, KEY_ACME)
        assert given.status_code == 201, given.text
        assert given.json()["variant"] == result["variant"]

    streamed = unique("stream")
    body = {"model": "gpt-4", "variant": "tuned", "input": unique("question"), "request_id": streamed}
    with fleet.a.http.stream("POST", "/v1/predict/stream", json=body, headers=bearer(KEY_ACME)) as answer:
        assert answer.status_code == 200
        results = list(result_events(answer.iter_lines()))
    assert [result["request_id"] for result in results] == [streamed]
    given = give(fleet.a, streamed, "note", "streamed nicely", KEY_ACME)
    assert (given.status_code, given.json()["variant"]) == (201, "tuned")


def test_feedback_is_counted_by_variant_and_metric(fleet: Fleet, sim: Simulator) -> None:
    """dspy_feedback_total{variant,metric} counts each value kept (a replacement too) on the replica
    that took it; a refused value is not counted."""

    def counted(service: ServiceProcess) -> float:
        text = service.http.get("/metrics", headers=bearer(KEY_OPS)).text
        return sample_value(text, "dspy_feedback_total", variant="tuned", metric="rating")

    before_a, before_b = counted(fleet.a), counted(fleet.b)
    rid = unique("counted")
    predict(fleet.a, KEY_ACME, model="count-model", variant="tuned", input=unique("question"), request_id=rid)
    assert give(fleet.a, rid, "rating", 3, KEY_ACME).status_code == 201
    assert give(fleet.a, rid, "rating", 4, KEY_ACME).status_code == 200
    assert give(fleet.a, rid, "rating", 7, KEY_ACME).status_code == 422
    assert counted(fleet.a) == before_a + 2
    assert counted(fleet.b) == before_b


def result_events(lines: Iterator[str]) -> Iterator[dict[str, Any]]:
    """The data of each `result` event of a text/event-stream."""
    event = None
    for line in lines:
        if line.startswith("event: "):
            event = line[len("event: ") :]
        elif line.startswith("data: ") and event == "result":
            yield orjson.loads(line[len("data: ") :])


def validator(document: dict[str, Any], component: str) -> Draft202012Validator:
    registry: Registry[Any] = Registry().with_resource(
        "urn:openapi", Resource.from_contents(document, default_specification=DRAFT202012)
    )
    return Draft202012Validator({"$ref": f"urn:openapi#/components/schemas/{component}"}, registry=registry)


def test_the_document_describes_feedback_as_it_is_served(fleet: Fleet, sim: Simulator) -> None:
    """/openapi.json: POST /v1/feedback with its answers; its body schema takes the values the
    service takes and refuses the others; real answers and the experiments report conform."""
    document = fleet.a.http.get("/openapi.json", headers=bearer(KEY_ACME)).json()
    operation = document["paths"]["/v1/feedback"]["post"]
    assert set(operation["responses"]) == {"200", "201", "401", "404", "408", "413", "422", "503"}
    assert "Retry-After" in operation["responses"]["503"]["headers"]
    request = validator(document, "FeedbackRequest")
    good = [("helpful", False), ("rating", 1), ("rating", 4.5), ("note", "fine")]
    bad = [("helpful", "yes"), ("rating", 9), ("rating", True), ("note", " "), ("stars", 1)]
    for metric, value in good:
        assert request.is_valid({"request_id": "r", "metric": metric, "value": value}), (metric, value)
    for metric, value in bad:
        assert not request.is_valid({"request_id": "r", "metric": metric, "value": value}), (metric, value)
    assert not request.is_valid({"request_id": "r", "metric": "helpful"})

    rid = unique("documented")
    predict(fleet.a, KEY_ACME, input=unique("question"), request_id=rid)
    validator(document, "FeedbackReceipt").validate(give(fleet.a, rid, "helpful", True, KEY_ACME).json())
    validator(document, "Error").validate(give(fleet.a, rid, "helpful", "yes", KEY_ACME).json())
    validator(document, "Experiments").validate(experiments(fleet.a, KEY_OPS))
    parameters = document["paths"]["/v1/experiments"]["get"]["parameters"]
    assert [parameter["name"] for parameter in parameters] == ["since"]
