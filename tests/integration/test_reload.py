"""SIGHUP reloads the models file and the programs without a restart: changed code takes effect
(new fingerprint, old cache entries missed), breakers and cost totals survive, a broken file or
program is refused with the old set still serving, requests in flight finish on the old programs,
and with WORKERS=2 the supervisor has every worker reload."""

from __future__ import annotations

import concurrent.futures
import signal
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.conftest import ServiceFactory
from tests.support.processes import ServiceProcess, Simulator, wait_until

# The user's program: one module calling one predictor. `version` says which code answered; a
# second version adds a predictor (and changes the instructions), so its source and state change.
_PROGRAM = '''
import dspy


class Answer(dspy.Signature):
    """{instructions}"""

    question: str = dspy.InputField()
    answer: str = dspy.OutputField()


class Bot(dspy.Module):
    def __init__(self):
        super().__init__()
        self.answer = dspy.Predict(Answer)
{extra_init}
    def forward(self, question: str):
        found = self.answer(question=question)
{extra_call}
        return dspy.Prediction(answer=found.answer, version="{version}")
'''

_V2_INIT = '        self.check = dspy.Predict("question, answer -> verdict")\n'
_V2_CALL = "        self.check(question=question, answer=found.answer)\n"

_MODELS = """
default_variant: bot
models:
  gpt-4:
    name: openai/gpt-4
    cost_per_1k_input_tokens: 0.03
    cost_per_1k_output_tokens: 0.06
  flaky:
    name: openai/flaky
    cost_per_1k_input_tokens: 0.01
    cost_per_1k_output_tokens: 0.02
    max_retries: 0
variants:
  bot: {module: "mybot:Bot"}
"""

_EXTRA_VARIANT = '  extra: {signature: "question -> answer"}\n'


# A program whose import keeps the CPU busy (as a heavy import does) for this many seconds.
_SLOW_IMPORT = """
import time as _time

_until = _time.perf_counter() + {secs}
while _time.perf_counter() < _until:
    pass
"""


def write_program(programs_dir: Path, version: str, *, import_secs: float = 0) -> None:
    package = programs_dir / "mybot"
    package.mkdir(parents=True, exist_ok=True)
    two = version == "v2"
    source = _PROGRAM.format(
        instructions="Answer in one short sentence." if not two else "Answer briefly, then check it.",
        extra_init=_V2_INIT if two else "",
        extra_call=_V2_CALL if two else "",
        version=version,
    )
    if import_secs:
        source = _SLOW_IMPORT.format(secs=import_secs) + source
    (package / "__init__.py").write_text(source, encoding="utf-8")


def write_models(path: Path, text: str = _MODELS) -> None:
    # As a careful deployment does: the new file appears whole (a reload never reads half of it).
    staging = path.with_suffix(".tmp")
    staging.write_text(text, encoding="utf-8")
    staging.replace(path)


def start_reloadable(
    service_factory: ServiceFactory, tmp_path: Path, *, wait: bool = True, **env: str
) -> ServiceProcess:
    programs_dir = tmp_path / "progs"
    write_program(programs_dir, "v1")
    write_models(tmp_path / "models.yaml")
    return service_factory(
        "reload",
        wait=wait,
        MODELS_CONFIG=str(tmp_path / "models.yaml"),
        PROGRAMS_PATH=str(programs_dir),
        CIRCUIT_BREAKER_FAILURE_THRESHOLD="1",
        CIRCUIT_BREAKER_TIMEOUT_SECS="600",
        **env,
    )


def events(service: ServiceProcess, name: str) -> list[dict[str, Any]]:
    return [line for line in service.log_lines() if line.get("event") == name]


def hang_up_and_wait(service: ServiceProcess, event: str, *, count: int = 1) -> dict[str, Any]:
    """SIGHUP, then the `count`-th new log line of `event` (programs.reloaded or reload_failed)."""
    before = len(events(service, event))
    service.signal(signal.SIGHUP)
    wait_until(lambda: len(events(service, event)) >= before + count, timeout=60, what=f"{count} new {event}")
    return events(service, event)[-1]


