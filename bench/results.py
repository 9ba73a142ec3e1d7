"""What a benchmark measured, the issue's targets, and the report (markdown and JSON)."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from bench.wrk import WrkResult


@dataclass(frozen=True, slots=True)
class RunSample:
    """One measured wrk run and what the server spent on it."""

    wrk: WrkResult
    cpu_ms_per_request: float
    provider_calls_per_request: float | None
    redis_commands_per_request: float | None
    # Share of the server's core that other processes (or the hypervisor) took during the run.
    foreign_cpu_share: float | None = None
    # Share of one core the server itself used during the run.
    server_cpu_share: float | None = None


@dataclass(slots=True)
class ScenarioResult:
    key: str
    label: str
    connections: int
    samples: list[RunSample] = field(default_factory=list)
    rss_mb: float | None = None
    check: str = ""
    failure: str | None = None

    def _median(self, value: Callable[[RunSample], float | None]) -> float | None:
        values = [v for v in (value(s) for s in self.samples) if v is not None]
        return statistics.median(values) if values else None

    @property
    def rps(self) -> float | None:
        return self._median(lambda s: s.wrk.requests_per_s)

    @property
    def rps_range(self) -> tuple[float, float] | None:
        values = [s.wrk.requests_per_s for s in self.samples]
        return (min(values), max(values)) if values else None

    @property
    def p50_ms(self) -> float | None:
        return self._median(lambda s: s.wrk.p50_ms)

    @property
    def p50_range(self) -> tuple[float, float] | None:
        values = [s.wrk.p50_ms for s in self.samples]
        return (min(values), max(values)) if values else None

    @property
    def p99_ms(self) -> float | None:
        return self._median(lambda s: s.wrk.p99_ms)

    @property
    def cpu_ms(self) -> float | None:
        return self._median(lambda s: s.cpu_ms_per_request)

    @property
    def provider_calls(self) -> float | None:
        return self._median(lambda s: s.provider_calls_per_request)

    @property
    def redis_commands(self) -> float | None:
        return self._median(lambda s: s.redis_commands_per_request)

    @property
    def foreign_cpu_share(self) -> float | None:
        return self._median(lambda s: s.foreign_cpu_share)

    @property
    def errors(self) -> int:
        return sum(s.wrk.errors for s in self.samples)

    @property
    def requests(self) -> int:
        return sum(s.wrk.requests for s in self.samples)

    def to_json(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "label": self.label,
            "connections": self.connections,
            "failure": self.failure,
            "check": self.check,
            "rss_mb": self.rss_mb,
            "median": {
                "requests_per_s": self.rps,
                "p50_ms": self.p50_ms,
                "p99_ms": self.p99_ms,
                "cpu_ms_per_request": self.cpu_ms,
                "provider_calls_per_request": self.provider_calls,
                "redis_commands_per_request": self.redis_commands,
                "foreign_cpu_share": self.foreign_cpu_share,
            },
            "requests_per_s_range": self.rps_range,
            "p50_ms_range": self.p50_range,
            "errors": self.errors,
            "runs": [
                {
                    "requests": s.wrk.requests,
                    "duration_s": s.wrk.duration_s,
                    "requests_per_s": s.wrk.requests_per_s,
                    "errors_socket": s.wrk.errors_socket,
                    "errors_status": s.wrk.errors_status,
                    "p50_ms": s.wrk.p50_ms,
                    "p90_ms": s.wrk.p90_ms,
                    "p99_ms": s.wrk.p99_ms,
                    "mean_ms": s.wrk.mean_ms,
                    "max_ms": s.wrk.max_ms,
                    "cpu_ms_per_request": s.cpu_ms_per_request,
                    "provider_calls_per_request": s.provider_calls_per_request,
                    "redis_commands_per_request": s.redis_commands_per_request,
                    "foreign_cpu_share": s.foreign_cpu_share,
                    "server_cpu_share": s.server_cpu_share,
                }
                for s in self.samples
            ],
        }


@dataclass(slots=True)
class BenchResults:
    settings: dict[str, Any]
    scenarios: list[ScenarioResult] = field(default_factory=list)
    startup_s: list[float] = field(default_factory=list)
    idle_rss_mb: float | None = None
    dspy: dict[str, Any] | None = None
    profiles: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def find(self, key: str, connections: int) -> ScenarioResult | None:
        for scenario in self.scenarios:
            if scenario.key == key and scenario.connections == connections and not scenario.failure:
                return scenario
        return None

    def find_top(self, key: str) -> ScenarioResult | None:
        """The scenario's result at the highest connection count it ran at."""
        found = [s for s in self.scenarios if s.key == key and not s.failure and s.samples]
        return max(found, key=lambda s: s.connections) if found else None

    @property
    def startup_median_s(self) -> float | None:
        return statistics.median(self.startup_s) if self.startup_s else None

    @property
    def service_rss_mb(self) -> float | None:
        """The service's largest resident memory after any of its runs."""
        values = [
            s.rss_mb
            for s in self.scenarios
            if s.rss_mb is not None
            and s.key in ("memory_hit", "memory_hit_receipts", "redis_hit", "miss_0ms", "miss_50ms")
        ]
        return max(values) if values else None

    def ratios(self) -> list[Ratio]:
        return compute_ratios(self)

    def to_json(self) -> dict[str, Any]:
        return {
            "settings": self.settings,
            "scenarios": [s.to_json() for s in self.scenarios],
            "startup_s": {"runs": self.startup_s, "median": self.startup_median_s},
            "idle_rss_mb": self.idle_rss_mb,
            "service_rss_mb": self.service_rss_mb,
            "dspy_in_isolation": self.dspy,
            "ratios": [r.to_json() for r in self.ratios()],
            "profiles": self.profiles,
            "notes": self.notes,
        }


