"""The records database: its URL turned into an async driver's, and the engine.

SQLite (aiosqlite) is the embedded default; PostgreSQL (asyncpg) is for production. Both are set up
to fail fast rather than hang: a stopped or unreachable database must cost the background writer a
bounded wait, never the request path (which never touches the database).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from dspy_service.errors import ServiceError

_ASYNC_DRIVERS = {
    "sqlite": "sqlite+aiosqlite",
    "postgresql": "postgresql+asyncpg",
    "postgres": "postgresql+asyncpg",
}


class RecordsUnavailable(ServiceError):
    """The records database could not be reached, or did not answer in time."""

    type = "records_unavailable"
    status = 503


def async_url(url: str) -> str:
    """`sqlite:///path` as `sqlite+aiosqlite:///path`, `postgresql://` and `postgres://` as
    `postgresql+asyncpg://`; a URL that already names a driver is kept as it is."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    return f"{_ASYNC_DRIVERS.get(scheme.lower(), scheme)}://{rest}"


def dialect_of(url: str) -> str:
    """`sqlite` or `postgresql` (the backend, whatever the driver)."""
    return make_url(async_url(url)).get_backend_name()


def sqlite_path(url: str) -> Path | None:
    """The file of a SQLite URL (None for another backend or an in-memory database)."""
    parsed = make_url(async_url(url))
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return Path(parsed.database)


def _json_dumps(value: Any) -> str:
    # orjson, as everywhere else in the service: faster, NaN/Infinity as null (PostgreSQL's JSON
    # refuses them), and values the stdlib cannot encode (a datetime in an output) as their text.
    return orjson.dumps(value, default=str, option=orjson.OPT_NON_STR_KEYS).decode()


def create_engine(
    url: str,
    *,
    connect_timeout_secs: float = 5.0,
    command_timeout_secs: float = 10.0,
    pool_size: int = 3,
    max_overflow: int = 2,
    pooled: bool = True,
) -> AsyncEngine:
    """The async engine for `url` (a plain `sqlite:///` or `postgresql://` URL is enough).

    SQLite: WAL (readers never wait for the writer), a busy timeout of `command_timeout_secs`
    (several worker processes share the file), foreign keys enforced; the file's directory is made.
    PostgreSQL: `connect_timeout_secs` bounds the whole connection set-up (a server that accepts and
    never answers included), `command_timeout_secs` each statement, and waiting for a pooled
    connection is bounded too; connections are checked before use so a restarted server costs no
    failed write.
    """
    full = async_url(url)
    backend = make_url(full).get_backend_name()
    options: dict[str, Any] = {"json_serializer": _json_dumps, "json_deserializer": orjson.loads}
    if not pooled:
        options["poolclass"] = NullPool
    if backend == "sqlite":
        path = sqlite_path(url)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
        options["connect_args"] = {"timeout": command_timeout_secs}
        engine = create_async_engine(full, **options)
        busy_ms = int(command_timeout_secs * 1000)

        @event.listens_for(engine.sync_engine, "connect")
        def _configure_sqlite(dbapi_connection: Any, _: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute(f"PRAGMA busy_timeout={busy_ms}")
            cursor.execute("PRAGMA foreign_keys=ON")
            # With WAL, NORMAL is safe from a process crash; a power cut may lose the last batches.
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.close()

        return engine
    if backend == "postgresql":
        options["connect_args"] = {"timeout": connect_timeout_secs, "command_timeout": command_timeout_secs}
        if pooled:
            # Small: one connection writes, the others serve feedback and reports; every worker
            # process of every replica has its own pool.
            options.update(
                pool_size=pool_size,
                max_overflow=max_overflow,
                pool_timeout=connect_timeout_secs,
                pool_pre_ping=True,
            )
    return create_async_engine(full, **options)
