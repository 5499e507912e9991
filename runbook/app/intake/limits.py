"""The intake's bounds, in one place: request sizes, alerts per webhook, webhooks in progress, and a log that says
"this happened N times" instead of writing a line (or a traceback) per hostile request."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from runbook.app.intake.models import MAX_ALERTS

MAX_BODY = 1024 * 1024


@dataclass(frozen=True)
class Limits:
    """What one intake process accepts."""

    max_body: int = MAX_BODY  # bytes per request, counted while streaming
    max_alerts: int = MAX_ALERTS  # per webhook; the rest are rejected one by one
    max_in_flight: int = 64  # webhooks being processed at once; beyond, 503 (Alertmanager retries)


class _Folding:
    """Admits one event per key per interval and counts the ones it folds into the next admitted one."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._lock = threading.Lock()
        self._last: dict[object, tuple[float, int]] = {}  # key -> (when last admitted, events folded since)

    def admit(self, key: object) -> str | None:
        """None to drop the event; else the suffix to write with it ('' or "(and N more like it ...)")."""
        now = time.monotonic()
        with self._lock:
            last, folded = self._last.get(key, (-self.interval_s, 0))
            if now - last < self.interval_s:
                self._last[key] = (last, folded + 1)
                return None
            self._last[key] = (now, 0)
        return f" (and {folded} more like it in the last {now - last:.0f} s)" if folded else ""


class RateLimitedLog:
    """One line per kind of event per interval, saying how many were folded into it.

    A flood of aborted uploads, malformed requests or stalled connections must not write a line, let alone a
    traceback, per request: the intake once wrote 59 MB of log in 20 s that way.
    """

    def __init__(self, logger: logging.Logger, interval_s: float = 10.0) -> None:
        self.logger = logger
        self._folding = _Folding(interval_s)

    def note(self, kind: str, message: str, level: int = logging.WARNING) -> None:
        more = self._folding.admit(kind)
        if more is not None:
            self.logger.log(level, "%s%s", message, more)
