"""A circuit breaker per model: closed, open, half-open, with an injectable clock.

Hand-written because the libraries on offer (pybreaker, aiobreaker) either block the event loop,
lack a bounded half-open trial count, or cannot report a `Retry-After`; this is about 100 lines.

- closed: calls pass; `failure_threshold` consecutive counted failures open it.
- open: calls are refused at once until `open_secs` have passed, then it turns half-open.
- half-open: at most `half_open_max_calls` trial calls at a time; the rest are refused as if open.
  `success_threshold` trial successes close it; one trial failure opens it again.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Literal

BreakerState = Literal["closed", "open", "half_open"]


class CircuitBreaker:
    def __init__(
        self,
        name: str,
        *,
        failure_threshold: int,
        success_threshold: int,
        open_secs: float,
        half_open_max_calls: int = 1,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[str, BreakerState, BreakerState], None] | None = None,
    ) -> None:
        self.name = name
        self._failure_threshold = failure_threshold
        self._success_threshold = success_threshold
        self._open_secs = open_secs
        self._half_open_max = half_open_max_calls
        self._clock = clock
        self._on_change = on_change
        self._state: BreakerState = "closed"
        self._failures = 0
        self._successes = 0
        self._trials_in_flight = 0
        self._opened_at = 0.0

    @property
    def state(self) -> BreakerState:
        if self._state == "open" and self._clock() - self._opened_at >= self._open_secs:
            self._move("half_open")
        return self._state

    def retry_after(self) -> float:
        """Seconds until an open breaker lets a trial through (0 when it would now)."""
        if self.state != "open":
            return 0.0
        return max(0.0, self._open_secs - (self._clock() - self._opened_at))

    def try_acquire(self) -> bool:
        """May a call go to the provider now? A True in half-open takes a trial slot."""
        state = self.state
        if state == "closed":
            return True
        if state == "half_open" and self._trials_in_flight < self._half_open_max:
            self._trials_in_flight += 1
            return True
        return False

    def record_success(self) -> None:
        if self._state == "half_open":
            self._trials_in_flight = max(0, self._trials_in_flight - 1)
            self._successes += 1
            if self._successes >= self._success_threshold:
                self._move("closed")
        else:
            self._failures = 0

    def record_failure(self) -> None:
        if self._state == "half_open":
            self._trials_in_flight = max(0, self._trials_in_flight - 1)
            self._open()
        elif self._state == "closed":
            self._failures += 1
            if self._failures >= self._failure_threshold:
                self._open()

    def record_neutral(self) -> None:
        """The call ended in a way that says nothing of the provider's health (e.g. a bad request)."""
        if self._state == "half_open":
            self._trials_in_flight = max(0, self._trials_in_flight - 1)

    def _open(self) -> None:
        self._opened_at = self._clock()
        self._move("open")

    def _move(self, new: BreakerState) -> None:
        old = self._state
        self._state = new
        self._failures = 0
        self._successes = 0
        if new != "half_open":
            self._trials_in_flight = 0
        if old != new and self._on_change is not None:
            self._on_change(self.name, old, new)
