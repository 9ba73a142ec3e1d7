"""The feedback statistics' intervals against hand computations and published figures: Wilson,
Newcombe's hybrid score, Student's t (quantile and interval) and Welch's t."""

from __future__ import annotations

import math
import statistics

import pytest

from dspy_service.records.intervals import (
    Z95,
    newcombe_difference,
    t_cdf,
    t_interval,
    t_quantile,
    welch_difference,
    wilson_interval,
)


def test_wilson_for_8_of_10_matches_the_published_interval() -> None:
    """8/10: Wilson's 95% interval is (0.4902, 0.9433) (Newcombe 1998, Table I; Wikipedia), and the
    score formula written out by hand gives the same to 1e-12."""
    n, p, z = 10, 0.8, Z95
    centre = (p + z**2 / (2 * n)) / (1 + z**2 / n)
    half = z / (1 + z**2 / n) * math.sqrt(p * (1 - p) / n + z**2 / (4 * n**2))
    interval = wilson_interval(8, 10)
    assert interval.low == pytest.approx(centre - half, abs=1e-12)
    assert interval.high == pytest.approx(centre + half, abs=1e-12)
    assert (round(interval.low, 4), round(interval.high, 4)) == (0.4902, 0.9433)


def test_wilson_stays_inside_zero_and_one_at_the_edges() -> None:
    """0/10 and 10/10: the interval touches 0 (resp. 1) and is not degenerate, unlike Wald's."""
    none, every = wilson_interval(0, 10), wilson_interval(10, 10)
    assert none.low == 0.0
    assert none.high == pytest.approx(Z95**2 / (10 + Z95**2), abs=1e-12)  # (z²/n)/(1+z²/n)
    assert every.high == 1.0
    assert every.low == pytest.approx(1 - none.high, abs=1e-12)


@pytest.mark.parametrize(
    ("x1", "n1", "x2", "n2", "low", "high"),
    [
        (56, 70, 48, 80, 0.0524, 0.3339),  # Newcombe 1998, Table II, example (a), method 10
        (9, 10, 3, 10, 0.1705, 0.8090),  # example (b)
        (5, 56, 0, 29, -0.0381, 0.1926),  # example (d)
    ],
)
def test_newcombe_hybrid_score_matches_the_paper(
    x1: int, n1: int, x2: int, n2: int, low: float, high: float
) -> None:
    """The difference of two proportions' interval equals Newcombe's published figures."""
    difference = newcombe_difference(x1, n1, x2, n2)
    assert difference.estimate == pytest.approx(x1 / n1 - x2 / n2)
    assert (round(difference.interval.low, 4), round(difference.interval.high, 4)) == (low, high)


def test_newcombe_is_built_from_the_two_wilson_intervals() -> None:
    """d - sqrt((p1-l1)² + (u2-p2)²), d + sqrt((u1-p1)² + (p2-l2)²), by hand, for 8/10 vs 5/10."""
    p1, p2 = 0.8, 0.5
    w1, w2 = wilson_interval(8, 10), wilson_interval(5, 10)
    low = (p1 - p2) - math.sqrt((p1 - w1.low) ** 2 + (w2.high - p2) ** 2)
    high = (p1 - p2) + math.sqrt((w1.high - p1) ** 2 + (p2 - w2.low) ** 2)
    difference = newcombe_difference(8, 10, 5, 10)
    assert difference.interval.low == pytest.approx(low, abs=1e-12)
    assert difference.interval.high == pytest.approx(high, abs=1e-12)
    assert not difference.interval.excludes_zero  # 0.3 on ten answers each is not conclusive


def test_t_quantile_matches_the_closed_forms() -> None:
    """Student's t has closed-form quantiles for 1, 2 and 4 degrees of freedom."""
    p = 0.975
    assert t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-10)
    assert t_quantile(p, 2) == pytest.approx((2 * p - 1) / math.sqrt(2 * p * (1 - p)), rel=1e-10)
    alpha = 4 * p * (1 - p)
    theta = math.acos(math.sqrt(alpha))
    assert t_quantile(p, 4) == pytest.approx(
        2 * math.sqrt(math.cos(theta / 3) / math.sqrt(alpha) - 1), rel=1e-10
    )


@pytest.mark.parametrize(
    ("df", "expected"),
    [(3, 3.182446), (9, 2.262157), (10, 2.228139), (30, 2.042272), (120, 1.979930), (1_000_000, 1.959966)],
)
def test_t_quantile_matches_the_tables(df: float, expected: float) -> None:
    """t(0.975, df) as printed in the usual tables (six decimals)."""
    assert t_quantile(0.975, df) == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("df", [0.7, 2.5, 9.9047, 24.9885])
