"""`make bench`: the service against the framework's own ceiling and against the provider itself.

Starts everything it needs (redis-server, the provider simulator, the service, a bare Starlette app),
pins the server under test to core 0 and the load generator (wrk) with everything else to core 1
where the machine has two cores, warms up, runs each scenario at 32 connections and at 1, several
times, and prints one table of medians with their spread and the issue's ratios. The module-program
scenarios (a two-step dspy.Module with aforward, and one with only forward) run at 32 connections
only, through the service and, with no service, driven by DSPy in one asyncio loop
(bench/dspy_direct.py, pinned where the service would be) with 32 concurrent tasks. Results also go to
bench/results/latest.json and latest.md. It reports; it never fails on a missed target, and exits
non-zero only when it could not run at all.

    python -m bench.run                      # the default: ~8 minutes, more on a busy machine
    python -m bench.run --quick              # a smoke run: ~1-2 minutes
    python -m bench.run --duration 10 --repeat 5 --profile
    python -m bench.run --scenarios miss_50ms,direct_50ms --startups 0   # the miss path alone
    python -m bench.run --scenarios modules --startups 0   # the module programs against DSPy alone
    python -m bench.run --scenarios miss_50ms,direct_50ms --baseline-src ../old-checkout
                                             # the same service from another checkout, interleaved
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import os
import platform
import secrets
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

import httpx
import yaml

from bench.processes import (
    BareAppProcess,
    BenchSetupError,
    DspyDirectProcess,
    HttpProcess,
    Process,
    RedisServer,
    ServiceProcess,
    SimulatorProcess,
    core_busy_seconds,
    pinned,
    repin,
    rss_mb,
    running,
    tree_cpu_seconds,
    tree_rss_mb,
)
from bench.profile import find_py_spy, render_summary, start_py_spy, summarise
from bench.results import (
    TWO_WORKERS_LABEL,
    TWO_WORKERS_SUFFIX,
    BenchResults,
    RunSample,
    ScenarioResult,
    render_markdown,
)
from bench.wrk import WrkResult, ensure_wrk, run_wrk

RESULTS_DIR = Path(__file__).resolve().parent / "results"
PREDICT_PATH = "/v1/predict"
CHAT_PATH = "/v1/chat/completions"
QUESTION = "What is the capital of France?"
PREDICT_BODY = {"model": "gpt-3.5-turbo", "input": QUESTION}
UNIQUE_PREDICT_BODY = {"model": "gpt-3.5-turbo", "input": f"__UNIQUE__ {QUESTION}"}
SLOW_PROVIDER_MS = 50.0
# The module programs (bench/programs/two_step.py), served as `module:` variants of the bench's own
# models file, and driven without the service by bench/dspy_direct.py.
PROGRAMS_DIR = Path(__file__).resolve().parent / "programs"
MODULE_VARIANTS = {"async": "two_step_async", "sync": "two_step_sync"}
MODELS_FILE = {
    "default_variant": "baseline",
    "models": {
        "gpt-3.5-turbo": {
            "name": "openai/gpt-3.5-turbo",
            "cost_per_1k_input_tokens": 0.0005,
            "cost_per_1k_output_tokens": 0.0015,
        }
    },
    "variants": {
        "baseline": {"signature": "question -> answer"},
        MODULE_VARIANTS["async"]: {"module": "two_step:TwoStepAsync"},
        MODULE_VARIANTS["sync"]: {"module": "two_step:TwoStepSync"},
    },
}
REDIS_KEYS = 256
# A run during which other processes took more than this share of the server's core, while the
# server itself was busy, is run again (within a budget): the machine may be shared.
DISTURBED_SHARE = 0.3


@dataclass(frozen=True, slots=True)
class Scenario:
    key: str
    label: str
    path: str
    body: str  # name of the body file: predict | unique | chat
    unique: bool = False
    provider_ms: float | None = None  # the simulator's latency for this scenario
    expect_cache: str | None = None  # the cache level a repeated request must report
    key_pool: int | None = None  # cycle through this many cached keys (needs the "unique" body)
    workers: int = 1  # WORKERS for the service; above 1 it is not pinned: it has every core
    program: str | None = None  # a module program of bench/programs/two_step.py: async | sync
    # Driven by bench/dspy_direct.py, not over HTTP: "direct" (DSPy as its user calls it) or
    # "run_program" (the service's own call path, no service around it).
    mode: str | None = None
    top_only: bool = False  # run at the highest connection count only

    @property
    def direct(self) -> bool:
        return self.mode is not None


BARE = Scenario("bare", "bare Starlette app (ceiling)", PREDICT_PATH, "predict")
MEMORY_HIT = Scenario("memory_hit", "memory hit", PREDICT_PATH, "predict", expect_cache="memory")
# The same against a service that keeps a receipt of every prediction (FEEDBACK_ENABLED, the SQLite
# default under DATA_DIR): what the records writer costs the fastest path.
MEMORY_HIT_RECEIPTS = replace(
    MEMORY_HIT, key="memory_hit_receipts", label="memory hit, receipts on (FEEDBACK_ENABLED, SQLite)"
)
# Distinct keys, so that lookups in flight together are for different keys, as in production; they
# may still share one round trip (the service batches lookups made in one event-loop turn).
REDIS_HIT = Scenario(
    "redis_hit",
    f"Redis hit ({REDIS_KEYS} keys)",
    PREDICT_PATH,
    "unique",
    provider_ms=0.0,
    expect_cache="redis",
    key_pool=REDIS_KEYS,
)
MISS_0 = Scenario("miss_0ms", "miss, provider 0 ms", PREDICT_PATH, "unique", True, 0.0)
MISS_50 = Scenario("miss_50ms", "miss, provider 50 ms", PREDICT_PATH, "unique", True, SLOW_PROVIDER_MS)
DIRECT_0 = Scenario("direct_0ms", "direct to provider, 0 ms", CHAT_PATH, "chat", provider_ms=0.0)
DIRECT_50 = Scenario(
    "direct_50ms", "direct to provider, 50 ms", CHAT_PATH, "chat", provider_ms=SLOW_PROVIDER_MS
)


def two_workers_of(scenario: Scenario) -> Scenario:
    """What a second worker process gives on this machine: the service (WORKERS=2) has both cores,
    sharing the second with wrk, redis-server and the simulator; compared with the one-core rows."""
    return replace(
        scenario,
        key=scenario.key + TWO_WORKERS_SUFFIX,
        label=scenario.label + TWO_WORKERS_LABEL,
        workers=2,
    )


MEMORY_HIT_2W, MISS_0_2W, MISS_50_2W = (two_workers_of(s) for s in (MEMORY_HIT, MISS_0, MISS_50))


def module_scenarios(program: str, how: str) -> tuple[Scenario, Scenario, Scenario]:
    """A module program's misses through the service, the same program driven by DSPy in one loop
    (`how` it calls it), and the service's own call path of DSPy alone; provider 0 ms, top conns."""
    key, flavour = f"module_{program}", f"module program ({program})"
    through = Scenario(
        key,
        f"{flavour}, miss, provider 0 ms",
        PREDICT_PATH,
        key,
        unique=True,
        provider_ms=0.0,
        program=program,
        top_only=True,
    )
    direct = replace(
        through, key=key + "_dspy", label=f"{flavour} by DSPy directly ({how}), no service", mode="direct"
    )
    alone = replace(
        through,
        key=key + "_run_program",
        label=f"{flavour} by run_program alone, no service",
        mode="run_program",
    )
    return through, direct, alone


