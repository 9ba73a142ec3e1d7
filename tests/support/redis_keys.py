"""Where the service keeps things in Redis, for tests that look there directly."""

from __future__ import annotations

from dspy_service.redis_link import key_prefix
from dspy_service.settings import Settings

# The prefix of every key of a service with the default SERVICE_NAME.
DEFAULT_PREFIX = key_prefix(Settings.model_fields["service_name"].default)


def state_key(*parts: str, prefix: str = DEFAULT_PREFIX) -> str:
    """`state_key("spend", day, "model", "m")` -> "dspy-service:v1:<service>:spend:<day>:model:m"."""
    return prefix + ":".join(parts)
