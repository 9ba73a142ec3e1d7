"""Counter increments sent to Redis so that a batch whose reply was lost is never applied twice.

A flush that times out may still have been applied: a Redis that froze (or stalled on a slow disk)
runs the commands waiting in its socket when it thaws, after we have given up on the reply. Sending
such a batch again would count its spend twice; dropping it would lose spend whenever it really was
not applied. So every batch goes under a token, and one Lua script checks and records the writer's
last applied token in the same atomic step as the increments: a resent batch whose token is already
there is skipped. A writer has at most one batch in doubt at a time (it resends that batch, unchanged,
before anything new), so remembering the last token is enough.

A failover can also lose a batch Redis did confirm: replication is asynchronous, so a primary that
dies (or that Sentinel demotes while it still takes writes) may not have passed its last writes on to
the replica that replaces it. The client may not even notice the switch (a connection the old primary
closed is silently reopened to the new one). So the marker keeps the writer's recent tokens (a list,
trimmed), each send also asks whether the previous confirmed token is still there, and the writer
keeps the batches confirmed in the last RESEND_WINDOW_SECS: when the previous token is missing, the
state was rolled back under us, and those batches are sent again. A batch the primary has (its token
is in the list, replicated atomically with the increments by the same script) is skipped; a lost one
is applied, and counted as recovered.

Redis has no built-in for this (MULTI cannot branch on a value it reads), hence the script.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Generic, TypeVar

from dspy_service.logs import get_logger
from dspy_service.redis_link import RedisLink

# A writer's marker only has to outlive the time between Redis applying a batch and our resend,
# which follows as soon as Redis answers again; a day is ample and leaves one small key per process.
MARKER_EXPIRY_SECS = 86_400
# Batches confirmed this recently are sent again after a reconnection (a failover loses at most what
# the old primary had not yet passed on: milliseconds of writes, or the second or so in which a
# demoted primary still took writes). The marker remembers more tokens than the writer resends.
RESEND_WINDOW_SECS = 10.0
RESEND_MAX_BATCHES = 200
MARKER_TOKENS = 256

_log = get_logger("dspy_service.redis_batches")

# KEYS: the writer's marker (a list of its last tokens), then each command's key (Redis asks that a
# script name every key it touches in KEYS). ARGV: token, marker expiry, the number of tokens kept,
# the previous confirmed token ('' for none), then for each command its count of further arguments,
# its name and those arguments. Returns {0, lost} when the token was already applied, else
# {1, lost, replies...}; lost is 1 when the previous token is missing (the state was rolled back).
_APPLY_ONCE = """
local lost = 0
if ARGV[4] ~= '' and not redis.call('LPOS', KEYS[1], ARGV[4]) then
  lost = 1
end
if redis.call('LPOS', KEYS[1], ARGV[1]) then
  return {0, lost}
end
redis.call('LPUSH', KEYS[1], ARGV[1])
redis.call('LTRIM', KEYS[1], 0, tonumber(ARGV[3]) - 1)
redis.call('EXPIRE', KEYS[1], ARGV[2])
local result = {1, lost}
local i = 5
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
        # batch2: a list of tokens (the first layout kept one token, in a plain string)
        self._marker = f"{link.state_prefix}batch2:{purpose}:{uuid.uuid4().hex}"
        self._purpose = purpose
        self._script = link.client.register_script(_APPLY_ONCE)
        self._lock = asyncio.Lock()
        self._in_doubt: tuple[str, BatchT] | None = None
        # (when confirmed, token, batch) of the batches confirmed lately, oldest first
        self._confirmed: deque[tuple[float, str, BatchT]] = deque(maxlen=RESEND_MAX_BATCHES)

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
                previous = self._confirmed[-1][1] if self._confirmed else ""
                sent = await self._send(token, self._commands(batch), previous)
                if sent is None:
                    return False
                self._in_doubt = None
                if on_applied is not None:
                    await on_applied(batch, sent[2:] if sent[0] == 1 else None)
                if sent[1] == 1 and not await self._resend_confirmed(on_applied):
                    self._remember(token, batch)
                    return False
                self._remember(token, batch)
            return True

    def forget_confirmed(self) -> None:
        """Keep nothing to send again after a rollback: the state was lost whole and its totals are
        rebuilt from the receipts (cost_recovery.py), which hold these batches too."""
        self._confirmed.clear()

    def _remember(self, token: str, batch: BatchT) -> None:
        now = time.monotonic()
        self._confirmed.append((now, token, batch))
        while self._confirmed and self._confirmed[0][0] < now - RESEND_WINDOW_SECS:
            self._confirmed.popleft()

    async def _resend_confirmed(self, on_applied: OnApplied[BatchT] | None) -> bool:
        """The state was rolled back (a failover to a replica that had not received our last
        writes): send the batches confirmed lately again; those Redis still has are skipped. True
        when each got an answer (else the next rollback found resends them)."""
        horizon = time.monotonic() - RESEND_WINDOW_SECS
        recovered = 0
        for confirmed_at, token, batch in list(self._confirmed):
            if confirmed_at < horizon:
                continue
            sent = await self._send(token, self._commands(batch), "")
            if sent is None:
                return False
            if sent[0] == 1:  # lost in the failover, applied now
                recovered += 1
                if on_applied is not None:
                    await on_applied(batch, sent[2:])
        if recovered:
            self._link.metrics.redis_batches_recovered.labels(self._purpose).inc(recovered)
            _log.warning(
                "redis.batches_recovered",
                purpose=self._purpose,
                batches=recovered,
                detail="batches Redis had confirmed were missing (a failover to a replica that had not "
                "received them); they were sent again and counted once",
            )
        return True

    async def _send(self, token: str, commands: Sequence[Command], previous: str) -> list[Any] | None:
        """The script's result, or None if Redis did not confirm either way."""
        keys = [self._marker]
        args: list[str | int | float] = [token, MARKER_EXPIRY_SECS, MARKER_TOKENS, previous]
        for name, key, *rest in commands:
            keys.append(str(key))
            args += [len(rest), name, *rest]

        async def run(client: Any) -> list[Any]:
            result: list[Any] = await self._script(keys=keys, args=args, client=client)
            return result

        return await self._link.call(run)
