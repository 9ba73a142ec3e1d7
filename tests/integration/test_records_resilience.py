"""The records database in trouble, seen from the service over real HTTP: PostgreSQL stopped mid-run
(predictions unaffected and not slowed, what cannot be kept dropped and counted, receipts written
again once it is back), PostgreSQL down at start-up (the service starts and serves, says
`records.unavailable`, migrates once it answers and writes what was queued), retention run by the
service's own periodic task, and the database's password kept out of logs, /config and /metrics.

PostgreSQL here is a server of this module's own (initdb and pg_ctl in a temporary directory, on a
free port, run as the `postgres` user, which they insist on), so that stopping it touches nothing
else; it asks for passwords over TCP (scram-sha-256), so the service's DATABASE_URL carries a real
one.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg  # type: ignore[import-untyped]  # asyncpg ships no type hints
import httpx
import pytest
from sqlalchemy import func, select

from dspy_service.records import FeedbackMetrics, LoggedPrediction, Receipt, RecordStore, create_engine
from dspy_service.records.schema import FeedbackRow, PredictionRow, ReceiptRow
from tests.integration.conftest import ServiceFactory
from tests.support.metrics_text import sample_value
from tests.support.processes import LOOPBACK, Simulator, free_port, wait_until

PG_BINARIES = sorted(Path("/usr/lib/postgresql").glob("*/bin"))
USER, PASSWORD = "dspy", f"pw-{secrets.token_hex(8)}-never-log-me"


class OwnPostgres:
    """A PostgreSQL server in a temporary directory on a free loopback port: local connections
    trusted (for nothing here), TCP ones with a password."""

    def __init__(self) -> None:
        if not PG_BINARIES or shutil.which("runuser") is None:
            pytest.fail(
                "these tests start their own PostgreSQL: install postgresql (initdb, pg_ctl) and runuser"
            )
        self.bin = PG_BINARIES[-1]
        self.root = Path(tempfile.mkdtemp(prefix="dspy-pg-", dir="/tmp"))
        owner = pwd.getpwnam("postgres")
        os.chown(self.root, owner.pw_uid, owner.pw_gid)
        self.data = self.root / "data"
        self.port = free_port()
        self.admin_password = secrets.token_hex(12)
        self.running = False
        pwfile = self.root / "pwfile"
        pwfile.write_text(self.admin_password + "\n")
        os.chown(pwfile, owner.pw_uid, owner.pw_gid)
        self._run(
            "initdb",
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
            f"--pwfile={pwfile}",
        )

    def _run(self, tool: str, *args: str) -> None:
        done = subprocess.run(
            ["runuser", "-u", "postgres", "--", str(self.bin / tool), *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"{tool} failed ({done.returncode}): {done.stdout}\n{done.stderr}")

    def start(self) -> None:
        options = f"-p {self.port} -k {self.root} -c listen_addresses={LOOPBACK} -c fsync=off"
        self._run(
            "pg_ctl",
            "-D",
            str(self.data),
            "-l",
            str(self.root / "log"),
            "-w",
            "-t",
            "30",
            "-o",
            options,
            "start",
        )
        self.running = True

    def stop(self) -> None:
        """As abruptly as a crash: no checkpoint, every connection cut."""
        self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        self.running = False

    def url(self, database: str, password: str = PASSWORD) -> str:
        return f"postgresql://{USER}:{password}@{LOOPBACK}:{self.port}/{database}"

    def admin(self, *statements: str) -> None:
        async def run() -> None:
            connection = await asyncpg.connect(
                host=LOOPBACK,
                port=self.port,
                user="postgres",
                password=self.admin_password,
                database="postgres",
            )
            try:
                for statement in statements:
                    await connection.execute(statement)
            finally:
                await connection.close()

        asyncio.run(run())

    def new_database(self) -> str:
        name = f"records_{secrets.token_hex(4)}"
        self.admin(f'CREATE DATABASE "{name}" OWNER {USER}')
        return name

    def destroy(self) -> None:
        if self.running:
            with contextlib.suppress(RuntimeError):
                self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="module")
def own_postgres() -> Iterator[OwnPostgres]:
    server = OwnPostgres()
    try:
        server.start()
        server.admin(f"CREATE ROLE {USER} LOGIN PASSWORD '{PASSWORD}'")
        yield server
    finally:
        server.destroy()


@pytest.fixture
def postgres(own_postgres: OwnPostgres) -> OwnPostgres:
    """The module's server, running (a test before may have left it stopped)."""
    if not own_postgres.running:
        own_postgres.start()
    return own_postgres


