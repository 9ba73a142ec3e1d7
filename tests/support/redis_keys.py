"""Where the service keeps things in Redis, for tests that look there directly."""

from __future__ import annotations

from dspy_service.redis_link import key_prefix, state_prefix
from dspy_service.settings import Settings

_SERVICE_NAME = Settings.model_fields["service_name"].default
# The prefix of the keys that spread over a cluster's slots (cache entries, rate-limit windows) of a
# service with the default SERVICE_NAME.
DEFAULT_PREFIX = key_prefix(_SERVICE_NAME)
# The prefix of its state keys (cost totals, budget spend, the epoch): one hash slot.
STATE_PREFIX = state_prefix(_SERVICE_NAME)


def state_key(*parts: str, prefix: str = STATE_PREFIX) -> str:
    """`state_key("spend", day, "model", "m")` -> "dspy-service:v1:{<service>}:spend:<day>:model:m"."""
    return prefix + ":".join(parts)
