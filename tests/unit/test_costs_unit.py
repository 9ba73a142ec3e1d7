"""Pricing usage: sums over every LM a program called; unknown prices are None, never zero."""

from __future__ import annotations

import pytest

from dspy_service.costs import CostLedger, Price, Usage, price_usage

PRICES = {"openai/a": Price(0.001, 0.002, "configured"), "openai/b": Price(0.01, 0.02, "dspy")}


def test_usage_from_several_models_is_priced_per_model() -> None:
    """Each LM's tokens are priced with its own price and summed."""
    usage = price_usage({"openai/a": (100, 10, 1), "openai/b": (5, 1, 1)}, PRICES.get)
    assert usage.input_tokens == 105
    assert usage.output_tokens == 11
    assert usage.cost_usd == pytest.approx(100 * 0.001 + 10 * 0.002 + 5 * 0.01 + 1 * 0.02)
    assert usage.unpriced_models == ()


def test_a_cost_is_the_decimal_a_person_would_compute() -> None:
    """127 input and 40 output tokens at $0.03 and $0.06 per 1k cost $0.00621, not the binary
    float sum 0.006209999999999999 (which reached responses and log lines)."""
    gpt4 = Price(0.03 / 1000, 0.06 / 1000, "configured")
    assert gpt4.cost(127, 40) != 0.00621  # the float artefact the rounding removes
    assert price_usage({"openai/gpt-4": (127, 40, 1)}, {"openai/gpt-4": gpt4}.get).cost_usd == 0.00621


def test_one_unpriced_model_makes_the_cost_unknown() -> None:
    """If any model's price is unknown, the total cost is None and the model is named."""
    usage = price_usage({"openai/a": (100, 10, 1), "openai/zzz": (5, 1, 1)}, PRICES.get)
    assert usage.cost_usd is None
    assert usage.unpriced_models == ("openai/zzz",)
    assert usage.input_tokens == 105


async def test_local_totals_without_redis() -> None:
    """Without Redis the ledger reports this replica's totals."""
    ledger = CostLedger(None, 1.0)
    ledger.record_miss("m", "v", Usage(10, 5, 0.5))
    ledger.record_miss("m", "v", Usage(1, 1, None))
    ledger.record_hit("m:v", 0.5)
    totals, scope = await ledger.snapshot()
    assert scope == "replica"
    row = totals["m:v"]
    assert row["total_requests"] == 3
    assert row["total_input_tokens"] == 11
    assert row["total_cost_usd"] == pytest.approx(0.5)
    assert row["unpriced_requests"] == 1
    assert row["cache_hits"] == 1
    assert row["cost_saved_usd"] == pytest.approx(0.5)