def query(url: str, statement: Any) -> Any:
    """One scalar from the records database, through the service's own engine settings."""

    async def run() -> Any:
        engine = create_engine(url)
        try:
            async with engine.connect() as connection:
                return (await connection.execute(statement)).scalar_one()
        finally:
            await engine.dispose()

    return asyncio.run(run())


def count_receipts(url: str, prefix: str = "") -> int:
    statement = select(func.count()).select_from(ReceiptRow)
    if prefix:
        statement = statement.where(ReceiptRow.request_id.startswith(prefix))
    return int(query(url, statement))


def predict(service: Any, request_id: str) -> tuple[httpx.Response, float]:
    started = time.perf_counter()
    answer = service.http.post(
        "/v1/predict", json={"model": "gpt-4", "input": f"question {request_id}", "request_id": request_id}
    )
    return answer, time.perf_counter() - started


def dropped(service: Any, kind: str) -> float:
    return sample_value(service.http.get("/metrics").text, "dspy_records_dropped_total", kind=kind)


def events(service: Any, name: str) -> list[dict[str, Any]]:
    return [line for line in service.log_lines() if line.get("event") == name]


def test_postgres_stopped_mid_run_costs_records_not_predictions(
    service_factory: ServiceFactory, sim: Simulator, postgres: OwnPostgres
) -> None:
    """PostgreSQL killed under a serving service: every prediction still answers 200, none waits on
    the database; once the small queue is full receipts and logged predictions are dropped and
    counted; when PostgreSQL is back new receipts are written, and every prediction is either
    written or counted as dropped."""
    url = postgres.url(postgres.new_database())
    service = service_factory(
        FEEDBACK_ENABLED="true", PREDICTION_LOG="all", DATABASE_URL=url, RECORDS_QUEUE_SIZE="20"
    )
    run = uuid.uuid4().hex[:8]
    for n in range(10):
        assert predict(service, f"{run}-before-{n}")[0].status_code == 200
    wait_until(lambda: count_receipts(url) == 10, timeout=10, what="the first receipts written")

    postgres.stop()
    slowest = 0.0
    for n in range(60):
        answer, took = predict(service, f"{run}-down-{n}")
        assert answer.status_code == 200, answer.text
        slowest = max(slowest, took)
    # The database's connect timeout is 5 s: a request that waited on it would show.
    assert slowest < 1.0, f"a prediction took {slowest:.2f} s with the database down"
    wait_until(lambda: dropped(service, "receipt") >= 20, timeout=10, what="receipts dropped and counted")
    assert dropped(service, "prediction") >= 20  # the prediction log's entries too
    wait_until(lambda: events(service, "records.write_failed"), timeout=10, what="records.write_failed")

    postgres.start()
    wait_until(lambda: events(service, "records.write_recovered"), timeout=20, what="records.write_recovered")
    # Nothing lost silently: each prediction so far was written or counted as dropped.
    wait_until(
        lambda: count_receipts(url) + dropped(service, "receipt") == 70,
        timeout=10,
        what="written + dropped to account for every prediction",
    )
    for n in range(10):
        assert predict(service, f"{run}-after-{n}")[0].status_code == 200
    wait_until(lambda: count_receipts(url, f"{run}-after-") == 10, timeout=10, what="receipts written again")
    assert count_receipts(url) + dropped(service, "receipt") == 80
    assert count_receipts(url, f"{run}-before-") == 10