def predict(service: ServiceProcess, **body: Any) -> dict[str, Any]:
    response = service.http.post("/v1/predict", json={"model": "gpt-4", **body})
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


def fingerprints(service: ServiceProcess) -> dict[str, str]:
    variants = service.http.get("/config").json()["variants"]
    return {key: view["fingerprint"] for key, view in variants.items()}


def test_sighup_serves_changed_code_and_a_new_variant_keeping_breakers_and_totals(
    service_factory: ServiceFactory, sim: Simulator, tmp_path: Path
) -> None:
    """Changed code, a new variant and new prices are served after SIGHUP; the changed program has
    a new fingerprint (its cached answer is now a miss); cost totals and an open breaker survive."""
    service = start_reloadable(service_factory, tmp_path)
    question = f"what changed? {uuid.uuid4().hex}"
    first = predict(service, variant="bot", input=question)
    assert first["outputs"]["version"] == "v1"
    assert predict(service, variant="bot", input=question)["metadata"]["cache_level"] == "memory"

    # The breaker of `flaky` opens on one failure and stays open for 10 minutes.
    sim.configure(fail_next=1)
    failed = service.http.post("/v1/predict", json={"model": "flaky", "input": f"x {uuid.uuid4().hex}"})
    assert failed.status_code >= 500, failed.text
    assert service.http.get("/health").json()["circuit_breakers"]["flaky"] == "open"
    wait_until(
        lambda: service.http.get("/costs").json().get("gpt-4:bot", {}).get("total_requests") == 2,
        timeout=10,
        what="the totals of the first two requests",
    )
    before = fingerprints(service)
    loaded_before = service.http.get("/v1/programs").json()["programs"]["bot"]["loaded_at"]

    write_program(tmp_path / "progs", "v2")
    repriced = _MODELS.replace("input_tokens: 0.03", "input_tokens: 0.3").replace(
        "output_tokens: 0.06", "output_tokens: 0.6"
    )
    write_models(tmp_path / "models.yaml", repriced + _EXTRA_VARIANT)
    reloaded = hang_up_and_wait(service, "programs.reloaded")
    print(f"reloaded: {reloaded}")
    assert reloaded["changed"] == ["bot"]
    assert reloaded["added"] == ["extra"]

    after = fingerprints(service)
    assert set(after) == {"bot", "extra"}
    assert after["bot"] != before["bot"]
    assert reloaded["variants"] == after
    listed = service.http.get("/v1/programs").json()["programs"]
    assert {key: view["fingerprint"] for key, view in listed.items()} == after
    assert listed["bot"]["loaded_at"] > loaded_before  # every program is built anew by a reload
    assert predict(service, variant="extra", input="a new variant")["variant"] == "extra"
    again = predict(service, variant="bot", input=question)
    assert again["metadata"]["cache_level"] is None  # the old code's answer is not served
    assert again["outputs"]["version"] == "v2"
    usage = again["metadata"]["usage_by_model"]["gpt-4"]
    assert usage["calls"] == 2  # the new predictor ran too
    priced = usage["input_tokens"] * 0.3e-3 + usage["output_tokens"] * 0.6e-3
    assert usage["cost_usd"] == pytest.approx(priced, rel=1e-9)

    assert service.http.get("/health").json()["circuit_breakers"]["flaky"] == "open"
    refused = service.http.post("/v1/predict", json={"model": "flaky", "input": "still open?"})
    assert refused.status_code == 503, refused.text
    wait_until(
        lambda: service.http.get("/costs").json().get("gpt-4:bot", {}).get("total_requests") == 3,
        timeout=10,
        what="the totals to count on from before the reload",
    )


