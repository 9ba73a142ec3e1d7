"""UTC timestamps as ISO-8601 strings with milliseconds and a `Z`, formatted once per millisecond.

Every request stamps its response, its log line and its cost totals; formatting a datetime costs
more than everything else those three do, so the string is reused within the same millisecond.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime

_last_ms = -1
_last_text = ""


def utc_now_iso() -> str:
    global _last_ms, _last_text
    now = time.time()
    ms = int(now * 1000)
    if ms != _last_ms:
        _last_text = datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")[:-6] + "Z"
        _last_ms = ms
    return _last_text
