"""The sliding-window rate limiter, counted per process (no Redis), on a clock the test moves."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from dspy_service.metrics import Metrics
from dspy_service.ratelimit import RateLimiter
from dspy_service.redis_link import RedisLink
from dspy_service.settings import parse_rate_limit


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def hits(limiter: RateLimiter, identity: str, count: int) -> list[float | None]:
    return [await limiter.hit(identity) for _ in range(count)]


@pytest.mark.parametrize(
    ("text", "rule"),
    [
        ("100/minute", (100, 60)),
        (" 5 / Second ", (5, 1)),
        ("1000/hours", (1000, 3600)),
        ("10/day", (10, 86_400)),
        ("", None),
    ],
)
def test_rate_limit_settings_parse(text: str, rule: tuple[int, int] | None) -> None:
    """RATE_LIMIT reads as (requests, window seconds); empty means no limit."""
    assert parse_rate_limit(text) == rule


@pytest.mark.parametrize("text", ["100", "0/minute", "ten/minute", "5/fortnight", "-1/second"])
def test_bad_rate_limits_are_refused(text: str) -> None:
    """A RATE_LIMIT that does not parse stops start-up instead of silently not limiting."""
    with pytest.raises(ValueError, match="RATE_LIMIT"):
        parse_rate_limit(text)


async def test_the_limit_holds_per_identity() -> None:
    """`limit` requests pass, the next is refused; another identity has its own count."""
    limiter = RateLimiter(None, limit=3, period_secs=60, clock=Clock(6000.0))
    assert await hits(limiter, "tenant:a", 3) == [None, None, None]
    refused = await limiter.hit("tenant:a")
    assert refused is not None
    assert refused >= 1
    assert await limiter.hit("tenant:b") is None


async def test_the_window_slides() -> None:
    """Right after a window turns, the previous window's requests still count; they fade out."""
    clock = Clock(6000.0)  # the start of a 60 s window
    limiter = RateLimiter(None, limit=4, period_secs=60, clock=clock)
    assert await hits(limiter, "k", 4) == [None] * 4
    clock.now = 6060.0 + 6  # 10% into the next window: 4 * 0.9 + 1 = 4.6 > 4
    assert await limiter.hit("k") is not None
    clock.now = 6060.0 + 45  # 75% in: 4 * 0.25 + 2 (the refused one counts) = 3 <= 4
    assert await limiter.hit("k") is None
    clock.now = 6060.0 + 180  # two windows later nothing is remembered
    assert await hits(limiter, "k", 4) == [None] * 4


async def test_retry_after_says_when_a_request_would_fit() -> None:
    """Waiting Retry-After seconds (and sending nothing meanwhile) is enough to be let in."""
    clock = Clock(6000.0 + 30)
    limiter = RateLimiter(None, limit=2, period_secs=60, clock=clock)
    assert await hits(limiter, "k", 2) == [None, None]
    retry_after = await limiter.hit("k")
    assert retry_after is not None
    assert 30 <= retry_after <= 90
    clock.now += retry_after
    assert await limiter.hit("k") is None


async def test_without_a_connected_redis_it_counts_locally() -> None:
    """A configured but unreachable Redis falls back to per-process counting, never an error."""
    link = RedisLink(
        "redis://127.0.0.1:1/0", timeout=0.05, metrics=Metrics(CollectorRegistry()), redacted_url="x"
    )
    assert not link.connected
    limiter = RateLimiter(link, limit=2, period_secs=1, clock=Clock(100.0))
    first, second, third = await hits(limiter, "addr:10.0.0.1", 3)
    assert (first, second) == (None, None)
    assert third is not None
    await link.close()