def test_a_broken_file_or_program_is_refused_and_the_old_set_keeps_serving(
    service_factory: ServiceFactory, sim: Simulator, tmp_path: Path
) -> None:
    """Bad YAML, a program that raises on import, a pin naming no predictor, changed budgets: each
    SIGHUP logs programs.reload_failed naming the problem, and the old programs answer as before; a
    good file afterwards reloads (the failed import left nothing behind)."""
    service = start_reloadable(service_factory, tmp_path)
    models = tmp_path / "models.yaml"
    fingerprint = fingerprints(service)["bot"]

    write_models(models, "variants: [unclosed\n")
    problem = hang_up_and_wait(service, "programs.reload_failed")["problem"]
    assert str(models) in problem
    assert "not valid YAML" in problem

    write_models(models)
    (tmp_path / "progs" / "mybot" / "__init__.py").write_text(
        "raise RuntimeError('boom at import')\n", encoding="utf-8"
    )
    problem = hang_up_and_wait(service, "programs.reload_failed")["problem"]
    assert "variants.bot" in problem
    assert "importing 'mybot' raised RuntimeError: boom at import" in problem

    write_program(tmp_path / "progs", "v2")
    write_models(
        models, _MODELS.replace('{module: "mybot:Bot"}', '{module: "mybot:Bot", models: {nope: gpt-4}}')
    )
    problem = hang_up_and_wait(service, "programs.reload_failed")["problem"]
    assert "variants.bot.models.nope: names no predictor" in problem

    write_models(models, _MODELS + "budgets: {models: {gpt-4: {daily_usd: 5}}}\n")
    problem = hang_up_and_wait(service, "programs.reload_failed")["problem"]
    assert "budgets: changed" in problem  # read at start-up only: a restart applies them

    for _ in range(3):
        answer = predict(service, variant="bot", input=f"still here? {uuid.uuid4().hex}")
        assert answer["outputs"]["version"] == "v1"
    assert fingerprints(service) == {"bot": fingerprint}
    assert not events(service, "programs.reloaded")

    write_models(models)
    hang_up_and_wait(service, "programs.reloaded")
    assert predict(service, variant="bot", input=f"new? {uuid.uuid4().hex}")["outputs"]["version"] == "v2"


def test_requests_in_flight_finish_on_the_old_program(
    service_factory: ServiceFactory, sim: Simulator, tmp_path: Path
) -> None:
    """A request under way when the reload lands answers from the program it started on; later
    ones get the new program; the old set is retired once the deadline has passed (its LMs closed,
    the breaker of a model the new file dropped removed)."""
    service = start_reloadable(service_factory, tmp_path, REQUEST_TIMEOUT_SECS="5")
    sim.configure(latency_ms=1500)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        in_flight = [
            pool.submit(predict, service, variant="bot", input=f"slow {uuid.uuid4().hex}") for _ in range(4)
        ]
        time.sleep(0.5)
        write_program(tmp_path / "progs", "v2")
        flaky = _MODELS[_MODELS.index("  flaky:") : _MODELS.index("variants:")]
        write_models(tmp_path / "models.yaml", _MODELS.replace(flaky, ""))  # a model goes
        hang_up_and_wait(service, "programs.reloaded")
        # its breaker stays while requests routed before the reload may still use it
        assert "flaky" in service.http.get("/health").json()["circuit_breakers"]
        assert not any(future.done() for future in in_flight)  # the reload did not wait for them
        answers = [future.result(timeout=30) for future in in_flight]
    assert [answer["outputs"]["version"] for answer in answers] == ["v1"] * 4
    sim.configure(latency_ms=0)
    assert predict(service, variant="bot", input=f"fresh {uuid.uuid4().hex}")["outputs"]["version"] == "v2"
    wait_until(lambda: events(service, "programs.retired"), timeout=30, what="the old programs' retirement")
    retired = events(service, "programs.retired")[-1]
    print(f"retired: {retired}")
    assert not events(service, "programs.retire_failed")
    assert retired["dropped_breakers"] == ["flaky"]
    assert set(service.http.get("/health").json()["circuit_breakers"]) == {"gpt-4"}
    # the new set's LMs were not the ones closed
    assert predict(service, variant="bot", input=f"after {uuid.uuid4().hex}")["outputs"]["version"] == "v2"


