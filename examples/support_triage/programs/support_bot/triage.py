"""Support-ticket triage: classify a ticket, find the help-centre articles that fit, look up the
orders it mentions, and draft a reply.

The steps, in `Triage.forward`:

1. `classify` (a typed `dspy.Predict`): category, urgency, a confidence and a structured summary
   (a pydantic `TicketSummary`);
2. retrieval (plain Python, no LM call): the help-centre articles sharing the most keywords with
   the ticket, the chosen category's articles first among equals;
3. `investigate` (a `dspy.ReAct` agent with one tool, `lookup_order`), only when the ticket names
   an order number: it looks the orders up and reports what the records say;
4. `draft` (a `dspy.ChainOfThought`): the reply, from the ticket, the triage, the articles and the
   order notes.

Serving rules (dspy-service, and DSPy itself): the service builds `Triage()` once, with no
arguments, and every concurrent request calls that same object. A module must therefore never keep
per-request state on `self`: no `self.last_ticket = ...`, no counters, no caches filled per call.
Everything a request needs lives in local variables of `forward` and in the returned Prediction.
What `__init__` puts on `self` (the predictors, the help centre, the tool) is shared and only read.
`forward` is synchronous, so the service runs it in one of its program threads (PROGRAM_THREADS).
"""

from __future__ import annotations

from typing import Literal

import dspy
from pydantic import BaseModel, Field

from support_bot.docs import HelpCentre, load_articles
from support_bot.tools import find_order_ids, lookup_order

Category = Literal["billing", "technical", "account", "other"]
Urgency = Literal["low", "medium", "high"]
Tier = Literal["free", "pro"]


class TicketSummary(BaseModel):
    """What the ticket is about, in a shape other systems can file."""

    subject: str = Field(description="the problem in a few words")
    product_area: str = Field(description="the part of the product concerned, e.g. invoices, sync, sign-in")
    sentiment: Literal["calm", "frustrated", "angry"]


class Classify(dspy.Signature):
    """Triage a customer support ticket: its category, how urgent it is, and a short summary.
    Pro customers with a blocked workflow or a wrong charge are high urgency."""

    ticket: str = dspy.InputField(desc="the customer's message")
    customer_tier: Tier = dspy.InputField()
    category: Category = dspy.OutputField()
    urgency: Urgency = dspy.OutputField()
    confidence: float = dspy.OutputField(desc="how sure the category is, from 0 to 1")
    summary: TicketSummary = dspy.OutputField()


class Investigate(dspy.Signature):
    """Look up every order the customer names and report what the records say about it."""

    ticket: str = dspy.InputField()
    order_ids: list[str] = dspy.InputField(desc="order numbers written in the ticket")
    order_notes: str = dspy.OutputField(desc="the facts found about each order, for the reply")


class DraftReply(dspy.Signature):
    """Draft the support agent's reply to the customer: friendly, specific, and grounded only in the
    help-centre articles and order notes given. Say what happens next."""

    ticket: str = dspy.InputField()
    customer_tier: Tier = dspy.InputField()
    category: Category = dspy.InputField()
    urgency: Urgency = dspy.InputField()
    articles: list[str] = dspy.InputField(desc="help-centre articles that may answer the ticket")
    order_notes: str = dspy.InputField()
    reply: str = dspy.OutputField(desc="the reply to send, signed 'The Support Team'")


NO_ORDERS = "The ticket names no order."


class Triage(dspy.Module):
    """The whole triage program; built with no arguments, shared by every request."""

    def __init__(self) -> None:
        super().__init__()
        self.classify = dspy.Predict(Classify)
        self.help_centre = HelpCentre(load_articles())
        self.investigate = dspy.ReAct(Investigate, tools=[dspy.Tool(lookup_order)], max_iters=3)
        self.draft = dspy.ChainOfThought(DraftReply)

    def forward(self, ticket: str, customer_tier: Tier = "free") -> dspy.Prediction:
        triage = self.classify(ticket=ticket, customer_tier=customer_tier)
        category: Category = triage.category
        articles = self.help_centre.search(ticket, category=category, k=2)
        # Only order numbers the customer actually wrote are looked up (found by code, not by the
        # model), so a ticket without one makes no agent call at all.
        order_ids = find_order_ids(ticket)
        if order_ids:
            order_notes = self.investigate(ticket=ticket, order_ids=order_ids).order_notes
        else:
            order_notes = NO_ORDERS
        drafted = self.draft(
            ticket=ticket,
            customer_tier=customer_tier,
            category=category,
            urgency=triage.urgency,
            articles=[article.as_context() for article in articles],
            order_notes=order_notes,
        )
        return dspy.Prediction(
            category=category,
            urgency=triage.urgency,
            confidence=min(max(float(triage.confidence), 0.0), 1.0),
            summary=triage.summary,
            articles=[article.id for article in articles],
            order_ids=order_ids,
            order_notes=order_notes,
            reasoning=drafted.reasoning,
            reply=drafted.reply,
        )
