"""Stopping a background loop for certain.

`task.cancel()` then `await task` can wait for ever when something inside the loop swallows the
cancellation (Python 3.11's asyncio.timeout does when a cancel and its own deadline coincide, and a
library may catch it), and the loop goes round again. So a loop also checks a flag, and its owner
waits for it a bounded time.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

_STOP_WAIT_SECS = 2.0


async def stop_task(task: asyncio.Task[Any] | None, *, wait_secs: float = _STOP_WAIT_SECS) -> None:
    """Cancel `task` (again, if it shrugs a cancel off) and wait at most `wait_secs` for it."""
    if task is None or task.done():
        return
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_secs
    while not task.done() and loop.time() < deadline:
        task.cancel()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait({task}, timeout=min(0.1, max(0.0, deadline - loop.time())))
    if task.done() and not task.cancelled():
        task.exception()  # retrieved, so it is not reported as never retrieved
