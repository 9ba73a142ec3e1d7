"""`dspy-service optimize` as a user runs it: a subprocess configured by the environment as `serve`
is, against the simulator over real HTTP; the state file it writes served by the real service as a
new variant."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from dspy_service.settings import service_environment
from dspy_service.simulator import count_tokens
from tests.integration.conftest import TEST_API_KEY, ServiceFactory
from tests.support.processes import ServiceProcess, Simulator

PROGRAMS = Path(__file__).resolve().parents[1] / "programs"
MODELS_FILE = PROGRAMS / "optimize_target" / "models.yaml"

FRANCE = "What is the capital of France?"
# The simulator answers a question about the capital of France with this sentence, and every other
# question with a sentence of its own: the France example is the one the default metric passes.
PARIS = "The capital of France is Paris."
TRAINSET = [
    (FRANCE, "the capital of  France is PARIS."),  # exact match ignores case and runs of whitespace
    ("What is the boiling point of water at sea level?", "100 degrees Celsius."),
    ("Which planet is the largest?", "Jupiter."),
    ("What is the capital of Japan?", "Tokyo."),
    ("How many legs has a spider?", "Eight."),
    ("What gas do plants take in?", "Carbon dioxide."),
]


def write_trainset(path: Path, rows: list[tuple[str, str]] = TRAINSET) -> Path:
    """As `export` writes it: the example, its inputs, and keys of its own that optimize ignores."""
    lines = [
        orjson.dumps(
            {
                "example": {"question": question, "answer": answer},
                "inputs": ["question"],
                "request_id": f"req-{number}",
                "feedback": {"helpful": True},
            }
        ).decode()
        for number, (question, answer) in enumerate(rows)
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def optimize_env(sim: Simulator | None, models_file: Path = MODELS_FILE) -> dict[str, str]:
    """The environment `serve` would read: the models file, PROGRAMS_PATH, the provider (the test's
    simulator; None: no provider settings at all)."""
    env = {
        **service_environment(os.environ),
        "MODELS_CONFIG": str(models_file),
        "PROGRAMS_PATH": str(PROGRAMS),
        "LOG_FORMAT": "json",
    }
    if sim is not None:
        env |= {"OPENAI_API_KEY": TEST_API_KEY, "OPENAI_BASE_URL": sim.api_base}
    return env


def run_optimize(env: dict[str, str], cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dspy_service.cli", "optimize", *args],
        env=env,
        cwd=cwd,  # no stray .env from the checkout
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def refused_with(done: subprocess.CompletedProcess[str]) -> str:
    """The one-line message of a refused run (exit 2, nothing on stdout, no traceback)."""
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stdout == ""
    assert "Traceback" not in done.stderr
    last: str = done.stderr.strip().splitlines()[-1]
    return last


def state_of(path: Path) -> dict[str, Any]:
    """Each predictor's saved state by name (a lone Predict's state is the file itself: "self")."""
    state: dict[str, Any] = orjson.loads(path.read_bytes())
    del state["metadata"]
    return {"self": state} if "demos" in state else state


def models_file_with(tmp_path: Path, variants: dict[str, Any]) -> Path:
    """The test models file with more variants (their `program:` paths absolute)."""
    raw = yaml.safe_load(MODELS_FILE.read_text(encoding="utf-8"))
    raw["variants"].update(variants)
    path = tmp_path / "models-tuned.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def start_service(service_factory: ServiceFactory, models_file: Path) -> ServiceProcess:
    return service_factory("optimized", MODELS_CONFIG=str(models_file), PROGRAMS_PATH=str(PROGRAMS))


def predict(service: ServiceProcess, variant: str, question: str, model: str = "gpt-3.5-turbo") -> Any:
    response = service.http.post(
        "/v1/predict",
        json={"model": model, "variant": variant, "inputs": {"question": question}, "use_cache": False},
    )
    assert response.status_code == 200, response.text
    return response.json()


def listed_demos(service: ServiceProcess, variant: str) -> dict[str, int]:
    listing = service.http.get("/v1/programs").json()["programs"][variant]
    return {predictor["name"]: predictor["demos"] for predictor in listing["predictors"]}


def test_labeled_fewshot_state_serves_as_a_new_variant_with_its_demos_in_the_prompt(
    service_factory: ServiceFactory, sim: Simulator, tmp_path: Path
) -> None:
    """labeled-fewshot puts training examples in as demos without calling the provider; the file
    it writes loads as `program:` of a new variant in the real service, which lists the demos and
    sends them: the same request costs the demos' tokens more and gets the same answer."""
    trainset = write_trainset(tmp_path / "train.jsonl")
    out = tmp_path / "qa-tuned.json"

    done = run_optimize(
        optimize_env(sim),
        tmp_path,
        *("--variant", "qa", "--trainset", str(trainset), "--optimizer", "labeled-fewshot"),
        *("--model", "gpt-3.5-turbo", "--max-demos", "3", "--no-score", "--out", str(out)),
    )

    assert done.returncode == 0, done.stderr
    assert "on 6 examples" in done.stdout
    assert "self: 3 (0 bootstrapped, 3 labelled)" in done.stdout
    assert "provider calls: none" in done.stdout
    assert sim.stats()["calls"] == 0
    demos = state_of(out)["self"]["demos"]
    assert len(demos) == 3
    assert {(d["question"], d["answer"]) for d in demos} <= set(TRAINSET)
    assert state_of(out)["self"]["lm"] is None  # which model serves stays the models file's to say

    models_file = models_file_with(
        tmp_path, {"qa-tuned": {"signature": "question -> answer", "program": str(out)}}
    )
    service = start_service(service_factory, models_file)
    assert listed_demos(service, "qa-tuned") == {"self": 3}
    assert listed_demos(service, "qa") == {"self": 0}
    spent = {}
    for variant in ("qa", "qa-tuned"):
        sim.http.post("/_sim/reset").raise_for_status()
        result = predict(service, variant, "Why is the sky blue?")
        spent[variant] = (sim.stats()["prompt_tokens"], result["output"])
    demo_tokens = sum(count_tokens(d["question"]) + count_tokens(d["answer"]) for d in demos)
    assert spent["qa-tuned"][0] - spent["qa"][0] >= demo_tokens
    assert spent["qa-tuned"][1] == spent["qa"][1]


