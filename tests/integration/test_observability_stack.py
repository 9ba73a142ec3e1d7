"""The observability stack for real: promtool lints the live /metrics, and a real Prometheus scraping two
replicas answers every PromQL expression of the Grafana dashboard and of the alert rules.

Both tools come from the Debian package `prometheus` (deploy/check-artefacts.sh installs it in CI); the
tests skip, saying so, where it is not installed.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.integration.conftest import ServiceFactory
from tests.support.processes import ServiceProcess, Simulator, wait_until
from tests.support.prometheus import PrometheusServer, QueryResult, find_binary

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy/grafana/dashboards/dspy-service.json"
ALERT_RULES = ROOT / "deploy/prometheus/alerts.yml"
SCRAPE_CONFIG = ROOT / "deploy/prometheus/prometheus.yml"
ADAPTER_RULES = ROOT / "k8s/prometheus-adapter-rules.yaml"
JOB = "dspy-service"  # what the alert rules select on (job="dspy-service")

PROMTOOL = find_binary("promtool")
PROMETHEUS = find_binary("prometheus")
NO_PROMTOOL = "promtool is not installed (Debian package prometheus; deploy/check-artefacts.sh installs it)"
NO_PROMETHEUS = (
    "prometheus is not installed (Debian package prometheus; deploy/check-artefacts.sh installs it)"
)

# The spec's eight metric families, as they appear in the exposition.
SPEC_FAMILIES = {
    "dspy_predictions_total",
    "dspy_prediction_duration_seconds",
    "dspy_cache_operations_total",
    "dspy_circuit_breaker_state",
    "dspy_prediction_cost_total",
    "dspy_token_usage_total",
    "dspy_active_predictions",
    "dspy_errors_total",
}

# Grafana's built-in variables as Grafana would fill them for a 5-minute view. The rate window spans the
# whole test (Prometheus starts inside it), so every rate sees the scrapes before and after the traffic.
GRAFANA_VARIABLES = {
    "$__rate_interval": "1m",
    "$__interval": "1s",
    "$__range_s": "300",
    "$__range_ms": "300000",
    "$__range": "5m",
}

# Dashboard expressions that may rightly draw nothing after the traffic below, and why. Everything else
# must return at least one series with a number in it. An entry that matches no expression fails the
# test, so this list cannot go stale.
MAY_BE_EMPTY = {
    # The service exports no dspy_budget_spent_ratio (there is no budget feature yet): empty by design.
    "max by (scope, name) (dspy_budget_spent_ratio)": "no budgets: the service exports no budget metric",
}

# Whether each alert's expression selects anything after the traffic below (True: the alert is pending
# or firing). Every alert of alerts.yml must be listed here.
ALERT_EXPECTED = {
    "DSPyServiceDown": False,  # both replicas are scraped
    "DSPyHighErrorRate": True,  # every gpt-3.5-turbo prediction of the second round fails
    "DSPyHighLatencyP95": False,  # the simulator answers at once
    "DSPyCircuitBreakerOpen": True,  # gpt-3.5-turbo's breaker is open on replica a
    "DSPyCacheHitRatioCollapse": False,  # no data an hour ago to compare with (offset 1h)
    "DSPyRedisUnreachable": False,  # Redis answers
    "DSPyCostBurnRateHigh": False,  # cents, far below the 10 USD per hour limit
    "DSPyBudgetNearlySpent": False,  # no budget metric
}


@dataclass(frozen=True, slots=True)
class Expression:
    """One PromQL expression of an artefact, with where it came from."""

    source: str
    expr: str


def unique(text: str = "question") -> str:
    return f"{text} {uuid.uuid4().hex}"


def predict(service: ServiceProcess, status: int, **body: Any) -> dict[str, Any]:
    response = service.http.post("/v1/predict", json={"model": "gpt-4", **body})
    assert response.status_code == status, response.text
    result: dict[str, Any] = response.json()
    return result


def cache_level(service: ServiceProcess, **body: Any) -> str | None:
    level: str | None = predict(service, 200, **body)["metadata"]["cache_level"]
    return level


def to_promql(expr: str) -> str:
    """Fill Grafana's variables; a variable this test does not know is an error, not a silent pass."""
    for name in sorted(GRAFANA_VARIABLES, key=len, reverse=True):
        expr = expr.replace(name, GRAFANA_VARIABLES[name])
    leftover = re.findall(r"\$\{?\w+", expr)
    assert not leftover, f"no substitute for Grafana variable(s) {leftover} in {expr!r}"
    return expr