@dataclass(frozen=True, slots=True)
class Ratio:
    name: str
    value: float | None
    target: float
    higher_is_better: bool
    unit: str = ""
    # The same ratio from server CPU per request (1/CPU is req/s per busy core): it holds up better
    # than req/s when other processes share the machine.
    by_cpu: float | None = None

    @property
    def met(self) -> bool | None:
        if self.value is None:
            return None
        return self.value >= self.target if self.higher_is_better else self.value <= self.target

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "value": self.value,
            "target": self.target,
            "comparison": ">=" if self.higher_is_better else "<=",
            "unit": self.unit,
            "met": self.met,
            "by_cpu_per_request": self.by_cpu,
        }


def _divide(top: float | None, bottom: float | None) -> float | None:
    if top is None or bottom is None or bottom == 0:
        return None
    return top / bottom


def compute_ratios(results: BenchResults) -> list[Ratio]:
    def rps(key: str, connections: int) -> float | None:
        found = results.find(key, connections)
        return found.rps if found else None

    def p50(key: str, connections: int) -> float | None:
        found = results.find(key, connections)
        return found.p50_ms if found else None

    def cpu(key: str, connections: int) -> float | None:
        found = results.find(key, connections)
        return found.cpu_ms if found else None

    miss_p50, direct_p50 = p50("miss_50ms", 1), p50("direct_50ms", 1)
    ratios = [
        Ratio(
            "memory hit / bare app, req/s at 32 conns",
            _divide(rps("memory_hit", 32), rps("bare", 32)),
            0.5,
            True,
            by_cpu=_divide(cpu("bare", 32), cpu("memory_hit", 32)),
        ),
        *_receipt_ratios(rps, cpu),
        Ratio(
            "Redis hit / bare app, req/s at 32 conns",
            _divide(rps("redis_hit", 32), rps("bare", 32)),
            0.3,
            True,
            by_cpu=_divide(cpu("bare", 32), cpu("redis_hit", 32)),
        ),
        Ratio(
            "miss / direct, provider 50 ms, req/s at 32 conns",
            _divide(rps("miss_50ms", 32), rps("direct_50ms", 32)),
            0.5,
            True,
        ),
        Ratio(
            "p50 miss - p50 direct, provider 50 ms, 1 conn",
            None if miss_p50 is None or direct_p50 is None else miss_p50 - direct_p50,
            3.0,
            False,
            " ms",
        ),
        *_module_ratios(results),
        Ratio("service resident memory after the runs", results.service_rss_mb, 150.0, False, " MB"),
        Ratio("start-up: spawn to first 200 from /ready", results.startup_median_s, 2.5, False, " s"),
    ]
    # The same ratios for the service of --baseline-src, measured in the same run.
    base = "@baseline"
    base_p50 = p50("miss_50ms" + base, 1)
    for name, value, target, higher, unit in (
        (
            "memory hit / bare app, req/s at 32 conns",
            _divide(rps("memory_hit" + base, 32), rps("bare", 32)),
            0.5,
            True,
            "",
        ),
        (
            "Redis hit / bare app, req/s at 32 conns",
            _divide(rps("redis_hit" + base, 32), rps("bare", 32)),
            0.3,
            True,
            "",
        ),
        (
            "miss / direct, provider 50 ms, req/s at 32 conns",
            _divide(rps("miss_50ms" + base, 32), rps("direct_50ms", 32)),
            0.5,
            True,
            "",
        ),
        (
            "p50 miss - p50 direct, provider 50 ms, 1 conn",
            None if base_p50 is None or direct_p50 is None else base_p50 - direct_p50,
            3.0,
            False,
            " ms",
        ),
    ):
        if value is not None:
            ratios.append(Ratio(f"(baseline) {name}", value, target, higher, unit))
    ratios += _receipt_ratios(rps, cpu, base)
    return ratios


