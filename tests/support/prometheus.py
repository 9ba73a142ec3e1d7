"""A real Prometheus server for the tests: loopback only, its own config and storage, killed at the end.

The binary comes from the Debian package `prometheus` (deploy/check-artefacts.sh installs it in CI).
Queries go through the HTTP API, so what the tests see is what Grafana and the rule engine see.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from tests.support.processes import LOOPBACK, free_port, wait_until


def find_binary(name: str) -> str | None:
    """The tool on PATH, or None (the tests skip with a reason rather than fail)."""
    return shutil.which(name)


@dataclass(frozen=True, slots=True)
class QueryResult:
    """One instant query: Prometheus's verdict and, when it ran, the values of its series."""

    expr: str
    status: str
    error: str
    values: tuple[float, ...]

    @property
    def valid(self) -> bool:
        return self.status == "success"

    @property
    def series(self) -> int:
        return len(self.values)

    @property
    def has_data(self) -> bool:
        """At least one series with a number a panel can draw (NaN from 0/0 draws nothing)."""
        return any(not math.isnan(value) for value in self.values)


class PrometheusServer:
    """`prometheus` with the given configuration, on a free loopback port, storing into `workdir`."""

    def __init__(self, binary: str, workdir: Path, config: Mapping[str, Any]) -> None:
        self.binary = binary
        self.workdir = workdir
        self.config = config
        self.port = free_port()
        self.config_path = workdir / "prometheus.yml"
        self.log_path = workdir / "prometheus.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.http = httpx.Client(base_url=self.url, timeout=10)

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def start(self) -> None:
        # JSON is YAML, and keeps this module free of a YAML writer.
        self.config_path.write_text(json.dumps(self.config, indent=2), encoding="utf-8")
        with self.log_path.open("ab") as log:  # the child keeps its own descriptor
            self.process = subprocess.Popen(
                [
                    self.binary,
                    f"--config.file={self.config_path}",
                    f"--storage.tsdb.path={self.workdir / 'data'}",
                    f"--web.listen-address={LOOPBACK}:{self.port}",
                    "--log.level=warn",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
            )
        wait_until(self._ready, timeout=30, what=f"Prometheus to be ready (log: {self.log_path})")

    def _ready(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(f"prometheus exited with {self.process.returncode}:\n{self.log_text()}")
        try:
            return self.http.get("/-/ready").status_code == 200
        except httpx.HTTPError:
            return False

    def log_text(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace") if self.log_path.exists() else ""

    def query(self, expr: str) -> QueryResult:
        """An instant query at the current time; a 4xx from Prometheus is a verdict, not an exception."""
        body: dict[str, Any] = self.http.get("/api/v1/query", params={"query": expr}).json()
        if body["status"] != "success":
            return QueryResult(expr, body["status"], f"{body.get('errorType')}: {body.get('error')}", ())
        data = body["data"]
        if data["resultType"] == "vector":
            values = tuple(float(sample["value"][1]) for sample in data["result"])
        elif data["resultType"] == "scalar":
            values = (float(data["result"][1]),)
        else:  # a range vector or a string: not something a panel or an alert can use
            return QueryResult(expr, "error", f"unexpected result type {data['resultType']}", ())
        return QueryResult(expr, "success", "", values)

    def rules(self) -> list[dict[str, Any]]:
        """Every rule Prometheus loaded, with its health, last error, last evaluation and alert state."""
        groups = self.http.get("/api/v1/rules").json()["data"]["groups"]
        return [rule for group in groups for rule in group["rules"]]

    def stop(self) -> None:
        self.http.close()
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
