"""Cross-checks between the deployment artefacts that no single format tool can see.

Run by deploy/check-artefacts.sh with the tools virtualenv (it needs PyYAML and promtool):

    .tools/venv/bin/python deploy/check_consistency.py --promtool promtool

- every PromQL expression of the Grafana dashboard and of the prometheus-adapter rule parses
  (Grafana's $__ variables are substituted first), checked by `promtool check rules`;
- the dashboard's panels have unique ids, use the provisioned datasource and do not overlap;
- every alert in alerts.yml has a unit test where it fires and one where it stays silent;
- kustomization.yaml lists every manifest in k8s/ and only files that exist;
- the HPA's Pods metric is the name the adapter rule serves;
- terminationGracePeriodSeconds covers the preStop sleep plus SHUTDOWN_GRACE_SECS, and
  SHUTDOWN_GRACE_SECS is at least REQUEST_TIMEOUT_SECS;
- MODELS_CONFIG points into the mounted models ConfigMap, whose models.yaml parses.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h"}
# Files in k8s/ that are deliberately not applied by `kubectl apply -k k8s/`.
NOT_IN_KUSTOMIZATION = {"kustomization.yaml", "prometheus-adapter-rules.yaml"}
# The service spends up to 5s closing keep-alive connections after the drain; require at least that.
SHUTDOWN_MARGIN_SECS = 5


class Problems:
    """Collects failures so that one run reports all of them."""

    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, message: str) -> None:
        self.items.append(message)


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def load_yaml_documents(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc]


def check_dashboard(problems: Problems) -> list[tuple[str, str]]:
    """Return (where, expr) for every dashboard query after checking the panel layout."""
    datasources = load_yaml(ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml")
    uids = {ds["uid"] for ds in datasources["datasources"]}
    dashboard = json.loads((ROOT / "deploy/grafana/dashboards/dspy-service.json").read_text(encoding="utf-8"))
    exprs: list[tuple[str, str]] = []
    seen_ids: set[int] = set()
    cells: dict[tuple[int, int], str] = {}
    for panel in dashboard["panels"]:
        title = panel["title"]
        if panel["id"] in seen_ids:
            problems.add(f"dashboard: panel id {panel['id']} is used twice")
        seen_ids.add(panel["id"])
        grid = panel["gridPos"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                if (x, y) in cells:
                    problems.add(f"dashboard: panel {title!r} overlaps {cells[(x, y)]!r}")
                    break
                cells[(x, y)] = title
        if grid["x"] + grid["w"] > 24:
            problems.add(f"dashboard: panel {title!r} is wider than the 24-column grid")
        if panel["type"] == "row":
            continue
        targets = panel.get("targets", [])
        if not targets:
            problems.add(f"dashboard: panel {title!r} has no query")
        for target in targets:
            if panel["datasource"]["uid"] not in uids or target["datasource"]["uid"] not in uids:
                problems.add(f"dashboard: panel {title!r} uses a datasource that is not provisioned")
            exprs.append((f"dashboard panel {title!r} ({target['refId']})", target["expr"]))
    return exprs


def check_alert_tests(problems: Problems) -> int:
    """Every alert needs a test case where it fires and one where it must not."""
    rules = load_yaml(ROOT / "deploy/prometheus/alerts.yml")
    alerts = {rule["alert"] for group in rules["groups"] for rule in group["rules"] if "alert" in rule}
    tests = load_yaml(ROOT / "deploy/prometheus/alerts_test.yml")
    fires: set[str] = set()
    silent: set[str] = set()
    for test in tests["tests"]:
        for case in test.get("alert_rule_test", []):
            (fires if case.get("exp_alerts") else silent).add(case["alertname"])
    for name in sorted(alerts - fires):
        problems.add(f"alerts_test.yml: no case where {name} fires")
    for name in sorted(alerts - silent):
        problems.add(f"alerts_test.yml: no case where {name} stays silent")
    for name in sorted((fires | silent) - alerts):
        problems.add(f"alerts_test.yml: tests {name}, which alerts.yml does not define")
    job_names = {
        job["job_name"] for job in load_yaml(ROOT / "deploy/prometheus/prometheus.yml")["scrape_configs"]
    }
    if "dspy-service" not in job_names:
        problems.add("prometheus.yml: no scrape job named dspy-service, which the alerts select on")
    return len(alerts)


def find_kind(docs: list[Any], kind: str) -> dict[str, Any]:
    matches = [doc for doc in docs if doc.get("kind") == kind]
    if len(matches) != 1:
        raise SystemExit(f"expected exactly one {kind} in k8s/, found {len(matches)}")
    found: dict[str, Any] = matches[0]
    return found


def expand_adapter_query(rule: dict[str, Any]) -> str:
    """The metricsQuery as prometheus-adapter would send it for two pods in one namespace."""
    series = rule["seriesQuery"].split("{", 1)[0]
    return (
        rule["metricsQuery"]
        .replace("<<.Series>>", series)
        .replace("<<.LabelMatchers>>", 'namespace="default",pod=~"pod-a|pod-b"')
        .replace("<<.GroupBy>>", "pod")
    )


def check_kubernetes(problems: Problems) -> list[tuple[str, str]]:
    k8s = ROOT / "k8s"
    kustomization = load_yaml(k8s / "kustomization.yaml")
    listed = set(kustomization["resources"])
    for name in sorted(listed):
        if not (k8s / name).is_file():
            problems.add(f"kustomization.yaml lists {name}, which does not exist")
    on_disk = {path.name for path in k8s.glob("*.yaml")} - NOT_IN_KUSTOMIZATION
    for name in sorted(on_disk - listed):
        problems.add(f"kustomization.yaml does not list k8s/{name}")

    docs = [
        doc for name in sorted(listed) if (k8s / name).is_file() for doc in load_yaml_documents(k8s / name)
    ]
    deployment = find_kind(docs, "Deployment")
    hpa = find_kind(docs, "HorizontalPodAutoscaler")
    configmaps = {doc["metadata"]["name"]: doc for doc in docs if doc.get("kind") == "ConfigMap"}
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]

    env_maps = [ref["configMapRef"]["name"] for ref in container.get("envFrom", []) if "configMapRef" in ref]
    env: dict[str, str] = {}
    for name in env_maps:
        if name not in configmaps:
            problems.add(f"Deployment reads env from ConfigMap {name}, which k8s/ does not define")
            continue
        env.update(configmaps[name]["data"])

    grace = float(env.get("SHUTDOWN_GRACE_SECS", "35"))
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    sleep_secs = float(pre_stop[-1]) if pre_stop[0].endswith("sleep") else 0.0
    period = pod["terminationGracePeriodSeconds"]
    if sleep_secs + grace + SHUTDOWN_MARGIN_SECS > period:
        problems.add(
            f"terminationGracePeriodSeconds {period} < preStop {sleep_secs:g}s + SHUTDOWN_GRACE_SECS "
            f"{grace:g}s + {SHUTDOWN_MARGIN_SECS}s margin"
        )

    deadline = float(env.get("REQUEST_TIMEOUT_SECS", "30"))
    if grace < deadline:
        problems.add(
            f"SHUTDOWN_GRACE_SECS {grace:g}s < REQUEST_TIMEOUT_SECS {deadline:g}s: a request in flight at "
            "SIGTERM could be cut off"
        )

    models_path = Path(env.get("MODELS_CONFIG", ""))
    mounts = {mount["name"]: mount["mountPath"] for mount in container.get("volumeMounts", [])}
    volumes = {volume["name"]: volume for volume in pod.get("volumes", [])}
    mounted = [
        name
        for name, path in mounts.items()
        if models_path.parent == Path(path) and "configMap" in volumes.get(name, {})
    ]
    if not mounted:
        problems.add(f"MODELS_CONFIG={models_path} is not inside a mounted ConfigMap volume")
    else:
        source = configmaps.get(volumes[mounted[0]]["configMap"]["name"])
        text = source["data"].get(models_path.name) if source else None
        if text is None:
            problems.add(f"the ConfigMap mounted for MODELS_CONFIG has no key {models_path.name}")
        else:
            models = yaml.safe_load(text)
            if models.get("default_variant") not in models.get("variants", {}):
                problems.add("models.yaml in the ConfigMap: default_variant is not one of its variants")

    adapter_docs = load_yaml_documents(k8s / "prometheus-adapter-rules.yaml")
    adapter = yaml.safe_load(find_kind(adapter_docs, "ConfigMap")["data"]["config.yaml"])
    served = {rule["name"]["as"]: rule for rule in adapter["rules"]}
    exprs: list[tuple[str, str]] = []
    for metric in hpa["spec"]["metrics"]:
        if metric["type"] != "Pods":
            continue
        name = metric["pods"]["metric"]["name"]
        if name not in served:
            problems.add(f"HPA scales on {name}, which no prometheus-adapter rule serves")
        else:
            exprs.append((f"prometheus-adapter rule for {name}", expand_adapter_query(served[name])))
    return exprs


def check_promql(problems: Problems, promtool: str, exprs: list[tuple[str, str]]) -> None:
    """Parse every expression with promtool by wrapping each in a recording rule."""
    rules = []
    for index, (_, expr) in enumerate(exprs):
        for variable, value in GRAFANA_VARIABLES.items():
            expr = expr.replace(variable, value)
        rules.append({"record": f"check:expr_{index}", "expr": expr})
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "exprs.yml"
        path.write_text(yaml.safe_dump({"groups": [{"name": "exprs", "rules": rules}]}), encoding="utf-8")
        result = subprocess.run(
            [promtool, "check", "rules", str(path)], capture_output=True, text=True, check=False
        )
    if result.returncode != 0:
        output = result.stdout + result.stderr
        for index, (where, _) in enumerate(exprs):
            if f'"check:expr_{index}"' in output:
                problems.add(f"invalid PromQL in {where}")
        problems.add(f"promtool check rules on the collected expressions failed:\n{output}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--promtool", default="promtool", help="path to promtool")
    args = parser.parse_args()

    problems = Problems()
    exprs = check_dashboard(problems)
    dashboard_count = len(exprs)
    alert_count = check_alert_tests(problems)
    exprs += check_kubernetes(problems)
    check_promql(problems, args.promtool, exprs)

    if problems.items:
        for item in problems.items:
            print(f"FAIL: {item}", file=sys.stderr)
        return 1
    print(
        f"ok: {dashboard_count} dashboard and {len(exprs) - dashboard_count} adapter PromQL expressions parse"
    )
    print(f"ok: each of {alert_count} alerts has a firing and a silent unit test")
    print("ok: kustomization, HPA metric, adapter rule, shutdown timing and models mount agree")
    return 0


if __name__ == "__main__":
    sys.exit(main())