def _receipt_ratios(
    rps: Callable[[str, int], float | None],
    cpu: Callable[[str, int], float | None],
    suffix: str = "",
) -> list[Ratio]:
    """The memory-hit ratio with a receipt kept for every prediction, and how far below the ratio
    without receipts (same rounds, same bare app) it is: the issue's target is within 0.05.
    `suffix` "@baseline": the same for the --baseline-src service."""
    on = _divide(rps("memory_hit_receipts" + suffix, 32), rps("bare", 32))
    if on is None:
        return []
    off = _divide(rps("memory_hit" + suffix, 32), rps("bare", 32))
    on_by_cpu = _divide(cpu("bare", 32), cpu("memory_hit_receipts" + suffix, 32))
    off_by_cpu = _divide(cpu("bare", 32), cpu("memory_hit" + suffix, 32))
    prefix = "(baseline) " if suffix else ""
    return [
        Ratio(
            f"{prefix}memory hit, receipts on / bare app, req/s at 32 conns", on, 0.5, True, by_cpu=on_by_cpu
        ),
        Ratio(
            f"{prefix}memory hit / bare app: receipts off minus receipts on, 32 conns",
            None if off is None else off - on,
            0.05,
            False,
            by_cpu=None if off_by_cpu is None or on_by_cpu is None else off_by_cpu - on_by_cpu,
        ),
    ]


# The module-program scenarios (bench.run.module_scenarios), for the program with aforward ("async")
# and the forward-only one ("sync"): through the service, driven by DSPy directly, run_program alone.
MODULE_KEYS = {
    program: {
        "service": f"module_{program}",
        "dspy": f"module_{program}_dspy",
        "alone": f"module_{program}_run_program",
    }
    for program in ("async", "sync")
}


def _module_ratios(results: BenchResults) -> list[Ratio]:
    def rps(key: str) -> float | None:
        found = results.find_top(key)
        return found.rps if found else None

    def cpu(key: str) -> float | None:
        found = results.find_top(key)
        return found.cpu_ms if found else None

    ran = [found for keys in MODULE_KEYS.values() for k in keys.values() if (found := results.find_top(k))]
    if not ran:
        return []
    where = f"req/s at {ran[0].connections} conns, provider 0 ms"
    service, dspy, sync = (
        MODULE_KEYS["async"]["service"],
        MODULE_KEYS["async"]["dspy"],
        MODULE_KEYS["sync"]["service"],
    )
    return [
        Ratio(
            f"module program (aforward): service / DSPy directly (acall), {where}",
            _divide(rps(service), rps(dspy)),
            0.85,
            True,
            by_cpu=_divide(cpu(dspy), cpu(service)),
        ),
        Ratio(
            f"module program, forward only / aforward, both through the service, {where}",
            _divide(rps(sync), rps(service)),
            0.7,
            True,
            by_cpu=_divide(cpu(service), cpu(sync)),
        ),
    ]