MODULE_ASYNC, MODULE_ASYNC_DSPY, MODULE_ASYNC_RUN = module_scenarios("async", "acall")
MODULE_SYNC, MODULE_SYNC_DSPY, MODULE_SYNC_RUN = module_scenarios("sync", "asyncify")
MODULE_SCENARIOS = (
    MODULE_ASYNC,
    MODULE_ASYNC_DSPY,
    MODULE_ASYNC_RUN,
    MODULE_SYNC,
    MODULE_SYNC_DSPY,
    MODULE_SYNC_RUN,
)
# Names that --scenarios takes for several scenarios at once.
SCENARIO_GROUPS = {"modules": tuple(s.key for s in MODULE_SCENARIOS)}
SCENARIOS = (
    BARE,
    MEMORY_HIT,
    MEMORY_HIT_RECEIPTS,
    REDIS_HIT,
    MISS_0,
    MISS_50,
    DIRECT_0,
    DIRECT_50,
    MEMORY_HIT_2W,
    MISS_0_2W,
    MISS_50_2W,
    *MODULE_SCENARIOS,
)
BASELINE_SUFFIX = "@baseline"
_P = TypeVar("_P", bound=Process)


def baseline_of(scenario: Scenario) -> Scenario:
    """The same scenario against the service run from the --baseline-src checkout."""
    return replace(scenario, key=scenario.key + BASELINE_SUFFIX, label=scenario.label + " (baseline)")


@dataclass(frozen=True, slots=True)
class Options:
    duration_s: int
    warmup_s: int
    repeat: int
    connections: tuple[int, ...]
    startups: int
    dspy_calls: int
    profile: bool
    server_core: int | None
    load_core: int | None
    scenarios: tuple[str, ...] = tuple(s.key for s in SCENARIOS)
    baseline_src: Path | None = None  # a checkout whose service runs the service scenarios again


class _Stopped(Exception):
    """SIGTERM or SIGHUP: unwind like Ctrl-C so every process we started is stopped."""


def _raise_stopped(signum: int, frame: FrameType | None) -> None:
    raise _Stopped(signal.Signals(signum).name)


