"""Receipts, the prediction log and feedback.

Revision ID: 0001_records
Revises:
Created: issue 16
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

# The types spelled out here rather than imported from schema.py: a revision must keep building
# what it built, whatever the models become.
Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
Json = sa.JSON()

revision = "0001_records"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "receipts",
        sa.Column("id", Id, primary_key=True, autoincrement=True),
        sa.Column("request_id", sa.Text(), nullable=False),
        sa.Column("tenant", sa.Text(), nullable=True),
        sa.Column("source", sa.Text(), nullable=False),
        sa.Column("model", sa.Text(), nullable=False),
        sa.Column("model_served", sa.Text(), nullable=False),
        sa.Column("variant", sa.Text(), nullable=False),
        sa.Column("fingerprint", sa.Text(), nullable=True),
        sa.Column("ok", sa.Boolean(), nullable=False),
        sa.Column("error_type", sa.Text(), nullable=True),
        sa.Column("cache_level", sa.Text(), nullable=True),
        sa.Column("coalesced", sa.Boolean(), nullable=False),
        sa.Column("input_tokens", sa.Integer(), nullable=False),
        sa.Column("output_tokens", sa.Integer(), nullable=False),
        sa.Column("cost_usd", sa.Float(), nullable=True),
        sa.Column("cost_saved_usd", sa.Float(), nullable=True),
        sa.Column("usage_by_model", Json, nullable=False),
        sa.Column("unmetered_calls", sa.Integer(), nullable=False),
        sa.Column("latency_ms", sa.Float(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_receipts_request_id", "receipts", ["request_id"])
    op.create_index("ix_receipts_created_at", "receipts", ["created_at"])
    op.create_index("ix_receipts_variant_created_at", "receipts", ["variant", "created_at"])
    op.create_table(
        "predictions",
        sa.Column("receipt_id", Id, sa.ForeignKey("receipts.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("inputs", Json, nullable=False),
        sa.Column("outputs", Json, nullable=False),
    )
    op.create_table(
        "feedback",
        sa.Column("id", Id, primary_key=True, autoincrement=True),
        sa.Column("receipt_id", Id, sa.ForeignKey("receipts.id", ondelete="CASCADE"), nullable=False),
        sa.Column("request_id", sa.Text(), nullable=False),
        sa.Column("tenant", sa.Text(), nullable=True),
        sa.Column("metric", sa.Text(), nullable=False),
        sa.Column("kind", sa.Text(), nullable=False),
        sa.Column("value_num", sa.Float(), nullable=True),
        sa.Column("value_text", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("receipt_id", "metric", name="uq_feedback_receipt_metric"),
    )
    op.create_index("ix_feedback_metric", "feedback", ["metric"])


def downgrade() -> None:
    op.drop_table("feedback")
    op.drop_table("predictions")
    op.drop_table("receipts")
