"""The circuit breaker's state machine, driven by a fake clock."""

from __future__ import annotations

from dspy_service.breaker import BreakerState, CircuitBreaker


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def state_of(breaker: CircuitBreaker) -> str:
    """The state, read fresh (a plain str so each read is its own value to the type checker)."""
    return breaker.state


def make(
    clock: FakeClock, **overrides: int
) -> tuple[CircuitBreaker, list[tuple[BreakerState, BreakerState]]]:
    changes: list[tuple[BreakerState, BreakerState]] = []
    breaker = CircuitBreaker(
        "m",
        failure_threshold=overrides.get("failures", 3),
        success_threshold=overrides.get("successes", 2),
        open_secs=10,
        half_open_max_calls=overrides.get("trials", 1),
        clock=clock,
        on_change=lambda _, old, new: changes.append((old, new)),
    )
    return breaker, changes


def test_opens_after_consecutive_failures_only() -> None:
    """A success in between resets the count; the threshold of consecutive failures opens it."""
    breaker, changes = make(FakeClock())
    for _ in range(2):
        assert breaker.try_acquire()
        breaker.record_failure()
    breaker.record_success()
    for _ in range(2):
        breaker.record_failure()
    assert state_of(breaker) == "closed"
    breaker.record_failure()
    assert state_of(breaker) == "open"
    assert changes == [("closed", "open")]
    assert not breaker.try_acquire()


def test_half_open_after_timeout_with_bounded_trials() -> None:
    """After the open time one trial at a time is let through; the rest are refused as if open."""
    clock = FakeClock()
    breaker, _ = make(clock, failures=1)
    breaker.record_failure()
    assert breaker.retry_after() == 10
    clock.now += 9.5
    assert not breaker.try_acquire()
    assert breaker.retry_after() == 0.5
    clock.now += 0.5
    assert state_of(breaker) == "half_open"
    assert breaker.try_acquire()
    assert not breaker.try_acquire()


def test_closes_after_success_threshold_in_half_open() -> None:
    """Two trial successes close it again."""
    clock = FakeClock()
    breaker, changes = make(clock, failures=1)
    breaker.record_failure()
    clock.now += 10
    assert breaker.try_acquire()
    breaker.record_success()
    assert state_of(breaker) == "half_open"
    assert breaker.try_acquire()
    breaker.record_success()
    assert state_of(breaker) == "closed"
    assert changes == [("closed", "open"), ("open", "half_open"), ("half_open", "closed")]


def test_trial_failure_reopens_for_a_full_period() -> None:
    """A failing trial opens it again, and the open time starts anew."""
    clock = FakeClock()
    breaker, _ = make(clock, failures=1)
    breaker.record_failure()
    clock.now += 10
    assert breaker.try_acquire()
    breaker.record_failure()
    assert state_of(breaker) == "open"
    assert breaker.retry_after() == 10


def test_neutral_outcome_frees_the_trial_slot() -> None:
    """A trial that ends without a verdict (bad request, cancelled) lets the next trial in."""
    clock = FakeClock()
    breaker, _ = make(clock, failures=1)
    breaker.record_failure()
    clock.now += 10
    assert breaker.try_acquire()
    assert not breaker.try_acquire()
    breaker.record_neutral()
    assert breaker.try_acquire()
