"""Daily budgets: the models-file section, and spend counted per UTC day (here without Redis)."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from dspy_service.budgets import Budgets
from dspy_service.errors import BudgetExceeded, ConfigError
from dspy_service.metrics import Metrics
from dspy_service.models_config import BudgetsConfig, load_models_config

MODELS = (
    "models: {m: {name: openai/gpt-4}, n: {name: openai/gpt-4o}}\n"
    "variants: {baseline: {signature: 'q -> a'}}\n"
)
NOON = 1_800_000_000 - 1_800_000_000 % 86_400 + 43_200  # 12:00 UTC on some day


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def budgets_for(config: BudgetsConfig, clock: Clock) -> tuple[Budgets, Metrics]:
    metrics = Metrics(CollectorRegistry())
    return Budgets(config, None, metrics, clock=clock), metrics


def ratio(metrics: Metrics, scope: str, name: str) -> float | None:
    return metrics.registry.get_sample_value("dspy_budget_spent_ratio", {"scope": scope, "name": name})


def test_budgets_section_parses(tmp_path: Path) -> None:
    """`budgets:` names models of the file and tenants, each with daily_usd."""
    path = tmp_path / "models.yaml"
    path.write_text(MODELS + "budgets: {models: {m: {daily_usd: 5}}, tenants: {acme: {daily_usd: 2.5}}}\n")
    config = load_models_config(path)
    assert config.budgets.models["m"].daily_usd == 5
    assert config.budgets.tenants["acme"].daily_usd == 2.5
    assert load_models_config(_write(tmp_path, MODELS)).budgets == BudgetsConfig()


@pytest.mark.parametrize(
    ("section", "mention"),
    [
        ("budgets: {models: {ghost: {daily_usd: 1}}}", "ghost"),
        ("budgets: {models: {m: {daily_usd: 0}}}", "budgets.models.m.daily_usd"),
        ("budgets: {models: {m: {daily_usd: 1, monthly_usd: 9}}}", "monthly_usd"),
        ("budgets: {tenants: {'bad tenant': {daily_usd: 1}}}", "bad tenant"),
        ("budgets: {people: {}}", "people"),
    ],
)
def test_bad_budgets_stop_start_up(tmp_path: Path, section: str, mention: str) -> None:
    """Unknown models, non-positive amounts, unknown keys and bad tenant names are refused."""
    with pytest.raises(ConfigError) as caught:
        load_models_config(_write(tmp_path, MODELS + section + "\n"))
    assert mention in str(caught.value)


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "models.yaml"
    path.write_text(text)
    return path


async def test_a_spent_budget_refuses_until_utc_midnight() -> None:
    """A hold that fits is taken and settled to what was spent; one that would go over is refused
    with BudgetExceeded and Retry-After = seconds to midnight; the next UTC day starts from zero."""
    clock = Clock(NOON)
    budgets, metrics = budgets_for(BudgetsConfig.model_validate({"models": {"m": {"daily_usd": 1}}}), clock)
    budgets.settle(await budgets.reserve({"m": 0.8}, None), {"m": 0.6}, unknown=False)
    assert ratio(metrics, "model", "m") == pytest.approx(0.6)
    budgets.settle(await budgets.reserve({"m": 0.4}, None), {"m": 0.4}, unknown=False)
    assert budgets.spent("model", "m") == pytest.approx(1.0)
    with pytest.raises(BudgetExceeded) as caught:
        await budgets.reserve({"m": 0.01}, None)
    assert caught.value.retry_after == pytest.approx(43_200)
    assert caught.value.status == 429
    assert budgets.spent("model", "m") == pytest.approx(1.0)  # a refused hold holds nothing
    assert await budgets.reserve({"n": 5}, None) is None  # a model without a budget is never refused
    clock.now = NOON + 43_200  # the next UTC day starts from zero
    assert budgets.spent("model", "m") == 0
    assert await budgets.reserve({"m": 0.9}, None) is not None


async def test_tenant_budgets_count_only_their_tenant() -> None:
    """A tenant's holds count against its own budget, whatever the model; others are unaffected."""
    config = BudgetsConfig.model_validate({"tenants": {"acme": {"daily_usd": 0.5}}})
    budgets, metrics = budgets_for(config, Clock(NOON))
    budgets.settle(await budgets.reserve({"m": 0.3}, "acme"), {"m": 0.3}, unknown=False)
    with pytest.raises(BudgetExceeded, match="acme"):
        await budgets.reserve({"n": 0.3}, "acme")
    assert await budgets.reserve({"m": 5}, "beta") is None
    assert await budgets.reserve({"m": 5}, None) is None
    assert ratio(metrics, "tenant", "acme") == pytest.approx(0.6)


async def test_unknown_spend_keeps_its_hold_and_nothing_sent_gives_it_back() -> None:
    """Settled with nothing spent, a hold is given back; with the spend unknown (a cut-off call) it
    is kept whole, and a larger reported spend is added on top."""
    budgets, _ = budgets_for(BudgetsConfig.model_validate({"models": {"m": {"daily_usd": 1}}}), Clock(NOON))
    budgets.settle(await budgets.reserve({"m": 0.5}, None), {}, unknown=False)
    assert budgets.spent("model", "m") == 0
    budgets.settle(await budgets.reserve({"m": 0.5}, None), {"m": 0.1}, unknown=True)
    assert budgets.spent("model", "m") == pytest.approx(0.5)
    budgets.settle(await budgets.reserve({"m": 0.2}, None), {"m": 0.3}, unknown=True)
    assert budgets.spent("model", "m") == pytest.approx(0.8)
    assert bool(budgets)
    assert not bool(budgets_for(BudgetsConfig(), Clock(NOON))[0])
