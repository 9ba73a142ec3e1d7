"""What a request spent, and where it is counted: each provider model's tokens priced at its own
price, charged to the public model that spent them (the request's, a pinned predictor's, a
fallback), in the metrics and on the cost ledger's rows (the service's and the tenant's)."""

from __future__ import annotations

from dataclasses import dataclass

from dspy_service.costs import CostLedger, PriceLookup, Usage, price_usage
from dspy_service.logs import get_logger
from dspy_service.metrics import Metrics
from dspy_service.models_config import ModelSpec
from dspy_service.programs import UsageByModel
from dspy_service.results import ModelUsage
from dspy_service.routing import Route

_log = get_logger("dspy_service.accounting")


@dataclass(slots=True)
class Spend:
    """What one request's provider calls spent: the tokens the provider reported, per provider
    model id, and how many calls were cut off before it reported any (spend unknown)."""

    tokens: UsageByModel
    unmetered_calls: int = 0
    # Runs of a synchronous program still going in their thread: their tokens come later.
    running_on: int = 0

    def since(self, earlier: UsageByModel) -> UsageByModel:
        """The tokens counted after `earlier` (a copy of `tokens` taken then)."""
        grown: UsageByModel = {}
        for model_id, (tokens_in, tokens_out, calls) in self.tokens.items():
            before_in, before_out, before_calls = earlier.get(model_id, (0, 0, 0))
            if calls > before_calls or tokens_in > before_in:
                grown[model_id] = (tokens_in - before_in, tokens_out - before_out, calls - before_calls)
        return grown

    def add(self, usage_by_model: UsageByModel) -> None:
        for model_id, (tokens_in, tokens_out, calls) in usage_by_model.items():
            before_in, before_out, before_calls = self.tokens.get(model_id, (0, 0, 0))
            self.tokens[model_id] = (before_in + tokens_in, before_out + tokens_out, before_calls + calls)


@dataclass(frozen=True, slots=True)
class PricedSpend:
    """A request's spend priced: in all, and per public model name."""

    total: Usage
    by_model: dict[str, ModelUsage]


class Accountant:
    """Counts requests' spend: metrics, ledger rows, the unmetered calls."""

    def __init__(self, *, ledger: CostLedger, metrics: Metrics, prices: PriceLookup) -> None:
        self._ledger = ledger
        self._metrics = metrics
        self._prices = prices

    def public_names(self, route: Route) -> dict[str, str]:
        """Provider model id -> public model name, for the models a request's program may call."""
        names: dict[str, str] = {}
        models = route.config.models
        for spec in (route.model, *(models[k] for k in route.model.fallbacks), *route.pinned):
            names.setdefault(spec.name, spec.key)
        return names

    def account(self, route: Route, spent: Spend, *, answered: bool = False) -> PricedSpend:
        """Every token the provider reported for this request, failed attempts included, is counted
        against the model that spent it (a pinned predictor's model, a fallback), and so is every
        call cut off before the provider reported its tokens: its spend is unknown, and the totals
        say so rather than count it as nothing."""
        usage = price_usage(spent.tokens, self._prices)
        for model_id in usage.unpriced_models:
            self._metrics.unpriced.labels(model_id).inc()
        by_model = self.charge(route, spent.tokens)
        variant, model = route.program.variant, route.model.key
        if spent.tokens or spent.unmetered_calls or spent.running_on or answered:
            own = by_model.get(model)
            own_usage = Usage(own.input_tokens, own.output_tokens, own.cost_usd) if own else Usage(0, 0, 0.0)
            self._ledger.record_miss(model, variant, own_usage, spent.unmetered_calls, tenant=route.tenant)
        for name, share in by_model.items():
            if name != model:
                share_usage = Usage(share.input_tokens, share.output_tokens, share.cost_usd)
                self._ledger.record_miss(name, variant, share_usage, requests=0, tenant=route.tenant)
        return PricedSpend(total=usage, by_model=by_model)

    def priced_by_model(self, route: Route, tokens: UsageByModel) -> dict[str, float]:
        """What `tokens` cost per public model name (unpriced models cost nothing here)."""
        names = self.public_names(route)
        costs: dict[str, float] = {}
        for model_id, counts in tokens.items():
            price = self._prices(model_id)
            if price is not None:
                name = names.get(model_id, model_id)
                costs[name] = costs.get(name, 0.0) + price.cost(counts[0], counts[1])
        return costs

    def charge(self, route: Route, tokens: UsageByModel) -> dict[str, ModelUsage]:
        """Tokens per provider model id as each public model's usage, each priced at its own price
        and charged to its own metrics and budgets."""
        names = self.public_names(route)
        shares: dict[str, UsageByModel] = {}
        for model_id, counts in tokens.items():
            shares.setdefault(names.get(model_id, model_id), {})[model_id] = counts
        by_model: dict[str, ModelUsage] = {}
        variant = route.program.variant
        for name, share in shares.items():
            priced = price_usage(share, self._prices)
            by_model[name] = ModelUsage(
                calls=sum(counts[2] for counts in share.values()),
                input_tokens=priced.input_tokens,
                output_tokens=priced.output_tokens,
                cost_usd=priced.cost_usd,
            )
            metrics = self._metrics.route(name, variant)
            if priced.input_tokens:
                metrics.input_tokens.inc(priced.input_tokens)
            if priced.output_tokens:
                metrics.output_tokens.inc(priced.output_tokens)
            if priced.cost_usd:
                metrics.cost.inc(priced.cost_usd)
        return by_model

    def account_late(self, route: Route, tokens: UsageByModel) -> None:
        """What a synchronous program spent after its request had ended (its thread ran on)."""
        if not tokens:
            return
        _log.info("prediction.late_usage", variant=route.program.variant, models=sorted(tokens))
        for name, share in self.charge(route, tokens).items():
            usage = Usage(share.input_tokens, share.output_tokens, share.cost_usd)
            self._ledger.record_miss(name, route.program.variant, usage, requests=0, tenant=route.tenant)

    def unmetered(self, spec: ModelSpec, spent: Spend) -> None:
        """One more call whose spend is unknown (sent, and cut off before its tokens were reported)."""
        spent.unmetered_calls += 1
        self._metrics.unmetered_calls.labels(spec.key).inc()
