"""`dspy-service db upgrade | db current` and `dspy-service export`: the records database from the
command line.

    dspy-service db upgrade       # migrations to head (what the service does at start-up)
    dspy-service db current       # the database's schema revision, and whether it is head
    dspy-service export --variant V [--metric M [--min X]] [--since 7d] --out train.jsonl

Configured from the environment exactly as `dspy-service serve` is: DATABASE_URL, else the SQLite
file records.db under DATA_DIR; export also reads MODELS_CONFIG for the feedback metrics.

stdout: what was done; stderr: one line naming any problem (a database URL always with its password
redacted). Exit codes: 0 done; 1 `db current` found the schema not at head; 2 a problem (arguments,
environment, a database that cannot be reached or read).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import sys
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dspy_service.models_config import ModelsConfig
    from dspy_service.settings import Settings

EXIT_OK = 0
EXIT_NOT_AT_HEAD = 1
EXIT_USAGE = 2

_EXPORT_DESCRIPTION = """\
Write a variant's logged predictions, with their feedback, as JSONL: training data for
`dspy-service optimize --trainset`. One line per answered prediction in the prediction log
(PREDICTION_LOG=all or sampled when it was made), oldest first:

  {"example": {"question": "...", "answer": "..."}, "inputs": ["question"], "request_id": "...",
   "variant": "...", "model": "...", "fingerprint": "...", "feedback": {"helpful": true},
   "created_at": "..."}

Each line loads in DSPy as dspy.Example(**line["example"]).with_inputs(*line["inputs"]).
Input fields left out by PREDICTION_LOG_EXCLUDE_FIELDS were never stored, so they are not there.