def test_t_quantile_for_fractional_df_inverts_the_density(df: float) -> None:
    """For the fractional df of Welch's test, the t density integrated (Simpson's rule, by hand)
    from 0 to the 0.975 quantile holds 0.475 of the mass."""
    q = t_quantile(0.975, df)
    norm = math.gamma((df + 1) / 2) / (math.sqrt(df * math.pi) * math.gamma(df / 2))

    def density(t: float) -> float:
        return float(norm * (1 + t * t / df) ** (-(df + 1) / 2))

    steps = 20_000
    h = q / steps
    area = density(0) + density(q) + sum((4 if i % 2 else 2) * density(i * h) for i in range(1, steps))
    assert area * h / 3 == pytest.approx(0.475, abs=1e-9)
    assert t_cdf(-q, df) == pytest.approx(0.025, abs=1e-12)
    assert t_quantile(0.025, df) == -q


def test_t_interval_for_a_mean_by_hand() -> None:
    """Ratings 4, 5, 3, 4, 5, 2, 4, 4, 5, 3: mean 3.9, s = sqrt(0.9888...), t(0.975, 9) = 2.262157."""
    ratings = [4, 5, 3, 4, 5, 2, 4, 4, 5, 3]
    mean, s = statistics.mean(ratings), statistics.stdev(ratings)
    assert mean == 3.9
    interval = t_interval(len(ratings), mean, s * s)
    assert interval is not None
    half = 2.262157 * s / math.sqrt(10)
    assert interval.low == pytest.approx(mean - half, abs=1e-5)
    assert interval.high == pytest.approx(mean + half, abs=1e-5)
    assert t_interval(1, 5.0, 0.0) is None  # one rating: no interval


def test_welch_matches_the_worked_examples() -> None:
    """Wikipedia's Welch's t-test examples: t = -2.46 with df = 24.9 (15 and 15 values) and
    t = -1.57 with df = 9.9 (10 and 20 values); the interval excludes 0 exactly when |t| > t(0.975, df)."""
    a1 = [27.5, 21.0, 19.0, 23.6, 17.0, 17.9, 16.9, 20.1, 21.9, 22.6, 23.1, 19.6, 19.0, 21.7, 21.4]
    b1 = [27.1, 22.0, 20.8, 23.4, 23.4, 23.5, 25.8, 22.0, 24.8, 20.2, 21.9, 22.1, 22.9, 20.5, 24.4]
    a2 = [17.2, 20.9, 22.6, 18.1, 21.7, 21.4, 23.5, 24.2, 14.7, 21.8]
    b2 = [21.5, 22.8, 21.0, 23.0, 21.6, 23.6, 22.5, 20.7, 23.4, 21.8]
    b2 += [20.7, 21.7, 21.5, 22.5, 23.6, 21.5, 22.5, 23.5, 21.5, 21.8]
    for a, b, t_published, df_published, excludes in (
        (a1, b1, -2.46, 24.9, True),
        (a2, b2, -1.57, 9.9, False),
    ):
        va, vb = statistics.variance(a), statistics.variance(b)
        difference = welch_difference(len(a), statistics.mean(a), va, len(b), statistics.mean(b), vb)
        assert difference is not None
        assert difference.df is not None
        se = math.sqrt(va / len(a) + vb / len(b))
        assert round(difference.estimate / se, 2) == t_published
        assert math.floor(difference.df * 10) / 10 == df_published
        half = t_quantile(0.975, difference.df) * se
        assert difference.interval.low == pytest.approx(difference.estimate - half)
        assert difference.interval.excludes_zero is excludes


def test_welch_needs_two_values_and_some_spread() -> None:
    """No interval from one value a side, nor when neither side varies."""
    assert welch_difference(1, 4.0, 0.0, 10, 3.0, 1.0) is None
    assert welch_difference(5, 4.0, 0.0, 5, 3.0, 0.0) is None


def test_t_quantile_refuses_what_is_not_a_probability() -> None:
    """p outside (0, 1) or df <= 0: a ValueError, not a wrong number."""
    for p, df, problem in (
        (0.0, 5.0, "p must be"),
        (1.0, 5.0, "p must be"),
        (0.5, 0.0, "degrees of freedom"),
    ):
        with pytest.raises(ValueError, match=problem):
            t_quantile(p, df)
