"""Feedback, quality statistics, cost rebuild and export against real databases (a SQLite file and
PostgreSQL on 127.0.0.1:5432): the upsert, tenant isolation, typed errors, feedback right after the
prediction, figures against hand computations, rebuilt /costs rows, and JSONL that DSPy loads."""

from __future__ import annotations

import asyncio
import json
import math
import statistics
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from dspy_service.records import (
    FeedbackMetrics,
    InvalidFeedbackValue,
    LoggedPrediction,
    Receipt,
    RecordStore,
    UnknownMetric,
)
from dspy_service.records.schema import FeedbackRow
from dspy_service.results import ModelUsage
from tests.support.postgres import fresh_database

BACKENDS = ["sqlite", "postgresql"]
METRICS = FeedbackMetrics.model_validate(
    {
        "metrics": {
            "helpful": {"type": "boolean"},
            "rating": {"type": "float", "min": 1, "max": 5},
            "note": {"type": "comment"},
        }
    }
)


@pytest.fixture(params=BACKENDS)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database: a SQLite file, or a fresh PostgreSQL database dropped afterwards."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/records.db"
    else:
        with fresh_database("dspy_feedback") as url:
            yield url


@asynccontextmanager
async def open_store(url: str, **options: Any) -> AsyncIterator[RecordStore]:
    store = RecordStore(url, **options)
    await store.start()
    try:
        yield store
    finally:
        await store.close(timeout_secs=5)


def receipt(request_id: str, **fields: Any) -> Receipt:
    values: dict[str, Any] = {"model": "gpt", "model_served": "gpt", "variant": "baseline", **fields}
    return Receipt(request_id=request_id, **values)


async def give(
    store: RecordStore, request_id: str, metric: str, value: Any, tenant: str | None = None
) -> str:
    outcome = await store.record_feedback(
        METRICS, request_id=request_id, metric=metric, value=value, tenant=tenant
    )
    return outcome.status


# --- feedback ------------------------------------------------------------------------------------


async def test_feedback_is_upserted_per_request_and_metric(db_url: str) -> None:
    """The first value creates, the next replaces it (one row, the new value); metrics are apart."""
    async with open_store(db_url) as store:
        store.submit(receipt("r1", variant="tuned", model="claude"))
        assert await store.writer.flush(10)
        first = await store.record_feedback(METRICS, request_id="r1", metric="rating", value=2, tenant=None)
        assert (first.status, first.variant, first.model) == ("created", "tuned", "claude")
        assert await give(store, "r1", "rating", 4.5) == "updated"
        assert await give(store, "r1", "helpful", True) == "created"
        assert await give(store, "r1", "note", "good, but long") == "created"
        async with store.engine.connect() as connection:
            rows = (
                await connection.execute(
                    select(FeedbackRow.metric, FeedbackRow.value_num, FeedbackRow.value_text).order_by(
                        FeedbackRow.metric
                    )
                )
            ).all()
        assert [tuple(row) for row in rows] == [
            ("helpful", 1.0, None),
            ("note", None, "good, but long"),
            ("rating", 4.5, None),
        ]


async def test_only_the_requesting_tenant_may_give_feedback(db_url: str) -> None:
    """acme's request is unknown to globex and to a caller without a tenant, exactly as a request ID
    never seen; the same request ID made by two tenants is two receipts, each with its own feedback."""
    async with open_store(db_url) as store:
        store.submit(receipt("shared-id", tenant="acme", variant="a"))
        store.submit(receipt("shared-id", tenant="globex", variant="b"))
        store.submit(receipt("acme-only", tenant="acme"))
        assert await store.writer.flush(10)
        assert await give(store, "acme-only", "helpful", True, tenant="globex") == "unknown_request"
        assert await give(store, "acme-only", "helpful", True, tenant=None) == "unknown_request"
        assert await give(store, "never-seen", "helpful", True, tenant="globex") == "unknown_request"
        assert await give(store, "acme-only", "helpful", True, tenant="acme") == "created"
        acme = await store.record_feedback(
            METRICS, request_id="shared-id", metric="helpful", value=True, tenant="acme"
        )
        globex = await store.record_feedback(
            METRICS, request_id="shared-id", metric="helpful", value=False, tenant="globex"
        )
        assert (acme.status, acme.variant) == ("created", "a")
        assert (globex.status, globex.variant) == ("created", "b")


async def test_a_repeated_request_id_takes_feedback_on_its_latest_receipt(db_url: str) -> None:
    """A client retrying under the same X-Request-ID: both receipts are kept (both spent), and
    feedback goes to the latest one."""
    async with open_store(db_url) as store:
        store.submit(receipt("retried", variant="first", ok=False, error_type="provider_error"))
        store.submit(receipt("retried", variant="second"))
        assert await store.writer.flush(10)
        outcome = await store.record_feedback(
            METRICS, request_id="retried", metric="helpful", value=True, tenant=None
        )
        assert outcome.variant == "second"