def test_postgres_down_at_start_up_then_up(
    service_factory: ServiceFactory, sim: Simulator, postgres: OwnPostgres
) -> None:
    """The service starts and serves without its database, says `records.unavailable` (the URL's
    password redacted), migrates once the database answers and writes the receipts it queued
    meanwhile. A wrong password is the same kind of failure, and neither password is ever shown:
    not in the log, /config or /metrics."""
    database = postgres.new_database()
    url, wrong = postgres.url(database), postgres.url(database, password="wrong-" + PASSWORD)
    postgres.stop()
    service = service_factory("right", FEEDBACK_ENABLED="true", DATABASE_URL=url)
    refused = service_factory("wrong", FEEDBACK_ENABLED="true", DATABASE_URL=wrong)
    run = uuid.uuid4().hex[:8]
    for n in range(5):
        assert predict(service, f"{run}-down-{n}")[0].status_code == 200
        assert predict(refused, f"{run}-wrong-{n}")[0].status_code == 200
    unavailable = events(service, "records.unavailable")
    assert unavailable, "records.unavailable at start"
    assert unavailable[0]["database"] == f"postgresql://***@{LOOPBACK}:{postgres.port}/{database}"

    postgres.start()
    wait_until(lambda: events(service, "records.ready"), timeout=40, what="records.ready after the retries")
    for n in range(3):
        assert predict(service, f"{run}-up-{n}")[0].status_code == 200
    wait_until(lambda: count_receipts(url, run) == 8, timeout=10, what="the queued and the new receipts")
    assert count_receipts(url, f"{run}-down-") == 5  # made while the database was down
    # The wrong password is refused by the server each time, and retried; never written, never shown.
    wait_until(lambda: len(events(refused, "records.unavailable")) >= 2, timeout=20, what="retries refused")
    assert "password authentication failed" in events(refused, "records.unavailable")[-1]["error"]
    assert not events(refused, "records.ready")

    for one, secret in ((service, PASSWORD), (refused, "wrong-" + PASSWORD)):
        config = one.http.get("/config")
        assert config.status_code == 200
        assert config.json()["service"]["database_url"].startswith("postgresql://***@")
        for text in (one.log_text(), config.text, one.http.get("/metrics").text):
            assert secret not in text
            assert PASSWORD not in text


def test_retention_deletes_old_records_in_the_running_service(
    service_factory: ServiceFactory, sim: Simulator, tmp_path: Path
) -> None:
    """RECORDS_RETENTION_DAYS=1 with the retention run every half second: receipts of three days ago
    written into the service's SQLite database while it runs are deleted with their logged
    predictions and feedback; today's stay."""
    data = tmp_path / "data"
    url = f"sqlite:///{data}/records.db"
    service = service_factory(
        FEEDBACK_ENABLED="true",
        DATA_DIR=str(data),
        RECORDS_RETENTION_DAYS="1",
        RECORDS_RETENTION_INTERVAL_SECS="0.5",
    )
    run = uuid.uuid4().hex[:8]
    for n in range(3):
        assert predict(service, f"{run}-today-{n}")[0].status_code == 200
    wait_until(lambda: count_receipts(url) == 3, timeout=10, what="today's receipts")

    async def write_old() -> None:
        store = RecordStore(url)
        await store.start()
        try:
            old = (datetime.now(UTC) - timedelta(days=3)).timestamp()
            for n in range(4):
                store.submit(
                    Receipt(
                        request_id=f"{run}-old-{n}",
                        model="gpt-4",
                        model_served="gpt-4",
                        variant="baseline",
                        created_at=old,
                    ),
                    LoggedPrediction(inputs={"question": "old"}, outputs={"answer": "old"}),
                )
            assert await store.writer.flush(5)
            metrics = FeedbackMetrics.model_validate({"metrics": {"helpful": {"type": "boolean"}}})
            await store.record_feedback(
                metrics, request_id=f"{run}-old-0", metric="helpful", value=True, tenant=None
            )
        finally:
            await store.close()

    asyncio.run(write_old())
    wait_until(lambda: count_receipts(url, f"{run}-old-") == 0, timeout=10, what="the old receipts deleted")
    assert count_receipts(url, f"{run}-today-") == 3
    assert query(url, select(func.count()).select_from(PredictionRow)) == 0
    assert query(url, select(func.count()).select_from(FeedbackRow)) == 0
    deleted = [line for line in events(service, "records.retention_deleted") if line["receipts"]]
    assert sum(line["receipts"] for line in deleted) == 4
    assert sum(line["predictions"] for line in deleted) == 4
    assert sum(line["feedback"] for line in deleted) == 1
