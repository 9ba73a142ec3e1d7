"""/v1/experiments judged by feedback, over real HTTP, on a SQLite file and on PostgreSQL: two
replicas share the records database; ten predictions on each variant get boolean and float feedback
of known values, and both replicas report the same figures, checked against a hand computation
(Wilson and Student's t intervals, Newcombe's and Welch's differences, written out below); `since`
filters them; a database that is unusable or goes away leaves the rest of the report standing."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import ServiceFactory, base_env
from tests.support.feedback_fleet import (
    BACKENDS,
    experiments,
    give,
    predict,
    records_database,
    start_replicas,
    write_models_file,
)
from tests.support.postgres import database_of, drop_database, fresh_database
from tests.support.processes import RedisServer, ServiceProcess, Simulator

Z = 1.959963984540054  # the standard normal's 0.975 quantile
T_975 = {9: 2.262157, 18: 2.100922}  # Student's t 0.975 quantiles, from the published tables

HELPFUL = {"baseline": [True] * 6 + [False] * 4, "tuned": [True] * 9 + [False]}
RATING = {
    "baseline": [3, 4, 2, 3, 4, 3, 2, 3, 4, 2],
    "tuned": [4, 5, 3, 4, 5, 4, 3, 4, 5, 3],  # baseline's plus one: the same variance, so Welch's df is 18
}


@dataclass(frozen=True)
class Graded:
    """Two replicas whose predictions got the feedback above, and the reports they give."""

    a: ServiceProcess
    b: ServiceProcess
    reports: tuple[dict[str, Any], dict[str, Any]]


@pytest.fixture(scope="module", params=BACKENDS)
def graded(
    request: pytest.FixtureRequest,
    redis_server: RedisServer,
    simulator: Simulator,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Graded]:
    """Ten predictions per variant, every other one on each replica, each graded on the replica that
    answered it: helpful and rating, one helpful first given wrong and then corrected (an upsert),
    and two comments."""
    workdir = tmp_path_factory.mktemp(f"quality-{request.param}")
    simulator.reset()
    with records_database(request.param, workdir) as database:
        env = {
            **base_env(redis_server, simulator),
            **database,
            "FEEDBACK_ENABLED": "true",
            "MODELS_CONFIG": str(write_models_file(workdir / "models.json")),
        }
        a, b = start_replicas(env, workdir, "quality-a", "quality-b")
        try:
            for variant in ("baseline", "tuned"):
                for i in range(10):
                    service = (a, b)[i % 2]
                    rid = f"{variant}-{i}"
                    question = f"{request.param} {variant} question {i}"
                    assert (
                        predict(service, input=question, variant=variant, request_id=rid)["variant"]
                        == variant
                    )
                    if i == 0:
                        assert give(service, rid, "helpful", not HELPFUL[variant][i]).status_code == 201
                        assert give(service, rid, "helpful", HELPFUL[variant][i]).status_code == 200
                    else:
                        assert give(service, rid, "helpful", HELPFUL[variant][i]).status_code == 201
                    assert give(service, rid, "rating", RATING[variant][i]).status_code == 201
                    if i < 2:
                        assert give(service, rid, "note", f"comment {i}").status_code == 201
            yield Graded(a, b, (experiments(a), experiments(b)))
        finally:
            a.stop()
            b.stop()


# --- the statistics, by hand --------------------------------------------------------------------


def wilson(successes: int, n: int) -> tuple[float, float]:
    """Wilson's score interval: (p + z²/2n ± z·sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n), p = x/n."""
    p = successes / n
    centre = (p + Z * Z / (2 * n)) / (1 + Z * Z / n)
    half = Z / (1 + Z * Z / n) * math.sqrt(p * (1 - p) / n + Z * Z / (4 * n * n))
    return centre - half, centre + half