async def test_wrong_metric_or_value_is_a_typed_error(db_url: str) -> None:
    """Unknown metric, wrong type, out of range: 422 errors naming the problem, nothing stored."""
    async with open_store(db_url) as store:
        store.submit(receipt("r1"))
        assert await store.writer.flush(10)
        with pytest.raises(UnknownMetric, match="unknown feedback metric 'stars'"):
            await give(store, "r1", "stars", 5)
        with pytest.raises(InvalidFeedbackValue, match='takes true or false, not "yes"'):
            await give(store, "r1", "helpful", "yes")
        with pytest.raises(InvalidFeedbackValue, match="from 1 to 5, not 9"):
            await give(store, "r1", "rating", 9)
        async with store.engine.connect() as connection:
            assert (await connection.execute(select(FeedbackRow.id))).first() is None


async def test_feedback_right_after_the_prediction_finds_its_receipt(db_url: str) -> None:
    """The receipt still sits in the writer's queue (a minute's flush interval): feedback has it
    written first, and is accepted rather than told the request is unknown."""
    async with open_store(db_url, flush_interval_secs=60, batch_size=1000) as store:
        store.submit(receipt("just-now", tenant="acme"))
        assert store.writer.is_pending("just-now", "acme")
        assert await give(store, "just-now", "helpful", True, tenant="acme") == "created"
        assert not store.writer.is_pending("just-now", "acme")
        store.submit(receipt("other", tenant="acme"))
        # Another tenant's feedback does not make it write, and still finds nothing.
        assert await give(store, "other", "helpful", True, tenant="globex") == "unknown_request"
        assert store.writer.is_pending("other", "acme")


# --- quality statistics --------------------------------------------------------------------------


def wilson(x: float, n: float, z: float = 1.959963984540054) -> tuple[float, float]:
    p = x / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return centre - half, centre + half


async def test_quality_per_variant_matches_a_hand_computation(db_url: str) -> None:
    """baseline: 8 of 10 helpful, ratings 4 5 3 4 5 2 4 4 5 3; tuned: 9 of 10 helpful, ratings 5 5 4 5 5
    (on two models). Means, Wilson and t intervals, and the differences, as computed by hand."""
    base_helpful = [True] * 8 + [False] * 2
    base_rating = [4, 5, 3, 4, 5, 2, 4, 4, 5, 3]
    tuned_helpful = [True] * 9 + [False]
    tuned_rating = [5, 5, 4, 5, 5]
    async with open_store(db_url) as store:
        for i in range(10):
            store.submit(receipt(f"b{i}"))
            store.submit(receipt(f"t{i}", variant="tuned", model="gpt" if i < 5 else "claude"))
        store.submit(receipt("never-rated", variant="tuned"))
        assert await store.writer.flush(10)
        for i in range(10):
            await give(store, f"b{i}", "helpful", base_helpful[i])
            await give(store, f"b{i}", "rating", base_rating[i])
            await give(store, f"t{i}", "helpful", tuned_helpful[i])
            if i < 5:
                await give(store, f"t{i}", "rating", tuned_rating[i])
        await give(store, "b0", "note", "fine")
        report = await store.quality("baseline", METRICS, variants=("baseline", "tuned", "unused"))

    baseline, tuned = report["variants"]["baseline"], report["variants"]["tuned"]
    assert baseline["helpful"]["count"] == 10
    assert baseline["helpful"]["mean"] == 0.8
    assert baseline["helpful"]["ci95"] == pytest.approx(list(wilson(8, 10)), abs=1e-6)
    assert baseline["helpful"]["ci95"] == pytest.approx([0.4902, 0.9433], abs=5e-5)

    mean, s = statistics.mean(base_rating), statistics.stdev(base_rating)
    half = 2.262157 * s / math.sqrt(10)  # t(0.975, 9) from the table
    assert baseline["rating"]["mean"] == 3.9
    assert baseline["rating"]["ci95"] == pytest.approx([mean - half, mean + half], abs=1e-5)
    assert baseline["note"] == {"count": 1}

    # Newcombe: d - sqrt((p1-l1)² + (u2-p2)²), d + sqrt((u1-p1)² + (p2-l2)²)
    l1, u1 = wilson(9, 10)
    l2, u2 = wilson(8, 10)
    d = 0.9 - 0.8
    vs = tuned["helpful"]["vs_default"]
    assert vs["difference"] == pytest.approx(d, abs=1e-6)
    expected = [
        d - math.sqrt((0.9 - l1) ** 2 + (u2 - 0.8) ** 2),
        d + math.sqrt((u1 - 0.9) ** 2 + (0.8 - l2) ** 2),
    ]
    assert vs["ci95"] == pytest.approx(expected, abs=1e-6)
    assert vs["excludes_zero"] is False

    # Welch: tuned ratings mean 4.8, s² = 0.2 (n 5); baseline s² = 0.988889 (n 10).
    se2 = 0.2 / 5 + statistics.variance(base_rating) / 10
    df = se2**2 / ((0.2 / 5) ** 2 / 4 + (statistics.variance(base_rating) / 10) ** 2 / 9)
    rating = tuned["rating"]["vs_default"]
    assert rating["difference"] == pytest.approx(0.9, abs=1e-6)
    assert rating["df"] == pytest.approx(df, abs=1e-5)
    assert rating["excludes_zero"] is True

    assert report["by_model"]["gpt:tuned"]["helpful"]["count"] == 5
    assert report["by_model"]["claude:tuned"]["helpful"]["vs_default"] is None  # no claude:baseline
    assert report["variants"]["unused"]["helpful"] == {"count": 0, "vs_default": None}


