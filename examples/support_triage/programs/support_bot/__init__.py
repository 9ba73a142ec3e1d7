"""A support-ticket triage program for dspy-service: `support_bot.triage:Triage`."""

from support_bot.triage import TicketSummary, Triage

__all__ = ["TicketSummary", "Triage"]
