"""Receipts make cost durable: when the state Redis comes back empty, the fleet's /costs totals and
today's budget spend are rebuilt from the receipts, once for the fleet, and not doubled.

Two service processes with FEEDBACK_ENABLED=true share a redis-server of this test's own and a records
database (a SQLite file, or a fresh PostgreSQL database); Redis loses its state (FLUSHALL under live
connections, or killed and restarted without persistence); both replicas notice, one rebuilds, and
/costs equals what was counted before the loss plus what was made after, while the model's daily
budget, spent before the loss, still refuses the next miss."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry
from sqlalchemy import func, select

from dspy_service.cost_recovery import CostRecovery
from dspy_service.costs import CostLedger
from dspy_service.metrics import Metrics
from dspy_service.records import Receipt, RecordStore, create_engine
from dspy_service.records.schema import ReceiptRow
from dspy_service.redis_epoch import StateEpoch
from dspy_service.redis_link import RedisLink
from tests.integration.conftest import TEST_API_KEY
from tests.support.metrics_text import sample_value
from tests.support.postgres import fresh_database
from tests.support.processes import RedisServer, ServiceProcess, Simulator, wait_until
from tests.support.redis_keys import STATE_PREFIX

PRICE_PER_1K = 0.5  # USD per 1,000 tokens in and out: a miss costs a few cents
MODELS = f"""
models:
  metered:
    name: openai/gpt-4
    cost_per_1k_input_tokens: {PRICE_PER_1K}
    cost_per_1k_output_tokens: {PRICE_PER_1K}
    max_output_tokens: 60
    max_retries: 0
  free:
    name: openai/gpt-3.5-turbo
    cost_per_1k_input_tokens: 0.001
    cost_per_1k_output_tokens: 0.002
variants:
  baseline: {{signature: "question -> answer"}}
budgets:
  models: {{metered: {{daily_usd: 0.5}}}}
"""
INT_FIELDS = (
    "total_requests",
    "cache_hits",
    "total_input_tokens",
    "total_output_tokens",
    "unpriced_requests",
)
FLOAT_FIELDS = ("total_cost_usd", "cost_saved_usd")


@pytest.fixture
def state_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A state Redis of this test's own, keeping nothing on disk (FLUSHALL here touches no one else)."""
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()


@contextlib.contextmanager
def database(backend: str, tmp_path: Path) -> Iterator[str]:
    """An empty records database the replicas share: a SQLite file, or a fresh PostgreSQL database."""
    if backend == "sqlite":
        yield f"sqlite:///{tmp_path}/shared/records.db"
    else:
        with fresh_database("dspy_rebuild") as url:
            yield url


def receipts_written(url: str) -> int:
    async def count() -> int:
        engine = create_engine(url)
        try:
            async with engine.connect() as connection:
                return int(
                    (await connection.execute(select(func.count()).select_from(ReceiptRow))).scalar_one()
                )
        finally:
            await engine.dispose()

    return asyncio.run(count())


def oldest_receipt(url: str) -> str:
    """The oldest receipt's time, as /costs gives times."""

    async def oldest() -> datetime:
        engine = create_engine(url)
        try:
            async with engine.connect() as connection:
                moment = (await connection.execute(select(func.min(ReceiptRow.created_at)))).scalar_one()
        finally:
            await engine.dispose()
        assert isinstance(moment, datetime)
        return moment

    moment = asyncio.run(oldest()).astimezone(UTC)
    return moment.isoformat(timespec="milliseconds")[:-6] + "Z"


class Expected:
    """The /costs rows the answers add up to, counted as the ledger counts them."""

    def __init__(self) -> None:
        self.rows: dict[str, dict[str, float]] = {}

    def add(self, answer: dict[str, Any]) -> None:
        row = self.rows.setdefault(
            f"{answer['model']}:{answer['variant']}", dict.fromkeys(INT_FIELDS + FLOAT_FIELDS, 0)
        )
        meta = answer["metadata"]
        row["total_requests"] += 1
        if meta["cache_level"] is not None:
            row["cache_hits"] += 1
            row["cost_saved_usd"] += meta["cost_saved_usd"] or 0.0
        else:
            row["total_input_tokens"] += meta["input_tokens"]
            row["total_output_tokens"] += meta["output_tokens"]
            row["total_cost_usd"] += meta["cost_usd"]