def test_bootstrap_fewshot_completes_against_the_simulator_keeping_the_pins(
    service_factory: ServiceFactory, sim: Simulator, tmp_path: Path
) -> None:
    """bootstrap-fewshot runs the two-predictor program on every example with the models file's
    LMs (classify on --model's, the pinned answer on gpt-4), keeps the one run the default metric
    passes as a demo of both predictors, fills the other slots with labelled examples, and prints
    the variant entry that serves the result: added to the models file, the service serves it."""
    trainset = write_trainset(tmp_path / "train.jsonl")
    out = tmp_path / "pipeline-tuned.json"

    started = time.monotonic()
    done = run_optimize(
        optimize_env(sim),
        tmp_path,
        *("--variant", "pipeline", "--trainset", str(trainset), "--optimizer", "bootstrap-fewshot"),
        *("--model", "gpt-3.5-turbo", "--max-demos", "3", "--out", str(out)),
    )
    took = time.monotonic() - started
    print(f"bootstrap-fewshot on {len(TRAINSET)} examples, scored before and after: {took:.1f} s in all")
    print(done.stdout)

    assert done.returncode == 0, done.stderr
    assert "classify: 3 (1 bootstrapped, 2 labelled)" in done.stdout
    assert "answer: 3 (1 bootstrapped, 2 labelled)" in done.stdout
    assert "metric on the trainset: 0.167 before, 0.167 after" in done.stdout  # 1 of 6 exact
    # Scored before (6 runs), bootstrapped (6), scored after (6): two predictors each, one per model.
    assert sim.stats()["by_model"] == {"gpt-3.5-turbo": 18, "gpt-4": 18}
    state = state_of(out)
    for name in ("classify", "answer"):
        assert state[name]["lm"] is None
        bootstrapped = [d for d in state[name]["demos"] if d.get("augmented")]
        assert [d["question"] for d in bootstrapped] == [FRANCE]
    bootstrapped_answer = next(d for d in state["answer"]["demos"] if d.get("augmented"))
    assert bootstrapped_answer["answer"] == PARIS  # the program's own run, not the label

    snippet = yaml.safe_load(done.stdout.split("serve it as a new variant (models file):\n", 1)[1])
    entry = snippet["variants"]["pipeline-tuned"]
    assert entry == {
        "module": "optimize_target.pipeline:TopicAnswer",
        "models": {"answer": "gpt-4"},
        "output_field": "answer",
        "program": str(out),
    }
    service = start_service(service_factory, models_file_with(tmp_path, snippet["variants"]))
    assert listed_demos(service, "pipeline-tuned") == {"classify": 3, "answer": 3}
    sim.http.post("/_sim/reset").raise_for_status()
    result = predict(service, "pipeline-tuned", FRANCE)
    assert result["output"] == PARIS
    assert sim.stats()["by_model"] == {"gpt-3.5-turbo": 1, "gpt-4": 1}  # the pin still holds


