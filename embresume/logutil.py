"""Logging what peers cause, without letting a peer flood the log.

A hostile or broken peer can send bad frames as fast as the network allows;
each would otherwise cost a log line, and its text (a field's value, a
reason) could be megabytes.  :class:`RateLimitedLog` keeps, per kind of event,
at most ``burst`` lines per ``period`` seconds; the first line after a quiet
spell says how many were left out.  Every line is clipped to
:data:`MAX_LINE` characters.
"""

from __future__ import annotations

import logging
import threading
import time

MAX_LINE = 500


def clip(text: object, limit: int = MAX_LINE) -> str:
    s = str(text)
    return s if len(s) <= limit else s[:limit] + f"... ({len(s) - limit} more characters)"


class RateLimitedLog:
    def __init__(self, logger: logging.Logger, burst: int = 10, period: float = 10.0):
        self.logger = logger
        self.burst, self.period = burst, period
        self._lock = threading.Lock()
        self._state: dict[str, list] = {}      # kind -> [window start, lines in window, left out]

    def __call__(self, level: int, kind: str, msg: str, *args, exc_info: bool = False) -> bool:
        """Log ``msg % args`` under ``kind`` unless over the budget; True when logged."""
        if not self.logger.isEnabledFor(level):
            return False
        now = time.monotonic()
        with self._lock:
            st = self._state.get(kind)
            if st is None:
                st = self._state[kind] = [now, 0, 0]
            if now - st[0] >= self.period:
                st[0], st[1] = now, 0
            if st[1] >= self.burst:
                st[2] += 1
                return False
            st[1] += 1
            skipped, st[2] = st[2], 0
        try:
            text = msg % args if args else msg
        except (TypeError, ValueError):
            text = f"{msg} {args!r}"
        if skipped:
            text += f" ({skipped} similar lines left out)"
        self.logger.log(level, "%s", clip(text), exc_info=exc_info)
        return True
