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
    """Under budget: allowed; once spent: BudgetExceeded with Retry-After = seconds to midnight."""
    clock = Clock(NOON)
    budgets, metrics = budgets_for(BudgetsConfig.model_validate({"models": {"m": {"daily_usd": 1}}}), clock)
    await budgets.check("m", None)
    budgets.record("m", None, 0.6)
    assert ratio(metrics, "model", "m") == pytest.approx(0.6)
    await budgets.check("m", None)
    budgets.record("m", None, 0.4)
    with pytest.raises(BudgetExceeded) as caught:
        await budgets.check("m", None)
    assert caught.value.retry_after == pytest.approx(43_200)
    assert caught.value.status == 429
    await budgets.check("n", None)  # a model without a budget is never refused
    clock.now = NOON + 43_200  # the next UTC day starts from zero
    await budgets.check("m", None)
    assert budgets.spent("model", "m") == 0


async def test_tenant_budgets_count_only_their_tenant() -> None:
    """A tenant's spend counts against its own budget, whatever the model; others are unaffected."""
    config = BudgetsConfig.model_validate({"tenants": {"acme": {"daily_usd": 0.5}}})
    budgets, metrics = budgets_for(config, Clock(NOON))
    budgets.record("m", "acme", 0.3)
    budgets.record("n", "acme", 0.3)
    budgets.record("m", "beta", 5)
    budgets.record("m", None, 5)
    with pytest.raises(BudgetExceeded, match="acme"):
        await budgets.check("m", "acme")
    await budgets.check("m", "beta")
    await budgets.check("m", None)
    assert ratio(metrics, "tenant", "acme") == pytest.approx(1.2)


async def test_unknown_cost_and_zero_cost_change_nothing() -> None:
    """A call with no known price (None) or no cost is not counted (and is not an error)."""
    budgets, _ = budgets_for(BudgetsConfig.model_validate({"models": {"m": {"daily_usd": 1}}}), Clock(NOON))
    budgets.record("m", None, None)
    budgets.record("m", None, 0.0)
    assert budgets.spent("model", "m") == 0
    assert bool(budgets)
    assert not bool(budgets_for(BudgetsConfig(), Clock(NOON))[0])
