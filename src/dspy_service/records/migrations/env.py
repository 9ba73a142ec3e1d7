"""Alembic's environment: runs the migrations on the connection `records.migrate` hands it."""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection, text

from dspy_service.records.schema import Base

# Any constant will do: it only has to be the same in every process migrating this database.
_MIGRATION_LOCK_KEY = 7_315_240_016


def _run(connection: Connection) -> None:
    context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
    with context.begin_transaction():
        if connection.dialect.name == "postgresql":
            # Replicas starting together: one migrates, the others wait here and then find the
            # version table at head. Released when the transaction ends.
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK_KEY})
        context.run_migrations()


_run(context.config.attributes["connection"])