def _module_lines(results: BenchResults) -> list[str]:
    """The module programs' figures side by side, and where a module miss's CPU goes."""
    out = []
    redis_hit = results.find("redis_hit", 32)
    for program, how, pool in (("async", "acall", ""), ("sync", "asyncify", ", its program-thread pool")):
        keys = MODULE_KEYS[program]
        service, dspy, alone = (results.find_top(keys[k]) for k in ("service", "dspy", "alone"))
        parts = [
            f"{label} {found.rps:,.0f} req/s, {found.cpu_ms:.2f} ms CPU per run"
            for label, found in (
                ("through the service", service),
                (f"DSPy directly ({how})", dspy),
                ("run_program alone", alone),
            )
            if found is not None and found.rps is not None and found.cpu_ms is not None
        ]
        if not parts:
            continue
        flavour = "with aforward" if program == "async" else "with only forward"
        conns = next(f.connections for f in (service, dspy, alone) if f is not None)
        out.append(
            f"- Module program {flavour} (two Predict steps, two provider calls a run; provider 0 ms, "
            f"{conns} connections or concurrent tasks): " + "; ".join(parts) + "."
        )
        if service is None or service.cpu_ms is None or dspy is None or dspy.cpu_ms is None:
            continue
        miss, own = service.cpu_ms, dspy.cpu_ms
        line = (
            f"- Where a module miss's CPU goes ({flavour}): the service spends {miss:.2f} ms; the same "
            f"program driven by DSPy as its user calls it spends {own:.2f} ms ({100 * own / miss:.0f}% "
            f"of the miss), so the service adds {miss - own:.2f} ms."
        )
        if alone is not None and alone.cpu_ms is not None:
            path = alone.cpu_ms
            line += (
                f" Its own call of DSPy (run_program: a dspy.context per run, its adapter, usage "
                f"tracking{pool}) costs {path:.2f} ms alone ({path - own:+.2f} ms against DSPy's), and "
                f"serving it (HTTP, validation, cache look-ups and the Redis SET, cost accounting, "
                f"metrics, log line) the remaining {miss - path:.2f} ms"
            )
            if redis_hit is not None and redis_hit.cpu_ms is not None:
                line += f", of which a Redis hit's whole request path is {redis_hit.cpu_ms:.2f} ms"
            line += "."
        out.append(line)
    return out