def student(values: list[int]) -> tuple[float, float]:
    """mean ± t(0.975, n-1) · s / sqrt(n), s the sample standard deviation."""
    n, mean = len(values), statistics.mean(values)
    half = T_975[n - 1] * statistics.stdev(values) / math.sqrt(n)
    return mean - half, mean + half


def newcombe(x1: int, n1: int, x2: int, n2: int) -> tuple[float, float]:
    """Newcombe's hybrid score interval of d = p1 - p2 from the two Wilson intervals (l, u):
    [d - sqrt((p1-l1)² + (u2-p2)²), d + sqrt((u1-p1)² + (p2-l2)²)]."""
    p1, p2 = x1 / n1, x2 / n2
    (l1, u1), (l2, u2) = wilson(x1, n1), wilson(x2, n2)
    d = p1 - p2
    return d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2), d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)


def welch(first: list[int], second: list[int]) -> tuple[float, float, float]:
    """mean1 - mean2 ± t(0.975, df) · sqrt(s1²/n1 + s2²/n2); df = (a + b)² / (a²/(n1-1) + b²/(n2-1))
    with a = s1²/n1, b = s2²/n2 (Welch-Satterthwaite). Returns (low, high, df)."""
    a = statistics.variance(first) / len(first)
    b = statistics.variance(second) / len(second)
    df = (a + b) ** 2 / (a * a / (len(first) - 1) + b * b / (len(second) - 1))
    d = statistics.mean(first) - statistics.mean(second)
    half = T_975[round(df)] * math.sqrt(a + b)
    return d - half, d + half, df


def test_quality_matches_a_hand_computation_on_both_replicas(graded: Graded) -> None:
    """Each variant's count, mean and 95% interval per metric, and tuned's difference from baseline,
    as computed by hand (and as published: Wilson 6/10 is [0.3127, 0.8318]); the same on both
    replicas, and per model:variant for the one model."""
    quality = graded.reports[0]["quality"]
    assert quality["available"] is True
    assert (quality["scope"], quality["default_variant"], quality["since"]) == ("fleet", "baseline", None)
    baseline, tuned = quality["variants"]["baseline"], quality["variants"]["tuned"]

    assert baseline["helpful"]["count"] == 10  # the corrected value replaced the first one
    assert baseline["helpful"]["mean"] == 0.6
    assert baseline["helpful"]["ci95"] == pytest.approx(wilson(6, 10), abs=2e-6)
    assert baseline["helpful"]["ci95"] == pytest.approx([0.3127, 0.8318], abs=5e-5)
    assert tuned["helpful"]["mean"] == 0.9
    assert tuned["helpful"]["ci95"] == pytest.approx(wilson(9, 10), abs=2e-6)
    assert baseline["helpful"]["vs_default"] is None  # the default variant is the baseline itself

    assert baseline["rating"] == {
        "count": 10,
        "mean": 3.0,
        "ci95": pytest.approx(student(RATING["baseline"]), abs=2e-6),
        "vs_default": None,
    }
    assert tuned["rating"]["mean"] == 4.0
    assert tuned["rating"]["ci95"] == pytest.approx(student(RATING["tuned"]), abs=2e-6)

    helpful = tuned["helpful"]["vs_default"]
    assert helpful["difference"] == pytest.approx(0.3, abs=1e-6)
    assert helpful["ci95"] == pytest.approx(newcombe(9, 10, 6, 10), abs=2e-6)
    assert helpful["excludes_zero"] is False  # about [-0.07, 0.59]: 9 of 10 against 6 of 10 is not enough

    low, high, df = welch(RATING["tuned"], RATING["baseline"])
    rating = tuned["rating"]["vs_default"]
    assert df == pytest.approx(18)
    assert rating["df"] == pytest.approx(df, abs=1e-6)
    assert rating["difference"] == pytest.approx(1.0, abs=1e-6)
    assert rating["ci95"] == pytest.approx([low, high], abs=2e-6)
    assert rating["excludes_zero"] is True  # about [0.23, 1.77]

    assert baseline["note"] == {"count": 2}
    assert quality["by_model"] == {"gpt-4:baseline": baseline, "gpt-4:tuned": tuned}
    assert graded.reports[1]["quality"] == quality  # fleet-wide: the other replica reads the same


