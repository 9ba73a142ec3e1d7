"""Schema migrations, run from the installed package (no alembic.ini): at start-up, and by
`dspy-service db upgrade`.

Several processes may migrate one database at once (replicas, `WORKERS=N`): on PostgreSQL an
advisory lock taken in env.py serialises them, on SQLite a lock file beside the database does; the
second one finds the schema at head and does nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from dspy_service.records.database import async_url, create_engine, sqlite_path
from dspy_service.settings import redact_url

SCRIPT_LOCATION = "dspy_service.records:migrations"

# Alembic keeps the running migration in module globals (alembic.context, alembic.op): one at a
# time in a process. Between processes the database's own lock serialises them (see above).
_IN_PROCESS = threading.Lock()


def _config() -> Config:
    config = Config()
    config.set_main_option("script_location", SCRIPT_LOCATION)
    return config


def head_revision() -> str:
    """The newest revision this package ships."""
    head = ScriptDirectory.from_config(_config()).get_current_head()
    assert head is not None, "the package ships no migrations"
    return head


@contextlib.contextmanager
def _sqlite_lock(url: str) -> Iterator[None]:
    path = sqlite_path(url)
    if path is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with Path(f"{path}.migrate-lock").open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # blocking: this runs in a thread of its own, or a CLI
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


async def _upgrade(url: str, config: Config, connect_timeout_secs: float) -> str | None:
    engine = create_engine(url, pooled=False, connect_timeout_secs=connect_timeout_secs)

    def upgrade(connection: Connection) -> str | None:
        config.attributes["connection"] = connection
        command.upgrade(config, "head")
        return MigrationContext.configure(connection).get_current_revision()

    try:
        async with engine.begin() as connection:
            return await connection.run_sync(upgrade)
    finally:
        await engine.dispose()


def upgrade_to_head(url: str, *, connect_timeout_secs: float = 5.0) -> str | None:
    """Bring the database at `url` to the newest schema (creating it from nothing) and return its
    revision. Blocking: from async code, run it in a thread (`asyncio.to_thread`)."""
    # Alembic's own INFO lines ("setup plugin", "Context impl") are noise in the service's log; its
    # warnings and errors still show.
    logging.getLogger("alembic").setLevel(logging.WARNING)
    with _IN_PROCESS, _sqlite_lock(url):
        return asyncio.run(_upgrade(url, _config(), connect_timeout_secs))


async def _current(url: str) -> str | None:
    engine = create_engine(url, pooled=False)
    try:
        async with engine.connect() as connection:
            return await connection.run_sync(
                lambda sync: MigrationContext.configure(sync).get_current_revision()
            )
    finally:
        await engine.dispose()


def current_revision(url: str) -> str | None:
    """The database's schema revision (None: never migrated). Blocking, as upgrade_to_head."""
    return asyncio.run(_current(url))


MIGRATION_ERRORS = (SQLAlchemyError, OSError, TimeoutError)


def describe_failure(url: str, exc: BaseException) -> str:
    """Why migrating `url` failed, in one line, with the URL's password nowhere in it."""
    lines = str(exc).splitlines()
    detail = lines[0] if lines and lines[0] else type(exc).__name__
    password = make_url(async_url(url)).password
    if password:
        detail = detail.replace(str(password), "***")
    return f"cannot migrate {redact_url(url)}: {detail}"


def run_db_upgrade(url: str, *, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    """`dspy-service db upgrade`: migrate, say where to, and exit 0; or say why not and exit 1
    (the URL shown with its password redacted)."""
    try:
        revision = upgrade_to_head(url)
    except MIGRATION_ERRORS as exc:
        print(f"dspy-service: {describe_failure(url, exc)}", file=err)
        return 1
    print(f"{redact_url(url)}: schema at revision {revision} (head)", file=out)
    return 0
