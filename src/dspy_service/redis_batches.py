"""Counter increments sent to Redis so that a batch whose reply was lost is never applied twice.

A flush that times out may still have been applied: a Redis that froze (or stalled on a slow disk)
runs the commands waiting in its socket when it thaws, after we have given up on the reply. Sending
such a batch again would count its spend twice; dropping it would lose spend whenever it really was
not applied. So every batch goes under a token, and one Lua script checks and records the writer's
last applied token in the same atomic step as the increments: a resent batch whose token is already
there is skipped. A writer has at most one batch in doubt at a time (its owner resends that batch,
unchanged, before anything new), so remembering the last token is enough.

Redis has no built-in for this (MULTI cannot branch on a value it reads), hence the script.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from dspy_service.redis_link import KEY_PREFIX, RedisLink

# A writer's marker only has to outlive the time between Redis applying a batch and our resend,
# which follows as soon as Redis answers again; a day is ample and leaves one small key per process.
MARKER_EXPIRY_SECS = 86_400

# ARGV: token, marker expiry, then each command as its argument count followed by its arguments.
# Returns {0} when the token was already applied, else {1, reply of each command...}.
_APPLY_ONCE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return {0}
end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
local result = {1}
local i = 3
while i <= #ARGV do
  local count = tonumber(ARGV[i])
  result[#result + 1] = redis.call(unpack(ARGV, i + 1, i + count))
  i = i + count + 1
end
return result
"""

Command = tuple[str | int | float, ...]


@dataclass(frozen=True, slots=True)
class Applied:
    """A batch Redis has confirmed; `replies` is None when it had been applied by an earlier send."""

    replies: list[Any] | None


def new_token() -> str:
    return uuid.uuid4().hex


class BatchWriter:
    """Applies batches of commands at most once each, for one writer (one ledger in one process)."""

    def __init__(self, link: RedisLink, purpose: str) -> None:
        self._link = link
        self._marker = f"{KEY_PREFIX}batch:{purpose}:{new_token()}"
        self._script = link.client.register_script(_APPLY_ONCE)

    async def send(self, token: str, commands: Sequence[Command]) -> Applied | None:
        """Apply `commands` atomically unless `token` was applied already; None if Redis did not
        confirm either way (the caller keeps the batch and resends it with the same token)."""
        args: list[str | int | float] = [token, MARKER_EXPIRY_SECS]
        for command in commands:
            args.append(len(command))
            args.extend(command)

        async def run(client: Any) -> list[Any]:
            result: list[Any] = await self._script(keys=[self._marker], args=args, client=client)
            return result

        result = await self._link.call(run)
        if result is None:
            return None
        return Applied(result[1:] if result[0] == 1 else None)
