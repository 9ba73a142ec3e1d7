"""The records tables: a receipt per prediction, the prediction log, and feedback.

A receipt's key is a surrogate id: request IDs come from clients too (`X-Request-ID`, a batch
item's `request_id`), so the same one can arrive twice (a retry) or from two tenants, and every
receipt is kept (its spend is real). Feedback names the receipt it was given on (the latest one of
that request ID and tenant when it was given), so statistics join it to exactly one variant.

Tables change only through the Alembic migrations in `migrations/versions/`; this module is what
they build, and a test checks the two agree.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

# SQLite makes a rowid alias (and so an automatic key) only of a column typed exactly INTEGER.
Id = BigInteger().with_variant(Integer(), "sqlite")
# JSON, not JSONB, on PostgreSQL too: stored as given (the order of a program's input fields
# survives into exports) and nothing queries inside it.
Json = JSON()


class UtcDateTime(TypeDecorator[datetime]):
    """Timestamps stored in UTC and read back as aware datetimes (SQLite keeps no time zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("timestamps must carry a time zone")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    type_annotation_map: ClassVar[dict[Any, Any]] = {dict[str, Any]: Json, datetime: UtcDateTime}


class ReceiptRow(Base):
    """One prediction (a batch item and a stream included), answered or failed."""

    __tablename__ = "receipts"

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    request_id: Mapped[str] = mapped_column(Text)
    tenant: Mapped[str | None] = mapped_column(Text)
    source: Mapped[str] = mapped_column(Text)  # predict, batch or stream
    model: Mapped[str] = mapped_column(Text)
    model_served: Mapped[str] = mapped_column(Text)
    variant: Mapped[str] = mapped_column(Text)
    fingerprint: Mapped[str | None] = mapped_column(Text)
    ok: Mapped[bool] = mapped_column(Boolean)
    error_type: Mapped[str | None] = mapped_column(Text)
    cache_level: Mapped[str | None] = mapped_column(Text)  # memory, redis, or null for a miss
    coalesced: Mapped[bool] = mapped_column(Boolean)
    input_tokens: Mapped[int] = mapped_column(Integer)
    output_tokens: Mapped[int] = mapped_column(Integer)
    cost_usd: Mapped[float | None] = mapped_column(Float)  # null: unpriced
    cost_saved_usd: Mapped[float | None] = mapped_column(Float)
    # public model -> {calls, input_tokens, output_tokens, cost_usd}: the spend of each model
    usage_by_model: Mapped[dict[str, Any]]
    unmetered_calls: Mapped[int] = mapped_column(Integer)
    latency_ms: Mapped[float] = mapped_column(Float)
    created_at: Mapped[datetime]

    __table_args__ = (
        Index("ix_receipts_request_id", "request_id"),
        Index("ix_receipts_created_at", "created_at"),
        Index("ix_receipts_variant_created_at", "variant", "created_at"),
    )


class PredictionRow(Base):
    """The prediction log: what a receipt's request asked and was answered."""

    __tablename__ = "predictions"

    receipt_id: Mapped[int] = mapped_column(
        Id, ForeignKey("receipts.id", ondelete="CASCADE"), primary_key=True
    )
    inputs: Mapped[dict[str, Any]]
    outputs: Mapped[dict[str, Any]]


class FeedbackRow(Base):
    """One metric's value for one receipt; given again, it replaces the earlier value."""

    __tablename__ = "feedback"

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    receipt_id: Mapped[int] = mapped_column(Id, ForeignKey("receipts.id", ondelete="CASCADE"))
    request_id: Mapped[str] = mapped_column(Text)
    tenant: Mapped[str | None] = mapped_column(Text)
    metric: Mapped[str] = mapped_column(Text)
    kind: Mapped[str] = mapped_column(Text)  # boolean, float or comment: how `value_*` is read
    value_num: Mapped[float | None] = mapped_column(Float)  # booleans as 0/1, floats
    value_text: Mapped[str | None] = mapped_column(Text)  # comments
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]

    __table_args__ = (
        UniqueConstraint("receipt_id", "metric", name="uq_feedback_receipt_metric"),
        Index("ix_feedback_metric", "metric"),
    )