def assert_costs(costs: dict[str, Any], expected: Expected) -> None:
    assert sorted(costs) == sorted(expected.rows)
    for name, row in expected.rows.items():
        for field in INT_FIELDS:
            assert costs[name][field] == row[field], (name, field)
        for field in FLOAT_FIELDS:
            assert costs[name][field] == pytest.approx(row[field], abs=1e-9), (name, field)


def events(service: ServiceProcess, name: str) -> list[dict[str, Any]]:
    return [line for line in service.log_lines() if line.get("event") == name]


def ask(service: ServiceProcess, model: str, question: str) -> httpx.Response:
    return service.http.post("/v1/predict", json={"model": model, "input": question})


def wait_until_settled(redis: RedisServer) -> None:
    """Until the fleet's spend on the budgeted model stays put for half a second: the worst-case
    holds have been settled to what was spent (within a few flush intervals of 0.2 s)."""
    last = fleet_spend(redis)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = fleet_spend(redis)
        if now == last:
            return
        last = now
    pytest.fail("the budgeted model's spend never settled")


def fleet_spend(redis: RedisServer) -> float:
    day = time.strftime("%Y-%m-%d", time.gmtime())
    reply = redis.command("GET", f"{STATE_PREFIX}spend:{day}:model:metered")
    lines = reply.split(b"\r\n")
    return float(lines[1]) if reply.startswith(b"$") and len(lines) > 1 and lines[1] else 0.0


@pytest.mark.parametrize(("backend", "loss"), [("sqlite", "flushall"), ("postgresql", "restart")])
def test_a_state_redis_that_lost_its_data_is_rebuilt_once_from_the_receipts(
    backend: str, loss: str, state_redis: RedisServer, sim: Simulator, tmp_path: Path
) -> None:
    """Before the loss both replicas spend the budgeted model's daily budget until it refuses, and
    make misses and memory hits of another; then Redis loses everything. Both notice, exactly one
    rebuilds; /costs is what it was, X-Costs-Since the oldest receipt's time; the budget still refuses
    (an empty one would not); what is made after is added once, on both replicas' views."""
    with database(backend, tmp_path) as db_url:
        run_loss(db_url, loss, state_redis, sim, tmp_path)


def run_loss(db_url: str, loss: str, state_redis: RedisServer, sim: Simulator, tmp_path: Path) -> None:
    models = tmp_path / "models.yaml"
    models.write_text(MODELS, encoding="utf-8")
    env = {
        "REDIS_URL": state_redis.url,
        "OPENAI_API_KEY": TEST_API_KEY,
        "OPENAI_BASE_URL": sim.api_base,
        "LOG_FORMAT": "json",
        "COSTS_FLUSH_INTERVAL_SECS": "0.2",
        "FEEDBACK_ENABLED": "true",
        "DATABASE_URL": db_url,
        "MODELS_CONFIG": str(models),
    }
    replicas = [ServiceProcess(env, tmp_path, name) for name in ("a", "b")]
    try:
        for replica in replicas:
            replica.start()
        a, b = replicas
        expected = Expected()
        made = 0
        # Before the loss: misses on the budgeted model from both replicas until its budget refuses,
        # misses and memory hits of the other model.
        # A refusal counts only once the spend has settled: one that came while an earlier request's
        # worst-case hold was still unsettled may leave room for one more request, which the
        # rebuilt spend would then rightly let through after the loss.
        tag = uuid.uuid4().hex[:8]
        refusals = 0
        settled = False  # every hold settled since the last answered request
        for n in range(40):
            answer = ask(replicas[n % 2], "metered", f"metered {tag} {n}")
            if answer.status_code == 429:
                refusals += 1  # a refused request has a receipt too (it reached a program)
                if settled:
                    break
                wait_until_settled(state_redis)
                settled = True
                continue
            assert answer.status_code == 200, answer.text
            expected.add(answer.json())
            made += 1
            settled = False
        else:
            pytest.fail("the 0.5 USD budget never refused")
        made += refusals
        for replica in replicas:
            for question in ("free one", "free two", "free one"):
                answer = ask(replica, "free", f"{question} {tag} {replica.port}")
                assert answer.status_code == 200
                expected.add(answer.json())
                made += 1
        spent_before = fleet_spend(state_redis)
        assert 0 < spent_before <= 0.5  # refused for its worst case, which fits an empty budget
        wait_until(lambda: receipts_written(db_url) == made, timeout=10, what=f"{made} receipts")
        wait_until(
            lambda: a.http.get("/costs").json().get("free:baseline", {}).get("total_requests") == 6,
            timeout=10,
            what="both replicas' totals flushed",
        )
        before = a.http.get("/costs")
        assert_costs(before.json(), expected)
        first_since = before.headers["x-costs-since"]

        if loss == "flushall":
            state_redis.command("FLUSHALL")
        else:
            state_redis.kill()
            state_redis.start()
        for replica in replicas:
            wait_until(lambda r=replica: events(r, "redis.state_lost"), timeout=15, what="redis.state_lost")
        new_epoch = events(a, "redis.state_lost")[0]["epoch"]
        assert new_epoch == events(b, "redis.state_lost")[0]["epoch"]
        oldest = oldest_receipt(db_url)
        assert first_since < oldest < new_epoch
        # Since the oldest receipt kept (the first prediction), not the new epoch: what the totals cover.
        wait_until(
            lambda: all(r.http.get("/costs").headers["x-costs-since"] == oldest for r in replicas),
            timeout=20,
            what="both replicas reporting the rebuilt totals' start",
        )
        rebuilt = [
            line for r in replicas for line in events(r, "costs.rebuilt") if line["epoch"] > first_since
        ]
        assert len(rebuilt) == 1, "one replica rebuilds for the fleet"
        assert rebuilt[0]["requests"] == made - refusals  # every answered request (refused: nowhere)

        # The budget spent before the loss still caps; the receipts' spend is today's spend again.
        assert fleet_spend(state_redis) == pytest.approx(spent_before, abs=1e-9)
        for replica in replicas:
            refused = ask(replica, "metered", f"metered after {tag} {replica.port}")
            assert refused.status_code == 429, refused.text
            assert refused.json()["error"]["type"] == "budget_exceeded"
        # Made after the loss: counted by the normal path, on top of the rebuilt totals.
        for replica in replicas:
            for question in ("free after", "free one"):
                answer = ask(replica, "free", f"{question} {tag} {replica.port}")
                assert answer.status_code == 200
                expected.add(answer.json())
        for replica in replicas:
            wait_until(
                lambda r=replica: r.http.get("/costs").json()["free:baseline"]["total_requests"] == 10,
                timeout=10,
                what="the totals made after the loss",
            )
        for replica in replicas:
            costs = replica.http.get("/costs")
            assert_costs(costs.json(), expected)
            assert costs.headers["x-costs-since"] == oldest
            metrics = replica.http.get("/metrics").text
            assert sample_value(metrics, "dspy_redis_state_lost_total") == 1
    finally:
        for replica in replicas:
            replica.stop()