def dashboard_expressions() -> list[Expression]:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    found = []
    # A collapsed row keeps its panels inside itself.
    panels = [inner for panel in dashboard["panels"] for inner in (panel, *panel.get("panels", []))]
    for panel in panels:
        for target in panel.get("targets", []):
            found.append(Expression(f"panel {panel['title']!r} ({target['refId']})", target["expr"]))
    return found


def adapter_expressions() -> list[Expression]:
    """prometheus-adapter's series and metrics queries, as it would send them for our two "pods"."""
    docs = [doc for doc in yaml.safe_load_all(ADAPTER_RULES.read_text(encoding="utf-8")) if doc]
    (configmap,) = [doc for doc in docs if doc.get("kind") == "ConfigMap"]
    found = []
    for rule in yaml.safe_load(configmap["data"]["config.yaml"])["rules"]:
        name = rule["name"]["as"]
        query = (
            rule["metricsQuery"]
            .replace("<<.Series>>", rule["seriesQuery"].split("{", 1)[0])
            .replace("<<.LabelMatchers>>", 'namespace="default",pod=~"pod-a|pod-b"')
            .replace("<<.GroupBy>>", "pod")
        )
        assert "<<" not in query, f"adapter rule {name}: template this test does not fill: {query}"
        found.append(Expression(f"adapter {name} (seriesQuery)", rule["seriesQuery"]))
        found.append(Expression(f"adapter {name} (metricsQuery)", query))
    return found


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERT_RULES.read_text(encoding="utf-8"))["groups"]
    return [rule for group in groups for rule in group["rules"]]


