"""Sampling the server under load with py-spy (optional, `--profile`) and summarising where time goes."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from bench.processes import pinned

_FRAME_RE = re.compile(r"^(?P<func>.*?) \((?P<file>[^():]*)(?::\d+)?\)$")
_SITE_PACKAGES_RE = re.compile(r"site-packages/([^/]+)")


def find_py_spy() -> str | None:
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


def start_py_spy(
    py_spy: str, pid: int, duration_s: int, out: Path, core: int | None
) -> subprocess.Popen[bytes]:
    """py-spy record in raw (collapsed-stack) form, without pausing the target."""
    return subprocess.Popen(
        pinned(
            [
                py_spy,
                "record",
                "--pid",
                str(pid),
                "--duration",
                str(duration_s),
                "--rate",
                "200",
                "--format",
                "raw",
                "--nonblocking",
                "--output",
                str(out),
            ],
            core,
        ),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def _package(file: str) -> str:
    found = _SITE_PACKAGES_RE.search(file)
    if found:
        return found.group(1).removesuffix(".py")
    if "/dspy_service/" in file:
        return "dspy_service"
    if "/bench/" in file:
        return "bench"
    if "/lib/python" in file:
        stem = file.rsplit("/lib/python", 1)[1].split("/", 2)
        return f"stdlib:{stem[1].removesuffix('.py')}" if len(stem) > 1 else "stdlib"
    return file or "?"


def _frame(raw: str) -> tuple[str, str]:
    """(function (short file), package) for one collapsed-stack frame."""
    found = _FRAME_RE.match(raw.strip())
    if not found:
        return raw.strip(), "?"
    func, file = found.group("func"), found.group("file")
    short = "/".join(file.split("/")[-2:])
    return f"{func} ({short})", _package(file)


def summarise(raw_file: Path, top: int = 15) -> dict[str, Any]:
    """Top functions by own and by inclusive samples, and own samples per package."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    packages: Counter[str] = Counter()
    total = 0
    for line in raw_file.read_text(encoding="utf-8", errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_frame(f) for f in stack.split(";") if f and not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        total += count
        name, package = frames[-1]
        own[name] += count
        packages[package] += count
        for seen in {f[0] for f in frames}:
            inclusive[seen] += count

    def share(counter: Counter[str], n: int) -> list[tuple[str, float]]:
        return [(k, round(100 * v / total, 1)) for k, v in counter.most_common(n)] if total else []

    return {
        "samples": total,
        "own_pct_by_package": share(packages, 12),
        "own_pct_top_functions": share(own, top),
        "inclusive_pct_top_functions": share(inclusive, top + 10),
    }


def render_summary(name: str, summary: dict[str, Any]) -> str:
    lines = [f"### Profile: {name} ({summary['samples']} samples)", "", "Own time by package:"]
    lines += [f"  {pct:5.1f}%  {pkg}" for pkg, pct in summary["own_pct_by_package"]]
    lines += ["", "Top functions, own time:"]
    lines += [f"  {pct:5.1f}%  {fn}" for fn, pct in summary["own_pct_top_functions"]]
    lines += ["", "Top functions, inclusive time:"]
    lines += [f"  {pct:5.1f}%  {fn}" for fn, pct in summary["inclusive_pct_top_functions"]]
    return "\n".join(lines) + "\n"