def _log(message: str) -> None:
    print(f"bench: {message}", flush=True)


class Bench:
    """Runs scenarios against whichever server is up; knows the shared redis-server and simulator."""

    def __init__(
        self,
        options: Options,
        results: BenchResults,
        *,
        wrk: str,
        workdir: Path,
        redis: RedisServer,
        simulator: SimulatorProcess,
    ) -> None:
        self.options = options
        self.results = results
        self.wrk = wrk
        self.workdir = workdir
        self.redis = redis
        self.simulator = simulator
        self.nonce = secrets.token_hex(4)
        self._checks: dict[str, str] = {}
        self._provider_ms: float | None = None
        self._simulator_core = options.load_core
        self._pool_prefix = f"pool-{self.nonce}"
        self.reruns_left = 0
        self.reruns = 0
        self.bodies = {
            "predict": self._write_body("predict", PREDICT_BODY),
            "unique": self._write_body("unique", UNIQUE_PREDICT_BODY),
            "chat": workdir / "chat.json",  # written by the DSPy probe
        }
        for program, variant in MODULE_VARIANTS.items():
            body = {
                "model": "gpt-3.5-turbo",
                "variant": variant,
                "inputs": {"question": f"__UNIQUE__ {QUESTION}"},
            }
            self.bodies[f"module_{program}"] = self._write_body(f"module_{program}", body)

    def connections_of(self, scenario: Scenario) -> tuple[int, ...]:
        """The connection counts (concurrent tasks, driven directly) a scenario runs at."""
        return (max(self.options.connections),) if scenario.top_only else self.options.connections

    def models_file(self) -> Path:
        """The models file of the service that serves the module programs."""
        path = self.workdir / "models.yaml"
        path.write_text(yaml.safe_dump(MODELS_FILE, sort_keys=False))
        return path

    def _write_body(self, name: str, body: dict[str, Any]) -> Path:
        path = self.workdir / f"{name}.json"
        path.write_text(json.dumps(body))
        return path

    def service(self, *, workers: int = 1, **env: str) -> ServiceProcess:
        """The service on the server core; with more than one worker, on every core."""
        return ServiceProcess(
            self.workdir,
            self.options.server_core if workers == 1 else None,
            {
                "WORKERS": str(workers),
                "REDIS_URL": self.redis.redis_url,
                "OPENAI_API_KEY": "bench",
                "OPENAI_BASE_URL": self.simulator.api_base,
                "LOG_FORMAT": "json",
                "LOG_LEVEL": "info",
                **env,
            },
        )

    def check(self, scenario: Scenario, server: Process) -> str:
        """Two requests before measuring: both must succeed; through the service, a unique input must
        be a miss the first time, and a repeated request must come from the expected cache level.
        A module program must make its two provider calls (a miss), and none for the repeat (a hit)."""
        if isinstance(server, DspyDirectProcess):
            return self.check_direct(scenario, server)
        assert isinstance(server, HttpProcess)
        calls_before = self.simulator.calls()
        outcome = self.check_http(scenario, server)
        if scenario.program is not None:
            calls = self.simulator.calls() - calls_before
            if calls != 2:
                raise RuntimeError(
                    f"a miss and a hit of the two-step program made {calls} provider calls, not 2"
                )
            outcome += "; provider calls of both: 2"
        return outcome

    def check_direct(self, scenario: Scenario, server: DspyDirectProcess) -> str:
        """One run of the program in the DSPy driver: two provider calls, and an answer."""
        calls_before = self.simulator.calls()
        command = {"program": scenario.program, "mode": scenario.mode, "check": True}
        answer = server.ask({**command, "prefix": f"check-{scenario.key}-{self.nonce}"}, timeout=30)
        calls = self.simulator.calls() - calls_before
        fields = answer["fields"]
        if not fields.get("answer"):
            raise RuntimeError(f"the program answered without an answer: {fields}")
        if calls != 2:
            raise RuntimeError(f"one run of the two-step program made {calls} provider calls, not 2")
        return f"one run: 2 provider calls, output fields {', '.join(fields)}"

    def check_http(self, scenario: Scenario, server: HttpProcess) -> str:
        body = self.bodies[scenario.body].read_bytes()
        if scenario.key_pool:
            self.fill(scenario, server)
            body = body.replace(b"__UNIQUE__", f"{self._pool_prefix}-0".encode())
        elif scenario.unique:
            body = body.replace(b"__UNIQUE__", f"check-{scenario.key}-{self.nonce}".encode())
        levels: list[str] = []
        for _ in range(2):
            response = httpx.post(
                server.url + scenario.path,
                content=body,
                headers={"Content-Type": "application/json"},
                timeout=30,
            )
            if response.status_code >= 300:
                raise RuntimeError(f"check request got HTTP {response.status_code}: {response.text[:300]}")
            if scenario.path == PREDICT_PATH and server.name == "service":
                levels.append(str(response.json()["metadata"]["cache_level"]))
        if not levels:
            return "answers 2xx"
        if scenario.unique and not scenario.key_pool and levels[0] != "None":
            raise RuntimeError(f"a new input was served from {levels[0]!r}, not from the provider")
        # With several workers the repeat may reach one that has not seen the key: Redis answers.
        accepted = {scenario.expect_cache} if scenario.workers == 1 else {scenario.expect_cache, "redis"}
        if scenario.expect_cache is not None and levels[1] not in accepted:
            raise RuntimeError(
                f"a repeated request was served from {levels[1]!r}, not {scenario.expect_cache!r}"
            )
        return f"cache level of a first and a repeated request: {levels[0]}, {levels[1]}"

    def fill(self, scenario: Scenario, server: HttpProcess) -> None:
        """Ask once for every key of the scenario's pool, so that each is in the cache."""
        template = self.bodies[scenario.body].read_text()
        bodies = [
            template.replace("__UNIQUE__", f"{self._pool_prefix}-{n}").encode()
            for n in range(scenario.key_pool or 0)
        ]

        async def post_all() -> None:
            limit = asyncio.Semaphore(16)
            async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:

                async def post(body: bytes) -> None:
                    async with limit:
                        response = await client.post(
                            scenario.path, content=body, headers={"Content-Type": "application/json"}
                        )
                        if response.status_code >= 300:
                            raise RuntimeError(f"filling the cache got HTTP {response.status_code}")

                await asyncio.gather(*(post(body) for body in bodies))

        asyncio.run(post_all())

    def prepare(self, scenario: Scenario, server: Process) -> None:
        """Put the simulator where the scenario needs it: latency, and core 0 when it is the server."""
        if scenario.provider_ms is not None and scenario.provider_ms != self._provider_ms:
            self.simulator.configure(latency_ms=scenario.provider_ms)
            self._provider_ms = scenario.provider_ms
        core = self.options.server_core if server is self.simulator else self.options.load_core
        if core != self._simulator_core:
            repin(self.simulator.pid, core)
            self._simulator_core = core

    def one_run(
        self, scenario: Scenario, server: Process, connections: int, duration_s: int, tag: str
    ) -> RunSample:
        for process in (server, self.redis, self.simulator):
            process.ensure_alive()
        self.prepare(scenario, server)
        # The server core, unless this server runs on every core (WORKERS=2): then no core is its own.
        server_core = self.options.server_core if server.core is not None else None
        calls_before = self.simulator.calls()
        redis_before = self.redis.stats().get("total_commands_processed", 0)
        core_before = core_busy_seconds(server_core) if server_core is not None else 0.0
        cpu_before = tree_cpu_seconds(server.pid)
        unique = None
        if scenario.key_pool:
            unique = self._pool_prefix
        elif scenario.unique:
            unique = f"{scenario.key}-{tag}-{self.nonce}"
        if isinstance(server, DspyDirectProcess):
            result, calls = self.run_direct(scenario, server, connections, duration_s, unique or tag)
        else:
            assert isinstance(server, HttpProcess)
            result = run_wrk(
                wrk=self.wrk,
                url=server.url,
                path=scenario.path,
                body_file=self.bodies[scenario.body],
                connections=connections,
                duration_s=duration_s,
                core=self.options.load_core,
                unique=unique,
                cycle=scenario.key_pool,
            )
            calls = result.requests
        cpu_spent = tree_cpu_seconds(server.pid) - cpu_before
        foreign = None
        if server_core is not None and result.duration_s > 0:
            core_spent = core_busy_seconds(server_core) - core_before
            foreign = min(1.0, max(0.0, (core_spent - cpu_spent) / result.duration_s))
        # INFO itself counts: the call before is not in its own total, the call after is.
        redis_spent = self.redis.stats().get("total_commands_processed", 0) - redis_before - 1
        calls_spent = self.simulator.calls() - calls_before
        # Per request served; driven directly, per call made (those in flight at the deadline
        # included: the driver waits for them, so their CPU is in what it spent).
        requests = max(calls, 1)
        through_service = server is not self.simulator and not scenario.direct
        return RunSample(
            wrk=result,
            cpu_ms_per_request=1000 * cpu_spent / requests,
            provider_calls_per_request=calls_spent / requests if server is not self.simulator else None,
            redis_commands_per_request=redis_spent / requests if through_service else None,
            foreign_cpu_share=foreign,
            server_cpu_share=cpu_spent / result.duration_s if result.duration_s > 0 else None,
        )

    def run_direct(
        self, scenario: Scenario, server: DspyDirectProcess, tasks: int, duration_s: int, prefix: str
    ) -> tuple[WrkResult, int]:
        """One run of the DSPy driver: its result as wrk's would be, and the calls it made."""
        answer = server.ask(
            {
                "program": scenario.program,
                "mode": scenario.mode,
                "tasks": tasks,
                "duration_s": duration_s,
                "prefix": prefix,
            },
            timeout=duration_s + 60,
        )
        latency = answer["latency_us"]
        result = WrkResult(
            requests=int(answer["requests"]),
            duration_s=int(answer["duration_us"]) / 1e6,
            errors_socket=0,
            errors_status=int(answer["errors"]),  # calls that raised
            p50_ms=latency["p50"] / 1000,
            p90_ms=latency["p90"] / 1000,
            p99_ms=latency["p99"] / 1000,
            mean_ms=latency["mean"] / 1000,
            max_ms=latency["max"] / 1000,
        )
        return result, int(answer["calls"])

    def one_run_undisturbed(
        self, scenario: Scenario, server: Process, connections: int, round_no: int
    ) -> RunSample:
        """One measured run; run again while others took the server's core from under a busy server."""
        attempt = 0
        while True:
            tag = f"c{connections}-{round_no}-{attempt}"
            sample = self.one_run(scenario, server, connections, self.options.duration_s, tag)
            foreign, busy = sample.foreign_cpu_share, sample.server_cpu_share
            disturbed = foreign is not None and foreign > DISTURBED_SHARE and (busy or 0.0) > DISTURBED_SHARE
            if not disturbed or attempt >= 2 or self.reruns_left <= 0:
                return sample
            assert foreign is not None
            self.reruns_left -= 1
            self.reruns += 1
            attempt += 1
            _log(f"{scenario.key} c={connections}: others took {100 * foreign:.0f}% of the core: run again")

    def warm_up(self, scenario: Scenario, server: Process) -> str | None:
        """Check the scenario answers as it must and warm it up; the failure, if it cannot run."""
        try:
            self.prepare(scenario, server)
            check = self.check(scenario, server)
            self.one_run(scenario, server, max(self.options.connections), self.options.warmup_s, "warmup")
        except (RuntimeError, ValueError, OSError, httpx.HTTPError) as exc:
            _log(f"{scenario.key}: could not run: {exc}")
            return f"could not run: {str(exc)[:200]}"
        _log(f"{scenario.key}: warmed up ({check})")
        self._checks[scenario.key] = check
        return None

    def measure(self, plan: list[tuple[Scenario, Process]]) -> None:
        """Each round runs every scenario at every connection count once, so that drift in the
        machine's load spreads over all scenarios alike instead of landing on one of them."""
        outcomes: dict[tuple[str, int], ScenarioResult] = {}
        runnable: list[tuple[Scenario, Process]] = []
        for scenario, server in plan:
            failure = self.warm_up(scenario, server)
            for connections in self.connections_of(scenario):
                outcome = ScenarioResult(
                    scenario.key,
                    scenario.label,
                    connections,
                    check=self._checks.get(scenario.key, ""),
                    failure=failure,
                )
                outcomes[scenario.key, connections] = outcome
                self.results.scenarios.append(outcome)
            if failure is None:
                runnable.append((scenario, server))
        # one round's worth
        self.reruns_left = sum(len(self.connections_of(scenario)) for scenario, _ in runnable)
        for round_no in range(self.options.repeat):
            for scenario, server in runnable:
                for connections in self.connections_of(scenario):
                    outcome = outcomes[scenario.key, connections]
                    if outcome.failure:
                        continue
                    try:
                        sample = self.one_run_undisturbed(scenario, server, connections, round_no)
                    except (RuntimeError, ValueError, OSError, httpx.HTTPError) as exc:
                        _log(f"{scenario.key} c={connections}: run failed: {exc}")
                        outcome.failure = f"run failed: {str(exc)[:200]}"
                        continue
                    outcome.samples.append(sample)
                    foreign = sample.foreign_cpu_share
                    _log(
                        f"round {round_no + 1} {scenario.key:<12} c={connections:<3}"
                        f"{sample.wrk.requests_per_s:>9,.0f} req/s  p50 {sample.wrk.p50_ms:7.2f} ms"
                        f"  cpu {sample.cpu_ms_per_request:.3f} ms/req  errors {sample.wrk.errors}"
                        + (f"  other load on server core {100 * foreign:.0f}%" if foreign is not None else "")
                    )
        for scenario, server in plan:
            for connections in self.connections_of(scenario):
                outcomes[scenario.key, connections].rss_mb = tree_rss_mb(server.pid)
        if self.reruns:
            self.results.notes.append(
                f"{self.reruns} run(s) were run again because other processes took over "
                f"{100 * DISTURBED_SHARE:.0f}% of the server's core while the server was busy"
            )

    def profile(self, scenario: Scenario, server: Process) -> None:
        """One extra run at the highest connection count with py-spy attached (not in the table)."""
        py_spy = find_py_spy()
        if py_spy is None:
            self.results.notes.append("--profile: py-spy not found (pip install py-spy)")
            return
        self.prepare(scenario, server)
        out = self.workdir / f"profile-{scenario.key}.txt"
        duration = max(self.options.duration_s, 5)
        spy = start_py_spy(py_spy, server.pid, duration, out, self.options.load_core)
        try:
            time.sleep(0.5)  # let py-spy attach before the load starts
            self.one_run(scenario, server, max(self.options.connections), duration, "profile")
        finally:
            try:
                spy.wait(timeout=duration + 30)
            except subprocess.TimeoutExpired:
                spy.kill()
                spy.wait()
        if not out.exists():
            stderr = spy.stderr.read().decode(errors="replace") if spy.stderr else ""
            self.results.notes.append(f"--profile {scenario.key}: py-spy wrote nothing: {stderr[:200]}")
            return
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        shutil.copy(out, RESULTS_DIR / out.name)
        self.results.profiles[scenario.key] = summarise(out)


