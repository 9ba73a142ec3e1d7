"""`dspy-service db upgrade | db current` and `dspy-service export` as subprocesses, configured by the
environment as `serve` is, on real databases (SQLite files, PostgreSQL on 127.0.0.1:5432): the
schema made from nothing and reported, every problem one line on stderr with exit 2 and no password,
and an export that finds nothing saying why (exit 0)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from dspy_service.records import FeedbackMetrics, LoggedPrediction, Receipt, RecordStore, upgrade_to_head
from dspy_service.settings import service_environment
from tests.integration.conftest import ServiceFactory
from tests.support.postgres import PG_HOST, database_of, fresh_database
from tests.support.processes import free_port

ROOT = Path(__file__).resolve().parents[2]
MODELS_FILE = ROOT / "examples" / "feedback_loop" / "models.yaml"
HEAD = "0001_records"
METRICS = FeedbackMetrics.model_validate(
    {"metrics": {"helpful": {"type": "boolean"}, "rating": {"type": "float", "min": 1, "max": 5}}}
)


def cli(cwd: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """`dspy-service ARGS` with only the environment given (and the example models file)."""
    return subprocess.run(
        [sys.executable, "-m", "dspy_service.cli", *args],
        env={**service_environment(os.environ), "MODELS_CONFIG": str(MODELS_FILE), **env},
        cwd=cwd,  # no stray .env from the checkout
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def refused_with(done: subprocess.CompletedProcess[str]) -> str:
    """The one line of a refused run: exit 2, nothing on stdout, no traceback."""
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stdout == ""
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    return lines[0]


@pytest.fixture
def pg_url() -> Iterator[str]:
    with fresh_database("dspy_cli") as url:
        yield url


# --- db upgrade / db current ---------------------------------------------------------------------


def test_db_upgrade_makes_the_schema_in_an_empty_postgresql_database(pg_url: str, tmp_path: Path) -> None:
    """`db current` says an empty database has no schema (exit 1); `db upgrade` migrates it to head
    and says so (exit 0); then `db current` reports head (exit 0). The URL shown hides the user."""
    shown = f"postgresql://***@{PG_HOST}:5432/{database_of(pg_url)}"

    before = cli(tmp_path, "db", "current", DATABASE_URL=pg_url)
    assert before.returncode == 1, before.stderr
    assert before.stdout == f"{shown}: no schema yet (head is {HEAD}): run `dspy-service db upgrade`\n"

    upgraded = cli(tmp_path, "db", "upgrade", DATABASE_URL=pg_url)
    assert upgraded.returncode == 0, upgraded.stderr
    assert upgraded.stdout == f"{shown}: schema at revision {HEAD} (head)\n"

    after = cli(tmp_path, "db", "current", DATABASE_URL=pg_url)
    assert (after.returncode, after.stdout) == (0, f"{shown}: schema at revision {HEAD} (head)\n")


def test_db_upgrade_makes_the_sqlite_default_under_data_dir(tmp_path: Path) -> None:
    """Without DATABASE_URL the database is records.db under DATA_DIR: `db current` does not create
    it, `db upgrade` does (with DATA_DIR itself)."""
    data_dir = tmp_path / "state" / "data"
    database = data_dir / "records.db"

    before = cli(tmp_path, "db", "current", DATA_DIR=str(data_dir))
    assert before.returncode == 1
    assert before.stdout == (
        f"sqlite:///{database}: no database yet (head is {HEAD}): `dspy-service db upgrade` creates it\n"
    )
    assert not database.exists()

    upgraded = cli(tmp_path, "db", "upgrade", DATA_DIR=str(data_dir))
    assert upgraded.returncode == 0, upgraded.stderr
    assert upgraded.stdout == f"sqlite:///{database}: schema at revision {HEAD} (head)\n"
    assert database.is_file()


def test_a_database_that_cannot_be_reached_is_one_line_without_its_password(tmp_path: Path) -> None:
    """A port where nothing listens (upgrade), a database the server does not have (current): exit
    2, one line naming the database (user and password as ***) and the driver's reason."""
    secret = "pw-never-shown-7781"
    closed = f"postgresql://dspy:{secret}@127.0.0.1:{free_port()}/records"
    missing = f"postgresql://postgres:{secret}@{PG_HOST}:5432/dspy_cli_no_such_database"

    for action, url, reason in (
        ("upgrade", closed, "Connect call failed"),
        ("current", missing, "does not exist"),
    ):
        message = refused_with(cli(tmp_path, "db", action, DATABASE_URL=url))
        verb = "migrate" if action == "upgrade" else "read"
        assert message.startswith(f"dspy-service: cannot {verb} postgresql://***@"), message
        assert reason in message
        assert secret not in message