def test_a_custom_metric_decides_which_runs_become_demos(sim: Simulator, tmp_path: Path) -> None:
    """--metric is imported from PROGRAMS_PATH and called as DSPy calls metrics: the simulator's
    answers echo their question, so every run passes it and the demos are all the program's own
    runs (where exact match kept one); a metric that returns text is refused by name."""
    trainset = write_trainset(tmp_path / "train.jsonl")
    out = tmp_path / "qa-echo.json"
    common = ("--variant", "qa", "--trainset", str(trainset), "--optimizer", "bootstrap-fewshot")

    done = run_optimize(
        optimize_env(sim),
        tmp_path,
        *common,
        *("--model", "gpt-4", "--max-demos", "2", "--out", str(out)),
        *("--metric", "optimize_target.metrics:echoes_question"),
    )

    assert done.returncode == 0, done.stderr
    assert "self: 2 (2 bootstrapped, 0 labelled)" in done.stdout
    assert "metric on the trainset: 1.000 before, 1.000 after" in done.stdout
    demos = state_of(out)["self"]["demos"]
    assert all(d["augmented"] for d in demos)
    labels = dict(TRAINSET)
    assert all(d["answer"] != labels[d["question"]] for d in demos)  # the program's answers

    default = run_optimize(
        optimize_env(sim),
        tmp_path,
        *common,
        *("--model", "gpt-4", "--max-demos", "2", "--out", str(tmp_path / "qa-exact.json")),
    )
    assert default.returncode == 0, default.stderr
    assert "self: 2 (1 bootstrapped, 1 labelled)" in default.stdout

    broken = run_optimize(
        optimize_env(sim),
        tmp_path,
        *common,
        *("--model", "gpt-4", "--out", str(tmp_path / "never.json")),
        *("--metric", "optimize_target.metrics:not_a_number"),
    )
    assert refused_with(broken) == (
        "dspy-service optimize: the metric returned a str ('yes'), not a bool or a number"
    )
    assert not (tmp_path / "never.json").exists()


def test_without_provider_settings_the_built_in_simulator_plays_the_provider(
    sim: Simulator, tmp_path: Path
) -> None:
    """As for `serve`: no OPENAI_API_KEY and no OPENAI_BASE_URL, and the simulator built in answers
    (the exact-match score is measured through it), with the warning that says so."""
    trainset = write_trainset(tmp_path / "train.jsonl")
    out = tmp_path / "qa.json"

    done = run_optimize(
        optimize_env(None),
        tmp_path,
        *("--variant", "qa", "--trainset", str(trainset), "--optimizer", "labeled-fewshot"),
        *("--model", "gpt-4", "--out", str(out)),
    )

    assert done.returncode == 0, done.stderr
    assert "metric on the trainset: 0.167 before" in done.stdout
    assert "provider.simulated" in done.stderr
    assert sim.stats()["calls"] == 0  # not the test's simulator
    assert len(state_of(out)["self"]["demos"]) == 4  # --max-demos defaults to 4


BAD_LINES = {
    "not JSON": ('{"example": {"question": "q", "answer": "a"}, "inputs": ["question"]}\n{"example": ', 2),
    "not an object": ('["question"]\n', 1),
    "no example": ('{"inputs": ["question"]}\n', 1),
    "no inputs": ('{"example": {"question": "q", "answer": "a"}}\n', 1),
    "input not in example": ('{"example": {"answer": "a"}, "inputs": ["question"]}\n', 1),
    "unknown input": ('{"example": {"query": "q", "answer": "a"}, "inputs": ["query"]}\n', 1),
    "wrong input type": ('{"example": {"question": 7, "answer": "a"}, "inputs": ["question"]}\n', 1),
    "nothing to compare": ('{"example": {"question": "q"}, "inputs": ["question"]}\n', 1),
}