def measure_startup(bench: Bench, times: int) -> None:
    """Spawn to first 200 from /ready, `times` fresh starts; and resident memory when just ready."""
    for i in range(times):
        service = bench.service()
        with running(service) as started:
            bench.results.startup_s.append(time.perf_counter() - started.spawned_at)
            if i == 0:
                bench.results.idle_rss_mb = rss_mb(started.pid)
        _log(f"start-up {i + 1}: {bench.results.startup_s[-1]:.2f} s")


def probe_dspy(bench: Bench, calls: int) -> None:
    """DSPy's per-call CPU in its own process (pinned like the server) and the body DSPy sends."""
    bench.simulator.configure(latency_ms=0)
    command = pinned(
        [
            sys.executable,
            "-m",
            "bench.dspy_probe",
            "--api-base",
            bench.simulator.api_base,
            "--calls",
            str(calls),
            "--warmup",
            str(max(calls // 10, 5)),
            "--body-out",
            str(bench.bodies["chat"]),
        ],
        bench.options.server_core,
    )
    root = str(Path(__file__).resolve().parent.parent)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p),
    }
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False, timeout=600)
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("BENCH_JSON ")), None)
    if done.returncode != 0 or line is None:
        raise BenchSetupError(
            f"the DSPy probe failed ({done.returncode}):\n{done.stdout}\n{done.stderr[-3000:]}"
        )
    bench.results.dspy = json.loads(line.removeprefix("BENCH_JSON "))
    plain = bench.results.dspy["plain"]["cpu_ms_median"]
    _log(f"DSPy in isolation: {plain:.2f} ms CPU per call")


