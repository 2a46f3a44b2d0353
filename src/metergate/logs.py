"""Logging that a client cannot flood: a bounded line length and a rate limit per message template.

Every line the gateway writes about a request may carry something a client chose (a model name, a malformed
request), and a client can make requests as fast as the gateway answers them. `BoundedLogFilter` sits on the
handler, so it covers metergate's loggers and uvicorn's alike.
"""

from __future__ import annotations

import logging
import sys
import time

MAX_LINE_CHARS = 2000


class BoundedLogFilter(logging.Filter):
    """At most `burst` records per message template and `window_s`; the next one that passes says how many were
    suppressed. Messages longer than `MAX_LINE_CHARS` are cut with a marker."""

    def __init__(self, burst: int = 10, window_s: float = 60.0, max_templates: int = 1000) -> None:
        super().__init__()
        self.burst = burst
        self.window_s = window_s
        self.max_templates = max_templates
        self._seen: dict[tuple[str, object], list[float]] = {}  # template -> [window start, count, suppressed]

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.msg)
        now = time.monotonic()
        state = self._seen.get(key)
        if state is None or now - state[0] >= self.window_s:
            suppressed = int(state[2]) if state is not None else 0
            if len(self._seen) >= self.max_templates:
                self._seen.clear()
            self._seen[key] = [now, 1.0, 0.0]
        else:
            state[1] += 1
            if state[1] > self.burst:
                state[2] += 1
                return False
            suppressed = 0
        message = record.getMessage()
        if len(message) > MAX_LINE_CHARS:
            message = message[:MAX_LINE_CHARS] + f"… [{len(message) - MAX_LINE_CHARS} more characters]"
        if suppressed:
            message += f" ({suppressed} similar messages suppressed in the last {self.window_s:.0f} s)"
        record.msg, record.args = message, None
        return True


def setup_logging(level: str) -> None:
    """Log to stderr through a bounded filter; raises ValueError for an unknown level name."""
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r}: choose debug, info, warning or error")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(BoundedLogFilter())
    logging.basicConfig(level=numeric, handlers=[handler], force=True)
