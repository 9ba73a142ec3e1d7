"""Receipts, the prediction log and feedback in a real database (SQLite embedded, PostgreSQL in
production): what closes the DSPy loop (feedback, datasets, quality per variant) and keeps spend
durable beyond Redis. The prediction path only ever calls `RecordStore.submit` (a queue append)."""

from dspy_service.feedback_metrics import FeedbackMetrics, InvalidFeedbackValue, MetricSpec, UnknownMetric
from dspy_service.records.costs_rebuild import DaySpend, rebuild_cost_totals, spend_today
from dspy_service.records.database import RecordsUnavailable, async_url, create_engine
from dspy_service.records.entries import LoggedPrediction, Receipt
from dspy_service.records.export import export_jsonl, parse_since
from dspy_service.records.feedback import FeedbackOutcome, record_feedback
from dspy_service.records.migrate import current_revision, head_revision, run_db_upgrade, upgrade_to_head
from dspy_service.records.retention import Deleted, RetentionTask, delete_older_than
from dspy_service.records.stats import quality_by_variant
from dspy_service.records.store import RecordStore
from dspy_service.records.writer import KINDS, RecordWriter

__all__ = [
    "KINDS",
    "DaySpend",
    "Deleted",
    "FeedbackMetrics",
    "FeedbackOutcome",
    "InvalidFeedbackValue",
    "LoggedPrediction",
    "MetricSpec",
    "Receipt",
    "RecordStore",
    "RecordWriter",
    "RecordsUnavailable",
    "RetentionTask",
    "UnknownMetric",
    "async_url",
    "create_engine",
    "current_revision",
    "delete_older_than",
    "export_jsonl",
    "head_revision",
    "parse_since",
    "quality_by_variant",
    "rebuild_cost_totals",
    "record_feedback",
    "run_db_upgrade",
    "spend_today",
    "upgrade_to_head",
]
