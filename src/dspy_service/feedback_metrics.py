"""The feedback metrics a models file declares (its `feedback:` section), and how one value given
for one of them is checked and stored. Free of the database layer, so that reading the models file
does not import SQLAlchemy; records/feedback.py keeps the values.

```yaml
feedback:
  metrics:
    helpful: {type: boolean}
    rating: {type: float, min: 1, max: 5}
    note: {type: comment}
```
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from dspy_service.errors import InvalidRequest

MetricType = Literal["boolean", "float", "comment"]
DEFAULT_COMMENT_CHARS = 4000
_METRIC_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_.\-]{0,63}$")


class UnknownMetric(InvalidRequest):
    type = "unknown_metric"


class InvalidFeedbackValue(InvalidRequest):
    type = "invalid_feedback_value"


class MetricSpec(BaseModel):
    """One metric: a boolean (stored as 0/1), a float within optional bounds, or a comment."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: MetricType
    min: float | None = None
    max: float | None = None
    max_length: int | None = Field(default=None, ge=1, le=100_000)

    @model_validator(mode="after")
    def _bounds_fit_the_type(self) -> MetricSpec:
        if self.type != "float" and (self.min is not None or self.max is not None):
            raise ValueError(f"min and max apply to float metrics only, not to a {self.type} metric")
        if self.type != "comment" and self.max_length is not None:
            raise ValueError(f"max_length applies to comment metrics only, not to a {self.type} metric")
        for name, bound in (("min", self.min), ("max", self.max)):
            if bound is not None and not math.isfinite(bound):
                raise ValueError(f"{name} must be a finite number")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min ({self.min:g}) is more than max ({self.max:g})")
        return self


@dataclass(frozen=True, slots=True, kw_only=True)
class FeedbackValue:
    kind: MetricType
    number: float | None = None  # booleans as 0/1, floats
    text: str | None = None  # comments


class FeedbackMetrics(BaseModel):
    """The models file's `feedback:` section."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    metrics: dict[str, MetricSpec] = Field(default_factory=dict)

    @field_validator("metrics")
    @classmethod
    def _names_are_plain(cls, metrics: dict[str, MetricSpec]) -> dict[str, MetricSpec]:
        for name in metrics:
            if not _METRIC_NAME.match(name):
                raise ValueError(
                    f"metric name {name!r} must start with a letter and hold only letters, digits, "
                    "'_', '.' or '-' (64 characters at most)"
                )
        return metrics

    def of_type(self, *types: MetricType) -> dict[str, MetricSpec]:
        return {name: spec for name, spec in self.metrics.items() if spec.type in types}

    def parse(self, metric: str, value: Any) -> FeedbackValue:
        """The value as stored; UnknownMetric or InvalidFeedbackValue (naming the problem) if it
        cannot be."""
        spec = self.metrics.get(metric)
        if spec is None:
            known = ", ".join(sorted(self.metrics)) or "none are configured"
            raise UnknownMetric(f"unknown feedback metric {metric!r} (known: {known})")
        if spec.type == "boolean":
            if not isinstance(value, bool):
                raise InvalidFeedbackValue(f"metric {metric!r} takes true or false, not {_shown(value)}")
            return FeedbackValue(kind="boolean", number=1.0 if value else 0.0)
        if spec.type == "float":
            return FeedbackValue(kind="float", number=_number(metric, spec, value))
        return FeedbackValue(kind="comment", text=_comment(metric, spec, value))


def _shown(value: Any) -> str:
    """The value as the client wrote it, in JSON (`null`, `"yes"`, `true`), cut short."""
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)  # orjson writes NaN and infinities as null
    try:
        text = orjson.dumps(value).decode()
    except TypeError:  # an integer beyond 64 bits, or a value that came from elsewhere than JSON
        text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _number(metric: str, spec: MetricSpec, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidFeedbackValue(f"metric {metric!r} takes a number, not {_shown(value)}")
    try:
        number = float(value)
    except OverflowError:  # an integer beyond any float
        number = math.inf
    if not math.isfinite(number):
        raise InvalidFeedbackValue(f"metric {metric!r} takes a finite number, not {_shown(value)}")
    low = -math.inf if spec.min is None else spec.min
    high = math.inf if spec.max is None else spec.max
    if not low <= number <= high:
        if spec.min is not None and spec.max is not None:
            allowed = f"from {spec.min:g} to {spec.max:g}"
        elif spec.min is not None:
            allowed = f"of at least {spec.min:g}"
        else:
            allowed = f"of at most {high:g}"
        raise InvalidFeedbackValue(f"metric {metric!r} takes a number {allowed}, not {number:g}")
    return number


def _comment(metric: str, spec: MetricSpec, value: Any) -> str:
    if not isinstance(value, str):
        raise InvalidFeedbackValue(f"metric {metric!r} takes a text, not {_shown(value)}")
    limit = spec.max_length or DEFAULT_COMMENT_CHARS
    if not value.strip():
        raise InvalidFeedbackValue(f"metric {metric!r} takes a text that is not empty")
    if len(value) > limit:
        raise InvalidFeedbackValue(f"metric {metric!r} takes a text of at most {limit} characters")
    if "\x00" in value:  # PostgreSQL's text cannot hold NUL
        raise InvalidFeedbackValue(f"metric {metric!r} takes a text without NUL characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidFeedbackValue(f"metric {metric!r} takes valid Unicode text") from None
    return value