def note_receipts(service: ServiceProcess, database: Path, *, baseline: bool = False) -> str:
    """What the receipts service kept of the memory hits it served: written, dropped (queue full)."""
    metrics = httpx.get(service.url + "/metrics", timeout=10).text
    dropped = sum(
        float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("dspy_records_dropped_total{") and 'kind="receipt"' in line
    )
    with contextlib.closing(sqlite3.connect(database)) as connection:
        written = int(connection.execute("SELECT count(*) FROM receipts").fetchone()[0])
    which = " (baseline)" if baseline else ""
    return (
        f"memory hit, receipts on{which}: {written:,} receipts written to SQLite, {dropped:,.0f} "
        "dropped (the writer's queue full) over the scenario's runs"
    )


def note_missing_bytecode(results: BenchResults) -> None:
    """Start-up is measured as installed: `make` writes the dependencies' .pyc files (uv pip install
    --compile-bytecode), as the image's pip install does. Say so where this venv has none."""
    spec = importlib.util.find_spec("dspy")
    origin = spec.origin if spec is not None else None
    if origin is not None and not Path(importlib.util.cache_from_source(origin)).exists():
        results.notes.append(
            "DSPy's .pyc files are missing from this virtualenv, so start-up includes compiling it "
            "(about 1.2 s here): build the venv with `make`"
        )