Configured from the environment as `dspy-service serve` is (DATABASE_URL, else records.db under
DATA_DIR; MODELS_CONFIG for the feedback metrics). Prints how many lines it wrote, and when that
is none, why; any problem is one line on stderr and exits 2.
"""


# What reaching a database may raise besides records.migrate.MIGRATION_ERRORS (SQLAlchemy's errors,
# OSError, TimeoutError): a URL parameter the driver does not take (libpq's `sslmode=` given to
# asyncpg) is a TypeError from its connect(). Both end in one line, never a traceback.
_URL_ERRORS = (TypeError, ValueError)
_UNKNOWN_PARAMETER = re.compile(r"unexpected keyword argument '([^']+)'")


class _Refused(Exception):
    """A problem the user can fix: one line on stderr, exit 2."""


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `db` (upgrade, current) and `export` on the CLI's subcommands."""
    db = commands.add_parser(
        "db",
        help="the records database: run its migrations, show its schema revision",
        description="The records database (DATABASE_URL, else records.db under DATA_DIR).",
    )
    actions = db.add_subparsers(dest="db_command", required=True)
    actions.add_parser(
        "upgrade",
        help="migrate the schema to head (creating it in an empty database)",
        description="Run the migrations to head, as the service does at start-up unless "
        "DATABASE_MIGRATE=false; prints the revision. Exit 0, or 2 naming the problem.",
    )
    actions.add_parser(
        "current",
        help="show the schema revision",
        description="Print the database's schema revision. Exit 0 at head, 1 behind it (or no schema "
        "yet: run `dspy-service db upgrade`), 2 when the database cannot be read.",
    )
    export = commands.add_parser(
        "export",
        help="write a variant's logged predictions and their feedback as JSONL for optimize",
        description=_EXPORT_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    export.add_argument("--variant", required=True, help="the variant whose predictions to export")
    export.add_argument(
        "--metric", help="only predictions given feedback on this metric (one of the models file's)"
    )
    export.add_argument(
        "--min",
        type=float,
        dest="min_value",
        metavar="VALUE",
        help="with --metric: only values of at least VALUE (a boolean metric: 1 is true, 0 false)",
    )
    export.add_argument(
        "--since", help="only predictions made since: an age (30m, 12h, 7d, 2w) or an ISO date or time"
    )
    export.add_argument("--out", required=True, type=Path, help="the JSONL file to write")


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("LOG_LEVEL", "warning")  # a command's output, not a service's log
    if args.command == "db":
        return _db(args.db_command)
    try:
        message = _export(args)
    except _Refused as exc:
        print(f"dspy-service export: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if isinstance(message, int):  # load_configuration has said what is wrong
        return message
    print(message)
    return EXIT_OK


# --- settings and the database ---------------------------------------------------------------------


def _settings() -> Settings | int:
    """The service's settings, or exit code 2 with the problem on stderr (as `serve` says it)."""
    from pydantic import ValidationError

    from dspy_service.logs import configure_logging
    from dspy_service.settings import Settings

    try:
        settings = Settings()
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']).upper() or 'settings'}: {err['msg']}"
            for err in exc.errors(include_input=False, include_url=False)
        )
        print(f"dspy-service: invalid environment: {problems}", file=sys.stderr)
        return EXIT_USAGE
    configure_logging(settings.log_level, settings.log_format, settings.secret_values())
    return settings


def _unreadable(url: str, exc: BaseException) -> str:
    """Why `url` could not be read, in one line, its password nowhere in it."""
    from sqlalchemy.engine import make_url

    from dspy_service.records import async_url
    from dspy_service.settings import redact_url

    lines = str(exc).splitlines()
    detail = lines[0] if lines and lines[0] else type(exc).__name__
    unknown = _UNKNOWN_PARAMETER.search(detail) if isinstance(exc, TypeError) else None
    if unknown is not None:
        name = unknown.group(1)
        detail = f"the database driver takes no URL parameter {name!r}"
        if name == "sslmode":
            detail += " (for TLS with asyncpg: ?ssl=require)"
    password = make_url(async_url(url)).password
    if password:
        detail = detail.replace(str(password), "***")
    return f"cannot read {redact_url(url)}: {detail}"


def _database_url(settings: Settings) -> str:
    """DATABASE_URL (else the SQLite default), once it is known to parse as a database URL."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    from dspy_service.records import async_url

    url = settings.effective_database_url
    expected = "postgresql://USER:PASSWORD@HOST:PORT/DATABASE or sqlite:///PATH"
    try:
        backend = make_url(async_url(url)).get_backend_name()
    except (ArgumentError, ValueError):
        # Not echoed: an unparsable URL may show its password anywhere.
        raise _Refused(f"DATABASE_URL cannot be read as a database URL; expected {expected}") from None
    if backend not in ("postgresql", "sqlite"):
        raise _Refused(f"DATABASE_URL names a {backend} database; the records take {expected}")
    return url


def _missing_sqlite_file(url: str) -> Path | None:
    """The SQLite file `url` names when it does not exist (connecting would create it empty)."""
    from dspy_service.records.database import sqlite_path

    path = sqlite_path(url)
    return path if path is not None and not path.exists() else None


def _db(action: str) -> int:
    settings = _settings()
    if isinstance(settings, int):
        return settings
    try:
        url = _database_url(settings)
    except _Refused as exc:
        print(f"dspy-service: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if action == "upgrade":
        from dspy_service.records import run_db_upgrade

        try:
            migrated = run_db_upgrade(url)  # says what happened, or why not (its own errors)
        except _URL_ERRORS as exc:
            print(f"dspy-service: {_unreadable(url, exc)}", file=sys.stderr)
            return EXIT_USAGE
        return EXIT_OK if migrated == 0 else EXIT_USAGE
    return _db_current(url)


def _db_current(url: str) -> int:
    from dspy_service.records import current_revision, head_revision
    from dspy_service.records.migrate import MIGRATION_ERRORS
    from dspy_service.settings import redact_url

    shown = redact_url(url)
    head = head_revision()
    if _missing_sqlite_file(url) is not None:
        print(f"{shown}: no database yet (head is {head}): `dspy-service db upgrade` creates it")
        return EXIT_NOT_AT_HEAD
    try:
        revision = current_revision(url)
    except (*MIGRATION_ERRORS, *_URL_ERRORS) as exc:
        print(f"dspy-service: {_unreadable(url, exc)}", file=sys.stderr)
        return EXIT_USAGE
    if revision == head:
        print(f"{shown}: schema at revision {revision} (head)")
        return EXIT_OK
    if revision is None:
        print(f"{shown}: no schema yet (head is {head}): run `dspy-service db upgrade`")
    else:
        print(f"{shown}: schema at revision {revision}, not head ({head}): run `dspy-service db upgrade`")
    return EXIT_NOT_AT_HEAD


# --- export ----------------------------------------------------------------------------------------


def _check_metric(config: ModelsConfig, metric: str | None, min_value: float | None) -> None:
    if metric is None:
        if min_value is not None:
            raise _Refused("--min needs --metric: the feedback metric whose values it bounds")
        return
    declared = config.feedback.metrics
    spec = declared.get(metric)
    if spec is None:
        known = f"its metrics: {', '.join(declared)}" if declared else "it declares none (feedback: metrics:)"
        raise _Refused(f"--metric {metric!r} is not a feedback metric of {config.source}; {known}")
    if min_value is not None and spec.type == "comment":
        raise _Refused(f"--min: {metric!r} is a comment metric, which has no values to compare")


def _check_out(out: Path) -> None:
    if out.is_dir():
        raise _Refused(f"--out {out} is a directory; name the file to write")
    directory = out.parent
    if not directory.is_dir():
        raise _Refused(f"--out {out}: no such directory {directory}")
    if not os.access(directory, os.W_OK):
        raise _Refused(f"--out {out}: the directory {directory} is not writable")


def _check_schema(settings: Settings, url: str) -> None:
    """The database exists and its schema is this version's (exporting reads its tables)."""
    from dspy_service.records import current_revision, head_revision
    from dspy_service.records.migrate import MIGRATION_ERRORS

    missing = _missing_sqlite_file(url)
    if missing is not None:
        where = "DATABASE_URL" if settings.database_url is not None else f"DATA_DIR={settings.data_dir}"
        raise _Refused(
            f"no records database at {missing} ({where}): the service writes one when run with "
            "FEEDBACK_ENABLED=true or PREDICTION_LOG=sampled|all; is this where it runs?"
        )
    try:
        revision = current_revision(url)
    except (*MIGRATION_ERRORS, *_URL_ERRORS) as exc:
        raise _Refused(_unreadable(url, exc)) from None
    head = head_revision()
    if revision != head:
        from dspy_service.settings import redact_url

        found = "no records schema" if revision is None else f"schema revision {revision}, not {head}"
        raise _Refused(f"{redact_url(url)} has {found}: run `dspy-service db upgrade` first")


def _describe(args: argparse.Namespace, since: datetime | None) -> str:
    parts = [f"variant {args.variant!r}"]
    if args.metric is not None:
        bound = f" >= {args.min_value:g}" if args.min_value is not None else ""
        parts.append(f"feedback {args.metric}{bound}")
    if since is not None:
        parts.append(f"since {since.isoformat(timespec='seconds').replace('+00:00', 'Z')}")
    return ", ".join(parts)


def _export(args: argparse.Namespace) -> str | int:
    from dspy_service.records import parse_since
    from dspy_service.serving import load_configuration

    since = None
    if args.since is not None:
        try:
            since = parse_since(args.since)
        except ValueError as exc:
            raise _Refused(f"--{exc}") from None
        except OverflowError:  # an age reaching back before the calendar's start
            raise _Refused(f"--since {args.since!r} reaches back too far") from None
    loaded = load_configuration()
    if isinstance(loaded, int):
        return loaded
    settings, config = loaded
    _check_metric(config, args.metric, args.min_value)
    out: Path = args.out
    _check_out(out)
    url = _database_url(settings)
    _check_schema(settings, url)
    from dspy_service.records.migrate import MIGRATION_ERRORS

    try:
        count, reason = asyncio.run(_write(url, args, since))
    except (*MIGRATION_ERRORS, *_URL_ERRORS) as exc:
        raise _Refused(_unreadable(url, exc)) from None
    described = _describe(args, since)
    if count == 0:
        return f"wrote 0 lines to {out} ({described}): {reason}"
    return "\n".join(
        [
            f"wrote {count} {'line' if count == 1 else 'lines'} to {out} ({described})",
            "each loads as dspy.Example(**line['example']).with_inputs(*line['inputs']); to optimize:",
            f"  dspy-service optimize --variant {args.variant} --trainset {out} "
            f"--optimizer bootstrap-fewshot --out {args.variant}-tuned.json",
        ]
    )


async def _write(url: str, args: argparse.Namespace, since: datetime | None) -> tuple[int, str]:
    """The lines written, and when there are none, why."""
    from dspy_service.records import create_engine, export_jsonl
    from dspy_service.records_explain import why_empty

    engine = create_engine(url, pooled=False)
    try:
        count = await export_jsonl(
            engine, args.variant, out_path=args.out, metric=args.metric, min_value=args.min_value, since=since
        )
        if count:
            return count, ""
        reason = await why_empty(
            engine, args.variant, metric=args.metric, min_value=args.min_value, since=since
        )
        return 0, reason
    finally:
        await engine.dispose()
