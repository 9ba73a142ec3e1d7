"""PostgreSQL for the tests: the machine's own server on 127.0.0.1:5432 (trust auth, user
postgres), a fresh, uniquely named database for each user of `fresh_database`, dropped afterwards.

The server being down fails the tests that need it, with a message saying so; it never skips them.
Conftest-free: a test module makes its own fixture from `fresh_database`, e.g.

    @pytest.fixture
    def pg_url() -> Iterator[str]:
        with fresh_database("dspy_feedback") as url:
            yield url

`SilentServer` is a TCP server that accepts connections and never answers: a database that hangs.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket
import threading
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

import asyncpg  # type: ignore[import-untyped]  # asyncpg ships no type hints
import pytest

PG_HOST = "127.0.0.1"
PG_PORT = 5432
PG_USER = "postgres"
_CONNECT_TIMEOUT_SECS = 5.0

T = TypeVar("T")


def database_url(name: str, *, host: str = PG_HOST, port: int = PG_PORT) -> str:
    return f"postgresql://{PG_USER}@{host}:{port}/{name}"


def _run(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run `coroutine` to completion on an event loop of its own, in a thread of its own: callable
    from plain code and from inside a running loop (an async test) alike."""
    outcome: list[T] = []
    failure: list[BaseException] = []

    def target() -> None:
        try:
            outcome.append(asyncio.run(coroutine))
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=target, name="postgres-admin")
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return outcome[0]


async def _admin(*statements: str) -> None:
    connection = await asyncpg.connect(
        host=PG_HOST, port=PG_PORT, user=PG_USER, database="postgres", timeout=_CONNECT_TIMEOUT_SECS
    )
    try:
        for statement in statements:
            await connection.execute(statement)
    finally:
        await connection.close()


def admin(*statements: str) -> None:
    """Run statements on the server's `postgres` database (CREATE/DROP DATABASE)."""
    try:
        _run(_admin(*statements))
    except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
        pytest.fail(
            f"PostgreSQL at {PG_HOST}:{PG_PORT} (user {PG_USER}, trust auth) is needed by this test and "
            f"did not answer: {type(exc).__name__}: {exc}. Start it (`.ci/run` does) and run again.",
            pytrace=False,
        )


def create_database(prefix: str = "dspy_test") -> str:
    """A new empty database with a name no other run uses; its name."""
    name = f"{prefix}_{os.getpid()}_{secrets.token_hex(4)}"
    admin(f'CREATE DATABASE "{name}"')
    return name


def drop_database(name: str) -> None:
    admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextlib.contextmanager
def fresh_database(prefix: str = "dspy_test") -> Iterator[str]:
    """The URL (`postgresql://...`) of a new empty database, dropped on the way out."""
    name = create_database(prefix)
    try:
        yield database_url(name)
    finally:
        drop_database(name)


def database_of(url: str) -> str:
    return url.rsplit("/", 1)[1]


class SilentServer:
    """Accepts TCP connections on a loopback port and never sends a byte: a database that hangs."""

    def __init__(self) -> None:
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.bind((PG_HOST, 0))
        self._listener.listen(64)
        self.port = int(self._listener.getsockname()[1])
        self._accepted: list[socket.socket] = []
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="silent-server", daemon=True)

    @property
    def url(self) -> str:
        return database_url("silent", port=self.port)

    def start(self) -> SilentServer:
        self._thread.start()
        return self

    def _serve(self) -> None:
        self._listener.settimeout(0.1)
        while not self._stopped.is_set():
            try:
                connection, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self._accepted.append(connection)

    @property
    def connections(self) -> int:
        return len(self._accepted)

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join(timeout=5)
        self._listener.close()
        for connection in self._accepted:
            connection.close()