def run_all(options: Options, results: BenchResults) -> None:
    wrk = ensure_wrk()
    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="dspy-bench-")))
        redis = RedisServer(workdir, options.load_core)
        stack.callback(redis.stop)
        redis.start(timeout=15)
        simulator = SimulatorProcess(workdir, options.load_core)
        stack.callback(simulator.stop)
        simulator.start(timeout=60)
        bench = Bench(options, results, wrk=wrk, workdir=workdir, redis=redis, simulator=simulator)
        _log(f"redis-server :{redis.port}, simulator :{simulator.port}; work directory {workdir}")

        probe_dspy(bench, options.dspy_calls)
        note_missing_bytecode(results)
        if options.startups:
            measure_startup(bench, options.startups)

        # Every server stays up, idle when it is not the one under load, all on the server core.
        wanted = set(options.scenarios)
        servers: list[Process] = []

        def start(process: _P) -> _P:
            servers.append(stack.enter_context(running(process)))
            return process

        service = redis_only = base_service = base_redis_only = None
        if wanted & {MEMORY_HIT.key, MISS_0.key, MISS_50.key}:
            service = start(bench.service())
            if options.baseline_src is not None:
                base_service = start(bench.service(PYTHONPATH=str(options.baseline_src / "src")))
        if REDIS_HIT.key in wanted:
            redis_only = start(bench.service(MEMORY_CACHE_SIZE="0"))
            if options.baseline_src is not None:
                base_redis_only = start(
                    bench.service(MEMORY_CACHE_SIZE="0", PYTHONPATH=str(options.baseline_src / "src"))
                )
        receipts = base_receipts = None
        if MEMORY_HIT_RECEIPTS.key in wanted:
            receipts = start(bench.service(FEEDBACK_ENABLED="true", DATA_DIR=str(workdir / "records")))
            if options.baseline_src is not None:
                base_receipts = start(
                    bench.service(
                        FEEDBACK_ENABLED="true",
                        DATA_DIR=str(workdir / "records-baseline"),
                        PYTHONPATH=str(options.baseline_src / "src"),
                    )
                )
        two_workers = None
        if wanted & {MEMORY_HIT_2W.key, MISS_0_2W.key, MISS_50_2W.key}:
            two_workers = start(bench.service(workers=2))
        bare = start(BareAppProcess(workdir, options.server_core)) if BARE.key in wanted else None
        modules = direct = None
        if any(s.key in wanted and s.program is not None and not s.direct for s in MODULE_SCENARIOS):
            modules = start(
                bench.service(MODELS_CONFIG=str(bench.models_file()), PROGRAMS_PATH=str(PROGRAMS_DIR))
            )
        if any(s.key in wanted and s.direct for s in MODULE_SCENARIOS):
            direct = start(DspyDirectProcess(workdir, options.server_core, simulator.api_base))
        server_of: dict[str, tuple[Process | None, Process | None]] = {
            BARE.key: (bare, None),
            MEMORY_HIT.key: (service, base_service),
            MEMORY_HIT_RECEIPTS.key: (receipts, base_receipts),
            REDIS_HIT.key: (redis_only, base_redis_only),
            MISS_0.key: (service, base_service),
            MISS_50.key: (service, base_service),
            DIRECT_0.key: (simulator, None),
            DIRECT_50.key: (simulator, None),
            MEMORY_HIT_2W.key: (two_workers, None),
            MISS_0_2W.key: (two_workers, None),
            MISS_50_2W.key: (two_workers, None),
            **{s.key: (direct if s.direct else modules, None) for s in MODULE_SCENARIOS},
        }
        plan: list[tuple[Scenario, Process]] = []
        for scenario in SCENARIOS:
            if scenario.key not in wanted:
                continue
            server, baseline = server_of[scenario.key]
            assert server is not None
            plan.append((scenario, server))
            if baseline is not None:
                plan.append((baseline_of(scenario), baseline))
        bench.measure(plan)
        if receipts is not None:
            results.notes.append(note_receipts(receipts, workdir / "records" / "records.db"))
        if base_receipts is not None:
            results.notes.append(
                note_receipts(base_receipts, workdir / "records-baseline" / "records.db", baseline=True)
            )
        if options.profile:
            for scenario in (MEMORY_HIT, MEMORY_HIT_RECEIPTS, REDIS_HIT, MISS_0, *MODULE_SCENARIOS):
                server = server_of[scenario.key][0]
                if scenario.key in wanted and server is not None:
                    bench.profile(scenario, server)
        for server in servers:
            if isinstance(server, ServiceProcess):
                errors_logged = _count_error_lines(server.log_path)
                if errors_logged:
                    results.notes.append(
                        f"{server.name} :{server.port} logged {errors_logged} error-level lines"
                    )