@pytest.mark.parametrize(
    ("args", "url", "problem"),
    [
        (
            ("db", "current"),
            f"postgresql://postgres:pw-sslmode-99@{PG_HOST}:5432/postgres?sslmode=require",
            "asyncpg takes ?ssl=require (or verify-full), not libpq's ?sslmode=",
        ),
        (
            ("db", "upgrade"),
            "postgresql://postgres:pw-broken-99@[::1/records",
            "DATABASE_URL cannot be read as a database URL; expected postgresql://",
        ),
        (
            ("export", "--variant", "baseline", "--out", "t.jsonl"),
            "mysql://root:pw-mysql-99@localhost/records",
            "scheme 'mysql' is not one the records store uses",
        ),
    ],
    ids=["libpq parameter", "unparsable", "another database"],
)
def test_a_database_url_the_records_cannot_use_is_named_without_its_password(
    tmp_path: Path, args: tuple[str, ...], url: str, problem: str
) -> None:
    """libpq's sslmode= (asyncpg takes ssl=), a URL that does not parse, a database other than
    PostgreSQL or SQLite: one line saying so, the password nowhere in it."""
    message = refused_with(cli(tmp_path, *args, DATABASE_URL=url))
    assert problem in message
    assert "pw-" not in message


def test_an_invalid_environment_is_named(tmp_path: Path) -> None:
    """Settings are read as `serve` reads them, and refused as it refuses them."""
    message = refused_with(cli(tmp_path, "db", "upgrade", DATA_DIR=str(tmp_path), PREDICTION_LOG="sometimes"))
    assert message.startswith("dspy-service: invalid environment: PREDICTION_LOG: ")


# --- export: refusals ----------------------------------------------------------------------------


@pytest.fixture
def migrated(tmp_path: Path) -> dict[str, str]:
    """The environment of a SQLite records database at head, with nothing in it."""
    data_dir = tmp_path / "data"
    upgrade_to_head(f"sqlite:///{data_dir / 'records.db'}")
    return {"DATA_DIR": str(data_dir)}


@pytest.mark.parametrize(
    ("args", "problem"),
    [
        (
            ("--metric", "stars"),
            f"--metric 'stars' is not a feedback metric of {MODELS_FILE}; its metrics: helpful, rating, note",
        ),
        (("--min", "1"), "--min needs --metric"),
        (("--metric", "note", "--min", "1"), "--min: 'note' is a comment metric"),
        (
            ("--since", "yesterday"),
            "--since 'yesterday' is neither an age (such as 7d, 12h, 30m) nor an ISO date",
        ),
        (("--since", "99999999d"), "--since '99999999d' reaches back too far"),
        (
            ("--out", "no/such/dir/train.jsonl"),
            "--out no/such/dir/train.jsonl: no such directory no/such/dir",
        ),
        (("--out", "."), "--out . is a directory"),
    ],
    ids=[
        "unknown metric",
        "min without metric",
        "min on a comment",
        "bad since",
        "since too far",
        "no dir",
        "out dir",
    ],
)
def test_a_wrong_export_argument_is_refused_by_name(
    tmp_path: Path, migrated: dict[str, str], args: tuple[str, ...], problem: str
) -> None:
    """Exit 2 with one line naming the argument and the problem; nothing written."""
    options = {"--variant": "baseline", "--out": "train.jsonl"}
    extra = list(args)
    if "--out" in extra:
        options["--out"] = extra.pop(extra.index("--out") + 1)
        extra.remove("--out")
    done = cli(tmp_path, "export", *(part for pair in options.items() for part in pair), *extra, **migrated)
    message = refused_with(done)
    assert message.startswith("dspy-service export: ")
    assert problem in message
    assert not (tmp_path / "train.jsonl").exists()