async def test_quality_since_counts_recent_receipts_only(db_url: str) -> None:
    """With since, feedback on receipts made before it is left out."""
    async with open_store(db_url) as store:
        store.submit(receipt("old", created_at=time.time() - 10 * 86_400))
        store.submit(receipt("new"))
        assert await store.writer.flush(10)
        await give(store, "old", "helpful", False)
        await give(store, "new", "helpful", True)
        report = await store.quality("baseline", METRICS, since=datetime.now(UTC) - timedelta(days=7))
    assert report["variants"]["baseline"]["helpful"]["count"] == 1
    assert report["variants"]["baseline"]["helpful"]["mean"] == 1.0


# --- cost rebuild --------------------------------------------------------------------------------


def usage(calls: int, tokens_in: int, tokens_out: int, cost: float | None) -> ModelUsage:
    return ModelUsage(calls=calls, input_tokens=tokens_in, output_tokens=tokens_out, cost_usd=cost)


async def test_cost_totals_are_rebuilt_from_receipts(db_url: str) -> None:
    """/costs rows as the ledger counts them: a miss that also spent on a pinned model, a memory hit
    and a coalesced answer (saved), an unpriced miss, a failure that spent and one that did not, the
    tenant's own rows; and today's spend per model and tenant (yesterday's left out)."""
    now = time.time()
    async with open_store(db_url) as store:
        store.submit(
            receipt(
                "miss",
                tenant="acme",
                input_tokens=150,
                output_tokens=60,
                cost_usd=0.0125,
                usage_by_model={"gpt": usage(1, 100, 40, 0.01), "judge": usage(1, 50, 20, 0.0025)},
            )
        )
        store.submit(receipt("hit", tenant="acme", cache_level="memory", cost_usd=0.0, cost_saved_usd=0.01))
        store.submit(receipt("joined", coalesced=True, cost_usd=0.0, cost_saved_usd=0.02))
        store.submit(
            receipt(
                "unpriced",
                model="local",
                input_tokens=7,
                output_tokens=3,
                cost_usd=None,
                usage_by_model={"local": usage(1, 7, 3, None)},
            )
        )
        store.submit(
            receipt(
                "failed-spent",
                ok=False,
                error_type="provider_timeout",
                unmetered_calls=1,
                input_tokens=10,
                cost_usd=0.001,
                usage_by_model={"gpt": usage(1, 10, 0, 0.001)},
            )
        )
        store.submit(receipt("failed-nothing", ok=False, error_type="circuit_open", cost_usd=0.0))
        store.submit(receipt("without-split", input_tokens=20, output_tokens=5, cost_usd=0.002))
        store.submit(
            receipt(
                "yesterday",
                tenant="acme",
                created_at=now - 86_400 * 1.5,
                input_tokens=1,
                cost_usd=0.5,
                usage_by_model={"gpt": usage(1, 1, 0, 0.5)},
            )
        )
        assert await store.writer.flush(10)
        rows = await store.cost_totals()
        today = await store.spend_today()

    def row(**values: Any) -> dict[str, Any]:
        base = {
            "total_requests": 0,
            "total_input_tokens": 0,
            "total_output_tokens": 0,
            "total_cost_usd": 0.0,
            "cache_hits": 0,
            "cost_saved_usd": 0.0,
            "unpriced_requests": 0,
            "unmetered_calls": 0,
        }
        return {**base, **values}

    without_stamp = {
        name: {k: v for k, v in totals.items() if k != "last_updated"} for name, totals in rows.items()
    }
    # gpt:baseline: miss (100/40, 0.01) + hit + coalesced + failed-spent (10/0, 0.001, 1 unmetered)
    # + without-split (20/5, 0.002) + yesterday (1/0, 0.5); failed-nothing spent nothing and is not counted.
    assert without_stamp == {
        "gpt:baseline": row(
            total_requests=6,
            total_input_tokens=131,
            total_output_tokens=45,
            total_cost_usd=0.513,
            cache_hits=2,
            cost_saved_usd=0.03,
            unmetered_calls=1,
        ),
        "judge:baseline": row(total_input_tokens=50, total_output_tokens=20, total_cost_usd=0.0025),
        "local:baseline": row(
            total_requests=1, total_input_tokens=7, total_output_tokens=3, unpriced_requests=1
        ),
        "@acme/gpt:baseline": row(
            total_requests=3,
            total_input_tokens=101,
            total_output_tokens=40,
            total_cost_usd=0.51,
            cache_hits=1,
            cost_saved_usd=0.01,
        ),
        "@acme/judge:baseline": row(total_input_tokens=50, total_output_tokens=20, total_cost_usd=0.0025),
    }
    assert all(totals["last_updated"].endswith("Z") for totals in rows.values())
    assert today.day == datetime.now(UTC).date().isoformat()
    assert today.by_model == {"gpt": pytest.approx(0.013), "judge": pytest.approx(0.0025)}
    assert today.by_tenant == {"acme": pytest.approx(0.0125)}


