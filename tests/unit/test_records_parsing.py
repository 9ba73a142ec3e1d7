"""The records' inputs: the models file's `feedback:` section, feedback values, database URLs and
`--since` ages."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pydantic import ValidationError

from dspy_service.feedback_metrics import FeedbackMetrics, InvalidFeedbackValue, UnknownMetric
from dspy_service.records.database import async_url, dialect_of
from dspy_service.records.export import parse_since

ISSUE_EXAMPLE = {
    "metrics": {
        "helpful": {"type": "boolean"},
        "rating": {"type": "float", "min": 1, "max": 5},
        "note": {"type": "comment"},
    }
}


def metrics() -> FeedbackMetrics:
    return FeedbackMetrics.model_validate(ISSUE_EXAMPLE)


def test_the_issue_example_parses() -> None:
    """The section as the docs show it: three metrics of three types, bounds kept."""
    parsed = metrics()
    assert {name: spec.type for name, spec in parsed.metrics.items()} == {
        "helpful": "boolean",
        "rating": "float",
        "note": "comment",
    }
    assert (parsed.metrics["rating"].min, parsed.metrics["rating"].max) == (1.0, 5.0)


@pytest.mark.parametrize(
    ("section", "problem"),
    [
        ({"metrics": {"x": {"type": "stars"}}}, "'boolean', 'float' or 'comment'"),
        ({"metrics": {"x": {"type": "float", "min": 5, "max": 1}}}, "min (5) is more than max (1)"),
        ({"metrics": {"x": {"type": "boolean", "min": 0}}}, "min and max apply to float metrics only"),
        (
            {"metrics": {"x": {"type": "float", "max_length": 9}}},
            "max_length applies to comment metrics only",
        ),
        ({"metrics": {"x": {"type": "float", "max": "inf"}}}, "max must be a finite number"),
        ({"metrics": {"1st": {"type": "boolean"}}}, "metric name '1st' must start with a letter"),
        ({"metrics": {"x": {"type": "boolean", "weight": 2}}}, "weight"),
        ({"metric": {}}, "metric"),
    ],
)
def test_a_wrong_section_names_its_problem(section: dict[str, Any], problem: str) -> None:
    """Each mistake in the section is refused with a message that names it."""
    with pytest.raises(ValidationError) as caught:
        FeedbackMetrics.model_validate(section)
    assert problem in str(caught.value)


def test_values_are_stored_by_type() -> None:
    """true/false as 1/0, a number in range as itself (an int too), a comment as its text."""
    parsed = metrics()
    assert parsed.parse("helpful", True).number == 1.0
    assert parsed.parse("helpful", False).number == 0.0
    assert parsed.parse("rating", 4).number == 4.0
    assert parsed.parse("rating", 1.5).number == 1.5
    comment = parsed.parse("note", "clear and short")
    assert (comment.kind, comment.text, comment.number) == ("comment", "clear and short", None)


@pytest.mark.parametrize(
    ("metric", "value", "problem"),
    [
        ("helpful", 1, "metric 'helpful' takes true or false, not 1"),
        ("helpful", "yes", 'takes true or false, not "yes"'),
        ("rating", True, "metric 'rating' takes a number, not true"),
        ("rating", "4", 'takes a number, not "4"'),
        ("rating", 7, "metric 'rating' takes a number from 1 to 5, not 7"),
        ("rating", 0.5, "from 1 to 5, not 0.5"),
        ("rating", float("nan"), "takes a finite number"),
        ("note", 3, "metric 'note' takes a text, not 3"),
        ("note", "   ", "not empty"),
        ("note", "x" * 4001, "at most 4000 characters"),
        ("note", "a\x00b", "without NUL"),
        ("note", "\ud800", "valid Unicode"),
    ],
)
def test_a_value_of_the_wrong_type_or_range_is_refused(metric: str, value: Any, problem: str) -> None:
    """The error (a 422 `invalid_feedback_value`) says what the metric takes and what it got."""
    with pytest.raises(InvalidFeedbackValue) as caught:
        metrics().parse(metric, value)
    assert problem in caught.value.message
    assert (caught.value.type, caught.value.status) == ("invalid_feedback_value", 422)


def test_an_unknown_metric_lists_the_known_ones() -> None:
    """A 422 `unknown_metric` naming the metric asked for and the ones configured."""
    with pytest.raises(UnknownMetric) as caught:
        metrics().parse("stars", 5)
    assert caught.value.message == "unknown feedback metric 'stars' (known: helpful, note, rating)"
    with pytest.raises(UnknownMetric, match="none are configured"):
        FeedbackMetrics().parse("helpful", True)


def test_a_comment_limit_can_be_configured() -> None:
    """max_length bounds a comment metric's text."""
    parsed = FeedbackMetrics.model_validate({"metrics": {"why": {"type": "comment", "max_length": 5}}})
    assert parsed.parse("why", "short").text == "short"
    with pytest.raises(InvalidFeedbackValue, match="at most 5 characters"):
        parsed.parse("why", "longer")


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("sqlite:///data/records.db", "sqlite+aiosqlite:///data/records.db"),
        ("sqlite:////abs/records.db", "sqlite+aiosqlite:////abs/records.db"),
        ("postgresql://u:p@db:5432/records", "postgresql+asyncpg://u:p@db:5432/records"),
        ("postgres://db/records", "postgresql+asyncpg://db/records"),
        ("postgresql+asyncpg://db/records", "postgresql+asyncpg://db/records"),
        ("sqlite+aiosqlite:///x.db", "sqlite+aiosqlite:///x.db"),
        ("mysql+aiomysql://db/x", "mysql+aiomysql://db/x"),
    ],
)
def test_database_urls_get_their_async_driver(url: str, expected: str) -> None:
    """Plain URLs name the async driver; one that names a driver already is kept."""
    assert async_url(url) == expected


def test_the_backend_is_read_from_the_url() -> None:
    """postgres:// and postgresql:// are PostgreSQL, sqlite:/// SQLite."""
    assert dialect_of("postgres://db/x") == "postgresql"
    assert dialect_of("sqlite:///x.db") == "sqlite"


def test_since_takes_ages_and_dates() -> None:
    """7d, 12h, 30m, 2w back from now; an ISO date as UTC midnight; anything else refused."""
    now = datetime(2025, 3, 10, 12, 0, tzinfo=UTC)
    assert parse_since("7d", now) == now - timedelta(days=7)
    assert parse_since("12h", now) == now - timedelta(hours=12)
    assert parse_since("30m", now) == now - timedelta(minutes=30)
    assert parse_since("2w", now) == now - timedelta(weeks=2)
    assert parse_since("2025-03-01") == datetime(2025, 3, 1, tzinfo=UTC)
    assert parse_since("2025-03-01T08:00:00+01:00") == datetime(2025, 3, 1, 7, tzinfo=UTC)
    with pytest.raises(ValueError, match="neither an age"):
        parse_since("last week")