def test_a_database_that_cannot_be_read_is_refused_in_one_line(tmp_path: Path, pg_url: str) -> None:
    """No file at DATA_DIR (the service never ran there), a file that is not SQLite, a database
    without the schema, a server that does not answer: exit 2, one line each, no password."""
    export = ("export", "--variant", "baseline", "--out", "train.jsonl")
    nowhere = tmp_path / "nowhere"
    message = refused_with(cli(tmp_path, *export, DATA_DIR=str(nowhere)))
    assert message == (
        f"dspy-service export: no records database at {nowhere / 'records.db'} (DATA_DIR={nowhere}): the "
        "service writes one when run with FEEDBACK_ENABLED=true or PREDICTION_LOG=sampled|all; is this where "
        "it runs?"
    )
    assert not nowhere.exists()

    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "records.db").write_bytes(b"this is not a database, " * 100)
    message = refused_with(cli(tmp_path, *export, DATA_DIR=str(garbage)))
    assert message.startswith(f"dspy-service export: cannot read sqlite:///{garbage / 'records.db'}: ")
    assert "not a database" in message

    message = refused_with(cli(tmp_path, *export, DATABASE_URL=pg_url))
    assert message == (
        f"dspy-service export: postgresql://***@{PG_HOST}:5432/{database_of(pg_url)} has no records schema: "
        "run `dspy-service db upgrade` first"
    )

    secret = "pw-not-in-the-message-1234"
    message = refused_with(
        cli(tmp_path, *export, DATABASE_URL=f"postgresql://dspy:{secret}@127.0.0.1:{free_port()}/records")
    )
    assert message.startswith("dspy-service export: cannot read postgresql://***@127.0.0.1:")
    assert secret not in message
    assert not (tmp_path / "train.jsonl").exists()


# --- export: nothing to export -------------------------------------------------------------------


def test_with_the_prediction_log_off_an_export_says_so(
    service_factory: ServiceFactory, tmp_path: Path
) -> None:
    """A service with receipts (FEEDBACK_ENABLED) but no prediction log: its predictions and their
    feedback are there, their inputs and outputs are not, and export says PREDICTION_LOG was off."""
    data_dir = tmp_path / "data"
    service = service_factory(
        "log-off", MODELS_CONFIG=str(MODELS_FILE), FEEDBACK_ENABLED="true", DATA_DIR=str(data_dir)
    )
    for number in range(3):
        answered = service.http.post(
            "/v1/predict",
            json={
                "request_id": f"off-{number}",
                "model": "gpt-3.5-turbo",
                "variant": "cot",
                "input": f"q{number}",
            },
        )
        assert answered.status_code == 200, answered.text
        given = service.http.post(
            "/v1/feedback", json={"request_id": f"off-{number}", "metric": "helpful", "value": True}
        )
        assert given.status_code == 201, given.text

    done = cli(tmp_path, "export", "--variant", "cot", "--out", "train.jsonl", DATA_DIR=str(data_dir))

    assert done.returncode == 0, done.stderr
    assert done.stdout == (
        "wrote 0 lines to train.jsonl (variant 'cot'): none of the 3 predictions of variant 'cot' is in the "
        "prediction log: PREDICTION_LOG was off when they were made (the service keeps inputs and outputs "
        "only with PREDICTION_LOG=all, or a share of them with sampled)\n"
    )
    assert (tmp_path / "train.jsonl").read_text(encoding="utf-8") == ""