@pytest.mark.parametrize(
    ("text", "line", "problem"),
    [
        (*BAD_LINES["not JSON"], "not valid JSON"),
        (*BAD_LINES["not an object"], "expected an object with `example` and `inputs`"),
        (*BAD_LINES["no example"], "`example` must be an object of field values"),
        (*BAD_LINES["no inputs"], "`inputs` must be a non-empty list of field names"),
        (*BAD_LINES["input not in example"], "input 'question' is not a field of its example"),
        (*BAD_LINES["unknown input"], "inputs.query is not an input field of variant 'qa'"),
        (*BAD_LINES["wrong input type"], "inputs.question"),
        (*BAD_LINES["nothing to compare"], "the default metric has nothing to compare"),
    ],
    ids=list(BAD_LINES),
)
def test_a_bad_trainset_line_is_refused_by_its_number(
    sim: Simulator, tmp_path: Path, text: str, line: int, problem: str
) -> None:
    """Each bad line: exit 2 and one line naming the file, the line's number and the problem,
    before any provider call; no traceback, no file written."""
    trainset = tmp_path / "train.jsonl"
    trainset.write_text(text, encoding="utf-8")
    out = tmp_path / "never.json"

    done = run_optimize(
        optimize_env(sim),
        tmp_path,
        *("--variant", "qa", "--trainset", str(trainset), "--optimizer", "bootstrap-fewshot"),
        *("--model", "gpt-4", "--out", str(out)),
    )

    message = refused_with(done)
    assert f"{trainset} line {line}: " in message
    assert problem in message
    assert sim.stats()["calls"] == 0
    assert not out.exists()


@pytest.mark.parametrize(
    ("args", "problem"),
    [
        (("--variant", "nope"), "--variant 'nope' is not a variant of"),
        (("--model", "gpt-5"), "--model 'gpt-5' is not a model of"),
        (("--model", None), "has several models (gpt-3.5-turbo, gpt-4)"),
        (("--metric", "no_such_package.metrics:f"), "--metric: cannot import 'no_such_package.metrics'"),
        (("--metric", "optimize_target.metrics:missing"), "has no attribute 'missing'"),
        (("--metric", "optimize_target.metrics:NOT_CALLABLE"), "is not a function but a 'int'"),
        (("--trainset", "missing.jsonl"), "cannot read the trainset missing.jsonl"),
        (("--trainset", "empty.jsonl"), "the trainset empty.jsonl holds no examples"),
        (("--out", "tuned.pkl"), "a state file's name must end in .json"),
        (("--out", "no/such/dir/tuned.json"), "no such directory no/such/dir"),
        (("--variant", "only_async"), "its program defines only `aforward`"),
    ],
    ids=[
        "unknown variant",
        "unknown model",
        "no model among several",
        "metric module missing",
        "metric attribute missing",
        "metric not callable",
        "trainset missing",
        "trainset empty",
        "out not json",
        "out directory missing",
        "async-only program",
    ],
)
def test_a_wrong_argument_is_refused_by_name(
    sim: Simulator, tmp_path: Path, args: tuple[str, str | None], problem: str
) -> None:
    """Unknown variant or model, no model chosen among several, a metric that cannot be imported,
    a trainset that cannot be read or is empty, an output that cannot be a state file, a program
    DSPy's optimizers cannot run: exit 2 with one line naming the problem."""
    write_trainset(tmp_path / "train.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n\n", encoding="utf-8")
    options = {
        "--variant": "qa",
        "--trainset": "train.jsonl",
        "--optimizer": "bootstrap-fewshot",
        "--model": "gpt-4",
        "--out": "tuned.json",
    }
    name, value = args
    if value is None:
        del options[name]
    else:
        options[name] = value

    done = run_optimize(optimize_env(sim), tmp_path, *(part for pair in options.items() for part in pair))

    message = refused_with(done)
    assert message.startswith("dspy-service optimize: ")
    assert problem in message
    assert sim.stats()["calls"] == 0


def test_a_failing_provider_is_reported_and_nothing_is_written(sim: Simulator, tmp_path: Path) -> None:
    """Every call refused (the provider down): exit 2 naming the provider's error, no state file."""
    trainset = write_trainset(tmp_path / "train.jsonl")
    out = tmp_path / "never.json"
    sim.configure(error_rate=1.0, error_status=503)

    for extra in ((), ("--no-score",)):
        done = run_optimize(
            optimize_env(sim),
            tmp_path,
            *("--variant", "qa", "--trainset", str(trainset), "--optimizer", "bootstrap-fewshot"),
            *("--model", "gpt-4", "--out", str(out), *extra),
        )
        message = refused_with(done)
        assert ("every run of the program failed" in message) or ("all 6 runs" in message), message
        assert not out.exists()
