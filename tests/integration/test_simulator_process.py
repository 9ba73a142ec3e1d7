"""The simulator as a process: it stops on SIGTERM even while it plays a provider that hangs."""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from pathlib import Path

import httpx

from tests.support.processes import Simulator


def test_a_hung_simulator_still_stops_on_sigterm(tmp_path: Path) -> None:
    """With a request pending on the `hang` knob, SIGTERM ends the simulator within seconds."""
    sim = Simulator(tmp_path / "sim.log")
    sim.start()
    try:
        sim.configure(hang=True)

        def pending() -> None:
            with contextlib.suppress(httpx.HTTPError):
                httpx.post(f"{sim.api_base}/chat/completions", json={"messages": []}, timeout=30)

        thread = threading.Thread(target=pending, daemon=True)
        thread.start()
        time.sleep(0.3)
        assert sim.process is not None
        started = time.monotonic()
        sim.process.send_signal(signal.SIGTERM)
        code = sim.process.wait(timeout=10)
        print(f"hung simulator stopped {time.monotonic() - started:.2f} s after SIGTERM (exit {code})")
        assert time.monotonic() - started < 5
    finally:
        sim.stop()