def _count_error_lines(log_path: Path) -> int:
    count = 0
    with log_path.open("rb") as log:
        for line in log:
            if b'"level":"error"' in line or b'"level": "error"' in line:
                count += 1
    return count


def _cores() -> tuple[int | None, int | None, str]:
    available = sorted(os.sched_getaffinity(0))
    if len(available) >= 2 and shutil.which("taskset"):
        server, load = available[0], available[1]
        return (
            server,
            load,
            f"server pinned to core {server}; wrk, redis-server and the simulator to core {load}",
        )
    return None, None, "fewer than 2 cores (or no taskset): nothing pinned, server and load share the CPU"


def parse_options(argv: list[str] | None) -> tuple[Options, str]:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run", description=__doc__.split("\n\n")[0] if __doc__ else ""
    )
    parser.add_argument("--duration", type=int, default=5, help="seconds per measured run (default 5)")
    parser.add_argument("--warmup", type=int, default=2, help="seconds of warm-up per scenario (default 2)")
    parser.add_argument(
        "--repeat", type=int, default=3, help="measured runs per scenario and connection count"
    )
    parser.add_argument(
        "--connections", default="32,1", help="comma-separated connection counts (default 32,1)"
    )
    parser.add_argument("--startups", type=int, default=3, help="service starts timed (default 3; 0: none)")
    parser.add_argument("--dspy-calls", type=int, default=300, help="calls in the DSPy CPU probe")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 s runs, 1 s warm-up, fewer calls")
    parser.add_argument("--profile", action="store_true", help="also sample the service with py-spy")
    parser.add_argument(
        "--scenarios",
        default=",".join(s.key for s in SCENARIOS),
        help="comma-separated scenarios to run, or `modules` for every module-program one "
        "(default all: %(default)s)",
    )
    parser.add_argument(
        "--baseline-src",
        type=Path,
        help="a checkout (e.g. a git worktree of an older commit) whose service runs every service "
        "scenario again, interleaved with this one's, so that before and after share one run",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.duration, args.warmup, args.dspy_calls = 1, 1, 100
    connections = tuple(int(c) for c in args.connections.split(",") if c.strip())
    if args.duration < 1 or args.warmup < 1 or args.repeat < 1 or not connections or min(connections) < 1:
        parser.error("--duration, --warmup, --repeat and every connection count must be at least 1")
    known = {s.key for s in SCENARIOS}
    named = [key.strip() for key in args.scenarios.split(",") if key.strip()]
    scenarios = tuple(dict.fromkeys(k for key in named for k in SCENARIO_GROUPS.get(key, (key,))))
    unknown = sorted(set(scenarios) - known)
    if unknown or not scenarios:
        parser.error(
            f"--scenarios: unknown {', '.join(unknown) or '(none given)'}; known: {', '.join(sorted(known))}"
        )
    baseline_src = args.baseline_src.resolve() if args.baseline_src else None
    if baseline_src is not None and not (baseline_src / "src" / "dspy_service").is_dir():
        parser.error(f"--baseline-src {args.baseline_src}: no src/dspy_service in it")
    server_core, load_core, pinning = _cores()
    options = Options(
        duration_s=args.duration,
        warmup_s=args.warmup,
        repeat=args.repeat,
        connections=connections,
        startups=max(args.startups, 0),
        dspy_calls=max(args.dspy_calls, 10),
        profile=args.profile,
        server_core=server_core,
        load_core=load_core,
        scenarios=scenarios,
        baseline_src=baseline_src,
    )
    return options, pinning


def _write_results(results: BenchResults, report: str) -> None:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / "latest.json").write_text(json.dumps(results.to_json(), indent=2) + "\n")
    (RESULTS_DIR / "latest.md").write_text(report)


