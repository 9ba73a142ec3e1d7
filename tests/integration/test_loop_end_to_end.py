"""The DSPy loop as README "Closing the DSPy loop" runs it, against the SQLite default and a real
PostgreSQL: a service A/B-testing the example's two variants records predictions and feedback;
/v1/experiments counts the feedback per variant; `dspy-service export` writes lines DSPy loads with
the README's snippet; `dspy-service optimize --optimizer bootstrap-fewshot` tunes a variant on them
against the simulator; the tuned variant, added to the models file and reloaded with SIGHUP, takes
its share of traffic and feedback and stands beside the others in /v1/experiments."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from dspy_service.settings import service_environment
from tests.integration.conftest import TEST_API_KEY, ServiceFactory
from tests.support.postgres import fresh_database
from tests.support.processes import ServiceProcess, Simulator, wait_until

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE_MODELS = ROOT / "examples" / "feedback_loop" / "models.yaml"
README = ROOT / "README.md"

# README's snippet, verbatim (the test checks README still shows it).
SNIPPET = """\
import json, dspy

examples = [
    dspy.Example(**line["example"]).with_inputs(*line["inputs"])
    for line in map(json.loads, open("train.jsonl"))
]"""

QUESTIONS = [
    "What is the capital of France?",
    "Why is the sky blue?",
    "How many legs has a spider?",
    "What gas do plants take in?",
    "Which planet is the largest?",
    "What is the boiling point of water at sea level?",
    "Who wrote Hamlet?",
    "What is the capital of Japan?",
    "How many continents are there?",
    "What is the speed of light?",
    "What language is spoken in Brazil?",
    "What is the chemical symbol of gold?",
]
TUNED = "baseline-tuned"


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[dict[str, str]]:
    """The records settings of the service and the commands: the SQLite default (DATA_DIR only),
    or a fresh PostgreSQL database (DATABASE_URL), dropped afterwards."""
    if request.param == "sqlite":
        yield {"DATA_DIR": str(tmp_path / "data")}
    else:
        with fresh_database("dspy_loop") as url:
            yield {"DATABASE_URL": url}


def command(
    env: dict[str, str], cwd: Path, *args: str, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """`dspy-service ARGS` as a user runs it, configured by `env` alone (as `serve` is)."""
    return subprocess.run(
        [sys.executable, "-m", "dspy_service.cli", *args],
        env={**service_environment(os.environ), **env},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def predict_all(service: ServiceProcess, prefix: str) -> dict[str, dict[str, Any]]:
    """Every question once, from README's users (user-0, user-1, ...), the variant left to the A/B
    split; by request ID (README's q-N, then r-N)."""
    served = {}
    for number, question in enumerate(QUESTIONS):
        request_id = f"{prefix}-{number}"
        response = service.http.post(
            "/v1/predict",
            json={
                "request_id": request_id,
                "model": "gpt-3.5-turbo",
                "user_id": f"user-{number}",
                "input": question,
            },
        )
        assert response.status_code == 200, response.text
        served[request_id] = response.json()
    return served


def give_feedback(service: ServiceProcess, request_id: str, metric: str, value: Any) -> dict[str, Any]:
    response = service.http.post(
        "/v1/feedback", json={"request_id": request_id, "metric": metric, "value": value}
    )
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


def helpful_quality(service: ServiceProcess) -> dict[str, Any]:
    report = service.http.get("/v1/experiments").json()
    quality = report["quality"]
    assert quality["available"] is True, quality
    return {variant: metrics["helpful"] for variant, metrics in quality["variants"].items()}


def by_variant(served: dict[str, dict[str, Any]]) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for request_id, result in served.items():
        groups.setdefault(result["variant"], []).append(request_id)
    return groups


def add_tuned_variant(models_file: Path, optimize_stdout: str) -> None:
    """What README does: the printed variant entry appended under `variants:` (last in the file),
    and a weight for it in ab_weights."""
    snippet = optimize_stdout.split("serve it as a new variant (models file):\n", 1)[1]
    entry = [line[2:] for line in snippet.splitlines() if line.strip() and line.strip() != "variants:"]
    text = models_file.read_text(encoding="utf-8")
    text = text.replace(
        "ab_weights: {baseline: 0.5, cot: 0.5}", f"ab_weights: {{baseline: 0.4, cot: 0.2, {TUNED}: 0.4}}"
    )
    models_file.write_text(text + "\n".join(entry) + "\n", encoding="utf-8")


def test_the_loop_from_feedback_to_a_tuned_variant_compared_in_experiments(
    service_factory: ServiceFactory, sim: Simulator, tmp_path: Path, database: dict[str, str]
) -> None:
    """A/B of baseline and cot with feedback, export of baseline's helpful answers, bootstrap-fewshot
    on them, the tuned variant served after SIGHUP with its demos, and its feedback reported beside
    the others, with its difference from the default variant."""
    started = time.monotonic()
    loop = tmp_path / "loop"
    loop.mkdir()
    models_file = loop / "models.yaml"
    models_file.write_text(EXAMPLE_MODELS.read_text(encoding="utf-8"), encoding="utf-8")
    records = {"MODELS_CONFIG": str(models_file), **database}
    # A SERVICE_NAME of its own: no Redis cache entry of another run answers for the tuned variant.
    service = service_factory(
        "loop", SERVICE_NAME=f"loop-{tmp_path.name}", FEEDBACK_ENABLED="true", PREDICTION_LOG="all", **records
    )

    # Round one: the A/B split, and feedback that likes baseline's answers more than cot's.
    first = predict_all(service, "q")
    groups = by_variant(first)
    # The sticky split README shows (it hashes the weights and the user ID).
    assert groups == {
        "baseline": ["q-0", "q-1", "q-3", "q-5", "q-8", "q-11"],
        "cot": ["q-2", "q-4", "q-6", "q-7", "q-9", "q-10"],
    }
    liked = {
        rid: result["variant"] == "baseline" or index % 2 == 0
        for index, (rid, result) in enumerate(first.items())
    }
    for request_id, value in liked.items():
        given = give_feedback(service, request_id, "helpful", value)
        assert (given["status"], given["variant"]) == ("created", first[request_id]["variant"])
    quality = helpful_quality(service)
    for variant, ids in groups.items():
        assert quality[variant]["count"] == len(ids)
        assert quality[variant]["mean"] == pytest.approx(sum(liked[i] for i in ids) / len(ids), abs=1e-6)
    assert quality["baseline"]["vs_default"] is None
    assert quality["cot"]["vs_default"]["difference"] < 0

    # Export baseline's helpful answers; DSPy loads every line with README's snippet.
    env = {**records, "OPENAI_API_KEY": TEST_API_KEY, "OPENAI_BASE_URL": sim.api_base}
    exported = command(
        env,
        tmp_path,
        "export",
        "--variant",
        "baseline",
        "--metric",
        "helpful",
        "--min",
        "1",
        "--out",
        "train.jsonl",
    )
    assert exported.returncode == 0, exported.stderr
    wanted = groups["baseline"]
    assert exported.stdout.startswith(
        f"wrote {len(wanted)} lines to train.jsonl (variant 'baseline', feedback helpful >= 1)"
    )
    loaded = subprocess.run(
        [
            sys.executable,
            "-c",
            SNIPPET + "\nprint(json.dumps([[dict(e.inputs()), dict(e.labels())] for e in examples]))",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    question_of = {f"q-{number}": question for number, question in enumerate(QUESTIONS)}
    assert json.loads(loaded.stdout) == [
        [{"question": question_of[rid]}, first[rid]["outputs"]] for rid in wanted
    ]
    fingerprint = service.http.get("/v1/programs").json()["programs"]["baseline"]["fingerprint"]
    lines = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text(encoding="utf-8").splitlines()]
    assert {(line["fingerprint"], json.dumps(line["feedback"])) for line in lines} == {
        (fingerprint, '{"helpful": true}')
    }

    # Optimize baseline on them against the simulator, and serve the result as a new variant.
    optimized = command(
        env,
        tmp_path,
        *("optimize", "--variant", "baseline", "--trainset", "train.jsonl"),
        *("--optimizer", "bootstrap-fewshot", "--out", "loop/tuned.json"),
    )
    assert optimized.returncode == 0, optimized.stderr
    demos = min(4, len(wanted))  # --max-demos defaults to 4
    # The simulator answers an input as it did before: every example passes exact match.
    assert f"self: {demos} ({demos} bootstrapped, 0 labelled)" in optimized.stdout
    add_tuned_variant(models_file, optimized.stdout)
    assert (
        yaml.safe_load(models_file.read_text(encoding="utf-8"))["variants"][TUNED]["program"] == "tuned.json"
    )
    before = sum(1 for line in service.log_lines() if line.get("event") == "programs.reloaded")
    service.signal(signal.SIGHUP)
    wait_until(
        lambda: sum(1 for line in service.log_lines() if line.get("event") == "programs.reloaded") > before,
        timeout=30,
        what="programs.reloaded",
    )
    reloaded = [line for line in service.log_lines() if line.get("event") == "programs.reloaded"][-1]
    assert reloaded["added"] == [TUNED]
    tuned_program = service.http.get("/v1/programs").json()["programs"][TUNED]
    assert [predictor["demos"] for predictor in tuned_program["predictors"]] == [demos]

    # Round two: the tuned variant takes its share; its feedback shows beside the others'.
    second = predict_all(service, "r")
    second_groups = by_variant(second)
    assert second_groups[TUNED] == ["r-2", "r-4", "r-5"]  # as README says
    for request_id in second_groups[TUNED]:  # its demos are in the prompt: a longer one
        tuned_tokens = second[request_id]["metadata"]["input_tokens"]
        number = request_id.split("-")[1]
        untuned = service.http.post(
            "/v1/predict",
            json={
                "model": "gpt-3.5-turbo",
                "variant": "baseline",
                "input": QUESTIONS[int(number)],
                "use_cache": False,
            },
        ).json()
        assert tuned_tokens > untuned["metadata"]["input_tokens"] + 100
    for request_id, result in second.items():
        given = give_feedback(service, request_id, "helpful", result["variant"] != "cot")
        assert given["variant"] == result["variant"]
    report = service.http.get("/v1/experiments").json()
    assert report["variants"][TUNED]["weight"] == pytest.approx(0.4)
    assert report["variants"][TUNED]["requests"] == len(second_groups[TUNED])
    quality = helpful_quality(service)
    assert sorted(quality) == ["baseline", "baseline-tuned", "cot"]
    assert quality[TUNED]["count"] == len(second_groups[TUNED])
    assert quality[TUNED]["mean"] == 1
    assert quality[TUNED]["vs_default"]["difference"] == pytest.approx(0.0, abs=1e-6)
    for variant in ("baseline", "cot"):
        assert quality[variant]["count"] == len(groups[variant]) + len(second_groups.get(variant, []))
    backend = "postgresql" if "DATABASE_URL" in database else "sqlite"
    print(f"the loop on {backend}: {time.monotonic() - started:.1f} s")


def test_readme_shows_the_snippet_the_loop_loads_its_export_with() -> None:
    """README documents the exact lines this test runs on an export."""
    assert SNIPPET in README.read_text(encoding="utf-8")