async def test_a_rebuild_is_applied_once_for_its_epoch(tmp_path: Path, state_redis: RedisServer) -> None:
    """The apply-once guard, without the claim: a second rebuild of the same epoch (a replica whose
    lease began after the first's ran out, or a resend after a lost reply) adds nothing, and one for
    an epoch that is no longer the current one adds nothing either."""
    store = RecordStore(f"sqlite:///{tmp_path}/records.db")
    await store.start()
    metrics = Metrics(CollectorRegistry())
    link = RedisLink(state_redis.url, timeout=2.0, metrics=metrics, redacted_url=state_redis.url)
    await link.start()
    try:
        for n in range(3):
            store.submit(
                Receipt(
                    request_id=f"r{n}",
                    model="m",
                    model_served="m",
                    variant="v",
                    input_tokens=10,
                    output_tokens=5,
                    cost_usd=0.25,
                    created_at=time.time() - 60,
                )
            )
        assert await store.writer.flush(5)
        ledger = CostLedger(link, 60)
        epoch = StateEpoch(link, metrics)
        await epoch.check()
        assert epoch.marker is not None
        recovery = CostRecovery(link, store, ledger, None, settle_secs=0)
        claim = f"{link.state_prefix}rebuild-claim:{epoch.marker}"
        for _ in range(2):
            assert await recovery.rebuild(epoch.marker)
            await link.call(lambda client: client.delete(claim))  # the lease ran out
        totals, scope = await ledger.snapshot()
        assert scope == "fleet"
        assert totals["m:v"]["total_requests"] == 3
        assert totals["m:v"]["total_cost_usd"] == pytest.approx(0.75)
        await epoch.check()
        assert epoch.since is not None
        assert epoch.since < epoch.marker  # from the oldest receipt

        await link.call(lambda client: client.set(epoch.key, "2000-01-01T00:00:00.000Z"))  # another epoch now
        assert await recovery.rebuild(epoch.marker)
        totals, _ = await ledger.snapshot()
        assert totals["m:v"]["total_requests"] == 3
    finally:
        await link.close()
        await store.close()