# --- export --------------------------------------------------------------------------------------


async def test_export_writes_lines_dspy_loads(db_url: str, tmp_path: Path) -> None:
    """Logged predictions of a variant with their feedback, filtered by metric and minimum, each
    line loading with dspy.Example(**line["example"]).with_inputs(*line["inputs"])."""
    async with open_store(db_url) as store:
        for i in range(4):
            store.submit(
                receipt(f"r{i}", variant="tuned", fingerprint="fp1"),
                LoggedPrediction(
                    inputs={"question": f"What is {i}+{i}?", "context": "arithmetic"},
                    outputs={"answer": str(2 * i)},
                ),
            )
        store.submit(receipt("no-log", variant="tuned"))
        store.submit(
            receipt("failed", variant="tuned", ok=False),
            LoggedPrediction(inputs={"question": "x"}, outputs={}),
        )
        store.submit(
            receipt("other-variant"), LoggedPrediction(inputs={"question": "y"}, outputs={"answer": "z"})
        )
        assert await store.writer.flush(10)
        for i, helpful in enumerate([True, False, True]):
            await give(store, f"r{i}", "helpful", helpful)
        await give(store, "r0", "rating", 5)

        every = tmp_path / "all.jsonl"
        assert await store.export("tuned", out_path=every) == 4
        good = tmp_path / "train.jsonl"
        assert await store.export("tuned", out_path=good, metric="helpful", min_value=1) == 2
        rated = tmp_path / "rated.jsonl"
        assert await store.export("tuned", out_path=rated, metric="rating") == 1
        future = tmp_path / "none.jsonl"
        later = datetime.now(UTC) + timedelta(hours=1)
        assert await store.export("tuned", out_path=future, since=later) == 0
        with pytest.raises(ValueError, match="needs the metric"):
            await store.export("tuned", out_path=future, min_value=1)

    lines = [json.loads(text) for text in good.read_text().splitlines()]
    assert [line["request_id"] for line in lines] == ["r0", "r2"]
    assert lines[0]["example"] == {"question": "What is 0+0?", "context": "arithmetic", "answer": "0"}
    assert lines[0]["inputs"] == ["question", "context"]
    assert lines[0]["feedback"] == {"helpful": True, "rating": 5.0}
    assert (lines[0]["variant"], lines[0]["model"], lines[0]["fingerprint"]) == ("tuned", "gpt", "fp1")
    assert lines[0]["created_at"].endswith("Z")
    assert future.read_text() == ""
    assert not await asyncio.to_thread(lambda: list(tmp_path.glob(".*.partial")))

    loader = (
        "import json, sys, dspy\n"
        "lines = [json.loads(t) for t in open(sys.argv[1])]\n"
        "examples = [dspy.Example(**line['example']).with_inputs(*line['inputs']) for line in lines]\n"
        "view = [[sorted(e.inputs().keys()), sorted(e.labels().keys()), e.answer] for e in examples]\n"
        "print(json.dumps(view))\n"
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        loader,
        str(good),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode == 0, err.decode()
    assert json.loads(out.decode().strip().splitlines()[-1]) == [
        [["context", "question"], ["answer"], "0"],
        [["context", "question"], ["answer"], "4"],
    ]
