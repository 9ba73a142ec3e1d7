"""Counter increments sent to Redis so that a batch whose reply was lost is never applied twice.

A flush that times out may still have been applied: a Redis that froze (or stalled on a slow disk)
runs the commands waiting in its socket when it thaws, after we have given up on the reply. Sending
such a batch again would count its spend twice; dropping it would lose spend whenever it really was
not applied. So every batch goes under a token, and one Lua script checks and records the writer's
last applied token in the same atomic step as the increments: a resent batch whose token is already
there is skipped. A writer has at most one batch in doubt at a time (it resends that batch, unchanged,
before anything new), so remembering the last token is enough.

Redis has no built-in for this (MULTI cannot branch on a value it reads), hence the script.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Generic, TypeVar

from dspy_service.redis_link import RedisLink

# A writer's marker only has to outlive the time between Redis applying a batch and our resend,
# which follows as soon as Redis answers again; a day is ample and leaves one small key per process.
MARKER_EXPIRY_SECS = 86_400

# KEYS: the writer's marker, then each command's key (Redis asks that a script name every key it
# touches in KEYS). ARGV: token, marker expiry, then for each command its count of further arguments,
# its name and those arguments. Returns {0} when the token was already applied, else {1, replies...}.
_APPLY_ONCE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return {0}
end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
local result = {1}
local i = 3
for k = 2, #KEYS do
  local count = tonumber(ARGV[i])
  result[#result + 1] = redis.call(ARGV[i + 1], KEYS[k], unpack(ARGV, i + 2, i + 1 + count))
  i = i + count + 2
end
return result
"""

Command = tuple[str | int | float, ...]  # name, key, arguments
BatchT = TypeVar("BatchT")
# Hears of each batch Redis confirmed, with the commands' replies (None: an earlier send applied it).
OnApplied = Callable[[BatchT, list[Any] | None], Awaitable[None]]


class BatchWriter(Generic[BatchT]):
    """Sends one owner's batches (one ledger in one process), one at a time, each applied once."""

    def __init__(
        self, link: RedisLink, purpose: str, commands: Callable[[BatchT], Sequence[Command]]
    ) -> None:
        self._link = link
        self._commands = commands
        self._marker = f"{link.state_prefix}batch:{purpose}:{uuid.uuid4().hex}"
        self._script = link.client.register_script(_APPLY_ONCE)
        self._lock = asyncio.Lock()
        self._in_doubt: tuple[str, BatchT] | None = None

    @property
    def in_doubt(self) -> BatchT | None:
        """The batch sent whose outcome Redis has not confirmed: its owner still counts it as unsent."""
        return None if self._in_doubt is None else self._in_doubt[1]

    async def flush(
        self, take: Callable[[], BatchT | None], on_applied: OnApplied[BatchT] | None = None
    ) -> bool:
        """Resend the batch in doubt, as it was, then send the batch `take` hands over (None: nothing
        pending). True when Redis has confirmed everything handed over, so nothing is in doubt."""
        if not self._link.connected:
            return self._in_doubt is None
        async with self._lock:
            for _ in range(2):
                if self._in_doubt is None:
                    batch = take()
                    if batch is None:
                        return True
                    self._in_doubt = (uuid.uuid4().hex, batch)
                token, batch = self._in_doubt
                sent = await self._send(token, self._commands(batch))
                if sent is None:
                    return False
                self._in_doubt = None
                if on_applied is not None:
                    await on_applied(batch, sent[1:] if sent[0] == 1 else None)
            return True

    async def _send(self, token: str, commands: Sequence[Command]) -> list[Any] | None:
        """The script's result, or None if Redis did not confirm either way."""
        keys = [self._marker]
        args: list[str | int | float] = [token, MARKER_EXPIRY_SECS]
        for name, key, *rest in commands:
            keys.append(str(key))
            args += [len(rest), name, *rest]

        async def run(client: Any) -> list[Any]:
            result: list[Any] = await self._script(keys=keys, args=args, client=client)
            return result

        return await self._link.call(run)
