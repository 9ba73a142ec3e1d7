"""Alembic migrations of the records database (run by `records.migrate`, no alembic.ini needed)."""