def test_traffic_stays_per_replica_beside_the_fleet_quality(graded: Graded) -> None:
    """Each replica counts the requests it served itself (5 per variant) while quality counts all 10."""
    for report in graded.reports:
        assert report["scope"] == "replica"
        for variant in ("baseline", "tuned"):
            assert report["variants"][variant]["requests"] == 5
            assert report["quality"]["variants"][variant]["rating"]["count"] == 10


def test_since_keeps_recent_predictions_and_a_bad_value_is_a_422(graded: Graded) -> None:
    """since=7d keeps everything just made, a time still to come keeps nothing; a value that is
    neither an age nor an ISO date, or reaches beyond the calendar, is a 422 with the request ID."""
    recent = experiments(graded.a, since="7d")["quality"]
    assert datetime.fromisoformat(recent["since"]) == pytest.approx(
        datetime.now(UTC) - timedelta(days=7), abs=timedelta(minutes=1)
    )
    assert recent["variants"] == graded.reports[0]["quality"]["variants"]

    later = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    none = experiments(graded.b, since=later)["quality"]
    assert none["since"] == later
    assert none["variants"]["tuned"]["helpful"] == {"count": 0, "vs_default": None}
    assert none["by_model"] == {}

    for bad, problem in (
        ("yesterday", "since 'yesterday' is neither an age (such as 7d, 12h, 30m) nor an ISO date"),
        ("", "since '' is neither an age"),
        ("99999999999d", "since '99999999999d' reaches back too far"),
    ):
        response = graded.a.http.get(
            "/v1/experiments", params={"since": bad}, headers={"X-Request-ID": "q-1"}
        )
        assert response.status_code == 422, response.text
        assert response.json()["error"]["request_id"] == "q-1"
        assert response.json()["error"]["type"] == "invalid_request"
        assert problem in response.json()["error"]["message"]


@pytest.mark.parametrize("case", ["sqlite-unusable", "postgresql-dropped"])
def test_a_database_that_fails_leaves_the_rest_of_the_report(
    case: str, service_factory: ServiceFactory, sim: Simulator, tmp_path: Path
) -> None:
    """A SQLite path that is a directory (unusable from the start), or a PostgreSQL database dropped
    while the service runs: predictions are answered, /v1/experiments answers 200 with its traffic
    figures, and `quality` says its figures are missing and why."""
    models = str(write_models_file(tmp_path / "models.json"))
    if case == "sqlite-unusable":
        (tmp_path / "records.db").mkdir()
        service = service_factory(
            FEEDBACK_ENABLED="true", MODELS_CONFIG=models, DATABASE_URL=f"sqlite:///{tmp_path}/records.db"
        )
        expected = "has not been reached since start-up"
    else:
        with fresh_database("dspy_quality_down") as url:
            service = service_factory(FEEDBACK_ENABLED="true", MODELS_CONFIG=models, DATABASE_URL=url)
            predict(service, input="before the drop", request_id="before")
            assert give(service, "before", "helpful", True).status_code == 201
            assert experiments(service)["quality"]["variants"]["baseline"]["helpful"]["count"] == 1
            drop_database(database_of(url))
        expected = "the records database is unavailable"

    predict(service, input="while it is down")
    report = experiments(service, since="1d")
    assert report["variants"]["baseline"]["requests"] >= 1
    quality = report["quality"]
    assert quality["available"] is False
    assert quality["scope"] == "fleet"
    assert quality["since"] is not None
    assert expected in quality["reason"], quality
    assert "postgres@" not in quality["reason"]  # neither the URL nor the path is told
    assert str(tmp_path) not in quality["reason"]
    if service.process is not None:
        service.process.kill()  # a graceful stop would give the queued receipt its bound (5 s) to be written