async def _fill(url: str) -> None:
    """Two logged answers of baseline (one rated 2, one rated 5 and helpful) and a failed one."""
    store = RecordStore(url)
    await store.start()
    try:
        old = time.time() - 3 * 86_400
        for number, ok in ((0, True), (1, True), (2, False)):
            store.submit(
                Receipt(
                    request_id=f"b-{number}",
                    model="gpt-3.5-turbo",
                    model_served="gpt-3.5-turbo",
                    variant="baseline",
                    ok=ok,
                    created_at=old,
                ),
                LoggedPrediction(inputs={"question": f"q{number}"}, outputs={"answer": f"a{number}"}),
            )
        assert await store.writer.flush(10)
        for request_id, metric, value in (
            ("b-0", "rating", 2),
            ("b-1", "rating", 5),
            ("b-1", "helpful", True),
        ):
            await store.record_feedback(
                METRICS, request_id=request_id, metric=metric, value=value, tenant=None
            )
    finally:
        await store.close()


@pytest.mark.parametrize(
    ("args", "reason"),
    [
        (
            ("--variant", "cot"),
            "no prediction of variant 'cot' is recorded (variants with predictions: baseline)",
        ),
        (
            ("--variant", "baseline", "--since", "1d"),
            "none of the 3 predictions of variant 'baseline' was made since ",
        ),
        (
            ("--variant", "baseline", "--metric", "rating", "--min", "6"),
            "none of the 2 logged answered predictions of variant 'baseline' with feedback 'rating' (2) "
            "has a value of at least 6",
        ),
    ],
    ids=["unknown variant", "since", "min"],
)
def test_an_export_that_finds_nothing_says_which_filter_left_nothing(
    tmp_path: Path, migrated: dict[str, str], args: tuple[str, ...], reason: str
) -> None:
    """Exit 0, `wrote 0 lines` and the first filter that left nothing."""
    asyncio.run(_fill(f"sqlite:///{Path(migrated['DATA_DIR']) / 'records.db'}"))

    done = cli(tmp_path, "export", *args, "--out", "train.jsonl", **migrated)

    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("wrote 0 lines to train.jsonl (variant ")
    assert reason in done.stdout


def test_an_empty_database_says_the_service_may_not_record(tmp_path: Path, migrated: dict[str, str]) -> None:
    done = cli(tmp_path, "export", "--variant", "baseline", "--out", "train.jsonl", **migrated)
    assert done.returncode == 0, done.stderr
    assert (
        "the database holds no predictions at all: the service records them only with FEEDBACK_ENABLED"
        in done.stdout
    )


def test_filters_keep_the_answered_predictions_they_name(tmp_path: Path, migrated: dict[str, str]) -> None:
    """--metric with --min keeps the values at or above it; the failed prediction is never exported;
    each line carries its feedback."""
    asyncio.run(_fill(f"sqlite:///{Path(migrated['DATA_DIR']) / 'records.db'}"))

    every = cli(tmp_path, "export", "--variant", "baseline", "--out", "all.jsonl", **migrated)
    rated = cli(
        tmp_path,
        "export",
        "--variant",
        "baseline",
        "--metric",
        "rating",
        "--min",
        "3",
        "--out",
        "good.jsonl",
        **migrated,
    )

    assert every.returncode == 0, every.stderr
    assert every.stdout.splitlines()[0] == "wrote 2 lines to all.jsonl (variant 'baseline')"
    assert (
        rated.stdout.splitlines()[0]
        == "wrote 1 line to good.jsonl (variant 'baseline', feedback rating >= 3)"
    )
    assert "dspy-service optimize --variant baseline --trainset good.jsonl" in rated.stdout
    (line,) = [orjson.loads(text) for text in (tmp_path / "good.jsonl").read_bytes().splitlines()]
    assert (line["example"], line["inputs"], line["feedback"]) == (
        {"question": "q1", "answer": "a1"},
        ["question"],
        {"helpful": True, "rating": 5.0},
    )