def _num(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def _range(bounds: tuple[float, float] | None, digits: int = 0) -> str:
    if bounds is None:
        return ""
    return f" ({bounds[0]:,.{digits}f}-{bounds[1]:,.{digits}f})"


def render_markdown(results: BenchResults) -> str:
    lines = [
        "| scenario | conns | req/s median (min-max) | p50 ms (min-max) | p99 ms | server CPU ms/req "
        "| provider calls/req | Redis cmds/req | errors | RSS MB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in results.scenarios:
        if s.failure:
            lines.append(f"| {s.label} | {s.connections} | failed: {s.failure} | | | | | | | |")
            continue
        lines.append(
            f"| {s.label} | {s.connections} | {_num(s.rps, 0)}{_range(s.rps_range)} "
            f"| {_num(s.p50_ms, 2)}{_range(s.p50_range, 2)} | {_num(s.p99_ms, 2)} | {_num(s.cpu_ms, 3)} "
            f"| {_num(s.provider_calls, 2)} | {_num(s.redis_commands, 2)} "
            f"| {s.errors} of {s.requests:,} | {_num(s.rss_mb, 0)} |"
        )
    lines += [
        "",
        "Provider calls and Redis commands per request include the work for requests still in flight "
        "when wrk stopped (at most one per connection), and the once-a-second cost flush.",
        "",
        "| target | measured | target | met | same ratio from CPU/request |",
        "|---|---:|---:|---|---:|",
    ]
    for ratio in results.ratios():
        comparison = ">=" if ratio.higher_is_better else "<="
        met = {True: "yes", False: "**no**", None: "n/a"}[ratio.met]
        digits = 2 if ratio.unit in ("", " s", " ms") else 0
        lines.append(
            f"| {ratio.name} | {_num(ratio.value, digits)}{ratio.unit} "
            f"| {comparison} {ratio.target:g}{ratio.unit} | {met} "
            f"| {_num(ratio.by_cpu, 2) if ratio.by_cpu is not None else ''} |"
        )
    lines.append("")
    if results.startup_s:
        runs = ", ".join(f"{v:.2f}" for v in results.startup_s)
        lines.append(
            f"- Start-up, spawn to first 200 from /ready: "
            f"median {_num(results.startup_median_s, 2)} s ({runs})."
        )
    if results.idle_rss_mb is not None:
        lines.append(f"- Service resident memory when just ready (idle): {results.idle_rss_mb:.0f} MB.")
    lines += _dspy_lines(results)
    lines += _module_lines(results)
    lines += _workers_lines(results)
    lines += _noise_lines(results)
    lines += [f"- {note}" for note in results.notes]
    return "\n".join(lines) + "\n"


# A WORKERS=2 scenario's key and label: its one-worker scenario's, plus these (bench.run.two_workers_of).
TWO_WORKERS_SUFFIX = "_2w"
TWO_WORKERS_LABEL = ", WORKERS=2, both cores"


def _workers_lines(results: BenchResults) -> list[str]:
    """Each WORKERS=2 scenario ("<key>_2w") against its one-worker, one-core scenario ("<key>")."""
    parts, rss = [], []
    for two in results.scenarios:
        if not two.key.endswith(TWO_WORKERS_SUFFIX) or two.failure or two.rps is None:
            continue
        one = results.find(two.key.removesuffix(TWO_WORKERS_SUFFIX), two.connections)
        gain = _divide(two.rps, one.rps if one is not None else None)
        parts.append(
            f"{two.label.removesuffix(TWO_WORKERS_LABEL)} at {two.connections} conns "
            f"{two.rps:,.0f} req/s" + (f" ({gain:.2f}x one worker on one core)" if gain is not None else "")
        )
        if two.rss_mb is not None:
            rss.append(two.rss_mb)
    if not parts:
        return []
    line = (
        "- WORKERS=2, the service on both cores (the second shared with wrk, redis-server and the "
        "simulator): " + "; ".join(parts) + "."
    )
    if rss:
        line += f" Supervisor and two workers together: {max(rss):.0f} MB resident."
    return [line]


def _noise_lines(results: BenchResults) -> list[str]:
    shares = [
        s.foreign_cpu_share for r in results.scenarios for s in r.samples if s.foreign_cpu_share is not None
    ]
    if not shares:
        return []
    median, worst = statistics.median(shares), max(shares)
    line = (
        f"- Other processes (and the hypervisor) took {100 * median:.0f}% of the server's core during "
        f"the median run, {100 * worst:.0f}% at worst."
    )
    if median > 0.1:
        line += " **The machine was busy: absolute numbers are low and noisy; the ratios hold up better.**"
    return [line]


def _dspy_lines(results: BenchResults) -> list[str]:
    if not results.dspy:
        return []
    plain = results.dspy["plain"]["cpu_ms_median"]
    tracked = results.dspy["track_usage"]["cpu_ms_median"]
    wall = results.dspy["track_usage"].get("wall_ms_mean")
    service = results.dspy.get("run_program")  # absent in results from before the mode existed
    out = [
        f"- DSPy in isolation (`await Predict.acall()`, native engine as DSPy builds it, simulator at "
        f"0 ms): {plain:.2f} ms CPU per call; {tracked:.2f} ms with usage tracking"
        + (f", {wall:.2f} ms wall per call one after another." if wall else "."),
    ]
    if service is not None:
        tracked = service["cpu_ms_median"]  # what the service's own call of DSPy costs
        wall = service.get("wall_ms_mean")
        out.append(
            f"- The service's `programs.run_program` (its LM, usage tracking; no HTTP serving, cache, "
            f"metrics or logs): {tracked:.2f} ms CPU per call, {wall:.2f} ms wall per call."
        )
    miss_1, direct_1 = results.find("miss_0ms", 1), results.find("direct_0ms", 1)
    if wall and miss_1 and direct_1 and miss_1.p50_ms is not None and direct_1.p50_ms is not None:
        added = miss_1.p50_ms - direct_1.p50_ms
        out.append(
            f"- At 1 connection, provider 0 ms, a miss adds {added:.2f} ms to the provider's p50; DSPy's "
            f"call alone takes {wall - direct_1.p50_ms:.2f} ms of wall time beyond the provider's answer, "
            f"so about {added - (wall - direct_1.p50_ms):.2f} ms is ours."
        )
    miss, redis_hit = results.find("miss_0ms", 32), results.find("redis_hit", 32)
    if miss is not None and miss.cpu_ms is not None:
        line = (
            f"- A miss (provider 0 ms, 32 conns) costs the service {miss.cpu_ms:.2f} ms CPU; DSPy's call "
            f"path alone costs {tracked:.2f} ms in isolation ({100 * tracked / miss.cpu_ms:.0f}% of it)."
        )
        if redis_hit is not None and redis_hit.cpu_ms is not None:
            rest = miss.cpu_ms - tracked - redis_hit.cpu_ms
            line += (
                f" Our own request path (HTTP, validation, cache key, a Redis look-up, metrics, log line) "
                f"costs {redis_hit.cpu_ms:.2f} ms on a Redis hit; "
            )
            # The two figures come from different processes and runs: a remainder below zero means
            # the miss's extras are smaller than the spread of DSPy's cost, not that they are negative.
            line += (
                f"what remains, {rest:.2f} ms, is the miss's extras (task, Redis SET, cost accounting) "
                f"plus measurement noise."
                if rest >= 0
                else f"the miss's extras (task, Redis SET, cost accounting) are lost in the spread of "
                f"DSPy's cost (the remainder, {rest:.2f} ms, is below zero)."
            )
        out.append(line)
    return out