def main(argv: list[str] | None = None) -> int:
    options, pinning = parse_options(argv)
    results = BenchResults(
        settings={
            "started": datetime.now(UTC).isoformat(timespec="seconds"),
            "command": "python -m bench.run " + " ".join(sys.argv[1:] if argv is None else argv),
            "duration_s": options.duration_s,
            "warmup_s": options.warmup_s,
            "repeat": options.repeat,
            "connections": list(options.connections),
            "scenarios": list(options.scenarios),
            "baseline_src": str(options.baseline_src) if options.baseline_src else None,
            "cpu_count": os.cpu_count(),
            "pinning": pinning,
            "python": platform.python_version(),
            "machine": platform.machine(),
            "kernel": platform.release(),
            "load_average_at_start": list(os.getloadavg()),
        }
    )
    _log(pinning)
    previous: dict[signal.Signals, Callable[[int, FrameType | None], Any] | int | None] = {}
    for sig in (signal.SIGTERM, signal.SIGHUP):
        previous[sig] = signal.signal(sig, _raise_stopped)
    started = time.monotonic()
    exit_code = 0
    try:
        run_all(options, results)
    except BenchSetupError as exc:
        print(f"bench: could not run: {exc}", file=sys.stderr)
        exit_code = 2
    except (KeyboardInterrupt, _Stopped):
        print("bench: interrupted; every process it started has been stopped", file=sys.stderr)
        exit_code = 130
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if exit_code and not any(s.samples for s in results.scenarios):
        return exit_code
    if exit_code:
        results.notes.append("the run stopped early: the results below are partial")
    results.settings["elapsed_s"] = round(time.monotonic() - started, 1)
    results.settings["load_average_at_end"] = list(os.getloadavg())
    report = render_markdown(results)
    for name, summary in results.profiles.items():
        report += "\n" + render_summary(name, summary)
    _write_results(results, report)
    print()
    print(report)
    _log(f"done in {results.settings['elapsed_s']:.0f} s; results in {RESULTS_DIR / 'latest.json'}")
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