def prometheus_config(pods: dict[str, ServiceProcess]) -> dict[str, Any]:
    """deploy/prometheus/prometheus.yml's dspy-service job, aimed at our replicas and scraping every second.

    Each replica also gets the `namespace` and `pod` labels that Kubernetes service discovery would add,
    which the prometheus-adapter rule selects on.
    """
    deployed = yaml.safe_load(SCRAPE_CONFIG.read_text(encoding="utf-8"))
    (job,) = [job for job in deployed["scrape_configs"] if job["job_name"] == JOB]
    labels = job["static_configs"][0].get("labels", {})
    job = {**job, "scrape_interval": "1s", "scrape_timeout": "1s"}
    job["static_configs"] = [
        {
            "targets": [service.url.removeprefix("http://")],
            "labels": {**labels, "namespace": "default", "pod": pod},
        }
        for pod, service in pods.items()
    ]
    return {
        "global": {**deployed["global"], "scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(ALERT_RULES)],
        "scrape_configs": [job],
    }


def wait_ready(*services: ServiceProcess) -> None:
    """Wait for replicas started with wait=False (they boot side by side, which halves the wait)."""

    def all_ready() -> bool:
        for service in services:
            assert service.process is not None
            if service.process.poll() is not None:
                raise RuntimeError(f"service exited with {service.process.returncode}:\n{service.log_text()}")
        try:
            return all(service.http.get("/ready").status_code == 200 for service in services)
        except httpx.HTTPError:
            return False

    wait_until(all_ready, timeout=60, what="the replicas to be ready")


def scalar(prometheus: PrometheusServer, expr: str) -> float:
    result = prometheus.query(expr)
    assert result.valid, result.error
    return result.values[0] if result.values else float("nan")


def wait_for_scrape_after(prometheus: PrometheusServer, moment: float, targets: int) -> None:
    """Until every replica is up and has been scraped after `moment` (a Unix time)."""
    wait_until(
        lambda: (
            scalar(prometheus, f'count(up{{job="{JOB}"}} == 1)') == targets
            and scalar(prometheus, f'min(timestamp(up{{job="{JOB}"}}))') > moment
        ),
        timeout=20,
        interval=0.2,
        what=f"Prometheus to scrape {targets} replicas after the traffic",
    )


def print_table(title: str, rows: list[tuple[Expression, QueryResult]]) -> None:
    """What was checked and what came back, for the CI log (shown even when the test passes)."""
    print(f"\n{title}")
    print(f"{'series':>6}  {'data':<4}  {'source':<52}  expression")
    for expression, result in rows:
        verdict = "ERR" if not result.valid else ("yes" if result.has_data else "no")
        expr = " ".join(expression.expr.split())
        note = f"  [may be empty: {MAY_BE_EMPTY[expression.expr]}]" if expression.expr in MAY_BE_EMPTY else ""
        print(f"{result.series:>6}  {verdict:<4}  {expression.source[:52]:<52}  {expr[:90]}{note}")


@pytest.fixture
def prometheus_factory(tmp_path: Path) -> Iterator[Callable[[dict[str, ServiceProcess]], PrometheusServer]]:
    """Start a real Prometheus scraping the given replicas (by pod name); killed at the end of the test."""
    started: list[PrometheusServer] = []

    def start(pods: dict[str, ServiceProcess]) -> PrometheusServer:
        assert PROMETHEUS is not None
        workdir = tmp_path / "prometheus"
        workdir.mkdir()
        server = PrometheusServer(PROMETHEUS, workdir, prometheus_config(pods))
        started.append(server)
        server.start()
        return server

    yield start
    for server in started:
        server.stop()


@pytest.mark.skipif(PROMTOOL is None, reason=NO_PROMTOOL)
def test_live_metrics_pass_promtool_check_metrics(shared_service: ServiceProcess, sim: Simulator) -> None:
    """/metrics after hits, misses and errors is valid exposition that passes promtool's lint."""
    assert PROMTOOL is not None
    question = unique()
    predict(shared_service, 200, input=question)
    predict(shared_service, 200, input=question)
    predict(shared_service, 200, input=unique(), variant="cot")
    predict(shared_service, 404, model="gpt-9", input="hi")
    sim.configure(error_rate=1.0, error_status=500)
    predict(shared_service, 502, model="gpt-3.5-turbo", input=unique())

    text = shared_service.http.get("/metrics").text
    families = set(re.findall(r"^# TYPE (\S+) ", text, flags=re.MULTILINE))
    assert not SPEC_FAMILIES - families, f"missing from /metrics: {sorted(SPEC_FAMILIES - families)}"
    done = subprocess.run(
        [PROMTOOL, "check", "metrics"], input=text.encode(), capture_output=True, timeout=30, check=False
    )
    report = (done.stdout + done.stderr).decode("utf-8", errors="replace")
    assert done.returncode == 0, f"promtool check metrics exited {done.returncode}:\n{report}\n{text}"


@pytest.mark.skipif(PROMETHEUS is None, reason=NO_PROMETHEUS)
def test_dashboard_and_alert_queries_run_against_a_real_prometheus(
    service_factory: ServiceFactory,
    sim: Simulator,
    prometheus_factory: Callable[[dict[str, ServiceProcess]], PrometheusServer],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Every dashboard and alert expression is valid PromQL over the real series, and has data where due."""
    # A breaker that opens after one failed request (three calls) and stays open for the whole test.
    env = {"CIRCUIT_BREAKER_FAILURE_THRESHOLD": "3", "CIRCUIT_BREAKER_TIMEOUT_SECS": "120"}
    a = service_factory(name="a", wait=False, **env)
    b = service_factory(name="b", wait=False, **env)
    prometheus = prometheus_factory({"pod-a": a, "pod-b": b})
    wait_ready(a, b)
    wait_for_scrape_after(prometheus, time.time(), targets=2)

    # Round one creates the series (a counter's first sample has no rate yet).
    predict(a, 200, input=unique())
    predict(a, 200, input=unique(), variant="cot")
    predict(a, 200, input=unique(), model="gpt-3.5-turbo")
    predict(a, 404, model="gpt-9", input="hi")
    predict(b, 200, input=unique())
    wait_for_scrape_after(prometheus, time.time(), targets=2)

    # Round two moves them: misses, memory hits, a Redis hit, a 404, a provider error, an open breaker.
    shared = unique()
    assert cache_level(a, input=shared) is None  # a miss, stored in memory and in Redis
    assert cache_level(a, input=shared) == "memory"
    assert cache_level(b, input=shared) == "redis"
    assert cache_level(b, input=shared) == "memory"
    predict(a, 200, input=unique(), variant="cot")
    predict(b, 200, input=unique())
    predict(a, 404, model="gpt-9", input="hi")
    sim.configure(error_rate=1.0, error_status=500)
    predict(a, 502, model="gpt-3.5-turbo", input=unique())  # three failed calls: the breaker opens
    predict(a, 503, model="gpt-3.5-turbo", input=unique())  # refused by the open breaker
    sim.reset()
    wait_for_scrape_after(prometheus, time.time(), targets=2)
    # One more scrape, so that series born in round two (the new error types) have a rate too.
    wait_for_scrape_after(prometheus, time.time(), targets=2)

    # Prometheus's own rule evaluation: every rule healthy, each alert in the state the traffic implies.
    rules = alert_rules()
    alerts = {rule["alert"] for rule in rules if "alert" in rule}
    assert alerts == set(ALERT_EXPECTED), (
        f"ALERT_EXPECTED must list every alert of alerts.yml: add {sorted(alerts - set(ALERT_EXPECTED))}, "
        f"drop {sorted(set(ALERT_EXPECTED) - alerts)}"
    )

    def rule_problems() -> list[str]:
        """What differs from a healthy evaluation with each alert in its expected state."""
        found = []
        loaded = prometheus.rules()
        if len(loaded) != len(rules):
            found.append(f"Prometheus loaded {len(loaded)} rules, alerts.yml has {len(rules)}")
        for rule in loaded:
            if rule["health"] != "ok":
                found.append(f"rule {rule['name']}: health {rule['health']} {rule.get('lastError', '')}")
            if rule["type"] == "alerting" and (rule["state"] != "inactive") != ALERT_EXPECTED[rule["name"]]:
                want = "pending or firing" if ALERT_EXPECTED[rule["name"]] else "inactive"
                found.append(f"alert {rule['name']}: {rule['state']} in Prometheus, expected {want}")
        return found

    try:
        wait_until(lambda: not rule_problems(), timeout=15, interval=0.2, what="the rules to settle")
        problems: list[str] = []
    except TimeoutError:
        problems = rule_problems()  # reported with the rest below

    # Every expression, as an instant query.
    checks = [Expression(e.source, to_promql(e.expr)) for e in dashboard_expressions()]
    checks += adapter_expressions()
    unused = set(MAY_BE_EMPTY) - {check.expr for check in checks}
    problems += [f"MAY_BE_EMPTY names an expression the dashboard no longer has: {e}" for e in unused]
    dashboard_rows = [(check, prometheus.query(check.expr)) for check in checks]
    # An alert's expression selects series exactly when the alert is pending or firing; a recording rule
    # always yields a value, and so does the series it records.
    rule_checks: list[tuple[Expression, bool]] = []
    for rule in rules:
        if "alert" in rule:
            rule_checks.append(
                (Expression(f"alert {rule['alert']}", rule["expr"]), ALERT_EXPECTED[rule["alert"]])
            )
        else:
            rule_checks.append((Expression(f"record {rule['record']}", rule["expr"]), True))
            rule_checks.append((Expression(f"recorded {rule['record']}", rule["record"]), True))
    rule_rows = [(check, prometheus.query(check.expr)) for check, _ in rule_checks]
    with capsys.disabled():
        print_table("dashboard and prometheus-adapter expressions:", dashboard_rows)
        print_table("alerting and recording rules:", rule_rows)

    problems += [f"{e.source}: invalid: {r.error}" for e, r in dashboard_rows + rule_rows if not r.valid]
    problems += [
        f"{e.source}: no data: {e.expr}"
        for e, r in dashboard_rows
        if r.valid and not r.has_data and e.expr not in MAY_BE_EMPTY
    ]
    for (check, wanted), (_, result) in zip(rule_checks, rule_rows, strict=True):
        if result.valid and (result.series > 0) != wanted:
            want = "series" if wanted else "none"
            problems.append(f"{check.source}: expected {want}, got {result.series}: {check.expr}")
    assert not problems, "\n".join(problems)