def test_sighups_during_a_reload_make_one_more_and_the_probes_stay_fast(
    service_factory: ServiceFactory, sim: Simulator, tmp_path: Path
) -> None:
    """While a reload imports a program that keeps the CPU busy for 1.5 s, /health answers
    promptly (the build runs off the event loop); two SIGHUPs meanwhile make one more reload, after
    it and never overlapping it, which reads the file as it is then."""
    service = start_reloadable(service_factory, tmp_path)
    write_program(tmp_path / "progs", "v1", import_secs=1.5)
    service.signal(signal.SIGHUP)
    wait_until(lambda: events(service, "programs.reloading"), timeout=10, what="the reload to start")
    time.sleep(0.3)  # it has read the file (at once) and is importing the program (1.5 s)
    write_models(tmp_path / "models.yaml", _MODELS + _EXTRA_VARIANT)
    service.signal(signal.SIGHUP)
    time.sleep(0.1)
    service.signal(signal.SIGHUP)
    probes = []
    while not events(service, "programs.reloaded"):
        started = time.perf_counter()
        assert service.http.get("/health").status_code == 200
        probes.append(time.perf_counter() - started)
        time.sleep(0.02)
    print(f"/health during the reload: {len(probes)} probes, slowest {max(probes) * 1000:.1f} ms")
    assert len(probes) > 10
    assert max(probes) < 0.5

    wait_until(lambda: len(events(service, "programs.reloaded")) == 2, timeout=30, what="the second reload")
    order = [
        line["event"]
        for line in service.log_lines()
        if line.get("event") in ("programs.reloading", "programs.reloaded", "programs.reload_failed")
    ]
    print(f"reload events: {order}")
    assert order == ["programs.reloading", "programs.reloaded"] * 2
    assert len(events(service, "programs.reload_queued")) == 2
    assert events(service, "programs.reloaded")[0]["added"] == []  # the file as it was when read
    assert events(service, "programs.reloaded")[1]["added"] == ["extra"]
    assert predict(service, variant="extra", input="the last file")["variant"] == "extra"


def test_with_two_workers_sighup_to_the_supervisor_reloads_both(
    service_factory: ServiceFactory, sim: Simulator, tmp_path: Path
) -> None:
    """WORKERS=2: the supervisor passes SIGHUP to both workers and lives on; each reloads, so a
    new variant is answered on every connection, whichever worker takes it. A SIGHUP while the
    workers are still starting ends none of them: each reloads once it has started."""
    service = start_reloadable(service_factory, tmp_path, WORKERS="2", wait=False)
    wait_until(lambda: events(service, "workers.started"), timeout=30, what="the workers to be spawned")
    service.signal(signal.SIGHUP)  # they are importing DSPy: far from ready
    wait_until(lambda: len(events(service, "service.started")) == 2, timeout=60, what="both workers")
    wait_until(
        lambda: len(events(service, "programs.reloaded")) == 2, timeout=30, what="the deferred reloads"
    )
    assert not events(service, "workers.replaced")

    write_program(tmp_path / "progs", "v2")
    write_models(tmp_path / "models.yaml", _MODELS + _EXTRA_VARIANT)
    hang_up_and_wait(service, "programs.reloaded", count=2)
    assert service.process is not None
    assert service.process.poll() is None
    assert len(events(service, "workers.reloading")[-1]["pids"]) == 2
    for _ in range(20):
        with httpx.Client(base_url=service.url, timeout=30) as client:  # either worker may take it
            response = client.post(
                "/v1/predict", json={"model": "gpt-4", "variant": "extra", "input": uuid.uuid4().hex}
            )
        assert response.status_code == 200, response.text
        assert response.json()["outputs"] == {"answer": response.json()["output"]}
        bot = client_predict(service, {"model": "gpt-4", "variant": "bot", "input": uuid.uuid4().hex})
        assert bot["outputs"]["version"] == "v2"
    assert not events(service, "workers.replaced")
    service.signal(signal.SIGTERM)
    assert service.wait(timeout=40) == 0


def client_predict(service: ServiceProcess, body: dict[str, Any]) -> dict[str, Any]:
    with httpx.Client(base_url=service.url, timeout=30) as client:  # a new connection: any worker
        response = client.post("/v1/predict", json=body)
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result
